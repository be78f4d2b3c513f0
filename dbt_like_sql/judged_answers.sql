-- One row per judgement with its answer's length and generation time: the base of every score mart.
-- Types are normalized here (n as BIGINT, score as INTEGER) so the marts never depend on how a stage
-- happened to store them.
with scores as (
    select
        model,
        cast(n as bigint) as n,
        format,
        cast(question_id as varchar) as question_id,
        coalesce(category, '(none)') as category,
        judge,
        cast(score as integer) as score,
        coalesce(parse_ok, false) as parse_ok,
        cast(attempts as integer) as attempts,
        prompt_version
    from eval.judge_scores
),

answers as (
    select
        model,
        cast(n as bigint) as n,
        format,
        cast(question_id as varchar) as question_id,
        coalesce(cast(chars as bigint), length(answer)) as chars,
        cast(tokens as bigint) as tokens,
        cast(seconds as double) as seconds
    from eval.answers
)

select
    s.model,
    s.n,
    s.format,
    s.question_id,
    s.category,
    s.judge,
    s.score,
    s.parse_ok,
    s.attempts,
    s.prompt_version,
    a.chars,
    a.tokens,
    a.seconds
from scores as s
left join answers as a
    on a.model = s.model and a.n = s.n and a.format = s.format and a.question_id = s.question_id
order by s.model, s.n, s.format, s.judge, s.question_id
