"""The Triton backend (installed as fast_attention.kernels): one module per op, each with its @triton.jit kernels
and their launchers. The functions below are the backend interface described in fast_attention/backends.py."""
import functools

import torch

from . import attention as _attention
from . import layer_norm as _layer_norm
from . import rms_norm as _rms_norm
from . import softmax as _softmax


def major_minor(module) -> tuple:
    """(major, minor) of a module's __version__ ("3.6.0+git..." -> (3, 6))."""
    return tuple(int(part) for part in module.__version__.split(".")[:2])


def unavailable():
    """None, or why the backend cannot run on this machine. Triton's interpreter before 3.7 turns one-element
    numpy arrays into ints the way numpy 2.4 forbids (triton-lang/triton#9171), so every kernel would fail at its
    first loop: the backend is reported unavailable, with the fix, and calls fall back to the reference.

    A question, not an import error: with the repository root on sys.path this directory is also the top-level
    module `kernels`, which transformers imports while probing for Hugging Face's package of that name."""
    if not _attention.INTERPRET:
        return None
    import numpy
    import triton

    if major_minor(triton) < (3, 7) and major_minor(numpy) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with numpy "
                f"{numpy.__version__} (triton-lang/triton#9171); install numpy<2.4 or triton>=3.7")
    return None


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _on_input_device(fn):
    """Triton launches on the current CUDA device (and its current stream) whatever device the pointers live on:
    a tensor on cuda:1 while cuda:0 is current would be read from the wrong GPU. Make the device of the first
    tensor argument current for the call."""
    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not t.is_cuda or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)
    return on_device


attention_forward = _on_input_device(_attention.attention_forward)
attention_backward = _on_input_device(_attention.attention_backward)
attention_weights = _on_input_device(_attention.attention_weights)
varlen_forward = _on_input_device(_attention.varlen_forward)
varlen_backward = _on_input_device(_attention.varlen_backward)
layer_norm_forward = _on_input_device(_layer_norm.layer_norm_forward)
layer_norm_backward = _on_input_device(_layer_norm.layer_norm_backward)
rms_norm_forward = _on_input_device(_rms_norm.rms_norm_forward)
rms_norm_backward = _on_input_device(_rms_norm.rms_norm_backward)
softmax_forward = _on_input_device(_softmax.softmax_forward)
softmax_backward = _on_input_device(_softmax.softmax_backward)


def unsupported(op: str, **args):
    if op == "scaled_dot_product_attention":
        return _attention.unsupported(**args)
    if op == "varlen_attention":
        return _attention.varlen_unsupported(**args)
    for name, t in args.items():
        if isinstance(t, torch.Tensor) and t.dtype not in DTYPES:
            return f"{name} is {t.dtype}; the Triton kernels take float16, bfloat16 and float32"
    return None


__all__ = [
    "attention_backward", "attention_forward", "attention_weights", "layer_norm_backward", "layer_norm_forward",
    "rms_norm_backward", "rms_norm_forward", "softmax_forward", "softmax_backward", "unavailable", "unsupported",
    "varlen_backward", "varlen_forward",
]
