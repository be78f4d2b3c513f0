"""Export fidelity: does a GGUF tokenize and score the test set like the Hugging Face model it came from?

Plain functions on token ids and logits. Both sides are scored on *identical* token ids (the HF tokenizer's),
so a difference in NLL is the weights' doing, not the tokenizer's; the tokenizer is compared separately.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoringSequence:
    """One test question as the model sees it: prompt ids followed by answer ids."""

    question_id: str
    ids: tuple[int, ...]
    answer_start: int  # index of the first answer token in ``ids``

    def __post_init__(self) -> None:
        if not 0 < self.answer_start < len(self.ids):
            raise ValueError(
                f"question {self.question_id}: answer_start {self.answer_start} must fall inside the "
                f"{len(self.ids)} tokens (needs a non-empty prompt and a non-empty answer)"
            )


@dataclass(frozen=True)
class SequenceNll:
    question_id: str
    nll_sum: float
    answer_tokens: int


@dataclass(frozen=True)
class TokenizerAgreement:
    texts: int
    identical: int
    first_mismatch: str | None  # "question_id: hf [..] vs gguf [..]" for the first disagreeing text

    @property
    def share(self) -> float:
        return self.identical / self.texts if self.texts else float("nan")


def answer_token_nll(logits: np.ndarray, sequence: ScoringSequence) -> SequenceNll:
    """Sum of -log p(answer token | everything before it), from logits of shape (len(ids), vocab).

    Row ``i`` of ``logits`` predicts token ``i + 1``.
    """
    from scipy.special import log_softmax

    ids = np.asarray(sequence.ids)
    if logits.ndim != 2 or logits.shape[0] < len(ids) - 1:
        raise ValueError(
            f"question {sequence.question_id}: logits shape {logits.shape} does not cover {len(ids)} tokens"
        )
    rows = np.arange(sequence.answer_start - 1, len(ids) - 1)
    log_probs = log_softmax(logits[rows].astype(np.float64), axis=-1)
    picked = log_probs[np.arange(len(rows)), ids[rows + 1]]
    return SequenceNll(sequence.question_id, float(-picked.sum()), len(rows))


def mean_nll(scores: Sequence[SequenceNll]) -> tuple[float, int]:
    """Token-weighted mean NLL over all answer tokens, and the token count."""
    tokens = sum(score.answer_tokens for score in scores)
    if tokens == 0:
        return float("nan"), 0
    return sum(score.nll_sum for score in scores) / tokens, tokens


def relative_difference(value: float, reference: float) -> float:
    """|value - reference| / reference (NaN when either is missing)."""
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return float("nan")
    return abs(value - reference) / abs(reference)


def compare_tokenizations(
    question_ids: Sequence[str], hf_ids: Sequence[Sequence[int]], gguf_ids: Sequence[Sequence[int]]
) -> TokenizerAgreement:
    """How many texts the GGUF tokenizes to exactly the HF ids (both without BOS)."""
    if not len(question_ids) == len(hf_ids) == len(gguf_ids):
        raise ValueError("question_ids, hf_ids and gguf_ids must have the same length")
    identical = 0
    first_mismatch = None
    for question_id, hf, gguf in zip(question_ids, hf_ids, gguf_ids, strict=True):
        if list(hf) == list(gguf):
            identical += 1
        elif first_mismatch is None:
            at = next((i for i, (a, b) in enumerate(zip(hf, gguf, strict=False)) if a != b), min(len(hf), len(gguf)))
            first_mismatch = (
                f"{question_id}: first difference at token {at}: hf {list(hf[at:at + 5])} vs gguf {list(gguf[at:at + 5])}"
            )
    return TokenizerAgreement(len(hf_ids), identical, first_mismatch)
