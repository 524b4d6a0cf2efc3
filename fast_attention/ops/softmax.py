"""fast_attention::softmax: torch.softmax over one dim, forward and backward on any backend."""
import operator

import torch
from torch import Tensor

from .. import backends
from ._checks import check_float, rows, unrows
from ._direct import call


def check(input: Tensor, dim: int) -> int:
    """Validate; return dim as a non-negative int."""
    check_float("input", input, "softmax")
    try:
        if isinstance(dim, bool):
            raise TypeError
        dim = operator.index(dim)  # ints, and integers that say they are (numpy's), as torch
    except TypeError:
        raise TypeError(f"fast_attention.softmax: dim must be an int, got {type(dim).__name__}") from None
    ndim = max(input.dim(), 1)
    if not -ndim <= dim < ndim:
        raise IndexError(f"fast_attention.softmax: dim must be in [{-ndim}, {ndim - 1}] for an input of shape "
                         f"{tuple(input.shape)}, got {dim}")
    return dim % ndim


@torch.library.custom_op("fast_attention::softmax", mutates_args=())
def softmax(input: Tensor, dim: int, backend: str) -> Tensor:
    if input.numel() == 0:
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    if input.dim() == 0:
        return backends.get(backend).softmax_forward(input.reshape(1, 1)).reshape(())
    return unrows(backends.get(backend).softmax_forward(rows(input, dim)), input, dim)


@softmax.register_fake
def _(input, dim, backend):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.custom_op("fast_attention::softmax_backward", mutates_args=())
def softmax_backward(output: Tensor, grad_output: Tensor, dim: int, backend: str) -> Tensor:
    if output.numel() == 0:
        return torch.empty_like(output, memory_format=torch.contiguous_format)
    if output.dim() == 0:
        return backends.get(backend).softmax_backward(output.reshape(1, 1), grad_output.reshape(1, 1)).reshape(())
    dx = backends.get(backend).softmax_backward(rows(output, dim), rows(grad_output, dim))
    return unrows(dx, output, dim)


@softmax_backward.register_fake
def _(output, grad_output, dim, backend):
    return torch.empty_like(output, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, ctx.dim, ctx.backend = inputs
    ctx.save_for_backward(output)


def _backward(ctx, grad_output):
    (output,) = ctx.saved_tensors
    return call(softmax_backward, output, grad_output, ctx.dim, ctx.backend), None, None


softmax.register_autograd(_backward, setup_context=_setup_context)
