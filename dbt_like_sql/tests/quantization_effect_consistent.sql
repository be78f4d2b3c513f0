-- The delta is Q4 minus F16, the p-value is a probability, and significant means p < 0.05.
select model, n, judge, f16_avg, q4_avg, delta, p_value, significant
from marts.quantization_effect
where abs(delta - (q4_avg - f16_avg)) > 1e-9
    or p_value < 0 or p_value > 1
    or (p_value is not null and significant <> (p_value < 0.05))
    or (pairs > 0 and (delta_ci_low > paired_delta + 1e-9 or delta_ci_high < paired_delta - 1e-9))
