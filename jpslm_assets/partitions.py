"""Partitions, all read from the active profile.

- ``n``: the training-set sizes of stage 1 (the reference model's scale sweep);
- ``model``: the models of the profile (base models, stage 2);
- ``adapter``: what stage 3 exports and evaluates. One key per model for its stage-2 adapter (the key is the
  model's own), plus ``<reference model>@stage1`` for the reference model's stage-1 adapter at n*, which
  the paper's Lesson 4 (r=16 against r=32 at the chosen n) compares with its stage-2 adapter.
"""

from __future__ import annotations

from typing import NamedTuple

import dagster as dg

from jpslm_assets.settings import Profile, current_profile

MODEL_DIMENSION = "model"
N_DIMENSION = "n"
STAGE1_SUFFIX = "@stage1"


class Stage3Adapter(NamedTuple):
    """The adapter behind a stage-3 partition key."""

    key: str
    model: str
    stage: int


def n_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(n) for n in current_profile().n_grid])


def model_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(current_profile().models))


def stage3_keys(profile: Profile | None = None) -> list[str]:
    profile = profile or current_profile()
    return [*profile.models, f"{profile.stage1_model}{STAGE1_SUFFIX}"]


def stage3_partitions() -> dg.StaticPartitionsDefinition:
    """Stage 3's partitions: the stage-2 adapter of every model, and the reference model's stage-1 one."""
    return dg.StaticPartitionsDefinition(stage3_keys())


def stage3_adapter(key: str) -> Stage3Adapter:
    """(key, model, stage) of a stage-3 partition key; an error names the keys that exist."""
    profile = current_profile()
    if key in profile.models:
        return Stage3Adapter(key, key, 2)
    if key == f"{profile.stage1_model}{STAGE1_SUFFIX}":
        return Stage3Adapter(key, profile.stage1_model, 1)
    raise ValueError(f"stage-3 partition {key!r} is not one of {stage3_keys(profile)}")


def stage1_to_stage3_mapping() -> dg.StaticPartitionMapping:
    """Every stage-1 n feeds only the reference model's ``@stage1`` stage-3 partition (which picks n*)."""
    profile = current_profile()
    target = f"{profile.stage1_model}{STAGE1_SUFFIX}"
    return dg.StaticPartitionMapping({str(n): target for n in profile.n_grid})


def stage2_to_stage3_mapping() -> dg.StaticPartitionMapping:
    """A model's stage-2 adapter feeds the stage-3 partition of the same name only."""
    return dg.StaticPartitionMapping({model: model for model in current_profile().models})
