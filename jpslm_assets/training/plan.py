"""The hyperparameters of one LoRA run: the profile's ``train`` settings, the stage's LoRA shape, overrides.

Stage 1 (choosing n) and stage 2 (comparing models at the chosen n) differ only in the LoRA shape, which the
profile sets per stage (paper: r=16/alpha 16, then r=32/alpha 16/dropout 0.05). Anything can be overridden
per run (Dagster run config); the resolved plan is recorded with the run and fingerprinted, so a checkpoint
is only resumed by a run with the very same plan and data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from jpslm_assets.settings import TrainSettings

# "All attention and MLP projections" of Llama- and Qwen2-style decoders.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A hyperparameter override is invalid; the message names the setting."""


class LoraPlan(BaseModel):
    """Everything that decides what a LoRA run computes (paths and logging excluded)."""

    stage: Literal[1, 2]
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    epochs: float = Field(gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    learning_rate: float = Field(gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    per_device_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    max_seq_length: int = Field(gt=16)
    checkpoint_every_steps: int = Field(gt=0)
    seed: int

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps

    def fingerprint(self) -> str:
        """A short stable hash of the plan; part of the checkpoint folder name."""
        payload = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def resolve_plan(train: TrainSettings, stage: int, overrides: Mapping[str, Any] | None = None) -> LoraPlan:
    """The plan for ``stage`` from the profile's train settings, with non-null ``overrides`` applied."""
    if stage not in (1, 2):
        raise PlanError(f"stage must be 1 (choose n) or 2 (compare models), got {stage}")
    lora = train.stage1 if stage == 1 else train.stage2
    values: dict[str, Any] = {
        "stage": stage,
        "r": lora.r,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "epochs": train.epochs,
        "learning_rate": train.learning_rate,
        "warmup_ratio": train.warmup_ratio,
        "per_device_batch_size": train.per_device_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "max_seq_length": train.max_seq_length,
        "checkpoint_every_steps": train.checkpoint_every_steps,
        "seed": train.seed,
    }
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in LoraPlan.model_fields:
            raise PlanError(
                f"unknown training setting {key!r}; known settings: {', '.join(sorted(LoraPlan.model_fields))}"
            )
        values[key] = tuple(value) if key == "target_modules" else value
    try:
        return LoraPlan(**values)
    except ValidationError as exc:
        raise PlanError(f"invalid training settings for stage {stage}: {exc}") from exc
