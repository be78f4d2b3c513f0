-- Average score per test-set category, model, n, format and judge. Every category of the test set appears
-- for every model: a category the answers do not cover has questions = 0 and a NULL average, so an
-- absent category is visible instead of silently dropped.
with judged as (
    select model, n, format, judge, category, question_id, score from marts.judged_answers
),

groups as (
    select distinct model, n, format, judge from judged
),

categories as (
    select distinct coalesce(category, '(none)') as category from qa.test_set
    union
    select distinct category from judged
)

select
    g.model,
    g.n,
    g.format,
    c.category,
    avg(j.score) as avg_score,
    count(j.question_id) as questions,
    g.judge,
    count(j.score) as scored,
    count(j.score) filter (where j.score = 3) / nullif(count(j.score), 0) as perfect_rate,
    -- The judge's validity verdict from its controls (marts.judge_validity), beside its averages.
    any_value(v.verdict) as judge_verdict
from groups as g
cross join categories as c
left join judged as j
    on j.model = g.model and j.n = g.n and j.format = g.format and j.judge = g.judge and j.category = c.category
left join marts.judge_validity as v
    on v.judge = g.judge
group by g.model, g.n, g.format, g.judge, c.category
order by g.model, g.n, g.format, g.judge, c.category
