"""How far each judge agrees with the model-free metric: Spearman's rank correlation between the judge's
0-3 score and the answer's chrF against its reference, over every answer both cover (scipy, ties
averaged; NULL with fewer than 3 pairs or a constant side). A judge that measures answer quality should
rank answers close to their references higher; a rho near 0 with a `no signal` verdict in judge_validity
says the same thing twice, a rho near 0 with a `valid` verdict says the judge sees something chrF does not."""

from __future__ import annotations

import math

import polars as pl

from jpslm_assets.common.statistics import spearman

SOURCE = """
select j.judge, j.model, j.n, j.format, j.question_id, j.score, c.chrf
from marts.judged_answers as j
join marts.answer_chrf as c
    on c.model = j.model and c.n = j.n and c.format = j.format and c.question_id = j.question_id
where j.score is not null and c.chrf is not null
"""

SCHEMA = {
    "judge": pl.Utf8,
    "pairs": pl.Int64,
    "spearman_rho": pl.Float64,
    "p_value": pl.Float64,
    "mean_score": pl.Float64,
    "mean_chrf": pl.Float64,
}


def model(frame: pl.DataFrame) -> pl.DataFrame:
    rows = []
    for (judge,), group in frame.sort("model", "n", "format", "question_id").group_by(
        ["judge"], maintain_order=True
    ):
        result = spearman(group.get_column("score").to_numpy(), group.get_column("chrf").to_numpy())
        rows.append(
            (
                judge,
                result.pairs,
                None if math.isnan(result.rho) else result.rho,
                None if math.isnan(result.p_value) else result.p_value,
                float(group.get_column("score").mean()),  # type: ignore[arg-type]
                float(group.get_column("chrf").mean()),  # type: ignore[arg-type]
            )
        )
    return pl.DataFrame(rows, schema=SCHEMA, orient="row").sort("judge")
