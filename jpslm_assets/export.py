"""Stage 3, export and serving: merged 16-bit model -> GGUF F16 -> GGUF Q4_K_M -> deployment -> answers.

Per model x n (the chosen n in practice):

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
the same resource. ``stage3_export_evaluation`` runs this stage and judging for one model x n;
``stage3_sensor`` starts it when a model's adapter at the chosen n is new.
"""

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.catalogue import model_entry
from jpslm_assets.domain.answering import (
    AnsweringInputError,
    QuestionFailed,
    answer_questions,
    select_eval_questions,
    served_name,
)
from jpslm_assets.domain.chat_format import EncodingError, encode_pair, render_prompt
from jpslm_assets.domain.fidelity import ScoringSequence, compare_tokenizations, mean_nll, relative_difference
from jpslm_assets.domain.modelfile import ChatTemplateError, build_modelfile
from jpslm_assets.domain.progress import ProgressLogger
from jpslm_assets.execution import GPU_POOL
from jpslm_assets.partitions import model_n_key, model_n_partitions, split_model_n
from jpslm_assets.resources.generation import (
    Deployment,
    DeploymentRequest,
    GenerationBackend,
    LlamaCppBackend,
    TransformersBackend,
    backend_for,
    release_loaded_models,
    serving_backend,
)
from jpslm_assets.resources.generation_api import GenerationError, GenerationResult
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
from jpslm_assets.resources.model_merge import MergeError, gguf_tokenizer_overrides, merge_adapter
from jpslm_assets.settings import Profile, current_profile
from jpslm_assets.store import DuckDBStore, artifact_record, frame_version, table_metadata
from jpslm_assets.training import STAGE_TAG, chosen_n

GROUP = "export"
MODEL_N = {"model": "model", "n": "n"}
GGUF_FORMATS = ("f16", "q4_k_m")  # the llama.cpp formats this stage exports and answers with
NLL_TOLERANCE = 0.01  # F16 GGUF NLL within 1% of the HF model's
Q4_SIZE_LIMIT = 0.40  # Q4_K_M at most 40% of F16 where K-quants apply
EMPTY_ARTIFACT = {"artifact_path": None, "artifact_bytes": None, "artifact_sha256": None}


def export_folder(model: str, n: int) -> Path:
    folder = settings.artifact_dir() / "export" / model / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _output(frame: pl.DataFrame, **metadata: Any) -> dg.Output[pl.DataFrame]:
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)), metadata=metadata)


def _single_row(frame: pl.DataFrame, what: str, model: str, n: int) -> dict[str, Any]:
    if frame.height != 1:
        raise dg.Failure(
            f"{what} has {frame.height} rows for model={model}, n={n} (expected 1): materialize {what} for this "
            "partition first."
        )
    return frame.row(0, named=True)


# ---------------------------------------------------------------------------------------------- merged


@dg.asset(
    group_name=GROUP,
    kinds={"pytorch", "duckdb"},
    code_version="1",
    partitions_def=model_n_partitions(),
    pool=GPU_POOL,
    ins={"lora_adapter": dg.AssetIn(key="lora_adapter")},
    metadata=table_metadata("serve.merged_models", partition_expr=MODEL_N),
)
def merged_model(context: dg.AssetExecutionContext, lora_adapter: pl.DataFrame) -> dg.Output[pl.DataFrame]:
    """The adapter merged into its un-quantized base at 16 bit, saved with tokenizer files and chat template.

    Memory-safe for 8B models (weights stream into place, the merge happens in place); written to a
    temporary folder and renamed, so a killed merge never replaces the previous export."""
    model, n = split_model_n(context)
    run = _single_row(lora_adapter, "lora_adapter (train.runs)", model, n)
    for column in ("base_model_ref", "artifact_path"):
        if not run.get(column):
            raise dg.Failure(
                f"train.runs row for model={model}, n={n} has no {column}; re-materialize lora_adapter."
            )
    target = export_folder(model, n) / "merged"
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
                "model": model,
                "n": n,
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
        f"merged {model} n={n} ({result.parameters:,} parameters, {result.dtype}) in {seconds:.1f} s"
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

    fidelity_questions: int = 0  # 0: the profile's eval_questions
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
    evaluated = set(select_eval_questions(test_set, questions)["question_id"].cast(pl.String).to_list())
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
    "model": pl.String, "n": pl.Int64, "format": pl.String, "status": pl.String, "failure_kind": pl.String,
    "failure_reason": pl.String, "tensor_types": pl.String, "kquant_compatible": pl.Boolean, "file_bytes": pl.Int64,
    "size_ratio_to_f16": pl.Float64, "seconds": pl.Float64, "hf_nll": pl.Float64, "gguf_nll": pl.Float64,
    "nll_rel_diff": pl.Float64, "answer_tokens": pl.Int64, "fidelity_questions": pl.Int64,
    "tokenizer_agreement": pl.Float64, "tokenizer_texts": pl.Int64, "tokenizer_first_mismatch": pl.String,
    "artifact_path": pl.String, "artifact_bytes": pl.Int64, "artifact_sha256": pl.String,
}  # fmt: skip


def _gguf_frame(row: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame([row], schema=GGUF_SCHEMA)


def _failed_gguf_row(model: str, n: int, format_name: str, kind: str, reason: str) -> dict[str, Any]:
    return {
        "model": model, "n": n, "format": format_name, "status": "failed", "failure_kind": kind,
        "failure_reason": reason, "tensor_types": None, "kquant_compatible": None, "file_bytes": None,
        "size_ratio_to_f16": None, "seconds": None, "hf_nll": None, "gguf_nll": None, "nll_rel_diff": None,
        "answer_tokens": None, "fidelity_questions": None, "tokenizer_agreement": None, "tokenizer_texts": None,
        "tokenizer_first_mismatch": None, **EMPTY_ARTIFACT,
    }  # fmt: skip


def _nf4_fallback_row(model: str, n: int, merged_dir: str, reason: str) -> dict[str, Any]:
    """The paper's fallback for a model llama.cpp cannot convert: HF weights loaded 4-bit by bitsandbytes."""
    available, why = TransformersBackend(quantization="nf4").availability()
    row = _failed_gguf_row(model, n, "nf4", "", "")
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
    model, n = split_model_n(context)
    merged = _single_row(merged_model, "merged_model", model, n)
    merged_dir = Path(merged["artifact_path"])
    target = export_folder(model, n) / f"{model}-n{n}-{format_name}.gguf"
    remove_stale_partials(target)
    questions = config.fidelity_questions or current_profile().eval_questions
    f16_row = _single_row(gguf_f16, "gguf_f16", model, n) if gguf_f16 is not None else None
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
        context.log.warning(f"{model} n={n}: {exc}\n{exc.log_tail}")
        row = _failed_gguf_row(model, n, format_name, exc.kind, str(exc))
        if f16_row is None:
            fallback = _gguf_frame(_nf4_fallback_row(model, n, str(merged_dir), str(exc)))
            store.write_slice("serve.gguf", fallback, {"model": model, "n": str(n), "format": "nf4"})
            context.log.warning(f"{model} n={n}: recorded the nf4 fallback ({fallback['status'][0]})")
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
        "model": model, "n": n, "format": format_name, "status": "ok", "failure_kind": None,
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
        "code_version": "1",
        "partitions_def": model_n_partitions(),
        "pool": GPU_POOL,
        "ins": ins,
        "check_specs": _gguf_checks(format_name),
        "metadata": table_metadata("serve.gguf", partition_expr=MODEL_N, fixed={"format": format_name}),
        "description": (
            f"GGUF {format_name.upper()} of the merged model made by llama.cpp's own {tool}, with size, tensor "
            "types and fidelity on the test set: answer-token NLL beside the HF model's and tokenizer agreement. "
            "A conversion llama.cpp refuses is recorded as failed with its reason, and an nf4 row (HF + "
            "bitsandbytes 4-bit) takes its place."
        ),
    }


_MERGED_AND_TESTS = {"merged_model": dg.AssetIn(key="merged_model"), "test_set": dg.AssetIn(key="test_set")}


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
    "model": pl.String, "n": pl.Int64, "format": pl.String, "backend": pl.String, "served_name": pl.String,
    "model_ref": pl.String, "quantization": pl.String, "modelfile_path": pl.String, "status": pl.String,
    "detail": pl.String,
}  # fmt: skip


def _deployment_row(
    model: str, n: int, format_name: str, deployment: Deployment, modelfile: Path | None
) -> dict:
    return {
        "model": model, "n": n, "format": format_name, "backend": deployment.backend,
        "served_name": deployment.served_name, "model_ref": deployment.model_ref,
        "quantization": deployment.quantization, "modelfile_path": str(modelfile) if modelfile else None,
        "status": deployment.status, "detail": deployment.detail,
    }  # fmt: skip


def _write_modelfile(path: Path, text: str) -> Path:
    partial = partial_path(path)
    partial.write_text(text, encoding="utf-8")
    replace_atomically(partial, path)
    return path


@dg.asset(
    group_name=GROUP,
    kinds={"ollama", "llama_cpp", "duckdb"},
    code_version="1",
    partitions_def=model_n_partitions(),
    ins={
        "merged_model": dg.AssetIn(key="merged_model"),
        "gguf_f16": dg.AssetIn(key="gguf_f16"),
        "gguf_q4_k_m": dg.AssetIn(key="gguf_q4_k_m"),
    },
    metadata=table_metadata("serve.deployments", partition_expr=MODEL_N),
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
    to serve); a model without a GGUF gets the HF + NF4 fallback."""
    model, n = split_model_n(context)
    merged = _single_row(merged_model, "merged_model", model, n)
    entry = model_entry(model)
    generation_settings = current_profile().generation
    rows = []
    for format_name, frame in zip(GGUF_FORMATS, (gguf_f16, gguf_q4_k_m), strict=True):
        gguf = _single_row(frame, f"gguf_{format_name}", model, n)
        name = served_name(model, n, format_name)
        if gguf["status"] != "ok":
            if format_name == "f16":
                request = DeploymentRequest(
                    model, n, "nf4", served_name(model, n, "nf4"), hf_dir=Path(merged["artifact_path"])
                )
                rows.append(_deployment_row(model, n, format_name, generation.deploy(request), None))
            else:
                rows.append(
                    _deployment_row(
                        model,
                        n,
                        format_name,
                        Deployment(
                            "none",
                            "",
                            name,
                            format_name,
                            "unavailable",
                            f"no {format_name} GGUF: {gguf['failure_reason']}",
                        ),
                        None,
                    )
                )
            context.log.warning(f"{model} n={n} {format_name}: {rows[-1]['detail']}")
            continue
        gguf_path = Path(gguf["artifact_path"])
        try:
            header = gguf_chat_metadata(gguf_path)  # read from the header: no weights loaded for this
            spec = build_modelfile(
                header.chat_template,
                gguf_path.name,
                model=f"{model} n={n} ({format_name})",
                bos_token=header.bos_token,
                eos_token=header.eos_token,
                server_adds_bos=header.add_bos,
                catalogue_stops=entry.stop_tokens,
                seed=generation_settings.seed,
                temperature=generation_settings.temperature,
                num_ctx=generation_settings.num_ctx,
                num_predict=generation_settings.max_new_tokens,
                comment=f"{name}: {model} fine-tuned on n={n}, {format_name}; written by the deployment asset",
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
            raise dg.Failure(f"{model} n={n} {format_name}: {exc}") from exc
        context.log.info(f"{model} n={n} {format_name}: {result.backend} {result.status} - {result.detail}")
        rows.append(_deployment_row(model, n, format_name, result, modelfile))
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
    "model": pl.String, "n": pl.Int64, "format": pl.String, "question_id": pl.String, "category": pl.String,
    "question": pl.String, "answer": pl.String, "chars": pl.Int64, "tokens": pl.Int64, "prompt_tokens": pl.Int64,
    "seconds": pl.Float64, "backend": pl.String, "quantization": pl.String, "model_ref": pl.String,
    "finish_reason": pl.String, "seed": pl.Int64, "temperature": pl.Float64, "max_new_tokens": pl.Int64,
}  # fmt: skip


def build_answers_asset(format_name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"answers_{format_name}",
        group_name=GROUP,
        kinds={"llama_cpp", "ollama", "duckdb"},
        code_version="1",
        partitions_def=model_n_partitions(),
        pool=GPU_POOL,
        ins={"deployment": dg.AssetIn(key="deployment"), "test_set": dg.AssetIn(key="test_set")},
        metadata=table_metadata("eval.answers", partition_expr=MODEL_N, fixed={"format": format_name}),
        description=(
            f"The profile's evaluation questions (human_written, first eval_questions by id) answered by the "
            f"{format_name.upper()} deployment with the profile's deterministic generation settings; per answer "
            "the text, characters, tokens, seconds, backend and finish reason."
        ),
    )
    def answers_asset(
        context: dg.AssetExecutionContext,
        generation: GenerationBackend,
        deployment: pl.DataFrame,
        test_set: pl.DataFrame,
    ) -> dg.Output[pl.DataFrame]:
        model, n = split_model_n(context)
        rows = deployment.filter(pl.col("format") == format_name)
        served = _single_row(rows, f"deployment ({format_name})", model, n)
        if served["status"] != "ok":
            context.log.warning(
                f"{model} n={n} {format_name} is not servable: {served['detail']}; no answers"
            )
            frame = pl.DataFrame(schema=ANSWER_SCHEMA)
            return _output(frame, status="unavailable", reason=served["detail"], questions=0)
        profile = current_profile()
        try:
            questions = select_eval_questions(test_set, profile.eval_questions)
        except AnsweringInputError as exc:
            raise dg.Failure(str(exc)) from exc
        backend = serving_backend(generation, served)
        settings_used = profile.generation
        stops = tuple(model_entry(model).stop_tokens)
        progress = ProgressLogger(
            f"answers_{format_name} {model} n={n}", questions.height, context.log.info, unit="questions"
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
                "model": model, "n": n, "format": format_name, "question_id": str(question["question_id"]),
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


answers_f16, answers_q4_k_m = (build_answers_asset(format_name) for format_name in GGUF_FORMATS)


# ------------------------------------------------------------------------------------- job, sensor

stage3_job = dg.define_asset_job(
    "stage3_export_evaluation",
    selection=dg.AssetSelection.groups(GROUP, "judging"),
    partitions_def=model_n_partitions(),
    tags={STAGE_TAG: "3"},
    description="Stage 3 for one model at the chosen n: merge, GGUF F16 and Q4_K_M, deployment, answers, judging.",
)


def stage3_requests(
    instance: dg.DagsterInstance, store: DuckDBStore, profile: Profile, cursor: str | None
) -> tuple[list[dg.RunRequest], str, str]:
    """(run requests, new cursor, reason): stage 3 for each model whose adapter at the chosen n is newer than
    the one stage 3 last ran on. The cursor maps partition keys to the adapter materialization seen."""
    seen: dict[str, int] = json.loads(cursor) if cursor else {}
    n = chosen_n(store, profile)
    if n is None:
        return (
            [],
            json.dumps(seen),
            f"no chosen n yet: eval.scale_curve has no optimum for {profile.models[0]}",
        )
    requests = []
    for model in profile.models:
        key = model_n_key(model, n)
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("lora_adapter"), asset_partitions=[str(key)]), limit=1
        ).records
        if not records or records[0].storage_id <= seen.get(str(key), 0):
            continue
        seen[str(key)] = records[0].storage_id
        requests.append(dg.RunRequest(run_key=f"stage3-{key}-{records[0].storage_id}", partition_key=key))
    reason = f"stage 3 at n={n} for {len(requests)} model(s)" if requests else f"no new adapter at n={n}"
    return requests, json.dumps(seen), reason


@dg.sensor(
    job=stage3_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts stage 3 for a model when its adapter at the chosen n is new (e.g. after stage 2).",
)
def stage3_sensor(context: dg.SensorEvaluationContext, store: DuckDBStore) -> dg.SensorResult:
    requests, cursor, reason = stage3_requests(context.instance, store, current_profile(), context.cursor)
    return dg.SensorResult(
        run_requests=requests, cursor=cursor, skip_reason=None if requests else dg.SkipReason(reason)
    )


def generation_resource() -> GenerationBackend:
    """The profile's generation backend (``generation.backend``) with its context size."""
    generation_settings = current_profile().generation
    return backend_for(generation_settings.backend, generation_settings.num_ctx)


defs = dg.Definitions(
    assets=[merged_model, gguf_f16, gguf_q4_k_m, deployment, answers_f16, answers_q4_k_m],
    jobs=[stage3_job],
    sensors=[stage3_sensor],
    resources={"generation": generation_resource(), "llama_cpp_tools": LlamaCppTools()},
)
