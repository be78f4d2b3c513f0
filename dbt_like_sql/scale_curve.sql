-- Training-set size against final training loss and test-set answer NLL / perplexity per model, with
-- the status the evaluation stage gave each n (underfit, optimal, overfitting) and the chosen optimum.
select
    model,
    cast(n as bigint) as n,
    train_loss_final,
    test_nll,
    test_ppl,
    delta_nll,
    status,
    coalesce(is_optimal, false) as is_optimal
from eval.scale_curve
order by model, n
