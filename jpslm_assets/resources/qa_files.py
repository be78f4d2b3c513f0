"""Where the QA template catalogue and the held-out test set are read from: the files shipped in the package, or a user's own."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import dagster as dg
from pydantic import Field

from jpslm_assets.qa import held_out as qa_test_set
from jpslm_assets.qa.templates import TemplateCatalogue, load_catalogue


def package_file(name: str) -> Path:
    return Path(str(resources.files("jpslm_assets") / "data" / name))


class QADataFiles(dg.ConfigurableResource):
    """Where the QA template catalogue and the held-out test set are read from.

    Defaults are the files shipped in the package (``jpslm_assets/data/``); point the fields at other files
    to try new templates or another test set without touching the package.
    """

    templates_path: str = Field(default="", description="QA template catalogue YAML; empty = packaged file")
    test_set_path: str = Field(default="", description="Test set JSONL; empty = packaged test_set_200.jsonl")

    def templates_file(self) -> Path:
        return Path(self.templates_path) if self.templates_path else package_file("qa_templates.yaml")

    def test_set_file(self) -> Path:
        return Path(self.test_set_path) if self.test_set_path else package_file("test_set_200.jsonl")

    def catalogue(self) -> TemplateCatalogue:
        return load_catalogue(self.templates_file())

    def test_set_text(self) -> str:
        path = self.test_set_file()
        if not path.is_file():
            raise qa_test_set.TestSetError(
                f"test set file {path} does not exist; set qa_files.test_set_path."
            )
        return path.read_text(encoding="utf-8")
