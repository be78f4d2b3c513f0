"""LLM-as-judge: the rubric, the prompt, the constrained output, reply parsing and bounded retries.

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
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jpslm_assets.domain.generation_types import (
    BackendUnavailable,
    ChatMessage,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)

Language = Literal["ja", "en"]
Constraint = Literal["grammar", "json_schema", "none"]
GenerateFn = Callable[[GenerationRequest], GenerationResult]

EMPTY_ANSWER_REASON = "empty answer: scored 0 by the rubric without calling the judge"


class RubricError(ValueError):
    """The rubric file is invalid; the message names the file, the field and the fix."""


class JudgeInputError(ValueError):
    """Answers, test set or knowledge graph rows cannot be judged; the message names the records."""


class JudgeBackendError(RuntimeError):
    """Every attempt to reach the judge model failed; nothing is stored for the partition."""


# --------------------------------------------------------------------------------------------- rubric


class RubricLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: int = Field(ge=0)
    ja: str = Field(min_length=1)
    en: str = Field(min_length=1)


class RubricInstructions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system: str
    rubric_heading: str
    question: str
    reference: str
    location: str
    location_unknown: str
    answer: str
    truncated: str
    closing: str


class GenerationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason_max_chars: int = Field(gt=0, le=2000)
    retry_temperature: float = Field(ge=0.0, le=2.0)
    num_ctx: int = Field(gt=256)
    embedded_weights: Literal["source", "f16", "q8_0"] = "source"


class CitationVocabulary(BaseModel):
    model_config = ConfigDict(extra="forbid")

    volumes: dict[str, list[str]]
    chapter_patterns: list[str]
    section_patterns: list[str]
    title_match_threshold: float = Field(ge=0, le=100)
    title_min_chars: int = Field(ge=1)

    @model_validator(mode="after")
    def _patterns_compile(self) -> CitationVocabulary:
        for pattern in [*self.chapter_patterns, *self.section_patterns]:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"citation pattern {pattern!r} is not a valid regular expression: {exc}"
                ) from exc
            if compiled.groups != 1:
                raise ValueError(f"citation pattern {pattern!r} must capture exactly one group (the number)")
        return self


class Rubric(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default

    prompt_version: str = Field(min_length=1)
    default_language_by_backend: dict[str, Language]
    generation: GenerationDefaults
    levels: list[RubricLevel]
    instructions: dict[Language, RubricInstructions]
    citation: CitationVocabulary

    @model_validator(mode="after")
    def _levels_contiguous(self) -> Rubric:
        scores = sorted(level.score for level in self.levels)
        if scores != list(range(len(scores))) or len(scores) < 2:
            raise ValueError(f"levels must be the integers 0..k without gaps or repeats, got {scores}")
        missing = {"ja", "en"} - set(self.instructions)
        if missing:
            raise ValueError(f"instructions lack the language(s) {sorted(missing)}")
        return self

    @property
    def scores(self) -> list[int]:
        return sorted(level.score for level in self.levels)

    @property
    def max_score(self) -> int:
        return self.scores[-1]


def load_rubric(path: Path | str | None = None) -> Rubric:
    """The rubric from ``path`` (default: the packaged ``data/judge_rubric.yaml``)."""
    if path is None:
        return _packaged_rubric()
    return _parse_rubric(Path(path).read_text("utf-8"), str(path))


@lru_cache(maxsize=1)
def _packaged_rubric() -> Rubric:
    text = (resources.files("jpslm_assets") / "data" / "judge_rubric.yaml").read_text("utf-8")
    return _parse_rubric(text, "jpslm_assets/data/judge_rubric.yaml")


def _parse_rubric(text: str, origin: str) -> Rubric:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RubricError(f"rubric {origin} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RubricError(f"rubric {origin} must be a mapping with prompt_version, levels, instructions...")
    try:
        return Rubric(**raw)
    except ValidationError as exc:
        raise RubricError(f"rubric {origin} is invalid; fix these fields:\n{exc}") from exc


# ------------------------------------------------------------------------------------ judge settings


# Bytes of the JSON frame of a reply with every optional space the grammar allows:
# { "score" : 3 , "reason" : "" } -> 31. A token is at least one byte, so bytes bound tokens.
REPLY_FRAME_BYTES = 31
# Bytes one reason character can take: an escape pair (\\n) in ASCII, up to 4 in UTF-8 otherwise.
MAX_BYTES_PER_REASON_CHAR = {True: 2, False: 4}


def reply_token_budget(reason_max_chars: int, ascii_reason: bool) -> int:
    """max_tokens that always lets the longest admissible reply finish (a cut reply cannot be parsed)."""
    return REPLY_FRAME_BYTES + reason_max_chars * MAX_BYTES_PER_REASON_CHAR[ascii_reason]


@dataclass(frozen=True)
class JudgeSettings:
    """Everything that determines a judgement besides the inputs; stored as JSON with every row."""

    backend: str
    model: str
    language: Language
    max_answer_chars: int
    retries: int
    max_tokens: int
    reason_max_chars: int
    reason_ascii: bool
    temperature: float
    retry_temperature: float
    seed: int
    constraint: Constraint
    prompt_version: str
    weights: str | None = None

    @property
    def name(self) -> str:
        """The judge's identity in ``eval.judge_scores.judge``: model, backend and instruction language."""
        return f"{self.model}/{self.backend}/{self.language}"

    def as_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


def judge_settings(
    rubric: Rubric,
    backend: str,
    model: str,
    max_answer_chars: int,
    retries: int,
    language: Language | None = None,
    seed: int = 42,
    constraint: Constraint | None = None,
    weights: str | None = None,
    reason_max_chars: int | None = None,
) -> JudgeSettings:
    """Settings for one judge: profile values, run-config overrides, rubric defaults for the rest.

    With a grammar and English instructions the reason is restricted to printable ASCII: a small judge
    otherwise copies Japanese text from the prompt into its reason until ``max_tokens`` cuts the reply.
    ``max_tokens`` always fits the longest admissible reply. ``reason_max_chars`` (None: the rubric's) bounds
    the reason; it is part of the recorded settings, so scores made under different bounds are told apart.
    """
    if language is None:
        if backend not in rubric.default_language_by_backend:
            raise RubricError(
                f"judge backend {backend!r} has no default language in the rubric's "
                f"default_language_by_backend ({sorted(rubric.default_language_by_backend)}); set the judge "
                "language in the run config or add the backend to jpslm_assets/data/judge_rubric.yaml."
            )
        language = rubric.default_language_by_backend[backend]
    if constraint is None:
        constraint = "json_schema" if backend == "ollama" else "grammar"
    if max_answer_chars <= 0:
        raise RubricError(f"judge.max_answer_chars must be positive, got {max_answer_chars}")
    if retries < 0:
        raise RubricError(f"judge.retries must be >= 0, got {retries}")
    reason_ascii = language == "en" and constraint == "grammar"
    reason_max_chars = reason_max_chars or rubric.generation.reason_max_chars
    return JudgeSettings(
        backend=backend,
        model=model,
        language=language,
        max_answer_chars=max_answer_chars,
        retries=retries,
        max_tokens=reply_token_budget(reason_max_chars, reason_ascii),
        reason_max_chars=reason_max_chars,
        reason_ascii=reason_ascii,
        temperature=0.0,
        retry_temperature=rubric.generation.retry_temperature,
        seed=seed,
        constraint=constraint,
        prompt_version=rubric.prompt_version,
        weights=weights,
    )


# ---------------------------------------------------------------------------- output constraints


def judge_grammar(rubric: Rubric, reason_max_chars: int | None = None, ascii_reason: bool = False) -> str:
    """A GBNF grammar admitting exactly ``{"score": <level>, "reason": "<1..max chars>"}``.

    Written by hand rather than converted from the JSON schema: llama.cpp's converter ignores integer
    bounds and lets control characters into strings, so its output could still fail to parse.
    ``ascii_reason`` limits the reason to printable ASCII (an English reason).
    """
    limit = reason_max_chars or rubric.generation.reason_max_chars
    levels = " | ".join(f'"{score}"' for score in rubric.scores)
    plain = "[ !#-[\\]-~]" if ascii_reason else '[^"\\\\\\x00-\\x1F\\x7F]'
    return "\n".join(
        [
            'root ::= "{" space "\\"score\\"" space ":" space score space "," space '
            '"\\"reason\\"" space ":" space "\\"" char{1,' + str(limit) + '} "\\"" space "}"',
            f"score ::= {levels}",
            f'char ::= {plain} | "\\\\" ["\\\\/bfnrt]',
            'space ::= " "?',
        ]
    )


def judge_json_schema(rubric: Rubric, reason_max_chars: int | None = None) -> dict[str, Any]:
    """The JSON schema for Ollama's ``format``: an enum of levels (not min/max) and a bounded reason."""
    return {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "enum": rubric.scores},
            "reason": {"type": "string", "maxLength": reason_max_chars or rubric.generation.reason_max_chars},
        },
        "required": ["score", "reason"],
        "additionalProperties": False,
    }


# ------------------------------------------------------------------------------------------ prompt


@dataclass(frozen=True)
class JudgeItem:
    question_id: str
    category: str | None
    question: str
    reference_answer: str
    location: str | None
    answer: str


def truncate_answer(answer: str, max_chars: int, marker: str) -> str:
    """The answer cut to ``max_chars`` characters, with a marker so the judge knows text is missing."""
    if len(answer) <= max_chars:
        return answer
    return answer[:max_chars].rstrip() + " " + marker


def build_judge_messages(
    item: JudgeItem, rubric: Rubric, language: Language, max_answer_chars: int
) -> list[ChatMessage]:
    """System message (role + rubric), user message (question, reference, location, candidate)."""
    text = rubric.instructions[language]
    levels = sorted(rubric.levels, key=lambda level: -level.score)
    rubric_lines = "\n".join(f"{level.score}: {getattr(level, language)}" for level in levels)
    system = f"{text.system}\n{text.rubric_heading}:\n{rubric_lines}"
    # The reference is capped like the answer: both cost prompt tokens on every judgement.
    answer = truncate_answer(item.answer.strip(), max_answer_chars, text.truncated)
    reference = truncate_answer(item.reference_answer.strip(), max_answer_chars, text.truncated)
    user = "\n".join(
        [
            f"{text.question}: {item.question.strip()}",
            f"{text.reference}: {reference}",
            f"{text.location}: {item.location or text.location_unknown}",
            f"{text.answer}: {answer}",
            text.closing,
        ]
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


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
