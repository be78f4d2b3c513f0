-- Stage 1: training-set size against final training loss and test-set answer NLL / perplexity of the
-- reference model, with the paper's delta_nll (change from the previous n, NULL at the first), the
-- distance to the optimum, the status stage 1 gave each n (underfit, optimal, overfitting) and the optimum.
select
    model,
    cast(n as bigint) as n,
    train_loss_final,
    test_nll,
    test_ppl,
    delta_nll,
    nll_above_optimum,
    status,
    coalesce(is_optimal, false) as is_optimal
from eval.scale_curve
order by model, n
