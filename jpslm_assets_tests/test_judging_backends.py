"""The judge on real backends: embedded llama.cpp with the packaged SmolLM2-135M GGUF (GBNF grammar), and
the Ollama path (JSON-schema ``format``) against the local Ollama stand-in serving the same GGUF."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jpslm_assets.judging import assets as judging
from jpslm_assets.judging import rubric as rubric_lib
from jpslm_assets.judging import scoring as judge_lib
from jpslm_assets.resources.generation_ollama import OllamaBackend
from jpslm_assets.settings import load_profile
from jpslm_assets_tests.fake_ollama import FakeOllama

RUBRIC = rubric_lib.load_rubric()
ITEMS = [
    rubric_lib.JudgeItem(
        question_id="TS-001",
        category="Survey",
        question="雨量計を流域にどれくらいの密度で置くかは、どう決めるか。",
        reference_answer="流域の面積、地形の起伏、降雨の偏りを考えて決める。出典：「調査編 第2章 第1節」。",
        location="調査編 > 第2章 水文・水理観測 > 第1節 雨量・水位観測",
        answer="流域の面積と地形に応じて密度を決めます（調査編第2章）。",
    ),
    rubric_lib.JudgeItem(
        question_id="TS-002",
        category="Design",
        question="堤防の天端幅は何で決まるか。",
        reference_answer="計画高水流量に応じて定め、管理用通路としての利用も考える。出典：「設計編 第3章」。",
        location="設計編 > 第3章 河川構造物の設計 > 第1節 堤防",
        answer="わかりません。",
    ),
]


def test_embedded_llama_cpp_judge_with_packaged_smollm2_gives_parseable_scores(data_dir: Path) -> None:
    judge = judging.judge_resource_for(load_profile("demo"))
    settings = judge.settings(RUBRIC)
    model_ref = judge.model_ref()
    frame = judge_lib.judge_answers(
        ITEMS, lambda request: judge.generate(model_ref, request), RUBRIC, settings
    )
    assert frame["parse_ok"].to_list() == [True, True]
    assert set(frame["score"].to_list()) <= {0, 1, 2, 3}
    assert frame["attempts"].to_list() == [1, 1]  # the grammar makes the first reply parse
    for raw in frame["raw_output"]:
        reply = json.loads(raw)
        assert (
            set(reply) == {"score", "reason"}
            and 1 <= len(reply["reason"]) <= RUBRIC.generation.reason_max_chars
        )
    assert frame["judge"].unique().to_list() == ["smollm2-135m/llama_cpp/en"]


@pytest.fixture
def fake_ollama_judge(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeOllama]:
    """The Ollama stand-in serving the SmolLM2 GGUF under the paper judge's name."""
    with FakeOllama(tmp_path / "ollama") as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        demo_judge = judging.judge_resource_for(load_profile("demo"))
        gguf = Path(demo_judge.model_copy(update={"embedded_weights": "source"}).model_ref())
        with OllamaBackend().client() as client:
            digest = client.create_blob(gguf)
            client.create(model="qwen2.5:14b", files={gguf.name: digest}, stream=False)
        yield server


def test_ollama_judge_sends_the_json_schema_and_parses_replies(fake_ollama_judge: FakeOllama) -> None:
    judge = judging.judge_resource_for(load_profile("paper"))
    settings = judge.settings(RUBRIC, max_answer_chars=200)
    assert (settings.backend, settings.language, settings.constraint) == ("ollama", "ja", "json_schema")
    model_ref = judge.model_ref()
    frame = judge_lib.judge_answers(
        ITEMS[:1], lambda request: judge.generate(model_ref, request), RUBRIC, settings
    )
    chats = [r for r in fake_ollama_judge.requests if r.path == "/api/chat"]
    assert chats and chats[0].body["model"] == "qwen2.5:14b"
    assert chats[0].body["format"] == rubric_lib.judge_json_schema(RUBRIC)
    assert chats[0].body["options"]["temperature"] == 0.0
    assert chats[0].body["options"]["num_predict"] == settings.max_tokens
    assert "候補回答" in chats[0].body["messages"][1]["content"]
    row = frame.row(0, named=True)
    # A reply that the schema-constrained server still could not finish is stored unparsed, never as 0.
    assert (row["parse_ok"] and row["score"] in {0, 1, 2, 3}) or (
        not row["parse_ok"] and row["score"] is None
    )
    assert row["judge"] == "qwen2.5:14b/ollama/ja"


def test_a_judge_server_that_accepts_and_never_answers_fails_within_a_minute(
    fake_ollama_judge: FakeOllama, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paper profile's judge against a server that accepts every request and stays silent: the asset's
    error comes after one first-byte timeout (45 s by default), not after retries x the total timeout."""
    monkeypatch.setenv("JPSLM_GENERATION__FIRST_BYTE_TIMEOUT_S", "2")
    judge = judging.judge_resource_for(load_profile("paper"))
    assert judge.generation.first_byte_timeout_s == 2.0  # type: ignore[attr-defined]
    assert load_profile("paper").generation.first_byte_timeout_s == 2.0
    monkeypatch.delenv("JPSLM_GENERATION__FIRST_BYTE_TIMEOUT_S")
    assert load_profile("paper").generation.first_byte_timeout_s == 45.0, "the default detects it within a minute"
    settings = judge.settings(RUBRIC, max_answer_chars=200)
    fake_ollama_judge.delay_s = 6.0
    started = time.monotonic()
    with pytest.raises(rubric_lib.JudgeBackendError, match=r"\(attempt 1\).*sent nothing within first_byte_timeout_s=2 s"):
        judge_lib.judge_answers(ITEMS[:2], lambda request: judge.generate("qwen2.5:14b", request), RUBRIC, settings)
    assert time.monotonic() - started < 6.0
    assert len([r for r in fake_ollama_judge.requests if r.path == "/api/chat"]) == 1


def test_ollama_judge_without_the_model_fails_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOllama(tmp_path / "empty") as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        judge = judging.judge_resource_for(load_profile("paper"))
        settings = judge.settings(RUBRIC)
        with pytest.raises(
            rubric_lib.JudgeBackendError, match=r"does not know this model.*no scores were written"
        ):
            judge_lib.judge_one(
                ITEMS[0], lambda request: judge.generate("qwen2.5:14b", request), RUBRIC, settings
            )


@pytest.mark.live_ollama
def test_live_ollama_paper_judge() -> None:
    backend = OllamaBackend()
    reachable, reason = backend.reachable()
    if not reachable:
        pytest.skip(reason)
    with backend.client() as client:
        if "qwen2.5:14b" not in {m.model for m in client.list().models}:
            pytest.skip("the live Ollama server has no qwen2.5:14b; `ollama pull qwen2.5:14b`")
    judge = judging.judge_resource_for(load_profile("paper"))
    settings = judge.settings(RUBRIC)
    frame = judge_lib.judge_answers(
        ITEMS, lambda request: judge.generate("qwen2.5:14b", request), RUBRIC, settings
    )
    assert frame["parse_ok"].all()
    # The right, cited answer outscores "I don't know".
    assert frame["score"][0] > frame["score"][1]
