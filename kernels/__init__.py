"""The Triton backend (installed as fast_attention.kernels): one module per op, each with its @triton.jit kernels
and their launchers. The functions below are the backend interface described in fast_attention/backends.py."""
import torch

from .attention import attention_backward, attention_forward, attention_weights
from .attention import unsupported as _attention_unsupported
from .layer_norm import layer_norm_backward, layer_norm_forward
from .rms_norm import rms_norm_backward, rms_norm_forward
from .softmax import softmax_backward, softmax_forward

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unsupported(op: str, **args):
    if op == "scaled_dot_product_attention":
        return _attention_unsupported(**args)
    for name, t in args.items():
        if isinstance(t, torch.Tensor) and t.dtype not in DTYPES:
            return f"{name} is {t.dtype}; the Triton kernels take float16, bfloat16 and float32"
    return None


__all__ = [
    "attention_backward", "attention_forward", "attention_weights", "layer_norm_backward", "layer_norm_forward",
    "rms_norm_backward", "rms_norm_forward", "softmax_backward", "softmax_forward", "unsupported",
]
