"""Export stage end to end on tiny real models: merge -> GGUF F16 / Q4_K_M -> deployment -> answers.

The chain runs once per module (about a minute on two cores); each test then checks one promise of the stage.
Fault tests (refused conversion, template without generation prompt, missing/corrupt GGUF, killed export,
max tokens, bad input) use their own partitions of the same DuckDB file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from jpslm_assets.artifacts import artifact_record, file_sha256
from jpslm_assets.export.answering import select_eval_questions
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.export_fixtures import (
    CHATML_WITHOUT_GENERATION_PROMPT,
    EXPORT_ASSETS,
    build_byte_bpe_base,
    build_lora_adapter,
    build_sentencepiece_base,
    export_resources,
    fixture_test_set,
    materialize,
    prepare_upstream,
    train_run_row,
    upstream_assets,
)

GOOD = "tiny-llama"  # the happy path: tiny-llama's stage-2 adapter at n=60
REFUSED = "tiny-qwen2"  # byte-level BPE the converter refuses (the paper's Tanuki case)
NO_PROMPT = "smollm2-135m"  # chat template without a generation prompt
BROKEN_INPUT = "tiny-llama@stage1"  # the stage-1 run at n* = 40 lacks base_model_ref
ALL_EXPORT = [
    "merged_model", "gguf_f16", "gguf_q4_k_m", "deployment", "answers_f16", "answers_q4_k_m", "answers_nf4"
]  # fmt: skip


@dataclass
class Chain:
    root: Path
    store: DuckDBStore
    assets: list
    resources: dict
    base: Path
    results: dict
    instance: dg.DagsterInstance


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("export_chain")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JPSLM_DATA_DIR", str(root / "data"))
        patch.delenv("JPSLM_DUCKDB_PATH", raising=False)
        patch.delenv("JPSLM_PROFILE", raising=False)
        patch.setenv("JPSLM_EVAL_QUESTIONS", "4")
        patch.setenv("JPSLM_GENERATION__MAX_NEW_TOKENS", "24")
        base = build_sentencepiece_base(root / "bases" / "sp")
        bpe = build_byte_bpe_base(root / "bases" / "bpe")
        no_prompt = build_sentencepiece_base(root / "bases" / "no_prompt", chat_template=CHATML_WITHOUT_GENERATION_PROMPT)
        runs = {
            GOOD: train_run_row("tiny-llama", 60, base, build_lora_adapter(base, root / "adapters" / "good")),
            REFUSED: train_run_row("tiny-qwen2", 60, bpe, build_lora_adapter(bpe, root / "adapters" / "bpe")),
            NO_PROMPT: train_run_row(
                "smollm2-135m", 60, no_prompt, build_lora_adapter(no_prompt, root / "adapters" / "no_prompt")
            ),
            BROKEN_INPUT: {**train_run_row("tiny-llama", 40, base, root / "adapters" / "good"), "base_model_ref": None},
        }
        store = DuckDBStore(path=str(root / "data" / "jpslm.duckdb"), lock_timeout_s=10)
        assets = [*upstream_assets(runs, fixture_test_set()), *EXPORT_ASSETS]
        resources = export_resources(store, Path(request.config.cache.mkdir("llama-cpp-converter")))
        prepare_upstream(assets, resources, runs)
        instance = dg.DagsterInstance.ephemeral()
        good = materialize(assets, ALL_EXPORT, resources, partition_key=GOOD, instance=instance)
        yield Chain(root, store, assets, resources, base, {GOOD: good}, instance)


def _row(store: DuckDBStore, sql: str, *params: object) -> dict:
    frame = store.query(sql, list(params))
    assert frame.height == 1, frame
    return frame.row(0, named=True)


def _metadata(result, asset: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset]
    return {key: value.value for key, value in event.materialization.metadata.items()}


# ----------------------------------------------------------------------------------------- happy path


def test_merged_model_is_a_complete_16bit_folder_that_differs_from_the_base(chain: Chain) -> None:
    import torch
    from safetensors.torch import load_file

    row = _row(chain.store, "SELECT * FROM serve.merged_models WHERE model='tiny-llama' AND n=60")
    folder = Path(row["artifact_path"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    assert config["added_tokens_decoder"]["5"]["content"] == "<|im_end|>"
    assert "add_generation_prompt" in config["chat_template"]
    assert row["dtype"] == "float16" and row["has_chat_template"]
    assert artifact_record(folder)["artifact_sha256"] == row["artifact_sha256"]
    merged = load_file(folder / "model.safetensors")
    base = load_file(chain.base / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged[name].dtype == torch.float16
    assert not torch.allclose(merged[name].float(), base[name].float(), atol=1e-3), "the adapter was not merged"
    assert not any(key.endswith(("lora_A.weight", "lora_B.weight")) for key in merged)


def test_gguf_f16_and_q4_k_m_exist_with_fidelity(chain: Chain) -> None:
    frame = chain.store.query("SELECT * FROM serve.gguf WHERE model='tiny-llama' AND n=60 ORDER BY format")
    rows = {row["format"]: row for row in frame.iter_rows(named=True)}
    assert set(rows) == {"f16", "q4_k_m"}
    f16, q4 = rows["f16"], rows["q4_k_m"]
    for row in (f16, q4):
        assert row["status"] == "ok"
        path = Path(row["artifact_path"])
        assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size == row["artifact_bytes"]
        assert file_sha256(path) == row["artifact_sha256"]
        assert row["tokenizer_agreement"] == 1.0, row["tokenizer_first_mismatch"]
        assert row["tokenizer_texts"] == fixture_test_set().height
        assert row["fidelity_questions"] == 4 and row["answer_tokens"] > 20
    assert json.loads(f16["tensor_types"]).keys() == {"F16", "F32"}
    assert "Q4_K" in json.loads(q4["tensor_types"])
    assert f16["kquant_compatible"]
    assert q4["artifact_bytes"] <= 0.40 * f16["artifact_bytes"]
    assert q4["size_ratio_to_f16"] == pytest.approx(q4["artifact_bytes"] / f16["artifact_bytes"])
    assert f16["nll_rel_diff"] <= 0.01, (f16["hf_nll"], f16["gguf_nll"])
    assert q4["hf_nll"] == f16["hf_nll"]  # the HF reference is measured once
    assert q4["gguf_nll"] != f16["gguf_nll"]  # quantization moved the weights


def test_gguf_asset_checks_pass_and_metadata_is_recorded(chain: Chain) -> None:
    result = chain.results[GOOD]
    evaluations = {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}
    for key in [("gguf_f16", "converted"), ("gguf_f16", "tokenizer_matches_hf"), ("gguf_f16", "nll_within_1pct_of_hf"),
                ("gguf_q4_k_m", "converted"), ("gguf_q4_k_m", "tokenizer_matches_hf"),
                ("gguf_q4_k_m", "size_at_most_40pct_of_f16")]:  # fmt: skip
        assert evaluations[key].passed, key
    metadata = _metadata(result, "gguf_q4_k_m")
    assert metadata["tensor_types"]["Q4_K"] > 0 and metadata["bytes"] > 0 and len(metadata["sha256"]) == 64


def test_deployment_writes_reproducible_modelfiles_and_embedded_llama_cpp(chain: Chain) -> None:
    frame = chain.store.query("SELECT * FROM serve.deployments WHERE model='tiny-llama' AND n=60 ORDER BY format")
    assert frame["format"].to_list() == ["f16", "q4_k_m"]
    for row in frame.iter_rows(named=True):
        assert row["backend"] == "llama_cpp" and row["status"] == "ok"
        assert row["served_name"] == f"jpslm-tiny-llama-n60:{row['format']}"
        text = Path(row["modelfile_path"]).read_text("utf-8")
        assert f"FROM ./tiny-llama-n60-{row['format']}.gguf" in text
        assert 'PARAMETER stop "<|im_end|>"' in text
        assert "PARAMETER seed 42" in text and "PARAMETER temperature 0" in text
        assert "PARAMETER num_ctx 1024" in text and "PARAMETER num_predict 24" in text
        assert '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in text
        assert "<s>" not in text  # ChatML writes no BOS; nothing is doubled
        assert (Path(row["modelfile_path"]).parent / f"tiny-llama-n60-{row['format']}.gguf").is_file()


def test_answers_cover_the_eval_questions_for_both_formats(chain: Chain) -> None:
    frame = chain.store.query("SELECT * FROM eval.answers WHERE model='tiny-llama' AND n=60 ORDER BY format, question_id")
    assert frame.group_by("format").len().sort("format")["len"].to_list() == [4, 4]
    expected = select_eval_questions(fixture_test_set(), 4)["question_id"].to_list()
    assert frame.filter(pl.col("format") == "f16")["question_id"].to_list() == expected
    assert set(frame["backend"]) == {"llama_cpp"}
    assert set(frame["finish_reason"]) <= {"stop", "length"}
    assert (frame["tokens"] > 0).all() and (frame["seconds"] > 0).all()
    assert (frame["chars"] == frame["answer"].str.len_chars()).all()
    assert set(frame["quantization"]) == {"f16", "q4_k_m"}
    assert (frame["seed"] == 42).all() and (frame["temperature"] == 0.0).all() and (frame["max_new_tokens"] == 24).all()
    metadata = _metadata(chain.results[GOOD], "answers_q4_k_m")
    assert metadata["questions"] == 4 and metadata["sec_per_question"] > 0 and metadata["answering_items"] == 4


def test_answers_are_deterministic_and_lineage_links_them_to_the_deployment(chain: Chain) -> None:
    before = chain.store.query("SELECT question_id, answer FROM eval.answers WHERE model='tiny-llama' AND format='f16' ORDER BY 1")
    materialize(chain.assets, ["answers_f16"], chain.resources, partition_key=GOOD)
    after = chain.store.query("SELECT question_id, answer FROM eval.answers WHERE model='tiny-llama' AND format='f16' ORDER BY 1")
    assert before.equals(after)
    inputs = chain.store.query(
        "SELECT DISTINCT upstream_asset_key FROM lineage.inputs WHERE asset_key='answers_f16' AND partition_key=?",
        [GOOD],
    )
    assert set(inputs["upstream_asset_key"]) == {"deployment", "test_set"}


def test_run_log_reports_progress_with_eta(chain: Chain) -> None:
    logs = chain.instance.all_logs(chain.results[GOOD].run_id)
    messages = [entry.user_message for entry in logs if "answers_f16 tiny-llama" in entry.user_message]
    assert any("1/4 questions" in message and "ETA" in message for message in messages), messages
    assert any("finished 4/4 questions" in message for message in messages), messages


# ------------------------------------------------------------------------------------- faults, input


def test_max_tokens_is_reported_as_length(chain: Chain, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JPSLM_GENERATION__MAX_NEW_TOKENS", "3")
    result = materialize(chain.assets, ["answers_f16"], chain.resources, partition_key=GOOD)
    frame = chain.store.query("SELECT * FROM eval.answers WHERE model='tiny-llama' AND n=60 AND format='f16'")
    assert set(frame["finish_reason"]) == {"length"} and set(frame["tokens"]) == {3}
    assert _metadata(result, "answers_f16")["hit_max_tokens"] == 4
    monkeypatch.setenv("JPSLM_GENERATION__MAX_NEW_TOKENS", "24")
    materialize(chain.assets, ["answers_f16"], chain.resources, partition_key=GOOD)


def test_refused_conversion_is_recorded_with_the_nf4_fallback(chain: Chain) -> None:
    result = materialize(chain.assets, ALL_EXPORT, chain.resources, partition_key=REFUSED)
    assert result.success
    gguf = chain.store.query("SELECT * FROM serve.gguf WHERE model='tiny-qwen2' AND n=60 ORDER BY format")
    rows = {row["format"]: row for row in gguf.iter_rows(named=True)}
    assert rows["f16"]["status"] == "failed" and rows["f16"]["failure_kind"] == "unknown_tokenizer"
    assert "pre-tokenizer was not recognized" in rows["f16"]["failure_reason"]
    assert rows["q4_k_m"]["status"] == "failed" and "no F16 GGUF" in rows["q4_k_m"]["failure_reason"]
    assert rows["f16"]["artifact_path"] is None
    import torch

    expected = "ok" if torch.cuda.is_available() else "unavailable"
    assert rows["nf4"]["status"] == expected and "GGUF conversion failed" in rows["nf4"]["failure_reason"]
    deployments = chain.store.query("SELECT * FROM serve.deployments WHERE model='tiny-qwen2' ORDER BY format")
    by_format = {row["format"]: row for row in deployments.iter_rows(named=True)}
    assert sorted(by_format) == ["f16", "nf4", "q4_k_m"]
    # The fallback is served and scored as nf4, never under the GGUF format it replaces.
    nf4 = by_format["nf4"]
    assert nf4["backend"] == "transformers" and nf4["quantization"] == "nf4" and nf4["status"] == expected
    assert by_format["f16"]["status"] == by_format["q4_k_m"]["status"] == "unavailable"
    assert "no f16 GGUF" in by_format["f16"]["detail"]
    assert _metadata(result, "answers_f16")["status"] == "unavailable"
    if expected == "unavailable":
        answers = chain.store.query("SELECT count(*) AS c FROM eval.answers WHERE model='tiny-qwen2'")
        assert answers["c"][0] == 0
        assert _metadata(result, "answers_nf4")["status"] == "unavailable"
    else:
        answers = chain.store.query("SELECT DISTINCT format FROM eval.answers WHERE model='tiny-qwen2'")
        assert answers["format"].to_list() == ["nf4"]
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations() if e.asset_key.path == ["gguf_f16"]}
    assert checks["converted"] is False


def test_template_without_generation_prompt_fails_deployment_with_the_fix(chain: Chain) -> None:
    result = materialize(
        chain.assets, ["merged_model", "gguf_f16", "gguf_q4_k_m", "deployment"], chain.resources,
        partition_key=NO_PROMPT, raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = failure.step_failure_data.error.message
    assert "has no generation prompt" in message and "add_generation_prompt" in message
    assert chain.store.query("SELECT count(*) AS c FROM serve.deployments WHERE model='smollm2-135m'")["c"][0] == 0


def test_bad_train_run_row_names_the_missing_column(chain: Chain) -> None:
    result = materialize(chain.assets, ["merged_model"], chain.resources,
                         partition_key=BROKEN_INPUT, raise_on_error=False)  # fmt: skip
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    # The @stage1 partition exports the reference model's stage-1 adapter at n* (40 in the fixture).
    message = failure.step_failure_data.error.message
    assert "the stage-1 run of tiny-llama at n=40 has no base_model_ref; re-materialize its adapter" in message


def test_a_gguf_model_has_no_nf4_answers(chain: Chain) -> None:
    assert _metadata(chain.results[GOOD], "answers_nf4")["status"] == "not applicable"
    rows = chain.store.query("SELECT count(*) AS c FROM eval.answers WHERE adapter = ? AND format = 'nf4'", [GOOD])
    assert rows["c"][0] == 0


def _answers_failure(chain: Chain) -> str:
    result = materialize(chain.assets, ["answers_f16"], chain.resources, partition_key=GOOD, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return failure.step_failure_data.error.message


def test_missing_or_corrupt_gguf_fails_answers_and_keeps_previous_answers(chain: Chain) -> None:
    row = _row(chain.store, "SELECT * FROM serve.gguf WHERE model='tiny-llama' AND n=60 AND format='f16'")
    path = Path(row["artifact_path"])
    backup = path.with_name("backup.gguf")
    before = chain.store.query("SELECT count(*) AS c FROM eval.answers WHERE model='tiny-llama' AND format='f16'")
    from jpslm_assets.resources.loaded_models import release_loaded_models

    release_loaded_models()
    os.replace(path, backup)
    try:
        message = _answers_failure(chain)
        assert "question T001" in message and "does not exist" in message and str(path) in message
        path.write_bytes(b"not a gguf at all")
        assert "is not a GGUF file" in _answers_failure(chain)
        path.write_bytes(backup.read_bytes()[: 200_000])  # the right magic, but truncated
        assert "llama.cpp cannot load it" in _answers_failure(chain)
    finally:
        os.replace(backup, path)
    after = chain.store.query("SELECT count(*) AS c FROM eval.answers WHERE model='tiny-llama' AND format='f16'")
    assert after["c"][0] == before["c"][0] == 4  # a failed run never removes what was there


def test_export_killed_half_way_never_registers_a_torn_file(chain: Chain) -> None:
    row = _row(chain.store, "SELECT * FROM serve.gguf WHERE model='tiny-llama' AND n=60 AND format='f16'")
    target = Path(row["artifact_path"])
    merged = _row(chain.store, "SELECT artifact_path FROM serve.merged_models WHERE model='tiny-llama' AND n=60")
    cache = chain.resources["llama_cpp_tools"].cache_dir
    script = (
        "import sys; from pathlib import Path; from jpslm_assets.resources.llama_cpp_tools import LlamaCppTools;"
        f"LlamaCppTools(cache_dir={cache!r}).convert_hf_to_gguf(Path({merged['artifact_path']!r}), Path({str(target)!r}))"
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 120
    # Kill the export (its whole process group, converter included) while the converter writes the GGUF.
    while time.monotonic() < deadline and not list(target.parent.glob(f".{target.name}.partial-*")):
        time.sleep(0.0005)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the export finished before it could be killed"
    assert file_sha256(target) == row["artifact_sha256"], "the registered GGUF was overwritten by a torn file"
    # The next materialization cleans the leftovers and succeeds.
    result = materialize(chain.assets, ["gguf_f16"], chain.resources, partition_key=GOOD)
    assert result.success
    assert not list(target.parent.glob(f".{target.name}.partial-*"))
    fresh = _row(chain.store, "SELECT * FROM serve.gguf WHERE model='tiny-llama' AND n=60 AND format='f16'")
    assert file_sha256(Path(fresh["artifact_path"])) == fresh["artifact_sha256"]


def test_conversion_past_its_time_limit_leaves_the_previous_gguf(
    chain: Chain, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from jpslm_assets.resources import llama_cpp_worker
    from jpslm_assets.resources.llama_cpp_tools import LlamaCppToolError, LlamaCppTools

    row = _row(chain.store, "SELECT * FROM serve.gguf WHERE model='tiny-llama' AND n=60 AND format='f16'")
    target = Path(row["artifact_path"])
    merged = _row(chain.store, "SELECT artifact_path FROM serve.merged_models WHERE model='tiny-llama' AND n=60")
    # A converter that never finishes (the forked child runs this process's code): the limit, not the speed of
    # the machine, decides the outcome. It writes part of the output first, as a real converter would.
    def stuck(converter: str, overrides: dict, arguments: list[str]) -> None:
        Path(arguments[arguments.index("--outfile") + 1]).write_bytes(b"GGUF partial")
        time.sleep(600)

    monkeypatch.setattr(llama_cpp_worker, "convert", stuck)
    tools = LlamaCppTools(
        cache_dir=chain.resources["llama_cpp_tools"].cache_dir, convert_timeout_s=1.0, isolation="fork"
    )
    started = time.monotonic()
    with pytest.raises(LlamaCppToolError, match="ran past convert_timeout_s"):
        tools.convert_hf_to_gguf(Path(merged["artifact_path"]), target)
    assert time.monotonic() - started < 60, "the stuck child was killed at the limit"
    assert file_sha256(target) == row["artifact_sha256"]
    assert not list(target.parent.glob(f".{target.name}.partial-*"))
