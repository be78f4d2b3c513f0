-- How many answers got each rubric level (3/2/1/0) per model, n, format and judge, levels with no answers
-- included as zero so distributions line up; share is count over parsed judgements.
with judged as (
    select model, n, format, judge, score from marts.judged_answers
),

groups as (
    select distinct model, n, format, judge from judged
),

counts as (
    select
        g.model,
        g.n,
        g.format,
        g.judge,
        l.score,
        count(j.score) as count
    from groups as g
    cross join marts.rubric_levels as l
    left join judged as j
        on j.model = g.model and j.n = g.n and j.format = g.format and j.judge = g.judge and j.score = l.score
    group by g.model, g.n, g.format, g.judge, l.score
)

select
    model,
    n,
    format,
    score,
    count,
    judge,
    count / nullif(sum(count) over (partition by model, n, format, judge), 0) as share
from counts
order by model, n, format, judge, score desc
