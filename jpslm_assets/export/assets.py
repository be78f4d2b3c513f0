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

import time
from pathlib import Path

import dagster as dg
import polars as pl

from jpslm_assets.artifacts import artifact_record
from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.export.assets_gguf import gguf_f16, gguf_q4_k_m
from jpslm_assets.export.assets_partition import (
    adapter_columns,
    adapter_run,
    partition_adapter,
    stage3_metadata,
)
from jpslm_assets.export.assets_serving import ANSWERS_ASSETS, deployment
from jpslm_assets.export.tables import GROUP, export_folder
from jpslm_assets.outputs import versioned_output
from jpslm_assets.partitions import (
    stage1_to_stage3_mapping,
    stage2_to_stage3_mapping,
    stage3_partitions,
)
from jpslm_assets.resources.generation import GenerationBackend
from jpslm_assets.resources.generation_backends import backend_for
from jpslm_assets.resources.llama_cpp_tools import (
    LlamaCppTools,
    remove_stale_partials,
)
from jpslm_assets.resources.model_merge import MergeError, merge_adapter
from jpslm_assets.settings import current_profile

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
    run = adapter_run(adapter, stage1_lora_adapter, stage2_lora_adapter, optimal_scale)
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
    return versioned_output(
        frame,
        path=record["artifact_path"],
        bytes=record["artifact_bytes"],
        sha256=record["artifact_sha256"],
        dtype=result.dtype,
        parameters=result.parameters,
    )


# ------------------------------------------------------------------------------------------------ GGUF




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
