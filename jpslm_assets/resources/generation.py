"""Generation backends: the interface that answering, judging and QA rephrasing use, and what a deployment
records.

One module per outside system implements it: ``generation_ollama`` (an Ollama server, official client),
``generation_llama_cpp`` (embedded llama.cpp, llama-cpp-python), ``generation_llama_server`` (llama.cpp's own
HTTP server, ``llama-server``, started by the backend) and ``generation_transformers``;
``generation_backends`` picks one by name. The models they load stay cached in ``loaded_models``.

All four implement ``generate(model_ref, request) -> GenerationResult`` (types in
``common.generation_types``); answering, judging and QA rephrasing depend on that method only. A
``model_ref`` is what the backend loads: a GGUF path (llama.cpp, llama-server), a served model name (Ollama)
or a Hugging Face folder (transformers).

``max_concurrency`` says how many requests a backend serves at once: 1 for the in-process backends, the
server's parallel slots for Ollama (``OLLAMA_NUM_PARALLEL``) and llama-server (``-np``).

Each backend also ``deploy``s an exported model for its kind of serving and reports what it did, so the
deployment asset never branches on the backend. When the Ollama server does not answer, deployment fails
naming it, unless the profile allows the embedded llama.cpp fallback (``generation.fallback: llama_cpp``),
which is then recorded as the backend.

Heavy libraries (llama_cpp, torch, transformers) are imported inside methods: importing these modules is
cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import dagster as dg

from jpslm_assets.common.generation_types import GenerationError, GenerationRequest, GenerationResult
from jpslm_assets.export.modelfile import ModelfileSpec

BackendName = Literal["llama_cpp", "llama_server", "ollama", "transformers"]


@dataclass(frozen=True)
class DeploymentRequest:
    """One exported model in one format, to be made servable."""

    model: str
    n: int
    format: str  # f16 | q4_k_m | nf4
    served_name: str
    gguf_path: Path | None = None  # None for HF-only formats (nf4)
    hf_dir: Path | None = None
    modelfile: ModelfileSpec | None = None


@dataclass(frozen=True)
class Deployment:
    backend: str
    model_ref: str
    served_name: str
    quantization: str  # what actually holds the weights: gguf file type or nf4 / 16bit
    status: Literal["ok", "unavailable"]
    detail: str


class GenerationBackend(dg.ConfigurableResource):
    """The interface; see the module docstring."""

    backend_name: ClassVar[str] = "abstract"

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        raise NotImplementedError

    def deploy(self, request: DeploymentRequest) -> Deployment:
        raise NotImplementedError

    @property
    def max_concurrency(self) -> int:
        """How many ``generate`` calls may run at once (1: calls must not overlap)."""
        return 1

    def _error(self, model_ref: str, cause: str) -> GenerationError:
        return GenerationError(f"{self.backend_name} backend, model {model_ref}: {cause}")
