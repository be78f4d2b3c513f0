"""CPU LoRA training throughput per demo model: real (non-padding) tokens per second, side by side.

Builds each demo model's base the way ``base_model`` does, then trains a LoRA adapter with the demo
profile's settings (stage 1, fp32 on CPU) for a fixed number of optimizer steps on the first n pairs of the
same nested subsets the dataset stage builds from the shipped seed graph, once in float32 (the default) and
once with bf16 autocast (``LoraTrainer(cpu_precision="bf16")``). Prints per model and precision: steps,
non-padding tokens, wall seconds and process CPU seconds of the training loop, tokens/s (wall and per CPU-second), the bf16/fp32
speed ratio, and the time a full demo grid (n = 60 + 120 + 180, 1 epoch) would take at that rate. The
load average and torch thread count are printed too: on a shared machine wall-clock rates fall with load,
while tokens per CPU-second move much less.

    python benchmarks/bench_cpu_training.py                    # all demo models, fp32 and bf16, 6 steps
    python benchmarks/bench_cpu_training.py --steps 10 --models tiny-llama --precisions fp32
    python benchmarks/bench_cpu_training.py --models smollm2-135m --threads 1 2 --max-seq-length 192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "jpslm_assets" / "data"


def seed_subset(n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rebalanced pool, first n pairs of the nested order), built from the shipped seed graph."""
    from jpslm_assets.qa import generation as qa_generation
    from jpslm_assets.qa import subsets as qa_subsets
    from jpslm_assets.qa.templates import load_catalogue

    def read(name: str) -> pl.DataFrame:
        lines = (DATA / "kg" / name).read_text(encoding="utf-8").splitlines()
        return pl.DataFrame([json.loads(line) for line in lines if line])

    catalogue = load_catalogue(DATA / "qa_templates.yaml")
    raw, _ = qa_generation.expand_templates(read("nodes.jsonl"), read("relations.jsonl"), catalogue)
    pool, _ = qa_generation.deduplicate(raw, catalogue)
    rebalanced = qa_subsets.rebalance(pool, catalogue.rebalance.keep_fraction, catalogue.rebalance.seed).frame
    ordered = qa_subsets.nested_order(rebalanced, catalogue.subsets.seed)
    return rebalanced, qa_subsets.take_subset(ordered, n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-qwen2", "smollm2-135m"])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps timed per model")
    parser.add_argument("--n", type=int, default=60, help="training-set size the steps draw from")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=[0],
        help="torch thread counts to time (0: the trainer's choice)",
    )
    parser.add_argument("--max-seq-length", type=int, help="instead of the demo profile's max_seq_length")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jpslm_assets.resources.cpu import cpu_thread_count
    from jpslm_assets.resources.models import ModelFactory
    from jpslm_assets.resources.trainer_loop import run_training
    from jpslm_assets.resources.trainer_spec import TrainingSpec, write_training_records
    from jpslm_assets.settings import load_profile
    from jpslm_assets.training.plan import resolve_plan

    profile = load_profile("demo")
    pool, subset = seed_subset(args.n)
    corpus = list(zip(pool["question"], pool["answer"], strict=True))
    records = list(zip(subset["qa_id"].cast(pl.Utf8), subset["question"], subset["answer"], strict=True))
    grid_examples = sum(profile.n_grid) * profile.train.epochs
    print(f"# CPU LoRA training throughput, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# demo profile: batch {profile.train.per_device_batch_size} x accumulation "
        f"{profile.train.gradient_accumulation_steps}, max_seq_length "
        f"{args.max_seq_length or profile.train.max_seq_length}, "
        f"{args.steps} steps on n={args.n} pairs (avg answer {subset['answer'].str.len_chars().mean():.0f} chars)"
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cpu-training-") as scratch:
        root = Path(scratch)
        data = root / "train.jsonl"
        write_training_records(data, records)
        factory = ModelFactory(seed=profile.train.seed)
        for model in args.models:
            entry = factory.entry(model)
            started = time.perf_counter()
            base = factory.prepare_base(
                model, corpus if entry.source == "config" else [], root / "bases", "b"
            )
            base_seconds = time.perf_counter() - started
            overrides = {"max_steps": args.steps, "checkpoint_every_steps": args.steps + 1}
            if args.max_seq_length:
                overrides["max_seq_length"] = args.max_seq_length
            plan = resolve_plan(profile.train, 1, overrides)
            for precision, requested in [(p, t) for p in args.precisions for t in args.threads]:
                run = f"{model}-{precision}-t{requested}"
                spec = TrainingSpec(
                    partition=f"{model}|{args.n}",
                    model=model,
                    base_model_ref=base.base_model_ref,
                    end_of_turn=base.end_of_turn,
                    plan=plan,
                    backend="cpu_lora",
                    data_path=str(data),
                    checkpoint_dir=str(root / "checkpoints" / run),
                    output_dir=str(root / "adapters" / run),
                    cpu_threads=requested or None,
                    cpu_bf16=precision == "bf16",
                )
                load_before = os.getloadavg()[0]
                threads = cpu_thread_count(requested or None)
                result = run_training(spec, lambda message: None)
                cpu_seconds = result.cpu_seconds
                examples_per_s = result.steps * plan.effective_batch_size / result.seconds
                rows.append(
                    {
                        "model": model,
                        "precision": precision,
                        "threads": threads,
                        "max_seq_length": plan.max_seq_length,
                        "base_s": base_seconds,
                        "steps": result.steps,
                        "tokens": result.tokens,
                        "tokens_per_example": result.tokens / (result.steps * plan.effective_batch_size),
                        "wall_s": result.seconds,
                        "cpu_s": cpu_seconds,
                        "tokens_per_s": result.tokens_per_s,
                        "tokens_per_cpu_s": result.tokens / cpu_seconds,
                        "demo_grid_min": grid_examples / examples_per_s / 60,
                        "load": (load_before + os.getloadavg()[0]) / 2,
                        "final_loss": result.train_loss_final,
                    }
                )
    fp32_rate = {
        (row["model"], row["threads"]): row["tokens_per_cpu_s"] for row in rows if row["precision"] == "fp32"
    }
    print()
    print(
        "| model | precision | threads | max_seq_length | base build s | steps | tokens | tokens/example | "
        "train wall s | CPU s | tokens/s | tokens/CPU-s | vs fp32 (per CPU-s) | est. demo grid (min) | "
        "final loss | load avg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        fp32 = fp32_rate.get((row["model"], row["threads"]))
        ratio = row["tokens_per_cpu_s"] / fp32 if fp32 else float("nan")
        print(
            f"| {row['model']} | {row['precision']} | {row['threads']} | {row['max_seq_length']} | "
            f"{row['base_s']:.1f} | {row['steps']} | "
            f"{row['tokens']} | {row['tokens_per_example']:.0f} | {row['wall_s']:.1f} | {row['cpu_s']:.1f} | "
            f"{row['tokens_per_s']:.0f} | {row['tokens_per_cpu_s']:.0f} | {ratio:.2f} | "
            f"{row['demo_grid_min']:.1f} | {row['final_loss']:.3f} | {row['load']:.1f} |"
        )


if __name__ == "__main__":
    main()
