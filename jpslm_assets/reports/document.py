"""One self-contained HTML evaluation report: figures as base64 PNGs, score tables, provenance.

The file has no external references (no scripts, stylesheets, fonts or image links), so it can be mailed to
a colleague and opened offline. Text is HTML-escaped; tables come from polars frames. The file is written to
a temporary name in the target folder and renamed into place, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from jpslm_assets.artifacts import write_atomic


class ReportError(RuntimeError):
    """The report cannot be written; the message names the file and the fix."""


@dataclass(frozen=True)
class ReportFigure:
    key: str
    title: str
    caption: str
    png: bytes | None
    placeholder_reason: str | None = None


@dataclass(frozen=True)
class ReportTable:
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str | None = None
    empty_message: str = "no rows yet"


@dataclass(frozen=True)
class ReportDocument:
    title: str
    created_at: datetime
    run_id: str
    profile: str
    figures: list[ReportFigure]
    tables: list[ReportTable] = field(default_factory=list)
    provenance: list[tuple[str, str]] = field(default_factory=list)
    # A TrueType font to embed (subset to the characters used), so Japanese text renders on machines
    # without Japanese fonts; None leaves it to the reader's system fonts.
    font_path: Path | None = None
    # The report's first line: the judges' validity verdicts (a judge without signal is said here first).
    lead: str | None = None

    @property
    def placeholders(self) -> int:
        return sum(1 for figure in self.figures if figure.png is None or figure.placeholder_reason)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown for an inline PNG, the form Dagster's metadata viewer renders as an image."""
    clean = alt.replace("[", "(").replace("]", ")")
    return f"![{clean}]({png_data_uri(png)})"


def format_cell(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, missing values as an em dash, booleans as yes/no."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def frame_table(
    frame: pl.DataFrame,
    columns: Sequence[str],
    title: str,
    note: str | None = None,
    empty_message: str = "no rows yet",
    digits: Mapping[str, int] | None = None,
) -> ReportTable:
    """A report table from the listed columns of a frame (columns it lacks are shown as dashes)."""
    digits = digits or {}
    rows = [
        [format_cell(row.get(column), digits.get(column, 3)) for column in columns]
        for row in frame.iter_rows(named=True)
    ]
    return ReportTable(title, list(columns), rows, note, empty_message)


def markdown_table(table: ReportTable) -> str:
    """The same table as Markdown, for asset metadata."""
    if not table.rows:
        return f"_{table.empty_message}_"

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in table.headers) + " |",
        "|" + "---|" * len(table.headers),
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


EMBEDDED_FONT_FAMILY = "ReportJapanese"

_STYLE = """
body{font-family:"ReportJapanese","IPAexGothic","Noto Sans CJK JP","Hiragino Sans","Yu Gothic",sans-serif;margin:2rem auto;
max-width:1100px;color:#222;line-height:1.5;padding:0 1rem}
h1{font-size:1.6rem;border-bottom:2px solid #2e7d32;padding-bottom:.3rem}
h2{font-size:1.25rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #bbb;padding:.25rem .6rem;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}
figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9rem;color:#555}
.placeholder{background:#fff8e1;border:1px dashed #f9a825;padding:.8rem}
.meta td{text-align:left}.note{font-size:.85rem;color:#555}
"""


def _table_html(table: ReportTable) -> str:
    parts = [f"<h2>{html.escape(table.title)}</h2>"]
    if not table.rows:
        parts.append(f'<p class="placeholder">{html.escape(table.empty_message)}</p>')
    else:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
        )
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if table.note:
        parts.append(f'<p class="note">{html.escape(table.note)}</p>')
    return "\n".join(parts)


def _figure_html(figure: ReportFigure) -> str:
    title = html.escape(figure.title)
    caption = html.escape(figure.caption)
    parts = [f'<h2 id="{html.escape(figure.key)}">{title}</h2>']
    if figure.placeholder_reason:
        parts.append(
            f'<p class="placeholder">データがまだありません: {html.escape(figure.placeholder_reason)}</p>'
        )
    if figure.png is not None:
        parts.append(
            f'<figure><img alt="{title}" src="{png_data_uri(figure.png)}"><figcaption>{caption}</figcaption>'
            "</figure>"
        )
    return "\n".join(parts)


def font_face_css(font_path: Path, text: str) -> str:
    """An @font-face rule with the font subset to the characters of ``text`` (tens of KB, not MB)."""
    from fontTools import subset  # a matplotlib dependency; imported here to keep module import cheap

    options = subset.Options()
    options.layout_features = ["*"]
    options.name_IDs = ["*"]
    try:
        font = subset.load_font(str(font_path), options)
    except OSError as exc:
        raise ReportError(
            f"cannot read the report font {font_path} ({exc}); reinstall japanize-matplotlib"
        ) from exc
    subsetter = subset.Subsetter(options)
    subsetter.populate(text="".join(sorted(set(text))))
    subsetter.subset(font)
    buffer = io.BytesIO()
    subset.save_font(font, buffer, options)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'@font-face{{font-family:"{EMBEDDED_FONT_FAMILY}";'
        f'src:url(data:font/ttf;base64,{encoded}) format("truetype");}}'
    )


def render_html(document: ReportDocument) -> str:
    """The whole report as one HTML string (UTF-8, no external resources)."""
    stamp = document.created_at.isoformat(timespec="seconds")
    meta_rows = [
        ("作成日時 (created)", stamp),
        ("Dagster run", document.run_id),
        ("プロファイル (profile)", document.profile),
        ("図 (figures)", f"{len(document.figures)} ({document.placeholders} without data)"),
    ]
    meta = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in meta_rows)
    contents = "".join(
        f'<li><a href="#{html.escape(f.key)}">{html.escape(f.title)}</a></li>' for f in document.figures
    )
    sections = [_table_html(table) for table in document.tables]
    sections += [_figure_html(figure) for figure in document.figures]
    provenance = ""
    if document.provenance:
        rows = "".join(
            f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in document.provenance
        )
        provenance = (
            '<h2>出典 (provenance)</h2><table class="meta"><thead><tr><th>table</th>'
            f"<th>latest materialization</th></tr></thead><tbody>{rows}</tbody></table>"
        )
    lead = f'<p class="lead"><strong>{html.escape(document.lead)}</strong></p>\n' if document.lead else ""
    body = (
        lead
        + f"<h1>{html.escape(document.title)}</h1>\n"
        f'<table class="meta">{meta}</table>\n<ul>{contents}</ul>\n'
        + "\n".join(sections)
        + f"\n{provenance}\n"
    )
    font_css = font_face_css(document.font_path, document.title + body) if document.font_path else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="ja"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(document.title)}</title><style>{font_css}{_STYLE}</style></head><body>\n"
        f"{body}</body></html>\n"
    )


def write_atomically(path: Path, data: bytes) -> Path:
    """``artifacts.write_atomic`` (temporary file in the same folder, atomic rename), with the error a user can
    act on when the folder cannot be made."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(
            f"cannot write {path}: folder {path.parent} is not writable ({exc.strerror}); set JPSLM_DATA_DIR "
            "to a writable folder."
        ) from exc
    write_atomic(path, data)
    return path


def report_file_name(created_at: datetime, run_id: str) -> str:
    """``evaluation-20260301T030000-1a2b3c4d.html``: sortable by time, unique per run."""
    safe_run = "".join(c for c in run_id if c.isalnum())[:8] or "adhoc"
    return f"evaluation-{created_at.strftime('%Y%m%dT%H%M%S')}-{safe_run}.html"


def write_report(document: ReportDocument, folder: Path) -> Path:
    """Render and write the report under ``folder``; returns the final path."""
    path = Path(folder) / report_file_name(document.created_at, document.run_id)
    return write_atomically(path, render_html(document).encode("utf-8"))
