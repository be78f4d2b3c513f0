"""Lineage rows: one per table write (``lineage.materializations``) and one per upstream partition it read
(``lineage.inputs``), written in the same transaction as the rows themselves (``DuckDBStore.write_slice``).

Lineage contract (README, "Lineage"):
- ``lineage.materializations``: one row per asset materialization (asset key, partition, run id, code
  version, data version, timestamps, artifact path / bytes / sha256 when the asset wrote a file).
- ``lineage.inputs``: one row per upstream partition the materialization read (upstream key, partition,
  data version, and the upstream's materialization id), so SQL can walk from any row back to the graph.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import duckdb
import polars as pl

from jpslm_assets.artifacts import frame_version

ARTIFACT_COLUMNS = ("artifact_path", "artifact_bytes", "artifact_sha256")

LINEAGE_DDL = """
CREATE SCHEMA IF NOT EXISTS lineage;
CREATE TABLE IF NOT EXISTS lineage.materializations (
    materialization_id VARCHAR PRIMARY KEY,
    asset_key VARCHAR NOT NULL,
    partition_key VARCHAR,
    run_id VARCHAR NOT NULL,
    code_version VARCHAR,
    data_version VARCHAR NOT NULL,
    table_name VARCHAR NOT NULL,
    row_count BIGINT NOT NULL,
    artifact_path VARCHAR,
    artifact_bytes BIGINT,
    artifact_sha256 VARCHAR,
    started_at TIMESTAMPTZ,
    materialized_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS lineage.inputs (
    materialization_id VARCHAR NOT NULL,
    asset_key VARCHAR NOT NULL,
    partition_key VARCHAR,
    run_id VARCHAR NOT NULL,
    upstream_asset_key VARCHAR NOT NULL,
    upstream_partition_key VARCHAR,
    upstream_data_version VARCHAR,
    upstream_materialization_id VARCHAR
);
"""

def lineage_ddl(lake: bool) -> str:
    """The lineage tables; DuckLake keeps no primary keys (the ids are uuids, unique by construction)."""
    return LINEAGE_DDL.replace(" PRIMARY KEY", "") if lake else LINEAGE_DDL


@dataclass
class UpstreamRead:
    asset_key: str
    partition_key: str | None
    data_version: str | None
    materialization_id: str | None


@dataclass
class LineageRecord:
    asset_key: str
    partition_key: str | None
    run_id: str
    code_version: str | None
    started_at: datetime | None
    upstream: list[UpstreamRead]

    def insert(self, conn: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame) -> str:
        materialization_id = uuid.uuid4().hex
        artifact: dict[str, Any] = dict.fromkeys(ARTIFACT_COLUMNS)
        if frame.height and all(column in frame.columns for column in ARTIFACT_COLUMNS):
            distinct = frame.select(ARTIFACT_COLUMNS).unique()
            if distinct.height == 1:  # one file per materialization, repeated on every row
                artifact = distinct.row(0, named=True)
        conn.execute(
            "INSERT INTO lineage.materializations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                materialization_id,
                self.asset_key,
                self.partition_key,
                self.run_id,
                self.code_version,
                frame_version(frame),
                table,
                frame.height,
                artifact["artifact_path"],
                artifact["artifact_bytes"],
                artifact["artifact_sha256"],
                self.started_at,
                datetime.now(timezone.utc),
            ],
        )
        for read in self.upstream:
            conn.execute(
                "INSERT INTO lineage.inputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    materialization_id,
                    self.asset_key,
                    self.partition_key,
                    self.run_id,
                    read.asset_key,
                    read.partition_key,
                    read.data_version,
                    read.materialization_id,
                ],
            )
        return materialization_id
