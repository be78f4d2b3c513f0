"""The judge rubric's levels (score, English and Japanese wording, prompt version), read from the
packaged rubric file, so score distributions list every level even when no answer received it."""

from __future__ import annotations

import polars as pl

from jpslm_assets.judging.rubric import load_rubric

SOURCE = None


def model(frame: None) -> pl.DataFrame:
    rubric = load_rubric()
    return pl.DataFrame(
        {
            "score": [level.score for level in rubric.levels],
            "description_en": [level.en for level in rubric.levels],
            "description_ja": [level.ja for level in rubric.levels],
            "prompt_version": [rubric.prompt_version] * len(rubric.levels),
        },
        schema={
            "score": pl.Int32,
            "description_en": pl.Utf8,
            "description_ja": pl.Utf8,
            "prompt_version": pl.Utf8,
        },
    ).sort("score")
