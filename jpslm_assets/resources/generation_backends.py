"""Choosing a generation backend: by the profile's name for it, or the one a recorded deployment names."""

from __future__ import annotations

from typing import Any, Literal

from jpslm_assets.common.generation_types import GenerationError
from jpslm_assets.resources.generation import Deployment, GenerationBackend
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_llama_server import LlamaServerBackend
from jpslm_assets.resources.generation_ollama import OllamaBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend


def backend_for(
    kind: str,
    num_ctx: int,
    quantization: str = "none",
    fallback: Literal["none", "llama_cpp"] = "none",
    first_byte_timeout_s: float = 45.0,
    request_timeout_s: float = 600.0,
) -> GenerationBackend:
    """A backend of the named kind with the profile's context size (and, for Ollama, its fallback and limits)."""
    if kind == "llama_cpp":
        return LlamaCppBackend(n_ctx=num_ctx)
    if kind == "llama_server":
        return LlamaServerBackend(n_ctx=num_ctx, timeout_s=request_timeout_s)
    if kind == "ollama":
        return OllamaBackend(
            num_ctx=num_ctx,
            fallback=fallback,
            first_byte_timeout_s=first_byte_timeout_s,
            timeout_s=request_timeout_s,
        )
    if kind == "transformers":
        return TransformersBackend(quantization="nf4" if quantization == "nf4" else "none")
    raise GenerationError(
        f"generation backend {kind!r} is not one of llama_cpp, llama_server, ollama, transformers"
    )


def serving_backend(
    configured: GenerationBackend, deployment: Deployment | dict[str, Any]
) -> GenerationBackend:
    """The backend that serves a recorded deployment: the configured one when it matches, else the recorded
    kind (e.g. embedded llama.cpp after Ollama was unreachable, transformers for the NF4 fallback)."""
    record = deployment if isinstance(deployment, dict) else deployment.__dict__
    kind, quantization = str(record["backend"]), str(record.get("quantization") or "none")
    if kind == configured.backend_name and not (kind == "transformers" and quantization == "nf4"):
        return configured
    num_ctx = getattr(configured, "n_ctx", None) or getattr(configured, "num_ctx", None) or 4096
    return backend_for(kind, int(num_ctx), quantization)
