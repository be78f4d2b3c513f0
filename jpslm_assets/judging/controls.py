"""Validity controls for an LLM judge: does it tell a right answer from a wrong one at all?

Two controls per evaluated question, judged with exactly the prompt, constraint and settings of the real
judgements:

- positive: the question's own reference answer as the candidate answer. A judge that measures anything
  gives it the top level (3).
- negative: the reference answer of another question of the same category (seeded choice; another category
  only where the category has a single question) as the candidate. It is fluent, on-topic domain text that
  does not answer the question; the rubric's level 0 ("wrong or unrelated").

``validity`` summarises them per judge: the share of positive controls scored 3 and of negative ones scored
0, the separation (mean positive score minus mean negative score, paired by question) with a seeded
percentile bootstrap interval, and a verdict from fixed thresholds (``VERDICT_RULES``):

- ``no signal``: the separation's interval reaches 0 or below: the judge does not score the reference above
  an unrelated answer, so its scores of real answers carry no information about correctness;
- ``valid``: the interval's lower bound is at least 1.5 levels and both controls pass at least 70% of the time;
- ``weak``: anything in between (it separates, but not reliably enough to rank close models).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from jpslm_assets.judging.rubric import JudgeItem

POSITIVE, NEGATIVE = "positive", "negative"
EXPECTED = {POSITIVE: 3, NEGATIVE: 0}
VALID_MIN_SEPARATION = 1.5  # lower bound of the separation interval, in rubric levels
VALID_MIN_PASS_RATE = 0.7  # share of each control scored as expected
VERDICT_RULES = (
    f"no signal: separation interval low <= 0; valid: interval low >= {VALID_MIN_SEPARATION} and both pass "
    f"rates >= {VALID_MIN_PASS_RATE:.0%}; weak: otherwise"
)
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class ControlItem:
    control: str  # positive | negative
    source_question_id: str  # whose reference answer is the candidate
    item: JudgeItem

    @property
    def expected(self) -> int:
        return EXPECTED[self.control]


def control_items(items: Sequence[JudgeItem], seed: int = 42) -> list[ControlItem]:
    """Positive and negative controls for each question of ``items`` (answers are ignored).

    The negative candidate for a question is the reference of another question of its category, chosen
    with ``seed``; a category with a single question borrows from the others. Needs two questions at least.
    """
    if len({item.question_id for item in items}) < 2:
        raise ValueError(
            "judge controls need at least two evaluated questions (a negative borrows another's)"
        )
    by_category: dict[str | None, list[JudgeItem]] = defaultdict(list)
    for item in items:
        by_category[item.category].append(item)
    rng = random.Random(seed)
    controls: list[ControlItem] = []
    for item in sorted(items, key=lambda entry: entry.question_id):
        controls.append(ControlItem(POSITIVE, item.question_id, replace(item, answer=item.reference_answer)))
        same = [other for other in by_category[item.category] if other.question_id != item.question_id]
        pool = same or [other for other in items if other.question_id != item.question_id]
        donor = rng.choice(sorted(pool, key=lambda entry: entry.question_id))
        controls.append(
            ControlItem(NEGATIVE, donor.question_id, replace(item, answer=donor.reference_answer))
        )
    return controls


VALIDITY_SCHEMA: dict[str, pl.DataType] = {
    "judge": pl.Utf8(),
    "questions": pl.Int64(),
    "positive_mean": pl.Float64(),
    "negative_mean": pl.Float64(),
    "positive_pass_rate": pl.Float64(),
    "negative_pass_rate": pl.Float64(),
    "unparsed": pl.Int64(),
    "separation": pl.Float64(),
    "separation_ci_low": pl.Float64(),
    "separation_ci_high": pl.Float64(),
    "verdict": pl.Utf8(),
    "verdict_rule": pl.Utf8(),
}


def verdict(ci_low: float | None, positive_pass: float | None, negative_pass: float | None) -> str:
    if ci_low is None or ci_low <= 0:
        return "no signal"
    if (
        ci_low >= VALID_MIN_SEPARATION
        and min(positive_pass or 0.0, negative_pass or 0.0) >= VALID_MIN_PASS_RATE
    ):
        return "valid"
    return "weak"


def validity(controls: pl.DataFrame, seed: int = 42, resamples: int = BOOTSTRAP_RESAMPLES) -> pl.DataFrame:
    """One row per judge in ``VALIDITY_SCHEMA`` from control judgements (judge, question_id, control, score).

    An unparsed control (NULL score) counts as failed in the pass rates and as missing in the means; the
    separation is computed over questions where both controls parsed. With fewer than two such questions
    there is no interval and the verdict is ``no signal``.
    """
    rows = []
    for (judge,), group in controls.sort("judge").group_by("judge", maintain_order=True):
        wide = group.pivot(on="control", index="question_id", values="score", aggregate_function="first")
        for column in (POSITIVE, NEGATIVE):
            if column not in wide.columns:
                wide = wide.with_columns(pl.lit(None, dtype=pl.Int64).alias(column))
        paired = wide.drop_nulls([POSITIVE, NEGATIVE])
        differences = (paired[POSITIVE] - paired[NEGATIVE]).cast(pl.Float64).to_numpy()
        low = high = None
        if len(differences) >= 2:
            rng = np.random.default_rng(seed)
            picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
            means = differences[picks].mean(axis=1)
            low, high = (float(value) for value in np.quantile(means, [0.025, 0.975]))
        positive = group.filter(pl.col("control") == POSITIVE)["score"]
        negative = group.filter(pl.col("control") == NEGATIVE)["score"]
        positive_pass = _pass_rate(positive, EXPECTED[POSITIVE])
        negative_pass = _pass_rate(negative, EXPECTED[NEGATIVE])
        rows.append(
            {
                "judge": judge,
                "questions": wide.height,
                "positive_mean": _mean(positive),
                "negative_mean": _mean(negative),
                "positive_pass_rate": positive_pass,
                "negative_pass_rate": negative_pass,
                "unparsed": int(group["score"].null_count()),
                "separation": float(differences.mean()) if len(differences) else None,
                "separation_ci_low": low,
                "separation_ci_high": high,
                "verdict": verdict(low, positive_pass, negative_pass),
                "verdict_rule": VERDICT_RULES,
            }
        )
    return pl.DataFrame(rows, schema=VALIDITY_SCHEMA)


def _pass_rate(scores: pl.Series, expected: int) -> float | None:
    """Share of controls scored ``expected``; an unparsed one (NULL) counts as failed."""
    if not len(scores):
        return None
    return sum(1 for score in scores.to_list() if score == expected) / len(scores)


def _mean(series: pl.Series) -> float | None:
    value = series.cast(pl.Float64).mean()
    return float(value) if isinstance(value, int | float) else None
