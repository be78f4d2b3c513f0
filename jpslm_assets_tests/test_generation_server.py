"""``LlamaServerBackend`` against a local fake of llama.cpp's server (``fake_llama_server.py``), and answering
many questions at once (``answer_questions`` and the answers asset) through the server's parallel slots."""

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from jpslm_assets.common.generation_types import GenerationError, GenerationRequest, GenerationResult
from jpslm_assets.export.answering import QuestionFailed, answer_questions, effective_concurrency
from jpslm_assets.export.assets_partition import stage3_metadata
from jpslm_assets.export.assets_serving import answers_f16
from jpslm_assets.export.tables import DEPLOYMENT_SCHEMA
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.partitions import stage3_partitions
from jpslm_assets.resources.generation import DeploymentRequest
from jpslm_assets.resources.generation_backends import backend_for, serving_backend
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_llama_server import LlamaServerBackend
from jpslm_assets.resources.generation_ollama import OllamaBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend
from jpslm_assets.resources.loaded_models import release_loaded_models
from jpslm_assets.settings import GenerationSettings
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.export_fixtures import (
    CHATML,
    CHATML_WITHOUT_GENERATION_PROMPT,
    fixture_test_set,
    materialize,
)

FAKE = Path(__file__).with_name("fake_llama_server.py")
SETTINGS = GenerationSettings(max_new_tokens=64, num_ctx=1024, temperature=0.0, seed=42)


@dataclass
class Fake:
    binary: Path
    state: Path

    def max_in_flight(self) -> int:
        return int((self.state / "max_in_flight").read_text())

    def requests(self) -> list[dict]:
        lines = (self.state / "requests.jsonl").read_text("utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def argv(self) -> list[str]:
        return json.loads((self.state / "argv.json").read_text())


def _executable(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fake]:
    state = tmp_path / "state"
    monkeypatch.setenv("FAKE_LLAMA_STATE_DIR", str(state))
    monkeypatch.setenv("FAKE_LLAMA_DELAY_S", "0.15")
    monkeypatch.setenv("FAKE_LLAMA_LOADING_S", "0.4")
    binary = _executable(tmp_path / "llama-server", f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    yield Fake(binary, state)
    release_loaded_models()


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """A file with GGUF's magic bytes: the fake server never reads the weights."""
    path = tmp_path / "model-f16.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def _request(text: str = "堤防の点検はいつ行うか。", **changes: object) -> GenerationRequest:
    values = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 64,
        "seed": 7,
        "stop": ("<|im_end|>",),
    }
    return GenerationRequest(**{**values, **changes})  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------------------------------ the backend


def test_starts_the_server_answers_reuses_it_and_release_stops_it(fake: Fake, gguf: Path) -> None:
    from jpslm_assets.resources.loaded_models import LLAMA_SERVERS

    backend = LlamaServerBackend(binary=str(fake.binary), parallel=3, n_ctx=512, n_gpu_layers=20)
    first = backend.generate(str(gguf), _request())
    assert first.text == "echo:堤防の点検はいつ行うか。" and first.finish_reason == "stop"
    assert first.completion_tokens == len(first.text) and first.prompt_tokens == len(
        "堤防の点検はいつ行うか。"
    )
    assert first.backend == "llama_server" and first.model == str(gguf) and first.seconds > 0
    assert fake.argv() == ["-m", str(gguf), "--host", "127.0.0.1", "--port", fake.argv()[5], "-np", "3",
                           "-c", "1536", "-ngl", "20", "--jinja"]  # fmt: skip
    [server] = list(LLAMA_SERVERS._models.values())
    second = backend.generate(str(gguf), _request("砂防堰堤の役割は何か。", max_tokens=4))
    assert second.text == "echo" and second.finish_reason == "length" and second.completion_tokens == 4
    assert list(LLAMA_SERVERS._models.values()) == [server]  # the same process answered both
    body = fake.requests()[-1]
    assert body["max_tokens"] == 4 and body["seed"] == 7 and body["temperature"] == 0.0
    assert body["stop"] == ["<|im_end|>"] and "grammar" not in body and "response_format" not in body
    pid = server.process.pid
    assert _alive(pid)
    release_loaded_models()
    assert server.process.poll() is not None and not _alive(pid)
    assert not LLAMA_SERVERS._models


def test_grammar_and_json_schema_reach_the_server(fake: Fake, gguf: Path) -> None:
    backend = LlamaServerBackend(binary=str(fake.binary))
    backend.generate(str(gguf), _request(grammar="root ::= [0-3]"))
    assert fake.requests()[-1]["grammar"] == "root ::= [0-3]"
    schema = {"type": "object", "properties": {"score": {"enum": [0, 1, 2, 3]}}, "required": ["score"]}
    backend.generate(str(gguf), _request(json_schema=schema))
    assert fake.requests()[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"schema": schema},
    }


def test_server_errors_name_the_cause(fake: Fake, gguf: Path, tmp_path: Path) -> None:
    backend = LlamaServerBackend(binary=str(fake.binary))
    with pytest.raises(GenerationError, match="answered HTTP 500: fake failure"):
        backend.generate(str(gguf), _request("FAIL here"))
    with pytest.raises(GenerationError, match="does not exist; materialize the gguf asset"):
        backend.generate(str(tmp_path / "absent.gguf"), _request())


def test_a_binary_that_exits_at_once_reports_its_log_tail(tmp_path: Path, gguf: Path) -> None:
    broken = _executable(
        tmp_path / "broken-server", "#!/bin/sh\necho 'error: invalid argument: --jinja' >&2\nexit 3\n"
    )
    backend = LlamaServerBackend(binary=str(broken), startup_timeout_s=20)
    started = time.monotonic()
    with pytest.raises(GenerationError, match=r"exited with code 3 while starting") as failure:
        backend.generate(str(gguf), _request())
    assert "error: invalid argument: --jinja" in str(failure.value)
    assert time.monotonic() - started < 10


def test_a_server_that_never_gets_healthy_times_out_with_its_log(fake: Fake, gguf: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_LLAMA_LOADING_S", "60")
    backend = LlamaServerBackend(binary=str(fake.binary), startup_timeout_s=1.5)
    with pytest.raises(GenerationError, match=r"not healthy within startup_timeout_s=2 s .*503") as failure:
        backend.generate(str(gguf), _request())
    assert "server is listening" in str(failure.value)


def _header_only_gguf(path: Path, chat_template: str) -> Path:
    """A small real GGUF (header, vocabulary, one tensor): what deploy reads without loading weights."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "<|im_end|>", "a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_binary_makes_deploy_unavailable_with_the_fix(tmp_path: Path, gguf: Path) -> None:
    converted = _header_only_gguf(tmp_path / "tiny-f16.gguf", CHATML)
    request = DeploymentRequest("tiny-llama", 60, "f16", "jpslm-tiny-llama-n60:f16", gguf_path=converted)
    missing = LlamaServerBackend(binary="no-such-llama-server-binary").deploy(request)
    assert missing.status == "unavailable" and missing.backend == "llama_server"
    assert "no-such-llama-server-binary" in missing.detail and "JPSLM_LLAMA_SERVER" in missing.detail
    assert "cmake -B build -DGGML_CUDA=ON" in missing.detail and "--target llama-server" in missing.detail
    with pytest.raises(GenerationError, match="no llama-server executable"):
        LlamaServerBackend(binary="no-such-llama-server-binary").generate(str(gguf), _request())
    fake_binary = _executable(tmp_path / "llama-server", "#!/bin/sh\nexit 0\n")
    found = LlamaServerBackend(binary=str(fake_binary), parallel=4).deploy(request)
    assert found.status == "ok" and found.model_ref == str(converted) and "4 slots" in found.detail
    assert "1 F16" in found.detail
    no_prompt = _header_only_gguf(tmp_path / "no-prompt.gguf", CHATML_WITHOUT_GENERATION_PROMPT)
    with pytest.raises(GenerationError, match="has no generation prompt"):
        LlamaServerBackend(binary=str(fake_binary)).deploy(
            DeploymentRequest("tiny-llama", 60, "f16", "x", gguf_path=no_prompt)
        )


def test_binary_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JPSLM_LLAMA_SERVER", "/opt/llama.cpp/build/bin/llama-server")
    assert LlamaServerBackend().resolved_binary() == "/opt/llama.cpp/build/bin/llama-server"
    assert LlamaServerBackend(binary="other").resolved_binary() == "other"
    monkeypatch.delenv("JPSLM_LLAMA_SERVER")
    assert LlamaServerBackend().resolved_binary() == "llama-server"


def test_backend_choice_and_concurrency_limits() -> None:
    server = backend_for("llama_server", 2048)
    assert isinstance(server, LlamaServerBackend) and server.n_ctx == 2048 and server.max_concurrency == 8
    assert LlamaServerBackend(parallel=3).max_concurrency == 3
    assert LlamaCppBackend().max_concurrency == 1 and TransformersBackend().max_concurrency == 1
    assert OllamaBackend().max_concurrency == 1 and OllamaBackend(parallel=4).max_concurrency == 4
    assert serving_backend(server, {"backend": "llama_server", "quantization": "q4_k_m"}) is server
    assert effective_concurrency(4, LlamaServerBackend(parallel=2)) == 2
    assert effective_concurrency(1, LlamaServerBackend(parallel=8)) == 1
    assert effective_concurrency(8, LlamaCppBackend()) == 1


# ------------------------------------------------------------------------------------ answer_questions


QUESTIONS = [{"question_id": f"Q{i:03d}", "question": f"質問{i}は何か。"} for i in range(1, 9)]


def test_concurrent_answers_keep_question_order(fake: Fake, gguf: Path) -> None:
    seen: list[str] = []
    answered = answer_questions(
        LlamaServerBackend(binary=str(fake.binary), parallel=4), str(gguf), QUESTIONS, SETTINGS, ("<|im_end|>",),
        concurrency=4, on_answer=lambda question, result: seen.append(question["question_id"]),
    )  # fmt: skip
    assert [result.text for result in answered.results] == [f"echo:{q['question']}" for q in QUESTIONS]
    assert sorted(seen) == [q["question_id"] for q in QUESTIONS]
    assert answered.concurrency == 4 and 1 < fake.max_in_flight() <= 4
    # Eight requests of 0.15 s, four at a time: well under the 1.2 s they take one after another.
    assert answered.wall_seconds < 8 * 0.15
    assert {body["max_tokens"] for body in fake.requests()} == {64}


def test_concurrency_one_never_overlaps(fake: Fake, gguf: Path) -> None:
    answered = answer_questions(
        LlamaServerBackend(binary=str(fake.binary), parallel=4),
        str(gguf),
        QUESTIONS[:4],
        SETTINGS,
        concurrency=1,
    )
    assert answered.concurrency == 1 and fake.max_in_flight() == 1
    assert [result.text for result in answered.results] == [f"echo:{q['question']}" for q in QUESTIONS[:4]]


def test_the_backend_caps_the_requested_concurrency(fake: Fake, gguf: Path) -> None:
    answered = answer_questions(
        LlamaServerBackend(binary=str(fake.binary), parallel=2), str(gguf), QUESTIONS, SETTINGS, concurrency=6
    )
    assert answered.concurrency == 2 and fake.max_in_flight() == 2


def test_a_failing_question_is_named_and_the_rest_cancelled(fake: Fake, gguf: Path) -> None:
    questions = [*QUESTIONS[:2], {"question_id": "Q-BAD", "question": "FAIL"}, *QUESTIONS[2:]]
    with pytest.raises(
        QuestionFailed, match=r"question Q-BAD \(\d+/9 answered so far\): .*HTTP 500"
    ) as failure:
        answer_questions(
            LlamaServerBackend(binary=str(fake.binary), parallel=2),
            str(gguf),
            questions,
            SETTINGS,
            concurrency=2,
        )
    assert failure.value.question_id == "Q-BAD"
    # Two workers: questions past the failure that had not started were never sent.
    assert len(fake.requests()) < len(questions)


class _Serial:
    """A backend that allows one request at a time and fails the test if two overlap."""

    max_concurrency = 1

    def __init__(self) -> None:
        self.active = 0
        self.calls = 0

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        self.active += 1
        self.calls += 1
        assert self.active == 1, "two requests overlapped on a backend with max_concurrency 1"
        time.sleep(0.01)
        self.active -= 1
        text = request.messages[-1]["content"]
        return GenerationResult(text, 1, 1, 0.01, "stop", "serial", model_ref)


def test_an_in_process_backend_gets_one_worker_whatever_is_asked() -> None:
    backend = _Serial()
    answered = answer_questions(backend, "m", QUESTIONS, SETTINGS, concurrency=8)
    assert answered.concurrency == 1 and backend.calls == len(QUESTIONS)
    assert [result.text for result in answered.results] == [q["question"] for q in QUESTIONS]


# ------------------------------------------------------------------------------------ the answers asset


def _deployment_asset(gguf: Path) -> dg.AssetsDefinition:
    @dg.asset(
        name="deployment",
        partitions_def=stage3_partitions(),
        metadata=stage3_metadata("serve.deployments"),
    )
    def deployment_stand_in(context: dg.AssetExecutionContext) -> pl.DataFrame:
        model, n = context.partition_key, 60
        return pl.DataFrame(
            [
                {
                    "adapter": model, "stage": 2, "model": model, "n": n, "format": "f16", "backend": "llama_server",
                    "served_name": f"jpslm-{model}-n{n}:f16", "model_ref": str(gguf), "quantization": "f16",
                    "modelfile_path": None, "status": "ok", "detail": "llama-server",
                }
            ],
            schema=DEPLOYMENT_SCHEMA,
        )  # fmt: skip

    return deployment_stand_in


def test_answers_asset_uses_the_smaller_of_profile_and_server_concurrency(
    fake: Fake, gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JPSLM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("JPSLM_DUCKDB_PATH", raising=False)
    monkeypatch.delenv("JPSLM_PROFILE", raising=False)
    monkeypatch.setenv("JPSLM_EVAL_QUESTIONS", "6")
    monkeypatch.setenv("JPSLM_GENERATION__CONCURRENCY", "4")
    store = DuckDBStore(path=str(tmp_path / "data" / "jpslm.duckdb"), lock_timeout_s=10)

    @dg.asset(name="test_set", metadata=table_metadata("qa.test_set"))
    def test_set_asset() -> pl.DataFrame:
        return fixture_test_set()

    assets = [test_set_asset, _deployment_asset(gguf), answers_f16]
    resources = {
        "store": store,
        "io_manager": DuckDBTableIOManager(store=store),
        "generation": LlamaServerBackend(binary=str(fake.binary), parallel=2),
    }
    materialize(assets, ["test_set"], resources)
    result = materialize(assets, ["deployment", "answers_f16"], resources, partition_key="tiny-llama")
    [event] = [
        e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "answers_f16"
    ]
    metadata = {key: value.value for key, value in event.materialization.metadata.items()}
    assert metadata["concurrency"] == 2 and metadata["questions"] == 6 and metadata["wall_seconds"] > 0
    assert fake.max_in_flight() == 2
    frame = store.query(
        "SELECT question_id, question, answer, backend FROM eval.answers ORDER BY question_id"
    )
    expected = fixture_test_set().filter(pl.col("human_written")).sort("question_id")
    assert frame["question_id"].to_list() == expected["question_id"].to_list()
    assert frame["answer"].to_list() == [f"echo:{question}"[:64] for question in expected["question"]]
    assert set(frame["backend"]) == {"llama_server"}
