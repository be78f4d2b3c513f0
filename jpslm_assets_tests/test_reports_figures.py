"""Figures rendered from small fixture tables in a temporary DuckDB file: content, placeholders, errors, fonts."""

from __future__ import annotations

import io
import warnings

import numpy as np
import polars as pl
import pytest
from PIL import Image
from scipy import stats

from jpslm_assets.common import figures
from jpslm_assets.export import figures as figures_export
from jpslm_assets.judging import figures as figures_judging
from jpslm_assets.qa import figures as figures_dataset
from jpslm_assets.reports import figure_catalogue
from jpslm_assets.reports.assets import read_tables
from jpslm_assets.store import DuckDBStore
from jpslm_assets_tests.report_samples import sample_frames, write_samples


def _image(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _ink_fraction(png: bytes) -> float:
    """Share of pixels that are not (near) white: a blank or failed render has almost none."""
    pixels = np.asarray(_image(png).convert("L"))
    return float((pixels < 200).mean())


@pytest.fixture
def frames(store: DuckDBStore) -> dict[str, pl.DataFrame | None]:
    write_samples(store)
    tables = sorted({t for spec in figure_catalogue.load_figure_catalogue().figures.values() for t in spec.tables})
    return read_tables(store, tables)


def test_catalogue_has_every_figure_the_issue_lists_and_each_has_a_renderer() -> None:
    catalogue = figure_catalogue.load_figure_catalogue()
    assert set(catalogue.figures) == {
        "relation_types", "subset_quality", "loss_curves", "nll_curve", "model_comparison",
        "score_distribution", "category_heatmap", "radar", "question_scatter", "quantization_effect",
    }  # fmt: skip
    assert set(catalogue.figures) == set(figure_catalogue.RENDERERS)


@pytest.mark.parametrize("key", sorted(figure_catalogue.RENDERERS))
def test_every_figure_renders_from_the_duckdb_tables(
    key: str, frames: dict[str, pl.DataFrame | None]
) -> None:
    with warnings.catch_warnings():
        # matplotlib warns "Glyph ... missing from font(s)" when it would draw a tofu box.
        warnings.filterwarnings("error", message=".*missing from font.*")
        result = figure_catalogue.render_figure(key, frames)
    assert not result.is_placeholder
    image = _image(result.png)
    assert image.format == "PNG"
    assert image.size == (result.width_px, result.height_px)
    assert image.size[0] >= 600 and image.size[1] >= 200
    assert _ink_fraction(result.png) > 0.02
    spec = figure_catalogue.load_figure_catalogue().figures[key]
    assert all(
        result.source_rows[t] == (frames[t].height if frames[t] is not None else 0) for t in spec.tables
    )


def test_figure_statistics_match_independent_computations(frames: dict[str, pl.DataFrame | None]) -> None:
    subset = frames["qa.training_subset"]
    assert subset is not None
    quality = figures_dataset.subset_quality_stats(subset)
    # CV of each relation type's share across subset sizes, recomputed with scipy (sample std, ddof=1).
    pivot = quality["shares"].pivot(on="n", index="relation_type", values="share").sort("relation_type")
    matrix = pivot.drop("relation_type").fill_null(0).to_numpy()
    expected_cv = stats.variation(matrix, axis=1, ddof=1)
    assert quality["share_cv"]["cv"].to_numpy() == pytest.approx(expected_cv)
    for n, group in subset.group_by("n"):
        row = quality["answers"].filter(pl.col("n") == n[0]).row(0, named=True)
        assert row["avg_chars"] == pytest.approx(np.mean(group["answer_chars"].to_numpy()))
        assert row["rows"] == group.height

    result = figure_catalogue.render_figure("subset_quality", frames)
    assert result.stats["subset_sizes"] == [30, 60]
    assert result.stats["max_relation_share_cv"] == pytest.approx(round(float(expected_cv.max()), 5))

    nll = figure_catalogue.render_figure("nll_curve", frames)
    assert nll.stats["optimal_n"] == {"smollm2-135m": 60, "tiny-llama": 60}


def test_radar_axes_and_score_stability() -> None:
    sample = sample_frames()
    distribution = sample["marts.score_distribution"]
    stability = figures_judging.score_stability(distribution)
    judged = sample["eval.judge_scores"]
    for row in stability.iter_rows(named=True):
        counts = distribution.filter((pl.col("model") == row["model"]) & (pl.col("format") == row["format"]))
        values = np.repeat(counts["score"].to_numpy(), counts["count"].to_numpy())
        assert row["mean_score"] == pytest.approx(values.mean())
        assert row["std_score"] == pytest.approx(values.std())
        assert (
            row["questions"]
            == judged.filter((pl.col("model") == row["model"]) & (pl.col("format") == row["format"])).height
        )
    axes = figures_judging.radar_axes(sample["marts.score_summary"], distribution)
    assert axes.columns == [
        "series",
        "score_axis",
        "perfect_axis",
        "concise_axis",
        "speed_axis",
        "stability_axis",
    ]
    values = axes.drop("series").to_numpy()
    assert np.all((values >= 0) & (values <= 1))
    # The fastest and the most concise series score exactly 1 on their axes.
    assert axes["speed_axis"].max() == pytest.approx(1.0)
    assert axes["concise_axis"].max() == pytest.approx(1.0)
    assert axes.filter(pl.col("series") == "tiny-llama F16")["speed_axis"][0] == pytest.approx(0.6 / 1.5)


def test_labels_mix_model_n_and_format_only_where_needed() -> None:
    one_n = pl.DataFrame({"model": ["a", "a"], "n": [60, 60], "format": ["f16", "q4_k_m"]})
    assert figures.with_series_label(one_n)["series"].to_list() == ["a F16", "a Q4_K_M"]
    two_n = pl.DataFrame({"model": ["a", "a"], "n": [120, 60], "format": ["f16", "f16"]})
    assert figures.with_series_label(two_n)["series"].to_list() == ["a n=60", "a n=120"]
    judged = pl.DataFrame({"model": ["a", "a"], "n": [60, 60], "format": ["f16", "f16"], "judge": ["x", "y"]})
    assert figures.with_series_label(judged)["series"].to_list() == ["a [x]", "a [y]"]
    both = pl.DataFrame({"model": ["b", "a"], "n": [60, 60], "format": ["q4_k_m", "f16"]})
    assert figures.with_series_label(both, exclude=["format"], name="group")["group"].to_list() == ["a", "b"]
    assert figures.share_to_percent(pl.Series([0.25, 1])).to_list() == [25.0, 100.0]


@pytest.mark.parametrize("key", sorted(figure_catalogue.RENDERERS))
def test_empty_or_missing_tables_give_a_placeholder_that_names_them(key: str, store: DuckDBStore) -> None:
    spec = figure_catalogue.load_figure_catalogue().figures[key]
    # Half the figures see tables that exist with zero rows, the others tables that do not exist at all.
    for table, frame in sample_frames().items():
        if table in spec.tables and sorted(figure_catalogue.RENDERERS).index(key) % 2 == 0:
            store.write_slice(table, frame.head(0), {})
    frames = read_tables(store, spec.tables)
    result = figure_catalogue.render_figure(key, frames)
    assert result.is_placeholder
    assert result.placeholder_reason is not None
    assert spec.tables[0] in result.placeholder_reason
    assert "Materialize" in result.placeholder_reason
    assert _image(result.png).format == "PNG"
    assert _ink_fraction(result.png) > 0.001


def test_a_table_missing_a_column_is_a_clear_error(frames: dict[str, pl.DataFrame | None]) -> None:
    broken = dict(frames)
    summary = frames["marts.score_summary"]
    assert summary is not None
    broken["marts.score_summary"] = summary.drop("avg_score")
    with pytest.raises(figures.FigureInputError) as error:
        figure_catalogue.render_figure("model_comparison", broken)
    message = str(error.value)
    assert "marts.score_summary" in message and "avg_score" in message and "Re-materialize" in message


def test_unparsed_judge_outputs_are_counted_not_drawn_as_zero(frames: dict[str, pl.DataFrame | None]) -> None:
    result = figure_catalogue.render_figure("question_scatter", frames)
    assert result.stats == {"questions": 12, "series": 4, "unparsed": 4}


def test_loss_curves_keep_stage_two_apart_from_stage_one(frames: dict[str, pl.DataFrame | None]) -> None:
    result = figure_catalogue.render_figure("loss_curves", frames)
    # 2 models x (n=30 stage 1, n=60 stage 1, n=60 stage 2)
    assert result.stats["series"] == 6


def test_quantization_table_shows_the_delta_interval_when_the_mart_has_it() -> None:
    quant = sample_frames()["marts.quantization_effect"]
    table = figures_export.quantization_table(quant)
    assert table.headers == [
        "model",
        "n",
        "F16 平均",
        "Q4 平均",
        "差 Δ",
        "Δ 95% 区間",
        "p値",
        "有意",
        "速度比",
        "サイズ比",
    ]
    assert table.rows[0][5] == "[-0.500, +0.400]"
    assert table.rows[0][7] == "いいえ (no)"
    plain = figures_export.quantization_table(quant.drop("delta_ci_low", "delta_ci_high"))
    assert "Δ 95% 区間" not in plain.headers and len(plain.rows[0]) == len(plain.headers)


def test_japanese_font_is_the_shipped_file_and_covers_every_label() -> None:
    path = figures.japanese_font_path()
    assert path.name == "ipaexg.ttf" and "japanize_matplotlib" in str(path)
    assert figures.japanese_font_name() == "IPAexGothic"
    catalogue = figure_catalogue.load_figure_catalogue()
    text = "".join(spec.title + spec.caption for spec in catalogue.figures.values())
    text += "".join(figures_judging.RADAR_LABELS)
    text += "".join(figures_export.quantization_table(sample_frames()["marts.quantization_effect"]).headers)
    text += "データがまだありません 質問 判定スコア 最適 平均回答文字数 満点率 関係タイプ 判定不能 ±×Δ"
    assert figures.missing_glyphs(text) == set()
    # The check itself can fail: a glyph outside the font's coverage is reported.
    assert figures.missing_glyphs("堤防\U0001f600") == {"\U0001f600"}


def test_japanese_text_renders_as_glyphs_not_tofu() -> None:
    """Draw the same string with the shipped font and with DejaVu Sans (which has no kanji): only the
    former produces distinct glyph shapes; DejaVu draws the same box for every character."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def draw(char: str, family: str) -> np.ndarray:
        figure = Figure(figsize=(1, 1), dpi=60)
        FigureCanvasAgg(figure)
        figure.text(0.5, 0.5, char, fontsize=30, ha="center", va="center", family=family)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return np.asarray(_image(buffer.getvalue()).convert("L"))

    name = figures.japanese_font_name()
    assert not np.array_equal(draw("堤", name), draw("防", name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.array_equal(draw("堤", "DejaVu Sans"), draw("防", "DejaVu Sans"))
