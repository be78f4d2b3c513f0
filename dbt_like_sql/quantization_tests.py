"""Paired F16 vs Q4_K_M comparison per model, n and judge over the questions both formats answered and
the judge scored: Wilcoxon signed-rank test (scipy) of the per-question differences and a bootstrap 95%
interval of their mean. significant = p < 0.05 for the one test; p_value_holm / significant_holm adjust
across every row of a judge (Holm). p_method says whether the p-value is exact or Monte Carlo."""

from __future__ import annotations

import polars as pl

from jpslm_assets.common.statistics import paired_difference_test, with_holm

SOURCE = """
select model, n, format, judge, question_id, score
from marts.judged_answers
where score is not null and format in ('f16', 'q4_k_m')
"""

SCHEMA = {
    "model": pl.Utf8,
    "n": pl.Int64,
    "judge": pl.Utf8,
    "pairs": pl.Int64,
    "nonzero_pairs": pl.Int64,
    "mean_delta": pl.Float64,
    "delta_ci_low": pl.Float64,
    "delta_ci_high": pl.Float64,
    "statistic": pl.Float64,
    "p_value": pl.Float64,
    "significant": pl.Boolean,
    "test": pl.Utf8,
    "p_method": pl.Utf8,
    "sign_flips": pl.Int64,
}

# The tests read together, and so adjusted together (Holm): every row of one judge.
FAMILY = ["judge"]


def model(frame: pl.DataFrame) -> pl.DataFrame:
    f16 = frame.filter(pl.col("format") == "f16").drop("format").rename({"score": "f16"})
    q4 = frame.filter(pl.col("format") == "q4_k_m").drop("format").rename({"score": "q4"})
    paired = f16.join(q4, on=["model", "n", "judge", "question_id"], how="inner").sort("question_id")
    rows = []
    for (name, n, judge), group in paired.group_by(["model", "n", "judge"], maintain_order=True):
        test = paired_difference_test(group.get_column("f16").to_numpy(), group.get_column("q4").to_numpy())
        rows.append(
            {
                "model": name,
                "n": n,
                "judge": judge,
                "pairs": test.pairs,
                "nonzero_pairs": test.nonzero_pairs,
                "mean_delta": test.mean_delta,
                "delta_ci_low": test.ci_low,
                "delta_ci_high": test.ci_high,
                "statistic": test.statistic,
                "p_value": test.p_value,
                "significant": test.significant,
                "test": test.test,
                "p_method": test.p_method,
                "sign_flips": test.sign_flips,
            }
        )
    return with_holm(pl.DataFrame(rows, schema=SCHEMA), FAMILY)
