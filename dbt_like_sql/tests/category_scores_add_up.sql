-- The categories of a model, n, format and judge together hold exactly its judged questions.
with per_group as (
    select model, n, format, judge, sum(questions) as questions
    from marts.category_scores
    group by model, n, format, judge
)
select s.model, s.n, s.format, s.judge, s.questions, c.questions as category_questions
from marts.score_summary as s
left join per_group as c
    on c.model = s.model and c.n = s.n and c.format = s.format and c.judge = s.judge
where coalesce(c.questions, 0) <> s.questions
