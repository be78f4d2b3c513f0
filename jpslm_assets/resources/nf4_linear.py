"""A leaner call path for the frozen NF4 projections of QLoRA training.

bitsandbytes' ``Linear4bit`` runs every projection through ``matmul_4bit``: an autograd function whose forward
calls the ``bitsandbytes::gemm_4bit`` operator. For a training micro-batch (thousands of tokens) that operator
picks its unfused fallback, which dequantizes the double-quantized block statistics, then the 4-bit weight, then
calls ``F.linear``, all behind a Python dispatcher. With 7 projections x 32 layers, forward and backward, that
dispatch cost is paid ~450 times a step; profiled on an 8B model it was the largest CPU cost left once the
decoder layers were compiled, and the step was CPU-bound.

``use_dequantize_matmul`` keeps the numbers and trims the path:

- the double quantization's block statistics (``absmax``) never change while the base is frozen, so they are
  dequantized once, when the run starts, exactly as bitsandbytes dequantizes them on every call (0.5 GB of
  float32 for an 8B model);
- each projection then calls bitsandbytes' own ``dequantize_4bit`` operator once and ``F.linear``, inside one
  autograd function whose backward dequantizes again (nothing but the 4-bit weight is kept for the backward
  pass, as with ``matmul_4bit``), so a compiled decoder layer sees two plain operators per projection.

Inputs are cast to the layer's compute dtype and outputs back to the input's dtype, as ``Linear4bit`` does. The
modules' parameters and state dict are untouched, so saving, merging and evaluation see the same model.
"""

from __future__ import annotations

import types
from typing import Any

ABSMAX_ATTRIBUTE = "_jpslm_absmax"

# The autograd function class, built by ``use_dequantize_matmul`` (torch is imported only inside training code).
# A module-level name, so that a compiled layer reads it as a constant instead of tracing the class's creation.
_DEQUANTIZE_LINEAR: Any = None


def _build_dequantize_linear() -> Any:
    import torch
    import torch.nn.functional as F

    def dequantize(packed: Any, absmax: Any, meta: tuple[int, str, tuple[int, ...]], dtype: Any) -> Any:
        blocksize, quant_type, shape = meta
        return torch.ops.bitsandbytes.dequantize_4bit.default(
            packed, absmax, blocksize, quant_type, shape, dtype
        )

    class DequantizeLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, packed: Any, absmax: Any, meta: Any, bias: Any) -> Any:
            ctx.meta = meta
            ctx.save_for_backward(packed, absmax)
            return F.linear(x, dequantize(packed, absmax, meta, x.dtype), bias)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            packed, absmax = ctx.saved_tensors
            grad_x = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = grad @ dequantize(packed, absmax, ctx.meta, grad.dtype)
            if ctx.needs_input_grad[4]:
                grad_bias = grad.reshape(-1, grad.size(-1)).sum(0)
            return grad_x, None, None, None, grad_bias

    return DequantizeLinear


def _forward(self: Any, x: Any) -> Any:
    """``Linear4bit.forward`` with the dequantize + matmul path (same dtype handling)."""
    state = self.weight.quant_state
    input_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    meta = (state.blocksize, state.quant_type, tuple(state.shape))
    out = _DEQUANTIZE_LINEAR.apply(x, self.weight, getattr(self, ABSMAX_ATTRIBUTE), meta, bias)
    return out.to(input_dtype)


def dequantized_absmax(state: Any) -> Any:
    """The float32 block statistics of a 4-bit weight, as ``bitsandbytes.functional.dequantize_4bit`` forms them."""
    import torch
    from bitsandbytes.functional import dequantize_blockwise

    if not state.nested:
        return state.absmax
    absmax = dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax if absmax.dtype == torch.float32 else absmax.float()


def use_dequantize_matmul(model: Any) -> int:
    """Switch every bitsandbytes 4-bit linear layer of ``model`` to the leaner path; returns how many."""
    import bitsandbytes as bnb

    global _DEQUANTIZE_LINEAR
    if _DEQUANTIZE_LINEAR is None:
        _DEQUANTIZE_LINEAR = _build_dequantize_linear()
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        layer: Any = module
        state = getattr(layer.weight, "quant_state", None)
        if state is None:
            raise RuntimeError(
                f"4-bit layer {name or type(module).__name__} has no quantization state (its weight was never "
                "quantized, e.g. still on the CPU); load the model with a 4-bit BitsAndBytesConfig and a CUDA "
                "device_map before switching its matmul path"
            )
        setattr(layer, ABSMAX_ATTRIBUTE, dequantized_absmax(state))
        layer.forward = types.MethodType(_forward, layer)
        count += 1
    return count
