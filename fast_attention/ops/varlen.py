"""fast_attention::varlen_attention: attention over packed sequences (torch.nn.attention.varlen.varlen_attn, and
FlashAttention's flash_attn_varlen_func), and its backward.

Packing puts a batch of sequences of different lengths end to end, with no padding: query (total_q, H, E), key
(total_k, Hkv, E), value (total_k, Hkv, Ev); sequence b is rows cu_seq_q[b] .. cu_seq_q[b + 1] - 1 of query and
cu_seq_k[b] .. cu_seq_k[b + 1] - 1 of key and value (cu_seq_*: int32, B + 1 offsets from 0), and attends only to
itself. The kernels run one grid over (query block, sequence, head), sized by the longest sequence (max_q, max_k),
and read each sequence's offsets on the device: no padding is computed and nothing syncs with the host. Decoding
calls may split each sequence's keys over several programs (num_splits, torch's: 1 never does).

Beyond torch, as fa.scaled_dot_product_attention takes them: learned sinks, one per query head, applied around
the backend exactly as the dense op applies them (fast_attention/ops/attention.py: the output scaled by each row's
share beside the sink, the backward handed the gradient scaled likewise), and softcap, the logit cap, which the
backend applies to the scores.

A local window (left, right) aligns bottom-right in each sequence, FlashAttention's varlen convention, which
torch's varlen_attn inherits: query i of a sequence of Lq queries and Lk keys sees keys i + (Lk - Lq) - left ..
i + (Lk - Lq) + right, so (-1, 0) is causal attention and (W, 0) a causal window of W + 1 keys; with Lq == Lk (a
packed training batch) that is the usual, top-left causal mask. The statistics are (2, H, total_q), the dense ops'
format (fast_attention/ops/attention.py) with the query rows packed.

KV caches (seqused_k, torch's): sequence b uses only the first seqused_k[b] of its keys (a cache slot, allocated
longer than it is filled); its window aligns bottom-right to those keys, and the other rows of key and value are
never read. Inference only, as in torch: the backward raises. Paged caches (block_table, torch's): key and value
are pools of pages (pages, page_size, Hkv, .), and sequence b's keys are the first seqused_k[b] rows of its pages,
block_table[b, 0], block_table[b, 1], ..; cu_seq_k is not read then.

The offsets are trusted as FlashAttention and torch trust them (checking their values would sync with the host on
every call): they must start at 0, never decrease and end at total_q / total_k (every row in a sequence), and
max_q / max_k must be at least the longest sequence, and seqused_k[b] at most sequence b's keys (with pages, at
most max_k and what its pages hold, each page in the pool); the kernels write no row outside every sequence. On
CPU tensors, whose values are on the host already, the op layer checks them.
"""
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from ._checks import as_float, check_float, check_same_device
from ._direct import call
from .attention import check_sinks, check_softcap, check_window, sink_shares, window

OP = "varlen_attn"
LN2 = math.log(2)


def check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa, sinks=None,
          softcap=None, seqused_k=None, block_table=None):
    """Validate varlen_attn's arguments (torch's rules, and its messages' content); return the softmax scale, the
    window's sides (-1, -1 for none) and the logit cap (0.0 for none). With block_table cu_seq_k may be None."""
    paged = block_table is not None
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_float(name, t, OP)
        if paged and name != "query" and t.dim() != 4:
            raise ValueError(f"fast_attention.{OP}: with block_table, {name} must be a 4-D pool of pages, (pages, "
                             f"page size, heads, head dim), got shape {tuple(t.shape)}")
        if (not paged or name == "query") and t.dim() != 3:
            raise ValueError(f"fast_attention.{OP}: {name} must be 3-D, (total, heads, head dim), got shape "
                             f"{tuple(t.shape)}")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"fast_attention.{OP}: query, key and value must have the same dtype, got {query.dtype}, "
                        f"{key.dtype} and {value.dtype}")
    if paged and cu_seq_k is None:
        cu_seq_k = cu_seq_q  # unread with pages: checked as a stand-in
    for name, t in (("cu_seq_q", cu_seq_q), ("cu_seq_k", cu_seq_k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"fast_attention.{OP}: {name} must be a torch.Tensor (int32 offsets), got "
                            f"{type(t).__name__}")
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"fast_attention.{OP}: {name} must be a 1-D int32 tensor of B + 1 offsets, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    if cu_seq_q.shape != cu_seq_k.shape:
        raise ValueError(f"fast_attention.{OP}: cu_seq_q and cu_seq_k must hold the same number of offsets (B + 1), "
                         f"got {cu_seq_q.shape[0]} and {cu_seq_k.shape[0]}")
    check_same_device(OP, query=query, key=key, value=value, cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_k)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"fast_attention.{OP}: key's head dim (last dim) must equal query's, got {key.shape[-1]} "
                         f"and {query.shape[-1]}")
    if value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"fast_attention.{OP}: value must have key's rows and heads, got shapes "
                         f"{tuple(value.shape)} and {tuple(key.shape)}")
    H, Hkv = query.shape[1], key.shape[-2]
    if not enable_gqa and H != Hkv:
        raise ValueError(f"fast_attention.{OP}: query has {H} heads but key and value have {Hkv}; pass "
                         f"enable_gqa=True for grouped-query attention")
    if enable_gqa and (Hkv == 0 or H % Hkv):
        raise ValueError(f"fast_attention.{OP}: with enable_gqa the number of query heads ({H}) must be divisible "
                         f"by the number of key/value heads ({Hkv})")
    for name, n in (("max_q", max_q), ("max_k", max_k)):
        if not isinstance(n, (numbers.Integral, torch.SymInt)) or isinstance(n, bool) or n < 0:
            raise ValueError(f"fast_attention.{OP}: {name} must be an int >= 0 (the longest sequence's length), "
                             f"got {n!r}")
    if query.shape[-1] == 0 and query.numel() + key.numel() > 0 and value.shape[-1] > 0:
        raise NotImplementedError(f"fast_attention.{OP}: a head dim of 0 (every score 0) is not supported")
    if cu_seq_q.device.type == "cpu" and not torch.compiler.is_compiling():  # the values are on the host: check
        # what the kernels trust (a traced graph has no values to check)
        _check_offsets(cu_seq_q, "cu_seq_q", query.shape[0], max_q)
        if not paged:
            _check_offsets(cu_seq_k, "cu_seq_k", key.shape[0], max_k)
    if paged:
        _check_pages(block_table, seqused_k, key, cu_seq_q, max_k, query, key, value, sinks)
    elif seqused_k is not None:
        _check_used_keys(seqused_k, cu_seq_q, query, key, value, sinks)
        if seqused_k.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_used_values(seqused_k, cu_seq_k.diff(), "sequence b's keys")
    check_sinks(sinks, query, H, OP)
    softcap = check_softcap(softcap, OP)
    E = query.shape[-1]
    scale = as_float(scale, "scale", OP) if scale is not None else 1.0 / math.sqrt(E) if E else math.inf
    if window_size is None or tuple(window_size) == (-1, -1):
        return scale, (-1, -1), softcap
    return scale, check_window(window_size, False, OP), softcap


def check_num_splits(num_splits) -> None:
    """num_splits: None, or an int >= 1."""
    if num_splits is not None and (not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool)
                                   or num_splits < 1):
        raise ValueError(f"fast_attention.{OP}: num_splits must be None or an int >= 1, got {num_splits!r}")


def _check_offsets(cu: Tensor, name: str, total: int, longest: int) -> None:
    lengths = cu.diff()
    if cu[0] != 0 or bool((lengths < 0).any()) or cu[-1] != total:
        raise ValueError(f"fast_attention.{OP}: {name} must start at 0, never decrease and end at the {total} "
                         f"packed rows, got {cu.tolist()}")
    if lengths.numel() and int(lengths.max()) > longest:
        raise ValueError(f"fast_attention.{OP}: max_{name[-1]} is {longest} but {name} holds a sequence of "
                         f"{int(lengths.max())}")


# KV caches take no gradient, as torch's (whose autograd raises): a NotImplementedError is a RuntimeError as
# torch's error is.
_FOR_INFERENCE = f"fast_attention.{OP}: seqused_k is for inference (as torch's): it takes no gradient"


def _check_used_keys(seqused_k, cu_seq_q, *inputs) -> None:
    """seqused_k: int32 (B,), on cu_seq_q's device, and no input that requires grad."""
    if not isinstance(seqused_k, Tensor):
        raise TypeError(f"fast_attention.{OP}: seqused_k must be None or a torch.Tensor (int32, one per sequence), "
                        f"got {type(seqused_k).__name__}")
    B = cu_seq_q.shape[0] - 1
    if seqused_k.dtype != torch.int32 or seqused_k.shape != (B,):
        raise ValueError(f"fast_attention.{OP}: seqused_k must be int32 of shape ({B},), one count per sequence, "
                         f"got {seqused_k.dtype} of shape {tuple(seqused_k.shape)}")
    check_same_device(OP, cu_seq_q=cu_seq_q, seqused_k=seqused_k)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        raise NotImplementedError(f"{_FOR_INFERENCE}; call it under torch.no_grad() or with inputs that do not "
                                  f"require grad")


def _check_used_values(seqused_k, room, what) -> None:
    """On the CPU: seqused_k[b] in 0 .. room[b]."""
    if bool((seqused_k < 0).any()) or bool((seqused_k > room).any()):
        raise ValueError(f"fast_attention.{OP}: seqused_k[b] must be in 0 .. {what} {room.tolist()}, got "
                         f"{seqused_k.tolist()}")


def _check_pages(block_table, seqused_k, key, cu_seq_q, max_k, *inputs) -> None:
    """A paged KV cache, torch's rules: block_table int32 (B, pages per sequence) with seqused_k; on the CPU every
    page a sequence uses is in the pool, and no sequence uses more keys than its pages hold or max_k."""
    if not isinstance(block_table, Tensor):
        raise TypeError(f"fast_attention.{OP}: block_table must be None or a torch.Tensor (int32, (B, pages per "
                        f"sequence)), got {type(block_table).__name__}")
    B = cu_seq_q.shape[0] - 1
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"fast_attention.{OP}: block_table must be int32 of shape ({B}, pages per sequence), got "
                         f"{block_table.dtype} of shape {tuple(block_table.shape)}")
    if seqused_k is None:
        raise ValueError(f"fast_attention.{OP}: block_table needs seqused_k, each sequence's number of keys in its "
                         f"pages (as torch's)")
    if key.shape[1] == 0:
        raise ValueError(f"fast_attention.{OP}: key and value's pages must hold at least one row, got shape "
                         f"{tuple(key.shape)}")
    check_same_device(OP, cu_seq_q=cu_seq_q, block_table=block_table)
    _check_used_keys(seqused_k, cu_seq_q, *inputs)
    if block_table.device.type == "cpu" and not torch.compiler.is_compiling():
        page_size = key.shape[1]
        room = torch.full_like(seqused_k, min(block_table.shape[1] * page_size, max_k))
        _check_used_values(seqused_k, room, f"min(max_k, {block_table.shape[1]} pages x {page_size} rows)")
        used = torch.arange(block_table.shape[1]) < (seqused_k[:, None] + page_size - 1) // page_size
        pages = block_table[used]
        if bool((pages < 0).any()) or bool((pages >= key.shape[0]).any()):
            raise ValueError(f"fast_attention.{OP}: block_table's used entries must be pages 0 .. {key.shape[0] - 1} "
                             f"of key and value, got {pages.tolist()}")


def _empty_result(query, value):
    out = query.new_zeros(query.shape[0], query.shape[1], value.shape[-1])
    stats = query.new_zeros((2, query.shape[1], query.shape[0]), dtype=reference.compute_dtype(query))
    stats[0] = float("-inf")  # every row is dead: max -inf, log sum 0
    return out, stats


def _nothing_to_do(query, key, value, max_q, max_k) -> bool:
    return query.numel() == 0 or key.shape[0] == 0 or value.shape[-1] == 0 or max_q == 0 or max_k == 0


@torch.library.custom_op("fast_attention::varlen_attention", mutates_args=())
def varlen_attention(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int,
                     max_k: int, scale: float, backend: str, window_left: int = -1, window_right: int = -1,
                     sinks: Optional[Tensor] = None, softcap: float = 0.0, seqused_k: Optional[Tensor] = None,
                     num_splits: Optional[int] = None, block_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(out (total_q, H, Ev), stats (2, H, total_q)): see the module's docstring. With sinks the output is in
    stats' dtype, as the dense op's (fast_attention/ops/attention.py says why)."""
    if _nothing_to_do(query, key, value, max_q, max_k):
        out, stats = _empty_result(query, value)
    else:
        out, stats = backends.get(backend).varlen_forward(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                                          scale, window(window_left, window_right), softcap,
                                                          seqused_k, num_splits, block_table)
    if sinks is not None:
        out = out.to(stats.dtype) * sink_shares(stats, sinks)[0].t()[..., None]
    return out, stats


@varlen_attention.register_fake
def _(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, backend, window_left=-1, window_right=-1,
      sinks=None, softcap=0.0, seqused_k=None, num_splits=None, block_table=None):
    stats_dtype = reference.compute_dtype(query)
    return (query.new_empty(query.shape[0], query.shape[1], value.shape[-1],
                            dtype=query.dtype if sinks is None else stats_dtype),
            query.new_empty(2, query.shape[1], query.shape[0], dtype=stats_dtype))


@torch.library.custom_op("fast_attention::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                              stats: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int,
                              scale: float, backend: str, window_left: int = -1, window_right: int = -1,
                              softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    if _nothing_to_do(query, key, value, max_q, max_k):
        return query.new_zeros(query.shape), key.new_zeros(key.shape), value.new_zeros(value.shape)
    return backends.get(backend).varlen_backward(grad_out, query, key, value, out, stats, cu_seq_q, cu_seq_k, max_q,
                                                 max_k, scale, window(window_left, window_right), softcap)


@varlen_attention_backward.register_fake
def _(grad_out, query, key, value, out, stats, cu_seq_q, cu_seq_k, max_q, max_k, scale, backend, window_left=-1,
      window_right=-1, softcap=0.0):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    inputs = (*inputs, *(-1, -1, None, 0.0, None, None, None)[len(inputs) - 9:])  # keyword arguments left at defaults
    query, key, value, cu_seq_q, cu_seq_k, ctx.max_q, ctx.max_k, ctx.scale, ctx.backend = inputs[:9]
    ctx.window_left, ctx.window_right, sinks, ctx.softcap, seqused_k, _num_splits, _block_table = inputs[9:]
    if seqused_k is not None:  # the functional op refuses it sooner (_check_used_keys); a direct call gets here
        raise NotImplementedError(_FOR_INFERENCE)
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(query, key, value, cu_seq_q, cu_seq_k, out, stats, sinks)


def _backward(ctx, grad_out, _grad_stats):
    """As the dense op's: with sinks the backend gets r * dO, and each sink's gradient is -(1 - r) rowsum(dO * O)
    summed over its head's rows (fast_attention/ops/attention.py)."""
    query, key, value, cu_seq_q, cu_seq_k, out, stats, sinks = ctx.saved_tensors
    dsinks = None
    if sinks is not None:
        keep, sink_share = (share.t() for share in sink_shares(stats, sinks))  # (total_q, H)
        rows = (grad_out.to(stats.dtype) * out.to(stats.dtype)).sum(-1)
        dsinks = -(sink_share * rows).sum(0).to(sinks.dtype)
        grad_out = (grad_out * keep[..., None]).to(query.dtype)
    dq, dk, dv = call(varlen_attention_backward, grad_out, query, key, value, out, stats, cu_seq_q, cu_seq_k,
                      ctx.max_q, ctx.max_k, ctx.scale, ctx.backend, ctx.window_left, ctx.window_right, ctx.softcap)
    return dq, dk, dv, None, None, None, None, None, None, None, None, dsinks, None, None, None, None


varlen_attention.register_autograd(_backward, setup_context=_setup_context)


def logsumexp(stats: Tensor) -> Tensor:
    """The natural logsumexp of each row's scores (H, total_q), from the base-2 statistics; +inf for a row with no
    key, as torch's (FlashAttention's) kernels write it: the backward's exp(score - lse) is then 0 there."""
    return torch.where(stats[0] == float("-inf"), float("inf"), (stats[0] + stats[1]) * LN2)
