"""Attention for padding-free training rows: each example attends only to itself, computed per example.

A padding-free micro-batch is one row holding several examples back to back, with positions restarting at 0 at
each example. Plain SDPA keeps the examples apart with a dense block-diagonal mask over the whole row, so it
computes (and on the backward pass, re-reads) scores for every pair of tokens in the row, most of them masked
out. With 8 examples of ~300 tokens that is ~8x the attention work the examples need.

``packed_attention_forward`` computes the same attention with torch's variable-length flash attention
(``torch.nn.attention.varlen.varlen_attn``): the kernel is told where each example starts (``cu_seq_lens``) and
visits only the causal blocks inside each example. The result is exact attention, as with the mask; only the
wasted work is gone. It is registered with transformers' ``AttentionInterface`` under ``ATTENTION_NAME`` and
switched on for a training run by ``use_packed_attention``. Sequence boundaries come from the batch
(``cu_seq_lens_q`` and ``max_length_q``, which TRL's padding-free collator computes on the CPU); when they are
absent they are derived from ``position_ids``.

On CPU, or with attention dropout, the same function runs SDPA one example at a time (slower, same result), so
the code path can be checked anywhere.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

ATTENTION_NAME = "jpslm_packed_varlen"  # no "flash" in it: transformers would look for a flash-attn package


class PackedAttentionError(RuntimeError):
    """The batch cannot be read as a padding-free row (the message says why and what to change)."""


def varlen_available() -> bool:
    """Whether this torch has variable-length flash attention and a CUDA device to run it on."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def sequence_boundaries(position_ids: Any) -> tuple[Any, int]:
    """(cumulative start offsets as int32 with the row length appended, longest example) of a packed row."""
    import torch

    if position_ids.dim() != 2 or position_ids.size(0) != 1:
        raise PackedAttentionError(
            f"packed attention needs one padding-free row per micro-batch, got position_ids of shape "
            f"{tuple(position_ids.shape)}; train with padding_free on, or set packed_attention to false"
        )
    row = position_ids[0]
    starts = (row == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise PackedAttentionError(
            "packed attention needs position_ids that start at 0 for every example in the row; got a row whose "
            "first position is not 0"
        )
    cu = torch.cat([starts, torch.tensor([row.numel()], device=row.device)]).to(torch.int32)
    return cu, int(cu.diff().max())


def _compute_dtype(query: Any) -> Any:
    import torch

    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _per_example_sdpa(
    query: Any, key: Any, value: Any, cu: Any, scaling: float | None, dropout: float
) -> Any:
    """[L, H, D] output, one causal SDPA call per example (the reference and the CPU path)."""
    import torch
    import torch.nn.functional as F

    outputs = []
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1)
        v = value[start:end].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=k.size(0) != q.size(0)
        )
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)


# varlen_attn's parameter names, read once (its signature changed between torch releases). A module-level
# name, so that a compiled layer reads a constant instead of inspecting the function on every call.
_VARLEN_PARAMETERS: frozenset[str] | None = None


def _varlen_parameters() -> frozenset[str]:
    global _VARLEN_PARAMETERS
    if _VARLEN_PARAMETERS is None:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN_PARAMETERS = frozenset(inspect.signature(varlen_attn).parameters)
    return _VARLEN_PARAMETERS


def _varlen(query: Any, key: Any, value: Any, cu: Any, longest: int, scaling: float | None) -> Any:
    """[L, H, D] output of torch's variable-length flash attention, causal within each example."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = _varlen_parameters()
    options: dict[str, Any] = {"scale": scaling}
    if "window_size" in parameters:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    if key.size(1) != query.size(1):
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:  # older torch: give every query head its own copy of its key/value head
            groups = query.size(1) // key.size(1)
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
    return varlen_attn(query, key, value, cu, cu, longest, longest, **options)


def packed_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: query [1, H, L, D], key/value [1, H_kv, L, D] -> ([1, L, H, D], None)."""
    if query.size(0) != 1:
        raise PackedAttentionError(
            f"packed attention got a batch of {query.size(0)} rows; it reads one padding-free row per micro-batch. "
            "Train with padding_free on, or set packed_attention to false"
        )
    cu, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or longest is None:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise PackedAttentionError(
                "packed attention needs the row's position_ids (or cu_seq_lens_q and max_length_q) to find where "
                "each example starts; none were passed to the model"
            )
        cu, longest = sequence_boundaries(position_ids)
    import torch

    dtype = _compute_dtype(query)
    # [1, H, L, D] -> [L, H, D]
    q, k, v = (tensor[0].transpose(0, 1).to(dtype) for tensor in (query, key, value))
    cu = cu.to(device=q.device, dtype=torch.int32)
    if q.is_cuda and dropout == 0.0:
        out = _varlen(q, k, v, cu, int(longest), scaling)
    else:
        out = _per_example_sdpa(q, k, v, cu, scaling, dropout)
    return out.unsqueeze(0), None


def use_packed_attention(model: Any) -> None:
    """Register ``packed_attention_forward`` and make ``model`` (a transformers or peft model) use it."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    if varlen_available():
        _varlen_parameters()  # read before any layer is compiled
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(ATTENTION_NAME)
    else:
        base.config._attn_implementation = ATTENTION_NAME
