"""Executor choice. Multiprocess by default; steps tagged with the ``gpu`` pool run one at a time.

Scale-out (README, "Scaling out"): ``JPSLM_EXECUTOR=celery`` (``dagster-celery`` installed) sends every step
to Celery workers through the broker at ``JPSLM_CELERY_BROKER`` (default Redis on 127.0.0.1:6379, results in
``JPSLM_CELERY_BACKEND``, default the same). Steps of the ``gpu`` pool carry the queue tag ``gpu``
(``GPU_STEP_TAGS``), so only workers started on a GPU host with ``-Q gpu`` take them; everything else goes to
the ``dagster`` queue. Workers run ``celery -A jpslm_assets.celery_app worker`` (README). ``k8s`` with
``dagster-k8s`` is documented, not tested here.
"""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

GPU_POOL = "gpu"
GPU_QUEUE = "gpu"  # the Celery queue of gpu-pool steps
GPU_STEP_TAGS = {"dagster-celery/queue": GPU_QUEUE}
# What makes an asset a GPU step, spread into its decorator (``@dg.asset(..., **GPU_STEP)``): one slot of the
# ``gpu`` pool at a time, and on Celery only the workers of the ``gpu`` queue take it.
GPU_STEP: dict[str, Any] = {"pool": GPU_POOL, "op_tags": GPU_STEP_TAGS}
EXECUTOR_ENV = "JPSLM_EXECUTOR"
CELERY_BROKER_ENV = "JPSLM_CELERY_BROKER"
CELERY_BACKEND_ENV = "JPSLM_CELERY_BACKEND"
DEFAULT_CELERY_BROKER = "redis://127.0.0.1:6379/0"
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


def celery_settings() -> dict[str, str]:
    """Broker and result backend shared by the executor and the workers (``jpslm_assets.celery_app``)."""
    broker = os.environ.get(CELERY_BROKER_ENV, DEFAULT_CELERY_BROKER)
    return {"broker": broker, "backend": os.environ.get(CELERY_BACKEND_ENV, broker)}


def default_executor() -> dg.ExecutorDefinition:
    kind = os.environ.get(EXECUTOR_ENV, "multiprocess")
    if kind == "multiprocess":
        return dg.multiprocess_executor.configured(executor_config(), name="jpslm_multiprocess")
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "celery":
        from dagster_celery import celery_executor  # optional extra

        return celery_executor.configured(celery_settings(), name="jpslm_celery")
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor  # optional extra

        return k8s_job_executor
    raise ValueError(f"{EXECUTOR_ENV}={kind!r} is not one of multiprocess, in_process, celery, k8s")
