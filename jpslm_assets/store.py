"""The DuckDB store: one file (or a DuckLake, ``ducklake.py``), schemas by stage, atomic partition writes, and
lineage.

Why not ``dagster-duckdb-polars``' IO manager as is: it deletes a partition's rows and inserts the new ones
in separate autocommit statements, so a failure in between loses the rows that were materialized before.
Here every write (the partition's rows plus its lineage rows) is one transaction, and readers and writers
retry with backoff while another process holds DuckDB's file lock.

The lineage rows are ``lineage.py``'s; the IO manager that writes asset outputs here is ``io_manager.py``; content
hashes and atomic files are ``artifacts.py``.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
from pydantic import Field

from jpslm_assets import settings
from jpslm_assets.ducklake import LakeError, connect_lake, is_conflict, sql_string
from jpslm_assets.lineage import LineageRecord, lineage_ddl


class StoreError(RuntimeError):
    """The DuckDB file cannot be used; the message names the file and what to do."""


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "Could not set lock" in text or "Conflicting lock" in text


def _is_corrupt_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        marker in text
        for marker in (
            "not a valid duckdb database",
            "corrupt",
            "invalid database",
            "checksum",
            "magic bytes",
        )
    )


# The catalog name every connection gives the project's file. DuckDB names a file's catalog after its stem by
# default, so a file called `kg.duckdb` or `marts.duckdb` would make `kg.nodes` ambiguous between catalog `kg`
# and schema `kg`; attached under a fixed name, any file name works.
CATALOG = "jpslm_store"


def open_duckdb(file: Path | str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection whose current catalog is ``file``, attached as ``CATALOG`` (see above)."""
    conn = duckdb.connect(":memory:")
    try:
        mode = " (READ_ONLY)" if read_only else ""
        conn.execute(f"ATTACH {sql_string(str(file))} AS {CATALOG}{mode}")
        conn.execute(f"USE {CATALOG}")
    except BaseException:
        conn.close()
        raise
    return conn


def _is_space_error(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        marker in text for marker in ("No space left on device", "File too large", "Disk quota exceeded")
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# Files whose every table was read without a checksum error, by (path, size, mtime_ns): checked once per
# process and content, so a damaged file is found before the first write instead of by a later reader.
_VERIFIED: set[tuple[str, int, int]] = set()
_VERIFIED_LOCK = threading.Lock()


def _identity(file: Path) -> tuple[str, int, int] | None:
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return (str(file), stat.st_size, stat.st_mtime_ns)


def _damaged(file: Path, what: str, exc: Exception) -> StoreError:
    """The error for a DuckDB file that cannot be read, with the way out; the file itself is never touched."""
    return StoreError(
        f"DuckDB file {file} {what} ({exc}). It was left untouched: move it aside and re-materialize, or point "
        f"{settings.DUCKDB_PATH_ENV} at another file."
    )


class _Backoff:
    """Waits that double from ``first`` up to 2 s, with jitter, until ``timeout_s`` has passed since creation."""

    def __init__(self, timeout_s: float, first: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        self.delay = first

    def wait(self) -> bool:
        """Sleep before the next try and return True; False (no sleep) once the deadline has passed."""
        if time.monotonic() >= self.deadline:
            return False
        time.sleep(self.delay + random.uniform(0, self.delay))
        self.delay = min(self.delay * 2, 2.0)
        return True


class DuckDBStore(dg.ConfigurableResource):
    """The project's DuckDB file, or a DuckLake (``ducklake_catalog`` set). Connections are short; a held lock
    (file) or a lost commit race (DuckLake) is retried with backoff."""

    path: str = Field(description="DuckDB file; default <data dir>/jpslm.duckdb (unused with a DuckLake)")
    lock_timeout_s: float = Field(default=120.0, description="How long to wait for another writer")
    ducklake_catalog: str | None = Field(
        default=None,
        description="DuckLake catalogue after 'ducklake:' (e.g. 'postgres:dbname=jpslm host=db user=jpslm'); "
        "set, the store is a DuckLake that many processes and machines can write",
    )
    ducklake_data_path: str | None = Field(
        default=None, description="DuckLake data files: a folder every writer reaches, or an object-storage URL"
    )

    @property
    def file(self) -> Path:
        return Path(self.path)

    @property
    def is_lake(self) -> bool:
        return bool(self.ducklake_catalog)

    @property
    def location(self) -> str:
        """How messages name this store."""
        if self.is_lake:
            return f"DuckLake {self.ducklake_catalog} (data in {self.ducklake_data_path})"
        return f"DuckDB file {self.file}"

    def exists(self) -> bool:
        """Whether there is anything to read yet (a DuckLake's catalogue is created on first connect)."""
        return self.is_lake or self.file.exists()

    @contextmanager
    def _connect_lake(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.ducklake_data_path:
            raise StoreError(
                f"the DuckLake store {self.ducklake_catalog} has no data path: set {settings.DUCKLAKE_DATA_PATH_ENV} "
                "to a folder every worker can reach (or an object-storage URL)."
            )
        backoff = _Backoff(self.lock_timeout_s, 0.1)
        while True:
            try:
                conn = connect_lake(self.ducklake_catalog or "", self.ducklake_data_path, CATALOG, read_only)
                break
            except LakeError as exc:
                raise StoreError(str(exc)) from exc
            except duckdb.Error as exc:
                if read_only and "does not exist" in str(exc) and "DuckLake" in str(exc):
                    # A reader came first: a read-only attach may not create the catalogue, so create it (an
                    # empty lake) and read that.
                    connect_lake(self.ducklake_catalog or "", self.ducklake_data_path, CATALOG).close()
                    continue
                # Processes attaching a new lake at once all try to create its catalogue tables; the losers
                # find them made on the next try.
                if "Failed to initialize DuckLake" in str(exc) and backoff.wait():
                    continue
                raise StoreError(
                    f"cannot open {self.location}: {_first_line(exc)}. Check that the catalogue server is running "
                    f"and {settings.DUCKLAKE_CATALOG_ENV} names it (database, host, port, user)."
                ) from exc
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.is_lake:
            with self._connect_lake(read_only) as conn:
                yield conn
            return
        file = self.file
        if read_only and not file.exists():
            raise StoreError(f"DuckDB file {file} does not exist yet: materialize the upstream assets first.")
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder of DuckDB file {file} ({exc.strerror}); set "
                f"{settings.DUCKDB_PATH_ENV} or {settings.DATA_DIR_ENV} to a writable place."
            ) from exc
        backoff = _Backoff(self.lock_timeout_s, 0.05)
        while True:
            try:
                conn = open_duckdb(file, read_only=read_only)
                break
            except duckdb.Error as exc:
                if _is_lock_error(exc) and backoff.wait():
                    continue
                if _is_lock_error(exc):
                    raise StoreError(
                        f"DuckDB file {file} is locked by another process for more than "
                        f"{self.lock_timeout_s:.0f} s ({exc}). Stop that process (a notebook or duckdb CLI "
                        "holding it open) or raise lock_timeout_s; nothing was written."
                    ) from exc
                if _is_corrupt_error(exc):
                    raise _damaged(file, "is not a readable DuckDB database", exc) from exc
                raise StoreError(f"cannot open DuckDB file {file}: {exc}") from exc
        try:
            yield conn
        finally:
            conn.close()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pl.DataFrame:
        """Run a read query and return a polars frame."""
        with self.connect(read_only=True) as conn:
            try:
                return conn.execute(sql, params or []).pl()
            except duckdb.CatalogException as exc:
                first_line = str(exc).strip().splitlines()[0]
                if "Table with name" not in first_line:
                    raise
                raise StoreError(
                    f"{self.location}: {first_line} The table is not there yet: materialize the assets that write "
                    "it (`jpslm demo`, or the UI) first."
                ) from exc
            except duckdb.Error as exc:
                if self.is_lake or not _is_corrupt_error(exc):
                    raise
                raise _damaged(self.file, "is damaged", exc) from exc

    def check_integrity(self, force: bool = False) -> None:
        """Read every row of every table once; DuckDB verifies each block's checksum as it reads it.

        Raises ``StoreError`` naming the first damaged table and the way out. Cheap (a 12 MB file takes
        about 30 ms) and done once per process for each content of the file (size and modification time),
        before this process first writes to it, so writes stop at the first sign of damage. A DuckLake has no
        local file to check: its catalogue server and its immutable Parquet files answer for themselves.
        """
        if self.is_lake:
            return
        identity = _identity(self.file)
        if identity is None:
            return
        with _VERIFIED_LOCK:
            if identity in _VERIFIED and not force:
                return
        with self.connect(read_only=True) as conn:
            tables = conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' AND table_catalog = current_database() ORDER BY 1, 2"
            ).fetchall()
            for schema, name in tables:
                try:
                    conn.execute(f'SELECT count(*), sum(hash(t)) FROM "{schema}"."{name}" AS t').fetchone()
                except duckdb.Error as exc:
                    raise _damaged(
                        self.file,
                        f"is damaged: table {schema}.{name} cannot be read; nothing more was written to it",
                        exc,
                    ) from exc
        with _VERIFIED_LOCK:
            _VERIFIED.add(identity)

    def table_exists(self, table: str) -> bool:
        schema, name = split_table(table)
        if not self.exists():
            return False
        with self.connect(read_only=True) as conn:
            found = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                [schema, name],
            ).fetchone()
        return bool(found and found[0])

    def write_slice(
        self,
        table: str,
        frame: pl.DataFrame,
        slice_values: Mapping[str, Any],
        lineage: LineageRecord | None = None,
    ) -> None:
        """Replace the rows of ``table`` matching ``slice_values`` by ``frame``, atomically with lineage."""
        missing = [column for column in slice_values if column not in frame.columns]
        if missing:
            raise StoreError(
                f"frame for {table} lacks partition column(s) {missing}; the asset must include them."
            )
        schema, name = split_table(table)
        self.check_integrity()
        backoff = _Backoff(self.lock_timeout_s, 0.05)
        while True:
            try:
                self._write_slice_once(table, schema, name, frame, slice_values, lineage)
                break
            except duckdb.Error as exc:
                # Another DuckLake writer committed first and touched the same table: nothing of this
                # transaction was kept, so the whole write runs again on the newer snapshot.
                if not (self.is_lake and is_conflict(exc)):
                    raise
                if not backoff.wait():
                    raise StoreError(
                        f"{self.location}: writing table {table} lost the commit race to other writers for "
                        f"{self.lock_timeout_s:.0f} s ({_first_line(exc)}); nothing was written. Retry, or raise "
                        "lock_timeout_s."
                    ) from exc
        if self.is_lake:
            return
        identity = _identity(self.file)
        if identity is not None:
            with _VERIFIED_LOCK:
                _VERIFIED.add(identity)  # what this process just wrote it has not damaged

    def _write_slice_once(
        self,
        table: str,
        schema: str,
        name: str,
        frame: pl.DataFrame,
        slice_values: Mapping[str, Any],
        lineage: LineageRecord | None,
    ) -> None:
        with self.connect() as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                conn.execute(lineage_ddl(self.is_lake))
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                conn.register("incoming_frame", frame.to_arrow())
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS "{schema}"."{name}" AS SELECT * FROM incoming_frame LIMIT 0'
                )
                _add_missing_columns(conn, schema, name)
                where, params = _slice_filter(slice_values)
                conn.execute(f'DELETE FROM "{schema}"."{name}" WHERE {where}', params)
                conn.execute(f'INSERT INTO "{schema}"."{name}" BY NAME SELECT * FROM incoming_frame')
                if lineage is not None:
                    lineage.insert(conn, table, frame)
                conn.execute("COMMIT")
            except Exception as exc:
                with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended the transaction
                    conn.execute("ROLLBACK")
                if isinstance(exc, duckdb.Error | OSError) and _is_space_error(exc):
                    folder = Path(self.ducklake_data_path or ".") if self.is_lake else self.file.parent
                    free = shutil.disk_usage(folder).free if folder.exists() else 0
                    raise StoreError(
                        f"{self.location}: the disk is full while writing table {table} "
                        f"({_first_line(exc)}; {free / 2**20:.0f} MiB free now). Nothing was written: the "
                        f"transaction was rolled back and the earlier rows of {table} are intact. Free space on "
                        f"that disk or set {settings.DUCKDB_PATH_ENV} to a file on a larger one, then re-materialize."
                    ) from exc
                if isinstance(exc, duckdb.Error) and not self.is_lake and _is_corrupt_error(exc):
                    raise _damaged(self.file, f"is damaged (found writing table {table})", exc) from exc
                raise
            finally:
                conn.unregister("incoming_frame")

    def read_slices(
        self, table: str, slices: Sequence[Mapping[str, Any]], allow_missing: bool = False
    ) -> pl.DataFrame:
        """Rows of ``table`` matching any of ``slices``; an empty mapping means the whole table, an empty
        list of slices no rows. ``allow_missing``: a table that does not exist yet reads as no rows."""
        schema, name = split_table(table)
        if allow_missing and not self.exists():
            return pl.DataFrame()
        with self.connect(read_only=True) as conn:
            exists = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                [schema, name],
            ).fetchone()
            if not exists or not exists[0]:
                if allow_missing:
                    return pl.DataFrame()
                raise StoreError(
                    f"table {table} does not exist in {self.location}: materialize the asset that writes it first."
                )
            clauses, params = [], []
            for slice_values in slices:
                where, slice_params = _slice_filter(slice_values)
                clauses.append(f"({where})")
                params.extend(slice_params)
            where_sql = " OR ".join(clauses) if clauses else "FALSE"
            try:
                return conn.execute(f'SELECT * FROM "{schema}"."{name}" WHERE {where_sql}', params).pl()
            except duckdb.Error as exc:
                if self.is_lake or not _is_corrupt_error(exc):
                    raise
                raise _damaged(self.file, f"is damaged: table {table} cannot be read", exc) from exc

    def latest_materialization(
        self, conn: duckdb.DuckDBPyConnection, asset_key: str, partition_key: str | None
    ) -> tuple[str | None, str | None]:
        """(materialization_id, data_version) of the newest materialization of an asset partition."""
        has_lineage = conn.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'lineage' AND table_name = 'materializations'"
        ).fetchone()
        if not has_lineage or not has_lineage[0]:
            return None, None
        row = conn.execute(
            "SELECT materialization_id, data_version FROM lineage.materializations "
            "WHERE asset_key = ? AND partition_key IS NOT DISTINCT FROM ? "
            "ORDER BY materialized_at DESC LIMIT 1",
            [asset_key, partition_key],
        ).fetchone()
        return (row[0], row[1]) if row else (None, None)


def split_table(table: str) -> tuple[str, str]:
    parts = table.split(".")
    if len(parts) != 2 or not all(part.replace("_", "").isalnum() for part in parts):
        raise StoreError(f"table name {table!r} must be 'schema.table' in letters, digits and underscores")
    return parts[0], parts[1]


def _slice_filter(slice_values: Mapping[str, Any]) -> tuple[str, list[Any]]:
    if not slice_values:
        return "TRUE", []
    clauses = [f'CAST("{column}" AS VARCHAR) = ?' for column in slice_values]
    return " AND ".join(clauses), [str(value) for value in slice_values.values()]


def _add_missing_columns(conn: duckdb.DuckDBPyConnection, schema: str, name: str) -> None:
    """Schema evolution: columns an asset newly produces are added (older rows get NULL)."""
    have = {
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ?",
            [schema, name],
        ).fetchall()
    }
    described = conn.execute("DESCRIBE SELECT * FROM incoming_frame").fetchall()
    for column, column_type, *_ in described:
        if column not in have:
            conn.execute(f'ALTER TABLE "{schema}"."{name}" ADD COLUMN "{column}" {column_type}')


def default_store() -> DuckDBStore:
    """The store the settings select: the DuckDB file, or the DuckLake of ``JPSLM_STORE=ducklake``."""
    lake = settings.ducklake_settings()
    if lake is None:
        return DuckDBStore(path=str(settings.duckdb_path()))
    catalog, data_path = lake
    return DuckDBStore(path=str(settings.duckdb_path()), ducklake_catalog=catalog, ducklake_data_path=data_path)


def read_tables(store: DuckDBStore, tables: Sequence[str]) -> dict[str, pl.DataFrame | None]:
    """Whole tables by name; None where a table (or the DuckDB file) does not exist yet."""
    frames: dict[str, pl.DataFrame | None] = {}
    for table in tables:
        frames[table] = store.read_slices(table, [{}]) if store.table_exists(table) else None
    return frames
