"""Property-based fuzzing (hypothesis): random shapes, dims, dtypes and mask kinds for every op on every backend,
each checked by the same helpers (and tolerance rule) as the slice tests."""
import pytest
import torch

import fast_attention as fa
from fast_attention import reference as ref

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (pip install -e .[test])")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_attention import TMA_EMULATED, _mask, _qkv, check_beyond_torch, check_sdpa  # noqa: E402
from test_layernorm import check_norm  # noqa: E402
from test_softmax import check_softmax  # noqa: E402
from test_varlen import DEVICE, _offsets, _pages, check_varlen  # noqa: E402
from tolerance import assert_close  # noqa: E402

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# The `backend` fixture is the same for every example of a test, which is what we want.
FUZZ = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3), dim=st.integers(-3, 2), dtype=DTYPES,
       scale=st.sampled_from([1.0, 30.0]))
def test_softmax_fuzz(backend, device, shape, dim, dtype, scale):
    dim = dim % len(shape)
    x = (torch.randn(shape, device=device) * scale).to(dtype)
    check_softmax(x, dim, backend)


@FUZZ
@given(rows=st.integers(1, 6), normalized=st.lists(st.integers(1, 40), min_size=1, max_size=2), dtype=DTYPES,
       kind=st.sampled_from(["layer_norm", "rms_norm"]), weight=st.booleans(), bias=st.booleans(),
       shift=st.sampled_from([0.0, 3.0]))
def test_norm_fuzz(backend, device, rows, normalized, dtype, kind, weight, bias, shift):
    x = (torch.randn(rows, *normalized, device=device) + shift).to(dtype)
    w = torch.randn(normalized, device=device).to(dtype) if weight else None
    b = torch.randn(normalized, device=device).to(dtype) if bias and kind == "layer_norm" else None
    if kind == "layer_norm":
        check_norm(kind, backend, x, normalized, w, b)
    else:
        check_norm(kind, backend, x, normalized, w, eps=None)


@FUZZ
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), Lq=st.integers(1, 40),
       Lk=st.integers(1, 40), D=st.sampled_from([16, 24, 40, 64]), dtype=DTYPES,
       kind=st.sampled_from(["none", "causal", "bool", "key_padding", "float", "hf_padding", "dead_rows"]),
       layout=st.sampled_from(["bhld", "blhd"]), tma=st.booleans())
def test_attention_fuzz(backend, monkeypatch, B, Hkv, group, Lq, Lk, D, dtype, kind, layout, tma):
    # CUDA's kernels take 16-bit inputs at their head dims: other draws would stop the run at its first example.
    assume(backend != "cuda" or (dtype != torch.float32 and D in (16, 64)))
    if backend == "triton":  # the tensor-descriptor path where the inputs allow it, or pointer loads only
        from fast_attention.kernels import attention as kernels

        monkeypatch.setattr(kernels, "TMA_MODE", "1" if tma and TMA_EMULATED else "0")
    H = Hkv * group
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype, layout=layout)
    attn_mask, is_causal = _mask(kind, B, H, Lq, Lk, dtype)
    check_sdpa(backend, q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=group > 1)


@FUZZ
@given(Lq=st.integers(1, 100), Lk=st.integers(1, 100), dtype=DTYPES,
       kind=st.sampled_from(["none", "causal", "key_padding", "float", "hf_padding", "dead_rows"]),
       left=st.integers(-1, 40), right=st.integers(-1, 40), layout=st.sampled_from(["bhld", "blhd"]),
       tma=st.booleans())
def test_window_fuzz(backend, monkeypatch, Lq, Lk, dtype, kind, left, right, layout, tma):
    """Local windows over lengths of several tiles (32 in the interpreter): the key and query blocks each program
    reads, bounded by the windows of its block, in the forward, both backward kernels and the weights."""
    assume(backend != "cuda" or dtype != torch.float32)  # the CUDA kernels' dtypes
    if backend == "triton":
        from fast_attention.kernels import attention as kernels

        monkeypatch.setattr(kernels, "TMA_MODE", "1" if tma and TMA_EMULATED else "0")
    q, k, v = _qkv(1, 2, 1, Lq, Lk, 16, dtype, layout=layout)
    attn_mask, is_causal = _mask(kind, 1, 2, Lq, Lk, dtype)
    check_beyond_torch(backend, q, k, v, attn_mask, is_causal, window_size=(left, right))


@FUZZ
@given(lengths=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=3),
       Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), D=st.sampled_from([16, 24, 40, 64]), dtype=DTYPES,
       window=st.tuples(st.integers(-1, 40), st.integers(-1, 40)), strided=st.booleans(), tma=st.booleans(),
       sinks=st.booleans(), softcap=st.sampled_from([None, None, 2.0]), num_splits=st.sampled_from([None, 1, 2, 3]))
def test_varlen_fuzz(backend, monkeypatch, lengths, Hkv, group, D, dtype, window, strided, tma, sinks, softcap,
                     num_splits):
    """Packed sequences of random lengths (none among them), Lq != Lk, windows aligned bottom-right, strided
    layouts, the descriptor path, sinks, the logit cap and split keys: values, logsumexp and every gradient."""
    assume(backend != "cuda" or (dtype != torch.float32 and D in (16, 64)))  # the CUDA kernels' dtypes, head dims
    if backend == "triton":
        from fast_attention.kernels import attention as kernels

        monkeypatch.setattr(kernels, "TMA_MODE", "1" if tma and TMA_EMULATED else "0")
    lengths_q, lengths_k = zip(*lengths)
    check_varlen(backend, list(lengths_q), list(lengths_k), Hkv * group, Hkv, D, dtype, window, strided=strided,
                 sinks=sinks, softcap=softcap, num_splits=num_splits)


@FUZZ
@given(seqs=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 70)), min_size=1, max_size=3),
       page_size=st.integers(1, 40), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]), dtype=DTYPES,
       window=st.tuples(st.integers(-1, 30), st.integers(-1, 30)), num_splits=st.sampled_from([None, 1, 2, 3]))
def test_paged_kv_cache_fuzz(backend, seqs, page_size, Hkv, group, dtype, window, num_splits):
    """Paged KV caches (block_table) of any page size, from one row to more than a sequence: sequences without
    queries or keys, part-filled last pages, windows, GQA and split keys; the output against the float64 reference
    on the used keys packed end to end (forward only: the caches take no gradient)."""
    assume(backend != "cuda" or dtype != torch.float32)  # the CUDA kernels' 16-bit
    lengths_q, used = (list(t) for t in zip(*seqs))
    H, D = Hkv * group, 16
    q = torch.randn(sum(lengths_q), H, D, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(sum(used), Hkv, D, dtype=dtype, device=q.device) for _ in range(2))
    k_pool, v_pool, table = _pages(k, v, used, page_size)
    cu_q, cu_used = _offsets(lengths_q), _offsets(used)
    kwargs = dict(window_size=window, enable_gqa=True)
    out = fa.varlen_attn(q, k_pool, v_pool, cu_q, None, max(lengths_q), max(used),
                         seqused_k=cu_used.diff(), block_table=table, num_splits=num_splits, backend=backend, **kwargs)
    base = ref.varlen_attn(q, k, v, cu_q, cu_used, **kwargs)
    exact = ref.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_used, **kwargs)
    assert_close(out, base, exact, "output")


@FUZZ
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2]), Lq=st.integers(1, 30),
       Lk=st.integers(1, 30), D=st.sampled_from([16, 40, 64]), dtype=DTYPES,
       kind=st.sampled_from(["none", "causal", "key_padding", "float", "hf_padding", "dead_rows"]),
       sinks=st.booleans(), softcap=st.sampled_from([None, 0.5, 5.0]),
       window=st.none() | st.tuples(st.integers(-1, 12), st.integers(-1, 12)))
def test_sinks_and_softcap_fuzz(backend, B, Hkv, group, Lq, Lk, D, dtype, kind, sinks, softcap, window):
    """Learned sinks, the logit cap and a local window, alone or together: values, weights and every gradient,
    the sinks'.

    With a cap the queries are scaled up, for scores past it. Not without one: scores that large make one key take
    nearly all of a row, where dS = P (dP - D) cancels and D = rowsum(dO * O) carries the rounding of the 16-bit
    output, as in every flash backward (torch's CUDA flash kernel reads the rounded output too), while the formula
    written out in bfloat16 loses less there (Lq 1, 12 keys, q x 4: dK 3x over the bound, sinks or not)."""
    assume(backend != "cuda" or (dtype != torch.float32 and D in (16, 64) and softcap is None and window is None))
    H = Hkv * group
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype)
    if softcap:
        with torch.no_grad():
            q *= 4
    attn_mask, is_causal = _mask(kind, B, H, Lq, Lk, dtype)
    sink_values = torch.randn(H, device=q.device, requires_grad=True) if sinks else None
    check_beyond_torch(backend, q, k, v, attn_mask, is_causal, sinks=sink_values, softcap=softcap,
                       window_size=window)


@FUZZ
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), group=st.sampled_from([1, 3, 4]), Lq=st.integers(1, 16),
       Lk=st.integers(16, 300), D=st.sampled_from([16, 40, 64]), dtype=DTYPES,
       kind=st.sampled_from(["none", "causal", "key_padding", "float", "hf_padding", "dead_rows"]))
def test_decoding_fuzz(monkeypatch, B, Hkv, group, Lq, Lk, D, dtype, kind):
    """The split-KV decoding path of the Triton forward (thresholds lowered so that small caches take it), with
    its GQA-packed rows; values and gradients (the backward is the regular one)."""
    if "triton" not in fa.available_backends():
        pytest.skip("the Triton backend is not available here")
    from fast_attention.kernels import attention as kernels

    monkeypatch.setattr(kernels, "DECODE_MIN_LK", 16)
    monkeypatch.setattr(kernels, "SPLIT_MIN_KEYS", 32)
    H = Hkv * group
    q, k, v = _qkv(B, H, Hkv, Lq, Lk, D, dtype)
    attn_mask, is_causal = _mask(kind, B, H, Lq, Lk, dtype)
    check_sdpa("triton", q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=group > 1)
