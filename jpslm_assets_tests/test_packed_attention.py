"""Per-example attention inside padding-free rows (resources/packed_attention.py), on CPU.

The CUDA kernel (torch's variable-length flash attention) is compared with the same reference in test_gpu.py;
here the function's CPU path, its reading of sequence boundaries and its refusals are checked, and a training
run with it is compared with one using SDPA and the block-diagonal mask.
"""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from jpslm_assets.resources import packed_attention as packed  # noqa: E402
from jpslm_assets.resources import trainer_layout, trainer_spec  # noqa: E402
from jpslm_assets_tests.test_training_loop import (  # noqa: E402
    adapters_with_and_without,
    assert_same_adapter,
    make_spec,
    tiny_base,  # noqa: F401
)

LENGTHS = [5, 9, 1, 7]


def packed_row(heads: int, kv_heads: int, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    query = torch.randn(1, heads, total, 16, generator=generator)
    key = torch.randn(1, kv_heads, total, 16, generator=generator)
    value = torch.randn(1, kv_heads, total, 16, generator=generator)
    position_ids = torch.cat([torch.arange(length) for length in LENGTHS])[None]
    return query, key, value, position_ids


def block_diagonal_reference(query, key, value, position_ids):  # type: ignore[no-untyped-def]
    """SDPA over the whole row with a causal block-diagonal mask: what the model computes without packing."""
    example = torch.cumsum(position_ids[0] == 0, dim=0)
    same = example[:, None] == example[None, :]
    causal = torch.ones(same.shape, dtype=torch.bool).tril()
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=(same & causal)[None, None], enable_gqa=True
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_per_example_attention_equals_the_block_diagonal_mask(kv_heads: int) -> None:
    query, key, value, position_ids = packed_row(4, kv_heads, seed=kv_heads)
    reference = block_diagonal_reference(query, key, value, position_ids)
    out, weights = packed.packed_attention_forward(None, query, key, value, None, position_ids=position_ids)
    assert weights is None and out.shape == (1, sum(LENGTHS), 4, 16)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)

    # The same from the boundaries TRL's collator passes, without position_ids.
    cu, longest = packed.sequence_boundaries(position_ids)
    assert cu.tolist() == [0, 5, 14, 15, 22] and longest == 9
    again, _ = packed.packed_attention_forward(
        None, query, key, value, None, cu_seq_lens_q=cu, max_length_q=longest
    )
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-6)

    # A whole-row causal attention differs: the check can tell the examples apart.
    crossed = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert (crossed - reference).abs().max() > 1e-2


def test_gradients_match_the_block_diagonal_mask() -> None:
    tensors = packed_row(4, 2, seed=7)
    position_ids = tensors[3]
    grads = []
    for use_packed in (True, False):
        query, key, value = (t.clone().requires_grad_(True) for t in tensors[:3])
        if use_packed:
            out, _ = packed.packed_attention_forward(None, query, key, value, None, position_ids=position_ids)
        else:
            out = block_diagonal_reference(query, key, value, position_ids)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([t.grad for t in (query, key, value)])
    for mine, reference in zip(*grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def test_rows_that_are_not_padding_free_are_refused_with_the_fix() -> None:
    query, key, value, position_ids = packed_row(2, 2, seed=1)
    two_rows = query.expand(2, -1, -1, -1)
    with pytest.raises(packed.PackedAttentionError, match="batch of 2 rows.*padding_free"):
        packed.packed_attention_forward(None, two_rows, key, value, None, position_ids=position_ids)
    with pytest.raises(packed.PackedAttentionError, match="position_ids.*none were passed"):
        packed.packed_attention_forward(None, query, key, value, None)
    with pytest.raises(packed.PackedAttentionError, match="start at 0"):
        packed.packed_attention_forward(None, query, key, value, None, position_ids=position_ids + 1)
    with pytest.raises(packed.PackedAttentionError, match="one padding-free row"):
        packed.sequence_boundaries(torch.zeros(2, 4, dtype=torch.long))


def test_layout_packs_attention_only_for_padding_free_rows(tiny_base: Path) -> None:  # noqa: F811
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_base)
    spec = make_spec(tiny_base, tiny_base.parent / "packed-layout", 4)
    gpu = trainer_layout.choose_layout(spec, config, 100, 10**12, False, varlen_available=True)
    assert gpu.packed_attention
    assert not trainer_layout.choose_layout(
        spec, config, 100, None, False, varlen_available=True
    ).packed_attention
    padded = spec.model_copy(update={"padding_free": False})
    assert not trainer_layout.choose_layout(
        padded, config, 100, 10**12, False, varlen_available=True
    ).packed_attention
    contradictory = padded.model_copy(update={"packed_attention": True})
    with pytest.raises(trainer_spec.TrainingError, match="packed_attention needs padding-free rows"):
        trainer_layout.choose_layout(contradictory, config, 100, 10**12, False, varlen_available=True)
    # Compiled layers fuse norms and activations themselves: Liger's kernels stay off unless asked for.
    compiled = trainer_layout.choose_layout(spec, config, 100, 10**12, True, compile_available=True)
    assert compiled.compiled_layers and not compiled.fused_kernels


def test_training_with_packed_attention_ends_with_the_masked_runs_adapter(
    tiny_base: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert_same_adapter(*adapters_with_and_without(tiny_base, tmp_path, "packed_attention"))
