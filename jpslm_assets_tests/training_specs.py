"""One way for tests to set up a training run: records written to ``work/train.jsonl`` and a ``TrainingSpec``
whose plan is the demo profile's for the stage with ``overrides`` applied. Imports no polars, so the GPU tests
(which run where only the training stack is installed) share it with the CPU tests."""

from collections.abc import Mapping, Sequence
from pathlib import Path

from jpslm_assets.resources import trainer_spec
from jpslm_assets.settings import load_profile
from jpslm_assets.training.plan import resolve_plan


def training_spec(
    model: str,
    base: Path,
    work: Path,
    records: Sequence[tuple[str, str, str]],
    stage: int,
    overrides: Mapping[str, object],
    backend: trainer_spec.Backend = "cpu_lora",
    **fields: object,
) -> trainer_spec.TrainingSpec:
    """``records`` are (qa_id, question, answer); ``fields`` set further TrainingSpec fields (cpu_threads, ...)."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    trainer_spec.write_training_records(data, list(records))
    return trainer_spec.TrainingSpec(
        partition=f"{model}|{len(records)}",
        model=model,
        base_model_ref=str(base),
        end_of_turn="<|im_end|>",
        plan=resolve_plan(load_profile("demo").train, stage, dict(overrides)),
        backend=backend,
        data_path=str(data),
        checkpoint_dir=str(work / "checkpoints"),
        output_dir=str(work / "adapter"),
        **fields,  # type: ignore[arg-type]
    )
