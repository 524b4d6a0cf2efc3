"""Drop-in replacements for torch.nn modules: same constructor, defaults, parameter names, state_dict and
extra_repr, computed by fast_attention's kernels. Each takes one extra keyword-only argument, `backend=None`."""
from .attention import MultiheadAttention
from .norms import LayerNorm, RMSNorm, Softmax

__all__ = ["LayerNorm", "MultiheadAttention", "RMSNorm", "Softmax"]
