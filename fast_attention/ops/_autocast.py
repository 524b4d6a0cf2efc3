"""torch.autocast for the fast_attention ops: the casts torch's autocast applies to the aten op each one stands
for, and the op itself with autocast off.

torch's autocast casts an aten op's inputs before the op checks them, so the functional API casts before its
checks too (`cast_inputs`). A custom op gets no autocast rule by default: autocast would stay on inside it and
recast the float32 math of the reference backend (a matmul turns bfloat16), so every fast_attention:: op also
runs with autocast off (`run_outside_autocast`).

torch's policy (aten/src/ATen/autocast_mode.cpp): scaled_dot_product_attention computes in the autocast dtype;
softmax, layer_norm and rms_norm compute in float32. Where each rule applies changes between torch releases
(rms_norm's CUDA rule is in torch 2.13, not in 2.11), so the device types are read from the installed torch's
dispatcher: in 2.13, attention on CPU and CUDA, the others on CUDA only. float64 tensors and tensors on another
device type are never cast.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

LOWER_PRECISION = "the autocast dtype"
FLOAT32 = "float32"

_TORCH_OPS = {  # ours -> (the aten op whose autocast rule we follow, what it computes in under autocast)
    "scaled_dot_product_attention": ("aten::scaled_dot_product_attention", LOWER_PRECISION),
    "softmax": ("aten::softmax.int", FLOAT32),
    "layer_norm": ("aten::layer_norm", FLOAT32),
    "rms_norm": ("aten::rms_norm", FLOAT32),
}


def _where_torch_casts(aten_op: str) -> tuple[str, ...]:
    return tuple(device_type for device_type in ("cpu", "cuda")
                 if torch._C._dispatch_has_kernel_for_dispatch_key(aten_op, "Autocast" + device_type.upper()))


POLICY = {op: (precision, _where_torch_casts(aten_op)) for op, (aten_op, precision) in _TORCH_OPS.items()}


def cast_inputs(op: str, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """`tensors` (the first one sets the device) cast as torch's autocast casts the aten op `op`'s inputs;
    unchanged where autocast is off."""
    if not isinstance(tensors[0], Tensor):
        return tensors  # the op's own check names what was expected
    device_type = tensors[0].device.type
    precision, device_types = POLICY[op]
    if device_type not in device_types or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type) if precision == LOWER_PRECISION else torch.float32
    return tuple(_cast(t, device_type, dtype) for t in tensors)


_BMM_CASTS = _where_torch_casts("aten::bmm")


def attention_weights_dtype(query: Tensor) -> torch.dtype:
    """The dtype of torch.nn.MultiheadAttention's attention weights for this query: softmax(bmm(q, k^T)), which
    under autocast is float32 where torch casts softmax (CUDA), else the bmm's autocast dtype (CPU); the query's
    own dtype without autocast."""
    device_type = query.device.type
    if (query.dtype == torch.float64 or device_type not in _BMM_CASTS
            or not torch.is_autocast_enabled(device_type)):
        return query.dtype
    return torch.float32 if device_type in POLICY["softmax"][1] else torch.get_autocast_dtype(device_type)


def _cast(t: Optional[Tensor], device_type: str, dtype: torch.dtype) -> Optional[Tensor]:
    eligible = (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                and t.device.type == device_type)
    return t.to(dtype) if eligible else t


_lib = torch.library.Library("fast_attention", "IMPL")  # kept alive: the registrations last as long as it does


def run_outside_autocast(*names: str) -> None:
    """Register the autocast kernel (CPU and CUDA) of each fast_attention::`name` op as: the op, inputs unchanged,
    with autocast off."""
    for name in names:
        op = getattr(torch.ops.fast_attention, name).default
        for device_type in ("cpu", "cuda"):
            _lib.impl(name, _without_autocast(op, device_type), "Autocast" + device_type.upper())


def _without_autocast(op, device_type: str):
    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*args, **kwargs)
    return kernel
