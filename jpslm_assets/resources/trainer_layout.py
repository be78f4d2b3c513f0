"""How a training run is laid out on the device: micro-batch, gradient checkpointing and kernels, from the
model's activation size and the memory the device has free or a budget allows.

A layout never changes what a run computes; ``choose_layout`` decides and the run log and
``TrainingResult.layout`` record it. torch is imported inside functions.
"""

from __future__ import annotations

from typing import Any

from jpslm_assets.resources.trainer_spec import RunLayout, TrainingError, TrainingSpec

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
    longest example, in tokens) fit in 70% of free memory runs without checkpointing, unless that micro-batch is
    small (below ``SMALL_MICRO_BATCH``) and checkpointing at least doubles it (``prefer_checkpointing``). If none
    fits, gradient checkpointing is switched on and the largest micro-batch that fits with it is taken. Every candidate keeps
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
    plain = next((size for size in sizes if size * longest_example * per_token <= budget), None)
    checkpointed = next(
        (size for size in sizes if size * longest_example * checkpointed_per_token <= budget), None
    )
    if spec.gradient_checkpointing is not True and plain is not None:
        need = plain * longest_example * per_token
        reason = (
            f"{free_text}; micro-batch {plain} x {longest_example} tokens needs ~{need / GIB:.1f} GiB of "
            "activations without checkpointing"
        )
        if spec.gradient_checkpointing is False or not prefer_checkpointing(plain, checkpointed):
            return layout(plain, False, reason)
    if spec.gradient_checkpointing is False:
        return layout(sizes[-1], False, f"{free_text}; checkpointing off by request")
    if checkpointed is not None:
        need = checkpointed * longest_example * checkpointed_per_token
        because = (
            f" (without it only micro-batch {plain} would fit, which keeps the GPU waiting on small kernels)"
            if plain is not None
            else ""
        )
        return layout(
            checkpointed,
            True,
            f"{free_text}; micro-batch {checkpointed} x {longest_example} tokens needs ~{need / GIB:.1f} GiB "
            f"with gradient checkpointing{because}",
        )
    return layout(sizes[-1], True, f"{free_text}; smallest micro-batch with checkpointing (may not fit)")


# Below this micro-batch a run without checkpointing loses more to small, launch-bound kernels than
# checkpointing's recomputation costs: on an H100 capped at 16 GiB (docs/benchmarks/gpu.md, 2026-12-06) the 8B
# model trained at 1,502 real tokens/s with micro-batch 1 and no checkpointing, while the plain peft loop with
# micro-batch 8 and checkpointing reached 3,820 in 14.7 GiB.
SMALL_MICRO_BATCH = 4


def prefer_checkpointing(plain: int, checkpointed: int | None) -> bool:
    """Whether checkpointing with micro-batch ``checkpointed`` beats no checkpointing with micro-batch ``plain``:
    when the plain micro-batch is small (below ``SMALL_MICRO_BATCH``) and checkpointing at least doubles it."""
    return checkpointed is not None and plain < SMALL_MICRO_BATCH and checkpointed >= 2 * plain
