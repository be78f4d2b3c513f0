-- score_summary has one row per model, n, format and judge.
select model, n, format, judge, count(*) as rows
from marts.score_summary
group by model, n, format, judge
having count(*) > 1
