"""The functional API: torch's signatures and semantics, plus `backend=` (None: the fastest backend that can run
the call on the inputs' device; see fast_attention/backends.py)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .reference import default_rms_eps
from .ops import attention as _attention
from .ops._autocast import cast_inputs
from .ops._checks import as_float
from .ops._direct import call
from .ops import norms as _norms
from .ops import softmax as _softmax
from .ops import varlen as _varlen


def softmax(input: Tensor, dim: int = -1, *, backend: str | None = None) -> Tensor:
    """torch.softmax(input, dim), computed in fp32 and returned in input's dtype (float32 under CUDA autocast, as
    torch)."""
    (input,) = cast_inputs("softmax", input)
    dim = _softmax.check(input, dim)
    name = backends.resolve("softmax", backend, input.device, input=input)
    return call(_softmax.softmax, input, dim, name)


def layer_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, *, backend: str | None = None) -> Tensor:
    """torch.nn.functional.layer_norm: normalize over the trailing `normalized_shape` dims (fp32 statistics)."""
    input, weight, bias = cast_inputs("layer_norm", input, weight, bias)
    shape = _norms.check("layer_norm", input, normalized_shape, weight, bias)
    name = backends.resolve("layer_norm", backend, input.device, input=input, weight=weight, bias=bias)
    backward = _backward_backend("layer_norm", backend, name, input, weight=weight, bias=bias)
    eps = as_float(eps, "eps", "layer_norm")
    return call(_norms.layer_norm, input, shape, weight, bias, eps, name, backward)[0]


def rms_norm(input: Tensor, normalized_shape, weight: Tensor | None = None, eps: float | None = None, *,
             backend: str | None = None) -> Tensor:
    """torch.nn.functional.rms_norm: x / sqrt(mean(x^2) + eps) * weight; eps=None means torch's default, the
    machine epsilon of the dtype the op computes in (float32 for float16/bfloat16 inputs)."""
    input, weight = cast_inputs("rms_norm", input, weight)
    shape = _norms.check("rms_norm", input, normalized_shape, weight)
    eps = default_rms_eps(input.dtype) if eps is None else as_float(eps, "eps", "rms_norm")
    name = backends.resolve("rms_norm", backend, input.device, input=input, weight=weight)
    backward = _backward_backend("rms_norm", backend, name, input, weight=weight)
    return call(_norms.rms_norm, input, shape, weight, eps, name, backward)[0]


def _backward_backend(op: str, backend: str | None, forward: str, input: Tensor, **params) -> str:
    """The backend of op's backward (backends.resolve_backward), resolved only when a gradient can flow."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, *params.values()))):
        return forward
    return backends.resolve_backward(op, backend, forward, input.device, input=input, **params)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, backend: str | None = None,
                                 sinks: Tensor | None = None, softcap: float | None = None,
                                 window_size: tuple[int, int] | None = None) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, fused: never builds the Lq x Lk matrix (on the kernel
    backends).

    query (B, H, Lq, E); key (B, Hkv, Lk, E); value (B, Hkv, Lk, Ev) -> (B, H, Lq, Ev); as torch, any rank from
    2 works too, (..., L, E), the dims before the last two broadcasting (B may be several dims or none; key
    and value with one head, Hkv = 1, serve every query head). With enable_gqa, H must be a multiple of Hkv
    and query head h attends with key/value head h // (H // Hkv).
    attn_mask: bool (True = attend) or float (added to the scores), broadcastable to (B, H, Lq, Lk).
    is_causal: top-left aligned, as torch; with Lq=2, Lk=5 the kept entries are::

        1 0 0 0 0
        1 1 0 0 0

    Rows where every key is masked give zeros (torch >= 2.5 does the same). Dropout draws its seed from torch's
    default generator, so torch.manual_seed makes it reproducible. A float attn_mask that requires grad (a learned
    position bias: T5's, Swin's) gets its gradient, dS summed over the dims it broadcasts along, from the kernels
    (written by the dQ kernel: a (B, H, Lq, Lk) float32 buffer, as large as the scores eager attention builds) or
    the reference; the CUDA kernels give none under a logit cap, so backend=None takes Triton for such a call.

    Beyond torch: sinks (H,), one learned attention sink per query head (gpt-oss), a score with no value that joins
    every row's softmax (so each row's weights sum to less than 1, and a row with every key masked still gives
    zeros); differentiable, on every backend (fast_attention/ops/attention.py). softcap c > 0 (Gemma 2's
    attn_logit_softcapping): the scores capped to c * tanh(scores / c) before the mask is applied (None or 0: no
    cap, as FlashAttention's softcap=0.0); on every backend (the CUDA kernels: not with dropout).
    window_size (left, right): local (sliding-window) attention, FlashAttention's argument: query i sees keys
    i - left .. i + right, -1 leaving that side unbounded, aligned top-left as is_causal (with Lq == Lk, the usual
    sliding window of Mistral, Gemma and gpt-oss is is_causal=True, window_size=(W - 1, -1)). It combines with
    is_causal and with attn_mask; the Triton and CUDA kernels skip the key blocks outside every window of a block
    of queries, so the work grows with Lq * window rather than Lq * Lk. On every backend (CUDA: not with dropout).

    Nested jagged tensors (torch.nested, layout=torch.jagged), (B, H, j, E) with the ragged length third, as torch
    SDPA takes them, run on varlen_attn (_jagged_attention).
    """
    if _nested(query, key, value):
        return _jagged_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend,
                                 sinks, softcap, window_size)
    return _attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, sinks, softcap,
                   window_size)[0]


def scaled_dot_product_attention_with_weights(query: Tensor, key: Tensor, value: Tensor,
                                              attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                                              is_causal: bool = False, scale: float | None = None,
                                              enable_gqa: bool = False, *, backend: str | None = None,
                                              sinks: Tensor | None = None, softcap: float | None = None,
                                              window_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Like scaled_dot_product_attention, and also the attention probabilities (before dropout) as float32
    (B, H, Lq, Lk), rebuilt tile by tile from the forward's saved row statistics. Gradients flow through them to
    query and key (and a float attn_mask that requires grad), as through torch's."""
    if _nested(query, key, value):
        raise NotImplementedError("fast_attention.scaled_dot_product_attention_with_weights: nested tensors give no "
                                  "attention weights (nor does torch); call scaled_dot_product_attention")
    out, stats, args, name = _attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend,
                                     sinks, softcap, window_size)
    q4, k4, mask, is_causal, scale, softcap, window, (query, key, value, batch, H) = args
    weights = call(_attention.attention_weights, q4, k4, stats, mask, is_causal, scale, name, sinks, softcap,
                   *window)
    shape = _attention.output_shape(query, key, value, batch, H, key.shape[-2])
    return out, weights if weights.shape == shape else weights.reshape(shape)


def varlen_attn(query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor | None, max_q: int,
                max_k: int, *, return_aux=None, scale: float | None = None, window_size: tuple[int, int] = (-1, -1),
                enable_gqa: bool = False, seqused_k: Tensor | None = None, block_table: Tensor | None = None,
                num_splits: int | None = None, backend: str | None = None, sinks: Tensor | None = None,
                softcap: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """torch.nn.attention.varlen.varlen_attn: attention over packed sequences, with autograd, on every backend (the
    CUDA kernels in float16 and bfloat16 at their head dims; backend=None takes Triton first on a GPU).

    query (total_q, H, E), key (total_k, Hkv, E), value (total_k, Hkv, Ev) -> (total_q, H, Ev): sequence b is rows
    cu_seq_q[b] .. cu_seq_q[b + 1] - 1 of query and cu_seq_k[b] .. cu_seq_k[b + 1] - 1 of key and value (int32
    offsets, B + 1 of them, from 0), max_q and max_k the longest lengths, and each sequence attends only to itself.
    window_size (left, right), -1 unbounded, aligns bottom-right in each sequence as FlashAttention's: query i sees
    keys i + (Lk - Lq) - left .. i + (Lk - Lq) + right; (-1, 0) is causal. enable_gqa: H a multiple of Hkv.
    return_aux: torch's AuxRequest; with lse=True also the natural logsumexp of each row's scores, (H, total_q)
    float32, +inf for a row with no key to see (as torch's flash kernels write it), without gradient (and
    without the sink). Beyond torch, as scaled_dot_product_attention: sinks (H,), learned attention sinks, and
    softcap, the logit cap.
    The offsets must start at 0, never decrease and end at total_q / total_k; on a GPU they are trusted, as torch
    and FlashAttention trust them (fast_attention/ops/varlen.py), on the CPU checked.
    seqused_k (B,) int32, torch's KV caches: sequence b attends to only the first seqused_k[b] of its keys (the
    window aligned to those), the rest of its rows in key and value never read; inference only, as torch's (with
    inputs that require grad it raises NotImplementedError, a RuntimeError as torch's error is).
    num_splits, as torch's: None lets the kernels split each sequence's keys over several programs where the call
    is decoding (max_q <= 16 queries, max_k >= 1024 keys; merged after, as the dense split-KV path); 1 never splits
    and takes a tile not tuned by the batch's lengths, so each sequence's output is bitwise the same whatever the
    other sequences in the batch; n > 1 splits n ways (the CUDA kernels: decoding calls only, at most n ways in
    whole tiles). The reference never splits.
    block_table (B, pages per sequence) int32, torch's paged KV caches (with seqused_k; inference only): key and
    value are then pools of pages, (pages, page_size, Hkv, E) and (.., Ev), and sequence b's keys are the first
    seqused_k[b] rows of its pages block_table[b, 0], block_table[b, 1], .. (any page size; cu_seq_k is not read
    and may be None, as in torch). Both backends' kernels gather each key's row from its page; the reference
    unpages them first.
    """
    _varlen.check_num_splits(num_splits)
    scale, sides, softcap = _varlen.check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size,
                                          enable_gqa, sinks, softcap, seqused_k, block_table)
    if cu_seq_k is None:  # with pages (check() refused it without): the op's schema takes a tensor
        cu_seq_k = cu_seq_q
    name = backends.resolve("varlen_attention", backend, query.device, query=query, key=key, value=value,
                            max_q=max_q, max_k=max_k, window=_attention.window(*sides), softcap=softcap,
                            block_table=block_table)
    out, stats = call(_varlen.varlen_attention, query, key, value, cu_seq_q, cu_seq_k, int(max_q), int(max_k),
                      scale, name, *sides, sinks, softcap, seqused_k, num_splits, block_table)
    if out.dtype != query.dtype:  # with sinks (fast_attention/ops/varlen.py)
        out = out.to(query.dtype)
    if return_aux is not None and getattr(return_aux, "lse", False):
        return out, _varlen.logsumexp(stats).to(torch.float32)
    return out


def _nested(*tensors) -> bool:
    return any(isinstance(t, Tensor) and t.is_nested for t in tensors)


def _jagged_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, sinks,
                      softcap, window_size):
    """torch SDPA on nested jagged tensors, (B, H, j, E) with a ragged length per batch entry: each entry attends on
    its own, which is varlen_attn on the packed values (total, H, E) and the nested tensors' offsets; the output is
    nested like query. As torch: no attn_mask. is_causal, which torch refuses here, and window_size, aligned
    top-left as in the dense call, where query and key share their lengths (one ragged structure: then top-left
    and varlen's bottom-right alignment agree). No dropout (the packed kernels have none)."""
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not (isinstance(t, Tensor) and t.is_nested and t.layout == torch.jagged and t.dim() == 4
                and isinstance(t.shape[1], int) and not isinstance(t.shape[2], int)):
            raise ValueError(f"fast_attention.{op}: with nested tensors, query, key and value must all be nested "
                             f"jagged tensors (layout=torch.jagged) of shape (B, H, j, E), the ragged length third "
                             f"as torch SDPA takes them; {name} is not")
    if attn_mask is not None:
        raise NotImplementedError(f"fast_attention.{op}: attn_mask with nested tensors (torch takes none either)")
    if dropout_p:
        raise NotImplementedError(f"fast_attention.{op}: dropout with nested tensors (the packed-sequence kernels "
                                  f"have no dropout)")
    packed = [t.transpose(1, 2) for t in (query, key, value)]  # (B, j, H, E): values() are (total, H, E)
    offsets_q, offsets_k = packed[0].offsets(), packed[1].offsets()
    if not torch.equal(offsets_k, packed[2].offsets()):
        raise ValueError(f"fast_attention.{op}: key and value must have the same lengths")
    window = (-1, -1) if window_size is None else window_size
    if is_causal or window != (-1, -1):
        if not (offsets_q is offsets_k or torch.equal(offsets_q, offsets_k)):
            raise NotImplementedError(f"fast_attention.{op}: is_causal or window_size with nested tensors needs query "
                                      f"and key of the same lengths (torch takes no is_causal here)")
        window = _attention.check_window(window_size, bool(is_causal))
        window = (window[0], 0 if is_causal else window[1])
    cu_q, cu_k = offsets_q.to(torch.int32), offsets_k.to(torch.int32)
    longest = [int(o.diff().max()) if o.numel() > 1 else 0 for o in (offsets_q, offsets_k)]
    out = varlen_attn(*(t.values() for t in packed), cu_q, cu_k, *longest, scale=scale, window_size=window,
                      enable_gqa=enable_gqa, backend=backend, sinks=sinks, softcap=softcap)
    return torch.nested.nested_tensor_from_jagged(out, offsets_q).transpose(1, 2)


_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument without dropout: never read, never written


def _attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend, sinks=None, softcap=None,
            window_size=None):
    attn_mask, is_causal, window_size = _attention.from_causal_bias(attn_mask, is_causal, window_size, query, key)
    query, key, value, attn_mask = cast_inputs("scaled_dot_product_attention", query, key, value, attn_mask)
    scale, batch, H = _attention.check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _attention.check_sinks(sinks, query, H)
    softcap = _attention.check_softcap(softcap)
    window = _attention.check_window(window_size, bool(is_causal))
    q, k, v, attn_mask = _attention.as_4d(query, key, value, attn_mask, batch, H)
    mask_grad = torch.is_grad_enabled() and _attention.mask_needs_grad(attn_mask)
    name = backends.resolve("scaled_dot_product_attention", backend, query.device, query=q, key=k, value=v,
                            attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, softcap=softcap,
                            mask_grad=mask_grad, window=_attention.window(*window))
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # torch's default generator: manual_seed applies
    else:
        seed = _NO_SEED  # a shared constant: a new tensor per call cost about a microsecond
    out, stats = call(_attention.scaled_dot_product_attention, q, k, v, attn_mask, float(dropout_p), bool(is_causal),
                      scale, seed, name, sinks, softcap, *window)
    if out.dtype != query.dtype:  # with sinks (fast_attention/ops/attention.py)
        out = out.to(query.dtype)
    if out.dim() != query.dim() or q is not query:
        out = out.reshape(_attention.output_shape(query, key, value, batch, H, value.shape[-1]))
    return out, stats, (q, k, attn_mask, bool(is_causal), scale, softcap, window, (query, key, value, batch, H)), name
