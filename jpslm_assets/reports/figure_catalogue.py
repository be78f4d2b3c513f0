"""The report's figure catalogue (``jpslm_assets/data/reports.yaml``) and the renderer of each of its keys."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from importlib import resources

import polars as pl
import yaml

from jpslm_assets.common.figures import FigureCatalogue, FigureResult, FigureSpec, Renderer, RenderSettings
from jpslm_assets.export.figures import render_quantization_effect
from jpslm_assets.judging.figures import (
    render_category_heatmap,
    render_model_comparison,
    render_question_scatter,
    render_radar,
    render_score_distribution,
)
from jpslm_assets.qa.figures import render_relation_types, render_subset_quality
from jpslm_assets.training.figures import render_loss_curves, render_nll_curve


@lru_cache(maxsize=1)
def load_figure_catalogue() -> FigureCatalogue:
    """The figure list from ``jpslm_assets/data/reports.yaml``, checked against the renderers."""
    text = (resources.files("jpslm_assets") / "data" / "reports.yaml").read_text("utf-8")
    raw = yaml.safe_load(text)
    figures = {key: FigureSpec(key=key, **entry) for key, entry in raw["figures"].items()}
    unknown = sorted(set(figures) - set(RENDERERS))
    if unknown:
        raise ValueError(
            f"reports.yaml lists figure(s) {unknown} with no renderer in"
            f" jpslm_assets/reports/figure_catalogue.py; known renderers: {sorted(RENDERERS)}"
        )
    return FigureCatalogue(
        render=RenderSettings(**raw["render"]),
        figures=figures,
        secondary_tables=raw.get("secondary_tables") or {},
    )


RENDERERS: dict[str, Renderer] = {
    "relation_types": render_relation_types,
    "subset_quality": render_subset_quality,
    "loss_curves": render_loss_curves,
    "nll_curve": render_nll_curve,
    "model_comparison": render_model_comparison,
    "score_distribution": render_score_distribution,
    "category_heatmap": render_category_heatmap,
    "radar": render_radar,
    "question_scatter": render_question_scatter,
    "quantization_effect": render_quantization_effect,
}


def render_figure(key: str, frames: Mapping[str, pl.DataFrame | None]) -> FigureResult:
    """Render the catalogue's figure ``key`` from ``{table: frame}`` (missing tables count as empty)."""
    catalogue = load_figure_catalogue()
    if key not in catalogue.figures:
        raise KeyError(f"figure {key!r} is not in reports.yaml; known: {sorted(catalogue.figures)}")
    spec = catalogue.figures[key]
    return RENDERERS[key](spec, frames, catalogue.render)
