"""Content hashes and atomic files: a frame's data version, a file's or folder's sha256, and writes that
readers never see half-done."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import polars as pl


def frame_version(frame: pl.DataFrame) -> str:
    """A content hash of a frame, used as its Dagster data version and in lineage."""
    buffer = io.BytesIO()
    frame.write_ipc(buffer, compression="uncompressed")
    return hashlib.sha256(buffer.getvalue()).hexdigest()[:24]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a torn file, and a
    failed write leaves the previous file as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(handle, 0o644)  # mkstemp creates 0600; artifacts are meant to be read by other tools
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def artifact_record(path: Path) -> dict[str, Any]:
    """Path, bytes and sha256 of a file or folder artifact (a folder hashes its files in name order)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        total = 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file_sha256(file).encode())
            total += file.stat().st_size
        return {"artifact_path": str(path), "artifact_bytes": total, "artifact_sha256": digest.hexdigest()}
    return {
        "artifact_path": str(path),
        "artifact_bytes": path.stat().st_size,
        "artifact_sha256": file_sha256(path),
    }
