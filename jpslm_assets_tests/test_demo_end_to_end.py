"""The README's demo, end to end: every asset of the demo profile materialized, then an unchanged re-run.

Slow (several minutes on 2 cores): it trains, exports, answers and judges with the real demo models.
"""

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from jpslm_assets.settings import load_profile

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

LINEAGE_TO_GRAPH = """
WITH RECURSIVE walk(materialization_id, asset_key, partition_key, depth) AS (
    SELECT m.materialization_id, m.asset_key, m.partition_key, 0
    FROM eval.judge_scores s
    JOIN lineage.materializations m
      ON m.asset_key = 'judge_scores_' || s.format AND m.partition_key = s.model || '|' || s.n
    WHERE s.model = ? AND s.format = 'q4_k_m'
    QUALIFY row_number() OVER (ORDER BY m.materialized_at DESC) = 1
    UNION
    SELECT i.upstream_materialization_id, i.upstream_asset_key, i.upstream_partition_key, w.depth + 1
    FROM walk w JOIN lineage.inputs i ON i.materialization_id = w.materialization_id
    WHERE i.upstream_materialization_id IS NOT NULL
)
SELECT DISTINCT w.asset_key, m.data_version
FROM walk w JOIN lineage.materializations m USING (materialization_id)
"""


def _demo(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JPSLM_DATA_DIR": str(data_dir)}
    env.pop("DAGSTER_HOME", None)
    env.pop("JPSLM_PROFILE", None)
    return subprocess.run(
        [sys.executable, "-m", "jpslm_assets.cli", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
    )


def test_demo_materializes_everything_and_rerun_skips(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = _demo(data_dir)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]

    profile = load_profile("demo")
    with duckdb.connect(str(data_dir / "jpslm.duckdb"), read_only=True) as con:
        summary = con.sql("SELECT model, format, questions, ci_low, ci_high FROM marts.score_summary").fetchall()
        pairs = {(model, fmt) for model, fmt, *_ in summary}
        assert pairs == {(m, f) for m in profile.models for f in profile.formats}
        assert all(row[2] > 0 and row[3] is not None and row[4] is not None for row in summary)

        reached = dict(con.execute(LINEAGE_TO_GRAPH, [profile.models[0]]).fetchall())
        graph_version = con.sql(
            "SELECT data_version FROM lineage.materializations WHERE asset_key = 'kg_relations' "
            "ORDER BY materialized_at DESC LIMIT 1"
        ).fetchone()
        assert graph_version is not None and reached.get("kg_relations") == graph_version[0]
        assert {"lora_adapter", "training_subset", "qa_pool", "gguf_q4_k_m"} <= set(reached)

    second = _demo(data_dir)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "materializing" not in second.stdout, second.stdout
    assert "(0 runs launched)" in second.stdout
