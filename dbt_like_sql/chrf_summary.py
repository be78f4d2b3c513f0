"""chrF of each model, n and format against the reference answers: mean over the questions with a
reference, with its 95% bootstrap interval (BCa, 9,999 resamples, fixed seed, as score_intervals), beside
the judges' averages in score_summary. A model-free check: it needs no judge and cannot be fooled by one.
The *_without_overlap columns leave out the references that repeat a clause of a training answer
(answer_chrf.reference_overlaps), which a model can match by parroting its training data."""

from __future__ import annotations

import polars as pl

from jpslm_assets.common.statistics import bootstrap_mean_ci

SOURCE = """
select model, n, format, question_id, chrf, coalesce(reference_overlaps, false) as reference_overlaps
from marts.answer_chrf
where chrf is not null
"""

SCHEMA = {
    "model": pl.Utf8,
    "n": pl.Int64,
    "format": pl.Utf8,
    "answers": pl.Int64,
    "mean_chrf": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "ci_method": pl.Utf8,
    "answers_without_overlap": pl.Int64,
    "mean_chrf_without_overlap": pl.Float64,
}


def model(frame: pl.DataFrame) -> pl.DataFrame:
    rows = []
    for (name, n, fmt), group in frame.sort("question_id").group_by(
        ["model", "n", "format"], maintain_order=True
    ):
        values = group.get_column("chrf").to_numpy()
        interval = bootstrap_mean_ci(values)
        clean = group.filter(~pl.col("reference_overlaps")).get_column("chrf")
        rows.append(
            (
                name,
                n,
                fmt,
                group.height,
                float(values.mean()),
                interval.low,
                interval.high,
                interval.method,
                clean.len(),
                float(clean.mean()) if clean.len() else None,  # type: ignore[arg-type]
            )
        )
    return pl.DataFrame(rows, schema=SCHEMA, orient="row").sort("model", "n", "format")
