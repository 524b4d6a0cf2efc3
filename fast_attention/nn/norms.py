"""LayerNorm, RMSNorm and Softmax: torch.nn's modules (they subclass them, so constructor, defaults, parameter
names, state_dict, extra_repr and isinstance checks are torch's) with forward computed by fast_attention.functional.
The one addition is the keyword-only `backend=` (None: automatic choice, see fast_attention/backends.py)."""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .. import functional as F


def _with_backend(extra_repr: str, backend: str | None) -> str:
    return extra_repr if backend is None else f"{extra_repr}, backend={backend!r}"


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True), fused.

    input (*, *normalized_shape) -> output of the same shape and dtype; mean and rstd are kept in fp32."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return _with_backend(super().extra_repr(), self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm(normalized_shape, eps=None, elementwise_affine=True), fused; eps=None means
    torch.finfo of the dtype the statistics are computed in (float32 for 16-bit inputs), as torch.

    input (*, *normalized_shape) -> output of the same shape and dtype; rstd is kept in fp32."""

    def __init__(self, normalized_shape, eps: float | None = None, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: str | None = None) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return _with_backend(super().extra_repr(), self.backend)


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax(dim=None), fused. dim=None keeps torch's deprecated implicit choice (dim 0 for 0-, 1- and
    3-D inputs, else dim 1) and its warning."""

    def __init__(self, dim: int | None = None, *, backend: str | None = None) -> None:
        super().__init__(dim)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        dim = self.dim
        if dim is None:
            warnings.warn("Implicit dimension choice for softmax has been deprecated. Change the call to include "
                          "dim=X as an argument.", stacklevel=2)
            dim = 0 if input.dim() in (0, 1, 3) else 1
        return F.softmax(input, dim, backend=self.backend)

    def extra_repr(self) -> str:
        return _with_backend(super().extra_repr(), self.backend)
