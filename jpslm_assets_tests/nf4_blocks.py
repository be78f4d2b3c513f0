"""Stacks of decoder-block-shaped NF4 projections, for measuring what the projection paths keep between forward
and backward: the CUDA test in test_nf4_linear.py and benchmarks/bench_nf4_path.py build them here."""

from __future__ import annotations

from typing import Any

LLAMA3_8B = (4096, 1024, 14336)  # hidden, key/value width, MLP width of Meta-Llama-3-8B


def projection_shapes(hidden: int, kv: int, mlp: int) -> dict[str, tuple[int, int]]:
    """(out, in) of the seven projections of one block."""
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}  # fmt: skip


def dequantized_bytes(count: int, hidden: int, kv: int, mlp: int) -> int:
    """Bytes the blocks' weights take once dequantized to bf16."""
    return count * sum(o * i for o, i in projection_shapes(hidden, kv, mlp).values()) * 2


def nf4_blocks(count: int, hidden: int, kv: int, mlp: int, seed: int = 0, device: str = "cuda") -> list[Any]:
    """``count`` pre-norm residual blocks of bitsandbytes NF4 projections (double quantization, bf16 compute),
    seeded, so every variant built with the same arguments has the same weights. Values stay finite in bf16."""
    import bitsandbytes as bnb
    import torch

    shapes = projection_shapes(hidden, kv, mlp)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, (out_features, in_features) in shapes.items():
                layer = bnb.nn.Linear4bit(
                    in_features, out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                    compress_statistics=True,
                )  # fmt: skip
                weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
                layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
                self.add_module(name, layer)

        def forward(self, x: Any) -> Any:
            h = torch.nn.functional.rms_norm(x, (hidden,))
            shared = (self.k(h) * torch.sigmoid(self.v(h))).repeat(1, 1, hidden // kv)
            a = x + self.o(self.q(h) + shared)
            h = torch.nn.functional.rms_norm(a, (hidden,))
            return a + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))

    torch.manual_seed(seed)
    return [Block().to(device) for _ in range(count)]
