"""The self-contained HTML report: no external references, escaped text, embedded font, atomic writes."""

from __future__ import annotations

import base64
import io
import re
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest
from fontTools.ttLib import TTFont

from jpslm_assets import artifacts
from jpslm_assets.common import figures
from jpslm_assets.reports import document as doc
from jpslm_assets.reports import figure_catalogue


def _png() -> bytes:
    spec = figure_catalogue.load_figure_catalogue().figures["radar"]
    return figures.placeholder_figure(spec, "test", figure_catalogue.load_figure_catalogue().render, {}).png


def _document(**overrides: object) -> doc.ReportDocument:
    values: dict[str, object] = {
        "title": "評価レポート <demo> & co",
        "created_at": datetime(2026, 3, 2, 3, 0, 5, tzinfo=timezone.utc),
        "run_id": "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
        "profile": "demo",
        "figures": [
            doc.ReportFigure("radar", "5軸レーダー", "caption <b>bold?</b>", _png()),
            doc.ReportFigure("nll_curve", "テストNLL", "no data", _png(), "table eval.scale_curve is empty"),
        ],
        "tables": [
            doc.frame_table(
                pl.DataFrame({"model": ["tiny-llama"], "avg_score": [2.3456], "ci_low": [None]},
                             schema_overrides={"ci_low": pl.Float64}),
                ["model", "avg_score", "ci_low", "absent"],
                "スコア要約",
            ),
            doc.ReportTable("F16 vs Q4", ["model"], [], empty_message="nothing evaluated yet"),
        ],
        "provenance": [("marts.score_summary ← score_summary", "2026-03-02 03:00:00 UTC")],
        "font_path": figures.japanese_font_path(),
    }  # fmt: skip
    values.update(overrides)
    return doc.ReportDocument(**values)  # type: ignore[arg-type]


def test_html_is_self_contained_and_escaped() -> None:
    text = doc.render_html(_document())
    # Every src / href / url(...) is inline data or an in-page anchor: the file works offline when mailed.
    references = re.findall(r'(?:src|href)="([^"]*)"', text) + re.findall(r"url\(([^)]*)\)", text)
    assert references
    assert all(ref.startswith(("data:", "#")) for ref in references), references
    assert "<script" not in text and "http://" not in text and "https://" not in text
    assert "評価レポート &lt;demo&gt; &amp; co" in text and "<demo>" not in text
    assert "caption &lt;b&gt;bold?&lt;/b&gt;" in text
    assert text.count('src="data:image/png;base64,') == 2
    assert "データがまだありません: table eval.scale_curve is empty" in text
    assert "<td>2.346</td>" in text and "<td>—</td>" in text  # rounded; missing values shown as a dash
    assert "nothing evaluated yet" in text
    assert "2 (1 without data)" in text
    # Embedded images decode to the exact PNG bytes.
    first = re.search(r'src="data:image/png;base64,([^"]+)"', text)
    assert first is not None and base64.b64decode(first.group(1)) == _png()


def test_embedded_font_is_a_subset_with_the_japanese_glyphs_used() -> None:
    text = doc.render_html(_document())
    match = re.search(r"url\(data:font/ttf;base64,([^)]+)\)", text)
    assert match is not None
    font_bytes = base64.b64decode(match.group(1))
    assert 5_000 < len(font_bytes) < 1_000_000  # a subset, not the 4 MB font
    cmap = TTFont(io.BytesIO(font_bytes))["cmap"].getBestCmap()
    for char in "評価レポート軸要約":
        assert ord(char) in cmap, char
    assert ord("鬱") not in cmap  # not used, so not embedded
    assert doc.render_html(_document(font_path=None)).count("@font-face") == 0


def test_markdown_table_and_image_for_metadata() -> None:
    table = doc.ReportTable("t", ["a", "b|c"], [["1", "x|y"]])
    assert doc.markdown_table(table) == "| a | b\\|c |\n|---|---|\n| 1 | x\\|y |"
    assert doc.markdown_table(doc.ReportTable("t", ["a"], [], empty_message="none yet")) == "_none yet_"
    image = doc.markdown_image(b"\x89PNG", "図 [1]")
    assert image == "![図 (1)](data:image/png;base64,iVBORw==)"


def test_report_file_name_is_sortable_and_unique_per_run() -> None:
    created = datetime(2026, 3, 2, 3, 0, 5, tzinfo=timezone.utc)
    assert doc.report_file_name(created, "0a1b2c3d-4e5f") == "evaluation-20260302T030005-0a1b2c3d.html"
    assert doc.report_file_name(created, "../..") == "evaluation-20260302T030005-adhoc.html"


def test_write_report_replaces_atomically_and_a_failed_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = doc.write_report(_document(), tmp_path / "reports")
    assert path.name == "evaluation-20260302T030005-0a1b2c3d.html"
    assert path.read_text("utf-8").startswith("<!DOCTYPE html>")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        doc.write_report(_document(title="new title"), tmp_path / "reports")
    assert path.read_bytes() == before  # the previous report is intact
    assert [p.name for p in (tmp_path / "reports").iterdir()] == [path.name]  # no temp file left behind


def test_unwritable_report_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(doc.ReportError, match="not-a-folder.*JPSLM_DATA_DIR"):
        doc.write_report(_document(), blocker / "reports")


def _validity(verdicts: dict[str, str]) -> pl.DataFrame:
    from jpslm_assets.judging.controls import VALIDITY_SCHEMA, VERDICT_RULES

    rows = [
        {"judge": judge, "questions": 8, "positive_mean": 2.0, "negative_mean": 1.9, "positive_pass_rate": 0.5,
         "negative_pass_rate": 0.1, "unparsed": 0, "separation": 0.12, "separation_ci_low": -0.5,
         "separation_ci_high": 0.75, "verdict": verdict, "verdict_rule": VERDICT_RULES}
        for judge, verdict in verdicts.items()
    ]  # fmt: skip
    return pl.DataFrame(rows, schema=VALIDITY_SCHEMA)


def test_the_first_line_of_the_report_states_the_judge_verdict() -> None:
    from jpslm_assets.reports.assets import validity_lead

    silent = validity_lead(_validity({"a/llama_cpp/en": "valid", "smollm2-135m/llama_cpp/en": "no signal"}))
    assert silent == (
        "警告 (warning): no signal from judge smollm2-135m/llama_cpp/en (separation 0.12 [-0.50, 0.75]): it scores "
        "an unrelated reference about as high as the right one, so its scores below say nothing about the answers."
    )
    assert validity_lead(_validity({"qwen2.5:14b/ollama/ja": "valid"})).startswith(
        "判定者の妥当性 (judge validity): qwen2.5:14b/ollama/ja: valid (separation 0.12 [-0.50, 0.75])"
    )
    assert "not measured" in validity_lead(None) and "not measured" in validity_lead(_validity({}))
    text = doc.render_html(_document(lead=silent))
    body = text.split("<body>\n", 1)[1]
    assert body.startswith('<p class="lead"><strong>警告 (warning): no signal from judge smollm2-135m'), body[:200]
