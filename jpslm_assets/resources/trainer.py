"""LoRA / QLoRA training of one (model, n) partition, behind one resource with three backends.

Backends (``LoraTrainer.backend``; ``auto`` picks the first that applies):
- ``unsloth``: unsloth's ``FastLanguageModel`` 4-bit QLoRA, when unsloth is installed and CUDA is present;
- ``bnb_qlora``: transformers + bitsandbytes NF4 with double quantization, bf16 compute, peft LoRA, TRL;
- ``cpu_lora``: float32 weights on CPU with a peft LoRA, TRL's ``SFTTrainer`` (bf16 autocast on request).

All three train on the same pre-tokenized sequences (``domain/chat_format.py``): labels are ``-100`` on the
prompt, so the loss covers answer tokens only. Runs are seeded, checkpoint every K optimizer steps into a
folder keyed by the plan and the data, and resume from the newest complete checkpoint when restarted
(Hugging Face's Trainer restores optimizer, scheduler, RNG and data position). The adapter is saved to a
temporary folder and renamed into place only after training finished, so a failed run never leaves an
adapter where the registry would look for one.

How a run is laid out on the device never changes what it computes; ``choose_layout`` decides and the run log
and ``TrainingResult.layout`` record it. On CUDA (bnb_qlora): padding-free rows with per-example flash
attention (``packed_attention.py``), micro-batch and checkpointing from free memory, compiled decoder layers,
the dequantize + matmul path for the NF4 projections (``nf4_linear.py``) and fused AdamW; the measured effect
of each is in docs/benchmarks/gpu.md.

With more than one CUDA device visible, training runs data-parallel: the resource starts this module's
command line under ``torchrun`` (or ``accelerate launch``), one process per GPU, and the Trainer handles
gradient all-reduce. There is no hand-written distributed loop. ``launcher="subprocess"`` runs the same
worker as one separate process on any device (the step's process stays small; CPU included).

Workers talk to the asset through Dagster Pipes (``python -m jpslm_assets.resources.trainer``, started by a
``PipesSubprocessClient`` or any other Pipes client, e.g. ``PipesK8sClient`` on a remote GPU host): the spec
arrives as the Pipes extra ``jpslm_training_spec``; progress lines are Pipes log messages; the result (adapter
path, loss curve, tokens/s, layout) comes back as a custom message, and so does a training error, so the
asset raises the same ``TrainingError`` / ``TrainingOutOfMemoryError`` as in-process. Only rank 0 of a
data-parallel run opens the Pipes message channel; the other ranks read the spec from the same context.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from pydantic import BaseModel, Field

from jpslm_assets.domain.chat_format import EncodedExample, encode_training_pairs
from jpslm_assets.domain.training_plan import LoraPlan
from jpslm_assets.resources.models import choose_cpu_precision, cpu_bf16_flags, cpu_thread_count
from jpslm_assets.resources.packed_attention import use_packed_attention, varlen_available

Backend = Literal["unsloth", "bnb_qlora", "cpu_lora"]
BackendChoice = Literal["auto", "unsloth", "bnb_qlora", "cpu_lora"]
ProgressSink = Callable[[str], None]

SPEC_EXTRA = "jpslm_training_spec"  # the Pipes extra that carries the TrainingSpec
RESULT_MESSAGE = "jpslm_training_result"  # custom-message kinds a worker reports
ERROR_MESSAGE = "jpslm_training_error"
CHECKPOINT_PREFIX = "checkpoint-"


class TrainingError(RuntimeError):
    """Training could not run or finish; the message names the partition and the cause."""


class TrainingOutOfMemoryError(TrainingError):
    """The device ran out of memory; the message names the partition, the batch shape and what to lower."""


class BackendUnavailableError(TrainingError):
    """The requested backend cannot run here (no CUDA, package missing)."""


class TrainingSpec(BaseModel):
    """Everything one training run needs; serialisable so a worker process can run it."""

    partition: str = Field(description="model|n, for messages")
    model: str
    base_model_ref: str
    trust_remote_code: bool = False
    end_of_turn: str
    plan: LoraPlan
    backend: Backend
    data_path: str = Field(description="JSONL with qa_id, question, answer per line")
    checkpoint_dir: str
    output_dir: str = Field(description="final adapter folder; must not exist yet")
    cpu_threads: int | None = Field(default=None, description="torch threads on CPU; None: the idle cores")
    cpu_bf16: bool = Field(
        default=False, description="bf16 autocast for CPU matmuls (LoRA weights stay fp32)"
    )
    # How the run is laid out on the device. None of these change what is computed: every optimizer step sees
    # the same examples and the same answer-token loss; they only change speed and memory.
    padding_free: bool = Field(
        default=True,
        description="concatenate each micro-batch into one row with per-example positions (no padding tokens); "
        "attention stays within each example through the model's block-diagonal mask",
    )
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="None: on CUDA, only when activations would not fit in free memory; off on CPU",
    )
    adapt_micro_batch: bool = Field(
        default=True,
        description="on CUDA, take the largest micro-batch that divides the effective batch and fits in free "
        "memory (fewer, larger steps; the effective batch stays the plan's)",
    )
    fused_kernels: bool | None = Field(
        default=None,
        description="Liger's fused RMSNorm/SwiGLU/RoPE kernels; None: when installed and on CUDA",
    )
    compile_layers: bool | None = Field(
        default=None,
        description="torch.compile each decoder layer (the layers share one compiled graph); None: on CUDA when "
        "Triton is installed, checkpointing is off and Liger's kernels were not asked for; off on CPU",
    )
    dequantize_matmul: bool = Field(
        default=True,
        description="bnb_qlora: each frozen NF4 projection runs one custom operator (bitsandbytes' dequantize, "
        "then F.linear; block statistics dequantized once; resources/nf4_linear.py) instead of bitsandbytes' "
        "gemm_4bit dispatcher: the same values with less CPU time per layer, and only the 4-bit weight kept "
        "for the backward pass, compiled or not",
    )
    packed_attention: bool | None = Field(
        default=None,
        description="attention per example inside padding-free rows with variable-length flash attention "
        "(resources/packed_attention.py) instead of SDPA with a block-diagonal mask; None: on CUDA with "
        "padding-free rows when torch has it",
    )
    memory_budget_gib: float | None = Field(
        default=None,
        gt=0,
        description="CUDA: the GPU memory this run plans within and may use, in GiB (e.g. 16 for the paper's "
        "16 GB card); the process is capped there, so a run that would need more fails instead of using it. "
        "None: what the device has free when the run starts",
    )


class LossPoint(BaseModel):
    step: int
    loss: float
    learning_rate: float
    epoch: float
    tokens_seen: int
    seconds: float | None = Field(
        default=None,
        description="wall seconds since this run's training began (after a resume: since the resume)",
    )


class RunLayout(BaseModel):
    """The device layout chosen for a run, and why; recorded with the result."""

    per_device_batch_size: int
    gradient_accumulation_steps: int
    padding_free: bool
    gradient_checkpointing: bool
    fused_kernels: bool
    compiled_layers: bool = False
    packed_attention: bool = False
    dequantize_matmul: bool = False
    reason: str


class TrainingResult(BaseModel):
    adapter_path: str
    backend: Backend
    precision: str = Field(description="fp32, bf16-autocast (CPU) or nf4+bf16 (QLoRA)")
    device: str
    examples: int
    skipped_examples: int = Field(default=0, description="pairs left out: prompt alone fills max_seq_length")
    steps: int
    train_loss_final: float
    train_loss_avg: float
    seconds: float
    cpu_seconds: float = Field(description="process CPU time of the training loop (all threads)")
    tokens: int = Field(description="non-padding tokens processed in this session")
    tokens_per_s: float
    resumed_from_step: int | None
    world_size: int
    layout: RunLayout | None = None
    peak_memory_bytes: int | None = Field(
        default=None, description="peak CUDA memory allocated (main process)"
    )
    loss_curve: list[LossPoint]


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def select_backend(requested: BackendChoice) -> Backend:
    """The backend to use: the requested one if it can run here, or the best available for ``auto``."""
    cuda = cuda_device_count() > 0
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if requested == "auto":
        if cuda and has_unsloth:
            return "unsloth"
        if cuda and has_bnb:
            return "bnb_qlora"
        return "cpu_lora"
    if requested in ("unsloth", "bnb_qlora") and not cuda:
        raise BackendUnavailableError(
            f"trainer backend {requested!r} needs a CUDA GPU and none is visible; use backend 'cpu_lora' or 'auto' "
            "(profile train.backend, JPSLM_TRAIN__BACKEND, or the trainer resource)."
        )
    if requested == "unsloth" and not has_unsloth:
        raise BackendUnavailableError(
            "trainer backend 'unsloth' is not installed; `pip install 'jpslm-assets[gpu]'` on the CUDA machine, "
            "or use 'bnb_qlora'."
        )
    if requested == "bnb_qlora" and not has_bnb:
        raise BackendUnavailableError(
            "trainer backend 'bnb_qlora' needs bitsandbytes; `pip install bitsandbytes`."
        )
    return requested


def precision_label(spec: TrainingSpec) -> str:
    if spec.backend != "cpu_lora":
        return "nf4+bf16"
    return "bf16-autocast" if spec.cpu_bf16 else "fp32"


def read_training_records(path: Path) -> list[tuple[str, str, str]]:
    """``(qa_id, question, answer)`` triples from the spec's JSONL file."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records.append((str(row["qa_id"]), str(row["question"]), str(row["answer"])))
            except (json.JSONDecodeError, KeyError) as exc:
                raise TrainingError(
                    f"{path}:{line_number}: not a qa_id/question/answer record ({exc})"
                ) from exc
    if not records:
        raise TrainingError(f"{path} holds no training records")
    return records


def write_training_records(path: Path, records: Sequence[tuple[str, str, str]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for qa_id, question, answer in records:
            handle.write(
                json.dumps({"qa_id": qa_id, "question": question, "answer": answer}, ensure_ascii=False)
            )
            handle.write("\n")


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


GIB = 1024**3


def activation_bytes_per_token(config: Any, dropout: float) -> int:
    """Upper estimate of the activation memory one token keeps for the backward pass (no checkpointing).

    Per decoder layer, a LoRA-wrapped Llama/Qwen2 block saves about 30 bytes per hidden unit (norm inputs and
    outputs in float32 after k-bit preparation, bf16 projection inputs, attention q/k/v/out) and 8 bytes per MLP
    unit (gate, up, activation, product); LoRA dropout keeps masked copies of each projection input. A 1.5x margin
    covers allocator fragmentation and kernel workspaces.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    intermediate = int(getattr(text, "intermediate_size", 4 * hidden))
    layers = int(text.num_hidden_layers)
    per_layer = 30 * hidden + 8 * intermediate
    if dropout > 0:
        per_layer += 12 * hidden + 4 * intermediate
    return int(layers * per_layer * 1.5)


def planning_memory(
    partition: str, free_bytes: int, reserved_bytes: int, budget_gib: float | None
) -> tuple[int, str]:
    """(bytes the layout may plan for, how that was decided) once the model is loaded.

    Without a budget: the device's free memory. With one: the budget less what this process already holds
    (``reserved_bytes``: the loaded model and the allocator's cache), never more than is free. A budget the
    loaded model already fills is an error that names both figures.
    """
    if budget_gib is None:
        return free_bytes, f"{free_bytes / GIB:.1f} GiB free"
    budget = int(budget_gib * GIB)
    left = budget - reserved_bytes
    if left <= 0:
        raise TrainingError(
            f"partition {partition}: the loaded model already holds {reserved_bytes / GIB:.1f} GiB of the "
            f"{budget_gib:g} GiB memory budget, leaving nothing for activations; raise memory_budget_gib or "
            "train a smaller model"
        )
    usable = min(left, free_bytes)
    return usable, f"{usable / GIB:.1f} GiB left of a {budget_gib:g} GiB budget"


def cap_process_memory(partition: str, budget_gib: float | None, device: int) -> None:
    """Cap this process's CUDA allocations at the budget (``torch.cuda.set_per_process_memory_fraction``)."""
    if budget_gib is None:
        return
    import torch

    total = int(torch.cuda.get_device_properties(device).total_memory)
    budget = int(budget_gib * GIB)
    if budget > total:
        raise TrainingError(
            f"partition {partition}: memory_budget_gib={budget_gib:g} is more than GPU {device} has "
            f"({total / GIB:.1f} GiB); lower it or leave it unset to plan within the free memory"
        )
    torch.cuda.set_per_process_memory_fraction(budget / total, device)


def choose_layout(
    spec: TrainingSpec,
    config: Any,
    longest_example: int,
    free_bytes: int | None,
    fused_available: bool,
    compile_available: bool = False,
    varlen_available: bool = False,
    memory_note: str | None = None,
) -> RunLayout:
    """The micro-batch, checkpointing and kernels for a run, from the spec and the device's free memory.

    ``free_bytes`` is the device memory the run may use after the model is loaded (the free memory, or what a
    memory budget leaves: ``planning_memory``; ``memory_note`` says which), or None on CPU. On CUDA, candidates are
    the divisors of the effective batch from the largest down; the first whose activations (micro-batch x the
    longest example, in tokens) fit in 70% of free memory runs without checkpointing. If none fits, gradient
    checkpointing is switched on and the largest micro-batch that fits with it is taken. Every candidate keeps
    the effective batch, so each optimizer step sees the same examples and the same loss.

    Kernels, unless the spec says otherwise: on CUDA, decoder layers are compiled when ``compile_available``
    (Triton is installed), gradient checkpointing is off and Liger's kernels were not asked for (the compiler
    cannot trace them, and a compiled layer's recomputation under checkpointing is not guaranteed to save the
    same tensors); Liger's fused kernels are used when installed and the layers are not compiled (the compiler
    fuses the same norms and activations itself); padding-free rows get per-example flash attention when
    ``varlen_available``. On CPU, compiling and packed attention run only when the spec asks for them, and
    Liger's kernels never.
    """
    plan = spec.plan
    effective = plan.effective_batch_size
    on_cuda = free_bytes is not None

    def kernels(checkpointing: bool) -> tuple[bool, bool]:
        """(compiled layers, Liger kernels) for a layout with or without checkpointing."""
        if spec.compile_layers is None:
            compiled = compile_available and on_cuda and not checkpointing and spec.fused_kernels is not True
        else:
            compiled = spec.compile_layers
        if spec.fused_kernels is None:
            return compiled, fused_available and on_cuda and not compiled
        return compiled, spec.fused_kernels and on_cuda

    if spec.packed_attention is None:
        packed = varlen_available and on_cuda and spec.padding_free
    elif spec.packed_attention and not spec.padding_free:
        raise TrainingError(
            f"partition {spec.partition}: packed_attention needs padding-free rows; switch padding_free on or "
            "packed_attention off"
        )
    else:
        packed = spec.packed_attention
    dequantize = spec.dequantize_matmul and spec.backend == "bnb_qlora"

    def layout(size: int, checkpointing: bool, reason: str) -> RunLayout:
        compiled, fused = kernels(checkpointing)
        return RunLayout(
            per_device_batch_size=size,
            gradient_accumulation_steps=effective // size,
            padding_free=spec.padding_free,
            gradient_checkpointing=checkpointing,
            fused_kernels=fused,
            compiled_layers=compiled,
            packed_attention=packed,
            dequantize_matmul=dequantize,
            reason=reason,
        )

    if free_bytes is None:
        return layout(
            plan.per_device_batch_size, bool(spec.gradient_checkpointing), "CPU: the plan's micro-batch"
        )
    per_token = activation_bytes_per_token(config, plan.dropout)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # With checkpointing only each layer's input is kept, plus one layer's activations during its recompute.
    checkpointed_per_token = int(text.num_hidden_layers) * int(text.hidden_size) * 4 + per_token // int(
        text.num_hidden_layers
    )
    budget = int(free_bytes * 0.7)
    sizes = (
        [size for size in range(effective, 0, -1) if effective % size == 0]
        if spec.adapt_micro_batch
        else [plan.per_device_batch_size]
    )

    free_text = memory_note or f"{free_bytes / GIB:.1f} GiB free"
    if spec.gradient_checkpointing is not True:
        for size in sizes:
            need = size * longest_example * per_token
            if need <= budget:
                return layout(
                    size,
                    False,
                    f"{free_text}; micro-batch {size} x {longest_example} tokens needs ~{need / GIB:.1f} "
                    "GiB of activations without checkpointing",
                )
        if spec.gradient_checkpointing is False:
            return layout(sizes[-1], False, f"{free_text}; checkpointing off by request")
    for size in sizes:
        need = size * longest_example * checkpointed_per_token
        if need <= budget:
            return layout(
                size,
                True,
                f"{free_text}; micro-batch {size} x {longest_example} tokens needs ~{need / GIB:.1f} GiB "
                "with gradient checkpointing",
            )
    return layout(sizes[-1], True, f"{free_text}; smallest micro-batch with checkpointing (may not fit)")


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


def _load_backend_model(spec: TrainingSpec) -> tuple[Any, Any]:
    """(peft model, tokenizer) for the spec's backend; LoRA weights are created under the plan's seed."""
    import torch
    from transformers import set_seed

    from jpslm_assets.resources.models import load_causal_lm, load_tokenizer

    plan = spec.plan
    if spec.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            model_name=spec.base_model_ref,
            max_seq_length=plan.max_seq_length,
            dtype=None,
            load_in_4bit=True,
            trust_remote_code=spec.trust_remote_code,
        )
        set_seed(plan.seed)
        model = FastLanguageModel.get_peft_model(
            model,
            r=plan.r,
            lora_alpha=plan.alpha,
            lora_dropout=plan.dropout,
            target_modules=list(plan.target_modules),
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=plan.seed,
        )
        # The folder's own tokenizer class, not the one AutoTokenizer would substitute (see load_tokenizer).
        return model, load_tokenizer(spec.base_model_ref, trust_remote_code=spec.trust_remote_code)

    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(spec.base_model_ref, trust_remote_code=spec.trust_remote_code)
    if spec.backend == "bnb_qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = load_causal_lm(
            spec.base_model_ref,
            dtype="bfloat16",
            device_map={"": local_rank},
            quantization_config=quantization,
            trust_remote_code=spec.trust_remote_code,
        )
        # Checkpointing is decided later, from free memory (choose_layout); this only prepares the k-bit model.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = load_causal_lm(spec.base_model_ref, dtype="float32", trust_remote_code=spec.trust_remote_code)
    set_seed(plan.seed)
    lora = LoraConfig(
        r=plan.r,
        lora_alpha=plan.alpha,
        lora_dropout=plan.dropout,
        target_modules=list(plan.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), tokenizer


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
    model, tokenizer = _load_backend_model(spec)
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
    trainer = (_model_loss_trainer(SFTTrainer) if spec.backend == "cpu_lora" else SFTTrainer)(
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


def compile_decoder_layers(model: Any) -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; returns how many were compiled.

    The layers are found by the class names the model lists in ``_no_split_modules`` (``LlamaDecoderLayer``,
    ``Qwen2DecoderLayer``, ...). Compiling layer by layer rather than the whole model keeps the embedding, the
    mask construction and the loss out of the graph, and the layers, being one class with one code path, share
    one compiled graph (parameters are graph inputs), so compile time does not grow with depth. Each layer's
    forward and backward become a few fused kernels instead of hundreds of small launches: peft's LoRA wrappers,
    the dtype casts around the fp32 adapter weights and the norms and activations are fused; bitsandbytes'
    4-bit operators enter the graph as registered custom operators. The sequence length changes from step to
    step, so after the first recompilation the graph is shape-generic.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise TrainingError(
            f"no decoder layers to compile in {type(model).__name__} (looked for {sorted(names) or 'none listed'});"
            " set the trainer resource's compile_layers to false for this model"
        )
    for layer in layers:
        layer.compile()
    return len(layers)


def _model_loss_trainer(sft_trainer: type) -> type:
    """``sft_trainer`` with a plain answer-token loss, for CPU runs.

    TRL's loss sends only the answer positions through a tiled LM head, which saves GPU memory; on CPU the
    tiling cost more than it saved (SmolLM2 trained 1.26x faster per token with the model's own loss, same
    losses; docs/benchmarks/training.md). The model's own loss, though, computes logits at every position, prompt
    included. Here the head runs on the answer positions alone (``nll.labelled_logits``), untiled: the same mean
    answer-token NLL over the accumulated batch (the sum divided by the Trainer's ``num_items_in_batch``, as the
    model's loss does), with less compute. TRL's entropy and token-accuracy log entries are left out.
    """
    import torch
    from transformers import Trainer

    from jpslm_assets.domain.nll import labelled_logits

    class AnswerLossSFTTrainer(sft_trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:  # evaluation wants the model's outputs too: the model's own loss
                inputs["use_cache"] = False
                return Trainer.compute_loss(
                    self, model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            logits, targets, _ = labelled_logits(model, inputs)
            loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            divisor = num_items_in_batch if num_items_in_batch is not None else targets.numel()
            return loss / torch.as_tensor(divisor, dtype=loss.dtype, device=loss.device).clamp(min=1)

    return AnswerLossSFTTrainer


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


class LoraTrainer(dg.ConfigurableResource):
    """Trains LoRA adapters; picks the backend and, with several GPUs, the data-parallel launcher."""

    backend: BackendChoice = Field(default="auto", description="auto, unsloth, bnb_qlora or cpu_lora")
    launcher: Literal["auto", "in_process", "subprocess", "torchrun", "accelerate"] = Field(
        default="auto",
        description="auto: in-process on CPU or one GPU, torchrun across all GPUs when more than one is visible; "
        "subprocess: one worker process through Dagster Pipes on any device",
    )
    num_processes: int | None = Field(
        default=None, description="GPUs to use when data-parallel (default: all)"
    )
    cpu_threads: int | None = Field(
        default=None, description="torch threads on CPU (default: the cores not already busy)"
    )
    cpu_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="CPU LoRA precision: auto (bf16 autocast where the CPU has AVX512-BF16 or AMX, else "
        "fp32), fp32, or bf16 autocast",
    )
    compile_layers: bool | None = Field(
        default=None,
        description="torch.compile each decoder layer: None = on CUDA when Triton is installed and gradient "
        "checkpointing is off, off on CPU; false for a model whose layers do not compile",
    )

    memory_budget_gib: float | None = Field(
        default=None,
        gt=0,
        description="CUDA: GPU memory each training run plans within and is capped at, in GiB (16 stands in for "
        "the paper's 16 GB card); None: the device's free memory",
    )

    def resolved_backend(self) -> Backend:
        return select_backend(self.backend)

    def resolved_cpu_precision(self) -> tuple[str, str]:
        """(``fp32`` or ``bf16``, why) that CPU LoRA runs of this resource use on this machine."""
        return choose_cpu_precision(self.cpu_precision, cpu_bf16_flags())

    def launcher_for(self, backend: Backend) -> tuple[str, int]:
        """(launcher, processes) this resource would use for ``backend`` on this machine.

        ``single_gpu``: one worker process that sees only the first GPU. In-process training with several
        GPUs visible would make the Trainer wrap the model in ``nn.DataParallel``, which TRL refuses (and
        which is slower than DDP anyway).
        """
        gpus = cuda_device_count() if backend != "cpu_lora" else 0
        processes = min(self.num_processes or gpus, gpus) if gpus else 1
        if self.launcher == "subprocess":
            return ("single_gpu", 1) if gpus > 1 else ("subprocess", 1)
        if self.launcher == "in_process" and gpus <= 1:
            return "in_process", 1
        if backend == "unsloth" or processes <= 1 or self.launcher == "in_process":
            # unsloth's open-source release trains on one GPU; the others stay idle rather than diverge.
            return ("single_gpu", 1) if gpus > 1 else ("in_process", 1)
        return ("torchrun" if self.launcher == "auto" else self.launcher), processes

    def train(
        self,
        spec: TrainingSpec,
        sink: ProgressSink,
        context: dg.AssetExecutionContext | None = None,
        pipes_client: dg.PipesSubprocessClient | None = None,
    ) -> TrainingResult:
        """Train one adapter. Worker launchers need the asset's ``context`` (Dagster Pipes) and use
        ``pipes_client`` (default: a ``PipesSubprocessClient`` on this machine). Another Pipes client (a
        Kubernetes pod on a GPU host) runs the same ``worker_command`` with the same extras and hands its
        messages to ``worker_result``; the README shows how."""
        launcher, processes = self.launcher_for(spec.backend)
        if self.cpu_threads and spec.cpu_threads is None:
            spec = spec.model_copy(update={"cpu_threads": self.cpu_threads})
        if spec.backend == "cpu_lora" and self.resolved_cpu_precision()[0] == "bf16":
            spec = spec.model_copy(update={"cpu_bf16": True})
        if self.compile_layers is not None and spec.compile_layers is None:
            spec = spec.model_copy(update={"compile_layers": self.compile_layers})
        if self.memory_budget_gib is not None and spec.memory_budget_gib is None:
            spec = spec.model_copy(update={"memory_budget_gib": self.memory_budget_gib})
        if launcher == "in_process":
            return run_training(spec, sink)
        if context is None:
            raise TrainingError(
                f"partition {spec.partition}: the {launcher} launcher runs the worker through Dagster Pipes and "
                "needs the asset's execution context; pass context= (or use launcher='in_process')"
            )
        return self._train_in_workers(spec, sink, launcher, processes, context, pipes_client)

    def _train_in_workers(
        self,
        spec: TrainingSpec,
        sink: ProgressSink,
        launcher: str,
        processes: int,
        context: dg.AssetExecutionContext,
        pipes_client: dg.PipesSubprocessClient | None,
    ) -> TrainingResult:
        environment: dict[str, str] = {}
        if launcher == "single_gpu":
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            environment["CUDA_VISIBLE_DEVICES"] = visible
        command = worker_command(launcher, processes)
        sink(f"{spec.partition}: training in {processes} worker process(es) via {launcher} (Dagster Pipes)")
        client = pipes_client or dg.PipesSubprocessClient()
        extras = {SPEC_EXTRA: spec.model_dump(mode="json")}
        try:
            invocation = client.run(context=context, command=command, extras=extras, env=environment)
        except dg.DagsterError as exc:
            raise TrainingError(
                f"partition {spec.partition}: the {launcher} training worker failed before reporting a result "
                f"({exc}); its output is in the step's logs"
            ) from exc
        return worker_result(spec, invocation.get_custom_messages())


def worker_command(launcher: str, processes: int) -> list[str]:
    """The worker's command line for a launcher (what a Pipes client runs)."""
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    elif launcher == "accelerate":
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}"]
    elif launcher in ("subprocess", "single_gpu"):
        prefix = [sys.executable]
    else:
        raise TrainingError(f"unknown worker launcher {launcher!r}")
    return [*prefix, "-m", "jpslm_assets.resources.trainer"]


def worker_result(spec: TrainingSpec, messages: Sequence[Any]) -> TrainingResult:
    """The worker's reported result, or the training error it reported, raised as in-process."""
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        if message.get("kind") == ERROR_MESSAGE:
            error = TrainingOutOfMemoryError if message.get("out_of_memory") else TrainingError
            raise error(str(message.get("message")))
        if message.get("kind") == RESULT_MESSAGE:
            return TrainingResult.model_validate(message["result"])
    raise TrainingError(
        f"partition {spec.partition}: the training worker ended without reporting a result through Dagster "
        "Pipes; its output is in the step's logs"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (Dagster Pipes): train the spec from the Pipes context, report progress and result."""
    from dagster_pipes import PipesDefaultContextLoader, PipesEnvVarParamsLoader, open_dagster_pipes

    argparse.ArgumentParser(description="Train one LoRA adapter; started by a Dagster Pipes client.").parse_args(
        argv
    )
    if int(os.environ.get("RANK", "0")) != 0:
        # Other data-parallel ranks read the spec and train; only rank 0 reports through the message channel.
        params = PipesEnvVarParamsLoader().load_context_params()
        with PipesDefaultContextLoader().load_context(params) as data:
            spec = TrainingSpec.model_validate(data["extras"][SPEC_EXTRA])
        run_training(spec, lambda message: None)
        return 0
    with open_dagster_pipes() as pipes:
        spec = TrainingSpec.model_validate(pipes.get_extra(SPEC_EXTRA))
        try:
            result = run_training(spec, pipes.log.info)
        except TrainingError as exc:
            pipes.report_custom_message(
                {
                    "kind": ERROR_MESSAGE,
                    "message": str(exc),
                    "out_of_memory": isinstance(exc, TrainingOutOfMemoryError),
                }
            )
            return 0  # reported: the asset raises it with its own message
        pipes.report_custom_message({"kind": RESULT_MESSAGE, "result": result.model_dump(mode="json")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
