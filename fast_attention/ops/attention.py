"""fast_attention::scaled_dot_product_attention (the forward saves each row's softmax statistics), its backward,
and fast_attention::attention_weights (the probabilities, rebuilt from the statistics, for need_weights=True).

The statistics, `stats` (2, B, H, Lq), float32 (float64 for float64 inputs): each query row's max score and the log
of its sum relative to that max (sum exp(s - max)), both in base 2 (log2(e) * scale * q.k + log2(e) * mask), and
kept apart: their sum, the logsumexp, cannot hold the log sum where the max is huge (a row masked with finfo.min
everywhere, whose weights torch makes uniform). A row with every key masked has max -inf and log sum 0.

Inside the ops every tensor is 4-D: query (B, H, Lq, E), key (B, Hkv, Lk, E), value (B, Hkv, Lk, Ev),
attn_mask broadcastable to (B, H, Lq, Lk); the backends get the mask expanded to that shape (stride 0, no copy).
A float mask that requires grad (a learned bias) has the gradient dS: the backward asks the backend for it
(mask_grad, a (B, H, Lq, Lk) buffer) and sums it to the mask's own shape. softcap (Gemma 2's cap c on the scores,
c * tanh(s / c), before the mask) goes to the backend as it is, and so does a local window: the ops take its sides,
window_left and window_right (query i sees keys i - left .. i + right; -1, the default, is no bound on that side),
and hand the backends `window`, (left, right) or None.

Learned attention sinks (gpt-oss), `sinks` (H,): each head's sink is a score with no value that joins every row's
softmax. With Z a row's sum of exp(score), it scales the row's probabilities by r = Z / (Z + e^sink) and takes
1 - r itself. The ops apply it around any backend, which never sees it: the forward scales the output by r; the
backward hands the backend r * dO, so that the backend's P (without the sink) and D = rowsum(r dO * O) give the
gradient of the softmax with the sink, r P (dP - rowsum(dO * O)); the sink's own gradient is
-(1 - r) rowsum(dO * O), summed over the rows of its head. `stats` stay the backend's, without the sink. With
sinks the op returns the output in stats' dtype (float32 for 16-bit inputs; the caller rounds it), and the
backward reads it so: dS is a difference, dP - D, which D from an output rounded twice (by the kernel, then after
the scaling) would miss by a few 16-bit ulps where the sink takes most of a row (seen: dK 17x torch's error).
"""
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from ._checks import as_float, check_float, check_same_device
from ._direct import call

OP = "scaled_dot_product_attention"
LOG2E = 1.0 / math.log(2)


def check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple[float, tuple, int]:
    """Validate torch SDPA's arguments; return the softmax scale and broadcast()'s batch shape and heads.

    As torch: tensors of any rank >= 2, (..., L, E); the dims before the last two broadcast across query, key and
    value, except that with enable_gqa the head dim (-3) of key and value divides query's instead."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float(name, t, OP)
        if t.dim() < 2:
            raise ValueError(f"fast_attention.{OP}: {name} must have at least 2 dims (..., L, E), got shape "
                             f"{tuple(t.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"fast_attention.{OP}: query, key and value must have the same dtype, got "
                        f"{query.dtype}, {key.dtype} and {value.dtype}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"fast_attention.{OP}: attn_mask must be a torch.Tensor or None, got "
                        f"{type(attn_mask).__name__}")
    check_same_device(OP, query=query, key=key, value=value, attn_mask=attn_mask)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"fast_attention.{OP}: key's head dim (last dim) must equal query's, got {key.shape[-1]} "
                         f"and {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"fast_attention.{OP}: value must have as many positions (dim -2) as key, got "
                         f"{value.shape[-2]} and {key.shape[-2]}")
    batch, H = broadcast(query, key, value, enable_gqa)
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):  # torch's rule
            raise TypeError(f"fast_attention.{OP}: attn_mask must be bool, float32 or query's dtype "
                            f"({query.dtype}), got {attn_mask.dtype}")
        weights_shape = output_shape(query, key, value, batch, H, key.shape[-2])
        try:
            if torch.broadcast_shapes(attn_mask.shape, weights_shape) != weights_shape:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"fast_attention.{OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to the attention weights' shape {tuple(weights_shape)}") from None
        if is_causal:
            raise ValueError(f"fast_attention.{OP}: pass either attn_mask or is_causal=True, not both (as torch)")
    dropout_p = as_float(dropout_p, "dropout_p", OP)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"fast_attention.{OP}: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 1.0:
        raise NotImplementedError(f"fast_attention.{OP}: dropout_p=1 drops every probability (the output is all "
                                  f"zeros); not supported")
    if query.shape[-1] == 0 and math.prod(batch) * H * query.shape[-2] * key.shape[-2] * value.shape[-1] > 0:
        raise NotImplementedError(f"fast_attention.{OP}: a head dim of 0 (every score 0) is not supported")
    E = query.shape[-1]  # 0 only where the output is empty: the scale is then never used
    return (as_float(scale, "scale", OP) if scale is not None else 1.0 / math.sqrt(E) if E else math.inf), batch, H


def from_causal_bias(attn_mask, is_causal, window_size, query: Tensor, key: Tensor):
    """torch's lazy causal masks, torch.nn.attention.bias.causal_upper_left / causal_lower_right (a CausalBias,
    which torch SDPA takes as attn_mask and never materializes), as the kernels' own arguments: (attn_mask,
    is_causal, window_size). Upper-left is is_causal; lower-right (query i sees keys up to i + Lk - Lq) is a window
    (left unbounded, or the caller's, right Lk - Lq or less) where Lk >= Lq, and where Lq > Lk (its first rows see
    no key: zeros) the mask CausalBias materializes. Any other attn_mask is returned as it is. A CausalBias is a
    Tensor subclass whose storage holds no mask: read as a tensor it would give a wrong answer silently."""
    if attn_mask is None or type(attn_mask) is Tensor:
        return attn_mask, is_causal, window_size
    from torch.nn.attention.bias import CausalBias, CausalVariant

    if not (isinstance(attn_mask, CausalBias) and isinstance(query, Tensor) and isinstance(key, Tensor)):
        return attn_mask, is_causal, window_size  # check() names what is wrong with the others
    Lq, Lk = query.shape[-2], key.shape[-2]
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (Lq, Lk):
        raise ValueError(f"fast_attention.{OP}: attn_mask is a CausalBias for {attn_mask.seq_len_q} queries and "
                         f"{attn_mask.seq_len_kv} keys, but query has {Lq} and key {Lk}")
    if is_causal:
        raise ValueError(f"fast_attention.{OP}: pass either attn_mask or is_causal=True, not both (as torch)")
    if attn_mask.variant == CausalVariant.UPPER_LEFT:
        return None, True, window_size
    if Lq > Lk:
        return attn_mask._materialize(query.device), False, window_size
    left, right = check_window(window_size, False)
    return None, False, (left, Lk - Lq if right < 0 else min(right, Lk - Lq))


def check_sinks(sinks, query: Tensor, H: int, op: str = OP) -> None:
    """sinks: None, or a float tensor of H elements (one per output head) on query's device."""
    if sinks is None:
        return
    check_float("sinks", sinks, op)
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"fast_attention.{op}: sinks must have shape ({H},), one per query head, got "
                         f"{tuple(sinks.shape)}")
    check_same_device(op, query=query, sinks=sinks)


def check_window(window_size, is_causal: bool, op: str = OP) -> tuple[int, int]:
    """window_size: None, or (left, right), ints >= -1 (-1: that side unbounded), FlashAttention's convention
    aligned as is_causal (top-left): query i sees keys i - left .. i + right. Returns the ops' (left, right), (-1,
    -1) for no window; with is_causal the right side adds nothing and is dropped (-1)."""
    if window_size is None:
        return -1, -1
    sides = tuple(window_size) if isinstance(window_size, (tuple, list)) else ()
    if len(sides) != 2 or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in sides):
        raise TypeError(f"fast_attention.{op}: window_size must be None or a pair of ints (left, right), got "
                        f"{window_size!r}")
    left, right = map(int, sides)
    if left < -1 or right < -1:
        raise ValueError(f"fast_attention.{op}: window_size sides must be >= 0, or -1 for no bound, got "
                         f"{window_size!r}")
    return left, -1 if is_causal else right


def window(left: int, right: int) -> Optional[tuple[int, int]]:
    """The backends' `window` from the ops' sides: None when neither bounds anything."""
    return None if left < 0 and right < 0 else (left, right)


def check_softcap(softcap, op: str = OP) -> float:
    """softcap: the cap c of c * tanh(scores / c), a positive finite number, or None or 0 for no cap (0.0 for the
    ops), as FlashAttention's softcap=0.0."""
    if softcap is None:
        return 0.0
    softcap = as_float(softcap, "softcap", op)
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"fast_attention.{op}: softcap must be a positive finite number, or None or 0 for no cap, "
                         f"got {softcap}")
    return softcap


def broadcast(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool) -> tuple[tuple, int]:
    """(batch, H): the broadcast shape of the dims before the head dim (-3), and the output's heads, which key's
    and value's heads divide (one key/value head per group of query heads): key / value with a heads dim of size 1
    serve every query head, with or without enable_gqa; a query heads dim of size 1 is shared by every key head."""
    qs, ks, vs = query.shape, key.shape, value.shape  # each .shape is a new object: read once
    H, Hk, Hv = (s[-3] if len(s) >= 3 else 1 for s in (qs, ks, vs))
    if Hk != Hv:
        raise ValueError(f"fast_attention.{OP}: key and value must have the same number of heads (dim -3), got "
                         f"{Hk} and {Hv}")
    if Hk == 0 or H == 0:
        if H != Hk:
            raise ValueError(f"fast_attention.{OP}: query has {H} heads and key and value {Hk}")
    elif enable_gqa:
        if H % Hk != 0:
            raise ValueError(f"fast_attention.{OP}: with enable_gqa the number of query heads ({H}) must be "
                             f"divisible by the number of key/value heads ({Hk})")
    elif H != Hk and Hk != 1 and H != 1:
        raise ValueError(f"fast_attention.{OP}: query has {H} heads but key and value have {Hk}; pass "
                         f"enable_gqa=True for grouped-query attention")
    if len(qs) == len(ks) == len(vs) == 4 and qs[0] == ks[0] == vs[0]:
        return (qs[0],), max(H, Hk)  # the common case, without broadcast_shapes' microseconds
    try:
        batch = torch.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
    except RuntimeError:
        raise ValueError(f"fast_attention.{OP}: the batch dims of query, key and value (before dim -3) must "
                         f"broadcast, got shapes {tuple(qs)}, {tuple(ks)} and {tuple(vs)}") from None
    return tuple(batch), max(H, Hk)


def as_4d(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], batch: tuple, H: int):
    """The ops' operands from torch SDPA's: query (B, H, Lq, E), key and value (B, Hkv, Lk, .) with B the
    product of the batch dims, and the mask broadcastable to (B, H, Lq, Lk). Views where the shapes allow: a
    broadcast batch dim keeps stride 0 (the kernels read it in place, and autograd sums its gradient); a query
    heads dim of size 1 shared by several key heads is copied out."""
    qs, ks, vs = query.shape, key.shape, value.shape
    if len(qs) == len(ks) == len(vs) == 4 and qs[0] == ks[0] == vs[0] and qs[1] == H:
        return query, key, value, attn_mask  # already so: every 4-D call but broadcast ones
    B = math.prod(batch)

    def four(t: Tensor, heads: int) -> Tensor:
        t = t.reshape((1,) * (3 - t.dim()) + tuple(t.shape)) if t.dim() < 3 else t
        return t.expand(*batch, heads, *t.shape[-2:]).reshape(B, heads, *t.shape[-2:])

    q = four(query, H)
    if len(qs) < 3 or qs[-3] != H:
        q = q.contiguous()  # a shared query head: tensor descriptors take no zero head stride
    Hkv = ks[-3] if len(ks) >= 3 else 1
    k, v = four(key, Hkv), four(value, Hkv)
    if attn_mask is not None and len(batch) > 1:
        attn_mask = attn_mask.expand(*batch, H, q.shape[-2], k.shape[-2]).reshape(B, H, q.shape[-2], k.shape[-2])
    return q, k, v, attn_mask


def output_shape(query: Tensor, key: Tensor, value: Tensor, batch: tuple, H: int, last: int) -> tuple:
    """The shape torch gives the output (last = Ev) or the attention weights (last = Lk): (*batch, H, Lq, last),
    without the head dim where every input is 2-D."""
    shape = (*batch, H, query.shape[-2], last)
    return shape[1:] if max(query.dim(), key.dim(), value.dim()) == 2 else shape


def expand_mask(attn_mask: Optional[Tensor], query: Tensor, key: Tensor) -> Optional[Tensor]:
    if attn_mask is None:
        return None
    B, H, Lq, _ = query.shape
    return attn_mask.expand(B, H, Lq, key.shape[-2])


def sink_shares(stats: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """(r, 1 - r) per row (B, H, Lq), in stats' dtype: the share of a row's softmax its keys keep beside their
    head's sink, and the sink's share, as sigmoids of x = sink - log Z, exact where r or 1 - r is tiny. A row with
    every key masked (max -inf) gives (0, 1): its output stays zero, as in eager attention with sinks."""
    row_max, log_sum = stats  # base 2
    x = ((sinks.to(stats.dtype)[:, None] * LOG2E - row_max) - log_sum) * math.log(2)
    return torch.sigmoid(-x), torch.sigmoid(x)


def _empty_result(query, key, value):
    B, H, Lq, _ = query.shape
    out = query.new_zeros(B, H, Lq, value.shape[-1])
    stats = query.new_zeros((2, B, H, Lq), dtype=reference.compute_dtype(query))
    stats[0] = float("-inf")  # every row is dead: max -inf, log sum 0
    return out, stats


@torch.library.custom_op("fast_attention::scaled_dot_product_attention", mutates_args=())
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                                 dropout_p: float, is_causal: bool, scale: float, seed: Tensor,
                                 backend: str, sinks: Optional[Tensor] = None, softcap: float = 0.0,
                                 window_left: int = -1, window_right: int = -1) -> tuple[Tensor, Tensor]:
    if query.numel() == 0 or key.shape[-2] == 0 or value.shape[-1] == 0:
        return _empty_result(query, key, value)
    out, stats = backends.get(backend).attention_forward(query, key, value, expand_mask(attn_mask, query, key),
                                                         is_causal, scale, dropout_p, int(seed), softcap,
                                                         window(window_left, window_right))
    if sinks is not None:  # in stats' dtype: see the module's docstring
        out = out.to(stats.dtype) * sink_shares(stats, sinks)[0][..., None]
    return out, stats


@scaled_dot_product_attention.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, seed, backend, sinks=None, softcap=0.0,
      window_left=-1, window_right=-1):
    B, H, Lq, _ = query.shape
    stats_dtype = reference.compute_dtype(query)
    return (query.new_empty(B, H, Lq, value.shape[-1], dtype=query.dtype if sinks is None else stats_dtype),
            query.new_empty(2, B, H, Lq, dtype=stats_dtype))


@torch.library.custom_op("fast_attention::scaled_dot_product_attention_backward", mutates_args=())
def scaled_dot_product_attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                                          stats: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                                          scale: float, seed: Tensor, backend: str, softcap: float = 0.0,
                                          mask_grad: bool = False, window_left: int = -1, window_right: int = -1
                                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dQ, dK, dV, and with mask_grad the float mask's gradient, dS (B, H, Lq, Lk) in stats' dtype (else an empty
    tensor: an op's outputs cannot be None)."""
    if query.numel() == 0 or key.shape[-2] == 0 or value.shape[-1] == 0:
        return (query.new_zeros(query.shape), key.new_zeros(key.shape), value.new_zeros(value.shape),
                _mask_grad_like(query, key, stats, mask_grad, torch.zeros))
    grads = backends.get(backend).attention_backward(grad_out, query, key, value, out, stats,
                                                     expand_mask(attn_mask, query, key), is_causal, scale,
                                                     dropout_p, int(seed), softcap, mask_grad,
                                                     window(window_left, window_right))
    return (*grads, stats.new_empty(0)) if not mask_grad else grads


def _mask_grad_like(query, key, stats, mask_grad, make):
    B, H, Lq, _ = query.shape
    return make((B, H, Lq, key.shape[-2]) if mask_grad else (0,), dtype=stats.dtype, device=stats.device)


@scaled_dot_product_attention_backward.register_fake
def _(grad_out, query, key, value, out, stats, attn_mask, dropout_p, is_causal, scale, seed, backend, softcap=0.0,
      mask_grad=False, window_left=-1, window_right=-1):
    # contiguous whatever the inputs' strides, as every backend returns them
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            _mask_grad_like(query, key, stats, mask_grad, torch.empty))


def _setup_context(ctx, inputs, output):
    inputs = (*inputs, *(None, 0.0, -1, -1)[len(inputs) - 9:])  # the keyword arguments a caller left at defaults
    query, key, value, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed, ctx.backend, sinks = inputs[:10]
    ctx.softcap, ctx.window_left, ctx.window_right = inputs[10:]
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(query, key, value, attn_mask, out, stats, seed, sinks)


def _backward(ctx, grad_out, _grad_stats):
    query, key, value, attn_mask, out, stats, seed, sinks = ctx.saved_tensors
    dsinks = None
    if sinks is not None:  # see the module's docstring
        keep, sink_share = sink_shares(stats, sinks)
        rows = (grad_out.to(stats.dtype) * out.to(stats.dtype)).sum(-1)
        dsinks = -(sink_share * rows).sum((0, 2)).to(sinks.dtype)
        grad_out = (grad_out * keep[..., None]).to(query.dtype)
    mask_grad = mask_needs_grad(attn_mask)
    dq, dk, dv, dmask = call(scaled_dot_product_attention_backward, grad_out, query, key, value, out, stats,
                             attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed, ctx.backend, ctx.softcap,
                             mask_grad, ctx.window_left, ctx.window_right)
    dmask = dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    return dq, dk, dv, dmask, None, None, None, None, None, dsinks, None, None, None


def mask_needs_grad(attn_mask: Optional[Tensor]) -> bool:
    """Whether the mask's gradient is wanted: a float mask that requires grad (a learned position bias: T5's,
    Swin's), whose gradient is dS, summed over the dims along which it broadcasts."""
    return attn_mask is not None and attn_mask.requires_grad and attn_mask.is_floating_point()


scaled_dot_product_attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fast_attention::attention_weights", mutates_args=())
def attention_weights(query: Tensor, key: Tensor, stats: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                      scale: float, backend: str, sinks: Optional[Tensor] = None, softcap: float = 0.0,
                      window_left: int = -1, window_right: int = -1) -> Tensor:
    """softmax(scale * q k^T + mask) as float32 (float64 for float64 inputs) (B, H, Lq, Lk), from the forward's
    statistics; masked rows are 0. With sinks, the keys' shares of the softmax with the sink; with softcap, of the
    capped scores; with a window, keys outside it are masked."""
    B, H, Lq, _ = query.shape
    if query.numel() == 0 or key.shape[-2] == 0:
        return query.new_zeros(B, H, Lq, key.shape[-2], dtype=reference.compute_dtype(query))
    weights = backends.get(backend).attention_weights(query, key, stats, expand_mask(attn_mask, query, key),
                                                      is_causal, scale, softcap, window(window_left, window_right))
    return weights if sinks is None else weights * sink_shares(stats, sinks)[0].to(weights.dtype)[..., None]


@attention_weights.register_fake
def _(query, key, stats, attn_mask, is_causal, scale, backend, sinks=None, softcap=0.0, window_left=-1,
      window_right=-1):
    B, H, Lq, _ = query.shape
    return query.new_empty(B, H, Lq, key.shape[-2], dtype=reference.compute_dtype(query))


@torch.library.custom_op("fast_attention::attention_weights_backward", mutates_args=())
def attention_weights_backward(grad_weights: Tensor, weights: Tensor, query: Tensor, key: Tensor,
                               scale: float, softcap: float = 0.0, mask_grad: bool = False
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """dQ and dK through the probabilities, and with mask_grad the float mask's gradient dS (else an empty tensor).
    One implementation serves every backend: two matmuls on the (B, H, Lq, Lk) weights, which need_weights has
    materialized already."""
    grads = reference.attention_weights_backward(grad_weights, weights, query, key, scale, softcap, mask_grad)
    return grads if mask_grad else (*grads, weights.new_empty(0))


@attention_weights_backward.register_fake
def _(grad_weights, weights, query, key, scale, softcap=0.0, mask_grad=False):
    # contiguous, as the matmuls give them
    return query.new_empty(query.shape), key.new_empty(key.shape), weights.new_empty(weights.shape if mask_grad else 0)


def _weights_setup_context(ctx, inputs, output):
    inputs = (*inputs, *(None, 0.0, -1, -1)[len(inputs) - 7:])  # the keyword arguments a caller left at defaults
    query, key, stats, attn_mask, _is_causal, ctx.scale, _backend, sinks, ctx.softcap = inputs[:9]
    ctx.save_for_backward(query, key, output, stats, attn_mask, sinks)


def _weights_backward(ctx, grad_weights):
    """The softmax's gradient holds with a sink, whose column has no gradient of its own; the sink's is
    -(1 - r) rowsum(dW * W) (see the module's docstring)."""
    query, key, weights, stats, attn_mask, sinks = ctx.saved_tensors
    mask_grad = mask_needs_grad(attn_mask)
    dq, dk, dmask = call(attention_weights_backward, grad_weights, weights, query, key, ctx.scale, ctx.softcap,
                         mask_grad)
    dmask = dmask.sum_to_size(attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    dsinks = None
    if sinks is not None:
        rows = (grad_weights.to(weights.dtype) * weights).sum(-1)
        dsinks = -(sink_shares(stats, sinks)[1] * rows).sum((0, 2)).to(sinks.dtype)
    return dq, dk, None, dmask, None, None, None, dsinks, None, None, None


attention_weights.register_autograd(_weights_backward, setup_context=_weights_setup_context)
