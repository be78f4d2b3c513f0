"""The generation-backend interface shared by answering, judging and optional QA rephrasing.

Implementations (Ollama, embedded llama.cpp, transformers) live in ``jpslm_assets.resources``. This module
only defines the request/result types: plain data that touches no outside system, so plain functions and
resources both depend on it, and nothing here depends on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ChatMessage = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


class GenerationError(RuntimeError):
    """A backend failed to generate; the message names the backend, the model and the cause."""


class BackendUnavailable(GenerationError):
    """The backend cannot be reached, or accepted the request and sent nothing within its first-byte timeout.

    Retrying the same request at once would wait as long again, so callers stop instead of retrying."""


@dataclass(frozen=True)
class GenerationRequest:
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 42
    stop: tuple[str, ...] = ()
    # Constrained output: a GBNF grammar (llama.cpp) or a JSON schema (Ollama's `format`).
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # How many leading messages many requests share word for word (the judge's system prompt and rubric).
    # Embedded llama.cpp computes them once per model file and restores that state for every request.
    shared_prefix_messages: int = 0
    # How many leading characters of the last message other requests share too (a judgement's question,
    # reference and location, before the candidate answer): a second stored state, computed from the first.
    shared_last_message_chars: int = 0
    # Seconds this request may take at most, end to end (a caller's remaining budget, e.g. the judge's per-
    # question deadline); None: the backend's own limit. Network backends stop generating when it passes.
    # Not part of what determines the output.
    deadline_s: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: Literal["stop", "length", "error"]
    backend: str
    model: str
    extra: dict[str, Any] = field(default_factory=dict)
