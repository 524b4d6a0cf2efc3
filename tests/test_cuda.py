"""The CUDA C++ backend (csrc/, fast_attention._C, fast_attention/cuda_backend.py).

On any machine: the extension imports when it was built, every _C entry point rejects CPU tensors naming the
argument, backend="cuda" on CPU tensors is a clear error, and unsupported() explains what the kernels skip.
On a GPU: every kernel against the float64 reference under tests/tolerance.py's rule, forward and gradients,
with odd sizes, non-contiguous inputs, the long-row paths, masks, GQA, and against the Triton backend.
"""
import importlib.util
import itertools

try:
    import numpy as np
except ImportError:  # only the fragment-layout model below needs it
    np = None

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fast_attention as fa
from fast_attention import reference
from fast_attention.functional import scaled_dot_product_attention_with_weights
from tolerance import assert_close

BUILT = importlib.util.find_spec("fast_attention._C") is not None
NOT_BUILT = "fast_attention._C was not built (no nvcc at install time, FAST_ATTENTION_SKIP_CUDA=1, or not installed)"
GPU = torch.cuda.is_available() and BUILT and "cuda" in fa.available_backends()
needs_built = pytest.mark.skipif(not BUILT, reason=NOT_BUILT)
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and the built extension")


# ------------------------------------------------------------------------------------------ any machine
@needs_built
def test_extension_imports_and_backend_module_loads():
    from fast_attention import _C, cuda_backend

    for name in ("softmax_forward", "softmax_backward", "layer_norm_forward", "layer_norm_backward",
                 "rms_norm_forward", "rms_norm_backward", "attention_forward", "attention_backward",
                 "attention_weights", "varlen_forward", "varlen_backward"):
        assert callable(getattr(_C, name)), name
    assert 64 in cuda_backend.HEAD_DIMS and 128 in cuda_backend.HEAD_DIMS


def _cpu_calls():
    x = torch.randn(3, 5)
    q = torch.randn(1, 2, 4, 64, dtype=torch.float16)
    stats = torch.zeros(2, 1, 2, 4)
    packed, cu = q[0].transpose(0, 1), torch.tensor([0, 4], dtype=torch.int32)
    return {
        "softmax_forward": (("x",), lambda C: C.softmax_forward(x)),
        "softmax_backward": (("y",), lambda C: C.softmax_backward(x, x)),
        "layer_norm_forward": (("x",), lambda C: C.layer_norm_forward(x, None, None, 1e-5)),
        "layer_norm_backward": (("mean", "x"), lambda C: C.layer_norm_backward(x, x, None, x[:, 0], x[:, 0], False)),
        "rms_norm_forward": (("x",), lambda C: C.rms_norm_forward(x, None, 1e-5)),
        "rms_norm_backward": (("x",), lambda C: C.rms_norm_backward(x, x, None, x[:, 0])),
        "attention_forward": (("query",), lambda C: C.attention_forward(q, q, q, None, False, 0.125)),
        "attention_backward": (("query",), lambda C: C.attention_backward(q, q, q, q, q, stats, None, False, 0.125)),
        "attention_weights": (("query",), lambda C: C.attention_weights(q, q, stats, None, False, 0.125)),
        "varlen_forward": (("query",), lambda C: C.varlen_forward(packed, packed, packed, cu, cu, 4, 4, 0.125)),
        "varlen_backward": (("query",), lambda C: C.varlen_backward(packed, packed, packed, packed, packed,
                                                                    stats[:, 0], cu, cu, 4, 4, 0.125)),
    }


@needs_built
@pytest.mark.parametrize("name", sorted(_cpu_calls()))
def test_cpu_tensors_are_rejected_naming_the_argument(name):
    from fast_attention import _C

    names, call = _cpu_calls()[name]
    with pytest.raises(RuntimeError, match=rf"fast_attention\._C\.{name}: ({'|'.join(names)}) must be a CUDA "
                                           rf"tensor, got a tensor on cpu"):
        call(_C)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_cuda_is_not_available_without_a_gpu():
    assert "cuda" not in fa.available_backends()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("op", ["softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention",
                                "varlen_attn", "varlen_attn paged"])
def test_backend_cuda_on_cpu_tensors_is_a_clear_error(op):
    x = torch.randn(2, 3, 8, 64, dtype=torch.float16)
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    pool, table, used = x.reshape(4, 4, 3, 64), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), cu.diff()
    call = {
        "softmax": lambda: fa.softmax(x, backend="cuda"),
        "layer_norm": lambda: fa.layer_norm(x, (64,), backend="cuda"),
        "rms_norm": lambda: fa.rms_norm(x, (64,), backend="cuda"),
        "scaled_dot_product_attention": lambda: fa.scaled_dot_product_attention(x, x, x, backend="cuda"),
        "varlen_attn": lambda: fa.varlen_attn(*[x[0].transpose(0, 1)] * 3, cu, cu, 5, 5, backend="cuda"),
        "varlen_attn paged": lambda: fa.varlen_attn(x[0].transpose(0, 1), pool, pool, cu, None, 5, 5, seqused_k=used,
                                                    block_table=table, backend="cuda"),
    }[op]
    name = "varlen_attention" if op.startswith("varlen_attn") else op  # the op's (torch.ops.fast_attention.*)
    with pytest.raises(RuntimeError, match=rf"fast_attention\.{name}: backend='cuda' cannot run this call: it runs "
                                           rf"on CUDA tensors and the inputs are on cpu"):
        call()


@needs_built
def test_unsupported_gives_reasons():
    from fast_attention import cuda_backend

    def attn(E=64, Ev=None, dtype=torch.float16, dropout_p=0.0, mask_dtype=None, softcap=0.0, window=None,
             mask_grad=False):
        q = torch.empty(1, 2, 3, E, dtype=dtype)
        v = torch.empty(1, 2, 3, Ev or E, dtype=dtype)
        mask = None if mask_dtype is None else torch.zeros(3, 3, dtype=mask_dtype)
        return cuda_backend.unsupported("scaled_dot_product_attention", query=q, key=q, value=v, attn_mask=mask,
                                        dropout_p=dropout_p, is_causal=False, softcap=softcap, window=window,
                                        mask_grad=mask_grad)

    assert attn() is None and attn(E=128, dtype=torch.bfloat16) is None
    assert "float16 or bfloat16" in attn(dtype=torch.float32)
    assert "head dim 48" in attn(E=48) and attn(E=80) is None and attn(E=16) is None
    assert "value's head dim (32)" in attn(Ev=32)
    assert attn(dropout_p=0.1) is None  # the Triton kernels' decisions (tests/test_cuda_emulated.py)
    assert attn(mask_dtype=torch.bool) is None and attn(mask_dtype=torch.float16) is None
    assert "attn_mask in query's dtype" in attn(mask_dtype=torch.float32)  # torch allows it; Triton runs it
    assert attn(softcap=30.0) is None and attn(window=(8, -1)) is None and attn(window=(0, 3), softcap=2.0) is None
    # the dropout kernels leave the cap and the window out: backend=None then runs Triton
    assert "no dropout with a logit cap (softcap) or a local window" in attn(softcap=30.0, dropout_p=0.1)
    assert "no dropout with a logit cap (softcap) or a local window" in attn(window=(8, -1), dropout_p=0.1)
    assert attn(mask_dtype=torch.float16, mask_grad=True) is None  # dS from the dQ kernel
    assert "float attn_mask with a logit cap" in attn(mask_dtype=torch.float16, mask_grad=True, softcap=2.0)

    def packed(E=64, dtype=torch.float16):
        q = torch.empty(7, 2, E, dtype=dtype)
        return cuda_backend.unsupported("varlen_attention", query=q, key=q, value=q, max_q=7, max_k=7,
                                        window=(3, 0), softcap=2.0)

    assert packed() is None and packed(E=128, dtype=torch.bfloat16) is None
    assert "float16 or bfloat16" in packed(dtype=torch.float32) and "head dim 48" in packed(E=48)
    x64 = torch.empty(2, 3, dtype=torch.float64)
    assert "float64" in cuda_backend.unsupported("softmax", input=x64)
    assert "float64" in cuda_backend.unsupported("layer_norm", input=x64, weight=None, bias=None)
    assert "float64" in cuda_backend.unsupported("rms_norm", input=x64, weight=None)
    assert cuda_backend.unsupported("softmax", input=x64.float()) is None


@needs_built
def test_gpus_older_than_sm80_route_every_op_elsewhere(monkeypatch):
    """The build has sm_80+ code only: on an older GPU the row ops must be unsupported too, not fail at launch."""
    from types import SimpleNamespace

    from fast_attention import cuda_backend

    monkeypatch.setattr(cuda_backend, "_capability", lambda device: (7, 5))
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.float16, shape=(2, 3, 4, 64))
    for op, args in [("softmax", dict(input=x)), ("layer_norm", dict(input=x, weight=None, bias=None)),
                     ("rms_norm", dict(input=x, weight=None)),
                     ("scaled_dot_product_attention", dict(query=x, key=x, value=x))]:
        assert "sm_75" in cuda_backend.unsupported(op, **args), op
    monkeypatch.setattr(cuda_backend, "_capability", lambda device: (8, 0))
    assert cuda_backend.unsupported("softmax", input=x) is None


def _lane_maps():
    """The per-lane index functions of csrc/attention/primitives.cuh (a_row, bn_col, frag_col, ...), as Python."""
    import pathlib
    import re

    src = (pathlib.Path(__file__).parents[1] / "csrc" / "attention" / "primitives.cuh").read_text()
    found = re.findall(r"int (\w+)\(((?:int \w+(?:, )?)+)\) \{ return ([^;]+); \}", src)
    return {name: eval(f"lambda {args.replace('int ', '')}: {body.replace('/', '//')}")  # noqa: S307
            for name, args, body in found}


def _ldmatrix_x4(smem, addr, trans):
    """PTX ldmatrix.x4 (.trans): lanes 8i..8i+7 address the rows of 8x8 matrix i; register i of lane l gets
    elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of matrix i (of its transpose with .trans)."""
    regs = [[None] * 4 for _ in range(32)]
    for i in range(4):
        mat = np.array([smem[r, c:c + 8] for r, c in addr[8 * i: 8 * i + 8]])
        mat = mat.T if trans else mat
        for lane in range(32):
            regs[lane][i] = (mat[lane // 4, 2 * (lane % 4)], mat[lane // 4, 2 * (lane % 4) + 1])
    return regs


def _mma_16816(acc, a, b0, b1):
    """PTX mma.m16n8k16 fragments: A reg j of lane (g, c) holds row g + 8(j%2), cols 2c + 8(j//2) + {0, 1}; B reg
    j holds rows (k) 2c + 8j + {0, 1} of column g; C element e holds (g + 8(e//2), 2c + e%2)."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, c = lane // 4, lane % 4
        for j in range(4):
            A[g + 8 * (j % 2), 2 * c + 8 * (j // 2): 2 * c + 8 * (j // 2) + 2] = a[lane][j]
        for j, b in enumerate((b0, b1)):
            B[2 * c + 8 * j: 2 * c + 8 * j + 2, g] = b[lane]
    prod = A @ B
    for lane in range(32):
        for e in range(4):
            acc[lane][e] += prod[lane // 4 + 8 * (e // 2), 2 * (lane % 4) + e % 2]


def _assemble(frags, f):
    """C fragments frags[n-tile][lane][e] of a warp's 16-row tile -> the tile, placed by frag_row / frag_col."""
    tile = np.full((16, 8 * len(frags)), np.nan)
    for nt, lane, e in itertools.product(range(len(frags)), range(32), range(4)):
        tile[f["frag_row"](lane, e), f["frag_col"](lane, nt, e)] = frags[nt][lane][e]
    return tile


@pytest.mark.parametrize("D,N,MT", [(32, 64, 1), (96, 32, 1), (128, 32, 1), (32, 64, 2), (128, 32, 2)])
@pytest.mark.skipif(np is None, reason="the fragment-layout model needs numpy")
def test_fragment_index_math_assembles_the_products(D, N, MT):
    """A per-lane model of the warp-tile GEMMs (mma_ss_bt(_m): S = A B^T from [row][k] and [n][k] tiles; mma_cs(_m):
    O = S V, S's C fragments reused as A fragments, V a [k][n] tile read with ldmatrix.trans) driven by the lane
    maps of primitives.cuh, on tiles of pitch D + 8 whose padding is NaN (never read). With MT tiles per warp (the
    forward's), warp w's tile mt is rows 16 (w MT + mt) .. + 15, and each B fragment serves every tile."""
    f = _lane_maps()
    rng = np.random.default_rng(0)
    a_rm, b_nk, v_kn = (rng.integers(-3, 4, (rows, D)).astype(float) for rows in (64 * MT, N, N))
    sA, sB, sV = (np.concatenate([t, np.full((len(t), 8), np.nan)], 1) for t in (a_rm, b_nk, v_kn))
    for warp in range(4):
        row0 = warp * 16 * MT  # sQw, the warp's first row
        s = [[[[0.0] * 4 for _ in range(32)] for _ in range(N // 8)] for _ in range(MT)]
        for kk in range(D // 16):
            a = [_ldmatrix_x4(sA, [(row0 + mt * 16 + f["a_row"](l), kk * 16 + f["a_col"](l)) for l in range(32)],
                              False) for mt in range(MT)]
            for np_ in range(N // 16):
                addr = [(np_ * 16 + f["bn_row"](l), kk * 16 + f["bn_col"](l)) for l in range(32)]
                b = list(zip(*_ldmatrix_x4(sB, addr, False)))
                for mt in range(MT):
                    _mma_16816(s[mt][2 * np_], a[mt], b[0], b[1])
                    _mma_16816(s[mt][2 * np_ + 1], a[mt], b[2], b[3])
        o = [[[[0.0] * 4 for _ in range(32)] for _ in range(D // 8)] for _ in range(MT)]
        for kk in range(N // 16):
            a = []
            for mt in range(MT):
                lo, hi = s[mt][2 * kk], s[mt][2 * kk + 1]  # c_to_a
                a.append([[tuple(lo[l][0:2]), tuple(lo[l][2:4]), tuple(hi[l][0:2]), tuple(hi[l][2:4])]
                          for l in range(32)])
            for np_ in range(D // 16):
                addr = [(kk * 16 + f["bt_row"](l), np_ * 16 + f["bt_col"](l)) for l in range(32)]
                b = list(zip(*_ldmatrix_x4(sV, addr, True)))
                for mt in range(MT):
                    _mma_16816(o[mt][2 * np_], a[mt], b[0], b[1])
                    _mma_16816(o[mt][2 * np_ + 1], a[mt], b[2], b[3])
        for mt in range(MT):
            s_tile = _assemble(s[mt], f)
            rows = slice(row0 + mt * 16, row0 + mt * 16 + 16)
            np.testing.assert_array_equal(s_tile, a_rm[rows] @ b_nk.T)
            np.testing.assert_array_equal(_assemble(o[mt], f), s_tile @ v_kn)


@pytest.mark.skipif(np is None, reason="the float32 model needs numpy")
def test_finfo_min_row_statistics_in_float32():
    """The float32 steps of csrc/attention (masked_score, the forward's row statistics, row_stats, prob) for a row
    whose every key carries bfloat16's finfo.min: the scores clamp to -FLT_MAX (log2(e) * finfo.min overflows),
    the max stays finite (not a dead row), and P rebuilt as (score - max) - log sum is torch's 1 / Lk, where the
    sum of the two (the logsumexp) would give 0 or 1, never 1 / Lk. A dead row's max (-inf) gives P = 0."""
    f32 = np.float32
    log2e, fmax = f32(1.4426950408889634), np.finfo(f32).max
    with np.errstate(over="ignore"):
        add2 = f32(torch.finfo(torch.bfloat16).min) * log2e
        assert add2 == -np.inf
        scores = np.array([0.5, -3.0, 7.25], dtype=f32) + max(add2, -fmax)  # masked_score
        assert (scores == -fmax).all()  # every key equal: torch's uniform average in the forward
        for n in (1, 3, 1000, 2 ** 20):
            row_max, log_sum = scores.max(), np.log2(f32(n))  # the forward, sum = n
            assert np.isfinite(row_max)
            p = np.exp2(np.minimum((scores - row_max) - log_sum, f32(0)))  # prob<true>
            np.testing.assert_allclose(p, 1 / n, rtol=1e-6)
            p_sum = np.exp2(np.minimum(scores - (row_max + log_sum), f32(0)))  # prob<false>: what EXACT avoids
            assert n == 1 or not np.allclose(p_sum, 1 / n), (n, p_sum)
    dead = np.exp2(np.minimum(np.array([-np.inf, 1.0], dtype=f32) - f32(np.inf), f32(0)))  # row_stats: max +inf
    assert (dead == 0).all()


# ---------------------------------------------------------------------------------------------- GPU only
LOW = [torch.float16, torch.bfloat16]
ROW_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, cols): odd widths (misaligned rows: scalar head and tail), rows of whole 16-byte vectors (the fused norm
# backward), with more rows than its grid has blocks (5000 x 64, 1000 x 8192) and at its 16K cap, and rows longer
# than one block's registers (the multi-block softmax and the chunked norms).
ROW_SHAPES = [(1, 1), (7, 33), (37, 1000), (5000, 64), (1000, 8192), (9, 16384), (4, 4096 + 3), (3, 20000),
              (2, 70001)]


def _grad(fn, inputs, grad_out):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad_out)


def _leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


@needs_gpu
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_softmax_matches_reference(dtype, shape):
    x = torch.randn(shape, device="cuda") * 4
    dy = torch.randn(shape, device="cuda")
    ours, g_ours = _grad(lambda t: fa.softmax(t, -1, backend="cuda"), _leaves(x, dtype=dtype), dy.to(dtype))
    base, g_base = _grad(lambda t: torch.softmax(t, -1), _leaves(x, dtype=dtype), dy.to(dtype))
    ref, g_ref = _grad(lambda t: reference.softmax(t, -1), _leaves(x, dtype=torch.float64), dy.double())
    assert_close(ours, base, ref, "softmax")
    assert_close(g_ours[0], g_base[0], g_ref[0], "softmax dx")


@needs_gpu
def test_softmax_non_contiguous_other_dim_and_masked_rows():
    x = torch.randn(6, 40, 9, device="cuda", dtype=torch.float16).transpose(0, 2)  # (9, 40, 6), dim=1 strided
    x[0, :, 0] = float("-inf")  # a row of only -inf: NaN, as torch
    ours, base = fa.softmax(x, 1, backend="cuda"), torch.softmax(x, 1)
    assert_close(ours, base, reference.softmax(x.double(), 1), "softmax")
    assert torch.isnan(ours[0, :, 0]).all()


def _norm_case(kind, dtype, shape, affine):
    rows, cols = shape
    x = torch.randn(rows, cols, device="cuda") * 3 + 1
    w = torch.randn(cols, device="cuda") if affine else None
    b = torch.randn(cols, device="cuda") if affine and kind == "layer_norm" else None
    dy = torch.randn(rows, cols, device="cuda")
    if kind == "layer_norm":
        ours_fn = lambda x, w, b: fa.layer_norm(x, (cols,), w, b, 1e-5, backend="cuda")  # noqa: E731
        torch_fn = lambda x, w, b: F.layer_norm(x, (cols,), w, b, 1e-5)  # noqa: E731
        ref_fn = lambda x, w, b: reference.layer_norm(x, (cols,), w, b, 1e-5)  # noqa: E731
    else:
        ours_fn = lambda x, w, b: fa.rms_norm(x, (cols,), w, 1e-6, backend="cuda")  # noqa: E731
        torch_fn = lambda x, w, b: F.rms_norm(x, (cols,), w, 1e-6)  # noqa: E731
        ref_fn = lambda x, w, b: reference.rms_norm(x, (cols,), w, 1e-6)  # noqa: E731
    ours = _grad(ours_fn, _leaves(x, w, b, dtype=dtype), dy.to(dtype))
    base = _grad(torch_fn, _leaves(x, w, b, dtype=dtype), dy.to(dtype))
    ref = _grad(ref_fn, _leaves(x, w, b, dtype=torch.float64), dy.double())
    return ours, base, ref


@needs_gpu
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_norms_match_reference(kind, dtype, shape, affine):
    (ours, g_ours), (base, g_base), (ref, g_ref) = _norm_case(kind, dtype, shape, affine)
    assert_close(ours, base, ref, kind)
    for name, a, b, r in zip(("dx", "dweight", "dbias"), g_ours, g_base, g_ref):
        # a parameter gradient sums over every row: scale the floor with the row count
        floor = None if name == "dx" else 2e-3 * shape[0] ** 0.5 * max(1.0, r.abs().max().item())
        assert_close(a, b, r, f"{kind} {name}", floor=floor if dtype != torch.float32 else None)


@needs_gpu
@pytest.mark.parametrize("cols", [257, 256])  # the two-pass backward and the fused one
def test_norm_parameter_gradients_are_deterministic(cols):
    x = torch.randn(3001, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    first = torch.autograd.grad(fa.layer_norm(x, (cols,), w, b, backend="cuda"), (x, w, b), dy)
    second = torch.autograd.grad(fa.layer_norm(x, (cols,), w, b, backend="cuda"), (x, w, b), dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@needs_gpu
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_take_parameter_views_off_16_byte_boundaries(kind, dtype):
    """The kernels read weights and biases (in the rows' dtype) 16 bytes at a time; views one element into their
    storage still work."""
    rows, cols = 33, 1024
    x, dy = (torch.randn(rows, cols, device="cuda", dtype=dtype) for _ in range(2))
    w, b = (torch.randn(cols + 1, device="cuda", dtype=dtype)[1:] for _ in range(2))
    b = b if kind == "layer_norm" else None
    if kind == "layer_norm":
        fns = [lambda x, w, b, backend=backend: fa.layer_norm(x, (cols,), w, b, backend=backend)
               for backend in ("cuda", "reference")] + [lambda x, w, b: F.layer_norm(x, (cols,), w, b)]
    else:
        fns = [lambda x, w, b, backend=backend: fa.rms_norm(x, (cols,), w, 1e-6, backend=backend)
               for backend in ("cuda", "reference")] + [lambda x, w, b: F.rms_norm(x, (cols,), w, 1e-6)]
    ours = _grad(fns[0], [t if t is None else t.requires_grad_() for t in (x, w, b)], dy)
    ref = _grad(fns[1], _leaves(x, w, b, dtype=torch.float64), dy.double())
    base = _grad(fns[2], _leaves(x, w, b), dy)
    assert_close(ours[0], base[0], ref[0], kind)
    for name, a, t, r in zip(("dx", "dweight", "dbias"), ours[1], base[1], ref[1]):
        assert_close(a, t, r, f"{kind} {name}", floor=None if dtype == torch.float32 else 2e-3 * rows ** 0.5 *
                     max(1.0, r.abs().max().item()))


@needs_gpu
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("cols", [1000, 1024])  # the two-pass backward and the fused one
def test_norms_with_parameters_in_another_dtype(kind, cols):
    """bfloat16 rows with float32 weight and bias (a mixed-precision model's master weights): the kernels read
    the parameters as float32 and give their gradients in float32."""
    x, dy = (torch.randn(65, cols, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = (torch.randn(cols, device="cuda") for _ in range(2))
    b = b if kind == "layer_norm" else None
    ours_fn = (lambda x, w, b, backend: fa.layer_norm(x, (cols,), w, b, backend=backend)) if kind == "layer_norm" \
        else (lambda x, w, b, backend: fa.rms_norm(x, (cols,), w, 1e-6, backend=backend))
    ours = _grad(lambda x, w, b: ours_fn(x, w, b, "cuda"), _leaves(x, w, b), dy)
    base = _grad(lambda x, w, b: ours_fn(x, w, b, "reference"), _leaves(x, w, b), dy)  # fp32 math, bf16 out
    ref = _grad(lambda x, w, b: ours_fn(x, w, b, "reference"), _leaves(x, w, b, dtype=torch.float64),
                dy.double())
    assert ours[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in ours[1][1:] if g is not None)
    assert_close(ours[0], base[0], ref[0], kind)
    for name, a, t, r in zip(("dx", "dweight", "dbias"), ours[1], base[1], ref[1]):
        assert_close(a, t, r, f"{kind} {name}", floor=None if name == "dx" else 2e-3 * 65 ** 0.5 *
                     max(1.0, r.abs().max().item()))


def _attention_inputs(dtype, B, H, Hkv, Lq, Lk, E, layout="contiguous"):
    if layout == "bshd":  # (B, L, H, E) memory viewed as (B, H, L, E), as models produce it
        q = torch.randn(B, Lq, H, E, device="cuda", dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Lk, Hkv, E, device="cuda", dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, E, device="cuda", dtype=dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, L, E, device="cuda", dtype=dtype) for h, L in ((H, Lq), (Hkv, Lk), (Hkv, Lk)))
    return q, k, v


def _check_attention(q, k, v, mask=None, is_causal=False, gqa=False, against="torch", **beyond):
    """backend='cuda' against `against` in the same dtype (the error budget) and the float64 reference: the output
    and dQ, dK, dV. beyond: softcap, window_size, which torch SDPA does not take: the budget is then the
    reference's formula in the inputs' dtype."""
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda", dtype=q.dtype)

    def ours_fn(q, k, v):
        return fa.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa, backend="cuda",
                                               **beyond)

    def base_fn(q, k, v):
        if against == "triton":
            return fa.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa,
                                                   backend="triton", **beyond)
        if beyond:
            return reference.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa,
                                                          **beyond)
        return F.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, enable_gqa=gqa)

    def ref_fn(q, k, v):
        m = mask.double() if mask is not None and mask.dtype != torch.bool else mask
        return reference.scaled_dot_product_attention(q, k, v, m, is_causal=is_causal, enable_gqa=gqa, **beyond)

    ours, g_ours = _grad(ours_fn, _leaves(q, k, v), dout)
    base, g_base = _grad(base_fn, _leaves(q, k, v), dout)  # same dtype: the error budget
    ref, g_ref = _grad(ref_fn, _leaves(q, k, v, dtype=torch.float64), dout.double())
    assert_close(ours, base, ref, "out")
    for name, a, b, r in zip(("dq", "dk", "dv"), g_ours, g_base, g_ref):
        assert_close(a, b, r, name)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E", [16, 32, 64, 80, 96, 128])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (97, 111), (128, 64), (200, 333)])
def test_attention_matches_reference(dtype, E, is_causal, Lq, Lk):
    _check_attention(*_attention_inputs(dtype, 2, 3, 3, Lq, Lk, E), is_causal=is_causal)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E", [32, 64, 80, 128])
@pytest.mark.parametrize("is_causal,window,softcap", [(True, (40, -1), 0.0), (False, (17, 5), 0.0),
                                                      (False, (0, 0), 0.0), (False, None, 2.0),
                                                      (True, (64, -1), 30.0), (False, (300, 2), 1.0)])
@pytest.mark.parametrize("Lq,Lk", [(200, 333), (333, 200), (1, 1)])
def test_attention_window_and_softcap(dtype, E, is_causal, window, softcap, Lq, Lk):
    """A local window (the tiles it leaves out are skipped: lengths over several tiles, windows of one key, of one
    side, wider than the lengths; rows that see no key give zeros) and Gemma 2's logit cap (scores well past it),
    alone and together, with GQA: the output and every gradient."""
    q, k, v = _attention_inputs(dtype, 2, 4, 2, Lq, Lk, E)
    if softcap:
        q = q * 3  # scores of several units: the cap bends them
    _check_attention(q, k, v, is_causal=is_causal, gqa=True, window_size=window, softcap=softcap or None)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
def test_attention_decoding_with_window_and_softcap(dtype):
    """A decoding shape: the logit cap in the split-KV kernel; with a window the tiled forward, which visits only
    the key tiles the window reaches, and a bool mask besides."""
    q, k, v = _attention_inputs(dtype, 2, 8, 2, 3, 4100, 128)
    _check_attention(q * 3, k, v, gqa=True, softcap=20.0)
    keep = torch.rand(2, 1, 3, 4100, device="cuda") > 0.2
    _check_attention(q, k, v, mask=keep, gqa=True, window_size=(1000, 600), softcap=20.0)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
def test_attention_gqa_strided_inputs(dtype):
    _check_attention(*_attention_inputs(dtype, 2, 8, 2, 77, 130, 64, layout="bshd"), is_causal=True, gqa=True)


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
def test_attention_key_padding_mask_with_fully_masked_rows(dtype):
    q, k, v = _attention_inputs(dtype, 2, 4, 4, 65, 90, 128)
    keep = torch.rand(2, 1, 65, 90, device="cuda") > 0.3  # broadcast over heads: read with stride 0
    keep[0, :, 3] = False  # every key masked: the row gives zeros
    _check_attention(q, k, v, mask=keep)
    out = fa.scaled_dot_product_attention(q, k, v, keep, backend="cuda")
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
def test_attention_additive_mask(dtype):
    q, k, v = _attention_inputs(dtype, 1, 2, 2, 50, 70, 64)
    bias = (torch.randn(1, 2, 50, 70, device="cuda") * 2).to(dtype)
    bias[..., :5] = float("-inf")
    _check_attention(q, k, v, mask=bias)


def _finfo_min_case():
    """bfloat16 q, k, v (1, 2, 70/90, 64) and a mask with row 3 padded with finfo.min at every key and row 5 at
    half of them; dO; and the float64 reference's output and gradients."""
    q, k, v = _attention_inputs(torch.bfloat16, 1, 2, 2, 70, 90, 64)
    mask = torch.zeros(1, 1, 70, 90, device="cuda", dtype=torch.bfloat16)
    mask[..., 3, :] = torch.finfo(torch.bfloat16).min
    mask[..., 5, 45:] = torch.finfo(torch.bfloat16).min
    dout = torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16)
    r_q, r_k, r_v = _leaves(q, k, v, dtype=torch.float64)
    ref = reference.scaled_dot_product_attention(r_q, r_k, r_v, mask.double())
    return (q, k, v), mask, dout, ref.detach(), torch.autograd.grad(ref, (r_q, r_k, r_v), dout.double())


@needs_gpu
def test_attention_finfo_min_mask_rows_are_uniform():
    """bfloat16's finfo.min times log2(e) overflows fp32: a row padded with it must stay torch's uniform average,
    not become a dead row of zeros, in the output, the weights (1 / Lk each) and the gradients."""
    (q, k, v), mask, dout, ref, ref_grads = _finfo_min_case()
    q, k, v = _leaves(q, k, v)
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="cuda")
    with sdpa_kernel(SDPBackend.MATH):  # torch's fused CUDA kernels give zeros for a finfo.min row (H200)
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(out, theirs, ref, "out")
    torch.testing.assert_close(out[:, :, 3].float(), v.float().mean(2).detach(), atol=1e-2, rtol=1e-2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    their_grads = torch.autograd.grad(theirs, (q, k, v), dout)
    for name, ours, their_grad, oracle in zip(("dq", "dk", "dv"), grads, their_grads, ref_grads):
        assert_close(ours, their_grad, oracle, name)
    with torch.no_grad():
        _, w = scaled_dot_product_attention_with_weights(q, k, v, attn_mask=mask, backend="cuda")
    torch.testing.assert_close(w[:, :, 3], torch.full_like(w[:, :, 3], 1 / 90))


@needs_gpu
@pytest.mark.skipif("triton" not in fa.available_backends(), reason="needs the Triton backend")
def test_backends_share_the_row_statistics():
    """Each backend's backward and weights take the other's forward statistics, as backend=None may run a call's
    forward and backward on different backends: (2, B, H, Lq), each row's max and log sum in base 2."""
    (q, k, v), mask, dout, _, ref_grads = _finfo_min_case()
    expected = torch.softmax(q.double() @ k.double().transpose(-2, -1) * 0.125 + mask.double(), -1)
    t_q, t_k, t_v = _leaves(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        their_grads = torch.autograd.grad(F.scaled_dot_product_attention(t_q, t_k, t_v, attn_mask=mask),
                                          (t_q, t_k, t_v), dout)
    ops, seed = torch.ops.fast_attention, torch.tensor(0)
    for forward, other in (("cuda", "triton"), ("triton", "cuda")):
        out, stats = ops.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.125, seed, forward)
        assert stats.shape == (2, 1, 2, 70) and stats.dtype == torch.float32
        w = ops.attention_weights(q, k, stats, mask, False, 0.125, other)
        torch.testing.assert_close(w.double(), expected, atol=2e-3, rtol=0, msg=lambda m: f"{forward}: {m}")
        grads = ops.scaled_dot_product_attention_backward(dout, q, k, v, out, stats, mask, 0.0, False, 0.125, seed,
                                                          other)
        for name, ours, theirs, oracle in zip(("dq", "dk", "dv"), grads, their_grads, ref_grads):
            assert_close(ours, theirs, oracle, f"{name}, {forward} forward, {other} backward")


@needs_gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("Lq,H,Hkv,Lk,mask_kind", [(1, 32, 8, 4097, None), (5, 8, 2, 1000 + 1024, "bool"),
                                                   (16, 4, 4, 3000, "float"), (3, 16, 1, 70000, None)])
def test_attention_decoding_split_kv(dtype, E, Lq, H, Hkv, Lk, mask_kind):
    """Decoding (Lq <= 16, Lk >= 1024; csrc/attention/decode_kernel.cuh): GQA groups packed into a warp's rows,
    the keys split across warps and merged, masks with a fully masked row; the backward from its row statistics."""
    q, k, v = _attention_inputs(dtype, 2, H, Hkv, Lq, Lk, E)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, Lq, Lk, device="cuda") > 0.2
        mask[1, ..., 700:] = False  # batch 1: every split past the first key tiles sees no key
        mask[0, :, 2] = False  # every key masked: zeros
    elif mask_kind == "float":
        mask = (torch.randn(2, H, Lq, Lk, device="cuda") * 2).to(dtype)
    _check_attention(q, k, v, mask=mask, gqa=H != Hkv)


@needs_gpu
def test_attention_backward_is_deterministic():
    q, k, v = (t.requires_grad_() for t in _attention_inputs(torch.bfloat16, 2, 8, 2, 300, 300, 64))
    dout = torch.randn_like(q)
    grads = [torch.autograd.grad(fa.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                 backend="cuda"), (q, k, v), dout) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_weights_match_reference(is_causal):
    q, k, v = _attention_inputs(torch.float16, 2, 2, 2, 37, 53, 64)
    _, weights = scaled_dot_product_attention_with_weights(q, k, v, is_causal=is_causal, backend="cuda")
    ref = reference._probabilities(q.double(), k.double(), None, is_causal, 0.125)[0]
    base = reference._probabilities(q, k, None, is_causal, 0.125)[0]  # float32 math on the float16 inputs
    assert_close(weights, base, ref, "weights", floor=2e-3)


@needs_gpu
@pytest.mark.skipif("triton" not in fa.available_backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E,is_causal,Hkv,Lq,Lk", [(64, False, 2, 97, 130), (128, True, 4, 130, 97),
                                                   (32, False, 1, 3, 2000)])  # a decoding shape: the tiled forward
def test_attention_dropout_drops_what_triton_drops(dtype, E, is_causal, Hkv, Lq, Lk):
    """With dropout, the CUDA kernels drop the probabilities the Triton kernels drop for the same seed: the output
    and gradients against the reference given the Triton kernels' mask, and against the Triton backend itself."""
    from fast_attention.kernels import attention as triton_kernels

    p, torch_seed = 0.3, 1234
    q, k, v = (t.requires_grad_() for t in _attention_inputs(dtype, 2, 4, Hkv, Lq, Lk, E))
    dout = torch.randn_like(q)
    torch.manual_seed(torch_seed)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # what the API draws after manual_seed
    keep = triton_kernels.dropout_mask(seed, p, 2, 4, Lq, Lk, "cuda")
    results = {}
    for name in ("cuda", "triton"):
        torch.manual_seed(torch_seed)
        out = fa.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=is_causal, enable_gqa=True,
                                              backend=name)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), dout))
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out = reference.scaled_dot_product_attention(*xs, dropout_p=p, is_causal=is_causal, enable_gqa=True,
                                                   dropout_mask=keep)
    oracle = (r_out, *torch.autograd.grad(r_out, xs, dout.double()))
    for what, ours, theirs, r in zip(("out", "dq", "dk", "dv"), results["cuda"], results["triton"], oracle):
        assert_close(ours, theirs, r, what)


@needs_gpu
@pytest.mark.skipif("triton" not in fa.available_backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", LOW)
def test_cuda_agrees_with_triton(dtype):
    _check_attention(*_attention_inputs(dtype, 2, 4, 4, 129, 129, 64), is_causal=True, against="triton")
    x = torch.randn(33, 1029, device="cuda", dtype=dtype)
    ref = reference.softmax(x.double())
    assert_close(fa.softmax(x, backend="cuda"), fa.softmax(x, backend="triton"), ref, "softmax vs triton")
    w = torch.randn(1029, device="cuda", dtype=dtype)
    assert_close(fa.layer_norm(x, (1029,), w, backend="cuda"), fa.layer_norm(x, (1029,), w, backend="triton"),
                 reference.layer_norm(x.double(), (1029,), w.double()), "layer_norm vs triton")


@needs_gpu
@pytest.mark.skipif("triton" not in fa.available_backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E,window,softcap", [(128, (-1, 0), None), (64, (255, 0), None), (96, (-1, -1), 30.0)])
def test_packed_sequences_agree_with_triton(dtype, E, window, softcap):
    """fa.varlen_attn on the CUDA kernels against the Triton ones and float64: a packed training batch of sequences
    from 1 to 1500 tokens, a sequence without keys, Lq != Lk; the gradients bitwise the same on a second run."""
    lengths_q, lengths_k = [1500, 1, 700, 3, 0, 250], [1500, 1, 900, 0, 64, 120]
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")
                  for n in (lengths_q, lengths_k))
    q, k, v = (torch.randn(sum(n), h, E, device="cuda", dtype=dtype, requires_grad=True)
               for n, h in ((lengths_q, 8), (lengths_k, 2), (lengths_k, 2)))
    args = dict(window_size=window, enable_gqa=True, softcap=softcap)
    dout = torch.randn(sum(lengths_q), 8, E, device="cuda", dtype=dtype)
    results = {}
    for name in ("cuda", "triton", "cuda"):  # cuda twice: the backward is deterministic
        out = fa.varlen_attn(q, k, v, cu_q, cu_k, 1500, 1500, **args, backend=name)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if name in results:
            for a, b in zip(grads, results[name][1:]):
                assert torch.equal(a, b)
        results[name] = (out, *grads)
    xs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out = reference.varlen_attn(*xs, cu_q, cu_k, **args)
    oracle = (r_out, *torch.autograd.grad(r_out, xs, dout.double()))
    for what, ours, theirs, r in zip(("out", "dq", "dk", "dv"), results["cuda"], results["triton"], oracle):
        assert_close(ours, theirs, r, what)


@needs_gpu
@pytest.mark.skipif("triton" not in fa.available_backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E,page_size,window,softcap", [(128, 16, (-1, 0), None), (64, 256, (-1, -1), None),
                                                        (96, 1, (100, 0), 30.0)])
def test_paged_kv_cache_agrees_with_triton(dtype, E, page_size, window, softcap):
    """A paged KV cache (block_table) on the CUDA kernels against the Triton ones and float64: decoding rows and a
    prefill chunk against caches of 1 to 4097 used keys, one empty, in shuffled pages of 1, 16 or 256 rows."""
    from test_varlen import _pages

    lengths_q, used = [1, 4, 1, 200, 16, 3], [4097, 1000, 1, 1500, 0, 127]
    cu_q, cu_used = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")
                     for n in (lengths_q, used))
    q = torch.randn(sum(lengths_q), 8, E, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(used), 2, E, device="cuda", dtype=dtype) for _ in range(2))
    pool_k, pool_v, table = _pages(k, v, used, page_size)
    args = dict(window_size=window, enable_gqa=True, softcap=softcap)
    out = {name: fa.varlen_attn(q, pool_k, pool_v, cu_q, None, max(lengths_q), max(used), seqused_k=cu_used.diff(),
                                block_table=table, **args, backend=name) for name in ("cuda", "triton")}
    oracle = reference.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_used, **args)
    assert_close(out["cuda"], out["triton"], oracle, "out")


@needs_gpu
@pytest.mark.skipif("triton" not in fa.available_backends(), reason="needs the Triton backend")
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("E,page_size,window,softcap,num_splits", [
    (128, None, (-1, 0), None, None), (64, 16, (-1, 0), None, None), (128, 256, (1000, 0), None, None),
    (96, 1, (-1, -1), 30.0, 5), (80, None, (-1, 0), None, 1)])
def test_packed_decoding_agrees_with_triton(dtype, E, page_size, window, softcap, num_splits):
    """Decoding over packed KV caches (at most 16 queries per sequence against 1024 keys or more): the CUDA split-KV
    kernel (num_splits 1: its tiled forward) against the Triton kernels and float64: caches of 1 to 4097 keys, one
    empty, a sequence without queries, causal, a sliding window, the cap, packed or in shuffled pages."""
    from test_varlen import _pages

    lengths_q, used = [1, 4, 1, 16, 0, 3, 1], [4097, 1100, 1, 2000, 50, 0, 1024]
    cu_q, cu_used = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")
                     for n in (lengths_q, used))
    q = torch.randn(sum(lengths_q), 8, E, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(used), 2, E, device="cuda", dtype=dtype) for _ in range(2))
    args = dict(window_size=window, enable_gqa=True, softcap=softcap)
    if page_size is None:
        cache = dict(key=k, value=v, cu_seq_k=cu_used)
    else:
        pool_k, pool_v, table = _pages(k, v, used, page_size)
        cache = dict(key=pool_k, value=pool_v, cu_seq_k=None, seqused_k=cu_used.diff(), block_table=table)
    out = {name: fa.varlen_attn(query=q, cu_seq_q=cu_q, max_q=max(lengths_q), max_k=max(used), **cache, **args,
                                num_splits=num_splits, backend=name) for name in ("cuda", "triton")}
    oracle = reference.varlen_attn(q.double(), k.double(), v.double(), cu_q, cu_used, **args)
    assert_close(out["cuda"], out["triton"], oracle, "out")


@needs_gpu
def test_profiler_shows_the_cuda_ops():
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.float16)
    with torch.profiler.profile() as prof:
        fa.softmax(x, backend="cuda")
        fa.scaled_dot_product_attention(x[None], x[None], x[None], backend="cuda")
    names = {e.name for e in prof.events()}
    assert "fast_attention::softmax" in names and "fast_attention::scaled_dot_product_attention" in names
