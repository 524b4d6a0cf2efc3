"""Attention in Triton: FlashAttention-2 forward and backward with torch SDPA's semantics.

Shapes: q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; out (B, H, Lq, Dv); stats fp32
(2, B, H, Lq); mask None or (B, H, Lq, Lk) with stride-0 broadcast dims, bool (True = keep) or float (added); packed
sequences below (VARLEN).

Reading order: shared helpers, forward (tile loop, kernel, split-KV combine), backward (delta preprocess,
dK/dV kernel, dQ kernel), attention weights, dropout mask, configs, launchers, backend entry points.

Numerics: every softmax runs in base 2 with log2(e) folded into the scale (s2 = qk * scale * log2(e)), so the
exponentials are exp2. Accumulation is fp32 and results are cast once at the store. A row whose every key is
masked keeps m = -inf and l = 0: its output is 0. With SOFTCAP (Gemma 2's logit cap c) the scores are capped,
c * tanh(s / c), before the mask (_scores), and the backward multiplies dS by the cap's slope 1 - tanh^2.

Statistics (STATS): the forward saves each row's max score m and log2 of its row sum l = sum exp2(s2 - m), in
base 2 and apart, as planes 0 and 1 of (2, B, H, Lq) (m = -inf and 0 for a row with every key masked); the
backward and the attention weights rebuild P = exp2(s2 - m - log2 l) from them. Their sum, the logsumexp, would
not do for a row whose every key carries a huge finite mask (finfo.min, as Hugging Face pads): m is then about
-3.4e38, where log2(Lk) is far below the float spacing, and P rebuilt from the sum would be 1 per key instead of
torch's 1 / Lk. So with a float mask the kernels subtract m and log2 l one after the other (exact there, one more
subtraction per score); without one the scores are scale * q.k, nowhere near that size, and they subtract the
per-row sum.

Local windows (WINDOW, FlashAttention's window_size): query i sees keys i - win_left .. i + win_right, top-left
aligned as is_causal, on top of the mask and the causal diagonal. Each program reads only the blocks some row of
its block can see (key blocks in the forward and dQ, query blocks in dK/dV), so a window of W keys costs about
L * W. Each tile read takes the window test (two comparisons per score), but in the light kernels (16-bit, no
mask, no dropout) the blocks every row of a block sees whole skip it, as they skip every other test.

Packed sequences (VARLEN, torch's varlen_attn): q (total_q, H, D), k and v (total_k, Hkv, .), B sequences end to
end at int32 offsets cu_seq_q / cu_seq_k. The grid is the dense one for B sequences of the longest lengths; each
program reads its sequence's offsets (_sequence) and places its rows there, programs past a shorter sequence's end
read nothing, and the window aligns bottom-right in each sequence. Out is (total_q, H, Dv), stats (2, H, total_q).
With a KV cache's seqused_k (the forward only) sequence b's keys end after its first seqused_k[b] rows; with a
paged one (PAGED, torch's block_table) K and V are pools of pages and each key's row is looked up in the table.

The backward never uses atomics: dK/dV programs own a key block (and loop over the query blocks of every query
head of their GQA group), dQ programs own a query block, so two runs give bitwise equal gradients.

On sm_90+ the kernels can stream their inputs through tensor descriptors (TMA: asynchronous bulk copies into
shared memory, zero-filled past the lengths and the head dim) instead of masked pointer loads: K and V in the
forward and the dQ kernel, Q and dO in the dK/dV kernel. TMA_MODE and the autotuner choose.

Dropout is counter-based: element (b, h, i, j) keeps iff tl.rand(seed, ((b * H + h) * Lq + i) * Lk + j) >= p,
so the backward and `dropout_mask` regenerate exactly the forward's mask without storing it.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation as _triton_allocation

from ._device import cdiv, next_power_of_2, properties

# Triton reads TRITON_INTERPRET once, at import; we do the same (fast_attention.backends does too).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG2E = 1.4426950408889634
# Kernels see module globals only when they are constexpr.
_LOG2E = tl.constexpr(LOG2E)
_FP32_MAX = tl.constexpr(3.4028234663852886e38)

MAX_HEAD_DIM = 256

# Decoding (flash-decoding): few queries against many keys leave most SMs idle with one program per query
# block, so the keys are cut into splits that run in parallel and a second kernel merges their (out, row max, log
# row sum).
# Decoding is bound by reading the KV cache: for 16-bit inputs the query heads of a GQA group share one program
# (PACK_GQA), so each K and V block is read once per group rather than once per query head.
DECODE_MAX_LQ = 16       # queries per head at most
DECODE_MIN_LK = 1024     # keys at least
SPLIT_MIN_KEYS = 256     # fewest keys one split handles (below that the combine costs more than it saves)
MAX_SPLITS = 128
# On sm_90+ the combine is launched as a programmatic dependent of the split kernel (PDL): it is set up while the
# splits finish, instead of after, and waits for their results (griddepcontrol.wait) before it reads them. A
# decoding step is tens of µs, a kernel boundary a few. FAST_ATTENTION_PDL=0 turns it off.
PDL_MODE = os.environ.get("FAST_ATTENTION_PDL", "1")


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs must give fp32-accurate results, so no TF32 for them.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _scores(q, kt, qk_scale, softcap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """(base-2 scores, t) of a tile: q k^T * scale * log2(e), or with SOFTCAP Gemma 2's logit cap c, c * tanh(scale
    * q.k / c) in base 2, which is softcap * tanh(s / softcap) for softcap = c * log2(e); t is that tanh (the
    backward's chain rule takes 1 - t^2), or the scores again without the cap. tanh(x) = 1 - 2 / (e^2x + 1): exact
    limits at large |x| (no inf / inf) and an absolute error of a few ulps of 1 near 0, which the cap multiplies
    into an error of a few ulps of c in the scores, where Triton's interpreter has no libdevice tanh."""
    s = _dot(q, kt, IEEE) * qk_scale
    if SOFTCAP:
        t = 1.0 - 2.0 / (tl.math.exp2(s * (2.0 * _LOG2E / softcap)) + 1.0)
        return t * softcap, t
    else:
        return s, s


@triton.jit
def _apply_masks(s, mask_ptrs, mask_ok, q_idx, k_idx, k_end, win_left, win_right, MASK_KIND: tl.constexpr,
                 CAUSAL_TILE: tl.constexpr, WINDOW: tl.constexpr, EDGE: tl.constexpr = True):
    """Masks on base-2 scores s (any 2-D orientation; q_idx / k_idx broadcast to it): the user mask, keys past
    k_end on tiles that may hold some (EDGE), the causal diagonal on tiles that cross it, and with WINDOW the
    local window, keys q - win_left .. q + win_right."""
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=mask_ok, other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        add = tl.load(mask_ptrs, mask=mask_ok, other=0.0).to(tl.float32)
        # log2(e) * finfo.min overflows to -inf, which would turn a row masked with finfo.min (uniform weights in
        # torch) into a dead row; clamp such values to the largest finite magnitude but keep a real -inf.
        # (A NaN in the mask must stay NaN, as in torch: on a GPU, min/max drop NaN unless told.)
        add2 = tl.maximum(add * _LOG2E, -_FP32_MAX, propagate_nan=tl.PropagateNan.ALL)
        s = s + tl.where(add == float("-inf"), add, add2)
    if EDGE:
        s = tl.where(k_idx < k_end, s, float("-inf"))
    if CAUSAL_TILE:
        s = tl.where(k_idx <= q_idx, s, float("-inf"))
    if WINDOW:
        s = tl.where((k_idx >= q_idx - win_left) & (k_idx <= q_idx + win_right), s, float("-inf"))
    return s


@triton.jit
def _window_bounds(lo, hi, first, last, win_left, win_right, BLOCK: tl.constexpr):
    """[lo, hi) narrowed to the positions that rows first .. last see (row i sees i - win_left .. i + win_right), lo
    kept a multiple of BLOCK: the blocks outside are never read. With the sides swapped, the rows that see the
    positions first .. last."""
    lo = tl.maximum(lo, tl.maximum(first - win_left, 0) // BLOCK * BLOCK)
    hi = tl.maximum(tl.minimum(hi, last + win_right + 1), lo)
    return lo, hi


@triton.jit
def _window_inner(lo, mid, first, last, win_left, win_right, BLOCK: tl.constexpr):
    """Of the blocks [lo, mid) (BLOCK apart from lo, a multiple of BLOCK), the run [a, b) whose every position the
    rows first .. last all see (row i sees i - win_left .. i + win_right): those blocks skip the window test."""
    a = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last - win_left, 0), BLOCK) * BLOCK, lo), mid)
    b = tl.maximum(tl.minimum((first + win_right + 1) // BLOCK * BLOCK, mid), a)
    return a, b


@triton.jit
def _sequence(CuQ, CuK, KEnd, b, win_left, win_right):
    """VARLEN: batch entry b is the packed sequence of queries CuQ[b] .. CuQ[b + 1] - 1 and keys CuK[b] ..
    KEnd[b] - 1 (KEnd[b] is CuK[b + 1], or with a KV cache's used keys CuK[b] + seqused_k[b]: _varlen_args).
    Returns its first query and key rows, its lengths, and the window's sides moved by Lk - Lq: a packed
    sequence's window is aligned bottom-right (FlashAttention's varlen convention), so query i sees keys
    i + (Lk - Lq) - left .. i + (Lk - Lq) + right."""
    q0 = tl.load(CuQ + b)
    k0 = tl.load(CuK + b)
    Lq = tl.load(CuQ + b + 1) - q0
    Lk = tl.load(KEnd + b) - k0
    return q0.to(tl.int64), k0.to(tl.int64), Lq, Lk, win_left - (Lk - Lq), win_right + (Lk - Lq)


@triton.jit
def _keys_ok(offs_n, k_end, EDGE: tl.constexpr):
    """Which keys of a tile exist: tested on EDGE tiles only, a constant True (folded away) elsewhere."""
    if EDGE:
        return offs_n < k_end
    else:
        return tl.full(offs_n.shape, True, tl.int1)


@triton.jit
def _keep(seed, counters, dropout_p):
    return tl.rand(seed, counters) >= dropout_p


@triton.jit
def _row_stats(max_ptrs, log_sum_ptrs, ok):
    """A block of rows' saved statistics (STATS), base 2: (m, log2 l, their sum). Dead rows (m = -inf) and rows
    past the length read m = +inf, so that P = exp2(s - m - log2 l) is 0 there (not exp2(-inf + inf) = NaN)."""
    m = tl.load(max_ptrs, mask=ok, other=float("inf"))
    m = tl.where(m == float("-inf"), float("inf"), m)
    log_sum = tl.load(log_sum_ptrs, mask=ok, other=0.0)
    return m, log_sum, m + log_sum


@triton.jit
def _probabilities(s, m, log_sum, lse, MASK_KIND: tl.constexpr):
    """P = exp2(s - m - log2 l) from base-2 scores s and the rows' statistics (each broadcast to s), at most 1 (the
    difference may round just above 0). With a float mask the two are subtracted one after the other, exact where
    m is huge (STATS); otherwise their per-row sum, lse, is: one subtraction per score. NaN stays NaN."""
    if MASK_KIND == 2:
        d = (s - m) - log_sum
    else:
        d = s - lse
    return tl.math.exp2(tl.minimum(d, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _page_rows(pages, offs_n, n_ok, page_size, skp, skn, svp, svn):
    """A paged KV cache: key n of the sequence is row n % page_size of page pages[n // page_size] (pages: the
    sequence's row of the block table). The int64 offsets of those rows in K and V (pages may lie anywhere in the
    pool); keys not n_ok read page 0 and are masked by the caller."""
    page = tl.load(pages + offs_n // page_size, mask=n_ok, other=0).to(tl.int64)
    slot = (offs_n % page_size).to(tl.int64)
    return page * skp + slot * skn, page * svp + slot * svn


@triton.jit
def _kv_descriptors(k_base, v_base, Lk, skn, svn, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr):
    """With TMA, (Lk, D) tensor descriptors of one kv head's K and V, read BLOCK_N rows at a time: Hopper's copy
    engine moves each block to shared memory asynchronously, zero-filled past Lk and the head dim, with no
    addresses or masks in registers (the launcher checked the 16-byte alignment it needs). Else the pointers."""
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Lk, HEAD_DIM], strides=[skn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Lk, HEAD_DIM_V], strides=[svn, 1],
                                           block_shape=[BLOCK_N, BLOCK_DV])
        return k_desc, v_desc
    else:
        return k_base, v_base


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, mask_rows, row_ok, offs_m, rng_rows,
               start, end, k_end, skn, skd, svn, svd, smn, qk_scale, softcap, win_left, win_right, dropout_p,
               dropout_scale, seed, pages, page_size, skp, svp, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
               CAUSAL_TILE: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
               UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, PAGED: tl.constexpr, EDGE: tl.constexpr):
    """The online softmax over key blocks [start, end): returns the updated (acc, l, m), m in base 2. With TMA the
    K and V blocks come through the tensor descriptors (zero-filled past Lk and the head dim), else through
    pointer loads; PAGED (a paged KV cache) gathers each key's row from its page (_page_rows). Only EDGE tiles may
    hold keys at or past k_end, so only they test for them."""
    arange_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt_tile = arange_n[None, :] * skn + offs_d[:, None] * skd  # K^T (BLOCK_D, BLOCK_N)
    v_tile = arange_n[:, None] * svn + offs_dv[None, :] * svd  # (BLOCK_N, BLOCK_DV)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + arange_n
        n_ok = _keys_ok(offs_n, k_end, EDGE)
        if PAGED:
            k_rows, v_rows = _page_rows(pages, offs_n, n_ok, page_size, skp, skn, svp, svn)
            kt = tl.load(k_base + k_rows[None, :] + offs_d[:, None] * skd,
                         mask=(offs_d[:, None] < HEAD_DIM) & n_ok[None, :], other=0.0)
        elif TMA:
            kt = tl.trans(k_desc.load([start_n, 0]))
        else:
            kt = tl.load(k_base + tl.cast(start_n, tl.int64) * skn + kt_tile,
                         mask=(offs_d[:, None] < HEAD_DIM) & n_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s, _ = _scores(q, kt, qk_scale, softcap, SOFTCAP, IEEE)  # (BLOCK_M, BLOCK_N), base 2
        mask_ptrs = mask_rows + tl.cast(start_n, tl.int64) * smn + arange_n[None, :] * smn
        s = _apply_masks(s, mask_ptrs, row_ok[:, None] & n_ok[None, :], offs_m[:, None], offs_n[None, :], k_end,
                         win_left, win_right, MASK_KIND, CAUSAL_TILE, WINDOW, EDGE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # dead so far: exp2(-inf - 0) = 0, no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(seed, rng_rows[:, None] + offs_n[None, :], dropout_p)
            p = tl.where(keep, p * dropout_scale, 0.0)
        if PAGED:
            v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :] * svd,
                        mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        elif TMA:
            # Rows in [k_end, Lk) are real keys of another split or past the causal limit; their p is exactly 0.
            v = v_desc.load([start_n, 0])
        else:
            v = tl.load(v_base + tl.cast(start_n, tl.int64) * svn + v_tile,
                        mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd(Q, K, V, Mask, Out, Max, LogSum,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
              out_split_stride, stats_split_stride,
              H, GROUP, Lq, Lk, keys_per_split, num_splits, qk_scale, softcap, win_left, win_right, dropout_p,
              dropout_scale, seed, CuQ, CuK, KEnd, total_q, BlockTable, sbt, page_size, skp, svp,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr,
              SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, TMA: tl.constexpr, PACK_GQA: tl.constexpr, VARLEN: tl.constexpr,
              PAGED: tl.constexpr, PDL: tl.constexpr = False):
    """One program: BLOCK_M query rows against the keys of one split. The rows are queries of one (b, h), or with
    PACK_GQA (decoding) the queries of all GROUP heads that share one kv head, head-major (row r is query r % Lq
    of head hkv * GROUP + r // Lq), so each K and V block is read once for the whole group.

    Out: (num_splits, B, H, Lq, Dv) contiguous (num_splits = 1 writes the result itself). Max and LogSum,
    (num_splits, B, H, Lq) contiguous: each row's statistics (STATS, in the module's docstring). With several
    splits each part is normalized on its own and merged by _attn_combine.

    VARLEN (packed sequences): B sequences packed along the rows of Q (total_q, H, D), K and V (total_k, Hkv, .),
    sequence b at CuQ[b] / CuK[b] (_sequence); Lq and Lk are the longest lengths (the grid's), the strides sqb,
    skb, svb 0. Out is (num_splits, total_q, H, Dv), Max and LogSum (num_splits, H, total_q), contiguous; split s
    takes keys s * keys_per_split .. of each sequence (none past a shorter one's keys); PACK_GQA packs the
    sequence's queries of a group's heads.

    PAGED (with VARLEN: a paged KV cache, torch's block_table): K and V are pools of pages (pages, page_size, Hkv,
    .), page stride skp / svp, slot stride skn / svn; key n of sequence b is in page BlockTable[b, n // page_size]
    (row stride sbt), and its sequence's keys start at 0 (CuK is zeros, KEnd its used keys: _varlen_args).
    """
    pid = tl.program_id(0)
    n_rows = Lq * GROUP if PACK_GQA else Lq
    n_mblocks = tl.cdiv(n_rows, BLOCK_M)
    # Causal blocks near the bottom have the most keys: start those first so the tail of the grid is short.
    mblock = n_mblocks - 1 - pid % n_mblocks
    split = (pid // n_mblocks) % num_splits
    head = (pid // n_mblocks // num_splits).to(tl.int64)  # b * H + h, or with PACK_GQA b * Hkv + hkv
    start_m = mblock * BLOCK_M
    offs_r = start_m + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        b = head // (H // GROUP)
        hkv = head % (H // GROUP)
    else:
        b = head // H
        h = head % H
        hkv = h // GROUP
    q0, k0 = 0, 0
    if VARLEN:  # from here on Lq and Lk are the sequence's (the grid's were the longest)
        q0, k0, Lq, Lk, win_left, win_right = _sequence(CuQ, CuK, KEnd, b, win_left, win_right)
    if PACK_GQA:
        h = hkv * GROUP + offs_r // tl.maximum(Lq, 1)  # per row (a packed sequence may have no queries)
        offs_m = offs_r % tl.maximum(Lq, 1)
    else:
        offs_m = offs_r
    bh = b * H + h
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows_here = Lq * GROUP if PACK_GQA else Lq
    row_ok = offs_r < rows_here
    q_rows = Q + b * sqb + q0 * sqm + h * sqh + offs_m.to(tl.int64) * sqm
    q = tl.load(q_rows[:, None] + offs_d[None, :] * sqd, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b * skb + k0 * skn + hkv * skh
    v_base = V + b * svb + k0 * svn + hkv * svh
    k_desc, v_desc = _kv_descriptors(k_base, v_base, Lk, skn, svn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                     TMA)
    pages = BlockTable + b * sbt
    mask_rows = (Mask + b * smb + h * smh + offs_m.to(tl.int64) * smm)[:, None]  # (BLOCK_M, 1)
    rng_rows = (bh * Lq + offs_m) * Lk  # int64 dropout counters of (i, 0)

    # Whole blocks [lo, mid) need no key test; the rest, [mid, hi), is the diagonal and the partial last block.
    # With a mask, dropout or fp32 (FMA dots) the first loop keeps the test and takes every block when not
    # causal: dropping it there saves little and (compiled for sm_90) makes those loops spill.
    EDGE_FIRST: tl.constexpr = MASK_KIND != 0 or DROPOUT or IEEE
    lo = split * keys_per_split
    hi = lo + tl.minimum(keys_per_split, Lk - lo)  # lo + keys_per_split could pass 2^31 with Lk just under it
    if WINDOW:
        # The block's rows see keys from (first row) - win_left to (last row) + win_right: the key blocks outside
        # are never read. Packed rows hold queries 0 .. Lq - 1.
        first, last = (0, Lq - 1) if PACK_GQA else (start_m, start_m + BLOCK_M - 1)
        lo, hi = _window_bounds(lo, hi, first, last, win_left, win_right, BLOCK_N)
    if VARLEN:  # blocks past a shorter sequence's end, and splits past its keys: nothing to read
        hi = tl.where(start_m < rows_here, tl.maximum(hi, lo), lo)
    if IS_CAUSAL and PACK_GQA:
        # Packed rows are not in query order: no key past the last query (Lq - 1) is visible, and every block
        # takes the diagonal test.
        hi = tl.minimum(hi, Lq)
        mid = lo
    elif IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
        # Keys <= start_m are visible to every row of the block: those whole blocks skip the diagonal test.
        mid = lo + tl.maximum(tl.minimum(hi, start_m + 1) - lo, 0) // BLOCK_N * BLOCK_N
    elif EDGE_FIRST:
        mid = hi
    else:
        mid = lo + (hi - lo) // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # With a window, the light kernels (no test on whole blocks: not EDGE_FIRST) split [lo, mid) in three: the
    # blocks at the window's left edge, those every row sees whole (no window test), those at its right edge. With
    # a mask or dropout the extra loops spill (sm_90: 3.8 KB with a bool mask), so every block takes the test.
    SPLIT: tl.constexpr = WINDOW and not EDGE_FIRST
    INNER_WINDOW: tl.constexpr = WINDOW and not SPLIT
    inner_lo, inner_hi = lo, mid
    if SPLIT:
        inner_lo, inner_hi = _window_inner(lo, mid, first, last, win_left, win_right, BLOCK_N)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, mask_rows, row_ok, offs_m,
                                   rng_rows, lo, inner_lo, hi, skn, skd, svn, svd, smn, qk_scale, softcap, win_left,
                                   win_right, dropout_p, dropout_scale, seed, pages, page_size, skp, svp, HEAD_DIM,
                                   HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, False, True, DROPOUT, SOFTCAP,
                                   UPCAST, IEEE, TMA, PAGED, EDGE_FIRST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, mask_rows, row_ok, offs_m,
                               rng_rows, inner_lo, inner_hi, hi, skn, skd, svn, svd, smn, qk_scale, softcap, win_left,
                               win_right, dropout_p, dropout_scale, seed, pages, page_size, skp, svp, HEAD_DIM,
                               HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, False, INNER_WINDOW, DROPOUT,
                               SOFTCAP, UPCAST, IEEE, TMA, PAGED, EDGE_FIRST)
    if SPLIT:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, mask_rows, row_ok, offs_m,
                                   rng_rows, inner_hi, mid, hi, skn, skd, svn, svd, smn, qk_scale, softcap, win_left,
                                   win_right, dropout_p, dropout_scale, seed, pages, page_size, skp, svp, HEAD_DIM,
                                   HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, False, True, DROPOUT, SOFTCAP,
                                   UPCAST, IEEE, TMA, PAGED, EDGE_FIRST)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, mask_rows, row_ok, offs_m,
                               rng_rows, mid, hi, hi, skn, skd, svn, svd, smn, qk_scale, softcap, win_left, win_right,
                               dropout_p, dropout_scale, seed, pages, page_size, skp, svp, HEAD_DIM, HEAD_DIM_V,
                               BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND, IS_CAUSAL, WINDOW, DROPOUT, SOFTCAP, UPCAST, IEEE,
                               TMA, PAGED, True)
    if PDL:  # the combine may start its set-up now; it reads nothing before this grid has finished
        tl.extra.cuda.gdc_launch_dependents()

    live = l_i > 0.0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    log2_sum = tl.math.log2(tl.where(live, l_i, 1.0))
    if VARLEN:
        rows = (q0 + offs_m) * H + h  # (i, h) in Out
        stat_rows = h * total_q + q0 + offs_m  # (h, i) in Max and LogSum
    else:
        rows = bh * Lq + offs_m  # (b, h, i) in Out, Max and LogSum
        stat_rows = rows
    o_ptrs = Out + split * out_split_stride + rows[:, None] * HEAD_DIM_V + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Max + split * stats_split_stride + stat_rows, tl.where(live, m_i, float("-inf")), mask=row_ok)
    tl.store(LogSum + split * stats_split_stride + stat_rows, log2_sum, mask=row_ok)


@triton.jit
def _attn_combine(PartOut, PartMax, PartLogSum, Out, Max, LogSum, num_splits, out_split_stride, stats_split_stride,
                  H, total_q, HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
                  BLOCK_DV: tl.constexpr, VARLEN: tl.constexpr, PDL: tl.constexpr):
    """One program per query row r = (b * H + h) * Lq + i: merge the splits' normalized parts, weighting each by
    its share of the row sum, exp2(max_s - m + log_sum_s) / total (base 2, as the statistics). PartOut
    (S, B*H*Lq, Dv) fp32, PartMax and PartLogSum (S, B*H*Lq) fp32 -> Out (B*H*Lq, Dv), and the row's Max and
    LogSum (B*H*Lq): m and log2(total). VARLEN (packed sequences): r = h * total_q + i, as in the statistics
    (H, total_q), and the outputs' row is i * H + h, as in PartOut (S, total_q, H, Dv) and Out (total_q, H, Dv).
    With PDL (launched as a programmatic dependent of the split kernel) it first waits for that grid to complete
    and its writes to be visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    out_row = (row % total_q) * H + row // total_q if VARLEN else row
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_range = offs_s < num_splits
    max_s = tl.load(PartMax + offs_s.to(tl.int64) * stats_split_stride + row, mask=in_range, other=float("-inf"))
    m = tl.max(max_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    log_sum_s = tl.load(PartLogSum + offs_s.to(tl.int64) * stats_split_stride + row, mask=in_range, other=0.0)
    # Dead splits (keys all masked, or past the causal limit) have max_s = -inf and weigh 0.
    total = tl.sum(tl.math.exp2(max_s - m_safe + log_sum_s), 0)
    # The parts are summed CHUNK_S splits at a time: all 128 splits of a 256 head dim at once would be 256 fp32
    # registers per thread, and spill.
    offs_c = tl.arange(0, CHUNK_S)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start in range(0, num_splits, CHUNK_S):
        s = start + offs_c
        s_ok = s < num_splits
        at = s.to(tl.int64) * stats_split_stride + row
        w = tl.math.exp2(tl.load(PartMax + at, mask=s_ok, other=float("-inf")) - m_safe
                         + tl.load(PartLogSum + at, mask=s_ok, other=0.0))
        parts = tl.load(PartOut + s[:, None].to(tl.int64) * out_split_stride + out_row * HEAD_DIM_V
                        + offs_dv[None, :], mask=s_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc += tl.sum(parts * w[:, None], 0)
    out = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + out_row * HEAD_DIM_V + offs_dv, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Max + row, tl.where(total > 0.0, m_safe, float("-inf")))
    tl.store(LogSum + row, tl.math.log2(tl.where(total > 0.0, total, 1.0)))


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta(O, DO, Delta, sob, soh, som, sod, sdob, sdoh, sdom, sdod, H, Lq,
                    HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Delta (B, H, Lq) fp32 = rowsum(dO * O): the softmax backward's correction term, once per row."""
    pid = tl.program_id(0)
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    bh = (pid // n_mblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = (pid % n_mblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < Lq) & (offs_dv[None, :] < HEAD_DIM_V)
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * som + offs_dv[None, :] * sod, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdob + h * sdoh + rows * sdom + offs_dv[None, :] * sdod, mask=ok,
                 other=0.0).to(tl.float32)
    tl.store(Delta + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h, max_base, log_sum_base, delta_base, mask_cols,
                offs_n, n_ok,
                rng_base, start, end, Lq, Lk, sqm, sqd, sdom, sdod, smm, qk_scale, softcap, win_left, win_right,
                dropout_p, dropout_scale, seed, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASK_KIND: tl.constexpr,
                CAUSAL_TILE: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK, dV (BLOCK_N, D) of one key block over query blocks [start, end) of query head h, in the
    transposed orientation (keys on rows) so no (BLOCK_M, BLOCK_N) tile needs transposing. With TMA the Q and dO
    blocks come through the (H, Lq, D) descriptors of the batch."""
    arange_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qt_tile = arange_m[None, :] * sqm + offs_d[:, None] * sqd  # Q^T (BLOCK_D, BLOCK_M)
    do_tile = arange_m[:, None] * sdom + offs_dv[None, :] * sdod  # (BLOCK_M, BLOCK_DV)
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + arange_m
        m_ok = offs_m < Lq
        if TMA:
            qt = tl.trans(q_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_D))
            do = do_desc.load([h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
        else:
            qt = tl.load(q_base + tl.cast(start_m, tl.int64) * sqm + qt_tile,
                         mask=(offs_d[:, None] < HEAD_DIM) & m_ok[None, :], other=0.0)
            do = tl.load(do_base + tl.cast(start_m, tl.int64) * sdom + do_tile,
                         mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        m, log_sum, lse = _row_stats(max_base + offs_m, log_sum_base + offs_m, m_ok)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st, tt = _scores(k, qt, qk_scale, softcap, SOFTCAP, IEEE)  # (BLOCK_N, BLOCK_M)
        mask_ptrs = mask_cols + tl.cast(start_m, tl.int64) * smm + arange_m[None, :] * smm
        st = _apply_masks(st, mask_ptrs, n_ok[:, None] & m_ok[None, :], offs_m[None, :], offs_n[:, None], Lk,
                          win_left, win_right, MASK_KIND, CAUSAL_TILE, WINDOW)
        pt = _probabilities(st, m[None, :], log_sum[None, :], lse[None, :], MASK_KIND)
        dpt = _dot(v, tl.trans(do), IEEE)  # dP^T = V dO^T (BLOCK_N, BLOCK_M)
        if DROPOUT:
            keep = _keep(seed, rng_base + offs_m.to(tl.int64)[None, :] * Lk + offs_n[:, None], dropout_p)
            dv += _dot(tl.where(keep, pt * dropout_scale, 0.0).to(do.dtype), do, IEEE)
            dpt = tl.where(keep, dpt * dropout_scale, 0.0)
        else:
            dv += _dot(pt.to(do.dtype), do, IEEE)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE)
    return dk, dv


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv(Q, K, V, Mask, DO, Max, LogSum, Delta, DK, DV,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                   sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                   H, Hkv, GROUP, Lq, Lk, qk_scale, softcap, win_left, win_right, scale, dropout_p, dropout_scale,
                   seed, CuQ, CuK, KEnd, total_q, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                   WINDOW: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
                   VARLEN: tl.constexpr):
    """One program: dK, dV for BLOCK_N keys of one kv head, summed over its GROUP query heads in a fixed order.
    VARLEN as in _attn_fwd: DK and DV are (total_k, Hkv, .), Max, LogSum and Delta (H, total_q)."""
    pid = tl.program_id(0)
    n_nblocks = tl.cdiv(Lk, BLOCK_N)
    bhkv = (pid // n_nblocks).to(tl.int64)
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    q0, k0 = 0, 0
    if VARLEN:
        q0, k0, Lq, Lk, win_left, win_right = _sequence(CuQ, CuK, KEnd, b, win_left, win_right)
    start_n = (pid % n_nblocks) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Lk
    rows_n = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b * skb + k0 * skn + hkv * skh + rows_n * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + b * svb + k0 * svn + hkv * svh + rows_n * svn + offs_dv[None, :] * svd,
                mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    if IS_CAUSAL:
        # Queries before start_n see none of these keys; from start_n + BLOCK_N - 1 on they see all of them.
        lo = start_n // BLOCK_M * BLOCK_M
        mid = tl.minimum(lo + tl.cdiv(start_n + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M, tl.cdiv(Lq, BLOCK_M) * BLOCK_M)
        lo = tl.minimum(lo, mid)
    else:
        lo = 0
        mid = 0
    hi = Lq
    if WINDOW:  # the keys are seen by queries start_n - win_right .. start_n + BLOCK_N - 1 + win_left
        lo, hi = _window_bounds(lo, hi, start_n, start_n + BLOCK_N - 1, win_right, win_left, BLOCK_M)
        mid = tl.minimum(tl.maximum(mid, lo), hi)
    if VARLEN:  # blocks past a shorter sequence's end: nothing to read
        hi = tl.where(start_n < Lk, hi, lo)
        mid = tl.minimum(mid, hi)

    if TMA:  # one descriptor per batch for all heads: the group loop below then builds none
        q_desc = tl.make_tensor_descriptor(Q + b * sqb + q0 * sqm, shape=[H, Lq, HEAD_DIM], strides=[sqh, sqm, 1],
                                           block_shape=[1, BLOCK_M, BLOCK_D])
        do_desc = tl.make_tensor_descriptor(DO + b * sdob + q0 * sdom, shape=[H, Lq, HEAD_DIM_V],
                                            strides=[sdoh, sdom, 1],
                                            block_shape=[1, BLOCK_M, BLOCK_DV])
    else:
        q_desc = Q
        do_desc = DO
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(GROUP):
        h = hkv * GROUP + g
        bh = b * H + h
        q_base = Q + b * sqb + q0 * sqm + h * sqh
        do_base = DO + b * sdob + q0 * sdom + h * sdoh
        mask_cols = Mask + b * smb + h * smh + rows_n * smn  # (BLOCK_N, 1)
        rng_base = bh * Lq * Lk
        h32 = h.to(tl.int32)
        stat_base = h * total_q + q0 if VARLEN else bh * Lq
        row_max, log_sum, delta = Max + stat_base, LogSum + stat_base, Delta + stat_base
        if IS_CAUSAL:
            dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h32, row_max, log_sum, delta,
                                 mask_cols, offs_n, n_ok, rng_base, lo, mid, Lq, Lk, sqm, sqd, sdom, sdod, smm,
                                 qk_scale, softcap, win_left, win_right, dropout_p, dropout_scale, seed, HEAD_DIM,
                                 HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, MASK_KIND, True, WINDOW, DROPOUT, SOFTCAP,
                                 UPCAST, IEEE, TMA)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, q_desc, do_desc, h32, row_max, log_sum, delta, mask_cols,
                             offs_n, n_ok, rng_base, mid, hi, Lq, Lk, sqm, sqd, sdom, sdod, smm, qk_scale, softcap,
                             win_left, win_right, dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                             BLOCK_DV, BLOCK_M, MASK_KIND, False, WINDOW, DROPOUT, SOFTCAP, UPCAST, IEEE, TMA)

    dk = dk * scale
    tl.store(DK + b * sdkb + k0 * sdkn + hkv * sdkh + rows_n * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + b * sdvb + k0 * sdvn + hkv * sdvh + rows_n * sdvn + offs_dv[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _dq_tiles(dq, q, do, m, log_sum, lse, delta, k_base, v_base, k_desc, v_desc, mask_rows, dmask_rows, row_ok,
              offs_m, rng_rows, start, end, k_end, skn, skd, svn, svd, smn, qk_scale, softcap, win_left, win_right,
              dropout_p, dropout_scale, seed, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
              CAUSAL_TILE: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr,
              MASK_GRAD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
              EDGE: tl.constexpr):
    """Accumulate dQ (BLOCK_M, D) over key blocks [start, end), K and V through descriptors with TMA; only EDGE
    tiles may hold keys at or past k_end. With MASK_GRAD also store each tile's dS, the gradient of the float mask
    (added to the scores after the cap), in the rows dmask_rows (fp32, Lk columns each)."""
    arange_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt_tile = arange_n[None, :] * skn + offs_d[:, None] * skd  # K^T (BLOCK_D, BLOCK_N)
    vt_tile = arange_n[None, :] * svn + offs_dv[:, None] * svd  # V^T (BLOCK_DV, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + arange_n
        n_ok = _keys_ok(offs_n, k_end, EDGE)
        if TMA:
            kt = tl.trans(k_desc.load([start_n, 0]))
            vt = tl.trans(v_desc.load([start_n, 0]))
        else:
            kt = tl.load(k_base + tl.cast(start_n, tl.int64) * skn + kt_tile,
                         mask=(offs_d[:, None] < HEAD_DIM) & n_ok[None, :], other=0.0)
            vt = tl.load(v_base + tl.cast(start_n, tl.int64) * svn + vt_tile,
                         mask=(offs_dv[:, None] < HEAD_DIM_V) & n_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s, t = _scores(q, kt, qk_scale, softcap, SOFTCAP, IEEE)
        mask_ptrs = mask_rows + tl.cast(start_n, tl.int64) * smn + arange_n[None, :] * smn
        s = _apply_masks(s, mask_ptrs, row_ok[:, None] & n_ok[None, :], offs_m[:, None], offs_n[None, :], k_end,
                         win_left, win_right, MASK_KIND, CAUSAL_TILE, WINDOW, EDGE)
        p = _probabilities(s, m[:, None], log_sum[:, None], lse[:, None], MASK_KIND)
        dp = _dot(do, vt, IEEE)
        if DROPOUT:
            keep = _keep(seed, rng_rows[:, None] + offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:
            tl.store(dmask_rows + offs_n[None, :], ds, mask=row_ok[:, None] & n_ok[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    return dq


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq(Q, K, V, Mask, DO, Max, LogSum, Delta, DQ, DMask,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
                 sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
                 H, GROUP, Lq, Lk, qk_scale, softcap, win_left, win_right, scale, dropout_p, dropout_scale, seed,
                 CuQ, CuK, KEnd, total_q, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, WINDOW: tl.constexpr,
                 DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, MASK_GRAD: tl.constexpr,
                 VARLEN: tl.constexpr):
    """One program: dQ for BLOCK_M queries of one (b, h), looping over the visible key blocks; with MASK_GRAD also
    dMask (B, H, Lq, Lk) fp32 contiguous, zero where no tile stores (the launcher zeroes it). VARLEN as in
    _attn_fwd: DQ is (total_q, H, D), Max, LogSum and Delta (H, total_q)."""
    pid = tl.program_id(0)
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    mblock = n_mblocks - 1 - pid % n_mblocks
    bh = (pid // n_mblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    q0, k0 = 0, 0
    if VARLEN:
        q0, k0, Lq, Lk, win_left, win_right = _sequence(CuQ, CuK, KEnd, b, win_left, win_right)
    start_m = mblock * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + q0 * sqm + h * sqh + rows * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + b * sdob + q0 * sdom + h * sdoh + rows * sdom + offs_dv[None, :] * sdod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    stat_rows = h * total_q + q0 + offs_m if VARLEN else bh * Lq + offs_m
    m, log_sum, lse = _row_stats(Max + stat_rows, LogSum + stat_rows, row_ok)
    delta = tl.load(Delta + stat_rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + k0 * skn + hkv * skh
    v_base = V + b * svb + k0 * svn + hkv * svh
    k_desc, v_desc = _kv_descriptors(k_base, v_base, Lk, skn, svn, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV,
                                     TMA)
    mask_rows = Mask + b * smb + h * smh + rows * smm
    rng_rows = (bh * Lq + offs_m) * Lk
    dmask_rows = DMask + (bh * Lq + rows) * Lk

    # As the forward: whole blocks [lo, mid) without key tests, then the diagonal and the partial last block.
    EDGE_FIRST: tl.constexpr = MASK_KIND != 0 or DROPOUT or IEEE
    lo = 0
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    if WINDOW:  # as the forward's
        lo, hi = _window_bounds(lo, hi, start_m, start_m + BLOCK_M - 1, win_left, win_right, BLOCK_N)
    if VARLEN:  # blocks past a shorter sequence's end: nothing to read
        hi = tl.where(start_m < Lq, hi, lo)
    if IS_CAUSAL:
        mid = lo + tl.maximum(tl.minimum(hi, start_m + 1) - lo, 0) // BLOCK_N * BLOCK_N
    elif EDGE_FIRST:
        mid = hi
    else:
        mid = lo + (hi - lo) // BLOCK_N * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    SPLIT: tl.constexpr = WINDOW and not EDGE_FIRST  # [lo, mid) in three, as in the forward
    INNER_WINDOW: tl.constexpr = WINDOW and not SPLIT
    inner_lo, inner_hi = lo, mid
    if SPLIT:
        inner_lo, inner_hi = _window_inner(lo, mid, start_m, start_m + BLOCK_M - 1, win_left, win_right, BLOCK_N)
        dq = _dq_tiles(dq, q, do, m, log_sum, lse, delta, k_base, v_base, k_desc, v_desc, mask_rows, dmask_rows,
                       row_ok, offs_m, rng_rows, lo, inner_lo, hi, skn, skd, svn, svd, smn, qk_scale, softcap,
                       win_left, win_right, dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                       BLOCK_N, MASK_KIND, False, True, DROPOUT, SOFTCAP, MASK_GRAD, UPCAST, IEEE, TMA, EDGE_FIRST)
    dq = _dq_tiles(dq, q, do, m, log_sum, lse, delta, k_base, v_base, k_desc, v_desc, mask_rows, dmask_rows, row_ok,
                   offs_m, rng_rows, inner_lo, inner_hi, hi, skn, skd, svn, svd, smn, qk_scale, softcap, win_left,
                   win_right, dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N,
                   MASK_KIND, False, INNER_WINDOW, DROPOUT, SOFTCAP, MASK_GRAD, UPCAST, IEEE, TMA, EDGE_FIRST)
    if SPLIT:
        dq = _dq_tiles(dq, q, do, m, log_sum, lse, delta, k_base, v_base, k_desc, v_desc, mask_rows, dmask_rows,
                       row_ok, offs_m, rng_rows, inner_hi, mid, hi, skn, skd, svn, svd, smn, qk_scale, softcap,
                       win_left, win_right, dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV,
                       BLOCK_N, MASK_KIND, False, True, DROPOUT, SOFTCAP, MASK_GRAD, UPCAST, IEEE, TMA, EDGE_FIRST)
    dq = _dq_tiles(dq, q, do, m, log_sum, lse, delta, k_base, v_base, k_desc, v_desc, mask_rows, dmask_rows, row_ok,
                   offs_m, rng_rows, mid, hi, hi, skn, skd, svn, svd, smn, qk_scale, softcap, win_left, win_right,
                   dropout_p, dropout_scale, seed, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, MASK_KIND,
                   IS_CAUSAL, WINDOW, DROPOUT, SOFTCAP, MASK_GRAD, UPCAST, IEEE, TMA, True)
    dq = dq * scale
    tl.store(DQ + b * sdqb + q0 * sdqm + h * sdqh + rows * sdqm + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------------
# Attention weights and the dropout mask
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_weights(Q, K, Mask, Max, LogSum, W, sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smh, smm, smn,
                  H, GROUP, Lq, Lk, qk_scale, softcap, win_left, win_right,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                  WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of W (B, H, Lq, Lk) fp32 contiguous = softmax(scale * q k^T + mask), rebuilt
    from the forward's statistics."""
    pid = tl.program_id(0)
    n_mblocks = tl.cdiv(Lq, BLOCK_M)
    n_nblocks = tl.cdiv(Lk, BLOCK_N)
    start_m = pid % n_mblocks * BLOCK_M
    start_n = pid // n_mblocks % n_nblocks * BLOCK_N
    bh = (pid // n_mblocks // n_nblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Lq
    n_ok = offs_n < Lk
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    kt = tl.load(K + b * skb + hkv * skh + offs_n.to(tl.int64)[None, :] * skn + offs_d[:, None] * skd,
                 mask=(offs_d[:, None] < HEAD_DIM) & n_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    s, _ = _scores(q, kt, qk_scale, softcap, SOFTCAP, IEEE)
    mask_ptrs = Mask + b * smb + h * smh + rows * smm + offs_n.to(tl.int64)[None, :] * smn
    s = _apply_masks(s, mask_ptrs, row_ok[:, None] & n_ok[None, :], offs_m[:, None], offs_n[None, :], Lk,
                     win_left, win_right, MASK_KIND, IS_CAUSAL, WINDOW)
    m, log_sum, lse = _row_stats(Max + bh * Lq + offs_m, LogSum + bh * Lq + offs_m, row_ok)
    p = _probabilities(s, m[:, None], log_sum[:, None], lse[:, None], MASK_KIND)
    tl.store(W + (bh * Lq + rows) * Lk + offs_n[None, :], p, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(Keep, Lk, dropout_p, seed, BLOCK_N: tl.constexpr):
    """Keep (B*H*Lq, Lk) uint8: the attention kernels' dropout decisions, same counters."""
    pid = tl.program_id(0)
    n_nblocks = tl.cdiv(Lk, BLOCK_N)
    row = (pid // n_nblocks).to(tl.int64)
    offs_n = pid % n_nblocks * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, row * Lk + offs_n, dropout_p)
    tl.store(Keep + row * Lk + offs_n, keep.to(tl.uint8), mask=offs_n < Lk)


# ----------------------------------------------------------------------------------------------------------
# Configs: autotuned on GPU, one small config in the interpreter (programs run one at a time on the CPU)
# ----------------------------------------------------------------------------------------------------------
_TUNING_KEY = ["Lq", "Lk", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "WINDOW", "DROPOUT", "SOFTCAP",
               "VARLEN"]
_SMEM_BYTES = 200 * 1024  # Hopper has 227 KB per block; leave room for the compiler's own scratch
_REGS_PER_THREAD = 160    # fp32 accumulator values a thread may hold before spills become likely


def _fits(rows_tile, acc_cols, streamed_rows, streamed_cols, num_warps, num_stages, elem_bytes):
    """Whether a config's resident tile (rows_tile x acc_cols fp32 accumulator, plus the same in the input dtype)
    and its pipelined stream (num_stages x streamed_rows x streamed_cols) fit registers and shared memory."""
    smem = (rows_tile * acc_cols + num_stages * streamed_rows * streamed_cols) * elem_bytes
    regs = rows_tile * acc_cols // (num_warps * 32)
    return smem <= _SMEM_BYTES and regs <= _REGS_PER_THREAD


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel for 16-bit inputs; dkdv keeps BLOCK_N keys resident and
# streams BLOCK_M queries.
_SHAPES = {
    "fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3),
            (64, 64, 4, 4), (64, 32, 4, 2), (128, 128, 8, 2)],
    "dkdv": [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (32, 32, 4, 2),
             (16, 64, 4, 2)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2)],
}
# fp32 dots run in IEEE precision on the FMA units, whose operand layouts replicate tiles across threads: compiled
# for sm_90, the 16-bit tiles spill 30-150 KB per thread from head dim 80 on. These small tiles on 8 warps do not
# spill (BLOCK_N 32 only up to head dim 128); bench/compile_check.py measures them.
_FP32_SHAPES = {
    "fwd": [(64, 32, 8, 2), (64, 16, 8, 2)],
    "dkdv": [(32, 16, 8, 2), (16, 16, 4, 2)],
    "dq": [(64, 16, 8, 2), (64, 32, 8, 2)],
}
# A user mask or dropout adds per score a mask load or a Philox draw held in registers: past this many scores per
# thread the kernels spill on sm_90 (fwd 128 x 128 on 8 warps: 2-7 KB), so such configs are dropped then.
_MAX_SCORES_PER_THREAD = {"fwd": 32, "dq": 32, "dkdv": 16}

# The kernels can stream their inputs through tensor descriptors (Hopper's TMA copy engine) in these 16-bit
# shapes. FAST_ATTENTION_TMA: "auto" (default) lets the autotuner time them against the pointer-load configs, "1" takes
# only them wherever the inputs allow and one fits (head dims up to 128), "0" never. Read at import, like
# TRITON_INTERPRET.
TMA_MODE = os.environ.get("FAST_ATTENTION_TMA", "auto")
_TMA_SHAPES = {"fwd": [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3)],
               "dkdv": [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
               "dq": [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)]}
# What each kernel streams through descriptors: (tensor, its stride prefix, the letters of the descriptor's dims
# before the head dim: rows of one head, or heads and rows of one batch).
_TMA_READS = {"fwd": (("K", "sk", "n"), ("V", "sv", "n")), "dq": (("K", "sk", "n"), ("V", "sv", "n")),
              "dkdv": (("Q", "sq", "hm"), ("DO", "sdo", "hm"))}


def _tma_ok(kind, named) -> bool:
    """Whether the tensors `kind` streams can be read through descriptors: 16-bit, a unit head-dim stride,
    16-byte aligned base pointers and batch/head/row strides (what the copy engine requires), positive strides in
    the descriptor's own dims (a broadcast, stride-0 dim is left to pointer loads), and on a GPU sm_90 or newer
    (the interpreter emulates descriptors). A paged KV cache (PAGED) is gathered row by row: no descriptor."""
    if named.get("PAGED"):
        return False
    for name, prefix, dims in _TMA_READS[kind]:
        t = named[name]
        elem = t.element_size()
        if elem != 2 or named[prefix + "d"] != 1 or t.data_ptr() % 16:
            return False
        if any(named[prefix + dim] * elem % 16 for dim in "bh" + dims) or any(named[prefix + d] <= 0 for d in dims):
            return False
        if not INTERPRET and properties(t.device).major < 9:
            return False
    return True


def _tma_choice(kind, configs, named):
    """TMA_MODE applied: the descriptor configs go where the inputs allow them; "1" keeps only them there. The
    interpreter has nothing to time, so there "auto" means pointer loads."""
    if TMA_MODE != "0" and _tma_ok(kind, named):
        tma = [c for c in configs if c.kwargs.get("TMA")]
        if TMA_MODE == "1" and tma:
            return tma
        if not INTERPRET:
            return configs
    return [c for c in configs if not c.kwargs.get("TMA")]


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        named_args = {**named_args, **kwargs}  # the autotuner passes positional and keyword arguments apart
        offered = configs
        configs = _tma_choice(kind, configs, named_args)
        if INTERPRET:
            return configs
        d, dv = named_args["BLOCK_D"], named_args["BLOCK_DV"]
        elem = named_args["Q"].element_size()
        heavy = named_args["MASK_KIND"] != 0 or named_args["DROPOUT"]
        shapes = _FP32_SHAPES[kind] if elem == 4 else _SHAPES[kind]
        candidates = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                      in shapes]
        kept = []
        for c in candidates:
            bm, bn, w, s = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
            if elem == 4:
                ok = bn <= 16 or max(d, dv) <= 128
            elif kind == "fwd":  # resident: Q and the output accumulator; streamed: K and V blocks
                ok = _fits(bm, max(d, dv), bn, d + dv, w, s, elem)
            elif kind == "dkdv":  # resident: K, V and their gradients; streamed: Q and dO blocks
                ok = _fits(bn, d + dv, bm, d + dv, w, s, elem)
            else:  # dq: resident Q, dO and dQ; streamed: K and V blocks
                ok = _fits(bm, d + dv, bn, d + dv, w, s, elem)
            if heavy and bm * bn // (32 * w) > _MAX_SCORES_PER_THREAD[kind]:
                ok = False
            if ok:
                kept.append(c)
        if not kept and any(c.kwargs.get("TMA") for c in configs):
            # FAST_ATTENTION_TMA=1 with no descriptor config that fits (head dims over 128): the smallest of them
            # overflows shared memory or spills on sm_90 (dK/dV and dQ with a mask or dropout at head dim 256: over
            # 227 KB, and launching it would raise), so the pointer-load configs stand in.
            return prune([c for c in offered if not c.kwargs.get("TMA")], named_args)
        # The smallest pointer-load config always fits a 256 head dim; keep it if the estimate rejected everything.
        return kept or [min(candidates, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return prune


def _config(kind, bm, bn, warps, stages, tma=False):
    meta = {"BLOCK_M": bm, "BLOCK_N": bn}
    if kind in _TMA_SHAPES:
        meta["TMA"] = tma
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _configs(kind):
    """Pointer-load configs first (taken without autotuning), then the tensor-descriptor ones."""
    if INTERPRET:
        shapes = [(32, 32, 4, 1)]
        tma_shapes = shapes if kind in _TMA_SHAPES else []
    else:
        shapes = _SHAPES[kind] + [s for s in _FP32_SHAPES[kind] if s not in _SHAPES[kind]]
        tma_shapes = _TMA_SHAPES.get(kind, [])
    return [_config(kind, *s) for s in shapes] + [_config(kind, *s, tma=True) for s in tma_shapes]


def _tuning_key(kind) -> list[str]:
    return _TUNING_KEY + {"dq": ["MASK_GRAD"], "fwd": ["PAGED"]}.get(kind, [])


def _tuned(kernel, kind):
    return triton.autotune(configs=_configs(kind), key=_tuning_key(kind),
                           prune_configs_by={"early_config_prune": _prune(kind)})(kernel)


# Autotuning benchmarks every config on each new (lengths, head dims, flags, dtype) key. Off (or under the
# interpreter) the launchers take the first config the predicate keeps: a GPU test grid then compiles each kernel
# once per flag combination instead of once per config.
AUTOTUNE = not INTERPRET and os.environ.get("FAST_ATTENTION_AUTOTUNE", "1") != "0"
_KERNELS = {"fwd": (_attn_fwd, _tuned(_attn_fwd, "fwd")), "dkdv": (_attn_bwd_dkdv, _tuned(_attn_bwd_dkdv, "dkdv")),
            "dq": (_attn_bwd_dq, _tuned(_attn_bwd_dq, "dq"))}


# The autotuner keys on exact lengths, so every new Lq or Lk (each step of KV-cached generation below the decoding
# threshold, each batch of a variable-length dataset) would benchmark every config again, a second or more each
# time. The launchers tune once per power-of-two length bucket instead and reuse the winner inside the bucket.
_tuned_configs: dict[tuple, triton.Config] = {}
_tuning_lock = threading.Lock()


def _tuning_bucket(kind, named):
    key = [next_power_of_2(named[k]) if k in ("Lq", "Lk") else named[k] for k in _tuning_key(kind)]
    tma = _tma_ok(kind, named)  # a descriptor config must not be reused on unaligned inputs
    return (kind, named["Q"].dtype, named["Q"].device, tma, *key)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Kernels that build tensor descriptors need a little global scratch per program, which Triton gets from the
    allocator of triton.set_allocator: set one backed by torch's caching allocator unless the caller set their own
    (it is a context variable, so per thread: autograd's backward threads start without one)."""
    current = getattr(_triton_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _triton_allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def _launch(kind, grid, *args, fixed=False, **kwargs):
    """Launch `kind` with its autotuned config for these arguments' bucket (lengths by powers of two), or without
    autotuning the first config that fits. fixed: that first fitting config of the pointer-load ones, whatever the
    lengths and alignment, so that a packed sequence's output does not depend on its batch (num_splits=1)."""
    plain, tuned = _KERNELS[kind]
    named = dict(zip(plain.arg_names, args), **kwargs)
    if not INTERPRET and TMA_MODE != "0":
        _ensure_allocator()
    if fixed:
        c = _prune(kind)([c for c in _configs(kind) if not c.kwargs.get("TMA")], named)[0]
    elif AUTOTUNE:
        bucket = _tuning_bucket(kind, named)
        c = _tuned_configs.get(bucket)
        if c is None:
            # The autotuner keeps its call's state on itself (arguments, cache, best_config): two threads tuning at
            # once (DataParallel replicas, the per-device autograd threads) would clear each other's cache entry
            # or store each other's winner, a config pruned for another head dim, dtype or alignment.
            with _tuning_lock:
                c = _tuned_configs.get(bucket)
                if c is None:
                    # The buckets are the cache: the autotuner's own, keyed on exact lengths and blind to the
                    # descriptor check, must not answer for them.
                    tuned.cache.clear()
                    tuned[grid](*args, **kwargs)
                    _tuned_configs[bucket] = tuned.best_config
                    return
    else:
        c = _prune(kind)(_configs(kind), named)[0]
    plain[grid](*args, **kwargs, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


# Paged decoding's extra pipeline stages. Triton's pipeliner gives the block table's load a stage of its own ahead of
# the K and V loads that read through it, so a decoding tile of 3 stages kept one K/V tile fewer in flight than the
# same tile on packed keys (one against two with 16 rows, two against three with 64); two more stages keep as many,
# for at most 2 KB more shared memory (the table's buffers), so as many programs fit on an SM. Tiles of 2 stages
# (fp32 from head dim 80, 16-bit at 256) keep one K/V tile either way, and more stages only cost registers (fp32
# D128: 960-1188 bytes of spills against 828-840): they keep theirs. Read from the compiled TTGIR and ptxas, offline
# for sm_90 with triton 3.6 (the GPU machine's) and 3.9, bf16 and fp32, head dims 64, 128 and 256, 1 and 16 queries
# of a GQA group of 4 (bench/compile_check.py's paged decoding rows). Not yet timed.
PAGED_EXTRA_STAGES = 2


def _paged_stages(num_stages: int) -> int:
    """A decoding tile's num_stages for a paged KV cache (PAGED_EXTRA_STAGES)."""
    return num_stages + PAGED_EXTRA_STAGES if num_stages >= 3 else num_stages


def _decode_config(block_d, elem_bytes, group_rows, heavy):
    """Decoding's fixed tile. 16-bit inputs pack a GQA group's query rows (GROUP * Lq = group_rows) into one
    program, BLOCK_M from 16 (the smallest tl.dot M) up to 64 as the rows need and registers allow; fp32's FMA
    dots keep one head per program. The key block keeps the pipelined K and V blocks near 64 KB of shared memory
    (128 KB for fp32 at head dim 256). With a mask or dropout each score also holds a mask value or a random
    draw: such tiles stay at 16 x 64 or less. Compiled for sm_90 (bench/compile_check.py) the 16-bit ones spill
    at most 64 bytes (head dim 16); fp32 with a float mask and dropout spills 1-3 KB at head dims 80 and up."""
    pack = elem_bytes == 2
    if INTERPRET:
        return dict(BLOCK_M=16, BLOCK_N=32, TMA=False, PACK_GQA=pack, num_warps=4, num_stages=1)
    row_bytes = block_d * elem_bytes
    block_m = 16
    if pack and not heavy:
        block_m = max(16, min(next_power_of_2(group_rows), 64, 16384 // row_bytes))
    block_n = max(32, min(64 if heavy else 128, 16384 // row_bytes))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, TMA=False, PACK_GQA=pack, num_warps=4,
                num_stages=3 if row_bytes <= 256 else 2)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _block(d: int) -> int:
    return max(16, next_power_of_2(d))  # tl.dot needs K >= 16


def _mask_args(mask, q):
    """(tensor, MASK_KIND, strides): the kernels read `mask` through its strides; bool is read as bytes."""
    if mask is None:
        return q, 0, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, mask.stride()
    return mask, 2, mask.stride()


def _flags(q, mask, is_causal, dropout_p, softcap, window):
    _, kind, _ = _mask_args(mask, q)
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=_block(q.shape[-1]), IS_CAUSAL=bool(is_causal), MASK_KIND=kind,
                WINDOW=window is not None, DROPOUT=dropout_p > 0.0, SOFTCAP=softcap > 0.0,
                UPCAST=INTERPRET and q.dtype != torch.float32, IEEE=q.dtype == torch.float32)


def _score_args(scale, softcap, window, far):
    """The kernels' scalars for the scores (_scores, _apply_masks): the softmax scale and the logit cap, in base 2,
    and the window's sides, an unbounded side (-1) as `far`, which no query-key distance reaches: max(Lq, Lk), or
    with packed sequences (VARLEN) max_q + max_k, which also outreaches a side moved by Lk - Lq (_sequence)."""
    left, right = (-1, -1) if window is None else window
    return dict(qk_scale=scale * LOG2E, softcap=softcap * LOG2E, win_left=far if left < 0 else min(left, far),
                win_right=far if right < 0 else min(right, far))


def _varlen_args(q, cu_seq_q=None, cu_seq_k=None, seqused_k=None, paged=False):
    """The kernels' VARLEN arguments: packed sequences' offsets (int32, B + 1), where each sequence's keys end
    (KEnd, B: the next offset, or with seqused_k the first row past the used keys) and the packed query rows; or
    placeholders (never read) without them. paged: each sequence's keys are its pages' rows 0 .. seqused_k[b] - 1
    (_paged_args), cu_seq_k unread."""
    if cu_seq_q is None:
        return dict(CuQ=q, CuK=q, KEnd=q, total_q=0, VARLEN=False)
    if paged:
        return dict(CuQ=cu_seq_q, CuK=torch.zeros_like(cu_seq_q), KEnd=seqused_k, total_q=q.shape[0], VARLEN=True)
    ends = cu_seq_k[1:] if seqused_k is None else cu_seq_k[:-1] + seqused_k
    return dict(CuQ=cu_seq_q, CuK=cu_seq_k, KEnd=ends, total_q=q.shape[0], VARLEN=True)


def _paged_args(q, k=None, v=None, block_table=None):
    """The forward's PAGED arguments: a paged KV cache's block table (int32 (B, pages per sequence)), the page
    size and the pool's page strides; or placeholders (never read) without one."""
    if block_table is None:
        return dict(BlockTable=q, sbt=0, page_size=1, skp=0, svp=0, PAGED=False)
    return dict(BlockTable=block_table, sbt=block_table.stride(0), page_size=k.shape[1], skp=k.stride(0),
                svp=v.stride(0), PAGED=True)


def _dropout_args(dropout_p, seed):
    return dict(dropout_p=float(dropout_p), dropout_scale=1.0 / (1.0 - dropout_p), seed=int(seed))


def _num_splits(programs: int, Lk: int, device: torch.device, block_n: int) -> tuple[int, int]:
    """(splits, keys per split, a multiple of block_n): up to two programs per SM, and no more, so that every SM
    streams the same share of the cache. Rounding the split count up gave some SMs a third: on the H200, B 4 x 8
    KV heads x 9 splits = 288 programs on 132 SMs, where the 24 SMs with three went on streaming after the rest
    had finished (Lq 1 against 32K keys: 0.90x cuDNN's time). Not yet timed with 8 splits."""
    if device.type == "cuda":
        target = 2 * properties(device).multi_processor_count
    else:  # the interpreter: enough splits to exercise the merge
        target = 64
    splits = max(1, min(target // programs, cdiv(Lk, SPLIT_MIN_KEYS), MAX_SPLITS))
    keys = cdiv(cdiv(Lk, splits), block_n) * block_n
    return cdiv(Lk, keys), keys


def _pdl(device: torch.device) -> bool:
    """Whether the combine is launched as a programmatic dependent (PDL_MODE): Hopper or newer, not interpreted."""
    return PDL_MODE != "0" and not INTERPRET and device.type == "cuda" and properties(device).major >= 9


def _combine(part_out, part_max, part_log_sum, out, stats, splits, pdl, varlen=False):
    """Merge the splits: part_out (S, B, H, Lq, Dv) fp32, part_max and part_log_sum (S, B, H, Lq) -> out and the
    rows' stats (2, B, H, Lq) in place; varlen: part_out (S, total_q, H, Dv), the statistics (S, H, total_q)."""
    rows = stats[0].numel()
    H, total_q = (out.shape[1], out.shape[0]) if varlen else (1, 1)
    dv = out.shape[-1]
    block_s = max(2, next_power_of_2(splits))
    _attn_combine[(rows,)](part_out, part_max, part_log_sum, out, stats[0], stats[1], splits, part_out.stride(0),
                           part_max.stride(0), H, total_q, HEAD_DIM_V=dv, BLOCK_S=block_s,
                           CHUNK_S=min(block_s, 16), BLOCK_DV=_block(dv), VARLEN=varlen, PDL=pdl,
                           num_warps=4 if dv >= 128 else 2, launch_pdl=pdl)


def _decode_grid(B, H, Hkv, Lq, config, splits) -> int:
    """Programs of a decoding launch: (b, kv head, packed row block) or (b, head, row block), times splits."""
    if config["PACK_GQA"]:
        return B * Hkv * cdiv(H // Hkv * Lq, config["BLOCK_M"]) * splits
    return B * H * cdiv(Lq, config["BLOCK_M"]) * splits


def _split_plan(q, k, mask=None, dropout_p=0.0):
    """None for one autotuned pass over the keys; for decoding (few queries, many keys) the fixed tile config and
    (splits, keys per split)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lq > DECODE_MAX_LQ or Lk < DECODE_MIN_LK:
        return None
    heavy = mask is not None or dropout_p > 0.0
    config = _decode_config(_block(D), q.element_size(), H // Hkv * Lq, heavy)
    splits, keys = _num_splits(_decode_grid(B, H, Hkv, Lq, config, 1), Lk, q.device, config["BLOCK_N"])
    return config, splits, keys


def _forward(q, k, v, mask, is_causal, scale, softcap, window, dropout_p, seed, out, row_max, log_sum, plan=None,
             pdl=False):
    """Launch _attn_fwd writing out (B, H, Lq, Dv) and the rows' statistics, row_max and log_sum (B, H, Lq), or
    with a split plan of several splits the parts (splits, B, H, Lq, Dv) and their statistics (splits, B, H, Lq);
    pdl: the combine follows as its programmatic dependent."""
    B, H, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    mask_t, _, mask_strides = _mask_args(mask, q)
    args = (q, k, v, mask_t, out, row_max, log_sum, *q.stride(), *k.stride(), *v.stride(), *mask_strides)
    kwargs = dict(H=H, GROUP=H // Hkv, Lq=Lq, Lk=Lk, **_score_args(scale, softcap, window, max(Lq, Lk)),
                  **_dropout_args(dropout_p, seed), **_varlen_args(q), **_paged_args(q), HEAD_DIM_V=Dv,
                  BLOCK_DV=_block(Dv), **_flags(q, mask, is_causal, dropout_p, softcap, window))
    if plan is None:
        _launch("fwd", lambda meta: (cdiv(Lq, meta["BLOCK_M"]) * B * H,), *args, 0, 0, keys_per_split=Lk,
                num_splits=1, PACK_GQA=False, **kwargs)
        return
    config, splits, keys = plan
    grid = (_decode_grid(B, H, Hkv, Lq, config, splits),)
    _attn_fwd[grid](*args, B * H * Lq * Dv, B * H * Lq, keys_per_split=keys, num_splits=splits, PDL=pdl, **kwargs,
                    **config)


# ----------------------------------------------------------------------------------------------------------
# The backend interface (fast_attention/backends.py)
# ----------------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# The kernels address an element of a block as (row in block) x (row stride) + (column) x (column stride) in
# int32, rows and columns each below 256: with both strides under 2^30 / 256, each product is under 2^30 and their
# sum under 2^31. A larger stride (a sequence-first layout of a huge batch, say) could wrap around: q, k, v and dO
# are then read from a contiguous copy; a mask is not (that copy would materialize its broadcast dims), so such a
# mask is unsupported.
_MAX_TILE_STRIDE = 2**30 // MAX_HEAD_DIM
# Positions (a block start plus a block of up to 256) are int32 too: lengths up to 2^31 - 257.
MAX_LENGTH = 2**31 - 257
# With a local window the kernels add a window side (at most the longer length) to a position.
MAX_WINDOW_LENGTH = 2**30


def _tileable(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if max(map(abs, t.stride()[-2:])) >= _MAX_TILE_STRIDE else t


def unsupported(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, window=None, **_) -> str | None:
    """None when the Triton kernels can run this call, else why not."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dtype not in _DTYPES:
            return f"{name} is {t.dtype}; the Triton attention kernels take float16, bfloat16 and float32"
    for name, d in (("query/key", query.shape[-1]), ("value", value.shape[-1])):
        if d > MAX_HEAD_DIM:
            return f"the {name} head dim is {d}; the Triton attention kernels support head dims up to {MAX_HEAD_DIM}"
    if attn_mask is not None and max(map(abs, attn_mask.stride()[-2:])) >= _MAX_TILE_STRIDE:
        return (f"attn_mask has strides {attn_mask.stride()}: the Triton attention kernels take row and column "
                f"strides below {_MAX_TILE_STRIDE}")
    if max(query.shape[-2], key.shape[-2]) > MAX_LENGTH:
        return (f"the lengths are {query.shape[-2]} and {key.shape[-2]}: the Triton attention kernels count "
                f"positions in int32, up to {MAX_LENGTH}")
    if window is not None and max(query.shape[-2], key.shape[-2]) > MAX_WINDOW_LENGTH:
        return (f"the lengths are {query.shape[-2]} and {key.shape[-2]}: with window_size the Triton attention "
                f"kernels take lengths up to {MAX_WINDOW_LENGTH}")
    return None


def attention_forward(q, k, v, mask, is_causal: bool, scale: float, dropout_p: float, seed: int,
                      softcap: float = 0.0, window: tuple[int, int] | None = None):
    """q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) -> out (B, H, Lq, Dv), stats fp32 (2, B, H, Lq)."""
    q, k, v = _tileable(q), _tileable(k), _tileable(v)
    B, H, Lq, _ = q.shape
    Dv = v.shape[-1]
    out = torch.empty((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, B, H, Lq), dtype=torch.float32, device=q.device)
    plan = _split_plan(q, k, mask, dropout_p)
    if plan is None or plan[1] == 1:
        _forward(q, k, v, mask, is_causal, scale, softcap, window, dropout_p, seed, out, stats[0], stats[1], plan)
        return out, stats
    splits = plan[1]
    part_out = torch.empty((splits, B, H, Lq, Dv), dtype=torch.float32, device=q.device)
    part_max, part_log_sum = torch.empty((2, splits, B, H, Lq), dtype=torch.float32, device=q.device)
    pdl = _pdl(q.device)
    _forward(q, k, v, mask, is_causal, scale, softcap, window, dropout_p, seed, part_out, part_max, part_log_sum,
             plan, pdl)
    _combine(part_out, part_max, part_log_sum, out, stats, splits, pdl)
    return out, stats


def attention_backward(dout, q, k, v, out, stats, mask, is_causal: bool, scale: float, dropout_p: float, seed: int,
                       softcap: float = 0.0, mask_grad: bool = False, window: tuple[int, int] | None = None):
    """dout, out (B, H, Lq, Dv), stats fp32 (2, B, H, Lq) -> dq, dk, dv shaped like q, k, v (contiguous), and with
    mask_grad the float mask's gradient dS, fp32 (B, H, Lq, Lk), written by the dQ kernel."""
    dout, out, q, k, v = _tileable(dout), _tileable(out), _tileable(q), _tileable(k), _tileable(v)
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    stats = stats.contiguous()
    delta = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    block_m = 32 if INTERPRET else 64
    _attn_bwd_delta[(cdiv(Lq, block_m) * B * H,)](out, dout, delta, *out.stride(), *dout.stride(), H, Lq,
                                                  HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_DV=_block(Dv))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mask_t, _, mask_strides = _mask_args(mask, q)
    flags = dict(_flags(q, mask, is_causal, dropout_p, softcap, window), HEAD_DIM_V=Dv, BLOCK_DV=_block(Dv))
    inputs = (q, k, v, mask_t, dout, stats[0], stats[1], delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride())
    common = dict(Lq=Lq, Lk=Lk, **_score_args(scale, softcap, window, max(Lq, Lk)), scale=scale,
                  **_dropout_args(dropout_p, seed), **_varlen_args(q), **flags)
    _launch("dkdv", lambda meta: (cdiv(Lk, meta["BLOCK_N"]) * B * Hkv,),
            *inputs, dk, dv, *strides, *dk.stride(), *dv.stride(), H=H, Hkv=Hkv, GROUP=H // Hkv, **common)
    dmask = torch.zeros((B, H, Lq, Lk), dtype=torch.float32, device=q.device) if mask_grad else None
    _launch("dq", lambda meta: (cdiv(Lq, meta["BLOCK_M"]) * B * H,),
            *inputs, dq, q if dmask is None else dmask, *strides, *dq.stride(), H=H, GROUP=H // Hkv,
            MASK_GRAD=mask_grad, **common)
    return (dq, dk, dv, dmask) if mask_grad else (dq, dk, dv)


def attention_weights(q, k, stats, mask, is_causal: bool, scale: float, softcap: float = 0.0,
                      window: tuple[int, int] | None = None):
    """softmax(scale * q k^T + mask) as fp32 (B, H, Lq, Lk) (the scores capped with softcap, keys outside the
    window masked), rebuilt from the forward's stats; dead rows are 0."""
    q, k = _tileable(q), _tileable(k)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    w = torch.empty((B, H, Lq, Lk), dtype=torch.float32, device=q.device)
    mask_t, _, mask_strides = _mask_args(mask, q)
    flags = _flags(q, mask, is_causal, 0.0, softcap, window)
    del flags["DROPOUT"]
    # fp32 takes 32 x 32 tiles on 8 warps: the FMA dot of a 64 x 64 tile on 4 warps spills (sm_90, head dim >= 64).
    bm, bn, warps = (32, 32, 4) if INTERPRET else (32, 32, 8) if q.dtype == torch.float32 else (64, 64, 4)
    grid = (cdiv(Lq, bm) * cdiv(Lk, bn) * B * H,)
    stats = stats.contiguous()
    _attn_weights[grid](q, k, mask_t, stats[0], stats[1], w, *q.stride(), *k.stride(), *mask_strides, H, H // Hkv,
                        Lq, Lk, **_score_args(scale, softcap, window, max(Lq, Lk)), **flags, BLOCK_M=bm, BLOCK_N=bn,
                        num_warps=warps)
    return w


def _packed(t: torch.Tensor) -> torch.Tensor:
    """A packed (total, heads, D) tensor, copied to contiguous where a row or head stride is too large to tile."""
    return t.contiguous() if max(abs(t.stride(0)), abs(t.stride(1))) >= _MAX_TILE_STRIDE else t


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """A packed (total, heads, D) tensor's strides in the kernels' (batch, head, row, column) order: the batch
    stride is 0, as each sequence's first row (_sequence) places it."""
    return 0, t.stride(1), t.stride(0), t.stride(2)


def varlen_unsupported(query, key, value, max_q=0, max_k=0, window=None, **_) -> str | None:
    """None when the Triton kernels can run this packed-sequence call, else why not."""
    reason = unsupported(query, key, value)
    if reason is not None:
        return reason
    if max(query.shape[0], key.shape[0]) > MAX_LENGTH:
        return (f"the packed lengths are {query.shape[0]} and {key.shape[0]}: the Triton attention kernels count "
                f"positions in int32, up to {MAX_LENGTH}")
    if window is not None and max_q + max_k > MAX_WINDOW_LENGTH:
        return (f"max_q + max_k is {max_q + max_k}: with window_size the Triton attention kernels take up to "
                f"{MAX_WINDOW_LENGTH}")
    return None


def _varlen_kwargs(q, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, softcap, window, seqused_k=None,
                   paged=False) -> dict:
    """The arguments every packed-sequence launch passes alike: lengths, scores, no dropout, the offsets, flags."""
    return dict(Lq=max_q, Lk=max_k, **_score_args(scale, softcap, window, max_q + max_k), **_dropout_args(0.0, 0),
                **_varlen_args(q, cu_seq_q, cu_seq_k, seqused_k, paged), HEAD_DIM_V=v.shape[-1],
                BLOCK_DV=_block(v.shape[-1]), **_flags(q, None, False, 0.0, softcap, window))


def _paged_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """A page pool (pages, page_size, heads, D) in the kernels' (batch, head, row, column) order: the rows are a
    page's slots, the batch stride 0 (the block table places each page; its stride is passed apart)."""
    return 0, t.stride(2), t.stride(1), t.stride(3)


def varlen_forward(q, k, v, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float,
                   window: tuple[int, int] | None = None, softcap: float = 0.0, seqused_k=None, num_splits=None,
                   block_table=None):
    """Packed sequences (VARLEN): q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), sequence b's
    queries at rows cu_seq_q[b] .. cu_seq_q[b + 1] - 1 and keys likewise (int32, B + 1), or with seqused_k (int32,
    B) its first seqused_k[b] keys, at most max_q and max_k of them; the window aligned bottom-right in each
    sequence (_sequence) -> out (total_q, H, Dv), stats fp32 (2, H, total_q). Decoding splits each sequence's keys
    as the dense call's does (_varlen_split_plan; num_splits as torch's). With block_table (int32 (B, pages per
    sequence), and seqused_k) k and v are a paged cache, (pages, page_size, Hkv, .): sequence b's keys are the
    first seqused_k[b] rows of its pages block_table[b, 0], block_table[b, 1], .. (cu_seq_k unread)."""
    paged = block_table is not None
    q = _packed(q)
    # a paged row's offset is int64 (_page_rows); only the head dim's stride enters the int32 tile offsets
    k, v = (_tileable(k), _tileable(v)) if paged else (_packed(k), _packed(v))
    B = cu_seq_q.shape[0] - 1
    total_q, H, _ = q.shape
    Hkv, Dv = k.shape[-2], v.shape[-1]
    out = torch.empty((total_q, H, Dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, H, total_q), dtype=torch.float32, device=q.device)
    kv_strides = _paged_strides if paged else _packed_strides
    strides = (*_packed_strides(q), *kv_strides(k), *kv_strides(v), 0, 0, 0, 0)
    kwargs = dict(H=H, GROUP=H // Hkv, **_paged_args(q, k, v, block_table),
                  **_varlen_kwargs(q, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, softcap, window, seqused_k, paged))
    plan = _varlen_split_plan(q, Hkv, B, max_q, max_k, num_splits)
    if plan is None:
        # num_splits=1 promises a sequence the same bits in any batch: no config tuned by the batch's lengths
        _launch("fwd", lambda meta: (cdiv(max_q, meta["BLOCK_M"]) * B * H,), q, k, v, q, out, stats[0], stats[1],
                *strides, 0, 0, keys_per_split=max_k, num_splits=1, PACK_GQA=False, fixed=num_splits == 1, **kwargs)
        return out, stats
    config, splits, keys = plan
    if paged:
        config = dict(config, num_stages=_paged_stages(config["num_stages"]))
    part_out = torch.empty((splits, total_q, H, Dv), dtype=torch.float32, device=q.device)
    part_max, part_log_sum = torch.empty((2, splits, H, total_q), dtype=torch.float32, device=q.device)
    pdl = _pdl(q.device)
    grid = (_decode_grid(B, H, Hkv, max_q, config, splits),)
    _attn_fwd[grid](q, k, v, q, part_out, part_max, part_log_sum, *strides, total_q * H * Dv, H * total_q,
                    keys_per_split=keys, num_splits=splits, PDL=pdl, **kwargs, **config)
    _combine(part_out, part_max, part_log_sum, out, stats, splits, pdl, varlen=True)
    return out, stats


def _varlen_split_plan(q, Hkv: int, B: int, max_q: int, max_k: int, num_splits: int | None):
    """As _split_plan for packed sequences: None for one autotuned pass over each sequence's keys, else decoding's
    tile config (16-bit packs a GQA group's rows, up to max_q of each head, into a program) and (splits, keys per
    split). num_splits
    None splits decoding calls (max_q <= DECODE_MAX_LQ, max_k >= DECODE_MIN_LK) for a full GPU; 1 never splits,
    so a sequence's output is bitwise the same whatever the batch around it (torch's meaning); n > 1 splits the
    longest sequence's keys n ways (at most MAX_SPLITS), whatever the lengths."""
    if num_splits == 1 or max_k == 0 or num_splits is None and (max_q > DECODE_MAX_LQ or max_k < DECODE_MIN_LK):
        return None
    H, D = q.shape[1], q.shape[2]
    config = _decode_config(_block(D), q.element_size(), H // Hkv * max_q, False)
    block_n = config["BLOCK_N"]
    if num_splits is None:
        splits, keys = _num_splits(_decode_grid(B, H, Hkv, max_q, config, 1), max_k, q.device, block_n)
    else:
        keys = cdiv(cdiv(max_k, min(num_splits, MAX_SPLITS)), block_n) * block_n
        splits = cdiv(max_k, keys)
    return None if splits == 1 else (config, splits, keys)


def varlen_backward(dout, q, k, v, out, stats, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float,
                    window: tuple[int, int] | None = None, softcap: float = 0.0):
    """varlen_forward's gradients: dout, out (total_q, H, Dv), stats (2, H, total_q) -> dq, dk, dv shaped like q,
    k, v (contiguous)."""
    dout, out, q, k, v = _packed(dout), _packed(out), _packed(q), _packed(k), _packed(v)
    B = cu_seq_q.shape[0] - 1
    total_q, H, _ = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    stats = stats.contiguous()
    delta = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    block_m = 32 if INTERPRET else 64
    # Delta (h, i): the delta kernel's (batch, head, row) with one batch entry of total_q rows
    _attn_bwd_delta[(cdiv(total_q, block_m) * H,)](out, dout, delta, *_packed_strides(out), *_packed_strides(dout),
                                                   H, total_q, HEAD_DIM_V=Dv, BLOCK_M=block_m, BLOCK_DV=_block(Dv))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    inputs = (q, k, v, q, dout, stats[0], stats[1], delta)
    strides = (*_packed_strides(q), *_packed_strides(k), *_packed_strides(v), 0, 0, 0, 0, *_packed_strides(dout))
    common = dict(scale=scale, **_varlen_kwargs(q, v, cu_seq_q, cu_seq_k, max_q, max_k, scale, softcap, window))
    _launch("dkdv", lambda meta: (cdiv(max_k, meta["BLOCK_N"]) * B * Hkv,), *inputs, dk, dv, *strides,
            *_packed_strides(dk), *_packed_strides(dv), H=H, Hkv=Hkv, GROUP=H // Hkv, **common)
    _launch("dq", lambda meta: (cdiv(max_q, meta["BLOCK_M"]) * B * H,), *inputs, dq, q, *strides,
            *_packed_strides(dq), H=H, GROUP=H // Hkv, MASK_GRAD=False, **common)
    return dq, dk, dv


def dropout_mask(seed: int, p: float, B: int, H: int, Lq: int, Lk: int, device) -> torch.Tensor:
    """The kernels' dropout decisions for `seed` as bool (B, H, Lq, Lk), True = keep; for tests and debugging."""
    keep = torch.empty((B, H, Lq, Lk), dtype=torch.uint8, device=device)
    if keep.numel():
        block_n = 128 if INTERPRET else 1024
        with torch.cuda.device(keep.device) if keep.is_cuda else contextlib.nullcontext():  # Triton's launch device
            _dropout_mask_kernel[(B * H * Lq * cdiv(Lk, block_n),)](keep, Lk, float(p), int(seed), BLOCK_N=block_n)
    return keep.bool()
