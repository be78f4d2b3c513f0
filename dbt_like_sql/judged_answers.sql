-- One row per judgement of a stage-2 adapter with its answer's length and generation time: the base of
-- every score mart. Judgements of the reference model's stage-1 adapter (stage = 1, kept for the paper's
-- Lesson 4) are compared in lora_rank_effect instead; rows without a stage count as stage 2. Types are
-- normalized here (n as BIGINT, score as INTEGER) so the marts never depend on how a stage stored them.
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
    where coalesce(stage, 2) = 2
),

answers as (
    select
        model,
        cast(n as bigint) as n,
        format,
        cast(question_id as varchar) as question_id,
        coalesce(cast(chars as bigint), length(answer)) as chars,
        cast(tokens as bigint) as tokens,
        cast(seconds as double) as seconds,
        backend
    from eval.answers
    where coalesce(stage, 2) = 2
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
    a.seconds,
    -- The stack that served the answers (ollama, or llama_cpp when a configured fallback replaced it).
    a.backend as serving_backend
from scores as s
left join answers as a
    on a.model = s.model and a.n = s.n and a.format = s.format and a.question_id = s.question_id
order by s.model, s.n, s.format, s.judge, s.question_id
