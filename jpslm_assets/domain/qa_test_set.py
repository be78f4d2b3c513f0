"""The held-out test set: parsing and validating ``test_set_200.jsonl``, and lexical leakage measures.

Leakage is defined concretely: a test question leaks when it shares a character n-gram (default 8) with
any training question after ``normalize_text`` (NFKC, lower-cased, whitespace removed). Besides the
verdict we report the longest common substring found between any test and any training question, so the
margin to the threshold is visible.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jpslm_assets.domain.qa_generation import normalize_text

TEST_SET_SCHEMA: dict[str, Any] = {
    "question_id": pl.String,
    "category": pl.String,
    "question": pl.String,
    "reference_answer": pl.String,
    "node_ids": pl.List(pl.String),
    "citation": pl.String,
    "human_written": pl.Boolean,
    "line": pl.Int64,
}


class TestSetError(ValueError):
    """A line of the test set file is wrong; the message names the file, the line and the fix."""

    __test__ = False  # not a pytest test class, despite the name


class TestQuestion(BaseModel):
    """One line of the test set file."""

    __test__ = False  # not a pytest test class, despite the name
    model_config = ConfigDict(extra="forbid", frozen=True)

    question_id: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    category: str
    question: str = Field(min_length=5)
    reference_answer: str = Field(min_length=10)
    node_ids: list[str] = Field(min_length=1)
    citation: str = Field(min_length=1)
    human_written: bool


def parse_test_set(text: str, categories: Sequence[str], source: str = "test_set_200.jsonl") -> pl.DataFrame:
    """Parse and validate the JSONL test set; every error names ``source``, the line and the question id."""
    known = set(categories)
    rows: list[dict[str, Any]] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TestSetError(f"{source} line {number}: not valid JSON ({exc.msg}); fix the line.") from exc
        if not isinstance(record, dict):
            raise TestSetError(
                f"{source} line {number}: expected a JSON object, got {type(record).__name__}."
            )
        label = record.get("question_id", "?")
        if not record.get("category"):
            raise TestSetError(
                f"{source} line {number} (question {label}): missing 'category'; add one of "
                f"{', '.join(categories)}."
            )
        try:
            question = TestQuestion.model_validate(record)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'record'}: {error['msg']}"
                for error in exc.errors()
            )
            raise TestSetError(f"{source} line {number} (question {label}): {problems}.") from exc
        if question.category not in known:
            raise TestSetError(
                f"{source} line {number} (question {label}): category {question.category!r} is not one of "
                f"{', '.join(categories)}."
            )
        if question.question_id in first_line_of:
            raise TestSetError(
                f"{source} line {number}: duplicate question_id {question.question_id} (first used on line "
                f"{first_line_of[question.question_id]}); give every question its own id."
            )
        first_line_of[question.question_id] = number
        rows.append({**question.model_dump(), "line": number})
    if not rows:
        raise TestSetError(f"{source} holds no questions; it needs one JSON object per line.")
    return pl.DataFrame(rows, schema=TEST_SET_SCHEMA)


def check_against_graph(
    test_set: pl.DataFrame, node_ids: Iterable[str], source: str = "test_set_200.jsonl"
) -> None:
    """Every node id a test question rests on must exist in the graph."""
    known = set(node_ids)
    for row in test_set.iter_rows(named=True):
        missing = [node for node in row["node_ids"] if node not in known]
        if missing:
            raise TestSetError(
                f"{source} line {row['line']} (question {row['question_id']}): node id(s) "
                f"{', '.join(missing)} are not in kg.nodes; correct the ids or add the nodes to the graph."
            )


def _ngrams(text: str, width: int) -> set[str]:
    return {text[i : i + width] for i in range(len(text) - width + 1)}


@dataclass(frozen=True)
class LeakageReport:
    """The leakage verdict for one set of training questions."""

    ngram_chars: int
    test_questions: int
    training_questions: int
    leaking_questions: list[str]  # test question ids sharing an n-gram with training questions
    longest_common_chars: int
    longest_common_text: str
    longest_test_id: str | None
    longest_training_id: str | None

    @property
    def passed(self) -> bool:
        return not self.leaking_questions


def lexical_leakage(
    test_set: pl.DataFrame, training: pl.DataFrame, ngram_chars: int, id_column: str = "qa_id"
) -> LeakageReport:
    """Shared character n-grams between test and training questions, and the longest common substring."""
    test_ids = test_set["question_id"].to_list()
    test_texts = [normalize_text(q) for q in test_set["question"].to_list()]
    training_ids = training[id_column].to_list()
    training_texts = [normalize_text(q) for q in training["question"].to_list()]

    grams_by_width: dict[int, set[str]] = {}

    def grams(width: int) -> set[str]:
        if width not in grams_by_width:
            collected: set[str] = set()
            for text in training_texts:
                collected |= _ngrams(text, width)
            grams_by_width[width] = collected
        return grams_by_width[width]

    leaking = [
        qid
        for qid, text in zip(test_ids, test_texts, strict=True)
        if _ngrams(text, ngram_chars) & grams(ngram_chars)
    ]

    # Longest common substring over all pairs: binary search on the width, since a shared substring of
    # width w implies one of every smaller width.
    low, high = 0, max((len(t) for t in test_texts), default=0)
    while low < high:
        mid = (low + high + 1) // 2
        if any(_ngrams(text, mid) & grams(mid) for text in test_texts):
            low = mid
        else:
            high = mid - 1
    longest_text, test_id, training_id = "", None, None
    if low > 0:
        training_grams = grams(low)
        for qid, text in zip(test_ids, test_texts, strict=True):
            shared = sorted(_ngrams(text, low) & training_grams)
            if shared:
                longest_text, test_id = shared[0], qid
                break
        training_id = next(
            (tid for tid, text in zip(training_ids, training_texts, strict=True) if longest_text in text),
            None,
        )
    return LeakageReport(
        ngram_chars=ngram_chars,
        test_questions=len(test_texts),
        training_questions=len(training_texts),
        leaking_questions=leaking,
        longest_common_chars=low,
        longest_common_text=longest_text,
        longest_test_id=test_id,
        longest_training_id=training_id,
    )
