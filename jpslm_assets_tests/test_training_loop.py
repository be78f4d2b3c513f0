"""The trainer on a tiny random-init Llama: answer-only loss, resume after a kill, out-of-memory handling."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jpslm_assets.catalogue import model_entry
from jpslm_assets.resources import trainer as trainer_lib
from jpslm_assets.resources import trainer_layout, trainer_loading, trainer_loop, trainer_spec
from jpslm_assets.resources.models import build_config_model
from jpslm_assets.training import nll
from jpslm_assets.training.chat_format import IGNORE_INDEX
from jpslm_assets_tests.test_training_support import qa_pairs
from jpslm_assets_tests.training_specs import training_spec


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-base")
    pool = qa_pairs(120)
    build_config_model(
        model_entry("tiny-llama"), list(zip(pool["question"], pool["answer"], strict=True)), folder, 5
    )
    return folder


def make_spec(base: Path, work: Path, examples: int, **overrides: object) -> trainer_spec.TrainingSpec:
    pool = qa_pairs(examples, seed=21)
    settings = {
        "per_device_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_seq_length": 96,
        **overrides,
    }
    records = list(zip(pool["qa_id"], pool["question"], pool["answer"], strict=True))
    # one thread: identical float reduction order in every run that is compared
    return training_spec("tiny-llama", base, work, records, 2, settings, cpu_threads=1)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_loss_covers_answer_tokens_only(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    spec = make_spec(tiny_base, tmp_path, 8).model_copy(update={"padding_free": False})
    prepared = trainer_loop.prepare_run(spec, lambda message: None)
    trainer = prepared.trainer
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels, input_ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]

    by_ids = {tuple(example.input_ids): example for example in prepared.examples}
    for row in range(labels.size(0)):
        length = int(mask[row].sum())
        example = by_ids[tuple(input_ids[row, :length].tolist())]
        prompt = example.prompt_tokens
        assert prompt > 0
        assert (labels[row, :prompt] == IGNORE_INDEX).all(), "prompt tokens must not be trained on"
        assert torch.equal(labels[row, prompt:length], input_ids[row, prompt:length])
        assert (labels[row, length:] == IGNORE_INDEX).all(), "padding must not be trained on"

    model = trainer.model
    model.eval()
    with torch.no_grad():
        loss = float(trainer.compute_loss(model, dict(batch)))
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        sums, counts = nll.token_losses(logits, labels)
        answer_only = float(sums.sum() / counts.sum())
        everything = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
        all_sums, all_counts = nll.token_losses(logits, everything)
        whole_sequence = float(all_sums.sum() / all_counts.sum())
    assert loss == pytest.approx(answer_only, rel=1e-5)
    assert abs(loss - whole_sequence) > 1e-3, "the check must tell answer-only from whole-sequence loss"


def test_answer_position_head_gives_the_models_own_loss(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU loss applies the LM head to answer positions only; with the Trainer's ``num_items_in_batch`` it
    equals the model's own loss over full logits, for padded and padding-free batches, and the full-logits
    fallback (architectures not known to have a plain head) gives it too. Test NLL scoring agrees as well."""
    import torch
    from transformers import Trainer

    for padding_free in (False, True):
        spec = make_spec(tiny_base, tmp_path / str(padding_free), 8, per_device_batch_size=4)
        prepared = trainer_loop.prepare_run(
            spec.model_copy(update={"padding_free": padding_free}), lambda m: None
        )
        trainer, model = prepared.trainer, prepared.trainer.model
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) + 3  # as if 3 more came in other micro-batches
        model.eval()
        with torch.no_grad():
            own = float(Trainer.compute_loss(trainer, model, {**batch, "use_cache": False}, num_items_in_batch=items))
            head_on_answers = float(trainer.compute_loss(model, dict(batch), num_items_in_batch=items))
            monkeypatch.setattr(nll, "PLAIN_HEAD_ARCHITECTURES", frozenset())
            full_logits = float(trainer.compute_loss(model, dict(batch), num_items_in_batch=items))
            monkeypatch.undo()
        assert head_on_answers == pytest.approx(own, rel=1e-5), padding_free
        assert full_logits == pytest.approx(own, rel=1e-5), padding_free

    examples = prepared.examples
    scored = nll.answer_token_nll(model, examples, pad_id=0, batch_size=3)
    with torch.no_grad():
        sums, counts = [], []
        for example in examples:  # one at a time, full logits: no padding involved at all
            ids = torch.tensor([example.input_ids])
            loss_sum, count = nll.token_losses(model(input_ids=ids).logits, torch.tensor([example.labels]))
            sums.append(float(loss_sum[0]))
            counts.append(int(count[0]))
    reference = nll.summarize(sums, counts)
    assert scored.answer_tokens == reference.answer_tokens
    assert scored.per_question_nll == pytest.approx(reference.per_question_nll, rel=1e-5)


def test_padding_free_batches_mask_prompts_and_give_the_padded_loss(tiny_base: Path, tmp_path: Path) -> None:
    """One row per micro-batch, positions restarting per example: same answer-only loss as padded rows."""
    import torch

    def first_batch(padding_free: bool) -> tuple[trainer_loop.PreparedRun, dict]:
        spec = make_spec(tiny_base, tmp_path / str(padding_free), 8, per_device_batch_size=4)
        prepared = trainer_loop.prepare_run(
            spec.model_copy(update={"padding_free": padding_free}), lambda m: None
        )
        trainer = prepared.trainer
        return prepared, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    packed_run, packed = first_batch(True)
    padded_run, padded = first_batch(False)
    assert packed_run.layout.padding_free and not padded_run.layout.padding_free
    assert "attention_mask" not in packed and packed["input_ids"].size(0) == 1
    assert packed["input_ids"].numel() == int(padded["attention_mask"].sum()), "no padding token in the row"
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    ends = [*starts[1:], packed["input_ids"].size(1)]
    by_ids = {tuple(example.input_ids): example for example in packed_run.examples}
    assert len(starts) == 4
    for start, end in zip(starts, ends, strict=True):
        example = by_ids[tuple(packed["input_ids"][0, start:end].tolist())]
        labels = packed["labels"][0, start:end]
        assert (labels[: example.prompt_tokens] == IGNORE_INDEX).all(), "prompt tokens must not be trained on"
        assert (labels[example.prompt_tokens :] != IGNORE_INDEX).all()

    losses = []
    for prepared, batch in ((packed_run, packed), (padded_run, padded)):
        prepared.trainer.model.eval()
        with torch.no_grad():
            losses.append(float(prepared.trainer.compute_loss(prepared.trainer.model, dict(batch))))
        if prepared is packed_run:
            with torch.no_grad():  # the same row read as one long sequence: examples would see each other
                crossed = {key: packed[key] for key in ("input_ids", "labels")}
                losses.append(float(prepared.trainer.compute_loss(prepared.trainer.model, crossed)))
    packed_loss, crossed_loss, padded_loss = losses
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert abs(crossed_loss - padded_loss) > 1e-4, "the check must tell a block-diagonal mask from none"


def adapters_with_and_without(
    base: Path, work: Path, field: str, sink: trainer_spec.ProgressSink = lambda message: None
) -> tuple[dict, dict]:
    """Train 3 steps with the spec's ``field`` on, then off; return (adapter with, adapter without).

    LoRA dropout is off, so that neither run draws random masks (their shapes would differ between layouts)."""
    layout_field = {"compile_layers": "compiled_layers"}.get(field, field)
    adapters = []
    for value in (True, False):
        spec = make_spec(base, work / str(value), 8, per_device_batch_size=4, max_steps=3, dropout=0.0)
        result = trainer_loop.run_training(spec.model_copy(update={field: value}), sink)
        assert result.layout is not None and getattr(result.layout, layout_field) is value
        assert all(point.seconds is not None and point.seconds > 0 for point in result.loss_curve)
        adapters.append(adapter_tensors(Path(result.adapter_path)))
    return adapters[0], adapters[1]


def assert_same_adapter(first: dict, second: dict) -> None:
    import torch

    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5, msg=name)


def test_padding_free_training_ends_with_the_padded_runs_adapter(tiny_base: Path, tmp_path: Path) -> None:
    assert_same_adapter(*adapters_with_and_without(tiny_base, tmp_path, "padding_free"))


def test_compiled_decoder_layers_train_to_the_eager_runs_adapter(tiny_base: Path, tmp_path: Path) -> None:
    """torch.compile of each decoder layer changes how the step runs, not what it computes."""
    from transformers import AutoConfig

    messages: list[str] = []
    assert_same_adapter(*adapters_with_and_without(tiny_base, tmp_path, "compile_layers", messages.append))
    layers = AutoConfig.from_pretrained(tiny_base).num_hidden_layers
    assert any(f"{layers} decoder layers compiled" in message for message in messages), messages


def test_compiling_a_model_without_listed_decoder_layers_is_refused_by_name() -> None:
    import torch

    with pytest.raises(
        trainer_spec.TrainingError, match="no decoder layers to compile in Sequential.*compile_layers"
    ):
        trainer_loading.compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_layout_keeps_the_effective_batch_and_checkpoints_only_when_memory_is_short(tiny_base: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_base)
    spec = make_spec(
        tiny_base, tiny_base.parent / "layout", 4, per_device_batch_size=2, gradient_accumulation_steps=4
    )
    per_token = trainer_layout.activation_bytes_per_token(config, spec.plan.dropout)

    cpu = trainer_layout.choose_layout(spec, config, 100, None, fused_available=True)
    assert (cpu.per_device_batch_size, cpu.gradient_accumulation_steps, cpu.gradient_checkpointing) == (
        2,
        4,
        False,
    )
    assert not cpu.fused_kernels, "fused kernels are CUDA-only"
    assert not trainer_layout.choose_layout(
        spec, config, 100, None, True, compile_available=True
    ).compiled_layers
    asked = spec.model_copy(update={"compile_layers": True})
    assert trainer_layout.choose_layout(asked, config, 100, None, False).compiled_layers, (
        "CPU compiles on request"
    )
    assert trainer_layout.choose_layout(
        spec, config, 100, 10**12, False, compile_available=True
    ).compiled_layers
    declined = spec.model_copy(update={"compile_layers": False})
    assert not trainer_layout.choose_layout(
        declined, config, 100, 10**12, False, compile_available=True
    ).compiled_layers

    roomy = trainer_layout.choose_layout(spec, config, 100, 10**12, fused_available=False)
    assert (roomy.per_device_batch_size, roomy.gradient_accumulation_steps) == (8, 1)
    assert not roomy.gradient_checkpointing and not roomy.fused_kernels

    # Room for 4 examples' activations but not 8: micro-batch 4, accumulation 2, still no checkpointing.
    four = trainer_layout.choose_layout(
        spec, config, 100, int(5 * 100 * per_token / 0.7), fused_available=True
    )
    assert (four.per_device_batch_size, four.gradient_accumulation_steps, four.gradient_checkpointing) == (
        4,
        2,
        False,
    )
    assert four.fused_kernels

    # Room for one example without checkpointing, several with it: micro-batch 1 would leave the GPU waiting on
    # small kernels (measured: docs/benchmarks/gpu.md), so checkpointing with the larger micro-batch wins; asked
    # to stay off, checkpointing stays off.
    one = int(1.5 * 100 * per_token / 0.7)
    small = trainer_layout.choose_layout(spec, config, 100, one, fused_available=False)
    assert small.gradient_checkpointing and small.per_device_batch_size >= 2, small
    assert "without it only micro-batch 1 would fit" in small.reason
    assert small.per_device_batch_size * small.gradient_accumulation_steps == 8
    off = spec.model_copy(update={"gradient_checkpointing": False})
    kept = trainer_layout.choose_layout(off, config, 100, one, fused_available=False)
    assert (kept.per_device_batch_size, kept.gradient_checkpointing) == (1, False)
    assert trainer_layout.prefer_checkpointing(1, 2) and trainer_layout.prefer_checkpointing(2, 8)
    assert not trainer_layout.prefer_checkpointing(4, 8), "micro-batch 4 keeps the GPU busy enough"
    assert not trainer_layout.prefer_checkpointing(2, 2) and not trainer_layout.prefer_checkpointing(1, None)

    # Not even one example without checkpointing: checkpointing on, largest micro-batch that then fits.
    short = trainer_layout.choose_layout(
        spec, config, 100, int(0.9 * 100 * per_token / 0.7), fused_available=False
    )
    assert (
        short.gradient_checkpointing and short.per_device_batch_size * short.gradient_accumulation_steps == 8
    )

    fixed = spec.model_copy(update={"adapt_micro_batch": False, "gradient_checkpointing": True})
    forced = trainer_layout.choose_layout(fixed, config, 100, 10**12, fused_available=False)
    assert (
        forced.per_device_batch_size,
        forced.gradient_accumulation_steps,
        forced.gradient_checkpointing,
    ) == (
        2,
        4,
        True,
    )


def test_a_memory_budget_is_what_the_layout_plans_within(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoConfig

    gib = trainer_layout.GIB
    # Without a budget the free memory is planned for; with one, the budget less what the process holds.
    assert trainer_layout.planning_memory("p", 60 * gib, 6 * gib, None) == (60 * gib, "60.0 GiB free")
    usable, note = trainer_layout.planning_memory("p", 60 * gib, 6 * gib, 16)
    assert usable == 10 * gib and note == "10.0 GiB left of a 16 GiB budget"
    assert trainer_layout.planning_memory("p", 4 * gib, 6 * gib, 16)[0] == 4 * gib, "never more than is free"
    with pytest.raises(trainer_spec.TrainingError,
                       match=r"partition p: the loaded model already holds 17.0 GiB "
                       r"of the 16 GiB memory budget.*raise memory_budget_gib"):  # fmt: skip
        trainer_layout.planning_memory("p", 60 * gib, 17 * gib, 16)
    # The same run on a roomy card and inside a budget that leaves room for half the micro-batch.
    config = AutoConfig.from_pretrained(tiny_base)
    spec = make_spec(tiny_base, tiny_base.parent / "budget", 4, per_device_batch_size=2, gradient_accumulation_steps=4)
    per_token = trainer_layout.activation_bytes_per_token(config, spec.plan.dropout)
    roomy = trainer_layout.choose_layout(spec, config, 100, 10**12, fused_available=False)
    budget_gib = (int(5 * 100 * per_token / 0.7) + 2 * gib) / gib
    left, note = trainer_layout.planning_memory("p", 10**12, 2 * gib, budget_gib)
    capped = trainer_layout.choose_layout(spec, config, 100, left, fused_available=False, memory_note=note)
    assert roomy.per_device_batch_size == 8 and capped.per_device_batch_size == 4
    assert capped.gradient_accumulation_steps == 2 and not capped.gradient_checkpointing
    assert capped.reason.startswith(f"{note}; micro-batch 4")
    # The resource hands its budget to every run's spec; a spec's own budget wins.
    seen: list[trainer_spec.TrainingSpec] = []
    resource = trainer_lib.LoraTrainer(backend="cpu_lora", memory_budget_gib=16)
    monkeypatch.setattr(trainer_lib, "run_training", lambda spec, sink: seen.append(spec))
    resource.train(spec, print)
    resource.train(spec.model_copy(update={"memory_budget_gib": 12}), print)
    assert [run.memory_budget_gib for run in seen] == [16, 12]
    with pytest.raises(ValueError, match="memory_budget_gib"):
        trainer_lib.LoraTrainer(memory_budget_gib=0)
    # The profile setting the trainer resource is built from.
    from jpslm_assets.settings import load_profile

    assert load_profile("demo").train.memory_budget_gib is None
    monkeypatch.setenv("JPSLM_TRAIN__MEMORY_BUDGET_GIB", "16")
    assert load_profile("demo").train.memory_budget_gib == 16


def test_training_writes_a_peft_adapter_and_a_loss_curve(tiny_base: Path, tmp_path: Path) -> None:
    messages: list[str] = []
    result = trainer_loop.run_training(make_spec(tiny_base, tmp_path, 8, max_steps=3), messages.append)
    adapter = Path(result.adapter_path)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "checkpoints").exists(), "checkpoints are removed once the adapter is in place"
    assert [point.step for point in result.loss_curve] == [1, 2, 3]
    assert result.tokens > 0 and result.tokens_per_s > 0 and result.backend == "cpu_lora"
    assert any("step 3/3" in m and "tokens/s" in m and "ETA" in m for m in messages)
    with pytest.raises(trainer_spec.TrainingError, match="already exists"):
        trainer_loop.run_training(make_spec(tiny_base, tmp_path, 8, max_steps=3), messages.append)


def test_pairs_whose_prompt_fills_the_budget_are_reported_not_trained(
    tiny_base: Path, tmp_path: Path
) -> None:
    spec = make_spec(tiny_base, tmp_path, 8, max_steps=1, max_seq_length=48)
    records = trainer_spec.read_training_records(Path(spec.data_path))
    records[:2] = [(qa_id, question * 40, answer) for qa_id, question, answer in records[:2]]
    trainer_spec.write_training_records(Path(spec.data_path), records)
    messages: list[str] = []
    result = trainer_loop.run_training(spec, messages.append)
    assert (result.examples, result.skipped_examples) == (6, 2)
    assert any("2 of 8 pairs left out" in m and records[0][0] in m for m in messages)

    everything_long = [(qa_id, question * 40, answer) for qa_id, question, answer in records]
    trainer_spec.write_training_records(Path(spec.data_path), everything_long)
    again = spec.model_copy(update={"output_dir": str(tmp_path / "again")})
    with pytest.raises(trainer_spec.TrainingError, match=r"tiny-llama\|8: every one of the 8 prompts"):
        trainer_loop.run_training(again, messages.append)


def test_cpu_bf16_autocast_keeps_float32_adapter_weights(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    spec = make_spec(tiny_base, tmp_path, 8, max_steps=2).model_copy(update={"cpu_bf16": True})
    prepared = trainer_loop.prepare_run(spec, lambda message: None)
    assert prepared.trainer.args.bf16 and prepared.trainer.args.device.type == "cpu"
    result = trainer_loop.run_training(spec, lambda message: None)
    assert result.precision == "bf16-autocast" and math.isfinite(result.train_loss_final)
    assert {t.dtype for t in adapter_tensors(Path(result.adapter_path)).values()} == {torch.float32}


def test_run_killed_after_a_checkpoint_resumes_to_the_same_adapter(tiny_base: Path, tmp_path: Path) -> None:
    import torch

    settings = {"max_steps": 24, "checkpoint_every_steps": 4, "seed": 3}
    reference = trainer_loop.run_training(make_spec(tiny_base, tmp_path / "straight", 48, **settings), print)

    spec = make_spec(tiny_base, tmp_path / "killed", 48, **settings)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json(), encoding="utf-8")
    worker = subprocess.Popen(  # a training process of its own, killed mid-run
        [
            sys.executable,
            "-c",
            "import sys; from jpslm_assets.resources import trainer as t; "
            "t.run_training(t.TrainingSpec.model_validate_json(open(sys.argv[1]).read()), lambda m: None)",
            str(spec_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    checkpoints = Path(spec.checkpoint_dir)
    deadline = time.monotonic() + 300
    try:
        while trainer_loop.resumable_checkpoint(checkpoints) is None:
            assert worker.poll() is None, "the worker ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    assert not Path(spec.output_dir).exists(), "the kill must land mid-training"
    killed_at = int(trainer_loop.resumable_checkpoint(checkpoints).name.split("-")[1])
    assert 4 <= killed_at < 24

    resumed = trainer_loop.run_training(spec, print)
    assert resumed.resumed_from_step is not None and resumed.resumed_from_step >= 4
    assert resumed.steps == reference.steps == 24
    assert [p.step for p in resumed.loss_curve] == list(range(1, 25))
    expected, got = adapter_tensors(Path(reference.adapter_path)), adapter_tensors(Path(resumed.adapter_path))
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.allclose(tensor, got[name], atol=1e-5, rtol=1e-4), name
    assert resumed.train_loss_final == pytest.approx(reference.train_loss_final, rel=1e-4)
    assert any(t.abs().max() > 0 for name, t in got.items() if "lora_B" in name), "training moved lora_B"


def test_out_of_memory_names_the_partition_and_leaves_no_adapter(
    tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    import trl

    def exhausted(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trl.SFTTrainer, "training_step", exhausted)
    spec = make_spec(tiny_base, tmp_path, 8, max_steps=3)
    with pytest.raises(trainer_spec.TrainingOutOfMemoryError) as caught:
        trainer_loop.run_training(spec, lambda message: None)
    message = str(caught.value)
    assert "partition tiny-llama|8" in message and "per_device_batch_size=2" in message
    assert "halve per_device_batch_size" in message and "gradient_accumulation_steps" in message
    assert not Path(spec.output_dir).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_worker_process_trains_through_dagster_pipes_and_reports_progress_result_and_errors(
    tiny_base: Path, tmp_path: Path
) -> None:
    """launcher='subprocess': the worker is started by Dagster's PipesSubprocessClient; the spec goes as a Pipes
    extra, progress arrives as Pipes log lines, the result and a training error as custom messages."""
    import dagster as dg

    spec = make_spec(tiny_base, tmp_path / "ok", 8, max_steps=2)
    in_process = trainer_loop.run_training(
        make_spec(tiny_base, tmp_path / "same", 8, max_steps=2), lambda m: None
    )
    broken = make_spec(tiny_base, tmp_path / "broken", 8, max_steps=2)
    records = trainer_spec.read_training_records(Path(broken.data_path))
    # Every prompt longer than max_seq_length: no answer token is left to train on.
    trainer_spec.write_training_records(Path(broken.data_path), [(i, q * 40, a) for i, q, a in records])
    resource = trainer_lib.LoraTrainer(backend="cpu_lora", launcher="subprocess", cpu_precision="fp32")
    assert resource.launcher_for("cpu_lora") == ("subprocess", 1)
    results: dict[str, trainer_spec.TrainingResult] = {}

    @dg.asset
    def pipes_adapter(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        results["ok"] = resource.train(spec, context.log.info, context=context)
        return dg.MaterializeResult(metadata={"adapter": results["ok"].adapter_path})

    @dg.asset
    def failing_adapter(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resource.train(broken, context.log.info, context=context)
        return dg.MaterializeResult()

    instance = dg.DagsterInstance.ephemeral()
    run = dg.materialize([pipes_adapter], instance=instance)
    assert run.success
    result = results["ok"]
    assert Path(result.adapter_path).is_dir() and result.backend == "cpu_lora" and result.tokens > 0
    # Same spec, same numbers as training in the step's own process.
    assert [p.loss for p in result.loss_curve] == pytest.approx([p.loss for p in in_process.loss_curve], rel=1e-5)
    logs = [entry.user_message for entry in instance.all_logs(run.run_id)]
    assert any("step 2/2" in line and "tokens/s" in line for line in logs), "progress arrives as Pipes log lines"
    assert any("via subprocess (Dagster Pipes)" in line for line in logs)

    failed = dg.materialize([failing_adapter], raise_on_error=False)
    assert not failed.success
    failure = next(e for e in failed.all_events if e.is_step_failure)
    text = str(failure.step_failure_data.error)  # type: ignore[union-attr]
    assert "TrainingError" in text and "every one of the 8 prompts" in text and "raise max_seq_length" in text

    # The worker launcher without a context says what it needs.
    with pytest.raises(trainer_spec.TrainingError, match="needs the asset's execution context"):
        resource.train(spec, print)
