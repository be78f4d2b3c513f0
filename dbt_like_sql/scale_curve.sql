-- Stage 1: training-set size against final training loss and test-set answer NLL / perplexity of the
-- reference model, with the paper's delta_nll (change from the previous n, NULL at the first), the
-- distance to the optimum and its paired bootstrap interval over the evaluation questions, the status
-- (optimal, indistinguishable from optimal, underfit, overfitting: whether that interval excludes zero),
-- the paper's own Table 2 label, and the optimum.
select
    model,
    cast(n as bigint) as n,
    train_loss_final,
    test_nll,
    test_ppl,
    delta_nll,
    nll_above_optimum,
    diff_ci_low,
    diff_ci_high,
    paired_questions,
    status,
    paper_status,
    coalesce(is_optimal, false) as is_optimal
from eval.scale_curve
order by model, n
