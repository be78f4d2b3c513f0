"""The held-out test set: parsing and validating ``test_set_200.jsonl``, and lexical leakage measures.

Leakage is defined concretely: a test question leaks when it shares a character n-gram (default 8) with
any training question after ``normalize_text`` (NFKC, lower-cased, whitespace removed). Besides the
verdict we report the longest common substring found between any test and any training question, so the
margin to the threshold is visible.

Reference answers are measured too, by a different rule, since they state the same graph facts the
training answers state and share domain terms with them by design. What matters for scoring is verbatim
text: a reference that repeats a whole clause of some training answer rewards a model that parrots its
training data, under chrF and under a judge alike. So ``reference_overlap`` reports, per test question, the
longest run of characters its reference shares with any training answer, with the citations masked on both
sides (a citation 「...」 names a location of the standards; answers are asked to quote it, and whether
they do is what ``citation_grounding`` measures), and flags a reference whose run reaches
``reference_run_chars`` (default 30, a full clause). The unmasked run is kept beside it. Nothing is dropped:
the evaluation keeps every question and the rows say which references overlap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jpslm_assets.qa.generation import normalize_text

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


REFERENCE_OVERLAP_SCHEMA: dict[str, Any] = {
    "question_id": pl.String,
    "human_written": pl.Boolean,
    "reference_chars": pl.Int64,
    "longest_run_chars": pl.Int64,  # citations masked on both sides
    "longest_run_text": pl.String,
    "training_id": pl.String,  # one training pair whose answer contains that run
    "longest_run_chars_unmasked": pl.Int64,
    "shared_8gram_share": pl.Float64,  # of the reference's character 8-grams (citations masked)
    "run_chars_limit": pl.Int64,
    "repeats_training": pl.Boolean,
}

_CITATION = re.compile(r"「[^「」]+」")


def mask_citations(text: str, citation: str | None, mark: str) -> str:
    """``text`` normalized, with each location quoted in ``citation`` (「...」) replaced by ``mark``.

    Longer locations go first, so a section's citation is not half-masked by its chapter's. ``mark`` must
    differ between the two sides compared, so no shared run can cross a mask.
    """
    for location in sorted(set(_CITATION.findall(citation or "")), key=len, reverse=True):
        text = text.replace(location, mark)
    return normalize_text(text)


def _longest_shared_run(text: str, grams: set[str], corpus: str, width: int) -> str:
    """The longest substring of ``text`` that occurs in ``corpus`` (at least ``width`` characters, else "").

    ``grams`` (every ``width``-gram of the corpus) finds the stretches where a long run can be; inside each a
    sliding window asks the corpus itself, which only grows the window past the best run found so far.
    """
    member = [text[k : k + width] in grams for k in range(max(len(text) - width + 1, 0))]
    best = ""
    k = 0
    while k < len(member):
        if not member[k]:
            k += 1
            continue
        end = k
        while end + 1 < len(member) and member[end + 1]:
            end += 1
        stretch = text[k : end + width]
        start, stop = 0, max(width, len(best) + 1)
        while stop <= len(stretch):
            if stretch[start:stop] in corpus:
                best = stretch[start:stop]
                stop += 1
            else:
                start += 1
                stop = start + max(width, len(best) + 1)
        k = end + 1
    return best


def reference_overlap(
    test_set: pl.DataFrame, training: pl.DataFrame, run_chars: int, id_column: str = "qa_id"
) -> pl.DataFrame:
    """Per test question, how much of its reference answer some training answer repeats verbatim.

    Rows follow ``REFERENCE_OVERLAP_SCHEMA``; ``repeats_training`` is true when the citation-masked run reaches
    ``run_chars``. The test set needs ``reference_answer`` and ``citation``; training, ``answer``, ``citation``
    and ``id_column``.
    """
    missing = [c for c in ("question_id", "reference_answer", "citation") if c not in test_set.columns]
    missing += [f"training {c}" for c in (id_column, "answer", "citation") if c not in training.columns]
    if missing:
        raise TestSetError(
            f"the reference-answer overlap needs the columns {', '.join(missing)}; materialize test_set and the "
            "training pool from the current code."
        )
    width = 8
    training_ids = training[id_column].to_list()
    masked = [
        mask_citations(answer or "", citation, "\x01")
        for answer, citation in zip(training["answer"].to_list(), training["citation"].to_list(), strict=True)
    ]
    plain = [normalize_text(answer or "") for answer in training["answer"].to_list()]
    corpus, plain_corpus = "\x02".join(masked), "\x02".join(plain)
    grams = {text[i : i + width] for text in masked for i in range(len(text) - width + 1)}
    plain_grams = {text[i : i + width] for text in plain for i in range(len(text) - width + 1)}
    human = test_set["human_written"].to_list() if "human_written" in test_set.columns else [None] * test_set.height
    rows = []
    for row, written in zip(test_set.iter_rows(named=True), human, strict=True):
        reference = row["reference_answer"] or ""
        text = mask_citations(reference, row["citation"], "\x00")
        run = _longest_shared_run(text, grams, corpus, width)
        unmasked = _longest_shared_run(normalize_text(reference), plain_grams, plain_corpus, width)
        own = [text[i : i + width] for i in range(len(text) - width + 1) if "\x00" not in text[i : i + width]]
        rows.append(
            {
                "question_id": row["question_id"],
                "human_written": written,
                "reference_chars": len(normalize_text(reference)),
                "longest_run_chars": len(run),
                "longest_run_text": run,
                "training_id": next((tid for tid, t in zip(training_ids, masked, strict=True) if run in t), None)
                if run
                else None,
                "longest_run_chars_unmasked": len(unmasked),
                "shared_8gram_share": sum(g in grams for g in own) / len(own) if own else 0.0,
                "run_chars_limit": run_chars,
                "repeats_training": len(run) >= run_chars,
            }
        )
    return pl.DataFrame(rows, schema=REFERENCE_OVERLAP_SCHEMA)
