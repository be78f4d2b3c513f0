"""Answering the evaluation questions: which questions are asked, and under which served name."""

from __future__ import annotations

import re

import polars as pl

TEST_SET_COLUMNS = ("question_id", "category", "question", "reference_answer", "human_written")


class AnsweringInputError(ValueError):
    """The test set cannot be used; the message names the column or row and the fix."""


def select_eval_questions(test_set: pl.DataFrame, count: int) -> pl.DataFrame:
    """The first ``count`` human-written questions in question_id order (the paper's 100 of 200)."""
    missing = [column for column in TEST_SET_COLUMNS if column not in test_set.columns]
    if missing:
        raise AnsweringInputError(
            f"qa.test_set lacks column(s) {missing}; re-materialize test_set (docs/architecture.md lists its columns)."
        )
    human = test_set.filter(pl.col("human_written").cast(pl.Boolean)).sort("question_id")
    empty = human.filter(pl.col("question").is_null() | (pl.col("question").str.strip_chars() == ""))
    if empty.height:
        raise AnsweringInputError(
            f"test question {empty['question_id'][0]} has an empty question text; fix it in the test set."
        )
    duplicated = human.filter(pl.col("question_id").is_duplicated())
    if duplicated.height:
        raise AnsweringInputError(
            f"test question id {duplicated['question_id'][0]} appears more than once in qa.test_set."
        )
    if human.height < count:
        raise AnsweringInputError(
            f"the profile asks for eval_questions={count} but qa.test_set has only {human.height} human_written "
            "questions; lower eval_questions (JPSLM_EVAL_QUESTIONS) or extend the test set."
        )
    return human.head(count)


def served_name(model: str, n: int, format_name: str) -> str:
    """The Ollama model name for an export, e.g. ``jpslm-tiny-llama-n120:q4_k_m``."""
    base = re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-")
    return f"jpslm-{base}-n{n}:{format_name}"
