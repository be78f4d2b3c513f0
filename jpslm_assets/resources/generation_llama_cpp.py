"""Embedded llama.cpp (llama-cpp-python) as a generation backend, and the token loop it decodes with.

``llama_cpp`` is imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from jpslm_assets.common.generation_types import GenerationRequest, GenerationResult
from jpslm_assets.export.fidelity import ScoringSequence, SequenceNll, answer_token_nll
from jpslm_assets.export.modelfile import ChatTemplateError, chat_turns
from jpslm_assets.resources import prompt_states
from jpslm_assets.resources.cpu import llama_cpp_thread_count
from jpslm_assets.resources.generation import Deployment, DeploymentRequest, GenerationBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend
from jpslm_assets.resources.grammar_decoding import GrammarSampler, greedy_tokens
from jpslm_assets.resources.llama_cpp_tools import LlamaCppToolError, check_gguf_file, file_identity
from jpslm_assets.resources.loaded_models import LLAMA_MODELS, exclusive


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

        return LLAMA_MODELS.get(key, load, self.max_loaded_models)

    def check_chat_template(self, model_ref: str) -> None:
        llm = self.load(model_ref)
        check_gguf_chat_template(
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
            detail=f"embedded llama.cpp loads {request.gguf_path.name} ({describe_tensor_types(types)})",
        )


def _token_text(llm: Any, token: int) -> str:
    if token is None or token < 0:
        return ""
    return llm._model.token_get_text(token)


def check_gguf_chat_template(
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


def describe_tensor_types(types: dict[str, int]) -> str:
    return ", ".join(f"{count} {name}" for name, count in types.items())
