"""The CUDA code paths: QLoRA (bitsandbytes NF4) training, merging, the nf4 answer format, multi-GPU.

Skipped without CUDA. Self-contained (no DuckDB, no Dagster instance): on a GPU machine that has only torch,
transformers, peft, trl, datasets and bitsandbytes besides this package, run

    python -m pytest jpslm_assets_tests/test_gpu.py -m gpu --noconftest -p no:cacheprovider
"""

import importlib.util
import json
import math
import os
from importlib import resources
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shipped_pairs(count: int) -> list[tuple[str, str, str]]:
    text = (resources.files("jpslm_assets") / "data" / "test_set_200.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [(row["question_id"], row["question"], row["reference_answer"]) for row in rows[:count]]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    from jpslm_assets.catalogue import model_entry
    from jpslm_assets.resources.models import build_config_model

    folder = tmp_path_factory.mktemp(request.param)
    pairs = [(question, answer) for _, question, answer in shipped_pairs(200)]
    build_config_model(model_entry(request.param), pairs, folder, 5)
    return request.param, folder


def qlora_spec(model: str, folder: Path, work: Path, **overrides: object):  # type: ignore[no-untyped-def]
    from jpslm_assets_tests.training_specs import training_spec

    settings = {
        "per_device_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_seq_length": 256,
        "learning_rate": 1e-3,
        "max_steps": 40,
        "checkpoint_every_steps": 10,
        **overrides,
    }
    return training_spec(model, folder, work, shipped_pairs(64), 1, settings, backend="bnb_qlora")


def test_backend_auto_picks_bitsandbytes_qlora_on_cuda() -> None:
    pytest.importorskip("bitsandbytes")
    from jpslm_assets.resources import trainer_loading

    gib = trainer_loading.first_gpu_gib()
    expected = trainer_loading.measured_faster(gib)[0] if importlib.util.find_spec("unsloth") else "bnb_qlora"
    assert trainer_loading.select_backend("auto") == expected


def test_qlora_loads_nf4_and_lays_out_from_free_memory(base: tuple[str, Path], tmp_path: Path) -> None:
    import bitsandbytes as bnb

    from jpslm_assets.resources import trainer_loop

    model, folder = base
    prepared = trainer_loop.prepare_run(qlora_spec(model, folder, tmp_path), lambda message: None)
    modules = list(prepared.trainer.model.modules())
    four_bit = [m for m in modules if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit, "the base projections must be bitsandbytes 4-bit layers"
    assert all(m.weight.quant_type == "nf4" for m in four_bit)
    from jpslm_assets.resources.nf4_linear import ABSMAX_ATTRIBUTE

    assert prepared.layout.dequantize_matmul
    assert all(getattr(m, ABSMAX_ATTRIBUTE).dtype == torch.float32 for m in four_bit)
    assert prepared.device.startswith("cuda")
    layout = prepared.layout
    # A tiny model on a large GPU: the whole effective batch in one micro-batch, no checkpointing.
    assert (layout.per_device_batch_size, layout.gradient_accumulation_steps) == (8, 1)
    assert not layout.gradient_checkpointing and layout.padding_free
    trainable = [p for p in prepared.trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_qlora_training_lowers_the_loss_and_the_merge_keeps_what_it_learned(
    base: tuple[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from jpslm_assets.resources import trainer_loop
    from jpslm_assets.resources.model_merge import merge_adapter
    from jpslm_assets.resources.models import load_causal_lm, load_tokenizer
    from jpslm_assets.training import nll
    from jpslm_assets.training.chat_format import encode_training_pairs

    model, folder = base
    messages: list[str] = []
    result = trainer_loop.run_training(qlora_spec(model, folder, tmp_path), messages.append)
    assert result.backend == "bnb_qlora" and result.precision == "nf4+bf16"
    # The defaults on CUDA: compiled decoder layers and per-example flash attention in padding-free rows.
    assert result.layout is not None and result.layout.packed_attention and result.layout.padding_free
    assert result.layout.compiled_layers is (importlib.util.find_spec("triton") is not None)
    assert result.device.startswith("cuda") and result.peak_memory_bytes and result.peak_memory_bytes > 0
    losses = [point.loss for point in result.loss_curve]
    assert len(losses) == 40 and all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert any("tokens/s" in m and "ETA" in m for m in messages)

    adapter = Path(result.adapter_path)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_B" in name and float(t.abs().max()) > 0 for name, t in tensors.items())

    merged = merge_adapter(str(folder), adapter, tmp_path / "merged")
    tokenizer = load_tokenizer(str(folder))
    examples, _ = encode_training_pairs(tokenizer, shipped_pairs(16), "<|im_end|>", 256)
    scores = {}
    for name, ref in (("base", str(folder)), ("merged", str(merged.path))):
        loaded = load_causal_lm(ref, dtype="bfloat16").to("cuda")
        scores[name] = nll.answer_token_nll(loaded, examples, tokenizer.pad_token_id, batch_size=8).nll
        del loaded
    assert scores["merged"] < scores["base"] - 0.3, scores


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_varlen_flash_attention_matches_the_block_diagonal_mask(kv_heads: int) -> None:
    from jpslm_assets.resources import packed_attention as packed

    lengths = [37, 300, 1, 129, 64]
    generator = torch.Generator(device="cuda").manual_seed(kv_heads)
    total, heads = sum(lengths), 8

    def draw(count: int) -> torch.Tensor:
        return torch.randn(1, count, total, 64, device="cuda", dtype=torch.bfloat16, generator=generator)

    inputs = (draw(heads), draw(kv_heads), draw(kv_heads))
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None].cuda()
    example = torch.cumsum(position_ids[0] == 0, dim=0)
    mask = (example[:, None] == example[None, :]) & torch.ones(
        total, total, dtype=torch.bool, device="cuda"
    ).tril()
    weight = torch.randn(1, total, heads, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    results = []
    for use_packed in (True, False):
        query, key, value = (t.clone().requires_grad_(True) for t in inputs)
        if use_packed:
            out, _ = packed.packed_attention_forward(None, query, key, value, None, position_ids=position_ids)
        else:  # float32 reference
            out = torch.nn.functional.scaled_dot_product_attention(
                query.float(), key.float(), value.float(), attn_mask=mask[None, None], enable_gqa=True
            ).transpose(1, 2)
        (out.float() * weight.float()).sum().backward()
        results.append([out.float(), *(t.grad.float() for t in (query, key, value))])
    for mine, reference in zip(*results, strict=True):
        error = float((mine - reference).norm() / reference.norm())
        assert error < 2e-2, error


def test_packed_attention_compiled_layers_and_dequantize_matmul_give_the_plain_loss(
    base: tuple[str, Path], tmp_path: Path
) -> None:
    from jpslm_assets.resources import trainer_loop

    model, folder = base
    losses = []
    for fast in (True, False):
        spec = qlora_spec(model, folder, tmp_path / str(fast), max_steps=3).model_copy(
            update={
                "packed_attention": fast,
                "compile_layers": fast,
                "dequantize_matmul": fast,
                "fused_kernels": False,
            }
        )
        prepared = trainer_loop.prepare_run(spec, lambda message: None)
        layout = prepared.layout
        assert layout.packed_attention is fast and layout.compiled_layers is fast
        assert layout.dequantize_matmul is fast
        trainer = prepared.trainer
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = [p.grad.float().norm() for p in trainer.model.parameters() if p.requires_grad]
        losses.append((float(loss.detach()), float(torch.stack(grads).norm())))
    (fast_loss, fast_grad), (eager_loss, eager_grad) = losses
    assert fast_loss == pytest.approx(eager_loss, rel=1e-2)
    assert fast_grad == pytest.approx(eager_grad, rel=5e-2)


def test_gradient_checkpointing_path_trains_when_forced(base: tuple[str, Path], tmp_path: Path) -> None:
    from jpslm_assets.resources import trainer_loop

    model, folder = base
    spec = qlora_spec(model, folder, tmp_path, max_steps=3).model_copy(
        update={"gradient_checkpointing": True, "adapt_micro_batch": False}
    )
    result = trainer_loop.run_training(spec, lambda message: None)
    assert result.layout is not None and result.layout.gradient_checkpointing
    assert (result.layout.per_device_batch_size, result.layout.gradient_accumulation_steps) == (4, 2)
    assert result.steps == 3 and math.isfinite(result.train_loss_final)


def test_fused_kernels_train_when_liger_is_installed(base: tuple[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("liger_kernel")
    from jpslm_assets.resources import trainer_loop

    model, folder = base
    spec = qlora_spec(model, folder, tmp_path, max_steps=3).model_copy(update={"fused_kernels": True})
    result = trainer_loop.run_training(spec, lambda message: None)
    assert result.layout is not None and result.layout.fused_kernels
    assert math.isfinite(result.train_loss_final)


def test_nf4_answer_format_generates_on_cuda(base: tuple[str, Path]) -> None:
    import bitsandbytes as bnb

    from jpslm_assets.common.generation_types import GenerationRequest
    from jpslm_assets.resources.generation_transformers import TransformersBackend
    from jpslm_assets.training.chat_format import chat_messages

    _, folder = base
    backend = TransformersBackend(quantization="nf4")
    assert backend.availability()[0]
    loaded, _ = backend.load(str(folder))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.modules())
    request = GenerationRequest(
        messages=chat_messages(shipped_pairs(1)[0][1]), max_tokens=16, temperature=0.0, stop=("<|im_end|>",)
    )
    first = backend.generate(str(folder), request)
    again = backend.generate(str(folder), request)
    assert first.backend == "transformers" and 0 < first.completion_tokens <= 16
    assert first.text == again.text, "greedy decoding must repeat itself"


def test_unsloth_backend_trains_when_installed(base: tuple[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("unsloth")
    from jpslm_assets.resources import trainer_loop

    model, folder = base
    spec = qlora_spec(model, folder, tmp_path, max_steps=3).model_copy(update={"backend": "unsloth"})
    result = trainer_loop.run_training(spec, lambda message: None)
    assert result.backend == "unsloth" and math.isfinite(result.train_loss_final)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more GPUs")
def test_several_gpus_train_data_parallel_through_torchrun(base: tuple[str, Path], tmp_path: Path) -> None:
    from jpslm_assets.resources.trainer import LoraTrainer

    model, folder = base
    resource = LoraTrainer(backend="bnb_qlora")
    assert resource.launcher_for("bnb_qlora") == ("torchrun", torch.cuda.device_count())
    import dagster as dg

    results = []

    @dg.asset
    def data_parallel_adapter(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        # Worker launchers run through Dagster Pipes, which needs the asset's context.
        results.append(resource.train(qlora_spec(model, folder, tmp_path, max_steps=4), context.log.info, context=context))
        return dg.MaterializeResult()

    assert dg.materialize([data_parallel_adapter]).success
    (result,) = results
    assert result.world_size == torch.cuda.device_count() and math.isfinite(result.train_loss_final)
