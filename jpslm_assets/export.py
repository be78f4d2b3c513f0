"""Stage 3, export and serving: merged 16-bit model -> GGUF F16 -> GGUF Q4_K_M -> deployment -> answers.

Partitioned by stage-3 adapter (``partitions.stage3_partitions``): every model's stage-2 adapter (key: the
model) and the reference model's stage-1 adapter at n* (key ``<model>@stage1``, for the paper's Lesson 4).
Every table carries ``adapter`` (the partition key), ``stage``, ``model`` and ``n``.

- ``merged_model``: the LoRA/QLoRA adapter merged into the un-quantized base at 16 bit (``serve.merged_models``).
- ``gguf_f16``, ``gguf_q4_k_m``: llama.cpp's converter and quantizer (``serve.gguf``, one row per format) with
  fidelity measured on the test set: answer-token NLL under the GGUF beside the HF model's, and whether the
  GGUF tokenizes every test text to the HF ids. A model the converter refuses (the paper's Tanuki) is
  recorded as ``failed`` with the reason, and an ``nf4`` row (HF + bitsandbytes 4-bit) takes its place.
- ``deployment``: an Ollama Modelfile from the model's chat template and, through the ``generation`` resource,
  ``ollama create`` or the embedded llama.cpp deployment (``serve.deployments``).
- ``answers_f16``, ``answers_q4_k_m``: the profile's evaluation questions answered with deterministic settings
  (``eval.answers``, one slice per format), ``generation.concurrency`` at once where the backend has the slots.

The ``generation`` resource is chosen from the profile's ``generation.backend``; judging and QA rephrasing use
the same resource. ``stage3_export_evaluation`` runs this stage and judging for one adapter.
"""

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.artifacts import artifact_record, frame_version
from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.domain.answering import (
    AnsweringInputError,
    QuestionFailed,
    answer_questions,
    select_eval_questions,
    served_name,
)
from jpslm_assets.domain.chat_format import EncodingError, encode_pair, render_prompt
from jpslm_assets.domain.fidelity import ScoringSequence, compare_tokenizations, mean_nll, relative_difference
from jpslm_assets.domain.generation_types import GenerationError, GenerationResult
from jpslm_assets.domain.modelfile import ChatTemplateError, build_modelfile
from jpslm_assets.domain.progress import ProgressLogger
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.partitions import (
    Stage3Adapter,
    stage1_to_stage3_mapping,
    stage2_to_stage3_mapping,
    stage3_adapter,
    stage3_partitions,
)
from jpslm_assets.resources.generation import Deployment, DeploymentRequest, GenerationBackend
from jpslm_assets.resources.generation_backends import backend_for, serving_backend
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend
from jpslm_assets.resources.llama_cpp_tools import (
    ConversionFailed,
    LlamaCppToolError,
    LlamaCppTools,
    gguf_chat_metadata,
    gguf_summary,
    partial_path,
    remove_stale_partials,
    replace_atomically,
)
from jpslm_assets.resources.loaded_models import release_loaded_models
from jpslm_assets.resources.model_merge import MergeError, gguf_tokenizer_overrides, merge_adapter
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore

GROUP = "export"
PARTITION_COLUMN = "adapter"  # the stage-3 partition key, in every stage-3 table
GGUF_FORMATS = ("f16", "q4_k_m")  # the llama.cpp formats this stage exports
NLL_TOLERANCE = 0.01  # F16 GGUF NLL within 1% of the HF model's
Q4_SIZE_LIMIT = 0.40  # Q4_K_M at most 40% of F16 where K-quants apply
EMPTY_ARTIFACT = {"artifact_path": None, "artifact_bytes": None, "artifact_sha256": None}


def export_folder(adapter: str, n: int) -> Path:
    folder = settings.artifact_dir() / "export" / adapter / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _output(frame: pl.DataFrame, **metadata: Any) -> dg.Output[pl.DataFrame]:
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)), metadata=metadata)


def _single_row(frame: pl.DataFrame, what: str, adapter: str) -> dict[str, Any]:
    if PARTITION_COLUMN in frame.columns:
        frame = frame.filter(pl.col(PARTITION_COLUMN) == adapter)
    if frame.height != 1:
        raise dg.Failure(
            f"{what} has {frame.height} rows for adapter {adapter} (expected 1): materialize {what} for this "
            "partition first."
        )
    return frame.row(0, named=True)


def partition_adapter(context: dg.AssetExecutionContext) -> Stage3Adapter:
    """The adapter of the stage-3 partition being materialized."""
    try:
        return stage3_adapter(context.partition_key)
    except ValueError as exc:
        raise dg.Failure(str(exc)) from exc


def adapter_columns(adapter: Stage3Adapter, n: int) -> dict[str, Any]:
    """The identifying columns every stage-3 row starts with."""
    return {PARTITION_COLUMN: adapter.key, "stage": adapter.stage, "model": adapter.model, "n": n}


def stage3_metadata(table: str, format_name: str | None = None) -> dict[str, Any]:
    return table_metadata(
        table, partition_expr=PARTITION_COLUMN, fixed={"format": format_name} if format_name else None
    )


def _adapter_run(
    adapter: Stage3Adapter,
    stage1_lora_adapter: pl.DataFrame,
    stage2_lora_adapter: pl.DataFrame,
    optimal_scale: pl.DataFrame,
) -> dict[str, Any]:
    """The training run a stage-3 partition exports: the model's stage-2 adapter, or for ``@stage1`` the
    reference model's stage-1 adapter at n*."""
    if adapter.stage == 2:
        rows = stage2_lora_adapter.filter(pl.col("model") == adapter.model)
        what = f"stage2_lora_adapter[{adapter.model}] (train.stage2_runs)"
    else:
        if optimal_scale.height != 1:
            raise dg.Failure("eval.optimal_scale has no n*: materialize optimal_scale (stage 1) first.")
        n = int(optimal_scale["n"][0])
        rows = stage1_lora_adapter.filter(
            (pl.col("model") == adapter.model) & (pl.col("n").cast(pl.Int64) == n)
        )
        what = f"stage1_lora_adapter[{n}] (train.stage1_runs, n* = {n})"
    if rows.height != 1:
        raise dg.Failure(f"{what} has {rows.height} rows (expected 1): materialize it first.")
    return rows.row(0, named=True)


# ---------------------------------------------------------------------------------------------- merged


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "duckdb"},
    partitions_def=stage3_partitions(),
    **GPU_STEP,
    ins={
        "stage2_lora_adapter": dg.AssetIn(partition_mapping=stage2_to_stage3_mapping()),
        "stage1_lora_adapter": dg.AssetIn(partition_mapping=stage1_to_stage3_mapping()),
        "optimal_scale": dg.AssetIn(),
    },
    metadata=stage3_metadata("serve.merged_models"),
)
def merged_model(
    context: dg.AssetExecutionContext,
    stage2_lora_adapter: pl.DataFrame,
    stage1_lora_adapter: pl.DataFrame,
    optimal_scale: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Stage 3 starts here: the partition's adapter (a model's stage-2 adapter, or the reference model's
    stage-1 adapter at n* for ``<model>@stage1``) merged into its un-quantized base at 16 bit, saved with
    tokenizer files and chat template.

    Memory-safe for 8B models (weights stream into place, the merge happens in place); written to a
    temporary folder and renamed, so a killed merge never replaces the previous export."""
    adapter = partition_adapter(context)
    run = _adapter_run(adapter, stage1_lora_adapter, stage2_lora_adapter, optimal_scale)
    model, n = adapter.model, int(run["n"])
    for column in ("base_model_ref", "artifact_path"):
        if not run.get(column):
            raise dg.Failure(
                f"the stage-{adapter.stage} run of {model} at n={n} has no {column}; re-materialize its adapter."
            )
    target = export_folder(adapter.key, n) / "merged"
    remove_stale_partials(target)
    started = time.perf_counter()
    try:
        result = merge_adapter(
            str(run["base_model_ref"]),
            Path(run["artifact_path"]),
            target,
            trust_remote_code=model_entry(model).trust_remote_code,
        )
    except MergeError as exc:
        raise dg.Failure(str(exc)) from exc
    seconds = time.perf_counter() - started
    record = artifact_record(result.path)
    frame = pl.DataFrame(
        [
            {
                **adapter_columns(adapter, n),
                "lora_r": run.get("r"),
                "lora_alpha": run.get("alpha"),
                "lora_dropout": run.get("dropout"),
                "base_model_ref": str(run["base_model_ref"]),
                "adapter_path": str(run["artifact_path"]),
                "dtype": result.dtype,
                "parameters": result.parameters,
                "tokenizer_source": result.tokenizer_source,
                "has_chat_template": result.chat_template is not None,
                "merge_seconds": round(seconds, 3),
                **record,
            }
        ]
    )
    context.log.info(
        f"merged {adapter.key} (stage {adapter.stage}, n={n}; {result.parameters:,} parameters, {result.dtype}) "
        f"in {seconds:.1f} s"
    )
    return _output(
        frame,
        path=record["artifact_path"],
        bytes=record["artifact_bytes"],
        sha256=record["artifact_sha256"],
        dtype=result.dtype,
        parameters=result.parameters,
    )


# ------------------------------------------------------------------------------------------------ GGUF


class GgufConfig(dg.Config):
    """Fidelity measurement settings (the defaults follow the profile)."""

    fidelity_questions: int = 0  # 0: the profile's export.fidelity_questions (0 there: its eval_questions)
    fidelity_dtype: str = "float32"  # the HF reference runs unquantized in full precision


def _fidelity(
    merged_dir: Path,
    gguf_path: Path,
    test_set: pl.DataFrame,
    questions: int,
    dtype: str,
    end_of_turn: str,
    hf_nll_known: float | None,
    log: Any,
) -> dict[str, Any]:
    """Tokenizer agreement on every test text, and answer-token NLL of the evaluation questions' reference
    answers under the HF model and under the GGUF, both on the HF token ids (the sequences test_nll scores)."""
    hf = TransformersBackend(dtype=dtype)  # type: ignore[arg-type]
    tokenizer = hf.tokenizer(str(merged_dir))
    seed = current_profile().generation.seed
    evaluated = set(select_eval_questions(test_set, questions, seed=seed)["question_id"].cast(pl.String).to_list())
    question_ids, prompts, answers, encoded = [], [], [], []
    for row in test_set.sort("question_id").iter_rows(named=True):
        question_id = str(row["question_id"])
        answer = (row["reference_answer"] or "") + end_of_turn
        try:
            example = encode_pair(
                tokenizer,
                row["question"],
                row["reference_answer"] or "",
                end_of_turn,
                max_length=1 << 20,
                record_id=question_id,
            )
        except EncodingError as exc:
            raise dg.Failure(f"test set: {exc}") from exc
        question_ids.append(question_id)
        prompts.append(render_prompt(tokenizer, row["question"]))
        answers.append(answer)
        encoded.append(example)
    longest = max(len(example.input_ids) for example in encoded)
    llama = LlamaCppBackend(n_ctx=max(current_profile().generation.num_ctx, longest + 8))
    # The GGUF tokenizes prompt and answer separately, as serving (prompt) and scoring (answer) do.
    gguf_ids = [
        llama.tokenize(str(gguf_path), prompt) + llama.tokenize(str(gguf_path), answer)
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    agreement = compare_tokenizations(question_ids, [example.input_ids for example in encoded], gguf_ids)
    if agreement.first_mismatch:
        log.warning(
            f"GGUF tokenization differs from HF on {agreement.texts - agreement.identical} of "
            f"{agreement.texts} test texts; {agreement.first_mismatch}"
        )
    sequences = [
        ScoringSequence(question_id, tuple(example.input_ids), example.prompt_tokens)
        for question_id, example in zip(question_ids, encoded, strict=True)
        if question_id in evaluated
    ]
    gguf_nll, tokens = mean_nll(llama.score(str(gguf_path), sequences))
    hf_nll = hf_nll_known if hf_nll_known is not None else mean_nll(hf.score(str(merged_dir), sequences))[0]
    release_loaded_models()
    return {
        "hf_nll": hf_nll,
        "gguf_nll": gguf_nll,
        "nll_rel_diff": relative_difference(gguf_nll, hf_nll),
        "answer_tokens": tokens,
        "fidelity_questions": len(sequences),
        "tokenizer_agreement": agreement.share,
        "tokenizer_texts": agreement.texts,
        "tokenizer_first_mismatch": agreement.first_mismatch,
    }


def _gguf_checks(format_name: str) -> list[dg.AssetCheckSpec]:
    key = dg.AssetKey(f"gguf_{format_name}")
    specs = [
        dg.AssetCheckSpec("converted", asset=key, description="llama.cpp produced the GGUF"),
        dg.AssetCheckSpec(
            "tokenizer_matches_hf", asset=key, description="GGUF token ids == HF ids on the test set"
        ),
    ]
    if format_name == "f16":
        specs.append(
            dg.AssetCheckSpec("nll_within_1pct_of_hf", asset=key, description="F16 GGUF NLL within 1% of HF")
        )
    else:
        specs.append(
            dg.AssetCheckSpec(
                "size_at_most_40pct_of_f16",
                asset=key,
                description="Q4_K_M <= 40% of F16 where K-quants apply",
            )
        )
    return specs


def _gguf_check_results(format_name: str, row: dict[str, Any]) -> list[dg.AssetCheckResult]:
    ok = row["status"] == "ok"
    results = [
        dg.AssetCheckResult(
            check_name="converted",
            passed=ok,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"status": row["status"], "reason": row.get("failure_reason") or ""},
        ),
        dg.AssetCheckResult(
            check_name="tokenizer_matches_hf",
            passed=bool(ok and row["tokenizer_agreement"] == 1.0),
            metadata={
                "agreement": float(row["tokenizer_agreement"] or 0.0),
                "first_mismatch": row.get("tokenizer_first_mismatch") or "",
            },
        ),
    ]
    if format_name == "f16":
        diff = row.get("nll_rel_diff")
        results.append(
            dg.AssetCheckResult(
                check_name="nll_within_1pct_of_hf",
                passed=bool(ok and diff is not None and diff <= NLL_TOLERANCE),
                metadata={"hf_nll": row.get("hf_nll"), "gguf_nll": row.get("gguf_nll"), "rel_diff": diff},
            )
        )
    else:
        ratio = row.get("size_ratio_to_f16")
        applies = bool(row.get("kquant_compatible"))
        results.append(
            dg.AssetCheckResult(
                check_name="size_at_most_40pct_of_f16",
                passed=bool(ok and ratio is not None and (ratio <= Q4_SIZE_LIMIT or not applies)),
                severity=dg.AssetCheckSeverity.ERROR if applies else dg.AssetCheckSeverity.WARN,
                metadata={"size_ratio": ratio, "kquants_apply": applies},
            )
        )
    return results


# Explicit types: a failed conversion leaves most columns NULL, and the first write fixes the table's types.
GGUF_SCHEMA = {
    "adapter": pl.String, "stage": pl.Int64, "model": pl.String, "n": pl.Int64, "format": pl.String, "status": pl.String, "failure_kind": pl.String,
    "failure_reason": pl.String, "tensor_types": pl.String, "kquant_compatible": pl.Boolean, "file_bytes": pl.Int64,
    "size_ratio_to_f16": pl.Float64, "seconds": pl.Float64, "hf_nll": pl.Float64, "gguf_nll": pl.Float64,
    "nll_rel_diff": pl.Float64, "answer_tokens": pl.Int64, "fidelity_questions": pl.Int64,
    "tokenizer_agreement": pl.Float64, "tokenizer_texts": pl.Int64, "tokenizer_first_mismatch": pl.String,
    "artifact_path": pl.String, "artifact_bytes": pl.Int64, "artifact_sha256": pl.String,
}  # fmt: skip


def _gguf_frame(row: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame([row], schema=GGUF_SCHEMA)


def _failed_gguf_row(
    adapter: Stage3Adapter, n: int, format_name: str, kind: str, reason: str
) -> dict[str, Any]:
    return {
        **adapter_columns(adapter, n), "format": format_name, "status": "failed", "failure_kind": kind,
        "failure_reason": reason, "tensor_types": None, "kquant_compatible": None, "file_bytes": None,
        "size_ratio_to_f16": None, "seconds": None, "hf_nll": None, "gguf_nll": None, "nll_rel_diff": None,
        "answer_tokens": None, "fidelity_questions": None, "tokenizer_agreement": None, "tokenizer_texts": None,
        "tokenizer_first_mismatch": None, **EMPTY_ARTIFACT,
    }  # fmt: skip


def _nf4_fallback_row(adapter: Stage3Adapter, n: int, merged_dir: str, reason: str) -> dict[str, Any]:
    """The paper's fallback for a model llama.cpp cannot convert: HF weights loaded 4-bit by bitsandbytes."""
    available, why = TransformersBackend(quantization="nf4").availability()
    row = _failed_gguf_row(adapter, n, "nf4", "", "")
    row.update(
        status="ok" if available else "unavailable",
        failure_kind=None if available else "needs_cuda",
        failure_reason=f"GGUF conversion failed ({reason}); {why}",
        artifact_path=merged_dir,
    )
    return row


def _materialize_gguf(
    context: dg.AssetExecutionContext,
    format_name: str,
    config: GgufConfig,
    tools: LlamaCppTools,
    store: DuckDBStore,
    merged_model: pl.DataFrame,
    test_set: pl.DataFrame,
    gguf_f16: pl.DataFrame | None,
) -> Iterator[Any]:
    adapter = partition_adapter(context)
    merged = _single_row(merged_model, "merged_model", adapter.key)
    model, n = adapter.model, int(merged["n"])
    merged_dir = Path(merged["artifact_path"])
    name = adapter.key.replace("@", "-")
    target = export_folder(adapter.key, n) / f"{name}-n{n}-{format_name}.gguf"
    remove_stale_partials(target)
    profile = current_profile()
    questions = config.fidelity_questions or profile.export.fidelity_questions or profile.eval_questions
    f16_row = _single_row(gguf_f16, "gguf_f16", adapter.key) if gguf_f16 is not None else None
    started = time.perf_counter()
    try:
        if f16_row is None:
            overrides = gguf_tokenizer_overrides(merged_dir)
            tools.convert_hf_to_gguf(merged_dir, target, "f16", metadata_overrides=overrides)
        else:
            if f16_row["status"] != "ok":
                raise ConversionFailed(
                    f"no F16 GGUF to quantize: {f16_row.get('failure_reason')}", "converter_error", ""
                )
            tools.quantize(Path(f16_row["artifact_path"]), target, format_name)  # type: ignore[arg-type]
    except ConversionFailed as exc:
        context.log.warning(f"{adapter.key} n={n}: {exc}\n{exc.log_tail}")
        row = _failed_gguf_row(adapter, n, format_name, exc.kind, str(exc))
        if f16_row is None:
            fallback = _gguf_frame(_nf4_fallback_row(adapter, n, str(merged_dir), str(exc)))
            store.write_slice("serve.gguf", fallback, {PARTITION_COLUMN: adapter.key, "format": "nf4"})
            context.log.warning(f"{adapter.key} n={n}: recorded the nf4 fallback ({fallback['status'][0]})")
        yield _output(_gguf_frame(row), status="failed", reason=str(exc), failure_kind=exc.kind)
        yield from _gguf_check_results(format_name, row)
        return
    except LlamaCppToolError as exc:
        raise dg.Failure(str(exc)) from exc
    seconds = time.perf_counter() - started
    summary = gguf_summary(target)
    context.log.info(f"{target.name}: {summary.tensor_types} in {seconds:.1f} s; measuring fidelity")
    stops = model_entry(model).stop_tokens
    fidelity = _fidelity(
        merged_dir, target, test_set, questions, config.fidelity_dtype, stops[0] if stops else "",
        f16_row.get("hf_nll") if f16_row else None, context.log,
    )  # fmt: skip
    record = artifact_record(target)
    f16_bytes = f16_row["artifact_bytes"] if f16_row else record["artifact_bytes"]
    row = {
        **adapter_columns(adapter, n), "format": format_name, "status": "ok", "failure_kind": None,
        "failure_reason": None, "tensor_types": json.dumps(summary.tensor_types),
        "kquant_compatible": summary.kquant_compatible, "file_bytes": record["artifact_bytes"],
        "size_ratio_to_f16": record["artifact_bytes"] / f16_bytes, "seconds": round(seconds, 3),
        **fidelity, **record,
    }  # fmt: skip
    yield _output(
        _gguf_frame(row),
        path=record["artifact_path"],
        bytes=record["artifact_bytes"],
        size_mb=round(record["artifact_bytes"] / 1e6, 2),
        sha256=record["artifact_sha256"],
        tensor_types=dg.MetadataValue.json(summary.tensor_types),
        hf_nll=fidelity["hf_nll"],
        gguf_nll=fidelity["gguf_nll"],
        nll_rel_diff=fidelity["nll_rel_diff"],
        tokenizer_agreement=fidelity["tokenizer_agreement"],
        size_ratio_to_f16=row["size_ratio_to_f16"],
    )
    yield from _gguf_check_results(format_name, row)


def _gguf_asset_arguments(format_name: str, ins: dict[str, dg.AssetIn]) -> dict[str, Any]:
    tool = "convert_hf_to_gguf.py" if format_name == "f16" else "llama_model_quantize (from the F16 GGUF)"
    return {
        "name": f"gguf_{format_name}",
        "group_name": GROUP,
        "kinds": {"gguf", "llama_cpp", "duckdb"},
        "partitions_def": stage3_partitions(),
        **GPU_STEP,
        "ins": ins,
        "check_specs": _gguf_checks(format_name),
        "metadata": stage3_metadata("serve.gguf", format_name),
        "description": (
            f"GGUF {format_name.upper()} of the merged model made by llama.cpp's own {tool}, with size, tensor "
            "types and fidelity on the test set: answer-token NLL beside the HF model's and tokenizer agreement. "
            "A conversion llama.cpp refuses is recorded as failed with its reason, and an nf4 row (HF + "
            "bitsandbytes 4-bit) takes its place."
        ),
    }


_MERGED_AND_TESTS = {"merged_model": dg.AssetIn(key="merged_model"), "test_set": dg.AssetIn(key="test_set")}


@versioned()
@dg.asset(**_gguf_asset_arguments("f16", _MERGED_AND_TESTS))
def gguf_f16(
    context: dg.AssetExecutionContext,
    config: GgufConfig,
    llama_cpp_tools: LlamaCppTools,
    store: DuckDBStore,
    merged_model: pl.DataFrame,
    test_set: pl.DataFrame,
) -> Iterator[Any]:
    yield from _materialize_gguf(context, "f16", config, llama_cpp_tools, store, merged_model, test_set, None)


@versioned()
@dg.asset(**_gguf_asset_arguments("q4_k_m", {**_MERGED_AND_TESTS, "gguf_f16": dg.AssetIn(key="gguf_f16")}))
def gguf_q4_k_m(
    context: dg.AssetExecutionContext,
    config: GgufConfig,
    llama_cpp_tools: LlamaCppTools,
    store: DuckDBStore,
    merged_model: pl.DataFrame,
    test_set: pl.DataFrame,
    gguf_f16: pl.DataFrame,
) -> Iterator[Any]:
    yield from _materialize_gguf(
        context, "q4_k_m", config, llama_cpp_tools, store, merged_model, test_set, gguf_f16
    )


# ------------------------------------------------------------------------------------------ deployment


DEPLOYMENT_SCHEMA = {
    "adapter": pl.String, "stage": pl.Int64, "model": pl.String, "n": pl.Int64, "format": pl.String,
    "backend": pl.String, "served_name": pl.String, "model_ref": pl.String, "quantization": pl.String,
    "modelfile_path": pl.String, "status": pl.String, "detail": pl.String,
}  # fmt: skip


def _deployment_row(
    adapter: Stage3Adapter, n: int, format_name: str, deployment: Deployment, modelfile: Path | None
) -> dict:
    return {
        **adapter_columns(adapter, n), "format": format_name, "backend": deployment.backend,
        "served_name": deployment.served_name, "model_ref": deployment.model_ref,
        "quantization": deployment.quantization, "modelfile_path": str(modelfile) if modelfile else None,
        "status": deployment.status, "detail": deployment.detail,
    }  # fmt: skip


def _write_modelfile(path: Path, text: str) -> Path:
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    replace_atomically(partial, path)
    return path


@versioned()
@dg.asset(
    group_name=GROUP,
    kinds={"ollama", "llama_cpp", "duckdb"},
    partitions_def=stage3_partitions(),
    ins={
        "merged_model": dg.AssetIn(key="merged_model"),
        "gguf_f16": dg.AssetIn(key="gguf_f16"),
        "gguf_q4_k_m": dg.AssetIn(key="gguf_q4_k_m"),
    },
    metadata=stage3_metadata("serve.deployments"),
)
def deployment(
    context: dg.AssetExecutionContext,
    generation: GenerationBackend,
    merged_model: pl.DataFrame,
    gguf_f16: pl.DataFrame,
    gguf_q4_k_m: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    """Each format made servable: a Modelfile from the model's chat template (stop tokens, fixed seed,
    temperature and context, no double BOS) and ``ollama create`` when the Ollama server answers, else the
    embedded llama.cpp deployment (with ``generation.backend: llama_server``, the GGUF checked for llama-server
    to serve). A model llama.cpp could not convert gets the HF + NF4 fallback as a row of its own, format
    ``nf4``, beside its unavailable GGUF formats."""
    adapter = partition_adapter(context)
    merged = _single_row(merged_model, "merged_model", adapter.key)
    model, n = adapter.model, int(merged["n"])
    entry = model_entry(model)
    generation_settings = current_profile().generation
    rows = []
    for format_name, frame in zip(GGUF_FORMATS, (gguf_f16, gguf_q4_k_m), strict=True):
        gguf = _single_row(frame, f"gguf_{format_name}", adapter.key)
        name = served_name(adapter.key, n, format_name)
        if gguf["status"] != "ok":
            unavailable = Deployment(
                "none", "", name, format_name, "unavailable", f"no {format_name} GGUF: {gguf['failure_reason']}"
            )
            rows.append(_deployment_row(adapter, n, format_name, unavailable, None))
            context.log.warning(f"{adapter.key} n={n} {format_name}: {rows[-1]['detail']}")
            if format_name == "f16":
                request = DeploymentRequest(
                    model, n, "nf4", served_name(adapter.key, n, "nf4"), hf_dir=Path(merged["artifact_path"])
                )
                rows.append(_deployment_row(adapter, n, "nf4", generation.deploy(request), None))
                context.log.warning(f"{adapter.key} n={n} nf4 fallback: {rows[-1]['status']} - {rows[-1]['detail']}")
            continue
        gguf_path = Path(gguf["artifact_path"])
        try:
            header = gguf_chat_metadata(gguf_path)  # read from the header: no weights loaded for this
            spec = build_modelfile(
                header.chat_template,
                gguf_path.name,
                model=f"{adapter.key} n={n} ({format_name})",
                bos_token=header.bos_token,
                eos_token=header.eos_token,
                server_adds_bos=header.add_bos,
                catalogue_stops=entry.stop_tokens,
                seed=generation_settings.seed,
                temperature=generation_settings.temperature,
                num_ctx=generation_settings.num_ctx,
                num_predict=generation_settings.max_new_tokens,
                comment=(
                    f"{name}: {model} stage-{adapter.stage} adapter, n={n}, {format_name}; written by the "
                    "deployment asset"
                ),
            )
            modelfile = _write_modelfile(gguf_path.with_name(f"Modelfile.{format_name}"), spec.render())
            request = DeploymentRequest(
                model,
                n,
                format_name,
                name,
                gguf_path=gguf_path,
                hf_dir=Path(merged["artifact_path"]),
                modelfile=spec,
            )
            result = generation.deploy(request)
        except (ChatTemplateError, GenerationError, LlamaCppToolError) as exc:
            raise dg.Failure(f"{adapter.key} n={n} {format_name}: {exc}") from exc
        context.log.info(f"{adapter.key} n={n} {format_name}: {result.backend} {result.status} - {result.detail}")
        rows.append(_deployment_row(adapter, n, format_name, result, modelfile))
    release_loaded_models()
    frame = pl.DataFrame(rows, schema=DEPLOYMENT_SCHEMA)
    return _output(
        frame,
        backends=dg.MetadataValue.json({row["format"]: row["backend"] for row in rows}),
        statuses=dg.MetadataValue.json({row["format"]: row["status"] for row in rows}),
        modelfiles=dg.MetadataValue.json({row["format"]: row["modelfile_path"] for row in rows}),
    )


# --------------------------------------------------------------------------------------------- answers

ANSWER_SCHEMA = {
    "adapter": pl.String, "stage": pl.Int64, "model": pl.String, "n": pl.Int64, "format": pl.String,
    "question_id": pl.String, "category": pl.String, "question": pl.String, "answer": pl.String, "chars": pl.Int64,
    "tokens": pl.Int64, "prompt_tokens": pl.Int64, "seconds": pl.Float64, "backend": pl.String,
    "quantization": pl.String, "model_ref": pl.String, "finish_reason": pl.String, "seed": pl.Int64,
    "temperature": pl.Float64, "max_new_tokens": pl.Int64,
}  # fmt: skip


def build_answers_asset(format_name: str) -> dg.AssetsDefinition:
    @versioned()
    @dg.asset(
        name=f"answers_{format_name}",
        group_name=GROUP,
        kinds={"llama_cpp", "ollama", "duckdb"},
        partitions_def=stage3_partitions(),
        **GPU_STEP,
        ins={"deployment": dg.AssetIn(key="deployment"), "test_set": dg.AssetIn(key="test_set")},
        metadata=stage3_metadata("eval.answers", format_name),
        description=(
            f"The profile's evaluation questions (a seeded, category-stratified sample of the human-written "
            f"test questions) answered by the {format_name.upper()} deployment with the profile's deterministic "
            "generation settings; per answer the text, characters, tokens, seconds, backend and finish reason."
            + (
                " Only a model whose GGUF export failed has an nf4 deployment; every other partition writes no rows."
                if format_name == "nf4"
                else ""
            )
        ),
    )
    def answers_asset(
        context: dg.AssetExecutionContext,
        generation: GenerationBackend,
        deployment: pl.DataFrame,
        test_set: pl.DataFrame,
    ) -> dg.Output[pl.DataFrame]:
        adapter = partition_adapter(context)
        rows = deployment.filter(pl.col("format") == format_name)
        if format_name == "nf4" and rows.is_empty():
            context.log.info(f"{adapter.key}: its GGUF export succeeded, so it has no nf4 fallback to answer with")
            return _output(pl.DataFrame(schema=ANSWER_SCHEMA), status="not applicable", questions=0)
        served = _single_row(rows, f"deployment ({format_name})", adapter.key)
        n = int(served["n"])
        if served["status"] != "ok":
            context.log.warning(
                f"{adapter.key} n={n} {format_name} is not servable: {served['detail']}; no answers"
            )
            frame = pl.DataFrame(schema=ANSWER_SCHEMA)
            return _output(frame, status="unavailable", reason=served["detail"], questions=0)
        profile = current_profile()
        try:
            questions = select_eval_questions(test_set, profile.eval_questions, seed=profile.generation.seed)
        except AnsweringInputError as exc:
            raise dg.Failure(str(exc)) from exc
        backend = serving_backend(generation, served)
        settings_used = profile.generation
        stops = tuple(model_entry(adapter.model).stop_tokens)
        progress = ProgressLogger(
            f"answers_{format_name} {adapter.key} n={n}", questions.height, context.log.info, unit="questions"
        )
        question_rows = list(questions.iter_rows(named=True))
        answers: list[dict[str, Any]] = []

        def on_answer(question: Mapping[str, Any], result: GenerationResult) -> None:
            progress.advance(
                detail=f"{question['question_id']}: {result.completion_tokens} tokens, {result.finish_reason}"
            )

        try:
            answered = answer_questions(
                backend, served["model_ref"], question_rows, settings_used, stops,
                concurrency=settings_used.concurrency, on_answer=on_answer,
            )  # fmt: skip
        except QuestionFailed as exc:
            raise dg.Failure(str(exc)) from exc
        finally:
            release_loaded_models()  # also stops a llama-server this step started
        for question, result in zip(question_rows, answered.results, strict=True):
            answers.append({
                **adapter_columns(adapter, n), "format": format_name, "question_id": str(question["question_id"]),
                "category": question["category"], "question": question["question"], "answer": result.text,
                "chars": len(result.text), "tokens": result.completion_tokens, "prompt_tokens": result.prompt_tokens,
                "seconds": round(result.seconds, 4), "backend": result.backend,
                "quantization": served["quantization"], "model_ref": served["model_ref"],
                "finish_reason": result.finish_reason, "seed": settings_used.seed,
                "temperature": settings_used.temperature, "max_new_tokens": settings_used.max_new_tokens,
            })  # fmt: skip
        summary = progress.finish()
        frame = pl.DataFrame(answers, schema=ANSWER_SCHEMA)
        truncated = int((frame["finish_reason"] == "length").sum())
        if truncated:
            context.log.warning(
                f"{truncated}/{frame.height} answers hit max_new_tokens={settings_used.max_new_tokens} "
                "(finish_reason='length'); raise generation.max_new_tokens if they matter"
            )
        total_seconds = float(frame["seconds"].sum())
        return _output(
            frame,
            questions=frame.height,
            question_ids=dg.MetadataValue.json(frame["question_id"].to_list()),
            question_sample=f"stratified by category, seed {profile.generation.seed}",
            backend=str(served["backend"]),
            avg_chars=float(frame["chars"].cast(pl.Float64).mean() or 0.0),  # type: ignore[arg-type]
            sec_per_question=total_seconds / max(frame.height, 1),
            tokens_per_s=float(frame["tokens"].sum()) / total_seconds if total_seconds else 0.0,
            hit_max_tokens=truncated,
            concurrency=answered.concurrency,
            wall_seconds=round(answered.wall_seconds, 3),
            **summary.as_metadata("answering"),
        )

    return answers_asset


# One answers asset per format of the profile (formats: f16, q4_k_m and nf4 by default).
ANSWERS_ASSETS = {format_name: build_answers_asset(format_name) for format_name in current_profile().formats}
answers_f16 = ANSWERS_ASSETS.get("f16")
answers_q4_k_m = ANSWERS_ASSETS.get("q4_k_m")
answers_nf4 = ANSWERS_ASSETS.get("nf4")


# ------------------------------------------------------------------------------------------------- job

stage3_job = dg.define_asset_job(
    "stage3_export_evaluation",
    selection=dg.AssetSelection.groups(GROUP, "judging"),
    partitions_def=stage3_partitions(),
    description=(
        "Stage 3 for one adapter: merge, GGUF F16 and Q4_K_M (or the NF4 fallback), deployment, answers, judging."
    ),
)


def generation_resource() -> GenerationBackend:
    """The profile's generation backend (``generation.backend``) with its context size."""
    generation_settings = current_profile().generation
    return backend_for(
        generation_settings.backend,
        generation_settings.num_ctx,
        fallback=generation_settings.fallback,
        first_byte_timeout_s=generation_settings.first_byte_timeout_s,
        request_timeout_s=generation_settings.request_timeout_s,
    )


defs = dg.Definitions(
    assets=[merged_model, gguf_f16, gguf_q4_k_m, deployment, *ANSWERS_ASSETS.values()],
    jobs=[stage3_job],
    resources={"generation": generation_resource(), "llama_cpp_tools": LlamaCppTools()},
)
