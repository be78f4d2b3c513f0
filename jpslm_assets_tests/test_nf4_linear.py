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
