"""The three generation backends on a tiny real GGUF / HF folder, and the Ollama path against a local fake
server that speaks Ollama's documented HTTP API (``fake_ollama.py``)."""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jpslm_assets.common.generation_types import BackendUnavailable, GenerationError, GenerationRequest
from jpslm_assets.export.modelfile import build_modelfile, chat_turns, render_chat_template
from jpslm_assets.resources.generation import DeploymentRequest
from jpslm_assets.resources.generation_backends import backend_for, serving_backend
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_ollama import OllamaBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend
from jpslm_assets.resources.llama_cpp_tools import LlamaCppTools
from jpslm_assets.resources.loaded_models import release_loaded_models
from jpslm_assets_tests.export_fixtures import (
    CHATML,
    CHATML_WITHOUT_GENERATION_PROMPT,
    build_sentencepiece_base,
)
from jpslm_assets_tests.fake_ollama import FakeOllama

QUESTION = [{"role": "user", "content": "堤防の点検はいつ行うか。"}]


@dataclass
class Models:
    hf: Path
    gguf: Path
    q4: Path
    no_prompt_gguf: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Models]:
    root = tmp_path_factory.mktemp("generation")
    tools = LlamaCppTools(cache_dir=str(request.config.cache.mkdir("llama-cpp-converter")))
    hf = build_sentencepiece_base(root / "hf", chat_template=CHATML)
    overrides = {"tokenizer.ggml.add_space_prefix": False}
    gguf = tools.convert_hf_to_gguf(hf, root / "tiny-f16.gguf", metadata_overrides=overrides).path
    tools.quantize(gguf, root / "tiny-q4_k_m.gguf")
    no_prompt = build_sentencepiece_base(root / "no_prompt", chat_template=CHATML_WITHOUT_GENERATION_PROMPT)
    no_prompt_gguf = tools.convert_hf_to_gguf(no_prompt, root / "no-prompt.gguf").path
    yield Models(hf, gguf, root / "tiny-q4_k_m.gguf", no_prompt_gguf)
    release_loaded_models()


def _request(**changes: object) -> GenerationRequest:
    settings = {"messages": QUESTION, "max_tokens": 12, "temperature": 0.0, "seed": 42, "stop": ("<|im_end|>",)}
    return GenerationRequest(**{**settings, **changes})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- llama.cpp


def test_llama_cpp_is_deterministic_and_reports_tokens(models: Models) -> None:
    backend = LlamaCppBackend(n_ctx=512)
    first = backend.generate(str(models.gguf), _request())
    second = backend.generate(str(models.gguf), _request())
    assert first.text == second.text
    assert first.backend == "llama_cpp" and first.model == str(models.gguf)
    assert first.prompt_tokens > 5 and first.completion_tokens > 0 and first.seconds > 0
    quantized = backend.generate(str(models.q4), _request())
    assert quantized.completion_tokens > 0


def test_llama_cpp_threads_sharing_one_loaded_model_take_turns(models: Models) -> None:
    """One cached ``Llama`` used from several threads at once (a timed-out request still generating while the
    next one starts) used to crash the process inside llama.cpp's decode; now they take turns."""
    from concurrent.futures import ThreadPoolExecutor

    backend = LlamaCppBackend(n_ctx=512)
    serial = backend.generate(str(models.gguf), _request(max_tokens=24, stop=())).text
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: backend.generate(str(models.gguf), _request(max_tokens=24, stop=())),
                                range(8)))  # fmt: skip
    assert [answer.text for answer in answers] == [serial] * 8


def test_a_shared_system_prefix_is_computed_once_and_never_carries_over(models: Models) -> None:
    """The judge's system message is the same for every item: its state is computed once and restored, and
    each answer is the same whichever request came before it."""
    backend = LlamaCppBackend(n_ctx=512)
    system = {"role": "system", "content": "採点基準: 3 正確 2 概ね正しい 1 一部正しい 0 誤り"}
    questions = ["堤防の点検はいつ行うか。", "砂防堰堤の目的は何か。", "河川管理施設とは何か。"]

    def answers(order: list[int], shared: int) -> dict[int, str]:
        return {
            index: backend.generate(
                str(models.gguf),
                _request(messages=[system, {"role": "user", "content": questions[index]}], max_tokens=16,
                         stop=(), shared_prefix_messages=shared),
            ).text
            for index in order
        }  # fmt: skip

    request = _request(messages=[system, {"role": "user", "content": questions[0]}], shared_prefix_messages=1)
    prompt = backend.render_prompt(str(models.gguf), request.messages)
    (shared,) = backend.shared_prefix(str(models.gguf), request, prompt)
    assert 0 < shared < len(prompt)
    assert backend.shared_prefix(str(models.gguf), _request(shared_prefix_messages=1), prompt) == ()  # one message
    from jpslm_assets.resources import prompt_states

    prompt_states.clear()
    forward, backward = answers([0, 1, 2], 1), answers([2, 1, 0], 1)
    assert forward == backward
    assert prompt_states.stored() == [tuple(prompt[:shared])]


def test_answers_to_one_question_share_a_second_stored_state(models: Models) -> None:
    """The judge's user message repeats the question (and reference) for every answer to it: the state after
    that part is stored too, computed from the system state, and replies do not depend on which answer came
    first, nor on whether the states were already stored."""
    from jpslm_assets.resources import prompt_states

    backend = LlamaCppBackend(n_ctx=512)
    system = {"role": "system", "content": "採点基準: 3 正確 0 誤り"}
    head = "問題: 堤防の点検はいつ行うか。\n"
    candidates = ["回答: 毎年出水期の前に行う。", "回答: 必要に応じて行う。", "回答: 点検は不要である。"]

    def request(index: int):  # type: ignore[no-untyped-def]
        user = {"role": "user", "content": head + candidates[index]}
        return _request(messages=[system, user], max_tokens=12, stop=(), shared_prefix_messages=1,
                        shared_last_message_chars=len(head))  # fmt: skip

    prompt = backend.render_prompt(str(models.gguf), request(0).messages)
    first, second = backend.shared_prefix(str(models.gguf), request(0), prompt)
    assert 0 < first < second < len(prompt)
    prompt_states.clear()
    cold = [backend.generate(str(models.gguf), request(index)).text for index in (0, 1, 2)]
    assert prompt_states.stored() == [tuple(prompt[:first]), tuple(prompt[:second])]
    warm = [backend.generate(str(models.gguf), request(index)).text for index in (2, 1, 0)][::-1]
    assert cold == warm
    prompt_states.clear()
    alone = [backend.generate(str(models.gguf), request(index)).text for index in (1,)]
    assert alone == cold[1:2]


def test_gguf_header_is_read_once_per_file_version(models: Models, tmp_path: Path) -> None:
    """Export, deployment and serving each read a part of one GGUF header: one parse serves them all, and a
    file replaced under the same name is read again."""
    import shutil

    from jpslm_assets.resources import llama_cpp_tools as tools

    copy = tmp_path / "model.gguf"
    shutil.copy(models.gguf, copy)
    tools._read_header.cache_clear()
    f16_types = tools.tensor_type_counts(copy)
    assert "F16" in f16_types
    chat = tools.gguf_chat_metadata(copy)
    summary = tools.gguf_summary(copy)
    assert tools._read_header.cache_info().misses == 1 and tools._read_header.cache_info().hits >= 2
    assert chat.chat_template == CHATML and summary.tensors == sum(summary.tensor_types.values())
    shutil.copy(models.q4, copy)  # the same path, another file
    assert tools.tensor_type_counts(copy) != f16_types
    assert tools._read_header.cache_info().misses == 2


def test_transformers_gguf_loading_parses_each_file_once_and_restores_gguf_py(models: Models) -> None:
    import gguf

    from jpslm_assets.resources.models import _gguf_parsed_once

    original = gguf.GGUFReader
    with _gguf_parsed_once():
        from gguf import GGUFReader  # as transformers imports it, inside its loader

        first, second = GGUFReader(models.gguf), GGUFReader(str(models.gguf))
        assert first is second and len(first.tensors) > 0
        assert GGUFReader(models.q4) is not first
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original and gguf.GGUFReader(models.gguf) is not first


def test_llama_cpp_reports_length_when_max_tokens_is_hit(models: Models) -> None:
    result = LlamaCppBackend(n_ctx=512).generate(str(models.gguf), _request(max_tokens=2, stop=()))
    assert result.finish_reason == "length" and result.completion_tokens == 2


def test_llama_cpp_grammar_and_json_schema_constrain_the_output(models: Models) -> None:
    backend = LlamaCppBackend(n_ctx=512)
    digit = backend.generate(str(models.gguf), _request(grammar='root ::= [0-3]', max_tokens=4))
    assert digit.text in {"0", "1", "2", "3"}
    schema = {"type": "object", "properties": {"score": {"enum": [0, 1, 2, 3]}}, "required": ["score"]}
    structured = backend.generate(str(models.gguf), _request(json_schema=schema, max_tokens=40))
    assert json.loads(structured.text)["score"] in {0, 1, 2, 3}
    with pytest.raises(GenerationError, match="grammar does not parse"):
        backend.generate(str(models.gguf), _request(grammar="root ::= ["))


def test_grammar_fast_path_chooses_the_tokens_of_the_full_vocabulary_grammar(
    models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy decoding under a grammar checks the chosen token first and masks the whole vocabulary only when
    the grammar rejects it: the tokens are those of llama-cpp-python's grammar-over-everything sampler, for a
    grammar that rejects most greedy choices, one that accepts most, and after a restored shared prefix."""
    from jpslm_assets.resources import generation_llama_cpp, grammar_decoding

    backend = LlamaCppBackend(n_ctx=512)
    llm = backend.load(str(models.gguf))
    calls = {"checked": 0, "masked": 0}
    allows, best_allowed = grammar_decoding.GrammarSampler.allows, grammar_decoding.GrammarSampler.best_allowed

    def counted_allows(self, token):  # type: ignore[no-untyped-def]
        calls["checked"] += 1
        return allows(self, token)

    def counted_best_allowed(self, logits):  # type: ignore[no-untyped-def]
        calls["masked"] += 1
        return best_allowed(self, logits)

    monkeypatch.setattr(grammar_decoding.GrammarSampler, "allows", counted_allows)
    monkeypatch.setattr(grammar_decoding.GrammarSampler, "best_allowed", counted_best_allowed)
    grammars = {
        "strict": 'root ::= "{\\"score\\": " [0-3] ", \\"reason\\": \\"" [^"]{0,12} "\\"}"',
        "loose": "root ::= [^\\x00]{1,20}",
    }
    system = {"role": "system", "content": "採点基準: 3 正確 0 誤り"}
    for name, text in grammars.items():
        request = _request(grammar=text, max_tokens=40, stop=())
        grammar = backend._grammar(llm, str(models.gguf), request)
        for messages, shared in ((QUESTION, 0), ([system, *QUESTION], 1)):
            prompt = backend.render_prompt(str(models.gguf), messages)
            prefix = backend.shared_prefix(
                str(models.gguf), _request(messages=messages, shared_prefix_messages=shared), prompt
            )
            assert bool(prefix) == (shared > 0)
            fast = generation_llama_cpp.complete_tokens(
                llm, prompt, 40, 0.0, 42, (), grammar, prefix_tokens=prefix
            )
            full = generation_llama_cpp.complete_tokens(
                llm, prompt, 40, 0.0, 42, (), grammar, prefix_tokens=prefix, grammar_fast_path=False
            )
            assert fast == full, f"{name} grammar, shared prefix {prefix}"
            assert fast[1] > 0
    assert calls["masked"] > 0 and calls["checked"] > calls["masked"], calls


def test_forked_and_subprocess_conversions_write_the_same_gguf(
    models: Models, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The converter runs in a forked child of the step (inheriting torch and transformers) or in a new
    interpreter: the same GGUF byte for byte, and a converter failure is read from the child's log either way."""
    import gguf  # PyPI's gguf loaded here: the forked converter must still use the sdist's own

    from jpslm_assets.resources.llama_cpp_tools import ConversionFailed

    cache = str(request.config.cache.mkdir("llama-cpp-converter"))
    overrides = {"tokenizer.ggml.add_space_prefix": False}
    outputs = {}
    for isolation in ("fork", "subprocess"):
        tools = LlamaCppTools(cache_dir=cache, isolation=isolation)
        outputs[isolation] = tools.convert_hf_to_gguf(
            models.hf, tmp_path / f"{isolation}.gguf", metadata_overrides=overrides
        ).path.read_bytes()
    assert outputs["fork"] == outputs["subprocess"] == models.gguf.read_bytes()
    assert "gguf" in __import__("sys").modules and gguf.__name__ == "gguf"

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architectures": ["MadeUpForCausalLM"]}))
    for isolation in ("fork", "subprocess"):
        tools = LlamaCppTools(cache_dir=cache, isolation=isolation)
        with pytest.raises(ConversionFailed) as failed:
            tools.convert_hf_to_gguf(broken, tmp_path / f"broken-{isolation}.gguf")
        assert failed.value.kind == "unsupported_architecture", failed.value
        assert "MadeUpForCausalLM" in str(failed.value)
        assert not list(tmp_path.glob(f".broken-{isolation}.gguf.partial-*"))


def test_llama_cpp_names_missing_and_corrupt_files(models: Models, tmp_path: Path) -> None:
    backend = LlamaCppBackend(n_ctx=512)
    with pytest.raises(GenerationError, match="does not exist; materialize the gguf asset"):
        backend.generate(str(tmp_path / "absent.gguf"), _request())
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"PK\x03\x04 definitely not a model")
    with pytest.raises(GenerationError, match="is not a GGUF file"):
        backend.generate(str(garbage), _request())
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(models.gguf.read_bytes()[:100_000])
    with pytest.raises(GenerationError, match="llama.cpp cannot load it"):
        backend.generate(str(truncated), _request())


def test_llama_cpp_refuses_a_template_without_generation_prompt(models: Models) -> None:
    with pytest.raises(GenerationError, match="has no generation prompt"):
        LlamaCppBackend(n_ctx=512).generate(str(models.no_prompt_gguf), _request())


def test_llama_cpp_context_overflow_names_the_setting(models: Models) -> None:
    with pytest.raises(GenerationError, match=r"-token prompt plus max_tokens=60 do not fit n_ctx=64; raise gen"):
        LlamaCppBackend(n_ctx=64).generate(str(models.gguf), _request(max_tokens=60, stop=()))
    # Within the window the limit holds exactly, whatever the model emits (byte pieces included).
    result = LlamaCppBackend(n_ctx=64).generate(str(models.gguf), _request(max_tokens=30, stop=()))
    assert result.completion_tokens <= 30


# ------------------------------------------------------------------------------------------ transformers


def test_transformers_backend_is_greedy_and_reports_length(models: Models) -> None:
    backend = TransformersBackend()
    first = backend.generate(str(models.hf), _request(max_tokens=5, stop=()))
    second = backend.generate(str(models.hf), _request(max_tokens=5, stop=()))
    assert (first.text, first.completion_tokens) == (second.text, second.completion_tokens)
    assert first.completion_tokens <= 5 and first.backend == "transformers"
    if first.completion_tokens == 5:
        assert first.finish_reason == "length"
    with pytest.raises(GenerationError, match="constrained output"):
        backend.generate(str(models.hf), _request(grammar="root ::= [0-3]"))


def test_nf4_needs_cuda_and_says_so(models: Models) -> None:
    import torch

    available, reason = TransformersBackend(quantization="nf4").availability()
    assert available == torch.cuda.is_available()
    if not available:
        assert "CUDA" in reason
        with pytest.raises(GenerationError, match="needs CUDA"):
            TransformersBackend(quantization="nf4").generate(str(models.hf), _request())


def test_llama_cpp_and_transformers_agree_on_the_greedy_answer(models: Models) -> None:
    """Same weights (F16 GGUF of the same folder) and same prompt ids: greedy text must match."""
    request = _request(max_tokens=8, stop=())
    llama = LlamaCppBackend(n_ctx=512).generate(str(models.gguf), request)
    hf = TransformersBackend().generate(str(models.hf), request)
    assert llama.prompt_tokens == hf.prompt_tokens
    # A lone byte-fallback piece decodes to U+FFFD in transformers; llama.cpp holds such bytes back.
    assert llama.text == hf.text.replace("\ufffd", "")


# ------------------------------------------------------------------------------------ Ollama (fake)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeOllama]:
    with FakeOllama(tmp_path / "ollama") as server:
        yield server


def _spec(models: Models, num_predict: int = 12):
    return build_modelfile(
        CHATML, models.gguf.name, model="tiny", bos_token="<s>", eos_token="<|im_end|>", server_adds_bos=False,
        catalogue_stops=["<|im_end|>"], seed=42, temperature=0.0, num_ctx=512, num_predict=num_predict,
    )  # fmt: skip


def _deploy(models: Models, backend: OllamaBackend, name: str = "jpslm-tiny-n60:f16"):
    request = DeploymentRequest("tiny-llama", 60, "f16", name, gguf_path=models.gguf, hf_dir=models.hf,
                                modelfile=_spec(models))  # fmt: skip
    return backend.deploy(request)


def test_ollama_deploy_creates_the_model_from_the_modelfile(models: Models, fake: FakeOllama) -> None:
    backend = OllamaBackend(host=fake.url, num_ctx=512)
    deployment = _deploy(models, backend)
    assert deployment.backend == "ollama" and deployment.status == "ok"
    assert deployment.model_ref == "jpslm-tiny-n60:f16"
    create = next(r for r in fake.requests if r.path == "/api/create")
    assert create.body["files"] == {models.gguf.name: next(iter(fake.models.values())).digest}
    assert create.body["parameters"] == {"stop": ["<|im_end|>"], "seed": 42, "temperature": 0.0, "num_ctx": 512,
                                         "num_predict": 12}  # fmt: skip
    assert '{{ range .Messages }}' in create.body["template"]
    with backend.client() as client:
        shown = client.show("jpslm-tiny-n60:f16")
        assert "seed 42" in shown.parameters and [m.model for m in client.list().models] == ["jpslm-tiny-n60:f16"]


def test_ollama_generation_matches_embedded_llama_cpp(models: Models, fake: FakeOllama) -> None:
    backend = OllamaBackend(host=fake.url, num_ctx=512)
    _deploy(models, backend)
    conversation = [{"role": "system", "content": "河川の専門家として答える。"}, *QUESTION]
    request = _request(messages=conversation, max_tokens=10)
    via_ollama = backend.generate("jpslm-tiny-n60:f16", request)
    embedded = LlamaCppBackend(n_ctx=512).generate(str(models.gguf), request)
    chat = next(r for r in fake.requests if r.path == "/api/chat")
    assert chat.body["options"] == {"seed": 42, "temperature": 0.0, "num_ctx": 512, "num_predict": 10,
                                    "stop": ["<|im_end|>"]}  # fmt: skip
    assert chat.body["stream"] is True  # streamed: the first-byte timeout bounds the wait for a token
    assert via_ollama.prompt_tokens == embedded.prompt_tokens
    # The Modelfile's Go template lays the conversation out exactly as the model's own Jinja template.
    assert fake.last_prompt == render_chat_template(CHATML, conversation, True)
    assert via_ollama.text == embedded.text
    assert via_ollama.completion_tokens == embedded.completion_tokens
    assert via_ollama.backend == "ollama" and via_ollama.finish_reason in {"stop", "length"}


def test_ollama_reports_length_and_passes_json_schema(models: Models, fake: FakeOllama) -> None:
    backend = OllamaBackend(host=fake.url, num_ctx=512)
    _deploy(models, backend)
    assert backend.generate("jpslm-tiny-n60:f16", _request(max_tokens=2, stop=())).finish_reason == "length"
    schema = {"type": "object", "properties": {"score": {"enum": [0, 1, 2, 3]}}, "required": ["score"]}
    result = backend.generate("jpslm-tiny-n60:f16", _request(json_schema=schema, max_tokens=40))
    assert json.loads(result.text)["score"] in {0, 1, 2, 3}
    assert fake.requests[-1].body["format"] == schema
    with pytest.raises(GenerationError, match="not a GBNF grammar"):
        backend.generate("jpslm-tiny-n60:f16", _request(grammar="root ::= [0-3]"))


def test_ollama_errors_are_named(models: Models, fake: FakeOllama) -> None:
    backend = OllamaBackend(host=fake.url, num_ctx=512, timeout_s=1.0)
    with pytest.raises(GenerationError, match="does not know this model.*materialize the deployment"):
        backend.generate("never-created:latest", _request())
    _deploy(models, backend)
    fake.fail_next(500, "CUDA error: out of memory")
    with pytest.raises(GenerationError, match="answered HTTP 500: CUDA error: out of memory"):
        backend.generate("jpslm-tiny-n60:f16", _request())
    fake.delay_s = 2.0
    with pytest.raises(GenerationError, match="did not answer within timeout_s=1"):
        _deploy(models, backend, name="slow:f16")  # uploads wait timeout_s per read
    fake.delay_s = 0.0
    fake.fail_next(400, "invalid template", path="/api/create")
    with pytest.raises(GenerationError, match="HTTP 400: invalid template"):
        _deploy(models, backend, name="other:f16")
    # A server that answers, if with an error, is reachable: deploy must not quietly fall back to embedded.
    fake.fail_next(500, "disk full", path="/api/tags")
    reachable, reason = backend.reachable()
    assert reachable and "HTTP 500" in reason


def test_ollama_unreachable_fails_the_deployment_unless_a_fallback_is_configured(models: Models) -> None:
    backend = OllamaBackend(host="http://127.0.0.1:9", num_ctx=512, connect_timeout_s=1.0)
    reachable, reason = backend.reachable()
    assert not reachable and "unreachable" in reason and "127.0.0.1:9" in reason
    with pytest.raises(GenerationError, match="is unreachable; start `ollama serve`"):
        backend.generate("jpslm-tiny-n60:f16", _request())
    # Scores must come from the serving stack that was configured: no quiet swap to another backend.
    with pytest.raises(GenerationError, match=r"cannot deploy: .*127\.0\.0\.1:9.*generation\.fallback: llama_cpp"):
        _deploy(models, backend)
    backend = backend.model_copy(update={"fallback": "llama_cpp"})
    deployment = _deploy(models, backend)
    assert deployment.backend == "llama_cpp" and deployment.status == "ok"
    assert deployment.model_ref == str(models.gguf) and "embedded llama.cpp" in deployment.detail
    answered = serving_backend(backend, deployment).generate(deployment.model_ref, _request())
    assert answered.backend == "llama_cpp"


def test_host_comes_from_ollama_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "10.1.2.3:11434")
    assert OllamaBackend().resolved_host() == "http://10.1.2.3:11434"
    assert OllamaBackend(host="http://gpu-box:11434").resolved_host() == "http://gpu-box:11434"
    monkeypatch.delenv("OLLAMA_HOST")
    assert OllamaBackend().resolved_host() == "http://127.0.0.1:11434"


def test_backend_choice_follows_the_recorded_deployment() -> None:
    assert isinstance(backend_for("llama_cpp", 1024), LlamaCppBackend)
    assert backend_for("ollama", 2048).num_ctx == 2048  # type: ignore[attr-defined]
    with pytest.raises(GenerationError, match="not one of"):
        backend_for("vllm", 1024)
    ollama = OllamaBackend(num_ctx=4096)
    assert serving_backend(ollama, {"backend": "ollama", "quantization": "q4_k_m"}) is ollama
    embedded = serving_backend(ollama, {"backend": "llama_cpp", "quantization": "f16"})
    assert isinstance(embedded, LlamaCppBackend) and embedded.n_ctx == 4096
    nf4 = serving_backend(LlamaCppBackend(), {"backend": "transformers", "quantization": "nf4"})
    assert isinstance(nf4, TransformersBackend) and nf4.quantization == "nf4"


def test_chat_turns_of_the_fixture_template_have_a_system_role() -> None:
    turns = chat_turns(CHATML)
    assert turns.system_prefix == "<|im_start|>system\n" and turns.generation_prompt == "<|im_start|>assistant\n"


def test_ollama_timeouts_fit_the_call(models: Models, fake: FakeOllama) -> None:
    """Silent server: unavailable after the first-byte timeout, not the total one. Stalling mid-reply: cut
    after the same pause. A reply that keeps coming: cut at the total limit or the caller's deadline."""
    backend = OllamaBackend(host=fake.url, num_ctx=512, first_byte_timeout_s=1.0, timeout_s=30.0)
    _deploy(models, backend)
    normal = backend.generate("jpslm-tiny-n60:f16", _request(max_tokens=24, stop=()))
    assert normal.text and normal.extra["first_byte_s"] is not None

    fake.delay_s = 3.0  # accepts, says nothing
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"sent nothing within first_byte_timeout_s=1 s"):
        backend.generate("jpslm-tiny-n60:f16", _request())
    assert time.monotonic() - started < 3.0, "gave up after the first-byte timeout"
    fake.delay_s = 0.0

    fake.chunk_delay_s = 2.0  # starts, then stalls longer than the first-byte timeout between chunks
    with pytest.raises(GenerationError, match=r"stopped sending tokens for 1 s") as caught:
        backend.generate("jpslm-tiny-n60:f16", _request(max_tokens=24, stop=()))
    assert not isinstance(caught.value, BackendUnavailable)

    fake.chunk_delay_s = 0.4  # keeps coming, slowly
    slow = backend.model_copy(update={"timeout_s": 1.0})
    with pytest.raises(GenerationError, match=r"still generating after 1 s \(timeout_s=1\)"):
        slow.generate("jpslm-tiny-n60:f16", _request(max_tokens=24, stop=()))
    with pytest.raises(GenerationError, match=r"still generating after 0.5 s .*caller's deadline 0.5 s"):
        backend.generate("jpslm-tiny-n60:f16", _request(max_tokens=24, stop=(), deadline_s=0.5))
    fake.chunk_delay_s = 0.0
    assert backend.generate("jpslm-tiny-n60:f16", _request(max_tokens=24, stop=())).text == normal.text


def test_ollama_down_is_unavailable_within_the_connect_timeout() -> None:
    backend = OllamaBackend(host="http://127.0.0.1:9", num_ctx=512, connect_timeout_s=1.0)
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:9 is unreachable"):
        backend.generate("any:latest", _request())
