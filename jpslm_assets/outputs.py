"""What assets of every stage return and show, one helper each: a frame with its data version
(``versioned_output``), a figure saved and embedded in the metadata (``png_metadata``), and the one upstream
row an asset partition needs (``single_row``)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from jpslm_assets import settings
from jpslm_assets.artifacts import frame_version, write_atomic


def versioned_output(frame: pl.DataFrame, **metadata: Any) -> dg.Output[pl.DataFrame]:
    """``frame`` with its content hash as the data version, so downstream assets go stale only when the rows
    change. The table name, row count and column schema are the IO manager's to record, for the rows it
    stores (``io_manager.DuckDBTableIOManager``)."""
    return dg.Output(frame, data_version=dg.DataVersion(frame_version(frame)), metadata=metadata)


def png_metadata(name: str, png: bytes, title: str, folder: Path | None = None) -> dict[str, Any]:
    """Write a figure to ``folder`` (default: the artifact dir's ``plots/``; temp file + rename) and embed it
    in the metadata, where the UI renders it."""
    path = (folder if folder is not None else settings.artifact_dir() / "plots") / f"{name}.png"
    write_atomic(path, png)
    encoded = base64.b64encode(png).decode("ascii")
    return {
        f"{name}_figure": dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})"),
        f"{name}_png": dg.MetadataValue.path(str(path)),
    }


def single_row(frame: pl.DataFrame, what: str, **keys: Any) -> dict[str, Any]:
    """The one row of an upstream frame for ``keys`` (a key whose column the frame lacks is not filtered on);
    a clear failure naming the asset and the partition when there is none or more than one."""
    for column, value in keys.items():
        if column in frame.columns:
            frame = frame.filter(pl.col(column).cast(pl.Utf8) == str(value))
    where = ", ".join(f"{column}={value}" for column, value in keys.items())
    if frame.height != 1:
        raise dg.Failure(
            f"{what}: expected one row for {where}, found {frame.height}; materialize {what} for this partition "
            "first."
        )
    return frame.row(0, named=True)
