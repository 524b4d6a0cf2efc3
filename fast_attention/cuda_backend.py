"""The CUDA C++ backend: the kernels of csrc/ (module `fast_attention._C`) behind the backend interface of
fast_attention/backends.py.

Importing this module fails when the extension was not built (no nvcc at install time, or
FAST_ATTENTION_SKIP_CUDA=1); the registry then lists the backend as unavailable. _C validates its tensors and
runs on torch's current stream; this module adds what is Python-side policy: which calls the kernels support
(`unsupported`) and the parameter gradients' dtype (the kernels return them in the dtype they read the parameters
in: the rows' dtype when the parameters have it, else float32).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _C

HEAD_DIMS: tuple[int, ...] = tuple(_C.head_dims)  # attention head dims with a compiled kernel
_ROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
# setup.py compiles sm_80 and newer only (cp.async, ldmatrix and bf16 mma.sync): an older GPU has no kernel
# image for any op, so every op routes elsewhere there instead of failing at launch.
_MIN_CAPABILITY = (8, 0)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    """Kept per device: the query took a microsecond or two of every call's host time."""
    return torch.cuda.get_device_capability(device)


def _device_reason(x: Tensor) -> str | None:
    if x.is_cuda:
        capability = _capability(x.device)
        if capability < _MIN_CAPABILITY:
            return (f"its kernels are compiled for compute capability 8.0 or newer (cp.async, bf16 mma.sync); "
                    f"{x.device} is sm_{capability[0]}{capability[1]}")
    return None


def _row_reason(x: Tensor) -> str | None:
    if x.dtype not in _ROW_DTYPES:
        return f"its row kernels take float32, float16 or bfloat16 inputs, got {_name(x.dtype)}"
    return _device_reason(x)


def _attention_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, softcap=0.0,
                      mask_grad=False, window=None) -> str | None:
    if dropout_p and (softcap or window is not None):
        return ("its attention kernels take no dropout with a logit cap (softcap) or a local window (window_size); "
                "backend='triton' takes them together")
    if mask_grad and softcap:
        return ("its attention kernels give no gradient for a float attn_mask with a logit cap (softcap); "
                "backend='triton' gives it")
    if query.dtype not in _ATTENTION_DTYPES:
        return (f"its attention kernels take float16 or bfloat16 (tensor-core inputs), got {_name(query.dtype)}; "
                f"use backend='triton' or 'reference' for {_name(query.dtype)}")
    if query.shape[-1] not in HEAD_DIMS:
        return (f"head dim {query.shape[-1]} has no compiled attention kernel (compiled head dims: "
                f"{', '.join(map(str, HEAD_DIMS))})")
    if value.shape[-1] != query.shape[-1]:
        return (f"its attention kernels need value's head dim ({value.shape[-1]}) to equal query's "
                f"({query.shape[-1]})")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, query.dtype):
        return (f"its attention kernels read an additive attn_mask in query's dtype ({_name(query.dtype)}), got "
                f"{_name(attn_mask.dtype)}")
    return _device_reason(query)


def unsupported(op: str, **args) -> str | None:
    """None when the CUDA kernels can run `op` with these arguments, else why not."""
    if op == "softmax":
        return _row_reason(args["input"])
    if op in ("layer_norm", "rms_norm"):
        return _row_reason(args["input"])
    if op == "scaled_dot_product_attention":
        return _attention_reason(**args)
    if op == "varlen_attention":  # packed sequences: no mask or dropout to refuse
        return _attention_reason(args["query"], args["key"], args["value"])
    return f"it has no kernel for {op}"


# ---------------------------------------------------------------------------------------------- softmax
def softmax_forward(x: Tensor) -> Tensor:
    return _C.softmax_forward(x)


def softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    if dy.dtype != y.dtype:
        return _C.softmax_backward(y, dy.to(y.dtype)).to(dy.dtype)
    return _C.softmax_backward(y, dy)


# ------------------------------------------------------------------------------------ LayerNorm, RMSNorm
def layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    return tuple(_C.layer_norm_forward(x, weight, bias, eps))


def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor, has_bias: bool):
    dx, dw, db = _C.layer_norm_backward(dy.to(x.dtype), x, weight, mean, rstd, has_bias)
    param_dtype = torch.float32 if weight is None else weight.dtype  # as the Triton backend's (kernels/layer_norm.py)
    return dx, (None if weight is None else dw.to(weight.dtype)), (db.to(param_dtype) if has_bias else None)


def rms_norm_forward(x: Tensor, weight: Tensor | None, eps: float):
    return tuple(_C.rms_norm_forward(x, weight, eps))


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor):
    dx, dw = _C.rms_norm_backward(dy.to(x.dtype), x, weight, rstd)
    return dx, (None if weight is None else dw.to(weight.dtype))


# ---------------------------------------------------------------------------------------------- attention
# Dropout draws the Triton kernels' decisions for the same seed (csrc/attention/primitives.cuh, dropout_keep): the
# two backends drop the same probabilities. A logit cap (softcap) and a local window go to the kernels as the Triton
# ones take them, not with dropout (unsupported() refuses that, _C checks it again).
def _sides(window) -> tuple[int, int]:
    return (-1, -1) if window is None else (int(window[0]), int(window[1]))


def attention_forward(q, k, v, mask, is_causal: bool, scale: float, dropout_p: float, seed: int,
                      softcap: float = 0.0, window=None):
    left, right = _sides(window)
    return tuple(_C.attention_forward(q, k, v, mask, is_causal, scale, dropout_p, seed, softcap, left, right))


def attention_backward(dout, q, k, v, out, stats, mask, is_causal: bool, scale: float, dropout_p: float, seed: int,
                       softcap: float = 0.0, mask_grad: bool = False, window=None):
    left, right = _sides(window)
    # out is float32 with learned sinks (fast_attention/ops/attention.py); the kernels read it in q's dtype
    dq, dk, dv, dmask = _C.attention_backward(dout.to(q.dtype), q, k, v, out.to(q.dtype), stats, mask, is_causal,
                                              scale, dropout_p, seed, softcap, left, right, mask_grad)
    return (dq, dk, dv, dmask) if mask_grad else (dq, dk, dv)


def attention_weights(q, k, stats, mask, is_causal: bool, scale: float, softcap: float = 0.0, window=None):
    left, right = _sides(window)
    return _C.attention_weights(q, k, stats, mask, is_causal, scale, softcap, left, right)


# Packed sequences (fa.varlen_attn): the kernels with each block on its own sequence (csrc/attention/flash.h,
# cu_seq_q); the window aligns bottom-right in each sequence, as the backend interface says. Decoding calls take the
# split-KV kernel (decode_kernel.cuh) as dense ones do; num_splits=1 the tiled forward instead, whose tiles do not
# depend on the batch's lengths. A paged KV cache (block_table) is read by kernels compiled for it, which gather
# each K and V row through the table.
def varlen_forward(q, k, v, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float, window=None,
                   softcap: float = 0.0, seqused_k=None, num_splits=None, block_table=None):
    left, right = _sides(window)
    return tuple(_C.varlen_forward(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, softcap, left, right,
                                   seqused_k, block_table, num_splits or 0))


def varlen_backward(dout, q, k, v, out, stats, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float,
                    window=None, softcap: float = 0.0):
    left, right = _sides(window)
    # out is float32 with learned sinks (fast_attention/ops/varlen.py); the kernels read it in q's dtype
    return tuple(_C.varlen_backward(dout.to(q.dtype), q, k, v, out.to(q.dtype), stats, cu_seq_q, cu_seq_k, max_q,
                                    max_k, scale, softcap, left, right))
