"""llama.cpp's own HTTP server (``llama-server``) as a generation backend: the backend starts one server
process per GGUF, waits until it is healthy, sends it chat requests and stops it when released.

``httpx`` is imported inside methods: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.resources.generation import Deployment, DeploymentRequest, GenerationBackend
from jpslm_assets.resources.generation_llama_cpp import check_gguf_chat_template, describe_tensor_types
from jpslm_assets.resources.generation_transformers import TransformersBackend
from jpslm_assets.resources.llama_cpp_tools import LlamaCppToolError, check_gguf_file, file_identity
from jpslm_assets.resources.loaded_models import LLAMA_SERVERS

LLAMA_SERVER_ENV = "JPSLM_LLAMA_SERVER"
LLAMA_SERVER_BUILD = (
    "build llama.cpp's server with CUDA (`cmake -B build -DGGML_CUDA=ON && cmake --build build --config Release "
    "--target llama-server`) and put build/bin/llama-server on PATH, or point "
    f"${LLAMA_SERVER_ENV} (the resource's `binary`) at it"
)


class _LlamaServer:
    """One ``llama-server`` process serving one GGUF, with a shared HTTP client sized for its slots."""

    def __init__(self, command: list[str], url: str, log_path: Path, parallel: int, timeout_s: float) -> None:
        import httpx

        self.command = command
        self.url = url
        self.log_path = log_path
        self._log = log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError:
            self._log.close()
            raise
        self.client = httpx.Client(
            base_url=url,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=parallel + 2, max_keepalive_connections=parallel + 2),
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return "\n".join(tail) if tail else "(the server wrote nothing)"

    def running(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """Stop the server's whole process group (SIGTERM, then SIGKILL) and close the client."""
        self.client.close()
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()
        self.log_path.unlink(missing_ok=True)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class LlamaServerBackend(GenerationBackend):
    """llama.cpp's own HTTP server: ``model_ref`` is a GGUF path; the backend starts ``llama-server`` for it
    (``-np parallel`` slots of ``n_ctx`` tokens each, layers on the GPU) and keeps it running until
    ``release_loaded_models()`` or the end of the process. Requests go to ``/v1/chat/completions`` and the chat
    layout is the GGUF's own template (``--jinja``); up to ``parallel`` of them are answered at once."""

    backend_name: ClassVar[str] = "llama_server"

    binary: str | None = Field(
        default=None,
        description=f"llama-server executable (a name on PATH or a path); None: ${LLAMA_SERVER_ENV}, else "
        "`llama-server` on PATH",
    )
    host: str = Field(default="127.0.0.1", description="Address the server listens on")
    port: int = Field(default=0, ge=0, lt=65536, description="0 picks a free port")
    parallel: int = Field(default=8, gt=0, description="Slots: requests the server decodes at once (-np)")
    n_ctx: int = Field(default=4096, gt=0, description="Context per slot; the server gets -c parallel*n_ctx")
    n_gpu_layers: int = Field(default=999, description="Layers offloaded to the GPU (-ngl); 999: all")
    startup_timeout_s: float = Field(
        default=300.0, gt=0, description="Wait this long for GET /health to be 200"
    )
    timeout_s: float = Field(default=600.0, gt=0, description="Per-request read timeout")
    extra_args: list[str] = Field(
        default_factory=list, description="More llama-server flags, passed as given"
    )
    max_servers: int = Field(default=1, gt=0, description="Servers (GGUFs) kept running per process")

    @property
    def max_concurrency(self) -> int:
        return self.parallel

    def resolved_binary(self) -> str:
        return self.binary or os.environ.get(LLAMA_SERVER_ENV) or "llama-server"

    def executable(self) -> str | None:
        """The server executable's path, or None when it is neither on PATH nor an executable file."""
        binary = self.resolved_binary()
        if os.sep in binary or (os.altsep and os.altsep in binary):
            path = Path(binary).expanduser()
            return str(path) if path.is_file() and os.access(path, os.X_OK) else None
        return shutil.which(binary)

    def command(self, gguf: Path, port: int) -> list[str]:
        executable = self.executable() or self.resolved_binary()
        return [
            executable, "-m", str(gguf), "--host", self.host, "--port", str(port),
            "-np", str(self.parallel), "-c", str(self.parallel * self.n_ctx), "-ngl", str(self.n_gpu_layers),
            "--jinja", *self.extra_args,
        ]  # fmt: skip

    def server(self, model_ref: str) -> _LlamaServer:
        """The running server for a GGUF, started (and waited for) on first use."""
        path = Path(model_ref)
        try:
            check_gguf_file(path)
        except LlamaCppToolError as exc:
            raise self._error(model_ref, str(exc)) from exc
        key = (
            *file_identity(path), self.resolved_binary(), self.host, self.port, self.parallel, self.n_ctx,
            self.n_gpu_layers, tuple(self.extra_args),
        )  # fmt: skip
        server: _LlamaServer = LLAMA_SERVERS.get(key, lambda: self._start(path), self.max_servers)
        if not server.running():
            # Died since it started (killed, out of memory): report it now, and start afresh on the next call.
            LLAMA_SERVERS.discard(key)
            raise self._error(
                model_ref,
                f"llama-server exited with code {server.process.returncode}; its last log lines:\n"
                f"{server.log_tail()}",
            )
        return server

    def _start(self, path: Path) -> _LlamaServer:
        model_ref = str(path)
        if self.executable() is None:
            raise self._error(
                model_ref, f"no llama-server executable {self.resolved_binary()!r}; {LLAMA_SERVER_BUILD}"
            )
        port = self.port or _free_port(self.host)
        command = self.command(path, port)
        log_path = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        try:
            server = _LlamaServer(
                command, f"http://{self.host}:{port}", log_path, self.parallel, self.timeout_s
            )
        except OSError as exc:
            log_path.unlink(missing_ok=True)
            raise self._error(model_ref, f"cannot start {command[0]} ({exc}); {LLAMA_SERVER_BUILD}") from exc
        try:
            self._wait_until_healthy(server, model_ref)
        except BaseException:
            server.close()
            raise
        return server

    def _wait_until_healthy(self, server: _LlamaServer, model_ref: str) -> None:
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not server.running():
                raise self._error(
                    model_ref,
                    f"llama-server exited with code {server.process.returncode} while starting "
                    f"({' '.join(server.command)}); its last log lines:\n{server.log_tail()}",
                )
            try:
                response = server.client.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise self._error(
            model_ref,
            f"llama-server at {server.url} was not healthy within startup_timeout_s="
            f"{self.startup_timeout_s:.0f} s (last: {last}); its last log lines:\n{server.log_tail()}",
        )

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        import httpx

        server = self.server(model_ref)
        body: dict[str, Any] = {
            "messages": list(request.messages),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
            "stream": False,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.grammar:
            body["grammar"] = request.grammar
        elif request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"schema": request.json_schema}}
        started = time.perf_counter()
        try:
            response = server.client.post("/v1/chat/completions", json=body)
        except httpx.TimeoutException as exc:
            raise self._error(
                model_ref,
                f"llama-server at {server.url} did not answer within timeout_s={self.timeout_s:.0f} s "
                f"({exc!r})",
            ) from exc
        except httpx.HTTPError as exc:
            state = "is running" if server.running() else f"exited with code {server.process.returncode}"
            raise self._error(
                model_ref,
                f"llama-server at {server.url} failed ({exc!r}); the server {state}; its last log "
                f"lines:\n{server.log_tail()}",
            ) from exc
        seconds = time.perf_counter() - started
        if response.status_code != 200:
            raise self._error(model_ref, self._http_error(server, response))
        try:
            payload = response.json()
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
            usage = payload.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise self._error(
                model_ref,
                f"llama-server at {server.url} sent an unexpected reply ({exc!r}): {response.text[:300]}",
            ) from exc
        return GenerationResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            seconds=seconds,
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            backend=self.backend_name,
            model=model_ref,
            extra={"timings": payload.get("timings") or {}},
        )

    def _http_error(self, server: _LlamaServer, response: Any) -> str:
        try:
            error = response.json().get("error")
            message = error.get("message") if isinstance(error, dict) else str(error)
        except (ValueError, AttributeError):
            message = response.text[:300]
        detail = f"llama-server at {server.url} answered HTTP {response.status_code}: {message}"
        if "context" in str(message).lower():
            detail += (
                f"; each of the {self.parallel} slots holds n_ctx={self.n_ctx} tokens: raise generation.num_ctx "
                "in the profile or lower max_new_tokens"
            )
        return detail

    def deploy(self, request: DeploymentRequest) -> Deployment:
        if request.gguf_path is None:
            return TransformersBackend(quantization="nf4").deploy(request)
        from jpslm_assets.resources.llama_cpp_tools import gguf_chat_metadata, tensor_type_counts

        gguf = request.gguf_path
        model_ref = str(gguf)
        try:
            header = gguf_chat_metadata(gguf)  # the header only: the weights load in the server
        except LlamaCppToolError as exc:
            raise self._error(model_ref, str(exc)) from exc
        check_gguf_chat_template(self, model_ref, header.chat_template, header.bos_token, header.eos_token)
        executable = self.executable()
        status: Literal["ok", "unavailable"]
        if executable is None:
            status = "unavailable"
            detail = (
                f"no llama-server executable {self.resolved_binary()!r} (generation resource setting `binary`, "
                f"or ${LLAMA_SERVER_ENV}); {LLAMA_SERVER_BUILD}"
            )
        else:
            status = "ok"
            detail = (
                f"{executable} serves {gguf.name} ({describe_tensor_types(tensor_type_counts(gguf))}) with "
                f"{self.parallel} slots of {self.n_ctx} tokens, -ngl {self.n_gpu_layers}"
            )
        return Deployment(
            backend=self.backend_name,
            model_ref=model_ref,
            served_name=request.served_name,
            quantization=request.format,
            status=status,
            detail=detail,
        )
