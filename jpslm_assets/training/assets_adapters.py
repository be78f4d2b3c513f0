"""What both training stages run: an adapter's training (``train_adapter``) and its test-set NLL (``score_test_nll``), with their run configs and asset checks. The stages' assets (``assets_stage1``, ``assets_stage2``) call these with their own partition, model and LoRA shape.

No ``from __future__ import annotations`` here: Dagster reads the real annotations of config classes."""

import dataclasses
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
from jpslm_assets.artifacts import artifact_record, write_atomic
from jpslm_assets.catalogue import model_entry
from jpslm_assets.export.answering import select_eval_questions
from jpslm_assets.outputs import png_metadata, single_row, versioned_output
from jpslm_assets.resources.models import ModelFactory
from jpslm_assets.resources.trainer import LoraTrainer
from jpslm_assets.resources.trainer_spec import TrainingSpec, write_training_records
from jpslm_assets.settings import current_profile
from jpslm_assets.store import DuckDBStore
from jpslm_assets.training import scaling
from jpslm_assets.training.chat_format import encode_pairs
from jpslm_assets.training.nll import NllResult, answer_token_nll
from jpslm_assets.training.plan import resolve_plan
from jpslm_assets.training.plots import plot_loss_curves
from jpslm_assets.training.tables import (
    EVAL_MAX_TOKENS,
    LOSS_CURVE_TABLE,
    RUNS_TABLES,
    TEST_NLL_TABLES,
    digest,
    row_frame,
)


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


def train_adapter(
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
    base = single_row(base_model, "base_model (train.base_models)", model=model)
    records = _training_records(training_subset, model, n)
    plan = resolve_plan(profile.train, stage, config.overrides())
    backend = trainer.resolved_backend()

    # fp32 and bf16-autocast runs train differently: a checkpoint of one is never resumed by the other.
    if backend == "cpu_lora":
        precision, precision_reason = trainer.resolved_cpu_precision()
        context.log.info(f"{model} n={n}: CPU precision {precision}: {precision_reason}")
    else:
        precision, precision_reason = "nf4+bf16", f"{backend}: 4-bit base weights with bf16 compute"
    data_key = digest(records, base["artifact_sha256"], plan.fingerprint(), backend, precision)[:16]
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
    return versioned_output(
        row_frame(row),
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
        **png_metadata(
            f"loss_stage{stage}_{model}_n{n}", figure, f"loss {model} n={n}", settings.artifact_dir() / "plots"
        ),
    )


PAPER_SETTINGS = (
    "lr 2e-4 cosine, 10% warmup, effective batch 8, all attention and MLP projections; checkpoints every K "
    "steps, and a restarted run resumes from the last complete one. Loss on answer tokens only; the loss "
    "curve goes to ``train.loss_curve``."
)


def adapters_intact_check(adapter: dg.AssetsDefinition, stage: int) -> dg.AssetChecksDefinition:
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


class NllScoringConfig(dg.Config):
    """Scoring settings for the test-NLL assets."""

    batch_size: int = 8
    max_tokens: int = EVAL_MAX_TOKENS


def score_test_nll(
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
    base_key = digest(
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
    return versioned_output(
        row_frame(row),
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


NLL_DESCRIPTION = (
    "Mean answer-token NLL and perplexity of the adapted model on the profile's evaluation questions (a "
    "seeded, category-stratified sample of the human-written test questions) against their reference "
    "answers (batched, no gradients). The base model without the adapter is scored on the same tokens, so "
    "the table shows what training changed (``nll_change_vs_base``)."
)


def nll_finite_check(nll_asset: dg.AssetsDefinition, stage: int) -> dg.AssetChecksDefinition:
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
