"""Character-level chrF of every stage-2 answer against its question's reference answer: a model-free
reference metric beside the judges (sacrebleu's chrF, character n-grams up to 6, beta 2, no word n-grams,
whitespace ignored, which suits Japanese, written without spaces). 0-100: 100 when the answer repeats the
reference, near 0 when they share no characters. NULL where the test set holds no reference answer.
reference_overlaps says whether the reference repeats a clause of a training answer (qa.reference_overlap,
against the rebalanced pool; NULL where that check has not run): a model that parrots its training data
scores well against such a reference without answering."""

from __future__ import annotations

import polars as pl

SOURCE = """
select
    a.model,
    cast(a.n as bigint) as n,
    a.format,
    cast(a.question_id as varchar) as question_id,
    coalesce(t.category, a.category, '(none)') as category,
    coalesce(a.answer, '') as answer,
    t.reference_answer,
    cast(o.longest_run_chars as bigint) as reference_overlap_chars,
    o.repeats_training as reference_overlaps
from eval.answers as a
left join qa.test_set as t on cast(t.question_id as varchar) = cast(a.question_id as varchar)
left join qa.reference_overlap as o
    on cast(o.question_id as varchar) = cast(a.question_id as varchar) and o.against = 'rebalanced_pool'
where coalesce(a.stage, 2) = 2
"""

SCHEMA = {
    "model": pl.Utf8,
    "n": pl.Int64,
    "format": pl.Utf8,
    "question_id": pl.Utf8,
    "category": pl.Utf8,
    "answer_chars": pl.Int64,
    "reference_chars": pl.Int64,
    "chrf": pl.Float64,
    "reference_overlap_chars": pl.Int64,
    "reference_overlaps": pl.Boolean,
}


def model(frame: pl.DataFrame) -> pl.DataFrame:
    from sacrebleu.metrics import CHRF

    metric = CHRF()
    scores = [
        None if reference is None else float(metric.sentence_score(answer, [reference]).score)
        for answer, reference in frame.select("answer", "reference_answer").iter_rows()
    ]
    return (
        frame.with_columns(
            pl.col("answer").str.len_chars().cast(pl.Int64).alias("answer_chars"),
            pl.col("reference_answer").str.len_chars().cast(pl.Int64).alias("reference_chars"),
            pl.Series("chrf", scores, dtype=pl.Float64),
        )
        .select(list(SCHEMA))
        .cast(SCHEMA)  # type: ignore[arg-type]
        .sort("model", "n", "format", "question_id")
    )
