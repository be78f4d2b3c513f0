"""A running Ollama server as a generation backend, through the official ``ollama`` client.

``ollama`` and ``httpx`` are imported inside methods: importing this module is cheap.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from jpslm_assets.common.generation_types import (
    BackendUnavailable,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)
from jpslm_assets.export.modelfile import ModelfileSpec
from jpslm_assets.resources.generation import Deployment, DeploymentRequest, GenerationBackend
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend

OLLAMA_HOST_ENV = "OLLAMA_HOST"
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"


def ollama_host(configured: str | None = None) -> str:
    """The Ollama server: the resource's setting, else ``$OLLAMA_HOST``, else the local default."""
    host = configured or os.environ.get(OLLAMA_HOST_ENV) or DEFAULT_OLLAMA_HOST
    return host if "://" in host else f"http://{host}"


class OllamaBackend(GenerationBackend):
    """A running Ollama server via the official ``ollama`` client; ``model_ref`` is a served model name."""

    backend_name: ClassVar[str] = "ollama"

    host: str | None = Field(default=None, description="Server URL; default $OLLAMA_HOST or 127.0.0.1:11434")
    # Three limits, each for what it bounds: a server that is down fails after connect_timeout_s; one that
    # accepts and never answers after first_byte_timeout_s (also the longest pause between streamed tokens);
    # a reply that keeps coming is cut after timeout_s in all. Uploads (ollama create) use timeout_s per read.
    timeout_s: float = Field(
        default=600.0, gt=0, description="Total time for one generation request, first byte to last"
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Opening the connection")
    first_byte_timeout_s: float = Field(
        default=45.0,
        gt=0,
        description="Until the first streamed token (model load and prompt), and the longest pause between tokens",
    )
    num_ctx: int = Field(default=4096, gt=0)
    keep_alive: str | None = Field(default=None, description="How long Ollama keeps the model loaded")
    parallel: int = Field(
        default=1,
        gt=0,
        description="Requests sent at once; match the server's OLLAMA_NUM_PARALLEL (its slots)",
    )
    fallback: Literal["none", "llama_cpp"] = Field(
        default="none",
        description="When the server does not answer at deployment: fail naming it (none), or deploy to embedded "
        "llama.cpp instead and record that backend (llama_cpp; profile generation.fallback)",
    )

    @property
    def max_concurrency(self) -> int:
        return self.parallel

    def resolved_host(self) -> str:
        return ollama_host(self.host)

    def client(self, timeout_s: float | None = None) -> Any:
        import httpx
        import ollama

        timeout = httpx.Timeout(timeout_s or self.timeout_s, connect=self.connect_timeout_s)
        return ollama.Client(host=self.resolved_host(), timeout=timeout)

    def _translate(self, model_ref: str, exc: Exception) -> GenerationError:
        import httpx
        import ollama

        host = self.resolved_host()
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                return self._error(
                    model_ref,
                    f"Ollama at {host} does not know this model ({exc.error}); materialize the "
                    "deployment asset (ollama create) or `ollama pull` it.",
                )
            return self._error(model_ref, f"Ollama at {host} answered HTTP {exc.status_code}: {exc.error}")
        if isinstance(exc, ConnectionError | httpx.ConnectError | httpx.ConnectTimeout):
            return BackendUnavailable(
                f"{self.backend_name} backend, model {model_ref}: Ollama at {host} is unreachable; start "
                f"`ollama serve` there or set {OLLAMA_HOST_ENV} to a server that runs ({exc!r}; "
                f"connect_timeout_s={self.connect_timeout_s:g} s)."
            )
        if isinstance(exc, httpx.TimeoutException):
            return self._error(
                model_ref,
                f"Ollama at {host} did not answer within timeout_s={self.timeout_s:g} s ({exc!r})",
            )
        return self._error(model_ref, f"Ollama at {host} failed: {exc!r}")

    def reachable(self) -> tuple[bool, str]:
        """Whether a server answers at the host (asked for its model list), with the reason when none does.

        A server that answers with an HTTP error is reachable: the next call then reports that error
        rather than falling back quietly."""
        import ollama

        try:
            with self.client(timeout_s=self.connect_timeout_s) as client:
                client.list()
        except ollama.ResponseError as exc:
            return (
                True,
                f"Ollama at {self.resolved_host()} answers (with HTTP {exc.status_code} to /api/tags)",
            )
        except Exception as exc:
            return False, str(self._translate("-", exc))
        return True, f"Ollama at {self.resolved_host()} answers"

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        if request.grammar and request.json_schema is None:
            raise self._error(
                model_ref,
                "Ollama takes a JSON schema (`format`), not a GBNF grammar; give the request a json_schema",
            )
        options: dict[str, Any] = {
            "seed": request.seed,
            "temperature": request.temperature,
            "num_ctx": self.num_ctx,
            "num_predict": request.max_tokens,
        }
        if request.stop:
            options["stop"] = list(request.stop)
        import httpx

        limit = self.timeout_s if request.deadline_s is None else min(self.timeout_s, request.deadline_s)
        started = time.perf_counter()
        parts: list[str] = []
        first_byte: float | None = None
        final: Any = None
        try:
            # Streamed, so that the read timeout bounds the wait for the first token and each pause after it,
            # and the total limit is checked as tokens arrive.
            with self.client(timeout_s=self.first_byte_timeout_s) as client:
                for chunk in client.chat(
                    model=model_ref,
                    messages=list(request.messages),
                    format=request.json_schema,
                    options=options,
                    stream=True,
                    keep_alive=self.keep_alive,
                ):
                    if first_byte is None:
                        first_byte = time.perf_counter() - started
                    parts.append(chunk.message.content or "")
                    if chunk.done:
                        final = chunk
                        break
                    if time.perf_counter() - started > limit:
                        raise self._error(
                            model_ref,
                            f"Ollama at {self.resolved_host()} was still generating after {limit:g} s "
                            f"(timeout_s={self.timeout_s:g}"
                            + ("" if request.deadline_s is None else f", caller's deadline {request.deadline_s:g} s")
                            + f"); {len(parts)} chunks so far",
                        )
        except GenerationError:
            raise
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise self._translate(model_ref, exc) from exc
            host = self.resolved_host()
            if first_byte is None:
                raise BackendUnavailable(
                    f"{self.backend_name} backend, model {model_ref}: Ollama at {host} accepted the request but "
                    f"sent nothing within first_byte_timeout_s={self.first_byte_timeout_s:g} s; the server is "
                    "stuck or overloaded (check `ollama ps` and its log), or the model takes longer to load "
                    "(raise first_byte_timeout_s)."
                ) from exc
            raise self._error(
                model_ref,
                f"Ollama at {host} stopped sending tokens for {self.first_byte_timeout_s:g} s "
                f"(first_byte_timeout_s) after {len(parts)} chunks",
            ) from exc
        except Exception as exc:
            raise self._translate(model_ref, exc) from exc
        if final is None:
            raise self._error(model_ref, f"Ollama at {self.resolved_host()} ended the stream without a final chunk")
        seconds = time.perf_counter() - started
        return GenerationResult(
            text="".join(parts),
            prompt_tokens=int(final.prompt_eval_count or 0),
            completion_tokens=int(final.eval_count or 0),
            seconds=seconds,
            finish_reason="length" if final.done_reason == "length" else "stop",
            backend=self.backend_name,
            model=model_ref,
            extra={"total_duration_s": (final.total_duration or 0) / 1e9, "first_byte_s": first_byte},
        )

    def create_model(self, name: str, gguf_path: Path, spec: ModelfileSpec) -> dict[str, Any]:
        """Upload the GGUF as a blob and ``ollama create`` the model from it with the Modelfile's settings."""
        try:
            with self.client() as client:
                digest = client.create_blob(gguf_path)
                progress = client.create(
                    model=name,
                    files={gguf_path.name: digest},
                    template=spec.template,
                    parameters=spec.parameters(),
                    stream=False,
                )
                if progress.status != "success":
                    raise GenerationError(f"ollama create {name} ended with status {progress.status!r}")
                shown = client.show(name)
        except GenerationError:
            raise
        except Exception as exc:
            raise self._translate(name, exc) from exc
        return {"digest": digest, "parameters": shown.parameters, "template": shown.template}

    def deploy(self, request: DeploymentRequest) -> Deployment:
        if request.gguf_path is None:
            return TransformersBackend(quantization="nf4").deploy(request)
        reachable, reason = self.reachable()
        if not reachable and self.fallback == "none":
            raise self._error(
                request.served_name,
                f"cannot deploy: {reason}. Start `ollama serve` there (or point OLLAMA_HOST at a running server), or "
                "serve with embedded llama.cpp instead by setting generation.fallback: llama_cpp in the profile "
                "(JPSLM_GENERATION__FALLBACK=llama_cpp); that backend is then recorded with the scores.",
            )
        if not reachable:
            embedded = LlamaCppBackend(n_ctx=self.num_ctx).deploy(request)
            return Deployment(
                backend=embedded.backend,
                model_ref=embedded.model_ref,
                served_name=embedded.served_name,
                quantization=embedded.quantization,
                status=embedded.status,
                detail=f"{reason} -> recorded the embedded llama.cpp deployment instead; {embedded.detail}",
            )
        if request.modelfile is None:
            raise self._error(request.served_name, "deploying to Ollama needs a Modelfile")
        created = self.create_model(request.served_name, request.gguf_path, request.modelfile)
        return Deployment(
            backend=self.backend_name,
            model_ref=request.served_name,
            served_name=request.served_name,
            quantization=request.format,
            status="ok",
            detail=f"ollama create at {self.resolved_host()} from blob {created['digest'][:19]}",
        )
