"""Judge validity controls: which items are built, and the verdict on synthetic control scores."""

from __future__ import annotations

import polars as pl
import pytest

from jpslm_assets.judging import controls as controls_lib
from jpslm_assets.judging.rubric import JudgeItem


def _item(question_id: str, category: str) -> JudgeItem:
    return JudgeItem(question_id, category, f"question {question_id}", f"reference of {question_id}", None, "an answer")


ITEMS = [_item("Q1", "Survey"), _item("Q2", "Survey"), _item("Q3", "Survey"), _item("Q4", "Design"), _item("Q5", "Hazard")]


def test_each_question_gets_its_reference_and_another_questions_reference() -> None:
    controls = controls_lib.control_items(ITEMS, seed=3)
    assert [(c.item.question_id, c.control) for c in controls] == [
        (q, kind) for q in ("Q1", "Q2", "Q3", "Q4", "Q5") for kind in ("positive", "negative")
    ]
    for control in controls:
        if control.control == "positive":
            assert control.item.answer == control.item.reference_answer and control.expected == 3
            assert control.source_question_id == control.item.question_id
        else:
            assert control.expected == 0 and control.source_question_id != control.item.question_id
            assert control.item.answer == f"reference of {control.source_question_id}"
    negatives = {c.item.question_id: c.source_question_id for c in controls if c.control == "negative"}
    assert {negatives[q] for q in ("Q1", "Q2", "Q3")} <= {"Q1", "Q2", "Q3"}, "same category where it has two"
    assert negatives["Q4"] in {"Q1", "Q2", "Q3", "Q5"}, "a single-question category borrows from the others"
    assert controls_lib.control_items(ITEMS, seed=3) == controls, "seeded"
    with pytest.raises(ValueError, match="at least two"):
        controls_lib.control_items(ITEMS[:1])


def _scores(positive: list[int | None], negative: list[int | None], judge: str = "j") -> pl.DataFrame:
    rows = [
        {"judge": judge, "question_id": f"Q{i}", "control": kind, "score": score}
        for kind, scores in (("positive", positive), ("negative", negative))
        for i, score in enumerate(scores)
    ]
    return pl.DataFrame(rows, schema={"judge": pl.Utf8, "question_id": pl.Utf8, "control": pl.Utf8, "score": pl.Int64})


def test_a_judge_that_separates_is_valid() -> None:
    (row,) = controls_lib.validity(_scores([3] * 9 + [2], [0] * 8 + [1, 1])).iter_rows(named=True)
    assert row["verdict"] == "valid" and row["questions"] == 10
    assert row["positive_pass_rate"] == 0.9 and row["negative_pass_rate"] == 0.8
    assert row["separation"] == pytest.approx(2.7) and 2.3 <= row["separation_ci_low"] <= 2.7 <= row["separation_ci_high"]


def test_a_judge_that_scores_noise_like_the_reference_has_no_signal() -> None:
    # The demo's situation: "Excellent" for an unrelated answer as often as for the reference.
    (row,) = controls_lib.validity(_scores([3, 2, 3, 1, 3, 2, 3, 3], [3, 3, 2, 3, 1, 3, 3, 2])).iter_rows(named=True)
    assert row["verdict"] == "no signal" and row["separation_ci_low"] <= 0 <= row["separation_ci_high"]


def test_a_judge_that_separates_unreliably_is_weak() -> None:
    (row,) = controls_lib.validity(_scores([3, 2, 2, 3, 2, 2, 3, 2], [1, 0, 1, 1, 0, 1, 1, 0])).iter_rows(named=True)
    assert row["verdict"] == "weak" and row["separation_ci_low"] > 0


def test_unparsed_controls_fail_the_pass_rate_and_too_few_pairs_mean_no_signal() -> None:
    frame = _scores([3, None, 3], [0, 0, None])
    (row,) = controls_lib.validity(frame).iter_rows(named=True)
    assert row["unparsed"] == 2 and row["positive_pass_rate"] == pytest.approx(2 / 3)
    assert row["separation"] == 3.0 and row["separation_ci_low"] is None and row["verdict"] == "no signal"
    two = controls_lib.validity(pl.concat([_scores([3, 3], [0, 0], "a"), _scores([1, 1], [1, 1], "b")]))
    assert two["judge"].to_list() == ["a", "b"] and two["verdict"].to_list() == ["valid", "no signal"]
