"""The judge's rubric and how it is asked: the rubric file, the judge settings, the constrained reply (GBNF grammar, JSON schema) and the messages for one answer. ``scoring`` parses the replies and scores the answers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jpslm_assets.common.generation_types import (
    ChatMessage,
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
