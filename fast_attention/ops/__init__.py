"""The torch custom ops (`fast_attention::*`): validation, fake kernels for torch.compile, autograd."""
from . import attention, norms, softmax  # noqa: F401  (importing registers the ops)
