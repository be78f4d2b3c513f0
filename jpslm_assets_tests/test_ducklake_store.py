"""The DuckLake store: a real PostgreSQL catalogue started here, data files in a shared folder, several
processes writing at once (nothing lost, lineage complete), and the marts identical to the single-file store's
on the same data."""

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pytest

from jpslm_assets import settings
from jpslm_assets.artifacts import frame_version
from jpslm_assets.io_manager import DuckDBTableIOManager
from jpslm_assets.lineage import LineageRecord, UpstreamRead
from jpslm_assets.marts import assets as marts
from jpslm_assets.marts.cli import load_project
from jpslm_assets.store import DuckDBStore, StoreError, default_store
from jpslm_assets_tests.postgres_server import PostgresServer, postgres_bindir, postgres_server
from jpslm_assets_tests.test_marts import paper_tables

WRITERS, SLICES = 4, 5

if postgres_bindir() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs PostgreSQL for the DuckLake tests: `apt-get install postgresql` (.ci/run)")
    pytest.skip("PostgreSQL is not installed (apt-get install postgresql)", allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with postgres_server() as started:
        yield started


def lake_store(dsn: str, data: Path) -> DuckDBStore:
    return DuckDBStore(
        path=str(data / "unused.duckdb"),
        ducklake_catalog=f"postgres:{dsn}",
        ducklake_data_path=str(data / "lake-files"),
    )


@pytest.fixture
def lake(server: PostgresServer, tmp_path: Path) -> DuckDBStore:
    """A fresh lake per test: its own database on the module's server, its own data folder."""
    return lake_store(server.create_database(f"lake_{len(list(tmp_path.parent.iterdir()))}_{os.getpid()}"), tmp_path)


def slice_frame(writer: int, index: int) -> pl.DataFrame:
    rows = 3 + (writer + index) % 4
    return pl.DataFrame(
        {
            "writer": [writer] * rows,
            "n": [index] * rows,
            "value": [float(writer * 100 + index * 10 + row) for row in range(rows)],
            "text": [f"w{writer}-n{index}-{row} 日本語" for row in range(rows)],
        }
    )


def lineage_for(writer: int, index: int) -> LineageRecord:
    return LineageRecord(
        asset_key="shared_rows",
        partition_key=f"{writer}|{index}",
        run_id=f"run-{writer}",
        code_version="1",
        started_at=None,
        upstream=[UpstreamRead("source", str(writer), f"v{writer}", f"m{writer}")],
    )


def _writer(catalog: str, data: str, writer: int, start: Any) -> None:
    store = DuckDBStore(path="unused.duckdb", ducklake_catalog=catalog, ducklake_data_path=data)
    start.wait(60)
    for index in range(SLICES):
        store.write_slice(
            "train.shared", slice_frame(writer, index), {"writer": writer, "n": index}, lineage_for(writer, index)
        )
        # A table of its own as well: schema creation and first writes race too.
        store.write_slice(f"kg.own_{writer}", slice_frame(writer, index), {"n": index})
    # Every writer replaces the same slice once: the last commit wins whole, never a mix of two.
    store.write_slice("train.contested", slice_frame(writer, 0).with_columns(n=pl.lit(0)), {"n": 0})


def test_several_processes_write_one_lake_at_once_and_nothing_is_lost(lake: DuckDBStore) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    where = (lake.ducklake_catalog, lake.ducklake_data_path)
    workers = [context.Process(target=_writer, args=(*where, writer, start)) for writer in range(WRITERS)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(300)
    assert [worker.exitcode for worker in workers] == [0] * WRITERS

    shared = lake.query("SELECT * FROM train.shared ORDER BY writer, n, value")
    expected = pl.concat([slice_frame(w, i) for w in range(WRITERS) for i in range(SLICES)]).sort("writer", "n", "value")
    assert shared.equals(expected)
    for writer in range(WRITERS):
        own = lake.query(f"SELECT * FROM kg.own_{writer} ORDER BY n, value")
        assert own.equals(pl.concat([slice_frame(writer, i) for i in range(SLICES)]).sort("n", "value"))
    contested = lake.query("SELECT * FROM train.contested")
    assert any(
        contested.sort("value").equals(slice_frame(w, 0).with_columns(n=pl.lit(0)).sort("value")) for w in range(WRITERS)
    ), "the contested slice must be exactly one writer's rows"

    lineage = lake.query("SELECT * FROM lineage.materializations WHERE asset_key = 'shared_rows'")
    assert lineage.height == WRITERS * SLICES
    assert lineage["materialization_id"].n_unique() == WRITERS * SLICES
    for row in lineage.iter_rows(named=True):
        writer, index = map(int, row["partition_key"].split("|"))
        frame = slice_frame(writer, index)
        assert (row["row_count"], row["data_version"], row["table_name"]) == (
            frame.height, frame_version(frame), "train.shared",
        )  # fmt: skip
    inputs = lake.query(
        "SELECT i.upstream_asset_key, i.upstream_partition_key, m.partition_key FROM lineage.inputs i "
        "JOIN lineage.materializations m USING (materialization_id)"
    )
    assert inputs.height == WRITERS * SLICES
    assert all(row[1] == row[2].split("|")[0] for row in inputs.iter_rows())


def test_marts_on_the_lake_equal_the_single_file_stores_on_the_same_data(lake: DuckDBStore, tmp_path: Path) -> None:
    single = DuckDBStore(path=str(tmp_path / "single.duckdb"))
    project = load_project()
    built = {}
    for store in (single, lake):
        for table, frame in paper_tables().items():
            store.write_slice(table, frame, {})
        run = dg.materialize(
            [marts.build_marts_assets(project, {})],
            resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)},
        )
        assert run.success
        assert all(check.passed for check in run.get_asset_check_evaluations())
        built[store.location] = {
            name: store.query(f"SELECT * FROM marts.{name}") for name in sorted(project.models)
        }
    on_file, on_lake = built[single.location], built[lake.location]
    assert set(on_file) == set(on_lake) == set(project.models)
    for name, frame in on_file.items():
        other = on_lake[name]
        assert frame.schema == other.schema, name
        assert frame.sort(frame.columns, nulls_last=True).equals(other.sort(other.columns, nulls_last=True)), name
    lineage = lake.query("SELECT DISTINCT table_name FROM lineage.materializations WHERE table_name LIKE 'marts.%'")
    assert set(lineage["table_name"]) == {f"marts.{name}" for name in project.models}


def test_reading_a_lake_nothing_was_written_to_yet_reads_nothing(lake: DuckDBStore) -> None:
    # Readers attach read-only, which may not create the catalogue: the store creates the empty lake first.
    assert not lake.table_exists("kg.nodes")
    assert lake.read_slices("kg.nodes", [{}], allow_missing=True).is_empty()
    with pytest.raises(StoreError, match="table kg.nodes does not exist in DuckLake"):
        lake.read_slices("kg.nodes", [{}])
    lake.write_slice("kg.nodes", pl.DataFrame({"node_id": ["N1"]}), {})
    assert lake.table_exists("kg.nodes")


def test_the_io_manager_writes_partitions_and_lineage_to_the_lake(lake: DuckDBStore) -> None:
    from jpslm_assets_tests.test_store import per_partition, scored, source_rows

    resources = {"io_manager": DuckDBTableIOManager(store=lake)}
    assert dg.materialize([source_rows], resources=resources).success
    for key in ("m1|10", "m2|20"):
        run = dg.materialize(
            [source_rows, per_partition, scored],
            selection=["per_partition", "scored"],
            partition_key=dg.MultiPartitionKey(dict(zip(("model", "n"), key.split("|"), strict=True))),
            resources=resources,
        )
        assert run.success
    assert lake.query("SELECT model, n, score FROM eval.scored ORDER BY model").rows() == [("m1", 10, 60), ("m2", 20, 60)]
    walk = lake.query(
        "SELECT m.asset_key, i.upstream_asset_key FROM lineage.materializations m "
        "JOIN lineage.inputs i USING (materialization_id) WHERE m.table_name = 'eval.scored'"
    )
    assert set(walk.rows()) == {("scored", "per_partition")}


def test_settings_select_the_lake_and_name_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(settings.STORE_ENV, "ducklake")
    monkeypatch.setenv(settings.DUCKLAKE_CATALOG_ENV, "postgres:dbname=x host=127.0.0.1")
    monkeypatch.delenv(settings.DUCKLAKE_DATA_PATH_ENV, raising=False)
    with pytest.raises(settings.SettingsError, match=settings.DUCKLAKE_DATA_PATH_ENV):
        default_store()
    monkeypatch.setenv(settings.DUCKLAKE_DATA_PATH_ENV, str(tmp_path / "files"))
    store = default_store()
    assert store.is_lake and store.ducklake_data_path == str(tmp_path / "files")
    monkeypatch.setenv(settings.STORE_ENV, "sqlite")
    with pytest.raises(settings.SettingsError, match="choose 'duckdb'"):
        default_store()
    monkeypatch.delenv(settings.STORE_ENV)
    assert not default_store().is_lake


def test_an_unreachable_catalogue_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    store = lake_store("dbname=none host=127.0.0.1 port=1 user=postgres connect_timeout=2", tmp_path)
    with pytest.raises(StoreError, match=r"cannot open DuckLake postgres:dbname=none .*JPSLM_DUCKLAKE_CATALOG"):
        store.write_slice("kg.rows", pl.DataFrame({"n": [1]}), {"n": 1})
    assert not any((tmp_path / "lake-files").rglob("*.parquet"))


def test_extensions_of_another_duckdb_version_are_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from jpslm_assets import ducklake

    monkeypatch.setattr(ducklake.duckdb, "__version__", "9.9.9")
    with pytest.raises(ducklake.LakeError, match=r"duckdb 9\.9\.9 is installed; the two must match.*jpslm-assets\[ducklake\]"):
        ducklake.extension_file("ducklake")
