"""Shared fixtures. Every test gets its own data directory and DuckDB file; nothing touches ./data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from jpslm_assets.store import DuckDBStore

# Keep library threads to the machine's size and keep every run offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An isolated JPSLM_DATA_DIR (and DuckDB file inside it) for one test."""
    folder = tmp_path / "data"
    monkeypatch.setenv("JPSLM_DATA_DIR", str(folder))
    monkeypatch.delenv("JPSLM_DUCKDB_PATH", raising=False)
    monkeypatch.delenv("JPSLM_PROFILE", raising=False)
    yield folder


@pytest.fixture
def store(data_dir: Path) -> DuckDBStore:
    return DuckDBStore(path=str(data_dir / "jpslm.duckdb"), lock_timeout_s=5)
