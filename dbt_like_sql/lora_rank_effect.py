"""The paper's Lesson 4: the reference model's stage-1 adapter (r=16 in the paper) against its stage-2
adapter (r=32, dropout 0.05), both trained at n*, judged on the same questions per format and judge.
delta = stage-2 average - stage-1 average over the questions both adapters answered and the judge scored;
a Wilcoxon signed-rank test of the per-question differences (p_value, significant at 0.05) and a bootstrap
95% interval of their mean, as in quantization_tests (with Holm's adjustment across a judge's rows and the
p-value's method). The LoRA shapes come from serve.merged_models."""

from __future__ import annotations

import polars as pl

from jpslm_assets.common.statistics import paired_difference_test, with_holm

SOURCE = """
select
    s.model,
    cast(s.n as bigint) as n,
    s.format,
    s.judge,
    cast(s.question_id as varchar) as question_id,
    cast(s.stage as bigint) as stage,
    cast(s.score as integer) as score,
    cast(m.lora_r as bigint) as lora_r,
    cast(m.lora_dropout as double) as lora_dropout
from eval.judge_scores as s
left join serve.merged_models as m on m.adapter = s.adapter
where s.score is not null and s.stage in (1, 2)
"""

SCHEMA = {
    "model": pl.Utf8,
    "n": pl.Int64,
    "format": pl.Utf8,
    "judge": pl.Utf8,
    "stage1_r": pl.Int64,
    "stage2_r": pl.Int64,
    "stage1_dropout": pl.Float64,
    "stage2_dropout": pl.Float64,
    "stage1_avg": pl.Float64,
    "stage2_avg": pl.Float64,
    "delta": pl.Float64,
    "pairs": pl.Int64,
    "nonzero_pairs": pl.Int64,
    "delta_ci_low": pl.Float64,
    "delta_ci_high": pl.Float64,
    "p_value": pl.Float64,
    "significant": pl.Boolean,
    "test": pl.Utf8,
    "p_method": pl.Utf8,
    "sign_flips": pl.Int64,
}

KEYS = ["model", "n", "format", "judge", "question_id"]

# The tests read together, and so adjusted together (Holm): every row of one judge.
FAMILY = ["judge"]


def model(frame: pl.DataFrame) -> pl.DataFrame:
    def side(stage: int) -> pl.DataFrame:
        return frame.filter(pl.col("stage") == stage).select(
            *KEYS,
            pl.col("score").alias(f"stage{stage}"),
            pl.col("lora_r").alias(f"stage{stage}_r"),
            pl.col("lora_dropout").alias(f"stage{stage}_dropout"),
        )

    paired = side(1).join(side(2), on=KEYS, how="inner").sort("question_id")
    rows = []
    for (name, n, fmt, judge), group in paired.group_by(["model", "n", "format", "judge"], maintain_order=True):
        first, second = group.get_column("stage1").to_numpy(), group.get_column("stage2").to_numpy()
        test = paired_difference_test(first, second)
        rows.append(
            {
                "model": name,
                "n": n,
                "format": fmt,
                "judge": judge,
                "stage1_r": group["stage1_r"][0],
                "stage2_r": group["stage2_r"][0],
                "stage1_dropout": group["stage1_dropout"][0],
                "stage2_dropout": group["stage2_dropout"][0],
                "stage1_avg": float(first.mean()),
                "stage2_avg": float(second.mean()),
                "delta": float(second.mean() - first.mean()),
                "pairs": test.pairs,
                "nonzero_pairs": test.nonzero_pairs,
                "delta_ci_low": test.ci_low,
                "delta_ci_high": test.ci_high,
                "p_value": test.p_value,
                "significant": test.significant,
                "test": test.test,
                "p_method": test.p_method,
                "sign_flips": test.sign_flips,
            }
        )
    return with_holm(pl.DataFrame(rows, schema=SCHEMA).sort("model", "n", "format", "judge"), FAMILY)
