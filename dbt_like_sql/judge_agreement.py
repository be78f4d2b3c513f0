"""Agreement between every two judges that scored the same answers (same model, n, format, question):
exact agreement and Cohen's kappa, unweighted and weighted (linear, quadratic) over the rubric levels.
One row per pair of judges, pooled over all answers they share."""

from __future__ import annotations

import polars as pl

from jpslm_assets.common.statistics import agreement
from jpslm_assets.judging.rubric import load_rubric

SOURCE = """
select a.judge as judge_a, b.judge as judge_b, a.score as score_a, b.score as score_b
from marts.judged_answers as a
inner join marts.judged_answers as b
    on a.model = b.model and a.n = b.n and a.format = b.format and a.question_id = b.question_id
    and a.judge < b.judge
where a.score is not null and b.score is not null
"""

SCHEMA = {
    "judge_a": pl.Utf8,
    "judge_b": pl.Utf8,
    "pairs": pl.Int64,
    "exact_agreement": pl.Float64,
    "cohen_kappa": pl.Float64,
    "weighted_kappa_linear": pl.Float64,
    "weighted_kappa_quadratic": pl.Float64,
}


def model(frame: pl.DataFrame) -> pl.DataFrame:
    levels = load_rubric().scores
    rows = []
    for (judge_a, judge_b), group in frame.group_by(["judge_a", "judge_b"], maintain_order=True):
        result = agreement(
            group.get_column("score_a").to_numpy(), group.get_column("score_b").to_numpy(), levels
        )
        rows.append(
            {
                "judge_a": judge_a,
                "judge_b": judge_b,
                "pairs": result.pairs,
                "exact_agreement": result.exact_agreement,
                "cohen_kappa": result.kappa,
                "weighted_kappa_linear": result.kappa_linear,
                "weighted_kappa_quadratic": result.kappa_quadratic,
            }
        )
    return pl.DataFrame(rows, schema=SCHEMA).sort(["judge_a", "judge_b"])
