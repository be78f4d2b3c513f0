"""Memory held between forward and backward, and speed, of the frozen NF4 projections' call paths (CUDA).

Four decoder blocks' worth of NF4 projections (q, k, v, o, gate, up, down) of an 8B Llama-3 shape run a forward
and a backward on the same input in each variant, one after the other in one process:

- ``bnb``: bitsandbytes' own ``Linear4bit`` (``matmul_4bit``);
- ``two_op``: dequantize and matmul as two operators inside an autograd function, the project's path before
  ``jpslm::nf4_linear`` (kept here, verbatim in effect, only to be measured beside it);
- ``project``: ``resources/nf4_linear.py`` as the trainer uses it (one custom operator per projection).

Each runs eager and with every block compiled (``torch.compile``, inductor), as the trainer compiles decoder
layers. Printed per variant: GiB held after the forward pass (allocated after minus before: activations plus
whatever the backward will need), peak GiB, median milliseconds of forward + backward over ``--repeats`` after
``--warmup``, and the largest difference of the input gradient from ``bnb`` eager. The bf16 size of the
dequantized weights is printed for scale.

    python benchmarks/bench_nf4_path.py --blocks 4 --tokens 2400 --json results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from jpslm_assets_tests.nf4_blocks import LLAMA3_8B, dequantized_bytes, nf4_blocks, projection_shapes

GIB = 1024**3


def build_blocks(count: int, seed: int) -> list[Any]:
    """Llama-3-8B-shaped blocks (jpslm_assets_tests/nf4_blocks.py, as the CUDA test builds them, at full width)."""
    return nf4_blocks(count, *LLAMA3_8B, seed=seed)


def two_op_switch(blocks: list[Any]) -> None:
    """The earlier path: an autograd function whose forward calls dequantize and F.linear as two operators."""
    import types

    import torch
    import torch.nn.functional as F

    from jpslm_assets.resources.nf4_linear import dequantized_absmax

    def dequantize(packed: Any, absmax: Any, meta: Any, dtype: Any) -> Any:
        blocksize, quant_type, shape = meta
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, shape, dtype)

    class TwoOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, packed: Any, absmax: Any, meta: Any) -> Any:
            ctx.meta = meta
            ctx.save_for_backward(packed, absmax)
            return F.linear(x, dequantize(packed, absmax, meta, x.dtype))

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            packed, absmax = ctx.saved_tensors
            return grad @ dequantize(packed, absmax, ctx.meta, grad.dtype), None, None, None

    def forward(self: Any, x: Any) -> Any:
        state = self.weight.quant_state
        meta = (state.blocksize, state.quant_type, tuple(state.shape))
        return TwoOp.apply(x.to(torch.bfloat16), self.weight, self._bench_absmax, meta).to(x.dtype)

    for block in blocks:
        for name in projection_shapes(*LLAMA3_8B):
            layer = getattr(block, name)
            layer._bench_absmax = dequantized_absmax(layer.weight.quant_state)
            layer.forward = types.MethodType(forward, layer)


def measure(blocks: list[Any], x: Any, compiled: bool, warmup: int, repeats: int) -> dict[str, Any]:
    import torch

    torch._dynamo.reset()
    steps = [torch.compile(block) if compiled else block for block in blocks]

    def run() -> tuple[Any, int]:
        inputs = x.detach().clone().requires_grad_(True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        hidden = inputs
        for step in steps:
            hidden = step(hidden)
        loss = hidden.float().square().mean()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        loss.backward()
        return inputs.grad, held

    started = time.perf_counter()
    for _ in range(warmup):
        run()
    warm_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times, helds, grad = [], [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        grad, held = run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        helds.append(held)
    return {
        "held_after_forward_gib": max(helds) / GIB,
        "peak_above_start_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
        "median_ms": statistics.median(times) * 1000,
        "min_ms": min(times) * 1000,
        "warmup_s": warm_s,
        "grad": grad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2400)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import bitsandbytes
    import torch

    from jpslm_assets.resources import nf4_linear

    x = torch.randn(1, args.tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=None)
    weight_bytes = dequantized_bytes(args.blocks, *LLAMA3_8B)
    rows: list[dict[str, Any]] = []
    reference = None
    for variant in ("bnb", "two_op", "project"):
        for compiled in (False, True):
            blocks = build_blocks(args.blocks, args.seed)  # same seed: the same weights in every variant
            if variant == "two_op":
                two_op_switch(blocks)
            elif variant == "project":
                for block in blocks:
                    nf4_linear.use_dequantize_matmul(block)
            result = measure(blocks, x, compiled, args.warmup, args.repeats)
            grad = result.pop("grad")
            if reference is None:
                reference = grad
            result["max_grad_diff_vs_bnb_eager"] = float((grad.float() - reference.float()).abs().max())
            row = {"variant": variant, "compiled": compiled, **result}
            rows.append(row)
            print(
                f"{variant:8s} {'compiled' if compiled else 'eager':8s} held after forward "
                f"{row['held_after_forward_gib']:.3f} GiB, peak +{row['peak_above_start_gib']:.3f} GiB, "
                f"fwd+bwd {row['median_ms']:.1f} ms median ({row['min_ms']:.1f} min), warm-up "
                f"{row['warmup_s']:.1f} s, max |grad - bnb eager| {row['max_grad_diff_vs_bnb_eager']:.2e}",
                flush=True,
            )
            del blocks
            torch.cuda.empty_cache()
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
        "blocks": args.blocks,
        "tokens": args.tokens,
        "dequantized_weights_bf16_gib": weight_bytes / GIB,
        "rows": rows,
    }
    print(f"dequantized bf16 weights of {args.blocks} blocks: {weight_bytes / GIB:.3f} GiB")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
