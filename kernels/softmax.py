"""Row softmax, forward and backward, over contiguous (M, N) matrices; one program per row.

Rows that fit one block (N <= MAX_BLOCK_N) are read once and written once: forward moves 2MN elements,
backward 3MN. Longer rows stream through the block twice: forward first finds max and sum in one online pass
(rescaling the running sum whenever the max grows), then normalizes (3MN); backward first forms rowsum(y * dy),
then writes dx (5MN). Math is fp32 whatever the storage dtype; the result is cast once, at the store.
"""
import torch
import triton
import triton.language as tl

from ._device import next_power_of_2

# The largest row block, in elements: 64 KiB of fp32 per program. Longer rows take the multi-block kernels.
# Tests lower it to reach the multi-block path with short rows.
MAX_BLOCK_N = 16384


@triton.jit
def _softmax_forward_one_block(
    X,  # (M, N) input, any float dtype
    Y,  # (M, N) output, dtype of X
    stride_x,  # elements between rows of X
    stride_y,  # elements between rows of Y
    N,
    BLOCK_N: tl.constexpr,  # >= N
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    # A row of only -inf gives -inf - -inf = NaN here, which is what torch returns for it.
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_forward_online(
    X,  # (M, N) input, any float dtype
    Y,  # (M, N) output, dtype of X
    stride_x,
    stride_y,
    N,
    BLOCK_N: tl.constexpr,  # < N: the row takes several blocks
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    cols = tl.arange(0, BLOCK_N)
    # Each lane keeps its own running max and sum, so the streaming pass needs no cross-lane reduction.
    m_lane = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_lane = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        x = tl.load(X + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, x)
        # While a lane has seen only -inf, shift by 0 instead, so that exp gives 0 rather than exp(NaN).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_lane = s_lane * tl.exp(m_lane - shift) + tl.exp(x - shift)
        m_lane = m_new
    m = tl.max(m_lane, axis=0)
    # Lanes still at -inf hold a zero sum and contribute exp(-inf) = 0; a row of only -inf makes m = -inf and
    # every quotient NaN, as torch.
    s = tl.sum(s_lane * tl.exp(m_lane - m), axis=0)
    inv_s = 1.0 / s
    for start in range(0, N, BLOCK_N):
        mask = start + cols < N
        x = tl.load(X + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.exp(x - m) * inv_s
        tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_backward_kernel(
    Y,  # (M, N) forward output
    DY,  # (M, N) gradient of the output
    DX,  # (M, N) gradient of the input, dtype of DY
    stride_y,
    stride_dy,
    stride_dx,
    N,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # BLOCK_N >= N: keep the row in registers between the two steps
):
    """dx = y * (dy - rowsum(y * dy))."""
    row = tl.program_id(0).to(tl.int64)
    Y += row * stride_y
    DY += row * stride_dy
    DX += row * stride_dx
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=0)
        tl.store(DX + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            y = tl.load(Y + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + start + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers
def row_config(N: int, max_block: int) -> tuple[int, int, bool]:
    """(BLOCK_N, num_warps, one_block) for rows of N elements and blocks of at most max_block elements; the
    norms use it too."""
    block = min(next_power_of_2(N), max_block)
    # About 16 fp32 elements per thread keeps a row block in registers without spilling.
    num_warps = max(1, min(16, block // 512))
    return block, num_warps, block >= N


def softmax_forward(x: torch.Tensor) -> torch.Tensor:
    """softmax over the rows of x (M, N), contiguous; returns (M, N) in x's dtype."""
    M, N = x.shape
    y = torch.empty_like(x)
    block, num_warps, one_block = row_config(N, MAX_BLOCK_N)
    kernel = _softmax_forward_one_block if one_block else _softmax_forward_online
    kernel[(M,)](x, y, x.stride(0), y.stride(0), N, BLOCK_N=block, num_warps=num_warps)
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of softmax: y and dy (M, N), contiguous; returns dx (M, N) in dy's dtype."""
    M, N = y.shape
    dx = torch.empty_like(dy)
    block, num_warps, one_block = row_config(N, MAX_BLOCK_N)
    _softmax_backward_kernel[(M,)](y, dy, dx, y.stride(0), dy.stride(0), dx.stride(0), N, BLOCK_N=block,
                                   ONE_BLOCK=one_block, num_warps=num_warps)
    return dx
