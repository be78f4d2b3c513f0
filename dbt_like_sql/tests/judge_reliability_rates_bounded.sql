-- Parse rates and kappas are in range (kappa in [-1, 1], parse rate in [0, 1]).
select judge, other_judge, parse_rate, cohen_kappa, weighted_kappa_linear, weighted_kappa_quadratic
from marts.judge_reliability
where parse_rate not between 0 and 1
    or cohen_kappa not between -1 and 1
    or weighted_kappa_linear not between -1 and 1
    or weighted_kappa_quadratic not between -1 and 1
