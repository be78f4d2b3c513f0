-- How far each judge can be trusted: parse rate and retries, whether its scores follow answer length
-- (Spearman rank correlation of score and characters; the paper's longest answers scored lowest), and its
-- agreement with every other judge that scored the same answers (Cohen's kappa, linear and quadratic).
with judged as (
    select * from marts.judged_answers
),

per_judge as (
    select
        judge,
        count(*) as judgements,
        count(score) as parsed,
        count(score) / count(*) as parse_rate,
        avg(attempts) as avg_attempts,
        count(*) filter (where attempts > 1) as retried,
        count(distinct model || '|' || n || '|' || format) as model_formats,
        avg(score) as avg_score,
        avg(chars) as avg_chars
    from judged
    group by judge
),

pairs as (
    select judge_a as judge, judge_b as other_judge, pairs, exact_agreement, cohen_kappa,
        weighted_kappa_linear, weighted_kappa_quadratic
    from marts.judge_agreement
    union all
    select judge_b as judge, judge_a as other_judge, pairs, exact_agreement, cohen_kappa,
        weighted_kappa_linear, weighted_kappa_quadratic
    from marts.judge_agreement
)

select
    p.judge,
    p.judgements,
    p.parsed,
    p.parse_rate,
    p.avg_attempts,
    p.retried,
    p.model_formats,
    p.avg_score,
    p.avg_chars,
    l.pairs as length_pairs,
    l.spearman_rho as length_spearman,
    l.p_value as length_p_value,
    a.other_judge,
    a.pairs as agreement_pairs,
    a.exact_agreement,
    a.cohen_kappa,
    a.weighted_kappa_linear,
    a.weighted_kappa_quadratic
from per_judge as p
left join marts.score_length_correlation as l
    on l.judge = p.judge
left join pairs as a
    on a.judge = p.judge
order by p.judge, a.other_judge
