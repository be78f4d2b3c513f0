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

from jpslm_assets.domain.chat_format import IGNORE_INDEX, EncodedExample

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class NllResult:
    nll: float
    ppl: float
    answer_tokens: int
    questions: int
    per_question_nll: list[float] = field(default_factory=list)


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
                batch = collate(examples[start : start + batch_size], pad_id)
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).logits
                loss_sum, count = token_losses(logits, batch["labels"].to(device))
                sums.extend(loss_sum.double().cpu().tolist())
                counts.extend(int(c) for c in count.cpu().tolist())
    finally:
        model.train(was_training)
    return summarize(sums, counts)
