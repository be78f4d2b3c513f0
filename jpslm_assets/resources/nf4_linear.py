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
- each projection then calls one custom operator, ``jpslm::nf4_linear``, that runs bitsandbytes' own
  ``dequantize_4bit`` and ``F.linear``; its backward is a second operator that dequantizes again. Only the
  4-bit weight and its statistics are kept between forward and backward, as with ``matmul_4bit``, and that
  holds under ``torch.compile`` too: the dequantized weight never appears in the traced graph, so the
  partitioner cannot choose to keep it (with dequantize and matmul as two operators in the graph it did, and
  held every projection's bf16 weight until backward: about 13 GiB on an 8B model).

Inputs are cast to the layer's compute dtype and outputs back to the input's dtype, as ``Linear4bit`` does. The
modules' parameters and state dict are untouched, so saving, merging and evaluation see the same model.
"""

from __future__ import annotations

import types
from typing import Any

ABSMAX_ATTRIBUTE = "_jpslm_absmax"

# The operator that applies a projection, built by ``use_dequantize_matmul`` (torch is imported only inside
# training code). A module-level name, so that a compiled layer reads it as a constant.
_DEQUANTIZE_LINEAR: Any = None


def _build_dequantize_linear() -> Any:
    """Two custom operators, ``jpslm::nf4_linear`` and its input gradient, with the autograd formula between them.

    The dequantized weight exists only inside each operator's body. Were dequantize and matmul separate operators
    in a compiled graph, AOTAutograd's partitioner would see the bf16 weight as an intermediate shared by forward
    and backward and keep it alive between them (it prefers saving to re-running an operator it cannot
    recompute): 2 bytes per parameter, about 13 GiB for an 8B model. As opaque operators whose forward saves
    only the 4-bit weight and its statistics, the graph has no weight tensor to keep, eager or compiled.
    """
    import torch
    import torch.nn.functional as F

    try:  # registered already (the module was reloaded): operators are per process
        return torch.ops.jpslm.nf4_linear.default
    except (AttributeError, RuntimeError):
        pass

    def dequantize(packed: Any, absmax: Any, blocksize: int, quant_type: str, shape: list[int], dtype: Any) -> Any:
        return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, blocksize, quant_type, shape, dtype)

    # Explicit schemas: this module's annotations are strings (``from __future__ import annotations``).
    @torch.library.custom_op(
        "jpslm::nf4_linear",
        mutates_args=(),
        schema="(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int[] shape, Tensor? bias)"
        " -> Tensor",
    )
    def nf4_linear(
        x: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        blocksize: int,
        quant_type: str,
        shape: list[int],
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        return F.linear(x, dequantize(packed, absmax, blocksize, quant_type, shape, x.dtype), bias)

    @nf4_linear.register_fake
    def _(x: Any, packed: Any, absmax: Any, blocksize: int, quant_type: str, shape: list[int], bias: Any) -> Any:
        return x.new_empty((*x.shape[:-1], shape[0]))

    @torch.library.custom_op(
        "jpslm::nf4_linear_input_grad",
        mutates_args=(),
        schema="(Tensor grad, Tensor packed, Tensor absmax, int blocksize, str quant_type, int[] shape) -> Tensor",
    )
    def nf4_linear_input_grad(
        grad: torch.Tensor,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        blocksize: int,
        quant_type: str,
        shape: list[int],
    ) -> torch.Tensor:
        return grad @ dequantize(packed, absmax, blocksize, quant_type, shape, grad.dtype)

    @nf4_linear_input_grad.register_fake
    def _(grad: Any, packed: Any, absmax: Any, blocksize: int, quant_type: str, shape: list[int]) -> Any:
        return grad.new_empty((*grad.shape[:-1], shape[1]))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, packed, absmax, blocksize, quant_type, shape, _bias = inputs
        ctx.meta = (blocksize, quant_type, shape)
        ctx.save_for_backward(packed, absmax)  # the 4-bit weight and its statistics, nothing else

    def backward(ctx: Any, grad: Any) -> tuple[Any, ...]:
        packed, absmax = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_linear_input_grad(grad, packed, absmax, *ctx.meta)
        if ctx.needs_input_grad[6]:
            grad_bias = grad.reshape(-1, grad.size(-1)).sum(0)
        return grad_x, None, None, None, None, None, grad_bias

    nf4_linear.register_autograd(backward, setup_context=setup_context)
    return nf4_linear


def _forward(self: Any, x: Any) -> Any:
    """``Linear4bit.forward`` with the dequantize + matmul path (same dtype handling)."""
    state = self.weight.quant_state
    input_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    out = _DEQUANTIZE_LINEAR(
        x,
        self.weight,
        getattr(self, ABSMAX_ATTRIBUTE),
        state.blocksize,
        state.quant_type,
        list(state.shape),
        bias,
    )
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
