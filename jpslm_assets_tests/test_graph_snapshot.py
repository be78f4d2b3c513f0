"""A snapshot of the whole asset graph (as dagster-open-platform keeps one): keys, partitions, upstream
edges, groups, kinds, checks, jobs, sensors and automation. Any change to the graph shows up in review
as a change to ``snapshots/asset_graph.json``; regenerate it on purpose with
``JPSLM_UPDATE_SNAPSHOTS=1 python -m pytest jpslm_assets_tests/test_graph_snapshot.py``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

SNAPSHOT = Path(__file__).with_name("snapshots") / "asset_graph.json"


def graph_snapshot() -> dict[str, Any]:
    from jpslm_assets.definitions import defs

    graph = defs.resolve_asset_graph()
    assets: dict[str, Any] = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        condition = node.automation_condition
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "partitions": list(partitions.get_partition_keys()) if partitions else None,
            "upstream": sorted(parent.to_user_string() for parent in node.parent_keys),
            "checks": sorted(check.name for check in node.check_keys),
            "automation": condition.get_label() if condition else None,
            "table": (node.metadata or {}).get("dagster/table_name"),
        }
    jobs = {
        job.name: sorted(k.to_user_string() for k in job.asset_layer.executable_asset_keys)
        for job in defs.resolve_all_job_defs()
        if not job.name.startswith("__")
    }
    sensors = {
        sensor.name: {
            "default_status": defs.resolve_sensor_def(sensor.name).default_status.value,
            "kind": type(sensor).__name__,
        }
        for sensor in defs.sensors or []
    }
    schedules = {
        schedule.name: {"cron": schedule.cron_schedule, "default_status": schedule.default_status.value}
        for schedule in defs.schedules or []
    }
    return {"assets": assets, "jobs": jobs, "sensors": sensors, "schedules": schedules}


def test_asset_graph_matches_its_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JPSLM_PROFILE", raising=False)
    current = graph_snapshot()
    if os.environ.get("JPSLM_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    recorded = json.loads(SNAPSHOT.read_text("utf-8"))
    assert current == recorded, (
        "the asset graph changed; if on purpose, regenerate the snapshot with JPSLM_UPDATE_SNAPSHOTS=1"
    )
