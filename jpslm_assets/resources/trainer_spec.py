"""What one LoRA training run is given and gives back (``TrainingSpec``, ``TrainingResult``), the errors it
raises, and the JSONL file of training records a spec points to."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from jpslm_assets.training.plan import LoraPlan

Backend = Literal["unsloth", "bnb_qlora", "cpu_lora"]
BackendChoice = Literal["auto", "unsloth", "bnb_qlora", "cpu_lora"]
ProgressSink = Callable[[str], None]


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
