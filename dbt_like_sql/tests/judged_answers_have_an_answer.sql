-- severity: warn
-- Every judgement matches an answer row (its length and time come from there); a miss means the answers
-- were re-materialized after judging and the judge partition is stale.
select model, n, format, judge, question_id
from marts.judged_answers
where chars is null
