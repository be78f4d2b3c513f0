"""The DuckDB store: atomic partition writes, lineage rows, lock and corruption handling."""


import multiprocessing
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import duckdb
import polars as pl
import pytest

from jpslm_assets.artifacts import artifact_record, frame_version
from jpslm_assets.cli import LINEAGE_SQL
from jpslm_assets.io_manager import DuckDBTableIOManager, table_metadata
from jpslm_assets.store import DuckDBStore, StoreError

MODEL_N = dg.MultiPartitionsDefinition(
    {"model": dg.StaticPartitionsDefinition(["m1", "m2"]), "n": dg.StaticPartitionsDefinition(["10", "20"])}
)


@dg.asset(metadata=table_metadata("kg.source_rows"), code_version="1")
def source_rows() -> dg.Output[pl.DataFrame]:
    frame = pl.DataFrame({"value": [1, 2, 3]})
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)))


@dg.asset(
    partitions_def=MODEL_N,
    metadata=table_metadata("train.per_partition", {"model": "model", "n": "n"}),
    code_version="1",
)
def per_partition(context: dg.AssetExecutionContext, source_rows: pl.DataFrame) -> pl.DataFrame:
    keys = context.partition_key.keys_by_dimension
    return pl.DataFrame({"model": [keys["model"]], "n": [int(keys["n"])], "total": [source_rows["value"].sum()]})


@dg.asset(
    partitions_def=MODEL_N,
    metadata=table_metadata("eval.scored", {"model": "model", "n": "n"}, fixed={"format": "f16"}),
    code_version="1",
)
def scored(per_partition: pl.DataFrame) -> pl.DataFrame:
    return per_partition.select("model", "n", (pl.col("total") * 10).alias("score"))


def _materialize(store: DuckDBStore, selection, partition_key=None, instance=None):
    return dg.materialize(
        [source_rows, per_partition, scored],
        selection=selection,
        partition_key=partition_key,
        resources={"store": store, "io_manager": DuckDBTableIOManager(store=store)},
        instance=instance or dg.DagsterInstance.ephemeral(),
    )


def test_partition_write_replaces_only_its_slice_and_records_lineage(store: DuckDBStore) -> None:
    instance = dg.DagsterInstance.ephemeral()
    _materialize(store, [source_rows], instance=instance)
    for key in ("m1|10", "m2|10", "m1|20"):
        _materialize(store, [per_partition], key, instance)
    _materialize(store, [per_partition], "m1|10", instance)  # re-run replaces, never duplicates
    _materialize(store, [scored], "m1|10", instance)

    rows = store.query("SELECT model, n FROM train.per_partition ORDER BY model, n")
    assert rows.rows() == [("m1", 10), ("m1", 20), ("m2", 10)]
    assert store.query("SELECT format, score FROM eval.scored").rows() == [("f16", 60)]

    mats = store.query("SELECT asset_key, partition_key, code_version, row_count FROM lineage.materializations")
    assert mats.filter(pl.col("asset_key") == "per_partition").height == 4
    walk = store.query(LINEAGE_SQL, ["scored", "m1|10"])
    assert walk["asset_key"].to_list() == ["scored", "per_partition", "source_rows"]
    assert walk["partition_key"].to_list() == ["m1|10", "m1|10", None]
    source_version = store.query("SELECT data_version FROM lineage.materializations WHERE asset_key='source_rows'")
    assert walk["data_version"][2] == source_version.item()


def test_failed_write_keeps_previous_rows(store: DuckDBStore) -> None:
    store.write_slice("kg.items", pl.DataFrame({"part": ["a", "b"], "v": [1, 2]}), {"part": "a"})
    before = store.query("SELECT * FROM kg.items ORDER BY part")
    # A value that cannot be cast into the existing BIGINT column fails inside the transaction.
    with pytest.raises(duckdb.ConversionException):
        store.write_slice("kg.items", pl.DataFrame({"part": ["a"], "v": ["not a number"]}), {"part": "a"})
    assert store.query("SELECT * FROM kg.items ORDER BY part").equals(before)


def test_missing_partition_column_is_named(store: DuckDBStore) -> None:
    with pytest.raises(StoreError, match=r"lacks partition column\(s\) \['model'\]"):
        store.write_slice("kg.items", pl.DataFrame({"v": [1]}), {"model": "m1"})


def test_new_columns_are_added_to_existing_table(store: DuckDBStore) -> None:
    store.write_slice("kg.items", pl.DataFrame({"part": ["a"], "v": [1]}), {"part": "a"})
    store.write_slice("kg.items", pl.DataFrame({"part": ["b"], "v": [2], "extra": ["x"]}), {"part": "b"})
    assert store.query("SELECT part, extra FROM kg.items ORDER BY part").rows() == [("a", None), ("b", "x")]


def test_reading_a_table_never_materialized_names_it(store: DuckDBStore) -> None:
    store.write_slice("kg.items", pl.DataFrame({"part": ["a"]}), {})
    with pytest.raises(StoreError, match="table qa.pool does not exist"):
        store.read_slices("qa.pool", [{}])


def test_corrupt_file_is_named_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "broken.duckdb"
    garbage = b"this is not a duckdb database" * 100
    path.write_bytes(garbage)
    store = DuckDBStore(path=str(path), lock_timeout_s=1)
    with pytest.raises(StoreError, match=r"broken\.duckdb is not a readable DuckDB database"):
        store.write_slice("kg.items", pl.DataFrame({"v": [1]}), {})
    assert path.read_bytes() == garbage


def test_file_locked_by_another_process_is_named_and_data_survives(store: DuckDBStore) -> None:
    store.write_slice("kg.items", pl.DataFrame({"v": [1, 2]}), {})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import duckdb, time, sys
                con = duckdb.connect({str(store.file)!r})
                print("locked", flush=True)
                time.sleep(30)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        blocked = DuckDBStore(path=store.path, lock_timeout_s=1)
        with pytest.raises(StoreError, match=r"is locked by another process"):
            blocked.write_slice("kg.items", pl.DataFrame({"v": [9]}), {})
    finally:
        holder.kill()
        holder.wait()
    assert sorted(store.query("SELECT v FROM kg.items")["v"].to_list()) == [1, 2]


def _write_partitions(path: str, model: str, count: int) -> None:
    store = DuckDBStore(path=path, lock_timeout_s=60)
    for i in range(count):
        store.write_slice(
            "train.parallel", pl.DataFrame({"model": [model], "i": [i]}), {"model": model, "i": i}
        )


def test_parallel_writer_processes_wait_for_each_other(store: DuckDBStore) -> None:
    store.write_slice("train.parallel", pl.DataFrame({"model": ["seed"], "i": [0]}), {"model": "seed"})
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_partitions, args=(store.path, m, 15)) for m in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    counts = store.query("SELECT model, count(*) AS c FROM train.parallel GROUP BY model ORDER BY model")
    assert counts.rows() == [("a", 15), ("b", 15), ("seed", 1)]


def test_artifact_record_hashes_files_and_folders(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc")
    (folder / "b.json").write_text("{}")
    record = artifact_record(folder)
    assert record["artifact_bytes"] == 5
    (folder / "b.json").write_text("{ }")
    assert artifact_record(folder)["artifact_sha256"] != record["artifact_sha256"]
    single = artifact_record(folder / "a.bin")
    assert single["artifact_sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_frame_version_tracks_content() -> None:
    a = pl.DataFrame({"x": [1, 2]})
    assert frame_version(a) == frame_version(pl.DataFrame({"x": [1, 2]}))
    assert frame_version(a) != frame_version(pl.DataFrame({"x": [1, 3]}))


def test_read_waits_for_a_short_lock(store: DuckDBStore) -> None:
    store.write_slice("kg.items", pl.DataFrame({"v": [1]}), {})
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({store.path!r}); print('x', flush=True); time.sleep(2)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline()
    started = time.monotonic()
    patient = DuckDBStore(path=store.path, lock_timeout_s=30)
    assert patient.query("SELECT count(*) AS c FROM kg.items").item() == 1
    holder.wait()
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("stem", ["kg", "qa", "train", "eval", "serve", "lineage", "marts", "main", "jpslm_store"])
def test_any_file_name_works_even_a_schema_name(tmp_path: Path, stem: str) -> None:
    """DuckDB names a file's catalog after its stem; `kg.duckdb` made `kg.items` ambiguous (catalog or schema)
    and every write failed. The store attaches its file under a fixed catalog name instead."""
    store = DuckDBStore(path=str(tmp_path / f"{stem}.duckdb"))
    for schema in ("kg", "qa", "train", "eval", "serve", "lineage", "marts"):
        for part, value in (("a", 1), ("b", 2), ("a", 3)):
            store.write_slice(f"{schema}.items", pl.DataFrame({"part": [part], "v": [value]}), {"part": part})
        assert store.read_slices(f"{schema}.items", [{"part": "a"}])["v"].to_list() == [3]
        assert store.table_exists(f"{schema}.items")
    assert store.query("SELECT count(*) AS n FROM kg.items")["n"].item() == 2
    with store.connect(read_only=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("jpslm_store",)
    with store.connect(read_only=True) as conn, pytest.raises(duckdb.Error, match="read-only"):
        conn.execute("CREATE TABLE kg.other AS SELECT 1")


def _damage_data_blocks(path: Path, size: int = 256 * 1024) -> None:
    """Overwrite ``size`` bytes with (seeded) random bytes where the file still opens: data blocks, not the
    catalog (the kind of damage a reader only meets later)."""
    import random

    original = path.read_bytes()
    noise = random.Random(7).randbytes(size)
    for offset in range(len(original) // 4, len(original) - size, 64 * 1024):
        path.write_bytes(original[:offset] + noise + original[offset + size :])
        try:
            duckdb.connect(str(path), read_only=True).close()
            return
        except duckdb.Error:
            continue
    raise AssertionError("no stretch of the file could be damaged without damaging the catalog")


def test_damaged_blocks_are_found_before_the_next_write_and_name_the_table(tmp_path: Path) -> None:
    path = tmp_path / "jpslm.duckdb"
    store = DuckDBStore(path=str(path), lock_timeout_s=1)
    big = pl.DataFrame({"x": list(range(300_000)), "y": [f"row {i:06d} of the pool" for i in range(300_000)]})
    store.write_slice("qa.pool", big, {})
    store.write_slice("eval.judge_scores", big.rename({"y": "reason"}), {})
    _damage_data_blocks(path)
    # The defect: the file still opens, and only a read of the damaged table fails.
    with duckdb.connect(str(path), read_only=True) as conn:
        conn.execute("SELECT 1").fetchone()
    damaged = DuckDBStore(path=str(path), lock_timeout_s=1)
    before = path.read_bytes()
    with pytest.raises(StoreError) as caught:
        damaged.write_slice("kg.items", pl.DataFrame({"v": [1]}), {})
    message = str(caught.value)
    assert message.startswith(f"DuckDB file {path} is damaged: table ")
    assert "nothing more was written to it" in message and "move it aside and re-materialize" in message
    assert path.read_bytes() == before, "the damaged file is left as it was"
    table = message.split("table ", 1)[1].split(" ", 1)[0]
    assert table in {"qa.pool", "eval.judge_scores"}
    with pytest.raises(StoreError, match=rf"is damaged: table {table} cannot be read"):
        damaged.read_slices(table, [{}])


FULL_DISK_WRITER = textwrap.dedent(
    """
    import resource, signal, sys
    import polars as pl
    from jpslm_assets.store import DuckDBStore, StoreError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path, limit = sys.argv[1], int(sys.argv[2])
    store = DuckDBStore(path=path, lock_timeout_s=1)
    store.check_integrity()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    frame = pl.DataFrame({"v": list(range(2_000_000)), "text": [f"value {i}" for i in range(2_000_000)]})
    try:
        store.write_slice("kg.items", frame, {})
    except StoreError as exc:
        print(exc)
    """
)


def test_a_full_disk_is_named_with_the_fix_and_loses_nothing(store: DuckDBStore) -> None:
    """The file may not grow (RLIMIT_FSIZE: what a full disk looks like to the writer) while a large frame
    replaces a table: the error names the file, the table and the fix; the earlier rows stay."""
    store.write_slice("kg.items", pl.DataFrame({"v": [1, 2], "text": ["a", "b"]}), {})
    limit = store.file.stat().st_size + 256 * 1024
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK_WRITER, str(store.file), str(limit)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert message.startswith(f"DuckDB file {store.file}: the disk is full while writing table kg.items ("), message
    assert "Nothing was written: the transaction was rolled back" in message and "JPSLM_DUCKDB_PATH" in message
    assert sorted(store.query("SELECT v FROM kg.items")["v"].to_list()) == [1, 2]


def test_a_full_tmpfs_is_named_with_the_fix(tmp_path: Path) -> None:
    """The same on a real full file system, where this machine may mount a small tmpfs."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        store = DuckDBStore(path=str(mount / "jpslm.duckdb"), lock_timeout_s=1)
        store.write_slice("kg.items", pl.DataFrame({"v": [1, 2]}), {})
        frame = pl.DataFrame({"v": list(range(2_000_000)), "text": [f"value {i}" for i in range(2_000_000)]})
        with pytest.raises(StoreError, match=r"the disk is full while writing table kg\.items \(.*No space left"):
            store.write_slice("kg.items", frame, {})
        assert sorted(store.query("SELECT v FROM kg.items")["v"].to_list()) == [1, 2]
    finally:
        subprocess.run(["umount", str(mount)], check=False)
