"""Profiles and paths: which models, n grid, backends and budgets a deployment uses.

A profile is a YAML file in ``jpslm_assets/data/profiles``; ``JPSLM_PROFILE`` picks one (default ``demo``).
Every field can be overridden from the environment with the ``JPSLM_`` prefix and ``__`` for nesting, e.g.
``JPSLM_N_GRID='[100,200]'`` or ``JPSLM_TRAIN__EPOCHS=2``. Asset run config overrides it again per run.
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

PROFILE_ENV = "JPSLM_PROFILE"
DATA_DIR_ENV = "JPSLM_DATA_DIR"
DUCKDB_PATH_ENV = "JPSLM_DUCKDB_PATH"
STORE_ENV = "JPSLM_STORE"
DUCKLAKE_CATALOG_ENV = "JPSLM_DUCKLAKE_CATALOG"
DUCKLAKE_DATA_PATH_ENV = "JPSLM_DUCKLAKE_DATA_PATH"


class SettingsError(ValueError):
    """A setting (profile name, path, override) is wrong; the message names the setting and the fix."""


class LoraStage(BaseModel):
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(ge=0.0, lt=1.0)


class TrainSettings(BaseModel):
    backend: Literal["auto", "unsloth", "bnb_qlora", "cpu_lora"] = "auto"
    epochs: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    per_device_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    max_seq_length: int = Field(gt=16)
    warmup_ratio: float = Field(ge=0.0, lt=1.0)
    checkpoint_every_steps: int = Field(gt=0)
    seed: int = 42
    # CPU training only (backend cpu_lora); the default of the trainer resource's cpu_precision. ``auto``
    # uses bf16 autocast only where the CPU computes bf16 natively (AVX512-BF16 or AMX), else fp32: on an
    # AVX2-only CPU a bf16 matmul runs about 40x slower than fp32.
    cpu_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # CUDA training only: the GPU memory a run plans its layout within and is capped at, in GiB (16 stands in
    # for the paper's 16 GB card on a larger GPU); unset: whatever the device has free.
    memory_budget_gib: float | None = Field(default=None, gt=0)
    stage1: LoraStage
    stage2: LoraStage


class GenerationSettings(BaseModel):
    backend: Literal["llama_cpp", "llama_server", "ollama", "transformers"] = "llama_cpp"
    max_new_tokens: int = Field(gt=0)
    num_ctx: int = Field(gt=0)  # per request (llama_server: per slot)
    temperature: float = Field(ge=0.0)
    seed: int = 42
    # Questions answered at once; capped by the backend's max_concurrency (1 for llama_cpp and transformers,
    # OllamaBackend.parallel, LlamaServerBackend.parallel). Env: JPSLM_GENERATION__CONCURRENCY.
    concurrency: int = Field(default=1, ge=1)
    # What deployment does when the configured Ollama server does not answer: "none" fails the step with the
    # server named; "llama_cpp" serves the GGUF with embedded llama.cpp instead and records that backend in
    # the deployment, answers and scores. Env: JPSLM_GENERATION__FALLBACK.
    fallback: Literal["none", "llama_cpp"] = "none"
    # Network backends (Ollama, llama-server): a server that accepts a request and sends nothing is given up
    # after first_byte_timeout_s (also the longest pause between streamed tokens); one reply may take
    # request_timeout_s in all. Env: JPSLM_GENERATION__FIRST_BYTE_TIMEOUT_S, ..._REQUEST_TIMEOUT_S.
    first_byte_timeout_s: float = Field(default=45.0, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0)


class JudgeSettings(BaseModel):
    backend: Literal["llama_cpp", "ollama"] = "llama_cpp"
    model: str
    max_answer_chars: int = Field(gt=0)
    retries: int = Field(ge=0, le=10)
    # The longest reason a judge may write (the grammar / JSON schema bound it); None: the rubric's own.
    reason_max_chars: int | None = Field(default=None, gt=0, le=2000)
    # One judgement, retries included, may take this long; past it no attempt starts and the verdict is
    # stored unparseable, naming the deadline. Env: JPSLM_JUDGE__QUESTION_DEADLINE_S.
    question_deadline_s: float = Field(default=300.0, gt=0)


class ExportSettings(BaseModel):
    """GGUF export. ``fidelity_questions``: how many evaluation questions (the stratified, seeded subset) each
    GGUF's answer-token NLL is compared on against the merged HF model; 0 means all of ``eval_questions``.
    Scoring with every position's logits costs about a second a question for a 135M model on 2 cores."""

    fidelity_questions: int = Field(default=0, ge=0)


class ScheduleSettings(BaseModel):
    reevaluation_cron: str = "0 3 * * 1"


class AutomationSettings(BaseModel):
    """Which declarative automation starts on its own (``JPSLM_AUTOMATION__TRAINING=true``).

    ``training``: the automation sensor of the assets that train, score with a model, export, answer or
    judge (a GPU for hours on the paper profile) starts switched on. Off by default: those assets then run
    only when a user materializes them, or switches ``jpslm_training_automation`` on in the UI.
    """

    training: bool = False


class Profile(BaseSettings):
    """One deployment's settings. Loaded from the profile YAML, then overridden by ``JPSLM_*`` env vars."""

    model_config = SettingsConfigDict(env_prefix="JPSLM_", env_nested_delimiter="__", extra="ignore")

    name: str
    n_grid: list[int]
    models: list[str]
    # Stage 1's model (the scale sweep over n_grid); the paper's is swallow-8b. Default: the first model.
    reference_model: str | None = None
    formats: list[Literal["f16", "q4_k_m", "nf4"]]
    eval_questions: int = Field(gt=0, le=100)
    graph_store: Literal["seed", "neo4j"] = "seed"
    # With graph_store: seed, a folder holding your own nodes.jsonl and relations.jsonl (the shipped seed's
    # format) instead of the seed in the package; env JPSLM_KG_SEED_FOLDER.
    kg_seed_folder: str | None = None
    train: TrainSettings
    generation: GenerationSettings
    judge: JudgeSettings
    export: ExportSettings = ExportSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    automation: AutomationSettings = AutomationSettings()

    @field_validator("n_grid")
    @classmethod
    def _grid_sorted_positive(cls, value: list[int]) -> list[int]:
        if not value or any(n <= 0 for n in value) or len(set(value)) != len(value):
            raise ValueError("n_grid must be a non-empty list of distinct positive integers")
        return sorted(value)

    @model_validator(mode="after")
    def _reference_in_models(self) -> Profile:
        if not self.models:
            raise ValueError("models must name at least one model of the catalogue")
        if self.reference_model is None:
            self.reference_model = self.models[0]
        elif self.reference_model not in self.models:
            raise ValueError(
                f"reference_model {self.reference_model!r} is not one of the profile's models {self.models}; "
                "add it to models or pick one of them (JPSLM_REFERENCE_MODEL)"
            )
        return self

    @property
    def stage1_model(self) -> str:
        """The reference model stage 1 sweeps over the n grid."""
        return self.reference_model or self.models[0]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs).
        return (env_settings, init_settings)


def available_profiles() -> list[str]:
    folder = resources.files("jpslm_assets") / "data" / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_profile(name: str | None = None) -> Profile:
    """Load the named profile (default: ``$JPSLM_PROFILE`` or ``demo``) with env overrides applied."""
    name = name or os.environ.get(PROFILE_ENV) or "demo"
    known = available_profiles()
    if name not in known:
        raise SettingsError(
            f"{PROFILE_ENV}={name!r} is not a known profile; choose one of {', '.join(known)} "
            f"(profiles live in jpslm_assets/data/profiles/)."
        )
    text = (resources.files("jpslm_assets") / "data" / "profiles" / f"{name}.yaml").read_text("utf-8")
    try:
        return Profile(**yaml.safe_load(text))
    except ValidationError as exc:
        raise SettingsError(
            f"profile {name!r} is invalid after applying JPSLM_* environment overrides:\n{exc}"
        ) from exc


@lru_cache(maxsize=4)
def _cached_profile(name: str | None, env_key: tuple[tuple[str, str], ...]) -> Profile:
    return load_profile(name)


def current_profile() -> Profile:
    """The active profile, cached per set of JPSLM_* variables (tests change them)."""
    env_key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("JPSLM_")))
    return _cached_profile(None, env_key)


def data_dir(create: bool = True) -> Path:
    """The project's data directory (``$JPSLM_DATA_DIR``, default ``./data``), checked for writability."""
    path = Path(os.environ.get(DATA_DIR_ENV) or Path.cwd() / "data").expanduser().resolve()
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise SettingsError(
                f"data directory {path} is not writable ({exc.strerror}); set {DATA_DIR_ENV} to a "
                f"writable folder or fix its permissions."
            ) from exc
    return path


def artifact_dir() -> Path:
    """Where file artifacts (adapters, merged models, GGUFs, reports) live."""
    path = data_dir() / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def duckdb_path() -> Path:
    """The DuckDB file holding every table (``$JPSLM_DUCKDB_PATH``, default ``<data>/jpslm.duckdb``)."""
    override = os.environ.get(DUCKDB_PATH_ENV)
    return Path(override).expanduser().resolve() if override else data_dir() / "jpslm.duckdb"


def ducklake_settings() -> tuple[str, str] | None:
    """(catalogue, data path) when ``$JPSLM_STORE`` selects the DuckLake store, None for the DuckDB file."""
    kind = os.environ.get(STORE_ENV, "duckdb").strip().lower() or "duckdb"
    if kind == "duckdb":
        return None
    if kind != "ducklake":
        raise SettingsError(f"{STORE_ENV}={kind!r}: choose 'duckdb' (one file, the default) or 'ducklake'.")
    catalog = os.environ.get(DUCKLAKE_CATALOG_ENV, "").strip()
    data_path = os.environ.get(DUCKLAKE_DATA_PATH_ENV, "").strip()
    missing = [name for name, value in ((DUCKLAKE_CATALOG_ENV, catalog), (DUCKLAKE_DATA_PATH_ENV, data_path)) if not value]
    if missing:
        raise SettingsError(
            f"{STORE_ENV}=ducklake needs {' and '.join(missing)}: the catalogue (e.g. "
            "'postgres:dbname=jpslm host=db.example user=jpslm') and the folder or URL every worker writes data "
            "files to."
        )
    if "://" not in data_path:
        data_path = str(Path(data_path).expanduser().resolve())
    return catalog, data_path


def dagster_home() -> Path:
    """A default DAGSTER_HOME inside the data directory, with telemetry off, so run history persists."""
    home = Path(os.environ.get("DAGSTER_HOME") or data_dir() / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # Written to a temporary name and renamed, so a process starting at the same moment reads the whole
        # file or none of it.
        partial = home / f".dagster.yaml.{os.getpid()}.partial"
        partial.write_text(
            "telemetry:\n  enabled: false\n"
            "nux:\n  enabled: false\n"
            "concurrency:\n"
            "  runs:\n    max_concurrent_runs: 1\n"
            "  pools:\n    default_limit: 1\n"
            # Free the pool slots of a run that ended without freeing them; time out runs stuck starting.
            "run_monitoring:\n  enabled: true\n  free_slots_after_run_end_seconds: 30\n  start_timeout_seconds: 300\n",
            encoding="utf-8",
        )
        os.replace(partial, config)
    return home
