"""The Celery app a worker runs: ``celery -A jpslm_assets.celery_app worker -Q dagster`` (``-Q gpu`` on a GPU
host). It is dagster-celery's app, bound to the same broker and result backend as the executor
(``execution.celery_settings``: ``JPSLM_CELERY_BROKER`` / ``JPSLM_CELERY_BACKEND``), with one task at a
time per worker process so a long step never holds a second one back in the prefetch buffer.
"""

from __future__ import annotations

from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_task

from jpslm_assets.execution import celery_settings

app = make_app(celery_settings())
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True

execute_plan = create_task(app)
