-- A parsed judgement has a score on the rubric; an unparsed one has a NULL score (never a silent 0).
select model, n, format, judge, question_id, parse_ok, score
from marts.judged_answers
where (parse_ok and score is null)
    or (not parse_ok and score is not null)
    or (score is not null and score not in (select score from marts.rubric_levels))
