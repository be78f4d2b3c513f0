"""LLM-as-judge, scoring: reply parsing, bounded retries and the score table (the rubric, the prompt and the
constrained output are ``rubric``).

Nothing here knows Dagster or a concrete backend: ``judge_answers`` takes a ``generate`` callable
(``GenerationRequest -> GenerationResult``) so tests drive it with fakes and the asset passes a real backend.

Scores are reference-guided: the judge sees the question, the reference answer, where the standards treat
the topic (volume / chapter / section from the knowledge graph) and the candidate answer, truncated to a
setting's length so prompts stay short. The reply is constrained to ``{"score": 0-3, "reason": "..."}``:
a GBNF grammar for llama.cpp, a JSON schema for Ollama's ``format``. A reply that still does not parse is
retried a bounded number of times and then stored with ``parse_ok = false`` and a NULL score, never 0.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from jpslm_assets.common.generation_types import (
    BackendUnavailable,
    GenerationError,
    GenerationRequest,
)
from jpslm_assets.judging.rubric import (
    EMPTY_ANSWER_REASON,
    GenerateFn,
    JudgeBackendError,
    JudgeInputError,
    JudgeItem,
    JudgeSettings,
    Rubric,
    build_judge_messages,
    judge_grammar,
    judge_json_schema,
)

# --------------------------------------------------------------------------------------------- rubric


# ------------------------------------------------------------------------------------ judge settings


# ---------------------------------------------------------------------------- output constraints


# ------------------------------------------------------------------------------------------ prompt


# ------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class ParsedReply:
    score: int | None
    reason: str | None
    parse_ok: bool
    error: str | None


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def parse_judge_reply(text: str | None, rubric: Rubric) -> ParsedReply:
    """Read ``{"score": k, "reason": "..."}`` from a reply; anything else is a failure with its cause.

    Tolerates a code fence or prose around one JSON object (an unconstrained backend adds them), and an
    integral score written as ``3.0`` or ``"3"``. Rejects a score outside the rubric's levels (e.g. 5) or
    a fractional one: guessing would put a number on a reply the judge did not give.
    """
    if text is None or not text.strip():
        return ParsedReply(None, None, False, "empty reply")
    body = _FENCE.sub("", text.strip())
    data: Any
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        start = body.find("{")
        if start < 0:
            return ParsedReply(None, None, False, "reply is not JSON (no '{' found)")
        try:
            data, _ = json.JSONDecoder().raw_decode(body[start:])
        except json.JSONDecodeError as exc:
            return ParsedReply(None, None, False, f"reply is not valid JSON: {exc.msg} at char {exc.pos}")
    if not isinstance(data, dict):
        return ParsedReply(None, None, False, f"reply is JSON {type(data).__name__}, not an object")
    if "score" not in data:
        return ParsedReply(None, None, False, f"reply has no 'score' key (keys: {sorted(data)})")
    reason = data.get("reason")
    reason = str(reason).strip() if reason is not None else None
    score = _integral(data["score"])
    if score is None:
        return ParsedReply(None, reason, False, f"score {data['score']!r} is not an integer")
    if score not in rubric.scores:
        return ParsedReply(
            None,
            reason,
            False,
            f"score {score} is outside the rubric's levels {rubric.scores[0]}-{rubric.max_score}",
        )
    return ParsedReply(score, reason, True, None)


def _integral(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    # ASCII digits only: `\d` and int() also take full-width "３" and Arabic-Indic "٣", which no rubric level is.
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value, flags=re.ASCII):
        return int(value)
    return None


# ----------------------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Verdict:
    question_id: str
    score: int | None
    reason: str | None
    parse_ok: bool
    raw_output: str | None
    attempts: int
    parse_error: str | None
    seconds: float


def judge_one(
    item: JudgeItem,
    generate: GenerateFn,
    rubric: Rubric,
    settings: JudgeSettings,
    deadline_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Verdict:
    """Judge one answer with up to ``1 + settings.retries`` attempts, within ``deadline_s`` in all.

    An empty answer is 0 by the rubric itself, so the model is not asked. A retry samples at the rubric's
    retry temperature with a new seed: at temperature 0 the same prompt would return the same reply. If no
    attempt reached the backend at all, the backend is broken and ``JudgeBackendError`` stops the asset; so
    does the first attempt that finds the backend unavailable (down, or silent past its first-byte timeout),
    without retrying. Each request gets what is left of the deadline; once it has passed, no attempt
    starts and the verdict is stored unparseable, naming the deadline.
    """
    started = clock()
    if not item.answer or not item.answer.strip():
        return Verdict(item.question_id, 0, EMPTY_ANSWER_REASON, True, None, 0, None, 0.0)
    messages = build_judge_messages(item, rubric, settings.language, settings.max_answer_chars)
    user = messages[-1]["content"]
    shared_chars = user.rfind(f"\n{rubric.instructions[settings.language].answer}: ") + 1
    grammar = (
        judge_grammar(rubric, settings.reason_max_chars, settings.reason_ascii)
        if settings.constraint == "grammar"
        else None
    )
    schema = (
        judge_json_schema(rubric, settings.reason_max_chars) if settings.constraint == "json_schema" else None
    )
    last_text: str | None = None
    last_error: str | None = None
    backend_errors: list[str] = []
    attempts = 0
    for attempt in range(settings.retries + 1):
        remaining = None if deadline_s is None else deadline_s - (clock() - started)
        if remaining is not None and remaining <= 0:
            last_error = f"the per-question deadline of {deadline_s:g} s passed ({last_error})"
            break
        attempts = attempt + 1
        request = GenerationRequest(
            messages=messages,
            max_tokens=settings.max_tokens,
            temperature=settings.temperature if attempt == 0 else settings.retry_temperature,
            seed=settings.seed + attempt,
            grammar=grammar,
            json_schema=schema,
            shared_prefix_messages=1,  # the system message (role and rubric) is the same for every item
            # and the user message up to the candidate answer is the same for every answer to this question
            shared_last_message_chars=shared_chars,
            deadline_s=remaining,
        )
        try:
            result = generate(request)
        except BackendUnavailable as exc:
            raise JudgeBackendError(
                f"judge {settings.name} could not reach its backend on question {item.question_id} "
                f"(attempt {attempts}): {exc}. No scores were written."
            ) from exc
        except GenerationError as exc:
            backend_errors.append(str(exc))
            last_error = f"generation failed: {exc}"
            continue
        last_text = result.text
        parsed = parse_judge_reply(result.text, rubric)
        if parsed.parse_ok:
            return Verdict(
                item.question_id,
                parsed.score,
                parsed.reason,
                True,
                result.text,
                attempts,
                None,
                clock() - started,
            )
        truncated = " (reply cut at max_tokens)" if result.finish_reason == "length" else ""
        last_error = f"{parsed.error}{truncated}"
    if attempts and len(backend_errors) == attempts:
        raise JudgeBackendError(
            f"judge {settings.name} failed on question {item.question_id} in all {attempts} attempts: "
            f"{backend_errors[-1]}. Check that the judge backend is running and the model "
            f"{settings.model!r} is available; no scores were written."
        )
    return Verdict(
        item.question_id,
        None,
        None,
        False,
        last_text,
        attempts,
        f"unparseable after {attempts} attempt(s): {last_error}",
        clock() - started,
    )


# ----------------------------------------------------------------------- inputs -> judge items


def as_id_list(value: Any) -> list[str]:
    """Node ids stored as a list, a JSON list string, or a comma / whitespace separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return [str(v) for v in json.loads(text)]
            except json.JSONDecodeError:
                pass
        return [part for part in re.split(r"[,\s;|]+", text.strip("[]")) if part]
    if isinstance(value, pl.Series):
        return [str(v) for v in value.to_list()]
    if isinstance(value, Sequence):
        return [str(v) for v in value]
    return [str(value)]


def node_location(node: Mapping[str, Any]) -> str | None:
    """A readable location of one KG node: ``volume > chapter > section`` (or its ``location`` field)."""
    parts = [str(node[key]).strip() for key in ("volume", "chapter", "section") if node.get(key)]
    parts = [part for part in parts if part and part.lower() not in {"none", "null", "nan"}]
    if parts:
        return " > ".join(parts)
    location = node.get("location")
    return str(location).strip() if location else None


def question_locations(test_set: pl.DataFrame, nodes: pl.DataFrame | None) -> dict[str, str | None]:
    """Location text per question: its KG nodes' locations, else the test set's own citation."""
    by_node: dict[str, Mapping[str, Any]] = {}
    if nodes is not None and nodes.height and "node_id" in nodes.columns:
        by_node = {str(row["node_id"]): row for row in nodes.iter_rows(named=True)}
    result: dict[str, str | None] = {}
    for row in test_set.iter_rows(named=True):
        places: list[str] = []
        for node_id in as_id_list(row.get("node_ids")):
            node = by_node.get(node_id)
            place = node_location(node) if node is not None else None
            if place and place not in places:
                places.append(place)
        citation = row.get("citation")
        if not places and citation:
            places.append(str(citation).strip())
        result[str(row["question_id"])] = "; ".join(places) if places else None
    return result


def require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise JudgeInputError(
            f"{what} lacks column(s) {missing} (has {frame.columns}); re-materialize it with the current code."
        )


def judge_items(
    answers: pl.DataFrame, test_set: pl.DataFrame, nodes: pl.DataFrame | None, source: str
) -> list[JudgeItem]:
    """One item per answer, joined with its test-set question; fails on ids the test set does not have."""
    require_columns(answers, ["question_id", "answer"], source)
    require_columns(test_set, ["question_id", "question", "reference_answer", "category"], "qa.test_set")
    duplicates = (
        answers.group_by("question_id").len().filter(pl.col("len") > 1).get_column("question_id").to_list()
    )
    if duplicates:
        raise JudgeInputError(
            f"{source} answers question(s) {sorted(map(str, duplicates))[:5]} more than once; each partition "
            "must hold one answer per question. Re-materialize the answers partition."
        )
    questions = {str(row["question_id"]): row for row in test_set.iter_rows(named=True)}
    unknown = sorted({str(q) for q in answers.get_column("question_id").to_list()} - set(questions))
    if unknown:
        raise JudgeInputError(
            f"{source} has answers to question id(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} that are "
            f"not in qa.test_set ({len(questions)} questions). The test set changed after answering: "
            "re-materialize the answers for this partition, or restore the test set they were made from."
        )
    locations = question_locations(test_set, nodes)
    items = []
    for row in answers.iter_rows(named=True):
        question = questions[str(row["question_id"])]
        items.append(
            JudgeItem(
                question_id=str(row["question_id"]),
                # The test set is the authority on categories; an answer row may lack or misspell one.
                category=question.get("category") or row.get("category"),
                question=str(question["question"] or ""),
                reference_answer=str(question["reference_answer"] or ""),
                location=locations.get(str(row["question_id"])),
                answer=str(row["answer"] or ""),
            )
        )
    return items


JUDGE_SCORE_SCHEMA: dict[str, pl.DataType] = {
    "question_id": pl.Utf8(),
    "category": pl.Utf8(),
    "judge": pl.Utf8(),
    "score": pl.Int64(),
    "reason": pl.Utf8(),
    "parse_ok": pl.Boolean(),
    "raw_output": pl.Utf8(),
    "attempts": pl.Int64(),
    "parse_error": pl.Utf8(),
    "judge_seconds": pl.Float64(),
    "prompt_version": pl.Utf8(),
    "judge_settings": pl.Utf8(),
}


def judge_answers(
    items: Sequence[JudgeItem],
    generate: GenerateFn,
    rubric: Rubric,
    settings: JudgeSettings,
    on_verdict: Callable[[Verdict], object] | None = None,
    deadline_s: float | None = None,
) -> pl.DataFrame:
    """Judge every item, each within ``deadline_s``; one row per item in ``JUDGE_SCORE_SCHEMA`` (partition
    columns added by the asset)."""
    rows = []
    settings_json = settings.as_json()
    for item in items:
        verdict = judge_one(item, generate, rubric, settings, deadline_s)
        if on_verdict is not None:
            on_verdict(verdict)
        rows.append(
            {
                "question_id": item.question_id,
                "category": item.category,
                "judge": settings.name,
                "score": verdict.score,
                "reason": verdict.reason,
                "parse_ok": verdict.parse_ok,
                "raw_output": verdict.raw_output,
                "attempts": verdict.attempts,
                "parse_error": verdict.parse_error,
                "judge_seconds": round(verdict.seconds, 4),
                "prompt_version": settings.prompt_version,
                "judge_settings": settings_json,
            }
        )
    return pl.DataFrame(rows, schema=JUDGE_SCORE_SCHEMA)
