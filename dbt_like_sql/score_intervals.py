"""95% bootstrap confidence interval of the mean score per model, n, format and judge (scipy's BCa
bootstrap, 9,999 resamples, fixed seed so a rebuild gives the same numbers). Unparsed judgements are
left out, as they are from the average."""

from __future__ import annotations

import polars as pl

from jpslm_assets.common.statistics import bootstrap_mean_ci

SOURCE = """
select model, n, format, judge, question_id, score
from marts.judged_answers
where score is not null
"""

SCHEMA = {
    "model": pl.Utf8,
    "n": pl.Int64,
    "format": pl.Utf8,
    "judge": pl.Utf8,
    "scored": pl.Int64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "ci_method": pl.Utf8,
}


def model(frame: pl.DataFrame) -> pl.DataFrame:
    rows = []
    for (name, n, fmt, judge), group in frame.sort("question_id").group_by(
        ["model", "n", "format", "judge"], maintain_order=True
    ):
        interval = bootstrap_mean_ci(group.get_column("score").to_numpy())
        rows.append(
            {
                "model": name,
                "n": n,
                "format": fmt,
                "judge": judge,
                "scored": group.height,
                "ci_low": interval.low,
                "ci_high": interval.high,
                "ci_method": interval.method,
            }
        )
    return pl.DataFrame(rows, schema=SCHEMA)
