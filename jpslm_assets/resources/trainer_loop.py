"""One training run in this process: ``prepare_run`` loads model and data and configures TRL's SFTTrainer;
``run_training`` trains, or resumes from the newest complete checkpoint, and renames the adapter into place
once training finished.

``run_training`` looks ``prepare_run`` up in this module when it is called, so a benchmark can wrap it
(benchmarks/bench_gpu_training.py). torch, transformers, trl and datasets are imported inside functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jpslm_assets.resources.cpu import cpu_thread_count
from jpslm_assets.resources.packed_attention import use_packed_attention, varlen_available
from jpslm_assets.resources.trainer_layout import cap_process_memory, choose_layout, planning_memory
from jpslm_assets.resources.trainer_loading import (
    compile_decoder_layers,
    load_backend_model,
    model_loss_trainer,
)
from jpslm_assets.resources.trainer_spec import (
    LossPoint,
    ProgressSink,
    RunLayout,
    TrainingError,
    TrainingOutOfMemoryError,
    TrainingResult,
    TrainingSpec,
    precision_label,
    read_training_records,
)
from jpslm_assets.training.chat_format import EncodedExample, encode_training_pairs

CHECKPOINT_PREFIX = "checkpoint-"


def resumable_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint whose trainer state, optimizer and adapter were all written completely.

    A run killed while saving leaves a checkpoint without (or with a truncated) ``trainer_state.json``, which
    the Trainer writes last; such a folder is skipped in favour of the one before it.
    """
    if not checkpoint_dir.is_dir():
        return None
    candidates = []
    for folder in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = folder.name.removeprefix(CHECKPOINT_PREFIX)
        if suffix.isdigit():
            candidates.append((int(suffix), folder))
    for _, folder in sorted(candidates, reverse=True):
        state = folder / "trainer_state.json"
        weights = list(folder.glob("adapter_model.*"))
        if not (state.is_file() and weights and (folder / "optimizer.pt").is_file()):
            continue
        try:
            json.loads(state.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        return folder
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _oom_error(spec: TrainingSpec, exc: BaseException) -> TrainingOutOfMemoryError:
    plan = spec.plan
    return TrainingOutOfMemoryError(
        f"partition {spec.partition}: out of memory on backend {spec.backend} with per_device_batch_size="
        f"{plan.per_device_batch_size} and max_seq_length={plan.max_seq_length} ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}). Hint: halve per_device_batch_size and double "
        "gradient_accumulation_steps (keeps the effective batch of "
        f"{plan.effective_batch_size}), lower max_seq_length, or use a 4-bit backend (bnb_qlora/unsloth) on a "
        "GPU. Checkpoints already written are kept and the next run resumes from them."
    )


@dataclass
class PreparedRun:
    """A configured Trainer with what the run loop needs around it."""

    trainer: Any
    examples: list[EncodedExample]
    skipped: list[str]
    device: str
    on_cuda: bool
    world_size: int
    is_main_process: bool
    layout: RunLayout
    progress: _ProgressCallback


class _ProgressCallback:
    """Relays step, loss, learning rate, non-padding tokens/s and ETA to a sink (Dagster's log)."""

    def __init__(self, partition: str, sink: ProgressSink) -> None:
        self.partition = partition
        self.sink = sink
        self.start_time = time.monotonic()
        self.start_step = 0
        self.start_tokens = 0
        self.step_seconds: dict[int, float] = {}

    def build(self) -> Any:
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                outer.start_time = time.monotonic()
                outer.start_step = state.global_step
                outer.start_tokens = state.num_input_tokens_seen
                if state.is_world_process_zero:
                    resumed = f", resuming at step {state.global_step}" if state.global_step else ""
                    outer.sink(f"{outer.partition}: training {state.max_steps} steps{resumed}")

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                if not state.is_world_process_zero or not logs or "loss" not in logs:
                    return
                elapsed = max(time.monotonic() - outer.start_time, 1e-9)
                outer.step_seconds[int(state.global_step)] = elapsed
                done = max(state.global_step - outer.start_step, 1)
                remaining = max(state.max_steps - state.global_step, 0)
                tokens_per_s = (state.num_input_tokens_seen - outer.start_tokens) / elapsed
                eta = elapsed / done * remaining
                outer.sink(
                    f"{outer.partition}: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0.0):.2e} tokens/s {tokens_per_s:.0f} "
                    f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"
                )

        return Callback()


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Trainer arguments for (non-reentrant) activation checkpointing, under the name this transformers uses.

    transformers 5.2x calls it ``activation_checkpointing`` and keeps ``gradient_checkpointing`` as a deprecated
    alias; earlier releases know only the latter."""
    from transformers import TrainingArguments

    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def prepare_run(spec: TrainingSpec, sink: ProgressSink) -> PreparedRun:
    """Load model and data and configure TRL's SFTTrainer for the spec (nothing trained yet)."""
    if spec.backend == "unsloth":
        import unsloth  # noqa: F401  (must come before transformers/trl so its patches apply)
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    if spec.backend == "cpu_lora":
        threads = cpu_thread_count(spec.cpu_threads)
        torch.set_num_threads(threads)
        sink(f"{spec.partition}: CPU training with {threads} torch thread(s)")
    plan = spec.plan
    records = read_training_records(Path(spec.data_path))
    device = int(os.environ.get("LOCAL_RANK", "0"))
    if spec.backend != "cpu_lora":
        cap_process_memory(spec.partition, spec.memory_budget_gib, device)
    model, tokenizer = load_backend_model(spec)
    examples, skipped = encode_training_pairs(tokenizer, records, spec.end_of_turn, plan.max_seq_length)
    if not examples:
        raise TrainingError(
            f"partition {spec.partition}: every one of the {len(records)} prompts is at least max_seq_length="
            f"{plan.max_seq_length} tokens long, so no answer token is left to train on; raise max_seq_length."
        )
    if skipped:
        sink(
            f"{spec.partition}: WARNING {len(skipped)} of {len(records)} pairs left out: their prompt alone fills "
            f"max_seq_length={plan.max_seq_length} (first: {', '.join(skipped[:5])}); raise max_seq_length to keep them"
        )
    dataset = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    on_cuda = spec.backend != "cpu_lora"
    free_bytes, memory_note = None, None
    if on_cuda:
        torch.cuda.synchronize()
        free_bytes, memory_note = planning_memory(
            spec.partition,
            int(torch.cuda.mem_get_info(device)[0]),
            int(torch.cuda.memory_reserved(device)),
            spec.memory_budget_gib,
        )
    layout = choose_layout(
        spec,
        model.config,
        max(len(e.input_ids) for e in examples),
        free_bytes,
        # unsloth brings its own fused kernels and compiled paths; these two apply to the bitsandbytes backend.
        fused_available=spec.backend == "bnb_qlora" and importlib.util.find_spec("liger_kernel") is not None,
        compile_available=spec.backend == "bnb_qlora" and importlib.util.find_spec("triton") is not None,
        varlen_available=spec.backend == "bnb_qlora" and varlen_available(),
        memory_note=memory_note,
    )
    sink(
        f"{spec.partition}: micro-batch {layout.per_device_batch_size} x {layout.gradient_accumulation_steps} "
        f"accumulation, padding-free {'on' if layout.padding_free else 'off'}, gradient checkpointing "
        f"{'on' if layout.gradient_checkpointing else 'off'}, fused kernels {'on' if layout.fused_kernels else 'off'}"
        f", compiled layers {'on' if layout.compiled_layers else 'off'}, attention "
        f"{'per example (varlen flash)' if layout.packed_attention else 'SDPA'} ({layout.reason})"
    )
    if layout.gradient_checkpointing:
        model.enable_input_require_grads()
    progress = _ProgressCallback(spec.partition, sink)
    config = SFTConfig(
        output_dir=spec.checkpoint_dir,
        num_train_epochs=plan.epochs,
        max_steps=plan.max_steps or -1,
        per_device_train_batch_size=layout.per_device_batch_size,
        gradient_accumulation_steps=layout.gradient_accumulation_steps,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=plan.lr_scheduler,
        warmup_steps=plan.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        # The same AdamW update; on CUDA as one fused kernel instead of a loop of launches per parameter group.
        optim="adamw_torch_fused" if on_cuda else "adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=plan.checkpoint_every_steps,
        save_total_limit=2,  # the newest and one before it, in case the newest is cut short
        seed=plan.seed,
        data_seed=plan.seed,
        # Examples are already cut to max_seq_length by encode_training_pairs; TRL refuses a max_length with
        # padding-free batches (it could not enforce it), so it is left to the encoder in that case.
        max_length=None if layout.padding_free else plan.max_seq_length,
        packing=False,
        padding_free=layout.padding_free,
        use_liger_kernel=layout.fused_kernels,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not on_cuda,
        # On CPU, bf16 makes the Trainer autocast matmuls to bfloat16; weights and optimizer stay float32.
        bf16=on_cuda or spec.cpu_bf16,
        **_checkpointing_arguments(layout.gradient_checkpointing),
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if on_cuda else None,
    )
    trainer = (model_loss_trainer(SFTTrainer) if spec.backend == "cpu_lora" else SFTTrainer)(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[progress.build()],
    )
    # Progress goes through the sink; the Trainer's own printer would repeat every log dict on stdout.
    trainer.remove_callback(PrinterCallback)
    if spec.backend == "bnb_qlora":
        # TRL stores QLoRA adapter weights in bf16, but resuming reloads them in fp32 (PEFT upcasts on load),
        # so a resumed run would train differently from an uninterrupted one. fp32 adapter weights (compute
        # stays bf16 under autocast) make both the same and are the steadier choice for small updates.
        for parameter in trainer.model.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                parameter.data = parameter.data.float()
    if layout.dequantize_matmul:
        from jpslm_assets.resources.nf4_linear import use_dequantize_matmul

        switched = use_dequantize_matmul(trainer.model)
        sink(f"{spec.partition}: {switched} NF4 projections on the dequantize + matmul path")
    if layout.packed_attention:
        use_packed_attention(trainer.model)
    if layout.compiled_layers:
        compiled = compile_decoder_layers(trainer.model)
        sink(f"{spec.partition}: {compiled} decoder layers compiled (the first steps include compiling)")
    return PreparedRun(
        trainer=trainer,
        examples=examples,
        skipped=skipped,
        device=str(trainer.args.device),
        on_cuda=on_cuda,
        world_size=int(trainer.args.world_size),
        is_main_process=bool(trainer.is_world_process_zero()),
        layout=layout,
        progress=progress,
    )


@contextlib.contextmanager
def _attention_kernels(on_cuda: bool) -> Iterator[None]:
    """SDPA without cuDNN's backend while training on CUDA.

    cuDNN's attention builds an execution plan for every new sequence length. Training batches change length
    from step to step (padding-free rows always, padded batches with their longest example), and on an H200 the
    plan building cost more CPU time per step than the attention itself (profiled: about 160 ms a step for an
    8B model, several seconds at each new length). Flash and memory-efficient attention compute the same
    result without that cost.
    """
    if not on_cuda:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def _loss_curve(
    log_history: list[dict[str, Any]], step_seconds: dict[int, float] | None = None
) -> list[LossPoint]:
    points: dict[int, LossPoint] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            step = int(entry["step"])
            points[step] = LossPoint(
                step=step,
                loss=float(entry["loss"]),
                learning_rate=float(entry.get("learning_rate", 0.0)),
                epoch=float(entry.get("epoch", 0.0)),
                tokens_seen=int(entry.get("num_input_tokens_seen", 0)),
                seconds=(step_seconds or {}).get(step),
            )
    return [points[step] for step in sorted(points)]


def run_training(spec: TrainingSpec, sink: ProgressSink = print) -> TrainingResult:
    """Train (or resume) the spec's adapter in this process; returns its result after the adapter is in place."""
    output = Path(spec.output_dir)
    if output.exists():
        raise TrainingError(
            f"partition {spec.partition}: adapter folder {output} already exists; not overwriting"
        )
    checkpoints = Path(spec.checkpoint_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    resume = resumable_checkpoint(checkpoints)
    try:
        prepared = prepare_run(spec, sink)
        trainer = prepared.trainer
        on_cuda = prepared.on_cuda
        if on_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        if resume is not None:
            sink(f"{spec.partition}: resuming from {resume.name}")
        started, cpu_started = time.monotonic(), time.process_time()
        tokens_before = 0
        if resume is not None:
            tokens_before = int(
                json.loads((resume / "trainer_state.json").read_text("utf-8")).get("num_input_tokens_seen", 0)
            )
        with _attention_kernels(on_cuda):
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise _oom_error(spec, exc) from exc
        raise

    state = trainer.state
    curve = _loss_curve(state.log_history, prepared.progress.step_seconds)
    peak = None
    if on_cuda:
        import torch

        peak = int(torch.cuda.max_memory_allocated())
    losses = [point.loss for point in curve]
    if not losses or not all(math.isfinite(loss) for loss in losses):
        raise TrainingError(
            f"partition {spec.partition}: training loss is missing or not finite ({losses[-3:]}); lower the "
            "learning rate or check the training subset."
        )
    tokens = int(state.num_input_tokens_seen) - tokens_before
    if prepared.is_main_process:
        temporary = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            trainer.model.save_pretrained(str(temporary))
            os.replace(temporary, output)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(checkpoints, ignore_errors=True)
    return TrainingResult(
        adapter_path=str(output),
        backend=spec.backend,
        precision=precision_label(spec),
        device=prepared.device,
        examples=len(prepared.examples),
        skipped_examples=len(prepared.skipped),
        steps=int(state.global_step),
        train_loss_final=losses[-1],
        train_loss_avg=sum(losses) / len(losses),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        tokens=tokens,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        resumed_from_step=int(resume.name.removeprefix(CHECKPOINT_PREFIX)) if resume else None,
        world_size=prepared.world_size,
        layout=prepared.layout,
        peak_memory_bytes=peak,
        loss_curve=curve,
    )
