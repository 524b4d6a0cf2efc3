"""fast_attention::layer_norm and fast_attention::rms_norm over the trailing `normalized_shape` dims.

The forward ops also return the fp32 statistics (mean and rstd, or rstd) that backward reuses.
"""
import math
import operator
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from ._checks import check_float, check_same_device, shaped_like
from ._direct import call


def check(op: str, input: Tensor, normalized_shape, weight: Optional[Tensor], bias: Optional[Tensor] = None) -> list[int]:
    """Validate; return normalized_shape as a list of ints."""
    check_float("input", input, op)
    try:
        if isinstance(normalized_shape, int):
            normalized_shape = [normalized_shape]
        normalized_shape = [operator.index(n) for n in normalized_shape]  # not 5.7 or "5", as torch
    except TypeError:
        raise TypeError(f"fast_attention.{op}: normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None
    n = len(normalized_shape)
    if n == 0 or input.dim() < n or list(input.shape[input.dim() - n:]) != normalized_shape:
        raise ValueError(f"fast_attention.{op}: normalized_shape {tuple(normalized_shape)} must match the trailing "
                         f"dims of input, whose shape is {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_float(name, t, op)
        if list(t.shape) != normalized_shape:
            raise ValueError(f"fast_attention.{op}: {name} must have shape normalized_shape = "
                             f"{tuple(normalized_shape)}, got {tuple(t.shape)}")
    check_same_device(op, input=input, weight=weight, bias=bias)
    return normalized_shape


# The reshapes below are skipped where they would change nothing: a view costs host time that a small call waits
# on. With a no-op kernel, fa.layer_norm of a (1, 64) input spent 13-14 µs in Python on the CPU machine before and
# 8.5-8.7 µs after; of a (1, 3, 64) one, 12.7-13.4 and 11.6-12.0 µs (torch's F.layer_norm, kernel included: 2.3 µs).
def _as_rows(input: Tensor, normalized_shape) -> Tensor:
    n = math.prod(normalized_shape)
    rows = input if input.dim() == 2 and input.shape[1] == n else input.reshape(-1, n)
    return rows.contiguous()


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or (t.dim() == 1 and t.is_contiguous()) else t.reshape(-1).contiguous()


def _rows_count(input: Tensor, normalized_shape) -> int:
    return input.numel() // max(math.prod(normalized_shape), 1)


# ---------------------------------------------------------------------------------------------- layer_norm
@torch.library.custom_op("fast_attention::layer_norm", mutates_args=())
def layer_norm(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
               backend: str, backward_backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) by `backend`; autograd runs the backward on `backward_backend`."""
    M = _rows_count(input, normalized_shape)
    if input.numel() == 0:
        stats = input.new_empty(M, dtype=reference.compute_dtype(input))
        return torch.empty_like(input, memory_format=torch.contiguous_format), stats, stats.clone()
    y, mean, rstd = backends.get(backend).layer_norm_forward(_as_rows(input, normalized_shape), _flat(weight),
                                                             _flat(bias), eps)
    return shaped_like(y, input), mean, rstd


@layer_norm.register_fake
def _(input, normalized_shape, weight, bias, eps, backend, backward_backend):
    M = _rows_count(input, normalized_shape)
    stats = reference.compute_dtype(input)
    return (torch.empty_like(input, memory_format=torch.contiguous_format), input.new_empty(M, dtype=stats),
            input.new_empty(M, dtype=stats))


def _param_grad(grad: Optional[Tensor], like: Tensor, shape) -> Tensor:
    # Custom ops cannot return None: an absent parameter's gradient travels as an empty tensor.
    return like.new_empty(0) if grad is None else grad.reshape(shape)


def _param_grad_shape(present: bool, like: Tensor, shape, dtype) -> Tensor:
    return like.new_empty(shape if present else (0,), dtype=dtype)


def _or_none(grad: Tensor, present: bool) -> Optional[Tensor]:
    return grad if present else None


@torch.library.custom_op("fast_attention::layer_norm_backward", mutates_args=())
def layer_norm_backward(grad_output: Tensor, input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
                        mean: Tensor, rstd: Tensor, has_bias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias); dweight / dbias are empty when there is no weight / bias. They have the weight's dtype;
    without a weight dbias is float32 (float64 for float64 input), which autograd casts to the bias's dtype."""
    param_dtype = reference.compute_dtype(input) if weight is None else weight.dtype
    if input.numel() == 0:
        dw = _param_grad_shape(weight is not None, input, normalized_shape, param_dtype).zero_()
        db = _param_grad_shape(has_bias, input, normalized_shape, param_dtype).zero_()
        return torch.zeros_like(input, memory_format=torch.contiguous_format), dw, db
    dx, dw, db = backends.get(backend).layer_norm_backward(
        _as_rows(grad_output, normalized_shape), _as_rows(input, normalized_shape), _flat(weight), mean, rstd,
        has_bias)
    return shaped_like(dx, input), _param_grad(dw, input, normalized_shape), _param_grad(db, input, normalized_shape)


@layer_norm_backward.register_fake
def _(grad_output, input, normalized_shape, weight, mean, rstd, has_bias, backend):
    param_dtype = reference.compute_dtype(input) if weight is None else weight.dtype
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            _param_grad_shape(weight is not None, input, normalized_shape, param_dtype),
            _param_grad_shape(has_bias, input, normalized_shape, param_dtype))


def _layer_norm_setup(ctx, inputs, output):
    input, ctx.normalized_shape, weight, bias, _, _, ctx.backend = inputs
    _, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(input, weight, mean, rstd)


def _layer_norm_backward(ctx, grad_output, _grad_mean, _grad_rstd):
    input, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = call(layer_norm_backward, grad_output, input, ctx.normalized_shape, weight, mean, rstd,
                      ctx.has_bias, ctx.backend)
    return dx, None, _or_none(dw, weight is not None), _or_none(db, ctx.has_bias), None, None, None


layer_norm.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ------------------------------------------------------------------------------------------------ rms_norm
@torch.library.custom_op("fast_attention::rms_norm", mutates_args=())
def rms_norm(input: Tensor, normalized_shape: list[int], weight: Optional[Tensor], eps: float,
             backend: str, backward_backend: str) -> tuple[Tensor, Tensor]:
    """(y, rstd) by `backend`; autograd runs the backward on `backward_backend`."""
    M = _rows_count(input, normalized_shape)
    if input.numel() == 0:
        return (torch.empty_like(input, memory_format=torch.contiguous_format),
                input.new_empty(M, dtype=reference.compute_dtype(input)))
    y, rstd = backends.get(backend).rms_norm_forward(_as_rows(input, normalized_shape), _flat(weight), eps)
    return shaped_like(y, input), rstd


@rms_norm.register_fake
def _(input, normalized_shape, weight, eps, backend, backward_backend):
    M = _rows_count(input, normalized_shape)
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty(M, dtype=reference.compute_dtype(input)))


@torch.library.custom_op("fast_attention::rms_norm_backward", mutates_args=())
def rms_norm_backward(grad_output: Tensor, input: Tensor, normalized_shape: list[int], weight: Optional[Tensor],
                      rstd: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """(dx, dweight); dweight is empty when there is no weight."""
    if input.numel() == 0:
        param_dtype = input.dtype if weight is None else weight.dtype  # as the fake kernel says
        dw = _param_grad_shape(weight is not None, input, normalized_shape, param_dtype).zero_()
        return torch.zeros_like(input, memory_format=torch.contiguous_format), dw
    dx, dw = backends.get(backend).rms_norm_backward(
        _as_rows(grad_output, normalized_shape), _as_rows(input, normalized_shape), _flat(weight), rstd)
    return shaped_like(dx, input), _param_grad(dw, input, normalized_shape)


@rms_norm_backward.register_fake
def _(grad_output, input, normalized_shape, weight, rstd, backend):
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            _param_grad_shape(weight is not None, input, normalized_shape,
                              input.dtype if weight is None else weight.dtype))


def _rms_norm_setup(ctx, inputs, output):
    input, ctx.normalized_shape, weight, _, _, ctx.backend = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(input, weight, rstd)


def _rms_norm_backward(ctx, grad_output, _grad_rstd):
    input, weight, rstd = ctx.saved_tensors
    dx, dw = call(rms_norm_backward, grad_output, input, ctx.normalized_shape, weight, rstd, ctx.backend)
    return dx, None, _or_none(dw, weight is not None), None, None, None


rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
