"""QLoRA training throughput on one CUDA GPU: the project's trainer against a plain peft + bitsandbytes loop.

Every variant trains the same LoRA (r=16, alpha 16, all attention and MLP projections) on the same NF4
double-quant base (bf16 compute) over the same examples in the same order (the records file, read front to back:
optimizer step s takes examples 8s .. 8s+7 in every variant), with the same schedule (AdamW at 2e-4, cosine with
10% linear warm-up over the run's total steps, gradient norm clipped at 1.0) and the same loss (mean NLL over the
step's answer tokens). Each prints its loss at every step; the report gives every variant's largest difference
from the baseline's loss at the same step, which should be bf16 noise. What differs is only how the work is laid
out on the device:

- ``baseline``: the textbook loop: ``prepare_model_for_kbit_training`` with gradient checkpointing, every batch
  padded to ``max_seq_length`` (384), one forward/backward per optimizer step.
- ``project``: ``jpslm_assets.resources.trainer.run_training`` with backend ``bnb_qlora`` and its defaults, as
  the ``lora_adapter`` asset runs it: padding-free rows, gradient checkpointing only when activations would not
  fit, micro-batch from free memory (see ``choose_layout``), decoder layers compiled with ``torch.compile``,
  per-example flash attention in the padding-free rows (``resources/packed_attention.py``).
- ``project_eager``: the same without compiling the decoder layers (Liger's fused kernels instead, when
  ``liger_kernel`` imports).
- ``project_sdpa``: the same with SDPA and the block-diagonal mask instead of per-example attention.
- ``project_bnb_matmul``: the same with bitsandbytes' ``matmul_4bit`` for the NF4 projections instead of the
  dequantize + matmul path (``resources/nf4_linear.py``).
- ``project_padded``: the same with padding-free rows switched off (batches padded to their longest example,
  SDPA).
- ``unsloth``: the project's trainer with backend ``unsloth`` (unsloth's own 4-bit loading, LoRA kernels and
  checkpointing), where unsloth imports. Unsloth pins older trl/datasets than the rest of the stack, so
  ``--unsloth-path`` can name a folder that holds unsloth and its pins; it is put first on this run's path only.

``--profile-steps K`` runs K more steps after the timed ones in every variant, under PyTorch's profiler (they are
not timed), and prints the
operations that took the most CUDA and CPU time.

The base is an 8B Llama-3-shaped model with random weights (hidden 4096, 32 layers, 32 heads / 8 KV heads,
MLP 14336, vocab 128,256), built from a config on the GPU and saved once; nothing is downloaded. Its tokenizer
is the project's corpus-trained SentencePiece model (ids stay below 4,096; the embedding and LM head keep the
full vocabulary, so the compute is an 8B model's). Training examples are the shipped test set's questions with
reference answers joined until each example reaches a length drawn from 220-380 tokens (about the paper's QA
pairs), so padding to 384 wastes what it would waste on real data.

Reported per variant, after ``--warmup`` steps: real (non-padding) tokens/s, padded tokens/s, seconds per
optimizer step, peak CUDA memory, and minutes per 1,000 samples x 3 epochs at the measured rate; also the
seconds the warm-up steps took (with compiled layers that is mostly compiling, paid once per run). Each variant
runs in its own process, in the same invocation. Timing is repeated two ways: ``--windows W`` times W windows of
``--steps`` steps one after the other in each process, and ``--repeats R`` starts every variant's process R times,
the variants interleaved (a, b, a, b, ...); the table gives the minimum and the median of real tokens/s over all
windows of all repeats, and the speed-up as the ratio of medians.

    python benchmarks/bench_gpu_training.py --work /tmp/bench-gpu --steps 24 --warmup 4
    python benchmarks/bench_gpu_training.py --work /tmp/bench-smoke --shape tiny --variants project   # CPU ok
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_SET = ROOT / "jpslm_assets" / "data" / "test_set_200.jsonl"
VARIANTS = (
    "baseline",
    "project",
    "project_eager",
    "project_sdpa",
    "project_bnb_matmul",
    "project_padded",
    "unsloth",
)

SHAPES: dict[str, dict[str, Any]] = {
    # Meta-Llama-3-8B's published architecture.
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    # For checking the script itself on any machine.
    "tiny": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=False,
    ),
}  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def test_pairs() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in TEST_SET.read_text("utf-8").splitlines() if line.strip()]
    return [(row["question"], row["reference_answer"]) for row in rows]


def prepare(work: Path, shape: str, samples: int, seed: int) -> None:
    """Base model folder (``work/model``) and training records (``work/train.jsonl``), built once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jpslm_assets.catalogue import model_entry
    from jpslm_assets.resources.models import build_config_model, load_tokenizer
    from jpslm_assets.resources.trainer_spec import write_training_records
    from jpslm_assets.training.chat_format import encode_training_pairs

    model_dir = work / "model"
    if (model_dir / "done").is_file():
        log(f"reusing {model_dir}")
        return
    shutil.rmtree(model_dir, ignore_errors=True)
    pairs = test_pairs()
    started = time.monotonic()
    tokenizer_dir = work / "tokenizer-source"
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    tokenizer_dir.mkdir(parents=True)
    build_config_model(model_entry("tiny-llama"), pairs, tokenizer_dir, seed)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    log(f"tokenizer: {len(tokenizer)} pieces ({time.monotonic() - started:.0f}s)")

    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, max_shard_size="4GB")
    del model
    for name in os.listdir(tokenizer_dir):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(tokenizer_dir / name, model_dir / name)
    log(
        f"{shape}: {parameters / 1e9:.2f}B parameters built on {device} and saved ({time.monotonic() - started:.0f}s)"
    )

    rng = random.Random(seed)
    answers = [answer for _, answer in pairs]
    records = []
    for index in range(samples):
        question = pairs[index % len(pairs)][0]
        target = rng.randint(220, 380)
        answer = ""
        while True:
            candidate = answer + rng.choice(answers)
            encoded, _ = encode_training_pairs(tokenizer, [("x", question, candidate)], "<|im_end|>", 4096)
            answer = candidate
            if len(encoded[0].input_ids) >= target:
                break
        cut = len(answer)
        while cut > 1:  # trim characters until the example is at most the target length
            encoded, _ = encode_training_pairs(tokenizer, [("x", question, answer[:cut])], "<|im_end|>", 4096)
            if len(encoded[0].input_ids) <= target:
                break
            cut -= max(1, (len(encoded[0].input_ids) - target) // 2)
        records.append((f"B-{index:05d}", question, answer[:cut]))
    write_training_records(work / "train.jsonl", records)
    (model_dir / "done").write_text("ok")


def encoded_examples(work: Path, max_len: int) -> list[Any]:
    from jpslm_assets.resources.models import load_tokenizer
    from jpslm_assets.resources.trainer_spec import read_training_records
    from jpslm_assets.training.chat_format import encode_training_pairs

    tokenizer = load_tokenizer(str(work / "model"))
    examples, skipped = encode_training_pairs(
        tokenizer, read_training_records(work / "train.jsonl"), "<|im_end|>", max_len
    )
    assert not skipped
    return examples


class StepProfiler:
    """torch.profiler over steps (start, start + count]; prints the top operations when done."""

    def __init__(self, name: str, start: int, count: int) -> None:
        self.name, self.start, self.count = name, start, count
        self.profiler: Any = None

    def step_begin(self, step: int) -> None:
        import torch

        if self.count and step == self.start:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def step_end(self, step: int) -> None:
        import torch

        if self.profiler is not None and step == self.start + self.count - 1:
            torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            averages = self.profiler.key_averages()
            for key in ("self_cuda_time_total", "cpu_time_total"):
                print(f"== {self.name}: top operations by {key} over {self.count} steps", flush=True)
                print(averages.table(sort_by=key, row_limit=22, max_name_column_width=60), flush=True)
            self.profiler = None


def warmup_steps(total_steps: int) -> int:
    """Linear warm-up steps for a warm-up ratio of 0.1, as the Trainer counts them (rounded up)."""
    return math.ceil(total_steps * 0.1)


def windows_of(times: list[float], tokens: list[int], steps: int) -> list[dict[str, float]]:
    """Per timed window of ``steps`` optimizer steps: seconds per step and real tokens/s."""
    found = []
    for start in range(0, len(times) - steps + 1, steps):
        seconds = sum(times[start : start + steps])
        found.append(
            {"seconds_per_step": seconds / steps, "real_tokens_per_s": sum(tokens[start : start + steps]) / seconds}
        )
    return found


def run_baseline(
    work: Path,
    steps: int,
    warmup: int,
    batch: int,
    max_len: int,
    seed: int,
    profile_steps: int = 0,
    windows: int = 1,
) -> dict[str, Any]:
    """The plain loop the trainer is measured against; see the module docstring."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_scheduler

    from jpslm_assets.training.chat_format import IGNORE_INDEX
    from jpslm_assets.training.plan import DEFAULT_TARGET_MODULES

    examples = encoded_examples(work, max_len)
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(
        work / "model",
        dtype=torch.bfloat16,
        device_map={"": 0},
        attn_implementation="sdpa",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    torch.manual_seed(seed)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(DEFAULT_TARGET_MODULES))
    )
    load_seconds = time.monotonic() - started
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0
    )
    total = warmup + windows * steps + profile_steps
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps(total), num_training_steps=total)
    pad = model.config.pad_token_id or 0
    model.train()
    torch.cuda.reset_peak_memory_stats()
    step_times, real_tokens, losses = [], [], []
    profiler = StepProfiler("baseline", warmup + windows * steps, profile_steps)
    for step in range(total):
        profiler.step_begin(step)
        chosen = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        input_ids = torch.full((batch, max_len), pad, dtype=torch.long)
        labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((batch, max_len), dtype=torch.long)
        for row, example in enumerate(chosen):
            length = len(example.input_ids)
            input_ids[row, :length] = torch.tensor(example.input_ids)
            labels[row, :length] = torch.tensor(example.labels)
            mask[row, :length] = 1
        torch.cuda.synchronize()
        tick = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        profiler.step_end(step)
        if warmup <= step < warmup + windows * steps:
            step_times.append(time.perf_counter() - tick)
            real_tokens.append(int(mask.sum()))
        losses.append(float(loss))
        log(f"baseline step {step + 1}/{total} loss {losses[-1]:.4f} {time.perf_counter() - tick:.3f}s")
    seconds = sum(step_times)
    timed = len(step_times)
    return {
        "variant": "baseline",
        "load_seconds": round(load_seconds, 1),
        "steps_timed": timed,
        "seconds_per_step": seconds / timed,
        "real_tokens_per_s": sum(real_tokens) / seconds,
        "padded_tokens_per_s": timed * batch * max_len / seconds,
        "mean_real_tokens_per_example": sum(real_tokens) / (timed * batch),
        "windows": windows_of(step_times, real_tokens, steps),
        "losses": losses,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3,
        "layout": {"per_device_batch_size": batch, "gradient_checkpointing": True, "padding_free": False},
        "final_loss": float(loss),
    }


def run_project(
    work: Path,
    steps: int,
    warmup: int,
    batch: int,
    max_len: int,
    seed: int,
    variant: str,
    profile_steps: int = 0,
    windows: int = 1,
) -> dict[str, Any]:
    """The project's trainer, as the ``lora_adapter`` asset calls it, on the same data in the same order."""
    if variant == "unsloth":
        import unsloth  # noqa: F401  (before transformers, so that its patches apply)
    import torch
    from transformers import TrainerCallback

    from jpslm_assets.resources import trainer_loop as trainer_lib
    from jpslm_assets.training.plan import LoraPlan

    backend = "bnb_qlora" if torch.cuda.is_available() else "cpu_lora"
    if variant == "unsloth":
        backend = "unsloth"
    run_dir = work / f"run-{variant}"
    on_cuda = backend != "cpu_lora"
    profile_steps = profile_steps if on_cuda else 0
    profiler = StepProfiler(variant, warmup + steps, profile_steps)

    class Timing(TrainerCallback):  # per-step wall time in the log, and the profiler's window
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.tick = time.perf_counter()
            profiler.step_begin(state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_cuda:
                torch.cuda.synchronize()
            profiler.step_end(state.global_step - 1)
            log(f"{variant} step {state.global_step}: {time.perf_counter() - self.tick:.3f}s")

    prepare_run = trainer_lib.prepare_run

    def prepare_with_timing(spec: Any, sink: Any) -> Any:
        prepared = prepare_run(spec, sink)
        prepared.trainer.add_callback(Timing())
        # The records in file order, as the baseline reads them (the asset's runs shuffle with the plan's seed).
        dataset = prepared.trainer.train_dataset
        prepared.trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(dataset)
        return prepared

    trainer_lib.prepare_run = prepare_with_timing  # run_training looks it up at call time
    shutil.rmtree(run_dir, ignore_errors=True)
    plan = LoraPlan(
        stage=1, r=16, alpha=16, dropout=0.0, epochs=3, max_steps=warmup + windows * steps + profile_steps,
        learning_rate=2e-4,
        lr_scheduler="cosine", warmup_ratio=0.1, per_device_batch_size=2, gradient_accumulation_steps=batch // 2,
        max_seq_length=max_len, checkpoint_every_steps=10**6, seed=seed,
    )  # fmt: skip
    spec = trainer_lib.TrainingSpec(
        partition="bench|8b",
        model="bench-llama3-8b",
        base_model_ref=str(work / "model"),
        end_of_turn="<|im_end|>",
        plan=plan,
        backend=backend,
        data_path=str(work / "train.jsonl"),
        checkpoint_dir=str(run_dir / "checkpoints"),
        output_dir=str(run_dir / "adapter"),
        padding_free=variant != "project_padded",
        compile_layers=False if variant == "project_eager" else None,
        packed_attention=False if variant == "project_sdpa" else None,
        dequantize_matmul=variant != "project_bnb_matmul",
        # The trainer plans within the cap and caps its own process there (--memory-cap-gib).
        memory_budget_gib=float(os.environ["JPSLM_BENCH_MEMORY_CAP_GIB"])
        if os.environ.get("JPSLM_BENCH_MEMORY_CAP_GIB")
        else None,
    )
    started = time.monotonic()
    result = trainer_lib.run_training(spec, log)
    curve = result.loss_curve
    first, last = curve[warmup - 1], curve[warmup + windows * steps - 1]
    assert first.seconds is not None and last.seconds is not None
    seconds = last.seconds - first.seconds
    real = last.tokens_seen - first.tokens_seen
    timed = last.step - first.step
    step_times, step_tokens = [], []
    window = warmup + windows * steps
    for before, after in zip(curve[warmup - 1 : window - 1], curve[warmup:window], strict=True):
        assert before.seconds is not None and after.seconds is not None
        step_times.append(after.seconds - before.seconds)
        step_tokens.append(after.tokens_seen - before.tokens_seen)
    peak = result.peak_memory_bytes or 0
    return {
        "variant": variant,
        "total_seconds": round(time.monotonic() - started, 1),
        "warmup_seconds": round(first.seconds, 1),
        "steps_timed": timed,
        "seconds_per_step": seconds / timed,
        "real_tokens_per_s": real / seconds,
        "padded_tokens_per_s": real / seconds,
        "mean_real_tokens_per_example": real / (timed * batch),
        "windows": windows_of(step_times, step_tokens, steps),
        "losses": [point.loss for point in curve],
        "peak_memory_gib": peak / 1024**3,
        "layout": result.layout.model_dump() if result.layout else None,
        "final_loss": result.train_loss_final,
        "backend": result.backend,
        "precision": result.precision,
        "versions": versions() if variant == "unsloth" else None,
    }


def versions() -> dict[str, str]:
    import importlib.metadata as metadata

    found = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "trl",
        "bitsandbytes",
        "accelerate",
        "liger_kernel",
        "unsloth",
    ):
        try:
            found[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_variant(args: argparse.Namespace, variant: str, repeat: int) -> dict[str, Any]:
    """One variant in a process of its own; its result row (or the error it ended with)."""
    command = [sys.executable, __file__, *sys.argv[1:], "--only", variant]
    environment = dict(os.environ)
    if variant == "unsloth" and args.unsloth_path:
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(args.unsloth_path), *filter(None, [environment.get("PYTHONPATH")])]
        )
    log(f"--- {variant} (repeat {repeat})")
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    output = completed.stdout + completed.stderr
    result_lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not result_lines:
        log(f"{variant} failed (exit {completed.returncode}):\n{output[-4000:]}")
        return {"variant": variant, "repeat": repeat, "error": output[-1500:]}
    keep = [line for line in output.splitlines() if not line.startswith("RESULT ")]
    print("\n".join(line for line in keep if "Loading weights" not in line and "%|" not in line), flush=True)
    row = json.loads(result_lines[-1].removeprefix("RESULT "))
    row["repeat"] = repeat
    log(f"{variant}: {row['real_tokens_per_s']:.0f} real tokens/s")
    return row


def summarize(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant over all its windows and repeats: min and median tokens/s, peak memory, loss agreement.

    The speed-up is the ratio of medians to the baseline's; the loss difference is the largest absolute
    difference from the baseline's loss at the same optimizer step (first repeat of each), which should be
    bf16 noise since both see the same examples under the same schedule."""
    baseline = [r for r in rows if r["variant"] == "baseline" and "error" not in r]
    baseline_median = (
        statistics.median(w["real_tokens_per_s"] for r in baseline for w in r["windows"]) if baseline else None
    )
    found = []
    for variant in variants:
        done = [r for r in rows if r["variant"] == variant and "error" not in r]
        failed = [r for r in rows if r["variant"] == variant and "error" in r]
        if not done:
            found.append({"variant": variant, "failed": len(failed)})
            continue
        speeds = [w["real_tokens_per_s"] for r in done for w in r["windows"]]
        median = statistics.median(speeds)
        entry: dict[str, Any] = {
            "variant": variant,
            "processes": len(done),
            "failed": len(failed),
            "windows": len(speeds),
            "real_tokens_per_s_min": min(speeds),
            "real_tokens_per_s_median": median,
            "seconds_per_step_median": statistics.median(w["seconds_per_step"] for r in done for w in r["windows"]),
            "peak_memory_gib_max": max(r["peak_memory_gib"] for r in done),
            "warmup_seconds_median": statistics.median(r.get("warmup_seconds") or 0.0 for r in done),
            "speedup_vs_baseline": median / baseline_median if baseline_median else None,
            "minutes_per_1000x3": 3000 * done[0]["mean_real_tokens_per_example"] / median / 60,
            "layout": done[0].get("layout"),
        }
        if baseline and variant != "baseline":
            pairs = list(zip(done[0]["losses"], baseline[0]["losses"], strict=True))
            differences = [abs(a - b) for a, b in pairs]
            entry["loss_max_abs_difference"] = max(differences)
            entry["loss_max_relative_difference"] = max(d / abs(b) for d, (_, b) in zip(differences, pairs, strict=True))
        found.append(entry)
    return found


def print_summary(summary: list[dict[str, Any]]) -> None:
    print(
        "\n| variant | processes x windows | real tok/s min | real tok/s median | s/step (median) | peak GiB | "
        "vs baseline (medians) | max loss diff to baseline | min per 1k x 3 ep | layout |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in summary:
        if "windows" not in entry:
            print(f"| {entry['variant']} | failed ({entry['failed']}) | | | | | | | | |")
            continue
        layout = entry.get("layout") or {}
        ratio = entry["speedup_vs_baseline"]
        difference = entry.get("loss_max_abs_difference")
        loss_text = (
            "-"
            if difference is None
            else f"{difference:.4f} ({entry['loss_max_relative_difference']:.2%})"
        )
        print(
            f"| {entry['variant']} | {entry['processes']} x {entry['windows'] // entry['processes']} | "
            f"{entry['real_tokens_per_s_min']:,.0f} | {entry['real_tokens_per_s_median']:,.0f} | "
            f"{entry['seconds_per_step_median']:.3f} | {entry['peak_memory_gib_max']:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
            f"{loss_text} | "
            f"{entry['minutes_per_1000x3']:.2f} | micro {layout.get('per_device_batch_size')}, ckpt "
            f"{'on' if layout.get('gradient_checkpointing') else 'off'}, padding-free "
            f"{'on' if layout.get('padding_free') else 'off'}, compiled "
            f"{'on' if layout.get('compiled_layers') else 'off'}, attention "
            f"{'varlen' if layout.get('packed_attention') else 'SDPA'}; warm-up {entry['warmup_seconds_median']:.0f} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="folder for the base model and data (~16 GB)"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps timed per variant")
    parser.add_argument("--warmup", type=int, default=4, help="optimizer steps run before timing")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--max-seq-length", type=int, default=384)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile-steps", type=int, default=0, help="profile this many steps per variant")
    parser.add_argument(
        "--unsloth-path",
        type=Path,
        help="folder put first on the unsloth run's PYTHONPATH (unsloth and its pins)",
    )
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        help="cap every variant's process at this much GPU memory (torch.cuda.set_per_process_memory_fraction), "
        "standing in for a smaller card; the project's trainer also plans its layout within it",
    )
    parser.add_argument("--windows", type=int, default=3, help="timed windows of --steps steps in each process")
    parser.add_argument("--repeats", type=int, default=1, help="processes per variant, the variants interleaved")
    parser.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.only:
        if args.memory_cap_gib:
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 1024**3 / total, 0)
            os.environ["JPSLM_BENCH_MEMORY_CAP_GIB"] = str(args.memory_cap_gib)
        common = (args.work, args.steps, args.warmup, args.batch, args.max_seq_length, args.seed)
        if args.only == "baseline":
            row = run_baseline(*common, profile_steps=args.profile_steps, windows=args.windows)
        else:
            row = run_project(*common, variant=args.only, profile_steps=args.profile_steps, windows=args.windows)
        print("RESULT " + json.dumps(row), flush=True)
        return

    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.shape, args.samples, args.seed)
    rows = []
    for repeat in range(1, args.repeats + 1):
        for variant in args.variants:
            rows.append(run_variant(args, variant, repeat))
            # Each row as soon as its variant ends, so a run cut short still leaves what it measured.
            print("ROW " + json.dumps(rows[-1], default=str), flush=True)
            if args.json:
                with args.json.with_suffix(".partial.jsonl").open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(rows[-1], default=str) + "\n")
    summary = summarize(rows, args.variants)
    print_summary(summary)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
        "python": platform.python_version(),
        "versions": versions(),
        "shape": args.shape,
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "json", "only")},
        "summary": summary,
        "rows": rows,
    }
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
