-- Paper-style summary per model, n, format and judge: average 0-3 score with its 95% bootstrap interval
-- (ci_low, ci_high), perfect-score rate (share of 3s among parsed judgements), score-0 count, average
-- answer length in characters, seconds per question and GGUF size (decimal GB). Unparsed judgements count
-- in questions and unparsed, never in the averages. serving_backend names the stack that served the answers
-- (comma-separated if a partition's answers came from more than one, e.g. after a configured fallback).
-- judge_verdict is the judge's validity verdict from its controls (marts.judge_validity): an average from a
-- judge with `no signal` says nothing about the answers; NULL when the controls were not run.
with judged as (
    select * from marts.judged_answers
),

summary as (
    select
        model,
        n,
        format,
        judge,
        count(*) as questions,
        count(score) as scored,
        count(*) - count(score) as unparsed,
        avg(score) as avg_score,
        count(*) filter (where score = 3) as perfect_count,
        count(*) filter (where score = 0) as score0_count,
        avg(chars) as avg_chars,
        avg(seconds) as sec_per_question,
        string_agg(distinct serving_backend, ',' order by serving_backend) as serving_backend
    from judged
    group by model, n, format, judge
),

sizes as (
    select model, cast(n as bigint) as n, format, max(artifact_bytes) / 1e9 as size_gb
    from serve.gguf
    where artifact_bytes is not null and coalesce(stage, 2) = 2
    group by model, cast(n as bigint), format
)

select
    s.model,
    s.n,
    s.format,
    s.questions,
    s.avg_score,
    s.perfect_count / nullif(s.scored, 0) as perfect_rate,
    s.score0_count,
    s.avg_chars,
    s.sec_per_question,
    z.size_gb,
    i.ci_low,
    i.ci_high,
    s.judge,
    s.scored,
    s.unparsed,
    s.scored / nullif(s.questions, 0) as parse_rate,
    s.perfect_count,
    i.ci_method,
    s.serving_backend,
    v.verdict as judge_verdict
from summary as s
left join sizes as z
    on z.model = s.model and z.n = s.n and z.format = s.format
left join marts.score_intervals as i
    on i.model = s.model and i.n = s.n and i.format = s.format and i.judge = s.judge
left join marts.judge_validity as v
    on v.judge = s.judge
order by s.model, s.n, s.format, s.judge
