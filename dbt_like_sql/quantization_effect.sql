-- F16 versus Q4_K_M per model, n and judge: the paper's averages and delta, plus a paired Wilcoxon
-- signed-rank test over the questions both formats answered (p_value, significant at 0.05) and a paired
-- bootstrap interval of the delta, the p-value Holm-adjusted across the judge's rows (p_value_holm) and
-- whether it is exact or Monte Carlo (p_method); speedup = F16 s/question over Q4 s/question; size_ratio = Q4 bytes
-- over F16 bytes.
with summary as (
    select * from marts.score_summary
),

f16 as (
    select * from summary where format = 'f16'
),

q4 as (
    select * from summary where format = 'q4_k_m'
)

select
    f.model,
    f.n,
    f.avg_score as f16_avg,
    q.avg_score as q4_avg,
    q.avg_score - f.avg_score as delta,
    t.p_value,
    t.significant,
    t.p_value_holm,
    t.significant_holm,
    t.family_size,
    t.p_method,
    t.sign_flips,
    f.sec_per_question / nullif(q.sec_per_question, 0) as speedup,
    q.size_gb / nullif(f.size_gb, 0) as size_ratio,
    f.judge,
    t.pairs,
    t.nonzero_pairs,
    t.mean_delta as paired_delta,
    t.delta_ci_low,
    t.delta_ci_high,
    f.perfect_rate as f16_perfect_rate,
    q.perfect_rate as q4_perfect_rate,
    q.perfect_rate - f.perfect_rate as perfect_rate_delta,
    f.score0_count as f16_score0_count,
    q.score0_count as q4_score0_count,
    f.sec_per_question as f16_sec_per_question,
    q.sec_per_question as q4_sec_per_question,
    f.size_gb as f16_size_gb,
    q.size_gb as q4_size_gb
from f16 as f
inner join q4 as q
    on q.model = f.model and q.n = f.n and q.judge = f.judge
left join marts.quantization_tests as t
    on t.model = f.model and t.n = f.n and t.judge = f.judge
order by f.model, f.n, f.judge
