"""The torch custom ops (`fast_attention::*`): validation, fake kernels for torch.compile, autograd, autocast."""
from . import attention, norms, softmax, varlen  # noqa: F401  (importing registers the ops)
from ._autocast import run_outside_autocast

run_outside_autocast("softmax", "softmax_backward", "layer_norm", "layer_norm_backward", "rms_norm",
                     "rms_norm_backward", "scaled_dot_product_attention", "scaled_dot_product_attention_backward",
                     "attention_weights", "attention_weights_backward", "varlen_attention",
                     "varlen_attention_backward")
