"""RMSNorm over the rows of contiguous (M, N) matrices, forward and backward; weight optional.

Forward, one program per row: y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), saved in fp32 (M,). A row
that fits one block is read once (elements moved: read MN + N, write MN + M); a longer row twice (sum of
squares, then the output).

Backward: dx = rstd * (g - xhat * mean(g * xhat)) with g = dy * w and xhat = x * rstd; dweight = sum over rows of
dy * xhat, reduced deterministically through a (G, N) fp32 buffer of per-program partial sums and a fixed-order
second pass, as in layer_norm.py, whose reduction launchers this module shares.
"""
import torch
import triton
import triton.language as tl

from .layer_norm import partial_programs, sum_partials
from .softmax import row_config

# The largest row block, in elements: 64 KiB of fp32 per program. Longer rows take the multi-block path.
# Tests lower it to reach that path with short rows.
MAX_BLOCK_N = 16384


@triton.jit
def _rms_norm_forward_kernel(
    X,  # (M, N) input
    Y,  # (M, N) output, dtype of X
    W,  # (N,) weight, or a dummy pointer when HAS_WEIGHT is False
    Rstd,  # (M,) fp32
    stride_x,
    stride_y,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # BLOCK_N >= N: the row stays in registers between statistics and output
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            x = tl.load(X + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    DY,  # (M, N) gradient of the output
    X,  # (M, N) input
    W,  # (N,) weight, or a dummy pointer when HAS_WEIGHT is False
    Rstd,  # (M,) fp32
    DX,  # (M, N) gradient of the input, dtype of X
    DW_partial,  # (G, N) fp32, row g for program g; zeroed beforehand when not ONE_BLOCK
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,  # also: compute dweight
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    DW_partial += pid * N
    if ONE_BLOCK:
        mask = cols < N
        w = tl.full([BLOCK_N], 1.0, tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            xhat = x * rstd
            g = dy * w
            c_gx = tl.sum(g * xhat, axis=0) / N
            dx = (g - xhat * c_gx) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw += dy * xhat
        if HAS_WEIGHT:
            tl.store(DW_partial + cols, dw, mask=mask)
    else:
        for row in range(row_start, row_end):
            X_row = X + row * stride_x
            DY_row = DY + row * stride_dy
            DX_row = DX + row * stride_dx
            rstd = tl.load(Rstd + row)
            acc_gx = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(DY_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc_gx += g * x
            c_gx = tl.sum(acc_gx, axis=0) * rstd / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                xhat = tl.load(X_row + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                dy = tl.load(DY_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                dx = (g - xhat * c_gx) * rstd
                tl.store(DX_row + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_WEIGHT:
                    # Only this program touches its partial row, so read-modify-write needs no atomics.
                    dw = tl.load(DW_partial + start + cols, mask=mask, other=0.0)
                    tl.store(DW_partial + start + cols, dw + dy * xhat, mask=mask)


# ------------------------------------------------------------------------------------------------ launchers
def rms_norm_forward(x: torch.Tensor, weight, eps: float):
    """x (M, N) contiguous, weight (N,) or None -> (y (M, N) in x's dtype, rstd (M,) fp32)."""
    M, N = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block, num_warps, one_block = row_config(N, MAX_BLOCK_N)
    _rms_norm_forward_kernel[(M,)](
        x, y, x if weight is None else weight, rstd, x.stride(0), y.stride(0), N, eps, HAS_WEIGHT=weight is not None,
        BLOCK_N=block, ONE_BLOCK=one_block, num_warps=num_warps)
    return y, rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight, rstd: torch.Tensor):
    """dy, x (M, N) contiguous; weight (N,) or None; rstd (M,) fp32 from the forward.

    Returns (dx (M, N) in x's dtype, dweight (N,) in weight's dtype or None).
    """
    M, N = x.shape
    dx = torch.empty_like(x)
    block, num_warps, one_block = row_config(N, MAX_BLOCK_N)
    # Without a weight nothing needs reducing, and one row per program spreads the rows widest.
    G, rows_per_program = partial_programs(x.device, M) if weight is not None else (M, 1)
    new_partial = torch.empty if one_block else torch.zeros
    dw_partial = new_partial((G, N), dtype=torch.float32, device=x.device) if weight is not None else rstd
    _rms_norm_backward_kernel[(G,)](
        dy, x, x if weight is None else weight, rstd, dx, dw_partial, dy.stride(0), x.stride(0), dx.stride(0), M, N,
        rows_per_program, HAS_WEIGHT=weight is not None, BLOCK_N=block, ONE_BLOCK=one_block, num_warps=num_warps)
    dweight = sum_partials(dw_partial, weight.dtype) if weight is not None else None
    return dx, dweight
