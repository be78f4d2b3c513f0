-- At most one n is marked optimal per model.
select model, count(*) filter (where is_optimal) as optimal_rows
from marts.scale_curve
group by model
having count(*) filter (where is_optimal) > 1
