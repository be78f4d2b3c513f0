"""Answering the evaluation questions: which questions are asked, under which served name, and the loop
that asks them (``answer_questions``, what the answers assets and a benchmark both call)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from jpslm_assets.common.generation_types import GenerationError, GenerationRequest, GenerationResult
from jpslm_assets.training.chat_format import chat_messages

if TYPE_CHECKING:  # polars is imported where it is used: the answering loop runs on machines without it
    import polars as pl

TEST_SET_COLUMNS = ("question_id", "category", "question", "reference_answer", "human_written")


class AnsweringInputError(ValueError):
    """The test set cannot be used; the message names the column or row and the fix."""


def select_eval_questions(test_set: pl.DataFrame, count: int, seed: int = 42) -> pl.DataFrame:
    """The evaluation questions: all human-written ones when ``count`` covers them (the paper's 100 of
    200), else a sample stratified by category and drawn with ``seed``, in question_id order.

    The sample gives each category a share of ``count`` proportional to its size (largest remainders,
    ties to the category named first), at least one per category while ``count`` allows, so that 8
    questions over the 8 categories are one per category. The same test set, count and seed always give
    the same questions.
    """
    import numpy as np
    import polars as pl

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
    if count == human.height:
        return human
    human = human.with_columns(pl.col("category").fill_null("(none)").alias("_stratum"))
    sizes = dict(human.group_by("_stratum").len().sort("_stratum").iter_rows())
    quotas = stratified_quotas(sizes, count)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for stratum, quota in quotas.items():
        ids = human.filter(pl.col("_stratum") == stratum)["question_id"].cast(pl.Utf8).to_list()
        picked = rng.permutation(len(ids))[:quota]
        chosen.extend(ids[i] for i in sorted(picked))
    return human.filter(pl.col("question_id").cast(pl.Utf8).is_in(chosen)).drop("_stratum")


def stratified_quotas(sizes: Mapping[str, int], count: int) -> dict[str, int]:
    """How many of ``count`` draws each stratum gets: one each first (while count allows, largest strata
    first), the rest proportional to size by largest remainder; never more than a stratum holds."""
    strata = sorted(sizes, key=lambda name: (-sizes[name], name))
    quotas = dict.fromkeys(sizes, 0)
    for name in strata[: min(count, len(strata))]:
        quotas[name] = 1
    left = count - sum(quotas.values())
    total = sum(sizes.values())
    if left > 0:
        room = {name: sizes[name] - quotas[name] for name in strata}
        shares = {name: left * sizes[name] / total for name in strata}
        for name in strata:
            quotas[name] += min(room[name], int(shares[name]))
        remaining = count - sum(quotas.values())
        by_remainder = sorted(strata, key=lambda name: (-(shares[name] - int(shares[name])), name))
        while remaining > 0:
            progressed = False
            for name in by_remainder:
                if remaining and quotas[name] < sizes[name]:
                    quotas[name] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                break
    return {name: quota for name, quota in sorted(quotas.items()) if quota}


def served_name(model: str, n: int, format_name: str) -> str:
    """The Ollama model name for an export, e.g. ``jpslm-tiny-llama-n120:q4_k_m``."""
    base = re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-")
    return f"jpslm-{base}-n{n}:{format_name}"


class Generator(Protocol):
    """What answering needs of a generation backend."""

    @property
    def max_concurrency(self) -> int: ...

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult: ...


class GenerationSettingsLike(Protocol):
    @property
    def max_new_tokens(self) -> int: ...

    @property
    def temperature(self) -> float: ...

    @property
    def seed(self) -> int: ...


class QuestionFailed(GenerationError):
    """Answering one question failed; ``question_id`` names it and ``answered`` counts the answers done."""

    def __init__(self, question_id: str, answered: int, total: int, cause: GenerationError) -> None:
        super().__init__(f"question {question_id} ({answered}/{total} answered so far): {cause}")
        self.question_id = question_id
        self.answered = answered
        self.total = total
        self.cause = cause


@dataclass(frozen=True)
class AnsweredQuestions:
    """The results in question order, the wall time of the whole loop and the workers it used."""

    results: list[GenerationResult]
    wall_seconds: float
    concurrency: int


def effective_concurrency(requested: int, backend: Generator) -> int:
    """Workers for answering: the profile's ``generation.concurrency`` capped by the backend's slots."""
    return max(1, min(int(requested), int(backend.max_concurrency)))


def answer_request(
    question: str, settings: GenerationSettingsLike, stops: Sequence[str]
) -> GenerationRequest:
    """The deterministic request for one evaluation question."""
    return GenerationRequest(
        messages=chat_messages(question),
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        seed=settings.seed,
        stop=tuple(stops),
    )


def answer_questions(
    backend: Generator,
    model_ref: str,
    questions: Sequence[Mapping[str, Any]],
    settings: GenerationSettingsLike,
    stops: Sequence[str] = (),
    concurrency: int = 1,
    on_answer: Callable[[Mapping[str, Any], GenerationResult], object] | None = None,
) -> AnsweredQuestions:
    """Answer each question (a mapping with ``question_id`` and ``question``) with ``backend``.

    ``min(concurrency, backend.max_concurrency)`` requests run at once on a thread pool (one: in this thread,
    in order). ``on_answer(question, result)`` is called in this thread as each answer arrives; the results
    come back in question order. The first failure raises ``QuestionFailed`` naming the question; questions
    not yet started are cancelled and those already running are awaited before it is raised.
    """
    workers = effective_concurrency(concurrency, backend)
    total = len(questions)
    results: list[GenerationResult | None] = [None] * total
    started = time.perf_counter()

    def ask(index: int) -> GenerationResult:
        return backend.generate(model_ref, answer_request(str(questions[index]["question"]), settings, stops))

    def done(index: int, result: GenerationResult) -> None:
        results[index] = result
        if on_answer is not None:
            on_answer(questions[index], result)

    answered = 0
    if workers == 1:
        for index in range(total):
            try:
                result = ask(index)
            except GenerationError as exc:
                raise QuestionFailed(str(questions[index]["question_id"]), answered, total, exc) from exc
            done(index, result)
            answered += 1
    else:
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="answering")
        pending: dict[Future[GenerationResult], int] = {}
        try:
            pending = {executor.submit(ask, index): index for index in range(total)}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=pending.__getitem__):
                    index = pending.pop(future)
                    try:
                        result = future.result()
                    except GenerationError as exc:
                        raise QuestionFailed(
                            str(questions[index]["question_id"]), answered, total, exc
                        ) from exc
                    done(index, result)
                    answered += 1
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    return AnsweredQuestions(
        results=[result for result in results if result is not None],
        wall_seconds=time.perf_counter() - started,
        concurrency=workers,
    )
