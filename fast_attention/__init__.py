"""fast_attention: fused attention, softmax, LayerNorm and RMSNorm kernels in Triton and CUDA C++, with torch's
semantics, as torch custom ops (`fast_attention::*`) with autograd and torch.compile support."""
from . import ops  # noqa: F401  (registers the custom ops)
from .backends import available_backends, use_backend
from .functional import layer_norm, rms_norm, scaled_dot_product_attention, softmax, varlen_attn
from . import nn
from . import models  # noqa: E402  (fa.models: the full Transformer, built on nn and functional)
from .swap import SwapReport, swap, unswap
from . import hf as _hf

_hf.install()  # attn_implementation="fast_attention" in Hugging Face transformers, without importing it
# Load the backends that can run here now (0.15 s for Triton's): torch.compile cannot trace an import, so a
# process whose first call is inside torch.compile(fullgraph=True) would fail if they loaded on first use.
available_backends()

__version__ = "0.1.0"

__all__ = [
    "SwapReport",
    "available_backends",
    "layer_norm",
    "rms_norm",
    "scaled_dot_product_attention",
    "softmax",
    "swap",
    "unswap",
    "use_backend",
    "varlen_attn",
]
