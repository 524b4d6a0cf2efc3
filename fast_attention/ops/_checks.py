"""Input checks shared by the op boundaries: one message style, naming the argument and what was expected."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: Tensor, op: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"fast_attention.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise TypeError(f"fast_attention.{op}: {name} must be a floating-point tensor "
                        f"(float16, bfloat16, float32 or float64), got {t.dtype}")


def as_float(value, name: str, op: str) -> float:
    """A float argument (eps, scale, dropout_p) as a Python float: a real number or a one-element tensor, as torch
    takes; anything else, a string or None among them, is a TypeError naming the argument."""
    if type(value) is float:  # the common case, without isinstance's ABC check (0.3 us a call)
        return value
    real = isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt))  # Sym*: traced by torch.compile
    if real or (isinstance(value, Tensor) and value.numel() == 1):
        return float(value)
    raise TypeError(f"fast_attention.{op}: {name} must be a float, got {type(value).__name__}")


def check_same_device(op: str, **tensors) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"fast_attention.{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             f"all tensors must be on the same device")


def rows(x: Tensor, dim: int) -> Tensor:
    """x as a contiguous (M, N) matrix whose rows run along `dim`."""
    if dim == x.dim() - 1:  # the common case, without movedim's dispatch (about 1 us each in eager mode)
        return (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()  # a view costs 0.4 us too
    return x.movedim(dim, -1).reshape(-1, x.shape[dim]).contiguous()


def unrows(y2d: Tensor, like: Tensor, dim: int) -> Tensor:
    """The inverse of rows(): a contiguous tensor shaped like `like`."""
    if dim == like.dim() - 1:
        return shaped_like(y2d, like)  # the backends return y2d contiguous
    return y2d.reshape(like.movedim(dim, -1).shape).movedim(-1, dim).contiguous()


def shaped_like(t: Tensor, like: Tensor) -> Tensor:
    """t reshaped to like's shape, itself where it has that shape already (a view costs 0.4 us of host time)."""
    return t if t.shape == like.shape else t.reshape(like.shape)
