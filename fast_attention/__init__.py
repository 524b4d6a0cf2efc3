"""fast_attention: fused attention, softmax, LayerNorm and RMSNorm kernels in Triton and CUDA C++, with torch's
semantics, as torch custom ops (`fast_attention::*`) with autograd and torch.compile support."""
from . import ops  # noqa: F401  (registers the custom ops)
from .backends import available_backends, use_backend
from .functional import layer_norm, rms_norm, scaled_dot_product_attention, softmax

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "layer_norm",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "use_backend",
]
