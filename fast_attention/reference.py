"""The reference: plain PyTorch for every op, readable first. It is the oracle every test compares against, and
the `"reference"` backend (any device, any dtype; it computes in float32, or float64 for float64 inputs)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------------------
# The oracle: differentiable with torch.autograd, same signatures and semantics as torch.
# ----------------------------------------------------------------------------------------------------------
def softmax(input: Tensor, dim: int = -1) -> Tensor:
    shifted = input - input.amax(dim, keepdim=True).nan_to_num(neginf=0.0)  # rows of only -inf stay NaN, as torch
    e = shifted.exp()
    return e / e.sum(dim, keepdim=True)


def layer_norm(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).square().mean(dims, keepdim=True)  # biased, as torch
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def rms_norm(input: Tensor, normalized_shape, weight=None, eps: float | None = None) -> Tensor:
    if eps is None:
        eps = default_rms_eps(input.dtype)
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    out = input * torch.rsqrt(input.square().mean(dims, keepdim=True) + eps)
    return out if weight is None else out * weight


def default_rms_eps(dtype: torch.dtype) -> float:
    """torch's rms_norm default eps: that of the dtype it computes in (float32 for half types)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, dropout_mask: Tensor | None = None,
                                 sinks: Tensor | None = None, softcap: float | None = None,
                                 window_size: tuple[int, int] | None = None) -> Tensor:
    """torch SDPA, written out. query (..., Hq, Lq, E), key (..., Hkv, Lk, E), value (..., Hkv, Lk, Ev).

    Rows where every key is masked give zeros (torch >= 2.5). `dropout_mask` (bool, broadcastable to the weights,
    True = keep) replaces the random draw, so a test can hand in the mask a kernel used. `sinks` (Hq,): each head's
    learned sink, a score with no value that joins every row's softmax, as gpt-oss's eager attention writes it.
    `softcap` c: the scores capped to c * tanh(scores / c) before the masks, as Gemma 2's eager attention does.
    `window_size` (left, right): query i sees keys i - left .. i + right (-1: no bound on that side).
    """
    return attention_and_weights(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 dropout_mask=dropout_mask, sinks=sinks, softcap=softcap, window_size=window_size)[0]


def attention_and_weights(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, *, dropout_mask: Tensor | None = None,
                          sinks: Tensor | None = None, softcap: float | None = None,
                          window_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """scaled_dot_product_attention's output and its attention weights (before dropout), (..., Lq, Lk), in the
    inputs' dtype."""
    Lq, Lk = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., Lq, Lk)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()  # top-left aligned
        scores = scores.masked_fill(~keep, float("-inf"))
    if window_size is not None:
        scores = scores.masked_fill(~window_mask(window_size, Lq, Lk, query.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)  # a float32 mask on half inputs: added in their dtype
    if sinks is not None:  # a column holding the row's head's sink: it joins the softmax and is dropped after it
        column = sinks.to(scores.dtype).reshape((-1, 1, 1)[max(0, 3 - scores.dim()):])
        scores = torch.cat((scores, column.expand(*scores.shape[:-1], 1)), -1)
    row_max = scores.amax(-1, keepdim=True)
    dead = torch.isneginf(row_max)  # every key masked: the row gives zeros
    weights = (scores - row_max.masked_fill(dead, 0.0)).exp()
    weights = weights / weights.sum(-1, keepdim=True).masked_fill(dead, 1.0)
    if sinks is not None:
        weights = weights[..., :-1]
    dropped = weights
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(weights) >= dropout_p
        dropped = weights * dropout_mask / (1.0 - dropout_p)
    return dropped @ value, weights


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q=None, max_k=None, *, scale=None,
                window_size=(-1, -1), enable_gqa=False, sinks=None, softcap=None, seqused_k=None,
                block_table=None) -> Tensor:
    """torch.nn.attention.varlen.varlen_attn, written out: packed sequences, query (total_q, H, E), key
    (total_k, Hkv, E), value (total_k, Hkv, Ev); sequence b is rows cu_seq_q[b] .. cu_seq_q[b + 1] - 1 of query
    and cu_seq_k[b] .. cu_seq_k[b + 1] - 1 of key and value, attended on its own with scaled_dot_product_attention.
    window_size (left, right) aligns bottom-right in each sequence: query i of Lq sees keys i + (Lk - Lq) - left ..
    i + (Lk - Lq) + right ((-1, 0) is causal). A sequence without keys gives zeros. max_q and max_k are unused (the
    lengths come from the offsets); seqused_k (B,): sequence b's first seqused_k[b] keys only (its Lk); with
    block_table a paged cache (unpage); sinks and softcap as scaled_dot_product_attention takes them."""
    if block_table is not None:
        key, value, cu_seq_k = unpage(key, value, block_table, seqused_k)
        seqused_k = None
    out = query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    for rows_q, _, q, k, v, mask in _packed_sequences(query, key, value, cu_seq_q, cu_seq_k, window, seqused_k):
        o = scaled_dot_product_attention(q, k, v, mask, scale=scale, enable_gqa=enable_gqa, sinks=sinks,
                                         softcap=softcap)
        out = out.index_copy(0, torch.arange(rows_q.start, rows_q.stop, device=out.device), o[0].transpose(0, 1))
    return out


def unpage(key: Tensor, value: Tensor, block_table: Tensor, seqused_k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A paged KV cache (torch's block_table) gathered into packed keys and values: key and value are pools of pages
    (pages, page_size, Hkv, .), sequence b's keys the first seqused_k[b] rows of its pages block_table[b, 0],
    block_table[b, 1], ..; returns key and value (total_k, Hkv, .) and their offsets cu_seq_k (int32, B + 1)."""
    page_size = key.shape[1]
    used = seqused_k.tolist()
    rows = [block_table[b, n // page_size].long() * page_size + n % page_size
            for b, n in enumerate(torch.arange(u, device=key.device) for u in used)]
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=key.device)
    cu_seq_k = torch.tensor([0] + used, dtype=torch.int32, device=key.device).cumsum(0, dtype=torch.int32)
    return key.flatten(0, 1)[rows], value.flatten(0, 1)[rows], cu_seq_k


def sequences(cu_seq_q: Tensor, cu_seq_k: Tensor, seqused_k: Tensor | None = None) -> list[tuple[slice, slice]]:
    """Each packed sequence's query rows and key rows (read on the host); with seqused_k (B,) the first
    seqused_k[b] of sequence b's keys."""
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    ends = ck[1:] if seqused_k is None else [start + used for start, used in zip(ck, seqused_k.tolist())]
    return [(slice(cq[b], cq[b + 1]), slice(ck[b], ends[b])) for b in range(len(cq) - 1)]


# ----------------------------------------------------------------------------------------------------------
# The backend interface (see fast_attention/backends.py): the same math, with the saved statistics.
# ----------------------------------------------------------------------------------------------------------
def unsupported(op: str, **args) -> str | None:
    return None


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32: what this backend computes in, and so (it is the one backend that
    runs float64) the dtype of every op's saved statistics (LayerNorm's mean and rstd, attention's row max and log
    sum) and of attention weights."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def softmax_forward(x: Tensor) -> Tensor:
    return torch.softmax(x.to(compute_dtype(x)), dim=-1).to(x.dtype)


def softmax_backward(y: Tensor, dy: Tensor) -> Tensor:
    y32, dy32 = y.to(compute_dtype(y)), dy.to(compute_dtype(y))
    return (y32 * (dy32 - (y32 * dy32).sum(-1, keepdim=True))).to(dy.dtype)


def layer_norm_forward(x: Tensor, weight, bias, eps: float):
    x32 = x.to(compute_dtype(x))
    mean = x32.mean(-1)
    rstd = torch.rsqrt((x32 - mean[:, None]).square().mean(-1) + eps)
    y = (x32 - mean[:, None]) * rstd[:, None]
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype), mean, rstd  # in the compute dtype


def layer_norm_backward(dy: Tensor, x: Tensor, weight, mean: Tensor, rstd: Tensor, has_bias: bool):
    ct = compute_dtype(x)
    x32, dy32 = x.to(ct), dy.to(ct)
    xhat = (x32 - mean.to(ct)[:, None]) * rstd.to(ct)[:, None]
    g = dy32 if weight is None else dy32 * weight.to(ct)
    dx = rstd.to(ct)[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = None if weight is None else (dy32 * xhat).sum(0).to(weight.dtype)
    dbias = (dy32.sum(0).to(weight.dtype if weight is not None else ct)) if has_bias else None
    return dx.to(x.dtype), dweight, dbias


def rms_norm_forward(x: Tensor, weight, eps: float):
    x32 = x.to(compute_dtype(x))
    rstd = torch.rsqrt(x32.square().mean(-1) + eps)
    y = x32 * rstd[:, None]
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype), rstd


def rms_norm_backward(dy: Tensor, x: Tensor, weight, rstd: Tensor):
    ct = compute_dtype(x)
    x32, dy32, r = x.to(ct), dy.to(ct), rstd.to(ct)[:, None]
    xhat = x32 * r
    g = dy32 if weight is None else dy32 * weight.to(ct)
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = None if weight is None else (dy32 * xhat).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dweight


def dropout_mask(seed: int, p: float, shape, device) -> Tensor:
    """The reference backend's dropout mask (True = keep): torch's CPU generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) >= p).to(device)


def _repeat_kv(t: Tensor, heads: int) -> Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _probabilities(q, k, mask, is_causal, scale, softcap, window=None):
    """P = softmax(scores) in the compute dtype (B, H, Lq, Lk), and the scores. Rows with every key masked are
    zeros. The backward and the weights compute P again this way rather than from the forward's statistics, as the
    kernels do: the oracle does not share their arithmetic."""
    s = _scores(q, k, mask, is_causal, scale, softcap, window)
    dead = torch.isneginf(s.amax(-1, keepdim=True))  # zeroed, while a NaN from the mask propagates as in torch
    return torch.softmax(s, dim=-1).masked_fill(dead, 0.0), s


def _row_stats(s: Tensor) -> Tensor:
    """The statistics the kernels save for scores s, (2, B, H, Lq): each row's max score and the log of its sum
    relative to that max, both base 2 (-inf and 0 for a row with every key masked)."""
    row_max = s.amax(-1, keepdim=True)
    dead = torch.isneginf(row_max)
    log_sum = torch.exp(s - row_max.masked_fill(dead, 0.0)).sum(-1, keepdim=True).log().masked_fill(dead, 0.0)
    # base 2; as in the kernels, a huge finite max (finfo.min * log2(e) overflows) stays finite
    max2 = torch.where(dead, row_max, (row_max / math.log(2)).clamp(min=-torch.finfo(s.dtype).max))
    return torch.stack((max2.squeeze(-1), log_sum.squeeze(-1) / math.log(2)))


def _raw_scores(q, k, scale):
    ct = compute_dtype(q)
    return (q.to(ct) @ _repeat_kv(k.to(ct), q.shape[1]).transpose(-2, -1)) * scale


def _cap_slope(q, k, scale, softcap):
    """d(c tanh(s / c)) / ds = 1 - tanh(s / c)^2: the chain rule's factor on dS under a logit cap."""
    return 1 - torch.tanh(_raw_scores(q, k, scale) / softcap).square()


def window_mask(window_size: tuple[int, int], Lq: int, Lk: int, device=None, shift: int = 0) -> Tensor:
    """bool (Lq, Lk), True where query i sees key j: i + shift - left <= j <= i + shift + right, a side of -1
    unbounded; shift 0 aligns the window top-left (as is_causal), Lk - Lq bottom-right (packed sequences)."""
    left, right = window_size
    offset = torch.arange(Lk, device=device)[None, :] - torch.arange(Lq, device=device)[:, None] - shift  # j - i
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= offset >= -left
    if right >= 0:
        keep &= offset <= right
    return keep


def _scores(q, k, mask, is_causal, scale, softcap, window=None):
    ct = compute_dtype(q)
    B, H, Lq, _ = q.shape
    s = _raw_scores(q, k, scale)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if is_causal:
        s = s.masked_fill(~torch.ones(Lq, k.shape[-2], dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if window is not None:
        s = s.masked_fill(~window_mask(window, Lq, k.shape[-2], q.device), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(ct)
    return s


def _dropout_scale(q, k, dropout_p, seed):
    """keep / (1 - p) as a (B, H, Lq, Lk) tensor, or None without dropout."""
    if dropout_p == 0.0:
        return None
    B, H, Lq, _ = q.shape
    keep = dropout_mask(seed, dropout_p, (B, H, Lq, k.shape[-2]), q.device)
    return keep.to(compute_dtype(q)) / (1.0 - dropout_p)


def attention_forward(q, k, v, mask, is_causal: bool, scale: float, dropout_p: float, seed: int,
                      softcap: float = 0.0, window: tuple[int, int] | None = None):
    p, scores = _probabilities(q, k, mask, is_causal, scale, softcap, window)
    drop = _dropout_scale(q, k, dropout_p, seed)
    if drop is not None:
        p = p * drop
    out = p @ _repeat_kv(v.to(p.dtype), q.shape[1])
    return out.to(q.dtype), _row_stats(scores)


def attention_backward(dout, q, k, v, out, stats, mask, is_causal: bool, scale: float, dropout_p: float, seed: int,
                       softcap: float = 0.0, mask_grad: bool = False, window: tuple[int, int] | None = None):
    """dS = P * (dP - rowsum(dO * O)), the FlashAttention-2 form, times the cap's slope 1 - tanh^2 with softcap;
    dropout's mask is drawn again from the seed. With mask_grad also dS (before the slope), the float mask's
    gradient (B, H, Lq, Lk)."""
    ct = compute_dtype(q)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    p, _ = _probabilities(q, k, mask, is_causal, scale, softcap, window)  # not from stats: see _probabilities
    do, o = dout.to(ct), out.to(ct)
    drop = _dropout_scale(q, k, dropout_p, seed)
    p_dropped = p if drop is None else p * drop
    dv = p_dropped.transpose(-2, -1) @ do  # (B, H, Lk, Ev)
    dp = do @ _repeat_kv(v.to(ct), H).transpose(-2, -1)
    if drop is not None:
        dp = dp * drop
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dmask = ds
    if softcap:
        ds = ds * _cap_slope(q, k, scale, softcap)
    dq = (ds @ _repeat_kv(k.to(ct), H)) * scale
    dk = (ds.transpose(-2, -1) @ q.to(ct)) * scale
    fold = lambda g: g.reshape(B, Hkv, H // Hkv, Lk, g.shape[-1]).sum(2)  # noqa: E731  (GQA: sum each group)
    grads = dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)
    return (*grads, dmask) if mask_grad else grads


def attention_weights(q, k, stats, mask, is_causal: bool, scale: float, softcap: float = 0.0,
                      window: tuple[int, int] | None = None):
    return _probabilities(q, k, mask, is_causal, scale, softcap, window)[0]  # not from stats: see _probabilities


def varlen_forward(q, k, v, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float,
                   window: tuple[int, int] | None = None, softcap: float = 0.0, seqused_k: Tensor | None = None,
                   num_splits: int | None = None, block_table: Tensor | None = None):
    """Each packed sequence through attention_forward, its window as a bottom-right aligned mask; rows outside
    every sequence, and sequences without keys, are dead rows (zeros, max -inf). A paged cache is unpaged first."""
    if block_table is not None:
        k, v, cu_seq_k = unpage(k, v, block_table, seqused_k)
        seqused_k = None
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    stats = torch.zeros((2, q.shape[1], q.shape[0]), dtype=compute_dtype(q), device=q.device)
    stats[0] = float("-inf")
    for rows_q, rows_k, q4, k4, v4, mask in _packed_sequences(q, k, v, cu_seq_q, cu_seq_k, window, seqused_k):
        o, st = attention_forward(q4, k4, v4, mask, False, scale, 0.0, 0, softcap)
        out[rows_q] = o[0].transpose(0, 1)
        stats[:, :, rows_q] = st[:, 0]
    return out, stats


def varlen_backward(dout, q, k, v, out, stats, cu_seq_q, cu_seq_k, max_q: int, max_k: int, scale: float,
                    window: tuple[int, int] | None = None, softcap: float = 0.0):
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for rows_q, rows_k, q4, k4, v4, mask in _packed_sequences(q, k, v, cu_seq_q, cu_seq_k, window):
        do4, o4 = dout[rows_q].transpose(0, 1)[None], out[rows_q].transpose(0, 1)[None]
        g = attention_backward(do4, q4, k4, v4, o4, stats[:, None, :, rows_q], mask, False, scale, 0.0, 0, softcap)
        dq[rows_q], dk[rows_k], dv[rows_k] = (t[0].transpose(0, 1) for t in g)
    return dq, dk, dv


def _packed_sequences(q, k, v, cu_seq_q, cu_seq_k, window, seqused_k=None):
    """(query rows, key rows, q, k, v as (1, heads, L, D), the window's mask or None) of each packed sequence
    that has queries and keys."""
    for rows_q, rows_k in sequences(cu_seq_q, cu_seq_k, seqused_k):
        q4, k4, v4 = (t[r].transpose(0, 1)[None] for t, r in ((q, rows_q), (k, rows_k), (v, rows_k)))
        Lq, Lk = q4.shape[2], k4.shape[2]
        if Lq and Lk:
            mask = None if window is None else window_mask(window, Lq, Lk, q.device, Lk - Lq).expand(
                1, q.shape[1], Lq, Lk)
            yield rows_q, rows_k, q4, k4, v4, mask


def attention_weights_backward(dw: Tensor, w: Tensor, q: Tensor, k: Tensor, scale: float, softcap: float = 0.0,
                               mask_grad: bool = False):
    """dQ, dK through the probabilities w = softmax(scale q k^T + mask), fp32 (B, H, Lq, Lk): the softmax gradient
    dS = w * (dw - rowsum(dw * w)) (times the cap's slope with softcap), then dQ = scale dS K and dK = scale dS^T Q
    (each GQA group summed); with mask_grad also dS itself, the float mask's gradient. Masked entries and masked
    rows have w = 0, so dS is 0 there: the mask itself is not needed."""
    ct = compute_dtype(q)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    w, dw = w.to(ct), dw.to(ct)
    ds = w * (dw - (dw * w).sum(-1, keepdim=True))
    dmask = ds
    if softcap:
        ds = ds * _cap_slope(q, k, scale, softcap)
    dq = (ds @ _repeat_kv(k.to(ct), H)) * scale
    dk = ((ds.transpose(-2, -1) @ q.to(ct)) * scale).reshape(B, Hkv, H // Hkv, Lk, q.shape[-1]).sum(2)
    return (dq.to(q.dtype), dk.to(k.dtype), dmask) if mask_grad else (dq.to(q.dtype), dk.to(k.dtype))
