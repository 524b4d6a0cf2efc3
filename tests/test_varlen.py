"""fa.varlen_attn: attention over packed sequences (torch.nn.attention.varlen.varlen_attn), against the float64
reference (each sequence through scaled_dot_product_attention) under the 2x-torch's-error rule."""
import inspect
import math

import pytest
import torch

import fast_attention as fa
from fast_attention import reference as ref
from tolerance import FLOOR, assert_close

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TRITON = "triton" in fa.available_backends()
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
gpu_only = pytest.mark.skipif(not GPU, reason="the full grid needs a GPU (the interpreter is too slow for it)")


class LSE:  # torch's AuxRequest(lse=True), without importing torch.nn.attention.varlen (torch >= 2.9)
    lse = True


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _packed(total, heads, D, dtype, strided=False):
    """A fresh random leaf (total, heads, D); strided: a view of every other head-dim-sized slot of a wider buffer,
    so neither its rows nor its heads are contiguous."""
    if strided:
        return torch.randn(total, heads, 2 * D, device=DEVICE, dtype=dtype)[..., D:].requires_grad_()
    return torch.randn(total, heads, D, device=DEVICE, dtype=dtype, requires_grad=True)


def _torch_varlen(dtype):
    """torch's own varlen_attn where it runs (flash kernels: CUDA, 16-bit) and takes our arguments (window_size and
    enable_gqa came in torch 2.10), else None."""
    if not GPU or dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if {"window_size", "enable_gqa"} <= set(inspect.signature(varlen_attn).parameters) else None


def _lse_reference(q, k, cu_q, cu_k, scale, window, softcap=None):
    """The natural logsumexp of each row's scores (H, total_q) in float64 (capped with softcap; the sinks are not
    among them), +inf for a row with no key (torch's)."""
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for rows_q, rows_k in ref.sequences(cu_q, cu_k):
        qs, ks = q[rows_q].double().transpose(0, 1), k[rows_k].double().transpose(0, 1)
        ks = ks.repeat_interleave(qs.shape[0] // max(ks.shape[0], 1), 0)
        s = qs @ ks.transpose(-2, -1) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        if window != (-1, -1):
            keep = ref.window_mask(window, qs.shape[1], ks.shape[1], q.device, ks.shape[1] - qs.shape[1])
            s = s.masked_fill(~keep, float("-inf"))
        lse[:, rows_q] = torch.logsumexp(s, -1) if s.shape[-1] else float("-inf")
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _check_lse(lse, expected):
    """Our logsumexp (H, total_q) float32 against the float64 one: the same rows without keys (+inf), the others
    close."""
    assert lse.shape == expected.shape and lse.dtype == torch.float32
    dead = torch.isposinf(expected)
    assert torch.equal(torch.isposinf(lse), dead) and torch.isfinite(lse[~dead]).all()
    torch.testing.assert_close(lse[~dead].double(), expected[~dead], atol=1e-4, rtol=1e-5)


def _backward(out, grad):
    """out.backward(grad), where out depends on the inputs: the formula written out gives constant zeros where no
    sequence has both queries and keys."""
    if out.requires_grad:
        out.backward(grad)


def _grad(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)


def check_varlen(backend, lengths_q, lengths_k, H, Hkv, D, dtype, window=(-1, -1), scale=None, strided=False,
                 sinks=False, softcap=None, num_splits=None):
    """Ours vs the same-dtype baseline (torch's varlen_attn where it runs, else the reference written out in the
    inputs' dtype) vs the float64 reference: the output, the logsumexp and the three gradients (and with sinks,
    learned sinks and theirs). num_splits goes to our call only."""
    cu_q, cu_k = _offsets(lengths_q), _offsets(lengths_k)
    max_q, max_k = max(lengths_q), max(lengths_k)
    q, k, v = (_packed(sum(lengths_q), H, D, dtype, strided), _packed(sum(lengths_k), Hkv, D, dtype, strided),
               _packed(sum(lengths_k), Hkv, D, dtype, strided))
    kwargs = dict(scale=scale, window_size=window, enable_gqa=H != Hkv)
    beyond = dict(softcap=softcap)
    leaves = (q, k, v)
    if sinks:
        beyond["sinks"] = torch.randn(H, device=DEVICE, requires_grad=True)
        leaves += (beyond["sinks"],)
    out, lse = fa.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=LSE(), backend=backend, **kwargs,
                              num_splits=num_splits, **beyond)
    grad = torch.randn_like(out)
    out.backward(grad)

    # in the inputs' dtype, the sinks too (as the dense tests' baseline), and contiguous: torch's kernels want that
    same = [t.detach().to(dtype).clone().requires_grad_() for t in leaves]
    theirs = _torch_varlen(dtype) if not (sinks or softcap) else None
    t_lse = None
    if theirs is not None:
        t_out, t_lse = theirs(*same, cu_q, cu_k, max_q, max_k, return_aux=LSE(), **kwargs)
    else:
        t_out = ref.varlen_attn(*same[:3], cu_q, cu_k, **kwargs, **dict(beyond, sinks=same[3] if sinks else None))
    _backward(t_out, grad)
    oracle = [t.detach().double().requires_grad_() for t in leaves]
    r_out = ref.varlen_attn(*oracle[:3], cu_q, cu_k, **kwargs, **dict(beyond, sinks=oracle[3] if sinks else None))
    _backward(r_out, grad.double())

    assert out.dtype == q.dtype and out.shape == (q.shape[0], H, D)
    if theirs is not None:  # torch's semantics are the oracle's (the windows' alignment among them)
        torch.testing.assert_close(t_out.double(), r_out, atol=4 * FLOOR[dtype] * max(1.0, r_out.abs().max()), rtol=0)
    assert_close(out, t_out, r_out, "output")
    for name, ours, base, exact in zip(("dq", "dk", "dv", "dsinks"), leaves, same, oracle):
        assert_close(ours.grad, _grad(base), _grad(exact), name)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    expected_lse = _lse_reference(q, k, cu_q, cu_k, scale, window, softcap)
    _check_lse(lse, expected_lse)
    if t_lse is not None:  # torch's: the rows without keys +inf there too
        _check_lse(t_lse.float(), expected_lse)
    return q, k, v, out


# Sequences of 1 query, none, no keys, Lq > Lk and Lq < Lk, and two longer than the interpreter's 32-row tiles;
# windows: none, causal (-1, 0), a causal window, two-sided, one key.
VARLEN_CASES = [
    ((-1, -1), torch.float32, 2), ((-1, 0), torch.float16, 1), ((5, 0), torch.bfloat16, 2),
    ((3, 2), torch.float32, 1), ((0, 0), torch.float16, 2), ((-1, 0), torch.float32, 2),
]


@pytest.mark.parametrize("window,dtype,Hkv", VARLEN_CASES)
def test_varlen(backend, window, dtype, Hkv):
    check_varlen(backend, [17, 1, 0, 45, 6, 3], [17, 4, 5, 38, 0, 9], 2, Hkv, 16, dtype, window)


@pytest.mark.parametrize("sinks,softcap,window,dtype", [(True, None, (-1, 0), torch.float32),
                                                        (False, 1.5, (4, 0), torch.float16),
                                                        (True, 0.8, (-1, -1), torch.bfloat16)])
def test_varlen_sinks_and_softcap(backend, sinks, softcap, window, dtype):
    """Beyond torch, as the dense op: learned sinks (their gradient too) and the logit cap, with and without a
    window; sequences without keys keep zeros beside a sink."""
    check_varlen(backend, [17, 1, 0, 40, 6], [17, 4, 5, 33, 0], 4, 2, 16, dtype, window, sinks=sinks,
                 softcap=softcap)


def test_varlen_training_batch(backend):
    """Packed training: every sequence's queries are its keys (Lq == Lk, the causal mask top-left and bottom-right
    at once), as the dense causal op on each sequence alone gives."""
    lengths = [33, 1, 20, 7]
    q, k, v, out = check_varlen(backend, lengths, lengths, 2, 2, 24, torch.float32, (-1, 0), scale=0.3)
    for rows, _ in ref.sequences(_offsets(lengths), _offsets(lengths)):
        dense = fa.scaled_dot_product_attention(*(t[rows].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                                scale=0.3, backend=backend)
        torch.testing.assert_close(out[rows], dense.transpose(0, 1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_varlen_sequences_are_independent(backend):
    """A sequence's output and gradients do not depend on the other sequences' values, bit for bit (the kernels
    read only their own sequence's rows), whatever its neighbours hold, NaN included."""
    if backend not in fa.available_backends():
        pytest.skip(f"the {backend} backend is not available here")
    lengths_q, lengths_k = [40, 7, 33], [35, 50, 2]
    cu_q, cu_k = _offsets(lengths_q), _offsets(lengths_k)
    q, k, v = (_packed(sum(n), 2, 16, torch.float16) for n in (lengths_q, lengths_k, lengths_k))
    out = fa.varlen_attn(q, k, v, cu_q, cu_k, 40, 50, window_size=(-1, 0), backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rows_q, rows_k = slice(40, 47), slice(35, 85)  # the middle sequence
    with torch.no_grad():
        others = [t.detach().clone() for t in (q, k, v)]
        for t, rows in zip(others, (rows_q, rows_k, rows_k)):
            keep = t[rows].clone()
            t.fill_(float("nan"))
            t[rows] = keep
    others = [t.requires_grad_() for t in others]
    again = fa.varlen_attn(*others, cu_q, cu_k, 40, 50, window_size=(-1, 0), backend=backend)
    grads_again = torch.autograd.grad(again, others, dout)
    assert torch.equal(again[rows_q], out[rows_q])
    for g, h, rows in zip(grads, grads_again, (rows_q, rows_k, rows_k)):
        assert torch.equal(g[rows], h[rows])


@pytest.mark.parametrize("window,dtype,num_splits", [((-1, 0), torch.float32, None), ((-1, -1), torch.float16, 2),
                                                     ((4, 0), torch.bfloat16, 3)])
def test_varlen_kv_cache(backend, window, dtype, num_splits):
    """torch's seqused_k: each sequence's keys sit in a cache slot longer than they fill (decoding: a few queries
    after many keys); only the used keys count, the window aligns to them, and the slots' unused rows (NaN here)
    are never read, split-KV (num_splits) or not. The oracle is the plain call on the used keys packed end to
    end."""
    if backend == "cuda":
        dtype = torch.float16 if dtype == torch.float32 else dtype
    lengths_q, slots, used = [1, 1, 3, 0, 20, 2], [40, 6, 50, 10, 30, 8], [33, 0, 50, 7, 25, 8]
    H, Hkv, D = 4, 2, 16
    cu_q, cu_k, cu_used = _offsets(lengths_q), _offsets(slots), _offsets(used)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lengths_q), H, D, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(sum(slots), Hkv, D, device=DEVICE, dtype=dtype) for _ in range(2))
    rows = torch.cat([torch.arange(s, s + n) for s, n in zip(cu_k.tolist(), used)]).to(DEVICE)
    unused = torch.ones(k.shape[0], dtype=torch.bool, device=DEVICE).index_fill(0, rows, False)
    k[unused], v[unused] = float("nan"), float("nan")
    kwargs = dict(window_size=window, enable_gqa=True)

    out, lse = fa.varlen_attn(q, k, v, cu_q, cu_k, max(lengths_q), max(slots), return_aux=LSE(),
                              seqused_k=seqused_k, num_splits=num_splits, backend=backend, **kwargs)
    theirs = _torch_varlen(dtype)
    if theirs is not None and "seqused_k" in inspect.signature(theirs).parameters:
        base = theirs(q, k, v, cu_q, cu_k, max(lengths_q), max(slots), seqused_k=seqused_k, **kwargs)
    else:
        base = ref.varlen_attn(q, k[rows], v[rows], cu_q, cu_used, **kwargs)
    exact = ref.varlen_attn(q.double(), k[rows].double(), v[rows].double(), cu_q, cu_used, **kwargs)
    assert torch.equal(ref.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_k, seqused_k=seqused_k,
                                       **kwargs), exact)
    assert_close(out, base, exact, "output")
    _check_lse(lse, _lse_reference(q, k[rows], cu_q, cu_used, 1 / math.sqrt(D), window))


def _pages(k, v, used, page_size, spare=2):
    """Packed keys and values (total, Hkv, .) of sequences of `used` rows copied into pools of pages of page_size
    rows, in a random order among spare pages: the pools (pages, page_size, Hkv, .), NaN wherever no key was
    copied, the value pool a view of every other head-dim-sized slot of a wider buffer (so the two page strides
    differ), and the block table (int32, (B, the most pages a sequence uses + 1)), whose entries past a sequence's
    pages point at a NaN page."""
    counts = [-(-n // page_size) for n in used]
    order = torch.randperm(sum(counts) + spare).tolist()
    pools = [torch.full((len(order), page_size, t.shape[1], t.shape[2] * width), float("nan"), dtype=t.dtype,
                        device=DEVICE)[..., :t.shape[2]] for t, width in ((k, 1), (v, 2))]
    table = torch.full((len(used), max(counts) + 1), order[-1], dtype=torch.int32)
    start = 0
    for b, n in enumerate(used):
        for j in range(counts[b]):
            page, rows = order.pop(0), slice(start + j * page_size, start + min((j + 1) * page_size, n))
            table[b, j] = page
            for pool, t in zip(pools, (k, v)):
                pool[page, :rows.stop - rows.start] = t[rows]
        start += n
    return *pools, table.to(DEVICE)


@pytest.mark.parametrize("window,dtype,num_splits,page_size", [((-1, 0), torch.float32, None, 16),
                                                               ((-1, -1), torch.float16, 3, 5),
                                                               ((4, 0), torch.float32, 1, 1)])
def test_varlen_paged_kv_cache(backend, window, dtype, num_splits, page_size):
    """torch's block_table: each sequence's cached keys spread over pages of a shared pool, in any order, the last
    page part filled; its window aligns to its seqused_k keys, and no other row is read (NaN here), split-KV or
    not. The oracle is the plain call on the used keys packed end to end."""
    lengths_q, used = [1, 3, 0, 20, 2], [33, 0, 7, 25, 8]
    H, Hkv, D = 4, 2, 16
    cu_q, cu_used = _offsets(lengths_q), _offsets(used)
    seqused_k = torch.tensor(used, dtype=torch.int32, device=DEVICE)
    dtype = torch.float16 if backend == "cuda" else dtype
    q = torch.randn(sum(lengths_q), H, D, device=DEVICE, dtype=dtype)
    k, v = (torch.randn(sum(used), Hkv, D, device=DEVICE, dtype=dtype) for _ in range(2))
    pool_k, pool_v, table = _pages(k, v, used, page_size)
    kwargs = dict(window_size=window, enable_gqa=True)
    call = dict(seqused_k=seqused_k, block_table=table, num_splits=num_splits, backend=backend, **kwargs)
    out, lse = fa.varlen_attn(q, pool_k, pool_v, cu_q, None, max(lengths_q), max(used), return_aux=LSE(), **call)
    base = ref.varlen_attn(q, k, v, cu_q, cu_used, **kwargs)
    exact = ref.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_used, **kwargs)
    assert torch.equal(ref.varlen_attn(q.double(), pool_k.double(), pool_v.double(), cu_q, None,
                                       seqused_k=seqused_k, block_table=table, **kwargs), exact)
    assert_close(out, base, exact, "output")
    _check_lse(lse, _lse_reference(q, k, cu_q, cu_used, 1 / math.sqrt(D), window))


def test_varlen_kv_cache_is_for_inference():
    """As torch's: seqused_k takes no gradient (NotImplementedError, which is the RuntimeError torch raises);
    under torch.no_grad, or with inputs that need none, it runs."""
    q = torch.randn(6, 2, 16, device=DEVICE, requires_grad=True)
    cu, used = _offsets([2, 4]), torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(RuntimeError, match="varlen_attn: seqused_k is for inference"):
        fa.varlen_attn(q, q, q, cu, cu, 4, 4, seqused_k=used)
    with pytest.raises(NotImplementedError, match="varlen_attn: seqused_k is for inference"):
        torch.ops.fast_attention.varlen_attention(q, q, q, cu, cu, 4, 4, 0.25, "reference", seqused_k=used)
    with torch.no_grad():
        assert fa.varlen_attn(q, q, q, cu, cu, 4, 4, seqused_k=used).shape == q.shape


@needs_triton
def test_varlen_strided_inputs():
    """Packed rows sliced out of one fused projection (q, k, v interleaved per row), as models produce them."""
    total, H, D = 50, 2, 16
    qkv = torch.randn(total, 3, H, D, device=DEVICE, dtype=torch.float16, requires_grad=True)
    q, k, v = qkv.unbind(1)
    cu = _offsets([20, 30])
    out = fa.varlen_attn(q, k, v, cu, cu, 30, 30, window_size=(-1, 0), backend="triton")
    expected = ref.varlen_attn(*(t.detach().double() for t in (q, k, v)), cu, cu, window_size=(-1, 0))
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=0)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and torch.isfinite(qkv.grad).all()


@pytest.mark.skipif(not GPU, reason="the interpreter runs one config (32 x 32); this checks the GPU's tiles")
@pytest.mark.parametrize("window,dtype", [((-1, -1), torch.bfloat16), ((-1, 0), torch.float16),
                                          ((255, 0), torch.bfloat16), ((100, 37), torch.float16),
                                          ((-1, 0), torch.float32)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("backend", ["triton", "cuda"])  # the CUDA kernels refuse float32: reported as a skip
def test_varlen_gpu_grid(backend, window, dtype, D):
    if backend not in fa.available_backends():
        pytest.skip(f"the {backend} backend is not available here")
    lengths_q = [1000, 1, 4097, 127, 0, 3, 17]
    lengths_k = [1000, 5, 4097, 300, 64, 3, 1]
    check_varlen(backend, lengths_q, lengths_k, 8, 2, D, dtype, window)


def test_varlen_bad_input():
    q = torch.randn(10, 2, 16, device=DEVICE)
    cu = _offsets([4, 6])
    with pytest.raises(ValueError, match="query must be 3-D"):
        fa.varlen_attn(q[None], q, q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seq_q must be a 1-D int32 tensor"):
        fa.varlen_attn(q, q, q, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match="same number of offsets"):
        fa.varlen_attn(q, q, q, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        fa.varlen_attn(q, q[:, :1], q[:, :1], cu, cu, 6, 6)
    with pytest.raises(ValueError, match="divisible"):
        fa.varlen_attn(q.repeat(1, 3, 1)[:, :5], q, q, cu, cu, 6, 6, enable_gqa=True)
    with pytest.raises(ValueError, match="head dim"):
        fa.varlen_attn(q, q[..., :8], q, cu, cu, 6, 6)
    with pytest.raises(TypeError, match="same dtype"):
        fa.varlen_attn(q, q.half(), q, cu, cu, 6, 6)
    with pytest.raises(ValueError, match="max_k must be an int"):
        fa.varlen_attn(q, q, q, cu, cu, 6, -1)
    with pytest.raises(TypeError, match="varlen_attn: window_size must be None or a pair"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, window_size=(3,))
    with pytest.raises(ValueError, match="varlen_attn: window_size sides must be >= 0"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, window_size=(-2, 0))
    with pytest.raises(ValueError, match=r"varlen_attn: sinks must have shape \(2,\)"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, sinks=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="varlen_attn: softcap must be a positive finite number"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, softcap=-1.0)
    with pytest.raises(ValueError, match=r"varlen_attn: seqused_k must be int32 of shape \(2,\)"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, seqused_k=cu)
    with pytest.raises(ValueError, match=r"varlen_attn: seqused_k must be int32 of shape \(2,\)"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, seqused_k=cu.diff().long())
    with pytest.raises(TypeError, match="varlen_attn: seqused_k must be None or a torch.Tensor"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, seqused_k=[4, 6])
    pool, table = q.reshape(5, 2, 2, 16), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    filled = torch.tensor([4, 3], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"varlen_attn: with block_table, key must be a 4-D pool of pages, \(pages, page size"):
        fa.varlen_attn(q, q, pool, cu, None, 6, 6, seqused_k=filled, block_table=table)
    with pytest.raises(ValueError, match="varlen_attn: block_table needs seqused_k"):
        fa.varlen_attn(q, pool, pool, cu, None, 6, 6, block_table=table)
    with pytest.raises(ValueError, match=r"varlen_attn: block_table must be int32 of shape \(2, pages per sequence"):
        fa.varlen_attn(q, pool, pool, cu, None, 6, 6, seqused_k=filled, block_table=table.long())
    with pytest.raises(TypeError, match="varlen_attn: cu_seq_k must be a torch.Tensor"):
        fa.varlen_attn(q, q, q, cu, None, 6, 6)
    with pytest.raises(ValueError, match="varlen_attn: num_splits must be None or an int >= 1, got 0"):
        fa.varlen_attn(q, q, q, cu, cu, 6, 6, num_splits=0)
    if DEVICE == "cpu":  # the offsets' values are checked where they are on the host
        with pytest.raises(ValueError, match="never decrease"):
            fa.varlen_attn(q, q, q, _offsets([6, -2]), cu, 6, 6)
        with pytest.raises(ValueError, match="end at the 10 packed rows"):
            fa.varlen_attn(q, q, q, _offsets([6, 6]), cu, 6, 6)
        with pytest.raises(ValueError, match="cu_seq_k must start at 0, never decrease and end at the 10"):
            fa.varlen_attn(q, q, q, cu, _offsets([4, 5]), 6, 6)
        with pytest.raises(ValueError, match="max_q is 5 but cu_seq_q holds a sequence of 6"):
            fa.varlen_attn(q, q, q, cu, cu, 5, 6)
        for used in ([4, 7], [-1, 2]):
            with pytest.raises(ValueError, match=r"seqused_k\[b\] must be in 0 .. sequence b's keys \[4, 6\]"):
                fa.varlen_attn(q, q, q, cu, cu, 6, 6, seqused_k=torch.tensor(used, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"seqused_k\[b\] must be in 0 .. min\(max_k, 2 pages x 2 rows\)"):
            fa.varlen_attn(q, pool, pool, cu, None, 6, 6, seqused_k=filled + 1, block_table=table)
        with pytest.raises(ValueError, match=r"block_table's used entries must be pages 0 .. 4 of key and value"):
            fa.varlen_attn(q, pool, pool, cu, None, 6, 6, seqused_k=filled, block_table=table * 2)


def test_varlen_takes_every_argument_of_torchs():
    """A call written for torch's varlen_attn runs as it is (or says which argument is not supported)."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    ours = inspect.signature(fa.varlen_attn).parameters
    for name, theirs in inspect.signature(varlen.varlen_attn).parameters.items():
        assert name in ours and ours[name].kind == theirs.kind, name
        assert ours[name].default == theirs.default, name


@pytest.mark.parametrize("window,sinks,softcap,dtype", [((-1, -1), False, None, torch.float32),
                                                        ((-1, 0), True, None, torch.float16),
                                                        ((40, 3), False, 2.0, torch.bfloat16)])
def test_varlen_split_keys(backend, window, sinks, softcap, dtype):
    """num_splits=3: each sequence's keys in three parts (Triton; CUDA splits decoding calls only, which this batch
    is not, and the reference never), merged after: sequences shorter than a part (empty parts), one without keys,
    one without queries, queries past 16 rows, GQA, windows, sinks, the cap; values, logsumexp and gradients (from
    the merged statistics)."""
    check_varlen(backend, [1, 3, 0, 5, 20, 2], [100, 7, 50, 0, 130, 64], 4, 2, 16, dtype, window, sinks=sinks,
                 softcap=softcap, num_splits=3)


def test_varlen_num_splits(backend):
    """torch's num_splits on a decoding batch (a few queries against 1000+ keys), where None splits each sequence's
    keys (Triton, CUDA): 1 splits nothing, so a sequence's output is the same alone as in any batch, bit for bit; None
    and 4 give the values within rounding."""
    dtype = {"reference": torch.float64, "cuda": torch.float16}.get(backend, torch.float32)
    lengths_q, lengths_k = [2, 1, 3], [1100, 1500, 1024]
    q, k, v = (torch.randn(sum(n), 2, 16, device=DEVICE, dtype=dtype) for n in (lengths_q, lengths_k, lengths_k))
    cu_q, cu_k = _offsets(lengths_q), _offsets(lengths_k)
    kwargs = dict(window_size=(-1, 0), backend=backend)
    if backend == "triton":
        from fast_attention.kernels import attention as kernels

        assert kernels._varlen_split_plan(q, 2, 3, 3, 1500, None) is not None  # None splits this batch
    whole = fa.varlen_attn(q, k, v, cu_q, cu_k, 3, 1500, num_splits=1, **kwargs)
    alone = fa.varlen_attn(q[:2], k[:1100], v[:1100], cu_q[:2], cu_k[:2], 2, 1100, num_splits=1, **kwargs)
    assert torch.equal(whole[:2], alone)
    exact = ref.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_k, window_size=(-1, 0))
    for splits in (None, 4):
        out = fa.varlen_attn(q, k, v, cu_q, cu_k, 3, 1500, num_splits=splits, **kwargs)
        torch.testing.assert_close(out.double(), exact, atol=2 * FLOOR[dtype], rtol=0)


def test_varlen_cuda_takes_16_bit():
    """The CUDA kernels take packed sequences in float16 and bfloat16 at their compiled head dims; float32 they
    refuse, saying why (backend=None then takes Triton)."""
    from fast_attention import backends

    q = torch.randn(10, 2, 16, device=DEVICE)
    reason = backends.why_not("cuda", "varlen_attention", q.device, query=q, key=q, value=q, max_q=6, max_k=6)
    assert reason is not None
    if GPU and "cuda" in fa.available_backends():
        assert "float16 or bfloat16" in reason
        h = q.half()
        assert backends.why_not("cuda", "varlen_attention", q.device, query=h, key=h, value=h, max_q=6,
                                max_k=6) is None


def test_varlen_opcheck(backend, device):
    dtype = {"reference": torch.float64, "cuda": torch.float16}.get(backend, torch.float32)
    q, k, v = (torch.randn(n, 2, 16, device=device, dtype=dtype, requires_grad=True) for n in (12, 15, 15))
    sinks = torch.randn(2, device=device, dtype=dtype, requires_grad=True)
    for extra in ((3, 0), (-1, 0, sinks, 1.5)):
        args = (q, k, v, _offsets([5, 7]), _offsets([10, 5]), 7, 10, 0.25, backend, *extra)
        torch.library.opcheck(torch.ops.fast_attention.varlen_attention.default, args)
    used = torch.tensor([8, 3], dtype=torch.int32, device=device)  # a KV cache's used keys: inference only
    args = (q.detach(), k.detach(), v.detach(), _offsets([5, 7]), _offsets([10, 5]), 7, 10, 0.25, backend, -1, 0,
            None, 0.0, used)
    torch.library.opcheck(torch.ops.fast_attention.varlen_attention.default, args)
    pool = k.detach()[:15].reshape(3, 5, 2, 16)  # a paged cache, 3 pages of 5 rows; cu_seq_k unread
    table = torch.tensor([[2, 0], [1, 1]], dtype=torch.int32, device=device)
    args = (q.detach(), pool, pool, _offsets([5, 7]), _offsets([5, 7]), 7, 10, 0.25, backend, -1, 0, None, 0.0, used,
            None, table)
    torch.library.opcheck(torch.ops.fast_attention.varlen_attention.default, args)


@pytest.mark.parametrize("compiler", ["aot_eager"])  # inductor runs a custom op as it is (test_ops.py compiles both)
def test_varlen_torch_compile(backend, device, compiler):
    torch._dynamo.reset()
    cu = _offsets([9, 4])
    dtype = torch.float16 if backend == "cuda" else torch.float32  # the CUDA kernels' 16-bit
    x = torch.randn(13, 2, 16, device=device, dtype=dtype, requires_grad=True)
    proj = torch.nn.Linear(16, 48).to(device, dtype)

    def loss(x):
        q, k, v = proj(x).split(16, -1)
        return fa.varlen_attn(q, k, v, cu, cu, 9, 9, window_size=(-1, 0), backend=backend).square().sum()

    (g_eager,) = torch.autograd.grad(loss(x), x)
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    value = compiled(x)
    (g,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, loss(x))
    torch.testing.assert_close(g, g_eager)


def test_varlen_kv_cache_torch_compile(backend, device):
    """seqused_k traces into one graph (inference: its values are not read on the host while tracing)."""
    torch._dynamo.reset()
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = (torch.randn(n, 2, 16, device=device, dtype=dtype) for n in (3, 20, 20))
    cu_q, cu_k = _offsets([1, 2]), _offsets([12, 8])
    used = torch.tensor([9, 5], dtype=torch.int32, device=device)

    def attend(q, k, v, used):
        return fa.varlen_attn(q, k, v, cu_q, cu_k, 2, 12, window_size=(-1, 0), seqused_k=used, backend=backend)

    with torch.no_grad():
        compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(q, k, v, used), attend(q, k, v, used))


def _jagged(lengths, H, D, dtype):
    """A nested jagged tensor (B, H, j, D), as torch SDPA takes them, and its packed values' offsets."""
    nt = torch.nested.nested_tensor([torch.randn(n, H, D, device=DEVICE, dtype=dtype) for n in lengths],
                                    layout=torch.jagged, requires_grad=True)
    return nt, nt.transpose(1, 2)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's warning that nested tensors are a prototype
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nested_jagged_tensors(backend, dtype):
    """scaled_dot_product_attention on nested jagged tensors, as torch's: each batch entry attends on its own,
    query and key of different lengths; the output nested like query, and the gradients, through varlen_attn,
    against torch's own nested SDPA and the float64 reference on the packed values."""
    (q_nt, q), (k_nt, k), (v_nt, v) = _jagged([5, 40, 1], 2, 16, dtype), _jagged([7, 33, 3], 2, 16, dtype), \
        _jagged([7, 33, 3], 2, 16, dtype)
    v = torch.nested.nested_tensor_from_jagged(v_nt.values(), k_nt.offsets()).transpose(1, 2)  # key's lengths
    out = fa.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.is_nested and out.shape[:2] == q.shape[:2] and out.shape[2] == q.shape[2]
    theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    values = [t.values().detach().double() for t in (q_nt, k_nt, v_nt)]
    expected = ref.varlen_attn(*values, q_nt.offsets().to(torch.int32), k_nt.offsets().to(torch.int32))
    ours_v, theirs_v = out.transpose(1, 2).values(), theirs.transpose(1, 2).values()
    assert_close(ours_v, theirs_v, expected, "output")
    grad = torch.randn_like(ours_v)
    leaves = (q_nt, k_nt, v_nt)
    ours_g = [g.values() for g in torch.autograd.grad(ours_v, leaves, grad, retain_graph=True)]  # q, k, v shared
    their_g = [g.values() for g in torch.autograd.grad(theirs_v, leaves, grad)]
    exact = [t.requires_grad_() for t in values]
    exact_g = torch.autograd.grad(ref.varlen_attn(*exact, q_nt.offsets().to(torch.int32),
                                                  k_nt.offsets().to(torch.int32)), exact, grad.double())
    for name, a, b, c in zip(("dq", "dk", "dv"), ours_g, their_g, exact_g):
        assert_close(a, b, c, name)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_jagged_tensors_causal(backend):
    """is_causal (which torch refuses on nested tensors) and a window where query and key share their lengths:
    each entry as the dense call on it alone."""
    _, q = _jagged([5, 40, 1], 2, 16, torch.float32)
    for kwargs in ({"is_causal": True}, {"is_causal": True, "window_size": (6, -1)}, {"window_size": (3, 2)}):
        out = fa.scaled_dot_product_attention(q, q, q, backend=backend, **kwargs)
        for got, seq in zip(out.unbind(), q.unbind()):
            dense = fa.scaled_dot_product_attention(seq, seq, seq, backend=backend, **kwargs)
            torch.testing.assert_close(got, dense, atol=2e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_jagged_tensors_bad_input():
    _, q = _jagged([5, 9], 2, 16, torch.float32)
    _, k = _jagged([4, 9], 2, 16, torch.float32)
    with pytest.raises(ValueError, match="must all be nested jagged tensors"):
        fa.scaled_dot_product_attention(q, torch.randn(2, 2, 9, 16, device=DEVICE), q)
    with pytest.raises(ValueError, match="must all be nested jagged tensors .* the ragged length third"):
        fa.scaled_dot_product_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
    with pytest.raises(NotImplementedError, match="attn_mask with nested tensors"):
        fa.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(9, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(NotImplementedError, match="dropout with nested tensors"):
        fa.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(NotImplementedError, match="needs query and key of the same lengths"):
        fa.scaled_dot_product_attention(q, k, k, is_causal=True)
    with pytest.raises(NotImplementedError, match="nested tensors give no attention weights"):
        fa.functional.scaled_dot_product_attention_with_weights(q, q, q)
