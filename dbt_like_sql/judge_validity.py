"""Whether each judge measures anything: its validity controls (eval.judge_controls, asset judge_controls)
summarised per judge. positive: the question's own reference judged as the answer (expected 3); negative:
another question's reference (expected 0). Pass rates, mean scores, the separation (mean positive minus
mean negative, paired by question) with a seeded 95% percentile bootstrap interval (2,000 resamples), and
the verdict: `no signal` when the interval reaches 0, `valid` when its lower bound is at least 1.5 and both
pass rates at least 70%, `weak` otherwise (verdict_rule states it on every row)."""

from __future__ import annotations

import polars as pl

from jpslm_assets.judging.controls import validity

SOURCE = """
select judge, cast(question_id as varchar) as question_id, control, cast(score as bigint) as score
from eval.judge_controls
"""


def model(frame: pl.DataFrame) -> pl.DataFrame:
    return validity(frame)
