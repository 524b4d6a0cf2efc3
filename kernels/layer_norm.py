"""LayerNorm over the rows of contiguous (M, N) matrices, forward and backward; weight and bias optional.

Forward, one program per row: y = (x - mean) * rstd * w + b, saving mean and rstd (fp32, (M,)). A row that fits
one block (N <= MAX_BLOCK_N) is read once (elements moved: read MN + 2N, write MN + 2M); a longer row is read
twice, its statistics gathered in one streaming pass (per-lane Welford, merged at the end) before the normalize
pass.

Backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w and xhat = (x - mean) * rstd.
dweight = sum over rows of dy * xhat and dbias = sum of dy are reduced deterministically, never with atomics:
each of G programs owns a contiguous range of rows and writes its partial sums to its own row of a (G, N) fp32
buffer; a second kernel then sums the G rows in a fixed order. On CUDA, G is a multiple of the SM count, more
programs per SM for shorter rows (partial_programs); the partition depends only on M, N and the device, so two
runs give the same bits. The weight is re-read from cache each row rather than held in registers, which the row,
dy and the accumulators fill (ptxas, sm_90: RMSNorm at 4k columns 122 -> 80 registers). Elements moved with
one-block rows: read 2MN + N + 2M, write MN, plus 2GN per parameter for the partial sums (G << M). The backward
is compiled without fp contraction: fusing g - mean(g) into fma(dy, w, -mean(g)) would keep dy * w's rounding
error where the two are equal (rows of one element, where dx is exactly 0), times rstd = 1/sqrt(eps).

RMSNorm is the same computation without centering: CENTER=False drops the mean (and its store), the Welford
statistics (a plain sum of squares suffices) and the mean(g) term; rms_norm.py launches these kernels that way.
"""
import torch
import triton
import triton.language as tl

from ._device import cdiv, next_power_of_2, properties
from .softmax import row_config

# The largest row block, in elements: 64 KiB of fp32 per program. Longer rows take the multi-block path.
# Tests lower it to reach that path with short rows.
MAX_BLOCK_N = 16384
# Programs that share the weight-gradient reduction where there are no SMs to count (Triton's interpreter).
CPU_PROGRAMS = 4
# The backward's programs per SM are sized so that about this many bytes of x and dy rows are in flight per SM.
# A program walks its rows one at a time (load, reduce, store), so one program per SM starves short rows:
# on the H200, with one per SM, RMSNorm backward at 4k columns ran at 615 GB/s against 3,518 at 16k.
BYTES_IN_FLIGHT_PER_SM = 64 * 1024
MAX_PROGRAMS_PER_SM = 16


@triton.jit
def _layer_norm_forward_kernel(
    X,  # (M, N) input
    Y,  # (M, N) output, dtype of X
    W,  # (N,) weight, or a dummy pointer when HAS_WEIGHT is False
    B,  # (N,) bias, or a dummy pointer when HAS_BIAS is False
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    stride_x,
    stride_y,
    N,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # BLOCK_N >= N: the row stays in registers between statistics and output
    CENTER: tl.constexpr,  # LayerNorm; False: RMSNorm (Mean and B are dummy pointers)
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
        else:
            xc = x  # zero past N already
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    elif not CENTER:
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
    else:
        # Welford per lane keeps the variance accurate when |mean| >> std, without a third pass over the row. It
        # runs on x - x[0]: the running means then stay near the spread's scale, where fp32 steps are fine, instead
        # of near |mean|, where each update would round by ulp(mean).
        shift = tl.load(X).to(tl.float32)
        count = tl.zeros([BLOCK_N], tl.float32)
        mean_lane = tl.zeros([BLOCK_N], tl.float32)
        m2_lane = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            d = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32) - shift
            count += mask.to(tl.float32)
            delta = d - mean_lane
            mean_lane += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
            m2_lane += tl.where(mask, delta * (d - mean_lane), 0.0)
        # Chan et al.'s merge of the lanes: every lane saw at least one element, since BLOCK_N < N here.
        shifted_mean = tl.sum(count * mean_lane, axis=0) / N
        spread = mean_lane - shifted_mean
        var = (tl.sum(m2_lane, axis=0) + tl.sum(count * spread * spread, axis=0)) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        mean = shift + shifted_mean
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            x = tl.load(X + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = ((x - shift) - shifted_mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    if CENTER:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _row_stats(Mean, Rstd, row, CENTER: tl.constexpr):
    """The forward's (mean, rstd) of a row; mean 0 without centering."""
    if CENTER:
        return tl.load(Mean + row), tl.load(Rstd + row)
    else:
        return 0.0, tl.load(Rstd + row)


@triton.jit
def _normalized(x, mask, mean, rstd, CENTER: tl.constexpr):
    """xhat: (x - mean) * rstd, zero past the row's end; without centering x * rstd (x is zero there already)."""
    if CENTER:
        return tl.where(mask, (x - mean) * rstd, 0.0)
    else:
        return x * rstd


@triton.jit
def _mean_if(v, N, CENTER: tl.constexpr):
    """mean(v) for the centered (LayerNorm) gradient's mean(g) term; 0 without centering."""
    if CENTER:
        return tl.sum(v, axis=0) / N
    else:
        return 0.0


@triton.jit
def _layer_norm_backward_kernel(
    DY,  # (M, N) gradient of the output
    X,  # (M, N) input
    W,  # (N,) weight, or a dummy pointer when HAS_WEIGHT is False
    Mean,  # (M,) fp32
    Rstd,  # (M,) fp32
    DX,  # (M, N) gradient of the input, dtype of X
    DW_partial,  # (G, N) fp32, row g for program g; zeroed beforehand when not ONE_BLOCK
    DB_partial,  # (G, N) fp32, likewise
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,  # also: compute dweight
    HAS_BIAS: tl.constexpr,  # compute dbias
    BLOCK_N: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    CENTER: tl.constexpr,  # LayerNorm; False: RMSNorm, whose dx has no mean(g) term (Mean is a dummy pointer)
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    DW_partial += pid * N
    DB_partial += pid * N
    if ONE_BLOCK:
        mask = cols < N
        dw = tl.zeros([BLOCK_N], tl.float32)
        db = tl.zeros([BLOCK_N], tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            mean, rstd = _row_stats(Mean, Rstd, row, CENTER)
            xhat = _normalized(x, mask, mean, rstd, CENTER)
            g = dy
            if HAS_WEIGHT:
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            c_g = _mean_if(g, N, CENTER)
            c_gx = tl.sum(g * xhat, axis=0) / N
            dx = (g - c_g - xhat * c_gx) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_WEIGHT:
                dw += dy * xhat
            if HAS_BIAS:
                db += dy
        if HAS_WEIGHT:
            tl.store(DW_partial + cols, dw, mask=mask)
        if HAS_BIAS:
            tl.store(DB_partial + cols, db, mask=mask)
    else:
        for row in range(row_start, row_end):
            X_row = X + row * stride_x
            DY_row = DY + row * stride_dy
            DX_row = DX + row * stride_dx
            mean, rstd = _row_stats(Mean, Rstd, row, CENTER)
            acc_g = tl.zeros([BLOCK_N], tl.float32)
            acc_gx = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(DY_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                if CENTER:
                    acc_g += g
                acc_gx += g * _normalized(x, mask, mean, rstd, CENTER)
            c_g = _mean_if(acc_g, N, CENTER)
            c_gx = tl.sum(acc_gx, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                x = tl.load(X_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = _normalized(x, mask, mean, rstd, CENTER)
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                dx = (g - c_g - xhat * c_gx) * rstd
                tl.store(DX_row + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                # Only this program touches its partial row, so read-modify-write needs no atomics.
                if HAS_WEIGHT:
                    dw = tl.load(DW_partial + start + cols, mask=mask, other=0.0)
                    tl.store(DW_partial + start + cols, dw + dy * xhat, mask=mask)
                if HAS_BIAS:
                    db = tl.load(DB_partial + start + cols, mask=mask, other=0.0)
                    tl.store(DB_partial + start + cols, db + dy, mask=mask)


@triton.jit
def _column_sums(P, Out, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """Out[n] = sum over g of P[g, n] for this program's column block, always in the same order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & col_mask[None, :]
        acc += tl.load(P + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    P0, Out0,  # (G, N) fp32 partial sums -> (N,) column sums, any float dtype
    P1, Out1,  # a second pair (dbias beside dweight), summed by the programs of grid axis 1 = 1
    G,
    N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    if tl.program_id(1) == 0:
        _column_sums(P0, Out0, G, N, BLOCK_G, BLOCK_N)
    else:
        _column_sums(P1, Out1, G, N, BLOCK_G, BLOCK_N)


# ------------------------------------------------------------------------------------------------ launchers
def norm_config(N: int, max_block: int) -> tuple[int, int, bool]:
    """row_config for the norm kernels, whose streaming path (rows over max_block) keeps more per-lane state than
    softmax's: Welford's three arrays, or the backward's two sums beside x and dy. It streams through blocks of
    half the cap with the cap's warps, which ptxas (sm_90) fits in registers: at a 16K block it spilled 588 B
    (forward) and 1,016 B (backward) per thread."""
    block, num_warps, one_block = row_config(N, max_block)
    if not one_block:
        block = max(1, block // 2)
    return block, num_warps, one_block


def partial_programs(device: torch.device, M: int, row_bytes: int = 0) -> tuple[int, int]:
    """(G, rows_per_program) for the weight-gradient reduction: G programs, each over a contiguous row range.

    row_bytes: the bytes of x and dy one row step loads; the shorter the rows, the more programs per SM. G depends
    only on (device, M, row_bytes), so the reduction order, and the bits of dweight, are the same every run."""
    if device.type == "cuda":
        per_sm = max(1, min(MAX_PROGRAMS_PER_SM, BYTES_IN_FLIGHT_PER_SM // max(1, row_bytes)))
        target = properties(device).multi_processor_count * per_sm
    else:
        target = CPU_PROGRAMS
    rows_per_program = cdiv(M, max(1, min(target, M)))
    return cdiv(M, rows_per_program), rows_per_program


def sum_partials(*partials: tuple[torch.Tensor, torch.dtype]) -> list[torch.Tensor]:
    """The column sums (N,) of one or two (G, N) fp32 buffers, each given with its result's dtype, in a fixed
    order and one launch (a launch costs tens of microseconds of host time)."""
    buffers = [p for p, _ in partials]
    G, N = buffers[0].shape
    outs = [torch.empty(N, dtype=dtype, device=buffers[0].device) for _, dtype in partials]
    # Column blocks narrow enough for about 64 programs: the partial rows run into the thousands for short rows.
    BLOCK_N = max(32, min(128, next_power_of_2(cdiv(N, 64))))
    _sum_partials_kernel[(cdiv(N, BLOCK_N), len(buffers))](buffers[0], outs[0], buffers[-1], outs[-1], G, N,
                                                           BLOCK_G=32, BLOCK_N=BLOCK_N, num_warps=4)
    return outs


def layer_norm_forward(x: torch.Tensor, weight, bias, eps: float):
    """x (M, N) contiguous, weight and bias (N,) or None -> (y (M, N) in x's dtype, mean (M,) fp32, rstd (M,) fp32)."""
    M, N = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    block, num_warps, one_block = norm_config(N, MAX_BLOCK_N)
    _layer_norm_forward_kernel[(M,)](
        x, y, x if weight is None else weight, x if bias is None else bias, mean, rstd, x.stride(0), y.stride(0), N,
        eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=block, ONE_BLOCK=one_block,
        CENTER=True, num_warps=num_warps)
    return y, mean, rstd


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight, mean: torch.Tensor, rstd: torch.Tensor,
                        has_bias: bool):
    """dy, x (M, N) contiguous; weight (N,) or None; mean, rstd (M,) fp32 from the forward.

    Returns (dx (M, N) in x's dtype, dweight (N,) in weight's dtype or None, dbias (N,) or None), dbias in
    weight's dtype, or float32 without a weight.
    """
    M, N = x.shape
    dx = torch.empty_like(x)
    block, num_warps, one_block = norm_config(N, MAX_BLOCK_N)
    param_grads = weight is not None or has_bias
    # Without parameter gradients nothing needs reducing, and one row per program spreads the rows widest.
    G, rows_per_program = partial_programs(x.device, M, 2 * N * x.element_size()) if param_grads else (M, 1)
    new_partial = torch.empty if one_block else torch.zeros
    dw_partial = new_partial((G, N), dtype=torch.float32, device=x.device) if weight is not None else mean
    db_partial = new_partial((G, N), dtype=torch.float32, device=x.device) if has_bias else mean
    _layer_norm_backward_kernel[(G,)](
        dy, x, x if weight is None else weight, mean, rstd, dx, dw_partial, db_partial, dy.stride(0), x.stride(0),
        dx.stride(0), M, N, rows_per_program, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, BLOCK_N=block,
        ONE_BLOCK=one_block, CENTER=True, num_warps=num_warps, enable_fp_fusion=False)
    # Without a weight, dbias in float32: summed in x's 16-bit dtype it overflowed (70,000 rows of ones); autograd
    # gives it the bias's dtype.
    param_dtype = torch.float32 if weight is None else weight.dtype
    if weight is not None and has_bias:
        dweight, dbias = sum_partials((dw_partial, param_dtype), (db_partial, param_dtype))
    else:
        dweight = sum_partials((dw_partial, param_dtype))[0] if weight is not None else None
        dbias = sum_partials((db_partial, param_dtype))[0] if has_bias else None
    return dx, dweight, dbias
