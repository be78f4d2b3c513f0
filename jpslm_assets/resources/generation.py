"""Generation backends: Ollama (official client), embedded llama.cpp (llama-cpp-python), llama.cpp's own
HTTP server (``llama-server``, started by the backend), transformers.

All four implement ``generate(model_ref, request) -> GenerationResult`` (types in
``domain.generation_types``); answering, judging and QA rephrasing depend on that method only. A
``model_ref`` is what the backend loads: a GGUF path (llama.cpp, llama-server), a served model name (Ollama)
or a Hugging Face folder (transformers).

``max_concurrency`` says how many requests a backend serves at once: 1 for the in-process backends, the
server's parallel slots for Ollama (``OLLAMA_NUM_PARALLEL``) and llama-server (``-np``).

Each backend also ``deploy``s an exported model for its kind of serving and reports what it did, so the
deployment asset never branches on the backend. When the Ollama server does not answer, deployment fails
naming it, unless the profile allows the embedded llama.cpp fallback (``generation.fallback: llama_cpp``),
which is then recorded as the backend.

Heavy libraries (llama_cpp, torch, transformers) are imported inside methods: importing this module is cheap.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import dagster as dg
from pydantic import Field

from jpslm_assets.domain.fidelity import ScoringSequence, SequenceNll, answer_token_nll
from jpslm_assets.domain.generation_types import (
    BackendUnavailable,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)
from jpslm_assets.domain.modelfile import ChatTemplateError, ModelfileSpec, chat_turns
from jpslm_assets.resources import prompt_states
from jpslm_assets.resources.grammar_decoding import GrammarSampler, greedy_tokens
from jpslm_assets.resources.llama_cpp_tools import LlamaCppToolError, check_gguf_file, file_identity
from jpslm_assets.resources.models import llama_cpp_thread_count

OLLAMA_HOST_ENV = "OLLAMA_HOST"
DEFAULT_OLLAMA_HOST = "http://127.0.0.1:11434"
LLAMA_SERVER_ENV = "JPSLM_LLAMA_SERVER"
BackendName = Literal["llama_cpp", "llama_server", "ollama", "transformers"]
LLAMA_SERVER_BUILD = (
    "build llama.cpp's server with CUDA (`cmake -B build -DGGML_CUDA=ON && cmake --build build --config Release "
    "--target llama-server`) and put build/bin/llama-server on PATH, or point "
    f"${LLAMA_SERVER_ENV} (the resource's `binary`) at it"
)


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


# --------------------------------------------------------------------------------------------- llama.cpp


_MODEL_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def exclusive(model: Any) -> threading.RLock:
    """The lock that one loaded model's users hold while they decode with it or close it.

    A llama.cpp context is not thread-safe: two threads decoding with one ``Llama`` (or one closing it while
    another decodes) crash the process. Models are shared through the cache below, so every decode and every
    close goes through this lock.
    """
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _close(model: Any) -> None:
    close = getattr(model, "close", None)
    if callable(close):
        with exclusive(model):
            close()


class _LoadedModels:
    """Models loaded in this process, least recently used evicted first (each holds its weights in RAM)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def get(self, key: tuple[Any, ...], load: Any, capacity: int) -> Any:
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            while len(self._models) >= max(capacity, 1):
                _, evicted = self._models.popitem(last=False)
                _close(evicted)
            loaded = load()
            self._models[key] = loaded
            return loaded

    def discard(self, key: tuple[Any, ...]) -> None:
        """Forget (and close) one entry."""
        with self._lock:
            model = self._models.pop(key, None)
        if model is not None:
            _close(model)

    def clear(self) -> None:
        with self._lock:
            for model in self._models.values():
                _close(model)
            self._models.clear()


_LLAMA_MODELS = _LoadedModels()
_HF_MODELS = _LoadedModels()
_HF_TOKENIZERS = _LoadedModels()
_LLAMA_SERVERS = _LoadedModels()  # running llama-server processes; close() stops one


def release_loaded_models() -> None:
    """Free every model this process holds (between export steps that each need a lot of memory), and stop
    the llama-server processes it started."""
    for cache in (_LLAMA_MODELS, _HF_MODELS, _HF_TOKENIZERS, _LLAMA_SERVERS):
        cache.clear()


atexit.register(_LLAMA_SERVERS.clear)


def _chat_formatter(llm: Any, generation_prompt: bool) -> Any:
    """llama-cpp-python's Jinja renderer for the GGUF's own chat template, its BOS and EOS texts."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=_token_text(llm, llm.token_eos()),
        bos_token=_token_text(llm, llm.token_bos()),
        add_generation_prompt=generation_prompt,
    )


class LlamaCppBackend(GenerationBackend):
    """Embedded llama.cpp: ``model_ref`` is a GGUF path; the chat layout is the GGUF's own template."""

    backend_name: ClassVar[str] = "llama_cpp"

    n_ctx: int = Field(default=4096, gt=0, description="Context window (profile generation.num_ctx)")
    n_threads: int | None = Field(
        default=None,
        description="CPU threads for generation; None: this machine's physical cores that are not busy (llama-cpp-"
        "python's own default, half the logical CPUs, leaves one of two cores idle on a 2-vCPU machine)",
    )
    n_batch: int = Field(default=512, gt=0)
    n_gpu_layers: int = Field(default=0, description="-1 offloads every layer when built with CUDA")
    max_loaded_models: int = Field(default=2, gt=0, description="Models kept in memory per process")
    grammar_fast_path: bool = Field(
        default=True,
        description="Greedy decoding under a grammar checks the chosen token first and masks the whole vocabulary "
        "only when the grammar rejects it (the same tokens; false: llama-cpp-python's sampler chain)",
    )

    def load(self, model_ref: str, logits_all: bool = False) -> Any:
        """The ``llama_cpp.Llama`` for a GGUF, loaded once per (file, settings) and cached."""
        path = Path(model_ref)
        try:
            check_gguf_file(path)
        except LlamaCppToolError as exc:
            raise self._error(model_ref, str(exc)) from exc
        key = (*file_identity(path), self.n_ctx, logits_all, self.n_gpu_layers)

        def load() -> Any:
            from llama_cpp import Llama

            try:
                return Llama(
                    model_path=str(path),
                    n_ctx=self.n_ctx,
                    n_threads=llama_cpp_thread_count(self.n_threads),
                    n_batch=self.n_batch,
                    n_gpu_layers=self.n_gpu_layers,
                    logits_all=logits_all,
                    seed=0,
                    verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                raise self._error(
                    model_ref,
                    f"llama.cpp cannot load it ({exc}); the file is corrupt or from an incompatible "
                    "llama.cpp version: delete it and re-materialize the gguf asset.",
                ) from exc

        return _LLAMA_MODELS.get(key, load, self.max_loaded_models)

    def check_chat_template(self, model_ref: str) -> None:
        llm = self.load(model_ref)
        _check_gguf_chat_template(
            self,
            model_ref,
            llm.metadata.get("tokenizer.chat_template"),
            _token_text(llm, llm.token_bos()),
            _token_text(llm, llm.token_eos()),
        )

    def render_prompt(self, model_ref: str, messages: Sequence[dict[str, str]]) -> list[int]:
        """The conversation's prompt ids, laid out by the GGUF's own chat template with the generation prompt.

        As in llama-cpp-python's chat handler (and HF's ``apply_chat_template``), the template writes any BOS
        itself: none is added, so none is doubled.
        """
        llm = self.load(model_ref)
        self.check_chat_template(model_ref)
        try:
            prompt = _chat_formatter(llm, generation_prompt=True)(messages=list(messages)).prompt
        except Exception as exc:  # the template's own raise_exception, or a Jinja error
            raise self._error(model_ref, f"the chat template refused the conversation: {exc}") from exc
        return list(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))

    def shared_prefix(
        self, model_ref: str, request: GenerationRequest, prompt: Sequence[int]
    ) -> tuple[int, ...]:
        """Token counts where the request's shared parts end in ``prompt``: after its shared messages, then after
        the shared start of its last message (see ``GenerationRequest``). A part is left out when it does not
        tokenize as an exact prefix of the whole prompt; at least one prompt token always stays to evaluate, so
        sampling starts from fresh logits."""
        llm = self.load(model_ref)
        boundaries: list[int] = []

        def add(text: str) -> None:
            tokens = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            longer = (boundaries[-1] if boundaries else 0) < len(tokens) < len(prompt)
            if longer and list(prompt[: len(tokens)]) == tokens:
                boundaries.append(len(tokens))

        if 0 < request.shared_prefix_messages < len(request.messages):
            shared = list(request.messages[: request.shared_prefix_messages])
            # a template that refuses a conversation without a user turn: no reuse
            with contextlib.suppress(Exception):
                add(_chat_formatter(llm, generation_prompt=False)(messages=shared).prompt)
        if request.messages and 0 < request.shared_last_message_chars < len(request.messages[-1]["content"]):
            content = request.messages[-1]["content"]
            text = _chat_formatter(llm, generation_prompt=True)(messages=list(request.messages)).prompt
            where = text.rfind(content)
            if where >= 0:
                add(text[: where + request.shared_last_message_chars])
        return tuple(boundaries)

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        llm = self.load(model_ref)
        prompt = self.render_prompt(model_ref, request.messages)
        if len(prompt) + request.max_tokens > self.n_ctx:
            raise self._error(
                model_ref,
                f"the {len(prompt)}-token prompt plus max_tokens={request.max_tokens} do not fit "
                f"n_ctx={self.n_ctx}; raise generation.num_ctx in the profile or lower max_new_tokens.",
            )
        grammar = self._grammar(llm, model_ref, request) if request.grammar or request.json_schema else None
        started = time.perf_counter()
        try:
            text, generated, finish_reason = complete_tokens(
                llm, prompt, request.max_tokens, request.temperature, request.seed, request.stop, grammar,
                prefix_tokens=self.shared_prefix(model_ref, request, prompt),
                grammar_fast_path=self.grammar_fast_path,
            )
        except (ValueError, RuntimeError) as exc:
            raise self._error(model_ref, f"generation failed: {exc}") from exc
        return GenerationResult(
            text=text,
            prompt_tokens=len(prompt),
            completion_tokens=generated,
            seconds=time.perf_counter() - started,
            finish_reason=finish_reason,
            backend=self.backend_name,
            model=model_ref,
        )

    def _grammar(self, llm: Any, model_ref: str, request: GenerationRequest) -> Any:
        """A checked ``LlamaGrammar`` from the request's GBNF or JSON schema.

        llama-cpp-python defers parsing to the sampler, which crashes the process on a grammar llama.cpp
        cannot parse; the grammar is therefore parsed once here and refused with a message instead.
        """
        import json

        import llama_cpp
        from llama_cpp import LlamaGrammar

        if request.grammar:
            grammar = LlamaGrammar.from_string(request.grammar, verbose=False)
        else:
            try:
                grammar = LlamaGrammar.from_json_schema(json.dumps(request.json_schema), verbose=False)
            except (ValueError, TypeError, KeyError) as exc:
                raise self._error(model_ref, f"the JSON schema cannot become a grammar: {exc}") from exc
        sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not sampler:
            raise self._error(
                model_ref, "the GBNF grammar does not parse (llama.cpp rejected it); check its rules"
            )
        llama_cpp.llama_sampler_free(sampler)
        return grammar

    def tokenize(self, model_ref: str, text: str) -> list[int]:
        """Token ids of ``text`` without BOS, special markers parsed (as HF's ``add_special_tokens=False``)."""
        return list(self.load(model_ref).tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def score(self, model_ref: str, sequences: Sequence[ScoringSequence]) -> list[SequenceNll]:
        """Answer-token NLL of each sequence from llama.cpp's logits (all positions)."""
        import numpy as np

        longest = max((len(sequence.ids) for sequence in sequences), default=0)
        if longest > self.n_ctx:
            raise self._error(
                model_ref, f"a scored sequence has {longest} tokens, more than n_ctx={self.n_ctx}"
            )
        llm = self.load(model_ref, logits_all=True)
        results = []
        with exclusive(llm):
            for sequence in sequences:
                llm.reset()
                llm.eval(list(sequence.ids))
                logits = np.asarray(llm.scores[: len(sequence.ids)], dtype=np.float32)
                results.append(answer_token_nll(logits, sequence))
        return results

    def deploy(self, request: DeploymentRequest) -> Deployment:
        if request.gguf_path is None:
            return TransformersBackend(quantization="nf4").deploy(request)
        self.check_chat_template(str(request.gguf_path))
        from jpslm_assets.resources.llama_cpp_tools import tensor_type_counts

        types = tensor_type_counts(request.gguf_path)
        return Deployment(
            backend=self.backend_name,
            model_ref=str(request.gguf_path),
            served_name=request.served_name,
            quantization=request.format,
            status="ok",
            detail=f"embedded llama.cpp loads {request.gguf_path.name} ({_describe_types(types)})",
        )


def _token_text(llm: Any, token: int) -> str:
    if token is None or token < 0:
        return ""
    return llm._model.token_get_text(token)


def _check_gguf_chat_template(
    backend: GenerationBackend, model_ref: str, template: str | None, bos: str, eos: str
) -> None:
    """A GGUF's chat template must exist and lay out turns the way answering expects (``chat_turns``); the
    error names the file and the fix."""
    if not template:
        raise backend._error(
            model_ref,
            "the GGUF carries no tokenizer.chat_template; re-export from a folder "
            "whose tokenizer has a chat template",
        )
    try:
        chat_turns(template, bos, eos, model_ref)
    except ChatTemplateError as exc:
        raise backend._error(model_ref, str(exc)) from exc


def complete_tokens(
    llm: Any,
    prompt: Sequence[int],
    max_tokens: int,
    temperature: float,
    seed: int,
    stop: Sequence[str] = (),
    grammar: Any = None,
    prefix_tokens: int | Sequence[int] = (),
    grammar_fast_path: bool = True,
) -> tuple[str, int, Literal["stop", "length"]]:
    """Generate after ``prompt`` until an end-of-generation token, a stop string or ``max_tokens``.

    ``prefix_tokens``: token counts (one, or several increasing) of shared prompt prefixes whose context states
    are restored from ``prompt_states`` (computed the first time) instead of being evaluated again; the rest of
    the prompt is evaluated as usual.

    Returns (text, generated token count, finish reason). Why not ``create_chat_completion``: llama-cpp-python
    skips its ``max_tokens`` check while the output ends inside a UTF-8 character, so a model that keeps
    emitting byte pieces runs past the limit until the context overflows. Here the limit is exact, and a
    character left incomplete at the limit is dropped from the text.

    Greedy decoding under a grammar asks the grammar about the chosen token only (``grammar_decoding``), as
    llama.cpp's own sampler does; ``grammar_fast_path=False`` runs llama-cpp-python's sampler chain instead,
    which applies the grammar to the whole vocabulary at every token (the same tokens, slower).
    """
    with exclusive(llm):
        return _complete_tokens(
            llm, prompt, max_tokens, temperature, seed, stop, grammar, prefix_tokens, grammar_fast_path
        )


def _complete_tokens(
    llm: Any,
    prompt: Sequence[int],
    max_tokens: int,
    temperature: float,
    seed: int,
    stop: Sequence[str],
    grammar: Any,
    prefix_tokens: int | Sequence[int],
    grammar_fast_path: bool,
) -> tuple[str, int, Literal["stop", "length"]]:
    import llama_cpp

    # Every request starts from an empty context, or from the state right after its shared prefix: never from
    # what the request before it left, so an answer cannot depend on the question asked before it.
    boundaries = [prefix_tokens] if isinstance(prefix_tokens, int) else list(prefix_tokens)
    prompt_states.restore(llm, prompt, [count for count in boundaries if count > 0])
    llm.set_seed(seed)
    vocab = llm._model.vocab
    generated: list[int] = []
    finish: Literal["stop", "length"] = "length"
    text = ""
    constrained: GrammarSampler | None = None
    if grammar is not None and temperature == 0.0 and grammar_fast_path:
        constrained = GrammarSampler(llm, grammar._grammar, grammar._root)
        tokens: Iterator[int] = greedy_tokens(llm, list(prompt[llm.n_tokens :]), constrained)
    else:
        # temperature 0 is llama.cpp's greedy sampler; otherwise llama-cpp-python's default sampling chain.
        tokens = llm.generate(
            list(prompt),
            temp=temperature,
            top_k=40,
            top_p=0.95,
            min_p=0.05,
            repeat_penalty=1.0,
            reset=True,
            grammar=grammar,
        )
    try:
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            generated.append(token)
            if stop:
                text = llm.detokenize(generated, prev_tokens=list(prompt)).decode("utf-8", errors="ignore")
                hits = [text.index(marker) for marker in stop if marker in text]
                if hits:
                    return text[: min(hits)], len(generated), "stop"
            if len(generated) >= max_tokens:
                break
    finally:
        close = getattr(tokens, "close", None)
        if callable(close):
            close()
        if constrained is not None:
            constrained.close()
    text = llm.detokenize(generated, prev_tokens=list(prompt)).decode("utf-8", errors="ignore")
    return text, len(generated), finish


def _describe_types(types: dict[str, int]) -> str:
    return ", ".join(f"{count} {name}" for name, count in types.items())


# ------------------------------------------------------------------------------------------------ Ollama


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


# ------------------------------------------------------------------------------------------ llama-server


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
        server: _LlamaServer = _LLAMA_SERVERS.get(key, lambda: self._start(path), self.max_servers)
        if not server.running():
            # Died since it started (killed, out of memory): report it now, and start afresh on the next call.
            _LLAMA_SERVERS.discard(key)
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
        _check_gguf_chat_template(self, model_ref, header.chat_template, header.bos_token, header.eos_token)
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
                f"{executable} serves {gguf.name} ({_describe_types(tensor_type_counts(gguf))}) with "
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


# ------------------------------------------------------------------------------------------ transformers


class TransformersBackend(GenerationBackend):
    """A Hugging Face folder in transformers, greedy; ``quantization='nf4'`` loads it with bitsandbytes."""

    backend_name: ClassVar[str] = "transformers"

    device: str = Field(default="auto", description="auto | cpu | cuda")
    quantization: Literal["none", "nf4"] = "none"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on CPU, bfloat16 on CUDA"
    )
    max_loaded_models: int = Field(default=1, gt=0)

    def _device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def availability(self) -> tuple[bool, str]:
        """NF4 needs bitsandbytes on CUDA; 16/32-bit loading works anywhere."""
        if self.quantization != "nf4":
            return True, "transformers loads the folder unquantized"
        import torch

        if not torch.cuda.is_available():
            return (
                False,
                "HF + bitsandbytes NF4 needs CUDA and torch.cuda.is_available() is False on this machine",
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            return False, f"bitsandbytes is not importable ({exc}); `pip install bitsandbytes`"
        return True, "HF + bitsandbytes NF4 on CUDA"

    def load(self, model_ref: str) -> tuple[Any, Any]:
        folder = Path(model_ref)
        if not (folder / "config.json").is_file():
            raise self._error(
                model_ref, "not a Hugging Face model folder (no config.json); materialize merged_model"
            )
        available, reason = self.availability()
        if not available:
            raise self._error(model_ref, reason)
        key = (
            str(folder.resolve()),
            (folder / "config.json").stat().st_mtime_ns,
            self.quantization,
            self.dtype,
        )

        def load() -> tuple[Any, Any]:
            import torch
            from transformers import AutoModelForCausalLM

            from jpslm_assets.resources.models import load_tokenizer

            device = self._device()
            kwargs: dict[str, Any] = {}
            if self.quantization == "nf4":
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                )
                kwargs["device_map"] = {"": 0}
            dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=getattr(torch, dtype), **kwargs
            )
            if self.quantization != "nf4":
                model = model.to(device)
            model.eval()
            return model, load_tokenizer(str(folder))

        return _HF_MODELS.get(key, load, self.max_loaded_models)

    def tokenizer(self, model_ref: str) -> Any:
        """The folder's tokenizer alone (no weights), cached."""
        folder = Path(model_ref)
        if not folder.is_dir():
            raise self._error(model_ref, "not a folder; materialize merged_model")
        key = (
            str(folder.resolve()),
            max((p.stat().st_mtime_ns for p in folder.glob("tokenizer*")), default=0),
        )

        def load() -> Any:
            from jpslm_assets.resources.models import load_tokenizer

            return load_tokenizer(str(folder))

        return _HF_TOKENIZERS.get(key, load, 4)

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        if request.grammar or request.json_schema is not None:
            raise self._error(
                model_ref, "constrained output (grammar / JSON schema) needs the llama_cpp or ollama backend"
            )
        import torch

        model, tokenizer = self.load(model_ref)
        if not tokenizer.chat_template:
            raise self._error(model_ref, "the tokenizer has no chat template; set one and re-materialize")
        encoded = tokenizer.apply_chat_template(
            list(request.messages), add_generation_prompt=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        kwargs: dict[str, Any] = {}
        if request.stop:
            kwargs.update(stop_strings=list(request.stop), tokenizer=tokenizer)
        if request.temperature > 0:
            torch.manual_seed(request.seed)
            kwargs.update(do_sample=True, temperature=request.temperature)
        else:
            kwargs.update(do_sample=False)
        prompt_tokens = int(encoded["input_ids"].shape[1])
        started = time.perf_counter()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            output = model.generate(
                **encoded, max_new_tokens=request.max_tokens, pad_token_id=pad_id, **kwargs
            )
        seconds = time.perf_counter() - started
        new_tokens = output[0, prompt_tokens:].tolist()
        eos_ids = model.generation_config.eos_token_id
        eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        for stop in request.stop:
            text = text.split(stop)[0]
        stopped = bool(new_tokens) and new_tokens[-1] in eos_ids
        hit_limit = len(new_tokens) >= request.max_tokens and not stopped
        return GenerationResult(
            text=text,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_tokens),
            seconds=seconds,
            finish_reason="length" if hit_limit else "stop",
            backend=self.backend_name,
            model=model_ref,
            extra={"quantization": self.quantization},
        )

    def score(self, model_ref: str, sequences: Sequence[ScoringSequence]) -> list[SequenceNll]:
        """Answer-token NLL of each sequence from the HF model's logits."""
        import torch

        model, _ = self.load(model_ref)
        results = []
        with torch.no_grad():
            for sequence in sequences:
                ids = torch.tensor([list(sequence.ids)], device=model.device)
                logits = model(input_ids=ids).logits[0].float().cpu().numpy()
                results.append(answer_token_nll(logits, sequence))
        return results

    def deploy(self, request: DeploymentRequest) -> Deployment:
        if request.hf_dir is None:
            raise self._error(request.served_name, "deploying with transformers needs the merged HF folder")
        if request.format not in ("f16", "nf4"):
            return Deployment(
                self.backend_name,
                str(request.hf_dir),
                request.served_name,
                request.format,
                "unavailable",
                f"{request.format} is a llama.cpp format; serve it with the llama_cpp or ollama backend",
            )
        # f16 here means the merged 16-bit HF folder itself; nf4 loads it 4-bit with bitsandbytes.
        backend = (
            self if request.format != "nf4" else TransformersBackend(quantization="nf4", device=self.device)
        )
        available, reason = backend.availability()
        return Deployment(
            backend=self.backend_name,
            model_ref=str(request.hf_dir),
            served_name=request.served_name,
            quantization="nf4" if request.format == "nf4" else "16bit",
            status="ok" if available else "unavailable",
            detail=reason,
        )


# --------------------------------------------------------------------------------------------- choosing


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
