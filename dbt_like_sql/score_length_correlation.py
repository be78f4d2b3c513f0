"""Does a judge reward (or punish) long answers? Spearman rank correlation between score and answer
length in characters per judge, pooled over every model and format it scored (scipy). NaN when either
side is constant."""

from __future__ import annotations

import polars as pl

from jpslm_assets.common.statistics import spearman

SOURCE = """
select judge, score, chars
from marts.judged_answers
where score is not null and chars is not null
"""

SCHEMA = {"judge": pl.Utf8, "pairs": pl.Int64, "spearman_rho": pl.Float64, "p_value": pl.Float64}


def model(frame: pl.DataFrame) -> pl.DataFrame:
    rows = []
    for (judge,), group in frame.group_by(["judge"], maintain_order=True):
        result = spearman(group.get_column("score").to_numpy(), group.get_column("chars").to_numpy())
        rows.append(
            {"judge": judge, "pairs": result.pairs, "spearman_rho": result.rho, "p_value": result.p_value}
        )
    return pl.DataFrame(rows, schema=SCHEMA).sort("judge")
