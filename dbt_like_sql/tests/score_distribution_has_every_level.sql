-- Every model, n, format and judge lists each rubric level exactly once (zero counts included).
select model, n, format, judge, count(*) as levels, count(distinct score) as distinct_levels
from marts.score_distribution
group by model, n, format, judge
having count(*) <> (select count(*) from marts.rubric_levels)
    or count(distinct score) <> (select count(*) from marts.rubric_levels)
