"""Stage 3, GGUF: llama.cpp's converter and quantizer with fidelity measured on the test set (``gguf_f16``, ``gguf_q4_k_m``; an ``nf4`` row where the converter refuses a model).

No ``from __future__ import annotations`` here: Dagster reads the real annotations of asset parameters."""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets.artifacts import artifact_record
from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.export.answering import (
    select_eval_questions,
)
from jpslm_assets.export.assets_partition import adapter_columns, partition_adapter, stage3_metadata
from jpslm_assets.export.fidelity import ScoringSequence, compare_tokenizations, mean_nll, relative_difference
from jpslm_assets.export.tables import (
    EMPTY_ARTIFACT,
    GGUF_SCHEMA,
    GROUP,
    NLL_TOLERANCE,
    PARTITION_COLUMN,
    Q4_SIZE_LIMIT,
    export_folder,
)
from jpslm_assets.outputs import single_row, versioned_output
from jpslm_assets.partitions import (
    Stage3Adapter,
    stage3_partitions,
)
from jpslm_assets.resources.generation_llama_cpp import LlamaCppBackend
from jpslm_assets.resources.generation_transformers import TransformersBackend
from jpslm_assets.resources.llama_cpp_tools import (
    ConversionFailed,
    LlamaCppToolError,
    LlamaCppTools,
    gguf_summary,
    remove_stale_partials,
)
from jpslm_assets.resources.loaded_models import release_loaded_models
from jpslm_assets.resources.model_merge import gguf_tokenizer_overrides
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training.chat_format import EncodingError, encode_pair, render_prompt

_MERGED_AND_TESTS = {"merged_model": dg.AssetIn(key="merged_model"), "test_set": dg.AssetIn(key="test_set")}


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
    merged = single_row(merged_model, "merged_model", adapter=adapter.key)
    model, n = adapter.model, int(merged["n"])
    merged_dir = Path(merged["artifact_path"])
    name = adapter.key.replace("@", "-")
    target = export_folder(adapter.key, n) / f"{name}-n{n}-{format_name}.gguf"
    remove_stale_partials(target)
    profile = current_profile()
    questions = config.fidelity_questions or profile.export.fidelity_questions or profile.eval_questions
    f16_row = single_row(gguf_f16, "gguf_f16", adapter=adapter.key) if gguf_f16 is not None else None
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
        yield versioned_output(_gguf_frame(row), status="failed", reason=str(exc), failure_kind=exc.kind)
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
    yield versioned_output(
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
