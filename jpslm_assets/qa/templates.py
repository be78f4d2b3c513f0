"""The QA template catalogue: how each knowledge-graph relation type becomes question/answer pairs.

The catalogue is data (``jpslm_assets/data/qa_templates.yaml``); this module parses and validates it. A
template is a question phrasing plus the answer frame it is paired with; both are ``str.format`` strings
whose placeholders name a field of the relation's source or target node (``{source_name}``,
``{target_citation}``, ...). Validation happens once, at load time, so a typo in a placeholder is reported
with the template's id instead of surfacing as a ``KeyError`` half-way through expansion.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VERSIONS = ("v1", "v2", "v3", "v4")
NODE_FIELDS = (
    "name",
    "name_en",
    "description",
    "label",
    "label_word",
    "volume",
    "chapter",
    "section",
    "citation",
    "category",
)
PLACEHOLDERS = frozenset(
    [f"source_{field}" for field in NODE_FIELDS]
    + [f"target_{field}" for field in NODE_FIELDS]
    + ["relation_description", "relation_type", "citations"]
)
CITATION_PLACEHOLDERS = frozenset({"source_citation", "target_citation", "citations"})


class TemplateError(ValueError):
    """The template catalogue is wrong; the message names the template (or relation type) and the fix."""


def placeholders_in(text: str) -> list[str]:
    """Field names used in a ``str.format`` string, in order (raises on malformed braces)."""
    return [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]


def _check_placeholders(text: str, where: str) -> None:
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(
            f"{where}: malformed braces ({exc}); write a literal brace as '{{{{' or '}}}}'."
        ) from exc
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            raise TemplateError(
                f"{where}: unknown placeholder {{{field}}}; allowed placeholders are "
                f"{', '.join('{' + p + '}' for p in sorted(PLACEHOLDERS))}."
            )
        if spec or conversion:
            raise TemplateError(
                f"{where}: placeholder {{{field}}} must not carry a format spec or conversion."
            )


class Template(BaseModel):
    """One question phrasing, the answer frame it uses, its version and its direction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[a-z0-9_]+$")
    version: Literal["v1", "v2", "v3", "v4"]
    direction: Literal["forward", "reverse"]
    question: str = Field(min_length=5)
    answer: str | None = None  # key of an answer frame; default "<version>_<direction>" then "<version>"


class RelationTemplates(BaseModel):
    """Every template of one relation type and the answer frames they share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    meaning: str
    category_from: Literal["source", "target"] = "source"
    answers: dict[str, str]
    templates: list[Template] = Field(min_length=1)


class DedupSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shingle_chars: int = Field(default=3, ge=1, le=10)
    num_perm: int = Field(default=64, ge=16, le=512)
    lsh_threshold: float = Field(default=0.7, gt=0.0, lt=1.0)
    answer_lsh_threshold: float = Field(default=0.5, gt=0.0, lt=1.0)
    confirm_ratio: float = Field(default=90.0, gt=0.0, le=100.0)


class RebalanceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 42
    keep_fraction: dict[str, float] = Field(default_factory=dict)

    @field_validator("keep_fraction")
    @classmethod
    def _fractions_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for relation_type, fraction in value.items():
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"keep_fraction for {relation_type} is {fraction}; use a value in (0, 1]")
        return value


class SubsetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 42
    cv_limit: float = Field(default=0.03, gt=0.0, lt=1.0)
    # Categories follow relation types, so they can only be steered; allow them a wider rounding band.
    category_tolerance_pairs: float = Field(default=2.0, ge=1.0)
    system_prompt: str = ""


class RephraseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str
    user_prompt: str
    max_tokens: int = Field(default=128, gt=0)
    max_length_ratio: float = Field(default=2.5, gt=1.0)

    @field_validator("user_prompt")
    @classmethod
    def _has_question_slot(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("rephrase.user_prompt must contain the placeholder {question}")
        return value


class TestSetSettings(BaseModel):
    """What the held-out test set must look like, and how leakage into it is measured."""

    __test__ = False  # not a pytest test class, despite the name
    model_config = ConfigDict(extra="forbid", frozen=True)

    questions: int = Field(default=200, gt=0)
    human_written: int = Field(default=100, ge=0)
    ngram_chars: int = Field(default=8, ge=3, le=50)
    reference_run_chars: int = Field(default=30, ge=8, le=400)


class PaperReference(BaseModel):
    """Figures the paper reports, shown beside ours (never used to produce data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool_size: int
    counts: dict[str, int]
    rebalanced_counts: dict[str, int] = Field(default_factory=dict)
    rebalanced_share: dict[str, float] = Field(default_factory=dict)
    answer_chars: tuple[int, int]

    @property
    def shares(self) -> dict[str, float]:
        return {key: count / self.pool_size for key, count in self.counts.items()}


class TemplateCatalogue(BaseModel):
    """The whole ``qa_templates.yaml``: categories, labels, settings, paper figures and templates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    categories: list[str] = Field(min_length=1)
    label_words: dict[str, str]
    dedup: DedupSettings = DedupSettings()
    rebalance: RebalanceSettings = RebalanceSettings()
    subsets: SubsetSettings = SubsetSettings()
    rephrase: RephraseSettings
    test_set: TestSetSettings = TestSetSettings()
    paper_reference: PaperReference
    relation_types: dict[str, RelationTemplates] = Field(min_length=1)

    @model_validator(mode="after")
    def _validate_templates(self) -> TemplateCatalogue:
        for relation_type, block in self.relation_types.items():
            for key, frame in block.answers.items():
                _check_placeholders(frame, f"answer frame {relation_type}.{key}")
                if not CITATION_PLACEHOLDERS & set(placeholders_in(frame)):
                    raise TemplateError(
                        f"answer frame {relation_type}.{key} cites no standards location; add "
                        "{citations}, {source_citation} or {target_citation}."
                    )
            seen: set[str] = set()
            for template in block.templates:
                where = f"template {relation_type}.{template.id}"
                if template.id in seen:
                    raise TemplateError(
                        f"{where}: duplicate template id within {relation_type}; ids must be unique."
                    )
                seen.add(template.id)
                _check_placeholders(template.question, f"{where} (question)")
                if self.answer_key(relation_type, template) not in block.answers:
                    wanted = (
                        template.answer or f"{template.version}_{template.direction}' or '{template.version}"
                    )
                    raise TemplateError(
                        f"{where}: answer frame '{wanted}' is not defined under "
                        f"relation_types.{relation_type}.answers (defined: {', '.join(sorted(block.answers))})."
                    )
        for relation_type in self.rebalance.keep_fraction:
            if relation_type not in self.relation_types:
                raise TemplateError(
                    f"rebalance.keep_fraction names relation type {relation_type}, which has no templates."
                )
        return self

    def answer_key(self, relation_type: str, template: Template) -> str:
        block = self.relation_types[relation_type]
        if template.answer:
            return template.answer
        specific = f"{template.version}_{template.direction}"
        return specific if specific in block.answers else template.version

    def answer_frame(self, relation_type: str, template: Template) -> str:
        return self.relation_types[relation_type].answers[self.answer_key(relation_type, template)]

    @cached_property
    def template_count(self) -> dict[str, int]:
        return {key: len(block.templates) for key, block in self.relation_types.items()}


def parse_catalogue(raw: Mapping[str, Any], source: str = "qa_templates.yaml") -> TemplateCatalogue:
    """Validate a parsed YAML mapping; errors name the template and the fix."""
    try:
        return TemplateCatalogue.model_validate(raw)
    except TemplateError:
        raise
    except ValidationError as exc:
        # A TemplateError raised inside a validator arrives wrapped; unwrap it so the message stays plain.
        for error in exc.errors():
            cause = (error.get("ctx") or {}).get("error")
            if isinstance(cause, TemplateError):
                raise TemplateError(f"{source}: {cause}") from exc
        raise TemplateError(f"{source} is invalid:\n{exc}") from exc


def load_catalogue(path: Path) -> TemplateCatalogue:
    """Read and validate a template catalogue file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise TemplateError(f"{path} must hold a mapping with relation_types, categories, ...")
    return parse_catalogue(raw, source=str(path.name))
