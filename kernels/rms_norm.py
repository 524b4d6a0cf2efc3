"""RMSNorm over the rows of contiguous (M, N) matrices, forward and backward; weight optional.

Forward, one program per row: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), saved in fp32 (M,). A row
that fits one block is read once (elements moved: read MN + N, write MN + M); a longer row twice (sum of
squares, then the output).

Backward: dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w and xhat = x * rstd; dweight = sum over rows of
dy * xhat, reduced deterministically through a (G, N) fp32 buffer of per-program partial sums and a fixed-order
second pass.

The kernels are layer_norm.py's with CENTER=False (no mean, no bias), and so is the reduction.
"""
import torch

from .layer_norm import (_layer_norm_backward_kernel, _layer_norm_forward_kernel, norm_config, partial_programs,
                         sum_partials)

# The largest row block, in elements: 64 KiB of fp32 per program. Longer rows take the multi-block path.
# Tests lower it to reach that path with short rows.
MAX_BLOCK_N = 16384


# ------------------------------------------------------------------------------------------------ launchers
def rms_norm_forward(x: torch.Tensor, weight, eps: float):
    """x (M, N) contiguous, weight (N,) or None -> (y (M, N) in x's dtype, rstd (M,) fp32)."""
    M, N = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block, num_warps, one_block = norm_config(N, MAX_BLOCK_N)
    w = x if weight is None else weight  # a dummy pointer without a weight, as the bias and mean always are
    _layer_norm_forward_kernel[(M,)](
        x, y, w, w, rstd, rstd, x.stride(0), y.stride(0), N, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=False,
        BLOCK_N=block, ONE_BLOCK=one_block, CENTER=False, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight, rstd: torch.Tensor):
    """dy, x (M, N) contiguous; weight (N,) or None; rstd (M,) fp32 from the forward.

    Returns (dx (M, N) in x's dtype, dweight (N,) in weight's dtype or None).
    """
    M, N = x.shape
    dx = torch.empty_like(x)
    block, num_warps, one_block = norm_config(N, MAX_BLOCK_N)
    # Without a weight nothing needs reducing, and one row per program spreads the rows widest.
    G, rows_per_program = partial_programs(x.device, M, 2 * N * x.element_size()) if weight is not None else (M, 1)
    new_partial = torch.empty if one_block else torch.zeros
    dw_partial = new_partial((G, N), dtype=torch.float32, device=x.device) if weight is not None else rstd
    _layer_norm_backward_kernel[(G,)](
        dy, x, x if weight is None else weight, rstd, rstd, dx, dw_partial, dw_partial, dy.stride(0), x.stride(0),
        dx.stride(0), M, N, rows_per_program, HAS_WEIGHT=weight is not None, HAS_BIAS=False, BLOCK_N=block,
        ONE_BLOCK=one_block, CENTER=False, num_warps=num_warps, enable_fp_fusion=False)
    dweight = sum_partials((dw_partial, weight.dtype))[0] if weight is not None else None
    return dx, dweight
