"""Which training backend runs here (``select_backend``), loading its model with a fresh LoRA adapter, and
what the Trainer gets around that model: compiled decoder layers and, on CPU, a loss over answer positions
only.

torch, transformers, peft and unsloth are imported inside functions.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from typing import Any

from jpslm_assets.resources.trainer_spec import (
    Backend,
    BackendChoice,
    BackendUnavailableError,
    TrainingError,
    TrainingSpec,
)


def first_gpu_gib() -> float:
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) / 1024**3


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def measured_faster(memory_gib: float, table: str | None = None) -> tuple[Backend, str]:
    """(bnb_qlora or unsloth, why) for a run with ``memory_gib`` of GPU memory, from the measurements shipped in
    ``data/qlora_backend_speeds.yaml`` (or the YAML ``table``): the row of the smallest memory at least
    ``memory_gib``, else the largest."""
    import yaml

    text = table or (resources.files("jpslm_assets") / "data" / "qlora_backend_speeds.yaml").read_text("utf-8")
    rows = sorted(yaml.safe_load(text)["measured"], key=lambda row: float(row["memory_gib"]))
    row = next((row for row in rows if float(row["memory_gib"]) >= memory_gib), rows[-1])
    faster: Backend = "unsloth" if float(row["unsloth"]) > float(row["bnb_qlora"]) else "bnb_qlora"
    return faster, (
        f"measured with {row['memory_gib']} GiB on {row['device']}: bnb_qlora {row['bnb_qlora']:,} and unsloth "
        f"{row['unsloth']:,} real tokens/s"
    )


def select_backend(requested: BackendChoice, memory_gib: float | None = None) -> Backend:
    """The backend to use: the requested one if it can run here, or the best available for ``auto``.

    ``auto`` on CUDA with unsloth installed picks whichever of unsloth and the bitsandbytes path was measured
    faster for a card of ``memory_gib`` (the run's memory budget, else the first GPU's memory)."""
    cuda = cuda_device_count() > 0
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    if requested == "auto":
        if cuda and has_unsloth:
            if not has_bnb:
                return "unsloth"
            return measured_faster(memory_gib if memory_gib is not None else first_gpu_gib())[0]
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


def load_backend_model(spec: TrainingSpec) -> tuple[Any, Any]:
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


def model_loss_trainer(sft_trainer: type) -> type:
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

    from jpslm_assets.training.nll import labelled_logits

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
