"""fast_attention.scaled_dot_product_attention on every backend against the float64 reference, under
tests/tolerance.py's rule (torch's own SDPA in the same dtype sets the error budget): values and dQ/dK/dV for
every mask kind, GQA/MQA, causal with Lq != Lk, odd lengths, head dims up to 256, three dtypes, non-contiguous
inputs; dropout (the Triton kernels' exact mask, reproducibility, kept fraction, unbiasedness); the attention
weights; the split-KV decoding path; deterministic backward; bad input.

On the CPU the Triton backend runs in the interpreter, so the grid there is small (dimensions combined rather
than multiplied); the full product runs only where there is a GPU.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fast_attention as fa
from fast_attention import functional
from fast_attention import reference as ref
from tolerance import FLOOR, assert_close

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
TRITON = "triton" in fa.available_backends()
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
gpu_only = pytest.mark.skipif(not GPU, reason="the full grid needs a GPU (the interpreter is too slow for it)")


def _interpreter_checks_strides_in_bytes() -> bool:
    """Triton 3.4 and 3.5's interpreter checks a descriptor's strides for 16-byte alignment counting elements, not
    bytes (3.6 fixed it), so it refuses descriptors the GPU takes (fp16 with a head dim of 24, say)."""
    import triton

    from fast_attention.kernels import major_minor

    return major_minor(triton) >= (3, 6)


TMA_EMULATED = GPU or (TRITON and _interpreter_checks_strides_in_bytes())  # the descriptor path can run here
needs_tma = pytest.mark.skipif(not TMA_EMULATED, reason="this triton's interpreter cannot emulate the descriptors "
                                                        "(it checks strides in elements; fixed in triton 3.6)")

MASK_KINDS = ("none", "causal", "bool", "key_padding", "float", "dead_rows")


def _tensor(shape, dtype, layout="bhld"):
    """A fresh random leaf of logical shape (B, H, L, D); layout "blhd" stores it as (B, L, H, D), as projections
    followed by a transpose do, so the (B, H, L, D) view is not contiguous."""
    if layout == "blhd":
        B, H, L, D = shape
        return torch.randn(B, L, H, D, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_()


def _qkv(B, H, Hkv, Lq, Lk, D, dtype, Dv=None, layout="bhld"):
    return (_tensor((B, H, Lq, D), dtype, layout), _tensor((B, Hkv, Lk, D), dtype, layout),
            _tensor((B, Hkv, Lk, Dv or D), dtype, layout))


def _kept_keys(B, Lk, empty_entry):
    """(B, 1, 1, Lk) bool key padding: the first batch entry keeps every key, the others a random prefix of at
    least one, or with empty_entry (and B > 1) the last keeps none."""
    lengths = torch.randint(1, Lk + 1, (B,), device=DEVICE)
    lengths[0] = Lk
    if empty_entry and B > 1:
        lengths[-1] = 0  # a batch entry with every key padded: its rows give zeros
    return (torch.arange(Lk, device=DEVICE) < lengths[:, None]).view(B, 1, 1, Lk)


def _mask(kind, B, H, Lq, Lk, dtype):
    """(attn_mask, is_causal) for a mask kind; every user mask leaves some row or key fully masked somewhere."""
    if kind == "none":
        return None, False
    if kind == "causal":
        return None, True
    if kind == "bool":
        m = torch.rand(Lq, Lk, device=DEVICE) > 0.3
        m[:, 0] = True  # no dead rows here: "dead_rows" tests those
        return m, False
    if kind == "key_padding":
        return _kept_keys(B, Lk, empty_entry=True), False
    if kind == "float":
        m = torch.randn(B, 1, Lq, Lk, device=DEVICE).to(dtype)
        m[..., 1::3] = float("-inf")  # additive -inf masks, mixed with finite biases
        m[..., 2::5, :] = float("-inf")  # and rows with -inf everywhere: zeros
        return m, False
    if kind == "hf_padding":  # Hugging Face's key padding: added, 0 or the dtype's finfo.min, no row fully padded
        padded = ~_kept_keys(B, Lk, empty_entry=False)
        return torch.zeros(B, 1, 1, Lk, device=DEVICE, dtype=dtype).masked_fill(padded, torch.finfo(dtype).min), False
    if kind == "dead_rows":
        m = torch.rand(B, H, Lq, Lk, device=DEVICE) > 0.5
        m[:, :, ::4] = False  # every key masked in these rows: torch gives zeros
        m[:, :, 1::4, 0] = True
        return m, False
    raise ValueError(kind)


def _detached(ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def check_sdpa(backend, q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Ours vs torch (same dtype) vs the float64 reference: the output and the three gradients."""
    kwargs = dict(attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out = fa.scaled_dot_product_attention(q, k, v, **kwargs, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)

    tq, tk, tv = _detached((q, k, v))
    t_out = F.scaled_dot_product_attention(tq, tk, tv, **kwargs)
    t_out.backward(grad)

    rq, rk, rv = _detached((q, k, v), torch.float64)
    r_mask = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    r_out = ref.scaled_dot_product_attention(rq, rk, rv, **{**kwargs, "attn_mask": r_mask})
    r_out.backward(grad.double())

    assert out.dtype == q.dtype
    assert_close(out, t_out, r_out, "output")
    for name, ours, theirs, oracle in (("dq", q, tq, rq), ("dk", k, tk, rk), ("dv", v, tv, rv)):
        assert ours.grad.shape == ours.shape and ours.grad.dtype == ours.dtype
        assert_close(ours.grad, theirs.grad, oracle.grad, name)
    return out, r_out


# ----------------------------------------------------------------------------------------------------------
# Values and gradients (a small combined grid on the CPU)
# ----------------------------------------------------------------------------------------------------------
# Every mask kind in float32; the half types with the kinds whose masking differs most (the GPU grid has all).
MASK_CASES = [(kind, torch.float32) for kind in MASK_KINDS + ("hf_padding",)] + [
    (kind, dtype) for kind in ("causal", "key_padding", "float", "hf_padding")
    for dtype in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("kind,dtype", MASK_CASES)
def test_mask_kinds(backend, kind, dtype):
    B, H, Lq, Lk = 2, 2, 37, 45
    q, k, v = _qkv(B, H, H, Lq, Lk, 32, dtype)
    mask, causal = _mask(kind, B, H, Lq, Lk, dtype)
    out, r_out = check_sdpa(backend, q, k, v, mask, causal)
    if kind == "dead_rows":
        assert torch.equal(out[:, :, ::4], torch.zeros_like(out[:, :, ::4]))
        assert torch.equal(q.grad[:, :, ::4], torch.zeros_like(q.grad[:, :, ::4]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_mask_on_half_inputs(backend, dtype):
    """torch takes an additive float32 mask whatever query's dtype (bool, float32 or query's dtype)."""
    B, H, Lq, Lk = 2, 2, 19, 23
    q, k, v = _qkv(B, H, H, Lq, Lk, 32, dtype)
    mask = torch.randn(B, 1, Lq, Lk, device=DEVICE)
    mask[..., 1::3] = float("-inf")
    check_sdpa(backend, q, k, v, mask)


@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("causal,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_gqa(backend, Hkv, causal, dtype):
    q, k, v = _qkv(2, 4, Hkv, 29, 41, 32, dtype)
    check_sdpa(backend, q, k, v, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("Lq,Lk", [(17, 45), (45, 17), (1, 33), (33, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_unequal_lengths(backend, Lq, Lk, dtype):
    """Top-left causal: with Lq < Lk the last keys are never seen; with Lq > Lk the last rows see every key."""
    q, k, v = _qkv(1, 2, 2, Lq, Lk, 16, dtype)
    check_sdpa(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("L,dtype", [(1, torch.float32), (17, torch.bfloat16), (113, torch.float16),
                                     (257, torch.float32)])
def test_lengths(backend, L, dtype):
    q, k, v = _qkv(1, 1, 1, L, L, 16, dtype)
    check_sdpa(backend, q, k, v, is_causal=L % 2 == 1 and L > 1)


@pytest.mark.parametrize("D,dtype", [(16, torch.float16), (32, torch.float32), (64, torch.bfloat16),
                                     (80, torch.float32), (96, torch.float16), (128, torch.float16),
                                     (256, torch.bfloat16)])
def test_head_dims(backend, D, dtype):
    q, k, v = _qkv(1, 2, 2, 19, 35, D, dtype)
    check_sdpa(backend, q, k, v, is_causal=D in (80, 256))


def test_value_head_dim_differs(backend):
    q, k, v = _qkv(2, 2, 2, 21, 27, 48, torch.float32, Dv=24)
    check_sdpa(backend, q, k, v, attn_mask=_mask("key_padding", 2, 2, 21, 27, torch.float32)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous(backend, dtype):
    """(B, L, H, D) storage seen as (B, H, L, D), a transposed mask, GQA and a custom scale together."""
    q, k, v = _qkv(2, 4, 2, 23, 31, 32, dtype, layout="blhd")
    assert not q.is_contiguous() and not k.is_contiguous()
    mask = (torch.rand(31, 23, device=DEVICE) > 0.4).t()
    mask[:, 0] = True
    check_sdpa(backend, q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)


def test_three_d_inputs(backend):
    q, k, v = (t.detach()[0].requires_grad_() for t in _qkv(1, 3, 3, 13, 18, 16, torch.float32))
    check_sdpa(backend, q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finfo_min_mask_rows_are_uniform(backend, dtype):
    """A row masked with finfo.min everywhere (Hugging Face's padding) is a uniform average in torch, not zeros,
    with the gradients of one: the output, the attention weights (1 / Lk each) and dQ, dK, dV, which the kernels
    rebuild from the saved row statistics (a row max of about -3.4e38, and the log row sum kept apart from it)."""
    q, k, v = _qkv(1, 2, 2, 9, 12, 16, dtype)
    mask = torch.zeros(1, 1, 9, 12, device=DEVICE, dtype=dtype)
    mask[..., 3, :] = torch.finfo(dtype).min
    mask[..., 5, 4:] = torch.finfo(dtype).min
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # torch's math kernel, its definition (on CUDA its fused kernels give zeros for such a row: seen on an H200)
    with sdpa_kernel(SDPBackend.MATH):
        t_out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    t_grads = torch.autograd.grad(t_out, (q, k, v), dout)
    r_q, r_k, r_v = _detached((q, k, v), torch.float64)
    r_out = ref.scaled_dot_product_attention(r_q, r_k, r_v, attn_mask=mask.double())
    r_grads = torch.autograd.grad(r_out, (r_q, r_k, r_v), dout.double())
    assert_close(out, t_out, r_out)
    for name, ours, theirs, oracle in zip(("dq", "dk", "dv"), grads, t_grads, r_grads):
        assert_close(ours, theirs, oracle, name)
    torch.testing.assert_close(out[:, :, 3].float(), v.detach().float().mean(2), atol=FLOOR[dtype], rtol=0)
    with torch.no_grad():
        _, w = functional.scaled_dot_product_attention_with_weights(q, k, v, attn_mask=mask, backend=backend)
    torch.testing.assert_close(w[:, :, 3], torch.full_like(w[:, :, 3], 1 / 12))
    expected = torch.softmax(q.detach().double() @ k.detach().double().transpose(-2, -1) / 4 + mask.double(), -1)
    torch.testing.assert_close(w.double(), expected, atol=FLOOR[dtype], rtol=0)


def test_finfo_min_mask_rows_reference_in_float64():
    """The oracle itself, in float64 (where finfo.min is -1.8e308): uniform weights and torch's gradients."""
    dtype = torch.float64
    q, k, v = _qkv(1, 2, 2, 9, 12, 16, dtype)
    mask = torch.zeros(1, 1, 9, 12, device=DEVICE, dtype=dtype)
    mask[..., 3, :] = torch.finfo(dtype).min
    mask[..., 5, 4:] = torch.finfo(dtype).min
    dout = torch.randn(1, 2, 9, 16, device=DEVICE, dtype=dtype)
    out, w = functional.scaled_dot_product_attention_with_weights(q, k, v, attn_mask=mask, backend="reference")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    expected_grads = torch.autograd.grad(expected, (q, k, v), dout)
    torch.testing.assert_close(w[:, :, 3], torch.full_like(w[:, :, 3], 1 / 12))
    torch.testing.assert_close(w, torch.softmax(q @ k.transpose(-2, -1) / 4 + mask, -1).to(w.dtype))
    for name, got, want in zip("qkv", grads, expected_grads):
        torch.testing.assert_close(got, want, msg=lambda m: f"d{name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------------------
def _drawn_seed(torch_seed):
    """The dropout seed the API draws after torch.manual_seed(torch_seed) (see fast_attention/functional.py)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


@needs_triton
@pytest.mark.parametrize("causal,Hkv,dtype", [(False, 2, torch.float32), (True, 1, torch.float16)])
def test_dropout_equals_reference_with_the_kernel_mask(Hkv, causal, dtype):
    from fast_attention.kernels import attention as kernels

    B, H, Lq, Lk, p = 2, 2, 33, 40, 0.3
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, 32, dtype)
    seed = _drawn_seed(1234)
    torch.manual_seed(1234)
    out = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal, enable_gqa=True, backend="triton")
    grad = torch.randn_like(out)
    out.backward(grad)

    keep = kernels.dropout_mask(seed, p, B, H, Lq, Lk, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (B, H, Lq, Lk)
    results = []
    for dt in (dtype, torch.float64):  # the same math in the dtype under test, and the float64 oracle
        xs = _detached((q, k, v), dt)
        o = ref.scaled_dot_product_attention(*xs, dropout_p=p, is_causal=causal, enable_gqa=True, dropout_mask=keep)
        o.backward(grad.to(dt))
        results.append((o, *(x.grad for x in xs)))
    for name, ours, same, oracle in zip(("output", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), *results):
        assert_close(ours, same, oracle, name)


def _dropout_dtype(backend):
    """float32, or float16 where the backend is CUDA's (its kernels take 16-bit inputs only)."""
    return torch.float16 if backend == "cuda" else torch.float32


def test_dropout_same_seed_same_output(backend):
    q, k, v = _qkv(2, 2, 2, 19, 23, 16, _dropout_dtype(backend))
    outs = []
    for torch_seed in (7, 7, 8):
        torch.manual_seed(torch_seed)
        outs.append(fa.scaled_dot_product_attention(q, k, v, dropout_p=0.4, backend=backend).detach())
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_dropout_kept_fraction(backend):
    """With V the identity over keys, out = P * keep / (1 - p): its nonzeros are the kept entries."""
    B, H, Lq, Lk, p, dtype = 2, 2, 48, 64, 0.25, _dropout_dtype(backend)
    E = Lk  # value's head dim, as CUDA's kernels need it
    q, k = (torch.randn(B, H, L, E, device=DEVICE, dtype=dtype) for L in (Lq, Lk))
    v = torch.eye(Lk, device=DEVICE, dtype=dtype).expand(B, H, Lk, Lk)
    torch.manual_seed(99)
    out = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    kept = out != 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    # Independent across heads and batches: the masks of different (b, h) are not copies of each other.
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])
    weights = torch.softmax(q.float() @ k.float().transpose(-2, -1) / math.sqrt(E), -1)
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(out[kept].float(), (weights / (1 - p))[kept], **tolerance)
    if backend == "triton":
        from fast_attention.kernels import attention as kernels

        assert torch.equal(kept, kernels.dropout_mask(_drawn_seed(99), p, B, H, Lq, Lk, DEVICE))


def test_dropout_is_unbiased(backend):
    """The mean over 512 independent masks (one per batch row) matches the no-dropout output within 6 standard
    errors, element by element."""
    N, p = 512, 0.3
    q, k, v = (torch.randn(1, 1, L, 16, device=DEVICE, dtype=_dropout_dtype(backend)).expand(N, 1, L, 16)
               for L in (8, 24, 24))
    exact = fa.scaled_dot_product_attention(q[:1], k[:1], v[:1], backend=backend)[0].double()
    outs = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend).double()
    z = (outs.mean(0) - exact) / (outs.std(0) / math.sqrt(N))
    assert z.abs().max().item() < 6.0
    assert outs.std(0).min().item() > 0  # the masks really differ across the batch


# ----------------------------------------------------------------------------------------------------------
# Attention weights, decoding, determinism
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dtype", [("causal", torch.float32), ("dead_rows", torch.float16),
                                        ("float", torch.bfloat16), ("key_padding", torch.float32)])
def test_attention_weights(backend, kind, dtype):
    B, H, Lq, Lk = 2, 2, 21, 38
    q, k, v = _qkv(B, H, 1, Lq, Lk, 16, dtype)
    mask, causal = _mask(kind, B, H, Lq, Lk, dtype)
    out, w = functional.scaled_dot_product_attention_with_weights(q, k, v, attn_mask=mask, is_causal=causal,
                                                                   enable_gqa=True, backend=backend)
    assert w.dtype == torch.float32 and w.shape == (B, H, Lq, Lk)

    def weights(dt):
        """torch's weights in dtype dt from leaves q_dt, k_dt (key heads repeated for the query heads)."""
        q_dt, k_dt = q.detach().to(dt).requires_grad_(), k.detach().to(dt).requires_grad_()
        s = (q_dt @ k_dt.repeat_interleave(H, dim=1).transpose(-2, -1)) / 4.0
        if causal:
            s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(dt)
        dead = torch.isneginf(s).all(-1, keepdim=True)
        return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0), (q_dt, k_dt)

    (theirs, theirs_leaves), (ref, ref_leaves) = weights(dtype), weights(torch.float64)
    assert_close(w, theirs, ref, "weights")
    if kind == "dead_rows":
        assert torch.equal(w[:, :, ::4], torch.zeros_like(w[:, :, ::4]))
    # gradients through the weights, to query and key (one key head: the query heads' gradients are summed)
    dw = torch.randn_like(w)
    ours_grads = torch.autograd.grad(w, (q, k), dw)
    theirs_grads = torch.autograd.grad(theirs, theirs_leaves, dw.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dw.double())
    for name, g, g_torch, g_ref in zip(("dQ", "dK"), ours_grads, theirs_grads, ref_grads):
        assert_close(g, g_torch, g_ref, f"weights' {name}")


# ----------------------------------------------------------------------------------------------------------
# Beyond torch: learned sinks (gpt-oss) and logit softcapping (Gemma 2). torch has neither, so "torch's own" is
# their eager formula (the oracle's, as transformers writes it) in the inputs' dtype.
# ----------------------------------------------------------------------------------------------------------
def check_beyond_torch(backend, q, k, v, attn_mask=None, is_causal=False, dropout_mask=None, sinks=None,
                       softcap=None, **kwargs):
    """Ours vs the formula written out in the inputs' dtype vs in float64: the output and dQ, dK, dV (and dSinks),
    and without dropout the weights and their gradients too."""
    args = dict(attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True, softcap=softcap, **kwargs)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    if dropout_mask is None:
        out, w = functional.scaled_dot_product_attention_with_weights(q, k, v, **args, backend=backend, sinks=sinks)
    else:
        out, w = fa.scaled_dot_product_attention(q, k, v, **args, backend=backend, sinks=sinks), None
    dout = torch.randn_like(out)
    dw = torch.randn(w.shape, device=DEVICE, dtype=torch.float64) if w is not None else None

    def run(dt):
        xs = _detached(leaves, dt)
        mask = attn_mask.to(dt) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        o, weights = ref.attention_and_weights(*xs[:3], **{**args, "attn_mask": mask}, dropout_mask=dropout_mask,
                                               sinks=xs[3] if sinks is not None else None)
        return (o, weights), xs

    ours = (out, w)
    (same, same_leaves), (oracle, oracle_leaves) = run(q.dtype), run(torch.float64)
    names = ("output", "weights") if w is not None else ("output",)
    for name, a, b, c in zip(names, ours, same, oracle):
        assert_close(a, b, c, name)

    def grads(outputs, xs):
        loss = (outputs[0].double() * dout.double()).sum()
        if dw is not None:
            loss = loss + (outputs[1].double() * dw).sum()
        return torch.autograd.grad(loss, xs)

    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), grads(ours, leaves), grads(same, same_leaves),
                             grads(oracle, oracle_leaves)):
        assert_close(a, b, c, name)
    return out


BEYOND_CASES = [("none", torch.float32), ("causal", torch.bfloat16), ("dead_rows", torch.float16),
                ("hf_padding", torch.float32), ("float", torch.float16)]


@pytest.mark.parametrize("kind,dtype", BEYOND_CASES)
def test_sinks(backend, kind, dtype):
    """Each head's sink joins every row's softmax: the output and the weights shrink by Z / (Z + e^sink), and the
    gradients, the sinks' own, are those of the softmax with the sink's column. A row with every key masked gives
    zeros (its sink takes all of it)."""
    B, H, Lq, Lk = 2, 4, 13, 21
    q, k, v = _qkv(B, H, 2, Lq, Lk, 16, dtype)
    mask, causal = _mask(kind, B, H, Lq, Lk, dtype)
    sinks = torch.randn(H, device=DEVICE, requires_grad=True)
    out = check_beyond_torch(backend, q, k, v, mask, causal, sinks=sinks)
    if kind == "dead_rows":
        assert torch.equal(out[:, :, ::4], torch.zeros_like(out[:, :, ::4]))


def test_sinks_gradients_where_one_key_is_visible(backend):
    """A row that sees one key: P = 1 and dS = r (1 - r) dP, a difference (dP - D) in which D = rowsum(dO * O) must
    not read an output rounded after the sink's scaling (ops/attention.py): dK was up to 3x over the bound."""
    for _ in range(40):
        q, k, v = _qkv(1, 1, 1, 1, 9, 64, torch.float16)
        with torch.no_grad():
            q *= 4
        check_beyond_torch(backend, q, k, v, is_causal=True,
                           sinks=torch.randn(1, device=DEVICE, requires_grad=True))


@pytest.mark.parametrize("kind,dtype", BEYOND_CASES)
def test_softcap(backend, kind, dtype):
    """Scores capped to c tanh(s / c) before the mask, with scores well past the cap (queries scaled up): the
    output, the weights and every gradient (dS times 1 - tanh^2)."""
    B, H, Lq, Lk = 2, 4, 13, 21
    q, k, v = _qkv(B, H, 2, Lq, Lk, 16, dtype)
    with torch.no_grad():
        q *= 4  # scores of a few units against a cap of 2
    mask, causal = _mask(kind, B, H, Lq, Lk, dtype)
    out = check_beyond_torch(backend, q, k, v, mask, causal, softcap=2.0)
    if kind == "dead_rows":
        assert torch.equal(out[:, :, ::4], torch.zeros_like(out[:, :, ::4]))


def test_softcap_and_sinks_together(backend):
    q, k, v = _qkv(1, 2, 1, 9, 14, 32, torch.float32)
    check_beyond_torch(backend, q, k, v, is_causal=True, softcap=0.5,
                       sinks=torch.randn(2, device=DEVICE, requires_grad=True))


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("Lq,Lk,window", [(5, 40, None), (40, 5, None), (33, 33, None), (20, 45, (6, -1)),
                                          (20, 45, (-1, 3))])
def test_causal_bias(backend, variant, Lq, Lk, window):
    """torch's lazy causal masks (torch.nn.attention.bias), which torch SDPA takes as attn_mask: upper-left is
    is_causal, lower-right aligns the diagonal to the last key (its first rows see no key where Lq > Lk: zeros),
    with a window or without; the output and every gradient against torch given the same object and the float64
    reference given the mask it stands for."""
    from torch.nn.attention import bias

    mask = getattr(bias, f"causal_{variant}")(Lq, Lk)
    q, k, v = _qkv(2, 2, 2, Lq, Lk, 16, torch.float16)
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend, window_size=window)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    same = _detached((q, k, v))
    theirs = F.scaled_dot_product_attention(*same, attn_mask=mask)
    dense = mask._materialize(DEVICE)
    if window is not None:  # torch takes no window: the same dtype's baseline is the formula with it
        theirs = ref.scaled_dot_product_attention(*same, attn_mask=dense, window_size=window)
    their_grads = torch.autograd.grad(theirs, same, dout)
    exact = _detached((q, k, v), torch.float64)
    expected = ref.scaled_dot_product_attention(*exact, attn_mask=dense, window_size=window)
    exact_grads = torch.autograd.grad(expected, exact, dout.double())
    assert_close(out, theirs, expected, "output")
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, their_grads, exact_grads):
        assert_close(a, b, c, name)


def test_causal_bias_bad_input():
    from torch.nn.attention import bias

    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="attn_mask is a CausalBias for 4 queries and 5 keys, but query has 5"):
        fa.scaled_dot_product_attention(q, q, q, attn_mask=bias.causal_lower_right(4, 5))
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        fa.scaled_dot_product_attention(q, q, q, attn_mask=bias.causal_upper_left(5, 5), is_causal=True)


# ----------------------------------------------------------------------------------------------------------
# A local (sliding) window, window_size=(left, right): FlashAttention's argument, aligned as is_causal
# ----------------------------------------------------------------------------------------------------------
# Lengths over the kernels' tiles (32 in the interpreter, up to 128 on a GPU), so that whole key blocks fall
# outside the windows; windows of one key (0, 0), one side only, both, and wider than the lengths.
WINDOW_CASES = [("causal", torch.bfloat16, (7, -1)), ("none", torch.float32, (3, 20)), ("bool", torch.float16, (0, 0)),
                ("dead_rows", torch.float32, (-1, 5)), ("hf_padding", torch.float16, (40, 2)),
                ("float", torch.float32, (500, 500)), ("key_padding", torch.bfloat16, (33, 0))]


@pytest.mark.parametrize("kind,dtype,window", WINDOW_CASES)
def test_window(backend, kind, dtype, window):
    """Query i sees keys i - left .. i + right and what the mask leaves of them, Lq != Lk (queries past the last
    window's reach see nothing: zeros): the output, the weights and every gradient."""
    B, H, Lq, Lk = 2, 2, 70, 45
    q, k, v = _qkv(B, H, 1, Lq, Lk, 16, dtype)
    mask, causal = _mask(kind, B, H, Lq, Lk, dtype)
    out = check_beyond_torch(backend, q, k, v, mask, causal, window_size=window)
    if 0 <= window[0] < Lq - Lk:
        assert torch.equal(out[:, :, Lk + window[0]:], torch.zeros_like(out[:, :, Lk + window[0]:]))


@pytest.mark.parametrize("is_causal,window", [(True, (40, -1)), (False, (40, 50))])
def test_window_wider_than_the_tiles(backend, is_causal, window):
    """16-bit inputs without a mask (the light kernels, which split a window's blocks into its edges, tested, and
    the blocks every row of a query block sees whole, not tested), windows over several tiles: the blocks at each
    edge are the ones that must keep the test."""
    q, k, v = _qkv(1, 2, 1, 160, 150, 16, torch.float16)
    check_beyond_torch(backend, q, k, v, is_causal=is_causal, window_size=window)


@needs_triton
@pytest.mark.parametrize("is_causal,window", [(True, (8, -1)), (False, (5, 3))])
def test_window_skips_the_key_blocks_outside_it(is_causal, window):
    """The kernels never read a key block outside every window of a block of queries: NaN values planted in the
    first 16 keys reach no row (and no dQ row) that cannot see them across the largest tiles (128 x 128), where
    the math kernel, which multiplies every value by its probability, 0 x NaN, gives NaN everywhere."""
    L = 320
    q, k, v = _qkv(1, 2, 2, L, L, 16, torch.float16)
    with torch.no_grad():
        v[:, :, :16] = float("nan")
    out = fa.scaled_dot_product_attention(q, k, v, is_causal=is_causal, window_size=window, backend="triton")
    dout = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, (q,), dout)
    far = 16 + max(window) + 2 * 128  # rows that no tile of the first key block reaches
    with torch.no_grad():
        xs = _detached((q, k, v), torch.float64)
        xs[2][:, :, :16] = 0.0  # what those rows see is the same without the NaN
    xs[0].requires_grad_()
    expected = ref.scaled_dot_product_attention(*xs, is_causal=is_causal, window_size=window)
    (expected_dq,) = torch.autograd.grad(expected, (xs[0],), dout.double())
    assert torch.isfinite(out[:, :, far:]).all() and torch.isfinite(dq[:, :, far:]).all()
    torch.testing.assert_close(out[:, :, far:].double(), expected[:, :, far:], atol=2e-3, rtol=0)
    torch.testing.assert_close(dq[:, :, far:].double(), expected_dq[:, :, far:], atol=2e-2, rtol=0)


def test_window_with_sinks_softcap_and_dropout(backend):
    """A window with everything else a row's softmax can hold: learned sinks, a logit cap, dropout."""
    q, k, v = _qkv(1, 2, 1, 40, 40, 16, torch.float32)
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    p = 0.2
    keep = _backend_dropout_mask(backend, _drawn_seed(3), p, (1, 2, 40, 40))
    torch.manual_seed(3)  # the call draws the seed of `keep`
    check_beyond_torch(backend, q, k, v, is_causal=True, window_size=(9, -1), dropout_p=p, dropout_mask=keep,
                       sinks=sinks, softcap=1.5)


def _backend_dropout_mask(backend, seed, p, shape):
    """The dropout decisions `backend` draws for `seed`: the reference's or the Triton kernels'."""
    if backend == "reference":
        return ref.dropout_mask(seed, p, shape, DEVICE)
    from fast_attention.kernels import attention as kernels

    return kernels.dropout_mask(seed, p, *shape, DEVICE)


@needs_triton
@pytest.mark.parametrize("Lq,is_causal,window", [(3, False, (2, 60)), (12, True, (70, -1))])
def test_decoding_split_kv_with_window(monkeypatch, Lq, is_causal, window):
    """The split-KV path bounds each split's keys by the window (splits past it read nothing) and merges."""
    _, splits = _small_decoding_thresholds(monkeypatch)
    q, k, v = _qkv(2, 4, 1, Lq, 200, 32, torch.float16)
    check_beyond_torch("triton", q, k, v, is_causal=is_causal, window_size=window)
    assert splits and min(splits) > 1, "the split-KV path did not run"


# ----------------------------------------------------------------------------------------------------------
# A float mask that requires grad (a learned position bias): its gradient is dS, summed over its broadcast dims
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_shape,Hkv,dtype", [((1, 4, 13, 21), 2, torch.float32), ((2, 1, 1, 21), 4, torch.float16),
                                                  ((13, 21), 1, torch.bfloat16), ((2, 4, 13, 21), 4, torch.float32)])
def test_mask_gradient(backend, mask_shape, Hkv, dtype):
    """T5's bias (1, H, Lq, Lk) broadcast over the batch, a per-key bias, a 2-D one, a full one; GQA; with -inf
    entries and a row that is -inf everywhere (its gradient 0, as torch's)."""
    q, k, v = _qkv(2, 4, Hkv, 13, 21, 16, dtype)
    bias = torch.randn(mask_shape, device=DEVICE).to(dtype)
    bias[..., 1::5] = float("-inf")
    if len(mask_shape) == 2 or mask_shape[-2] > 1:
        bias[..., 3, :] = float("-inf")
    bias.requires_grad_()
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True, backend=backend)
    dout = torch.randn_like(out)
    leaves = (q, k, v, bias)
    grads = torch.autograd.grad(out, leaves, dout)
    t_leaves = _detached(leaves)
    with sdpa_kernel(SDPBackend.MATH):
        t_out = F.scaled_dot_product_attention(*t_leaves[:3], attn_mask=t_leaves[3], enable_gqa=True)
    r_leaves = _detached(leaves, torch.float64)
    r_out = ref.scaled_dot_product_attention(*r_leaves[:3], attn_mask=r_leaves[3], enable_gqa=True)
    assert_close(out, t_out, r_out)
    for name, ours, theirs, oracle in zip(("dq", "dk", "dv", "dmask"), grads,
                                          torch.autograd.grad(t_out, t_leaves, dout),
                                          torch.autograd.grad(r_out, r_leaves, dout.double())):
        assert ours.shape == oracle.shape and ours.dtype == theirs.dtype, name
        assert_close(ours, theirs, oracle, name)


def test_mask_gradient_with_dropout_and_softcap(backend):
    """dS under dropout (the kernels' own mask, drawn again) and under a logit cap (added after it: no slope)."""
    q, k, v = _qkv(1, 2, 2, 9, 14, 16, torch.float32)
    bias = torch.randn(1, 2, 9, 14, device=DEVICE, requires_grad=True)
    p, seed = 0.3, _drawn_seed(5)
    torch.manual_seed(5)
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, softcap=1.5, backend=backend)
    keep = _backend_dropout_mask(backend, seed, p, (1, 2, 9, 14))
    dout = torch.randn_like(out)
    leaves = (q, k, v, bias)
    results = [torch.autograd.grad(out, leaves, dout)]
    for dt in (torch.float32, torch.float64):
        xs = _detached(leaves, dt)
        o = ref.scaled_dot_product_attention(*xs[:3], attn_mask=xs[3], dropout_p=p, dropout_mask=keep, softcap=1.5)
        results.append(torch.autograd.grad(o, xs, dout.to(dt)))
    for name, ours, same, oracle in zip(("dq", "dk", "dv", "dmask"), *results):
        assert_close(ours, same, oracle, name)


def test_sinks_with_a_mask_that_requires_grad():
    """A learned bias and learned sinks together (the reference formula's path): every gradient, the bias's too."""
    q, k, v = _qkv(2, 2, 2, 7, 10, 16, torch.float32)
    bias = torch.randn(1, 2, 7, 10, device=DEVICE, requires_grad=True)
    sinks = torch.randn(2, device=DEVICE, requires_grad=True)
    leaves = (q, k, v, bias, sinks)
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=bias, sinks=sinks)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    r = _detached(leaves, torch.float64)
    r_out = ref.scaled_dot_product_attention(*r[:3], attn_mask=r[3], sinks=r[4])
    torch.testing.assert_close(out, r_out.float())
    for name, ours, oracle in zip(("dq", "dk", "dv", "dbias", "dsinks"), grads,
                                  torch.autograd.grad(r_out, r, dout.double())):
        torch.testing.assert_close(ours, oracle.float(), msg=lambda m: f"{name}: {m}")


@needs_triton
def test_sinks_with_dropout_use_the_kernels_mask():
    """Dropout applies to the keys' shares after the sink took its own, as in gpt-oss's eager attention."""
    from fast_attention.kernels import attention as kernels

    B, H, Lq, Lk, p = 1, 2, 9, 14, 0.3
    q, k, v = _qkv(B, H, 1, Lq, Lk, 16, torch.float32)
    sinks = torch.randn(H, device=DEVICE, requires_grad=True)
    keep = kernels.dropout_mask(_drawn_seed(77), p, B, H, Lq, Lk, DEVICE)
    torch.manual_seed(77)
    check_beyond_torch("triton", q, k, v, dropout_p=p, dropout_mask=keep, sinks=sinks)


@needs_triton
@pytest.mark.parametrize("Lq,kind,softcap", [(1, "none", None), (4, "hf_padding", None), (3, "float", 1.5)])
def test_decoding_split_kv_with_sinks_and_softcap(monkeypatch, Lq, kind, softcap):
    """The sinks scale the merged output of the split-KV path by its merged statistics; each split caps its
    scores."""
    _, splits = _small_decoding_thresholds(monkeypatch)
    B, H, Hkv, Lk = 2, 4, 1, 150
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, 32, torch.float32)
    mask, _ = _mask(kind, B, H, Lq, Lk, torch.float32)
    sinks = torch.randn(H, device=DEVICE, requires_grad=True)
    check_beyond_torch("triton", q, k, v, mask, sinks=sinks, softcap=softcap)
    assert splits and min(splits) > 1, "the split-KV path did not run"


def _small_decoding_thresholds(monkeypatch):
    """Lets 64 keys or more take the split-KV path, in splits of 32 keys or more: (the kernels' module, the list
    to which each merge appends its split count)."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "DECODE_MIN_LK", 64)
    monkeypatch.setattr(kernels, "SPLIT_MIN_KEYS", 32)
    splits = []
    real_combine = kernels._combine
    monkeypatch.setattr(kernels, "_combine", lambda *a: (splits.append(a[5]), real_combine(*a)))
    return kernels, splits


@needs_triton
@pytest.mark.parametrize("Lq,kind,dtype", [(1, "none", torch.float32), (5, "key_padding", torch.float16),
                                           (16, "causal", torch.bfloat16), (3, "float", torch.float32)])
def test_decoding_split_kv(monkeypatch, Lq, kind, dtype):
    """Few queries, many keys: the split-KV path (forced here with small thresholds) runs and is right, including
    splits whose keys are all masked (key padding, causal)."""
    _, splits = _small_decoding_thresholds(monkeypatch)
    B, H, Hkv, Lk = 2, 4, 2, 200
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, 32, dtype)
    mask, causal = _mask(kind, B, H, Lq, Lk, dtype)
    if kind == "key_padding":
        mask[1, ..., 50:] = False  # the later splits of batch 1 see no key at all
    check_sdpa("triton", q, k, v, mask, causal, enable_gqa=True)
    assert splits and min(splits) > 1, "the split-KV path did not run"


@needs_triton
def test_decoding_merge_of_many_splits(monkeypatch):
    """More splits than the merge sums at once (it goes through them in chunks), with dead splits among them."""
    _, splits = _small_decoding_thresholds(monkeypatch)
    # 1200 keys: splits of 64 keys at most (the GPU's fp32 key block), so over 16 on any device
    q, k, v = _qkv(1, 2, 1, 3, 1200, 16, torch.float32)
    mask = torch.rand(1, 1, 3, 1200, device=DEVICE) > 0.5
    mask[..., 100:400] = False  # whole splits see no key
    with torch.no_grad():
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="triton")
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        oracle = ref.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                                  enable_gqa=True)
    assert splits and min(splits) > 16, "fewer splits than one merge chunk"
    assert_close(out, expected, oracle)


@needs_triton
def test_decoding_finfo_min_mask_rows_are_uniform(monkeypatch):
    """A row masked with finfo.min everywhere merges to torch's uniform average over splits of unequal key counts:
    the sum of a split's row max (~ -3.4e38) and log row sum cannot resolve the log, so the merge must weigh the
    splits by their row sums kept apart from their maxima, and keep the two apart in the statistics it writes,
    from which the weights are rebuilt."""
    kernels, splits = _small_decoding_thresholds(monkeypatch)
    q, k, v = _qkv(1, 4, 2, 3, 150, 16, torch.float32)
    mask = torch.randn(1, 1, 3, 150, device=DEVICE)
    mask[..., 1, :] = torch.finfo(torch.float32).min
    with torch.no_grad():
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend="triton")
        with sdpa_kernel(SDPBackend.MATH):
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    _, n, keys = kernels._split_plan(q, k, mask)
    assert splits == [n] and n > 1 and 150 % keys, "no split-KV path with a partial last split"
    uniform = v.detach().mean(2).repeat_interleave(2, dim=1)
    torch.testing.assert_close(out[:, :, 1], uniform, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the merged row statistics give the weights: 1 / Lk each on that row
    with torch.no_grad():
        _, w = functional.scaled_dot_product_attention_with_weights(q, k, v, attn_mask=mask, enable_gqa=True,
                                                                     backend="triton")
    torch.testing.assert_close(w[:, :, 1], torch.full_like(w[:, :, 1], 1 / 150))
    torch.testing.assert_close(w, torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-2, -1) / 4 + mask, -1))


@needs_triton
def test_decoding_enough_heads_needs_no_split(monkeypatch):
    """With programs enough to fill the device already, decoding runs its small tile in one pass (no merge)."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "DECODE_MIN_LK", 64)
    q, k, v = _qkv(8, 8, 8, 2, 70, 16, torch.float16)
    assert kernels._split_plan(q, k)[1] == 1
    monkeypatch.setattr(kernels, "_combine", None)  # calling it would raise
    with torch.no_grad():  # the backward has no decoding path
        out = fa.scaled_dot_product_attention(q, k, v, backend="triton")
        assert_close(out, F.scaled_dot_product_attention(q, k, v),
                     ref.scaled_dot_product_attention(q.double(), k.double(), v.double()))


@needs_triton
def test_decoding_split_kv_dropout(monkeypatch):
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "DECODE_MIN_LK", 64)
    monkeypatch.setattr(kernels, "SPLIT_MIN_KEYS", 32)
    B, H, Lq, Lk, p = 1, 2, 4, 150, 0.2
    q, k, v = _qkv(B, H, H, Lq, Lk, 16, torch.float32)
    torch.manual_seed(5)
    out = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, backend="triton")
    keep = kernels.dropout_mask(_drawn_seed(5), p, B, H, Lq, Lk, DEVICE)
    expected = ref.scaled_dot_product_attention(*_detached((q, k, v), torch.float64), dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


class _RecordLaunches:
    """Stands in for a kernel (or its autotuner) and records each launch as (name, grid)."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)

    def __getitem__(self, grid):
        self.launches.append((self.name, grid))
        return self.kernel[grid]


@needs_triton
@pytest.mark.parametrize("programs", [1, 7, 32, 100, 264, 1000])
def test_decoding_splits_give_no_sm_more_than_two_programs(monkeypatch, programs):
    """On a 132-SM GPU the split count never puts more than 264 programs in flight (32 programs x 9 splits left
    24 SMs of the H200 with a third), and uses them: the next split count up would pass 264."""
    from types import SimpleNamespace

    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "properties", lambda device: SimpleNamespace(multi_processor_count=132))
    splits, keys = kernels._num_splits(programs, 1 << 20, torch.device("cuda", 0), 64)
    assert splits * programs <= max(264, programs) and keys % 64 == 0 and splits * keys >= 1 << 20
    assert splits == kernels.MAX_SPLITS or (splits + 1) * programs > 264


@needs_triton
@pytest.mark.parametrize("kind,dropout_p", [("float", 0.0), ("causal", 0.0), ("dead_rows", 0.2)])
def test_decoding_packs_the_gqa_group(monkeypatch, kind, dropout_p):
    """Decoding runs one program per (batch, kv head, row block, split) for all the query heads of a GQA group,
    rows head-major so a block holds parts of two heads: K and V are read once per group, and the results (even
    the dropout draws, counted per (b, h, i, j)) are those of one head at a time."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "DECODE_MIN_LK", 64)
    monkeypatch.setattr(kernels, "SPLIT_MIN_KEYS", 32)
    launches = []
    monkeypatch.setattr(kernels, "_attn_fwd", _RecordLaunches(kernels._attn_fwd, "fwd", launches))
    B, H, Hkv, Lq, Lk = 2, 8, 2, 7, 150  # 4 heads x 7 queries = 28 rows per kv head: one block or two of 16
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, 16, torch.float16)
    mask, causal = _mask(kind, B, H, Lq, Lk, torch.float16)
    if dropout_p == 0.0:
        check_sdpa("triton", q, k, v, mask, causal, enable_gqa=True)
    else:
        torch.manual_seed(7)
        with torch.no_grad():
            out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=True,
                                                  backend="triton")
        keep = kernels.dropout_mask(_drawn_seed(7), dropout_p, B, H, Lq, Lk, DEVICE)
        same, oracle = (ref.scaled_dot_product_attention(*_detached((q, k, v), dtype), attn_mask=mask,
                                                         dropout_p=dropout_p, enable_gqa=True, dropout_mask=keep)
                        for dtype in (torch.float16, torch.float64))
        assert_close(out, same, oracle)
    config, splits, _ = kernels._split_plan(q, k, mask, dropout_p)
    packed_blocks = math.ceil(H // Hkv * Lq / config["BLOCK_M"])  # the GPU's tile may hold the whole group
    assert packed_blocks < H // Hkv * math.ceil(Lq / config["BLOCK_M"])
    assert config["PACK_GQA"] and launches[0] == ("fwd", (packed_blocks * splits * B * Hkv,)), \
        "the heads shared no program"
    assert not kernels._split_plan(q.float(), k.float())[0]["PACK_GQA"]  # fp32: one head per program


@needs_triton
def test_launch_arithmetic_matches_triton():
    """The launchers' own cdiv and next_power_of_2 (triton's are constexpr_functions, slow on the host) agree
    with triton's."""
    import triton

    from fast_attention.kernels._device import cdiv, next_power_of_2

    for a in [*range(0, 70), 1023, 1024, 1025, 4097, 2**31 - 1]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 17, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


@needs_triton
def test_autotune_once_per_length_bucket(monkeypatch):
    """A new exact length inside a tuned power-of-two bucket reuses the bucket's config instead of benchmarking
    every config again (each step of KV-cached generation has a new Lk); a new bucket tunes."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    monkeypatch.setattr(kernels, "_tuned_configs", {})
    launches = []
    plain, tuned = kernels._KERNELS["fwd"]
    if kernels.INTERPRET:  # the interpreter has no timer (triton < 3.8 asks for one even when one config is left)
        monkeypatch.setitem(vars(tuned), "do_bench", lambda run, quantiles: (run(), [1.0] * len(quantiles))[1])
    monkeypatch.setitem(kernels._KERNELS, "fwd", (_RecordLaunches(plain, "plain", launches),
                                                  _RecordLaunches(tuned, "tuned", launches)))
    with torch.no_grad():
        for Lk in (40, 50, 70):
            q, k, v = _qkv(1, 2, 2, 9, Lk, 16, torch.float16)
            assert_close(fa.scaled_dot_product_attention(q, k, v, backend="triton"),
                         F.scaled_dot_product_attention(q, k, v),
                         ref.scaled_dot_product_attention(q.double(), k.double(), v.double()))
    assert [name for name, _ in launches] == ["tuned", "plain", "tuned"]


# ----------------------------------------------------------------------------------------------------------
# Tensor descriptors (the Hopper TMA path of the Triton forward; emulated by the interpreter on the CPU)
# ----------------------------------------------------------------------------------------------------------
def _spy_tma(monkeypatch, kernels):
    """Record, for each launch of a kernel with descriptor configs, (kernel, whether the config taken uses them)."""
    taken = []
    real_choice = kernels._tma_choice

    def choice(kind, configs, named):
        kept = real_choice(kind, configs, named)
        taken.append((kind, bool(kept[0].kwargs.get("TMA"))))
        return kept
    monkeypatch.setattr(kernels, "_tma_choice", choice)
    return taken


@needs_tma
@needs_triton
@pytest.mark.parametrize("kind,Hkv,Lq,Lk,D,layout", [
    ("none", 2, 17, 45, 24, "bhld"), ("causal", 1, 45, 17, 64, "blhd"), ("key_padding", 2, 33, 1, 80, "bhld"),
    ("float", 4, 3, 113, 32, "bhld"), ("dead_rows", 4, 29, 37, 16, "blhd")])
def test_tma_path_matches_pointer_loads(monkeypatch, kind, Hkv, Lq, Lk, D, layout):
    """FAST_ATTENTION_TMA=1 streams K, V (forward, dQ) and Q, dO (dK/dV) through tensor descriptors, zero-filled
    past the lengths and the head dim instead of masked: the same output and gradients as the pointer loads, bit
    for bit on the GPU, and right against the reference."""
    from fast_attention.kernels import attention as kernels

    taken = _spy_tma(monkeypatch, kernels)
    q, k, v = _qkv(2, 4, Hkv, Lq, Lk, D, torch.float16, layout=layout)
    mask, causal = _mask(kind, 2, 4, Lq, Lk, torch.float16)
    grad = torch.randn(2, 4, Lq, D, device=DEVICE, dtype=torch.float16)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setattr(kernels, "TMA_MODE", mode)
        q.grad = k.grad = v.grad = None
        torch.manual_seed(11)
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=0.1,
                                              enable_gqa=True, backend="triton")
        out.backward(grad)
        results[mode] = (out, q.grad, k.grad, v.grad)
    assert taken == [("fwd", False), ("dkdv", False), ("dq", False), ("fwd", True), ("dkdv", True), ("dq", True)]
    for name, a, b in zip(("output", "dq", "dk", "dv"), results["0"], results["1"]):
        if GPU:
            assert torch.equal(a, b), name
        else:
            # The interpreter's tl.dot is numpy's matmul, and OpenBLAS's AVX-512 kernels round differently for
            # different operand layouts, which the two paths give it (OPENBLAS_CORETYPE=Haswell: bit for bit).
            torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=name)
    monkeypatch.setattr(kernels, "TMA_MODE", "1")
    q.grad = k.grad = v.grad = None
    check_sdpa("triton", q, k, v, mask, causal, enable_gqa=True)
    assert all(used for _, used in taken[-3:])


@needs_tma
@needs_triton
def test_tma_only_where_the_copy_engine_can_read(monkeypatch):
    """Descriptors need 16-bit inputs, a unit head-dim stride and 16-byte aligned bases and strides; anything else
    takes the pointer loads, even with FAST_ATTENTION_TMA=1, and stays right."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "TMA_MODE", "1")
    taken = _spy_tma(monkeypatch, kernels)
    wide = torch.randn(1, 2, 40, 33, device=DEVICE, dtype=torch.float16)
    strided = torch.randn(1, 2, 40, 32, device=DEVICE, dtype=torch.float16)[..., ::2]
    cases = {
        "aligned": (_qkv(1, 2, 2, 9, 40, 24, torch.float16), True),
        "40-byte rows": (_qkv(1, 2, 2, 9, 40, 20, torch.float16), False),
        "float32": (_qkv(1, 2, 2, 9, 40, 24, torch.float32), False),
        "base off by 2 bytes": ((wide[..., :32], wide[..., 1:], wide[..., 1:]), False),
        "head-dim stride 2": ((wide[..., :16], strided, strided), False),
    }
    for name, ((q, k, v), expected) in cases.items():
        with torch.no_grad():
            out = fa.scaled_dot_product_attention(q, k, v, backend="triton")
            assert_close(out, F.scaled_dot_product_attention(q, k, v),
                         ref.scaled_dot_product_attention(q.double(), k.double(), v.double()), name)
        assert taken[-1] == ("fwd", expected), name


@needs_triton
def test_tma_forced_falls_back_where_no_descriptor_config_fits(monkeypatch):
    """FAST_ATTENTION_TMA=1 on a GPU: where the fit estimate rejects every descriptor config (head dims over 128),
    the pointer-load configs stand in; the smallest descriptor config needs over 227 KB of shared memory on sm_90
    for dK/dV and dQ with a mask and dropout at head dim 256, and launching it raises."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "INTERPRET", False)  # the GPU configs and their pruning, run on the CPU
    monkeypatch.setattr(kernels, "TMA_MODE", "1")
    monkeypatch.setattr(kernels, "_tma_ok", lambda kind, named: True)
    q = torch.empty(0, dtype=torch.float16)
    for kind in ("fwd", "dkdv", "dq"):
        for d, descriptors in ((64, True), (256, False)):
            named = dict(Q=q, BLOCK_D=d, BLOCK_DV=d, MASK_KIND=2, DROPOUT=True)
            kept = kernels._prune(kind)(kernels._configs(kind), named)
            assert kept and all(c.kwargs["TMA"] == descriptors for c in kept), (kind, d, kept)


@needs_triton
def test_concurrent_tuning_keeps_each_buckets_own_config(monkeypatch):
    """The autotuner keeps its winner on itself (best_config): two threads tuning two buckets at once must each
    store their own winner, not the other's (a config pruned for another head dim)."""
    import threading

    from fast_attention.kernels import attention as kernels

    winners = {16: "config for D16", 256: "config for D256"}
    both_benchmarking = threading.Barrier(2)

    class Tuner:
        cache: dict = {}
        best_config = None

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.best_config = winners[kwargs["HEAD_DIM"]]
                try:  # benchmarking releases the GIL: let the other thread run meanwhile, if it can
                    both_benchmarking.wait(timeout=0.5)
                except threading.BrokenBarrierError:
                    pass
            return run

    class Plain:
        arg_names = ["Q"]

    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    monkeypatch.setattr(kernels, "_tuned_configs", {})
    monkeypatch.setattr(kernels, "_tma_ok", lambda kind, named: False)
    monkeypatch.setitem(kernels._KERNELS, "fwd", (Plain(), Tuner()))
    q = torch.empty(0, dtype=torch.float16)
    flags = dict(Lq=100, Lk=100, HEAD_DIM_V=64, IS_CAUSAL=False, MASK_KIND=0, WINDOW=False, DROPOUT=False,
                 SOFTCAP=False, VARLEN=False, PAGED=False)
    threads = [threading.Thread(target=kernels._launch, args=("fwd", (1,), q), kwargs=dict(flags, HEAD_DIM=d))
               for d in winners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = {bucket[4 + kernels._TUNING_KEY.index("HEAD_DIM")]: c for bucket, c in kernels._tuned_configs.items()}
    assert stored == winners


def test_backward_is_deterministic(backend):
    q, k, v = _qkv(2, 4, 1, 45, 37, 32, torch.float16)
    grad = torch.randn(2, 4, 45, 32, device=DEVICE, dtype=torch.float16)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        torch.manual_seed(3)
        out = fa.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True,
                                              backend=backend)
        out.backward(grad)
        grads.append((q.grad.clone(), k.grad.clone(), v.grad.clone()))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("args,kwargs,error,words", [
    ((_x(2, 2, 5, 8), _x(3, 2, 6, 8), _x(3, 2, 6, 8)), {}, ValueError, "batch"),
    ((_x(2, 4, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {}, ValueError, "enable_gqa"),
    ((_x(2, 3, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"enable_gqa": True}, ValueError, "divisible"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 16), _x(2, 2, 6, 8)), {}, ValueError, "head dim"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8, dtype=torch.float16), _x(2, 2, 6, 8)), {}, TypeError, "dtype"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"attn_mask": torch.ones(5, 7, dtype=torch.bool)},
     ValueError, "attn_mask"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"attn_mask": _x(5, 6, dtype=torch.float16)},
     TypeError, "attn_mask must be bool, float32 or query's dtype"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"dropout_p": 1.0}, NotImplementedError, "dropout_p=1"),
    ((_x(2, 4, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"enable_gqa": True, "sinks": _x(2)}, ValueError,
     r"sinks must have shape \(4,\), one per query head"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"sinks": torch.zeros(2, dtype=torch.int64)}, TypeError,
     "sinks must be a floating-point tensor"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"softcap": -1.0}, ValueError, "softcap must be a positive "
                                                                                      "finite number"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"softcap": float("inf")}, ValueError, "softcap"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"softcap": "30"}, TypeError, "softcap"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"window_size": 4}, TypeError,
     "window_size must be None or a pair of ints"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"window_size": (4, 2.0)}, TypeError, "window_size"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"window_size": (4, 2, 1)}, TypeError, "window_size"),
    ((_x(2, 2, 5, 8), _x(2, 2, 6, 8), _x(2, 2, 6, 8)), {"window_size": (-2, 0)}, ValueError,
     "window_size sides must be >= 0, or -1 for no bound"),
])
def test_bad_input(backend, args, kwargs, error, words):
    with pytest.raises(error, match=words):
        fa.scaled_dot_product_attention(*args, **kwargs, backend=backend)


@needs_triton
def test_huge_row_strides_are_read_from_a_copy():
    """A row stride of 2^22 elements or more, with a column stride as large, could wrap the kernels' int32 tile
    offsets (row x row stride + column x column stride): such inputs are copied first (a mask is refused instead:
    a copy would materialize its broadcast dims)."""
    from fast_attention.kernels import attention as kernels

    stride = kernels._MAX_TILE_STRIDE
    storage = torch.randn(stride + 64, device=DEVICE, dtype=torch.float16)
    k = storage.as_strided((1, 1, 2, 16), (0, 0, stride, 1))  # two keys 2^22 elements apart
    assert kernels._tileable(k).is_contiguous() and kernels._tileable(k.contiguous()).data_ptr() != k.data_ptr()
    q = torch.randn(1, 1, 3, 16, device=DEVICE, dtype=torch.float16)
    with torch.no_grad():
        assert_close(fa.scaled_dot_product_attention(q, k, k, backend="triton"),
                     F.scaled_dot_product_attention(q, k, k),
                     ref.scaled_dot_product_attention(q.double(), k.double(), k.double()))
    mask = torch.ones(stride + 64, device=DEVICE, dtype=torch.bool).as_strided((3, 2), (1, stride))
    with pytest.raises(NotImplementedError, match="strides"):
        fa.scaled_dot_product_attention(q, k, k, attn_mask=mask, backend="triton")


def test_nan_in_the_mask_gives_nan_as_torch(backend):
    """torch propagates a NaN in an additive mask to its row (on the GPU, min/max would drop it unless told)."""
    q, k, v = _qkv(1, 2, 2, 5, 7, 16, torch.float32)
    mask = torch.zeros(5, 7, device=DEVICE)
    mask[2, 3] = float("nan")
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out.isnan(), expected.isnan()) and out[:, :, 2].isnan().all()
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num())


def test_nan_in_the_mask_gives_nan_in_decoding(backend):
    """The same in decoding (few queries, 1024 keys or more), where the split that meets the NaN must not be merged
    away as a split without keys."""
    q, k, v = _qkv(1, 4, 2, 2, 1100, 16, torch.float16)
    mask = torch.zeros(2, 1100, device=DEVICE, dtype=torch.float16)
    mask[1, 700] = float("nan")
    with torch.no_grad():
        out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend=backend)
    assert out[:, :, 1].isnan().all() and not out[:, :, 0].isnan().any()


@pytest.mark.parametrize("shapes,kwargs", [
    (((5, 8), (6, 8), (6, 8)), {}),  # 2-D: no batch, no heads
    (((2, 3, 2, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 4)), {"is_causal": True}),  # 5-D, Ev != E
    (((2, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {}),  # key and value broadcast over the batch (stride 0)
    (((2, 2, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8)), {}),  # one key / value head for every query head
    (((2, 1, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8)), {}),  # one query head for every key head
    (((2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)), {}),  # mixed ranks
    (((3, 1, 4, 5, 8), (1, 2, 2, 6, 8), (1, 2, 2, 6, 8)), {"enable_gqa": True}),
    (((2, 3, 2, 5, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8)), {"attn_mask": (3, 1, 5, 6)}),
])
def test_any_rank_and_broadcast_batch_dims_as_torch(backend, shapes, kwargs):
    """torch SDPA takes (..., L, E) of any rank from 2, broadcasting the dims before the last two (enable_gqa: the
    head dim divides instead): the same output shape, values and gradients."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    D = 32 if backend == "cuda" else 8
    q, k, v = (torch.randn(*s[:-1], D if s[-1] == 8 else s[-1], device=DEVICE, dtype=dtype, requires_grad=True)
               for s in shapes)
    if backend == "cuda" and v.shape[-1] != D:
        pytest.skip("the CUDA kernels take Ev == E")
    if "attn_mask" in kwargs:
        kwargs = {"attn_mask": torch.rand(kwargs["attn_mask"], device=DEVICE) > 0.3}
    check_sdpa(backend, q, k, v, **kwargs)


@needs_triton
def test_triton_rejects_what_it_cannot_run():
    q = _x(1, 2, 5, 320)
    with pytest.raises(NotImplementedError, match="320"):
        fa.scaled_dot_product_attention(q, q, q, backend="triton")
    q64 = _x(1, 2, 5, 16, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        fa.scaled_dot_product_attention(q64, q64, q64, backend="triton")
    # With no backend named, such calls fall back to one that runs them.
    assert fa.scaled_dot_product_attention(q, q, q).shape == (1, 2, 5, 320)
    # Positions are int32 in the kernels: a length that a block past it would wrap is refused (shapes only).
    from fast_attention.kernels import attention as kernels

    q, k = torch.empty(1, 1, 1, 64, device="meta"), torch.empty(1, 1, kernels.MAX_LENGTH + 1, 64, device="meta")
    assert "int32" in kernels.unsupported(q, k, k) and kernels.unsupported(q, k[:, :, 1:], k[:, :, 1:]) is None


# ----------------------------------------------------------------------------------------------------------
# The full product (GPU only)
# ----------------------------------------------------------------------------------------------------------
def _dtype_id(dtype):  # readable test ids, so that `-k "bfloat16 and D128"` selects a slice of the grid
    return str(dtype).removeprefix("torch.")


def _dim_id(d):
    return f"D{d}"


@pytest.fixture
def fixed_configs(monkeypatch):
    """One config per kernel instead of autotuning every shape, so the grid compiles in minutes."""
    if TRITON:
        from fast_attention.kernels import attention as kernels

        monkeypatch.setattr(kernels, "AUTOTUNE", False)


# The shapes vary fastest: consecutive tests share their kernels (head dim, dtype, mask kind), so the xdist worker
# that takes a run of them compiles each kernel once, rather than every worker compiling nearly every kernel.
@gpu_only
@pytest.mark.parametrize("Lq,Lk,Hkv", [(1, 1, 4), (17, 257, 2), (257, 17, 1), (113, 113, 4), (1, 1500, 2),
                                       (1023, 1025, 1)])
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("D", [16, 64, 80, 128, 256], ids=_dim_id)
def test_full_grid_gpu(backend, fixed_configs, kind, dtype, D, Lq, Lk, Hkv):
    q, k, v = _qkv(2, 4, Hkv, Lq, Lk, D, dtype, layout="blhd" if D % 32 else "bhld")
    mask, causal = _mask(kind, 2, 4, Lq, Lk, dtype)
    check_sdpa(backend, q, k, v, mask, causal, enable_gqa=True)


@gpu_only
@needs_triton
@pytest.mark.parametrize("Lq,Lk,Hkv", [(17, 257, 2), (257, 17, 1), (1023, 1025, 4)])  # fastest, as above
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("D", [16, 64, 80, 128, 256], ids=_dim_id)
def test_tma_grid_gpu(fixed_configs, monkeypatch, kind, dtype, D, Lq, Lk, Hkv):
    """The tensor-descriptor forward (sm_90+) on every mask kind and head dim."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "TMA_MODE", "1")
    # (B, L, H, D) storage for half of it: descriptors whose head stride is below their row stride
    q, k, v = _qkv(2, 4, Hkv, Lq, Lk, D, dtype, layout="blhd" if D in (64, 80) else "bhld")
    mask, causal = _mask(kind, 2, 4, Lq, Lk, dtype)
    check_sdpa("triton", q, k, v, mask, causal, enable_gqa=True)


@gpu_only
@needs_triton
@pytest.mark.parametrize("D,causal,dtype", [(64, True, torch.float16), (128, False, torch.bfloat16),
                                             (256, True, torch.float16)])
def test_autotuned_gpu(monkeypatch, D, causal, dtype):
    """The autotuned configs (each benchmarked once per shape; off elsewhere in the tests) give correct results
    too, whichever wins, pointer loads or tensor descriptors."""
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "AUTOTUNE", True)
    q, k, v = _qkv(2, 8, 2, 1000, 1000, D, dtype)
    check_sdpa("triton", q, k, v, is_causal=causal, enable_gqa=True)
