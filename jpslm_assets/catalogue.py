"""The model catalogue: which base models exist, where their weights come from, how they chat.

The catalogue is data (``jpslm_assets/data/models.yaml``). Architecture facts are deliberately absent:
they are read from each model's config when it is loaded, never copied from the paper.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field


class UnknownModelError(KeyError):
    """A model key that is not in the catalogue."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


class ModelEntry(BaseModel):
    key: str
    source: Literal["hub", "config", "gguf_package"]
    architecture: str
    chat_template: Literal["llama3", "chatml", "tanuki"]
    trust_remote_code: bool = False
    stop_tokens: list[str] = Field(default_factory=list)
    hf_id: str | None = None
    package: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    paper_attention_label: str | None = None
    known_export_problems: list[str] = Field(default_factory=list)


@lru_cache(maxsize=1)
def load_catalogue() -> dict[str, ModelEntry]:
    text = (resources.files("jpslm_assets") / "data" / "models.yaml").read_text("utf-8")
    raw = yaml.safe_load(text)["models"]
    return {key: ModelEntry(key=key, **entry) for key, entry in raw.items()}


def model_entry(key: str) -> ModelEntry:
    catalogue = load_catalogue()
    if key not in catalogue:
        raise UnknownModelError(
            f"model {key!r} is not in the catalogue; known models: {', '.join(sorted(catalogue))}. "
            "Add it to jpslm_assets/data/models.yaml or fix the JPSLM_MODELS / run-config value."
        )
    return catalogue[key]
