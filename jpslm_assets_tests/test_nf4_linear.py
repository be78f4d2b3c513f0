"""The dequantize + matmul path for frozen NF4 projections (resources/nf4_linear.py), on CPU.

bitsandbytes runs its 4-bit layers on CPU too, so the path is compared here with bitsandbytes' own
``Linear4bit`` on single layers and on a whole QLoRA model (loss and LoRA gradients); test_gpu.py repeats the
model comparison on CUDA inside a compiled training step.
"""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from jpslm_assets.resources import nf4_linear  # noqa: E402
from jpslm_assets_tests.nf4_blocks import dequantized_bytes, nf4_blocks  # noqa: E402


def quantized_linear(bias: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        256, 96, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
    )
    weight = torch.randn(96, 256, dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    return layer.to("cpu")  # quantizes the weight


def run(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    assert x.grad is not None
    return out.detach(), x.grad


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_gives_bitsandbytes_outputs_and_input_gradients(bias: bool, dtype: torch.dtype) -> None:
    layer = quantized_linear(bias, seed=3)
    assert layer.weight.quant_state.nested, "double quantization: the block statistics are quantized too"
    x = torch.randn(3, 10, 256, dtype=dtype)
    reference = run(layer, x)
    assert nf4_linear.use_dequantize_matmul(layer) == 1
    mine = run(layer, x)
    assert mine[0].dtype == dtype, "outputs come back in the input's dtype, as Linear4bit returns them"
    torch.testing.assert_close(mine[0], reference[0], rtol=0, atol=0)
    torch.testing.assert_close(mine[1], reference[1], rtol=0, atol=0)


def test_block_statistics_are_those_bitsandbytes_dequantizes() -> None:
    layer = quantized_linear(False, seed=5)
    state = layer.weight.quant_state
    absmax = nf4_linear.dequantized_absmax(state)
    assert absmax.dtype == torch.float32 and absmax.numel() == 96 * 256 // state.blocksize
    full = bnb.functional.dequantize_4bit(layer.weight, state)
    again = torch.ops.bitsandbytes.dequantize_4bit.default(
        layer.weight, absmax, state.blocksize, state.quant_type, tuple(state.shape), torch.bfloat16
    )
    torch.testing.assert_close(again, full, rtol=0, atol=0)


def test_a_qlora_model_gives_the_same_loss_and_lora_gradients(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )

    def model() -> torch.nn.Module:
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, dtype=torch.bfloat16, device_map={"": "cpu"}
        )
        loaded = prepare_model_for_kbit_training(loaded, use_gradient_checkpointing=False)
        torch.manual_seed(1)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        peft_model = get_peft_model(loaded, lora)
        peft_model.train()
        return peft_model

    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 512, (1, 60), generator=generator)
    position_ids = torch.cat([torch.arange(25), torch.arange(35)])[None]
    results = []
    for switch in (False, True):
        qlora = model()
        if switch:
            assert nf4_linear.use_dequantize_matmul(qlora) == 14  # 7 projections x 2 layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = qlora(input_ids=ids, position_ids=position_ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in qlora.named_parameters() if p.requires_grad}
        results.append((float(loss.detach()), grads, set(qlora.state_dict())))
    (loss_before, grads_before, keys_before), (loss_after, grads_after, keys_after) = results
    assert keys_after == keys_before, "the state dict (what gets saved and merged) is unchanged"
    assert loss_after == loss_before
    assert grads_after.keys() == grads_before.keys() and len(grads_after) == 28
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_after[name], grad, rtol=0, atol=0, msg=name)


def test_a_layer_without_quantization_state_is_refused_by_name() -> None:
    holder = torch.nn.Sequential()
    holder.add_module("proj", bnb.nn.Linear4bit(8, 8, bias=False, quant_type="nf4"))
    with pytest.raises(RuntimeError, match="4-bit layer proj has no quantization state"):
        nf4_linear.use_dequantize_matmul(holder)


class LoraOnNf4(torch.nn.Module):
    """One frozen NF4 projection (96 x 256) with a rank-8 LoRA beside it, as in a QLoRA layer."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.base = layer
        self.lora_a = torch.nn.Linear(256, 8, bias=False, dtype=torch.bfloat16)
        self.lora_b = torch.nn.Linear(8, 96, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.base(x) + self.lora_b(self.lora_a(x))).float().square().mean()


def _weight_sized(tensors: list[tuple[tuple[int, ...], torch.dtype]]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Floating tensors shaped like the dequantized weight (either orientation): what must not be kept."""
    return [(shape, dtype) for shape, dtype in tensors if dtype.is_floating_point and sorted(shape) == [96, 256]]


@pytest.mark.parametrize("switch", [False, True])
def test_only_the_4bit_weight_is_kept_for_backward_in_eager_mode(switch: bool) -> None:
    layer = quantized_linear(bias=True, seed=4)
    if switch:
        nf4_linear.use_dequantize_matmul(layer)
    model = LoraOnNf4(layer)
    kept: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = torch.randn(4, 16, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x)
    loss.backward()
    assert not _weight_sized(kept), kept
    assert x.grad is not None and model.lora_a.weight.grad is not None


def test_only_the_4bit_weight_is_kept_for_backward_when_compiled() -> None:
    """What a compiled step keeps between forward and backward, read from the forward graph that AOTAutograd's
    min-cut partitioner (the one inductor uses) produces: its outputs beyond the loss are the saved tensors.
    With dequantize and matmul as two operators in the graph, the partitioner kept the bf16 weight."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> object:
        def forward_compiler(forward: torch.fx.GraphModule, _: list[torch.Tensor]) -> object:
            (output,) = [node for node in forward.graph.nodes if node.op == "output"]
            values = [node.meta["val"] for node in output.args[0] if isinstance(node, torch.fx.Node)]
            saved.extend((tuple(value.shape), value.dtype) for value in values[1:])  # [0] is the loss
            return make_boxed_func(forward)

        return aot_module_simplified(
            graph,
            example_inputs,
            fw_compiler=forward_compiler,
            bw_compiler=lambda backward, _: make_boxed_func(backward),
            partition_fn=min_cut_rematerialization_partition,
        )

    layer = quantized_linear(bias=True, seed=4)
    assert nf4_linear.use_dequantize_matmul(layer) == 1
    model = LoraOnNf4(layer)
    reference = LoraOnNf4(quantized_linear(bias=True, seed=4))
    reference.lora_a.load_state_dict(model.lora_a.state_dict())
    reference.lora_b.load_state_dict(model.lora_b.state_dict())
    x = torch.randn(4, 16, 256, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    first, second = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss = compiled(first)
    loss.backward()
    assert saved, "the forward graph was captured"
    assert any(dtype == torch.uint8 for _, dtype in saved), f"the packed 4-bit weight is kept: {saved}"
    assert not _weight_sized(saved), f"a dequantized weight is kept for backward: {saved}"
    # Same numbers as bitsandbytes' own layer in eager mode.
    expected = reference(second)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert first.grad is not None and second.grad is not None
    torch.testing.assert_close(first.grad, second.grad, rtol=0, atol=0)
    assert model.lora_a.weight.grad is not None and reference.lora_a.weight.grad is not None
    torch.testing.assert_close(model.lora_a.weight.grad, reference.lora_a.weight.grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_block_holds_no_dequantized_weight_after_forward_on_cuda() -> None:
    """Memory held between forward and backward by four blocks of NF4 projections (a Llama block's seven, at
    half the 8B width), compiled as the trainer compiles decoder layers: about what bitsandbytes' own path holds,
    far below the dequantized weights. The benchmark benchmarks/bench_nf4_path.py measures the 8B shape."""
    hidden, kv, mlp = 2048, 512, 7168

    def blocks() -> list[torch.nn.Module]:
        return nf4_blocks(4, hidden, kv, mlp, seed=0)

    x = torch.randn(1, 1200, hidden, device="cuda", dtype=torch.bfloat16)

    def held_after_forward(steps: list[torch.nn.Module]) -> tuple[int, torch.Tensor]:
        held = []
        for _ in range(3):  # the first call compiles
            inputs = x.clone().requires_grad_(True)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            hidden_state = inputs
            for step in steps:
                hidden_state = step(hidden_state)
            loss = hidden_state.float().square().mean()
            torch.cuda.synchronize()
            held.append(torch.cuda.memory_allocated() - before)
            loss.backward()
        assert inputs.grad is not None
        return held[-1], inputs.grad

    bnb_held, bnb_grad = held_after_forward(blocks())
    mine = blocks()
    for block in mine:
        assert nf4_linear.use_dequantize_matmul(block) == 7
    torch._dynamo.reset()
    compiled_held, compiled_grad = held_after_forward([torch.compile(block) for block in mine])
    weights_bf16 = dequantized_bytes(4, hidden, kv, mlp)
    assert compiled_held < bnb_held + weights_bf16 // 8, (compiled_held, bnb_held, weights_bf16)
    torch.testing.assert_close(compiled_grad, bnb_grad, rtol=2e-2, atol=1e-4)
