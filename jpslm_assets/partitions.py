"""Partitions: the training-set size ``n`` and the base ``model``, both read from the active profile."""

from __future__ import annotations

import dagster as dg

from jpslm_assets.settings import current_profile

MODEL_DIMENSION = "model"
N_DIMENSION = "n"


def n_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(n) for n in current_profile().n_grid])


def model_partitions() -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition(list(current_profile().models))


def model_n_partitions() -> dg.MultiPartitionsDefinition:
    """Adapters and everything downstream: one partition per (model, n); keys read ``model|n``."""
    return dg.MultiPartitionsDefinition({MODEL_DIMENSION: model_partitions(), N_DIMENSION: n_partitions()})


def model_n_key(model: str, n: int | str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({MODEL_DIMENSION: model, N_DIMENSION: str(n)})


def split_model_n(context: dg.AssetExecutionContext) -> tuple[str, int]:
    """(model, n) of the partition being materialized."""
    key = context.partition_key
    if not isinstance(key, dg.MultiPartitionKey):
        raise ValueError(f"expected a model|n partition key, got {key!r}")
    return key.keys_by_dimension[MODEL_DIMENSION], int(key.keys_by_dimension[N_DIMENSION])
