"""The DuckLake store: the same tables and lineage as the single DuckDB file, writable by many processes.

DuckLake keeps its catalogue (tables, columns, snapshots) in a database server, PostgreSQL here, and the rows
in Parquet files under a data path that every writer can reach (a shared folder or object storage). Writers
commit snapshots optimistically: two processes writing at once both succeed unless their changes touch the
same rows, in which case the second commit fails with a transaction conflict and the store retries the whole
write (``DuckDBStore.write_slice``), so nothing is lost and no partition is left half-written.

The DuckDB extensions come from pip (``duckdb-extension-ducklake``, ``duckdb-extension-postgres``, the
``ducklake`` extra), not from DuckDB's extension repository, which locked-down clusters cannot reach. They are
installed once per process into a private extension folder and loaded by name; the wheel's version must equal
the installed duckdb's.

Settings: ``JPSLM_STORE=ducklake`` selects this store; ``JPSLM_DUCKLAKE_CATALOG`` is the catalogue as DuckLake
takes it after ``ducklake:`` (``postgres:dbname=jpslm host=db.example user=jpslm``, or a DuckDB file path for a
one-machine trial), and ``JPSLM_DUCKLAKE_DATA_PATH`` the folder or URL for the data files.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
from pathlib import Path

import duckdb
from filelock import FileLock

SNAPSHOT_RETRIES = 100
EXTENSION_PACKAGES = {"postgres": "duckdb-extension-postgres", "ducklake": "duckdb-extension-ducklake"}

_INSTALLED: set[tuple[str, str]] = set()
_INSTALL_LOCK = threading.Lock()


class LakeError(RuntimeError):
    """The DuckLake store cannot be opened; the message names the setting or package to fix."""


def extension_directory() -> Path:
    """Where this user's copies of the pip-shipped extensions are installed (one folder per user)."""
    return Path(tempfile.gettempdir()) / f"jpslm-duckdb-extensions-{os.getuid()}"


def extension_file(name: str) -> Path:
    """The extension file a pip package ships for the installed duckdb, or a ``LakeError`` saying what to install."""
    package = EXTENSION_PACKAGES[name]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    fix = f"`pip install 'jpslm-assets[ducklake]'` (or `pip install {package}=={duckdb.__version__}`)"
    if spec is None or spec.origin is None:
        raise LakeError(f"the DuckLake store needs the DuckDB extension {name!r} from pip: {fix}.")
    folder = Path(spec.origin).parent / "extensions"
    file = folder / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not file.is_file():
        shipped = sorted(p.name for p in folder.glob("v*")) if folder.is_dir() else []
        raise LakeError(
            f"{package} ships the extension for duckdb {', '.join(shipped) or 'no version'}, but duckdb "
            f"{duckdb.__version__} is installed; the two must match: {fix}."
        )
    return file


def needed_extensions(catalog: str) -> tuple[str, ...]:
    return ("postgres", "ducklake") if catalog.startswith("postgres:") else ("ducklake",)


def connect_lake(
    catalog: str, data_path: str, alias: str, read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lake attached as ``alias`` and made current."""
    directory = extension_directory()
    names = needed_extensions(catalog)
    conn = duckdb.connect(
        ":memory:",
        config={"extension_directory": str(directory), "autoinstall_known_extensions": False},
    )
    try:
        with _INSTALL_LOCK:
            missing = [name for name in names if (name, str(directory)) not in _INSTALLED]
            if missing:
                directory.mkdir(parents=True, exist_ok=True)
                # Processes starting at once would write the same files: one installs while the others wait.
                with FileLock(directory / ".install.lock"):
                    for name in missing:
                        # INSTALL copies the wheel's file under the extension's canonical name (the postgres
                        # file is ``postgres_scanner``), which a LOAD of the wheel's path would not find.
                        conn.execute(f"INSTALL {sql_string(str(extension_file(name)))}")
                        _INSTALLED.add((name, str(directory)))
        for name in names:
            conn.execute(f"LOAD {name}")
        # Concurrent commits race for the next snapshot id; DuckLake retries that itself, 10 times by default,
        # which many writers at once can exhaust.
        conn.execute(f"SET ducklake_max_retry_count = {SNAPSHOT_RETRIES}")
        if not data_path.endswith("/"):
            data_path += "/"
        if "://" not in data_path:
            Path(data_path).mkdir(parents=True, exist_ok=True)
        options = f"DATA_PATH {sql_string(data_path)}" + (", READ_ONLY" if read_only else "")
        conn.execute(f"ATTACH {sql_string('ducklake:' + catalog)} AS {alias} ({options})")
        conn.execute(f"USE {alias}")
    except BaseException:
        conn.close()
        raise
    return conn


def is_conflict(exc: BaseException) -> bool:
    """A commit that lost to another writer; nothing of it was kept, so the whole write can run again.

    DuckLake raises ``TransactionException`` ("Failed to commit DuckLake transaction") both for a real conflict
    (two writers deleting from one table, creating one schema) and when its own retries of a snapshot-id race
    ran out."""
    text = str(exc)
    return isinstance(exc, duckdb.TransactionException) and (
        "Failed to commit DuckLake transaction" in text or "Transaction conflict" in text
    )


def sql_string(text: str) -> str:
    """A SQL string literal (ATTACH and INSTALL take no bound parameters)."""
    return "'" + text.replace("'", "''") + "'"
