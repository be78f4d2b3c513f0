"""Answer-token negative log-likelihood: the paper's test metric, and the quantity training minimizes.

NLL is the mean over every answer token of every question of ``-log p(token | prefix)``; prompt tokens
(label ``-100``) never count. Perplexity is ``exp(NLL)``. Torch is imported inside the functions so that
importing this module stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from jpslm_assets.training.chat_format import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NllResult:
    nll: float
    ppl: float
    answer_tokens: int
    questions: int
    per_question_nll: list[float] = field(default_factory=list)
    per_question_tokens: list[int] = field(default_factory=list)


def summarize(token_loss_sums: Sequence[float], token_counts: Sequence[int]) -> NllResult:
    """Token-weighted mean NLL from per-question sums; raises if there is nothing to average or it diverged."""
    if len(token_loss_sums) != len(token_counts):
        raise ValueError("one loss sum per question is needed for each token count")
    total_tokens = int(sum(token_counts))
    if total_tokens == 0:
        raise ValueError("no answer tokens to score: every answer was empty or truncated away")
    nll = float(sum(token_loss_sums)) / total_tokens
    if not math.isfinite(nll):
        raise ValueError(f"test NLL is not finite ({nll}); the model's weights have diverged (NaN/inf)")
    per_question = [s / c if c else float("nan") for s, c in zip(token_loss_sums, token_counts, strict=True)]
    return NllResult(
        nll=nll,
        ppl=math.exp(nll),
        answer_tokens=total_tokens,
        questions=len(token_counts),
        per_question_nll=per_question,
        per_question_tokens=[int(count) for count in token_counts],
    )


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` (1 on real tokens) and ``labels``."""
    import torch

    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of ``-log p`` over labelled positions, and the count of those positions.

    Position ``t`` predicts token ``t+1``, so logits drop their last position and labels their first.
    """
    import torch

    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counted = shifted_labels != IGNORE_INDEX
    return (losses * counted).sum(dim=1), counted.sum(dim=1)


# Causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``: no logit scaling or
# soft-capping after the head (Gemma 2's softcap, Cohere's logit_scale). For these the head can be applied to
# the labelled positions alone; any other model goes through its own forward and full logits.
PLAIN_HEAD_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)


def labelled_logits(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict labelled tokens, those tokens, and the row each came from.

    ``batch`` holds ``input_ids``, ``labels`` and optionally ``attention_mask`` / ``position_ids`` (padded or
    padding-free rows). Position ``t`` predicts token ``t+1``. Returns (logits ``[N, vocab]`` in float32,
    targets ``[N]``, rows ``[N]``) for the N labelled positions. The LM head runs on those N positions only:
    answers are a fraction of each sequence and the head over a 49k-152k vocabulary is a large part of a small
    model's compute, and of any model's logits memory. ``model`` may be a PEFT model (its LoRA layers sit inside
    the base model's modules, so calling the base decoder applies them, and ``disable_adapter`` still works).
    """
    labels = batch["labels"]
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(core).__name__ in PLAIN_HEAD_ARCHITECTURES:
        hidden = core.get_decoder()(**inputs, use_cache=False).last_hidden_state
        logits = core.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        extra = {"use_cache": False} if hasattr(model, "config") else {}  # HF models: no KV cache to build
        logits = model(**inputs, **extra).logits[:, :-1][mask]
    rows = mask.nonzero(as_tuple=True)[0]
    return logits.float(), shifted[mask], rows


def answer_token_nll(
    model: Any,
    examples: Sequence[EncodedExample],
    pad_id: int,
    batch_size: int = 8,
    device: str | None = None,
) -> NllResult:
    """Mean answer-token NLL of ``model`` over ``examples`` (batched, no gradients, eval mode)."""
    import torch

    if not examples:
        raise ValueError("no examples to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = device or str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                padded = collate(examples[start : start + batch_size], pad_id)
                batch = {key: value.to(device) for key, value in padded.items()}
                logits, targets, rows = labelled_logits(model, batch)
                losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
                rows_in_batch = batch["labels"].size(0)
                loss_sum = torch.zeros(rows_in_batch, dtype=torch.float64, device=losses.device)
                loss_sum.index_add_(0, rows, losses.double())
                count = torch.bincount(rows, minlength=rows_in_batch)
                sums.extend(loss_sum.cpu().tolist())
                counts.extend(int(c) for c in count.cpu().tolist())
    finally:
        model.train(was_training)
    return summarize(sums, counts)
