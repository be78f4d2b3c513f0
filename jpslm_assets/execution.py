"""Executor choice. Multiprocess by default; steps tagged with the ``gpu`` pool run one at a time.

Scale-out (README, "Scaling out"): set ``JPSLM_EXECUTOR=celery`` or ``k8s`` with ``dagster-celery`` /
``dagster-k8s`` installed to spread partitions over machines; the pool limits still apply.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

GPU_POOL = "gpu"
EXECUTOR_ENV = "JPSLM_EXECUTOR"
MAX_CONCURRENT_ENV = "JPSLM_MAX_CONCURRENT"


def executor_config() -> dict[str, Any]:
    """The multiprocess executor's config; ``JPSLM_MAX_CONCURRENT`` caps parallel steps (default 2)."""
    raw = os.environ.get(MAX_CONCURRENT_ENV, "2")
    try:
        max_concurrent = int(raw)
    except ValueError as exc:
        raise ValueError(f"{MAX_CONCURRENT_ENV}={raw!r} must be an integer number of parallel steps") from exc
    if max_concurrent < 1:
        raise ValueError(f"{MAX_CONCURRENT_ENV}={raw!r} must be at least 1")
    return {"max_concurrent": max_concurrent}


def default_executor() -> dg.ExecutorDefinition:
    kind = os.environ.get(EXECUTOR_ENV, "multiprocess")
    if kind == "multiprocess":
        return dg.multiprocess_executor.configured(executor_config(), name="jpslm_multiprocess")
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "celery":
        from dagster_celery import celery_executor  # optional extra

        return celery_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor  # optional extra

        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={kind!r} is not one of multiprocess, in_process, celery, k8s")
