"""fast_attention.layer_norm and fast_attention.rms_norm against the float64 reference: values and the gradients
of input, weight and bias, on every backend; and the Triton kernels' multi-block path and deterministic
weight-gradient reduction."""
import importlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_softmax import Spy, run
from tolerance import assert_close

import fast_attention as fa
from fast_attention import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = torch.cuda.is_available()
TRITON = "triton" in fa.available_backends()
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
needs_triton_gpu = pytest.mark.skipif(not (TRITON and GPU), reason="needs the Triton backend on a CUDA device")


def params(shape, device, dtype, weight=True, bias=True):
    """Random (not identity) weight and bias of `shape`, or None."""
    w = (torch.randn(shape, device=device) * 0.5 + 1).to(dtype) if weight else None
    b = torch.randn(shape, device=device).to(dtype) if bias else None
    return w, b


def check_norm(kind, backend, x, normalized_shape, weight=None, bias=None, eps=1e-5, view=lambda t: t):
    """Compare fa.<kind>(view(x), ...) with torch's own in x's dtype and the float64 reference: output, and the
    gradients of x, weight and bias. kind is "layer_norm" or "rms_norm" (which takes no bias). `view` makes
    non-contiguous inputs out of the contiguous leaf x. Returns our output."""
    present = [name for name, t in (("weight", weight), ("bias", bias)) if t is not None]
    leaves = [x] + [t for t in (weight, bias) if t is not None]

    def call(fn, eps):
        def f(x, *ps):
            kw = dict(zip(present, ps))
            if kind == "layer_norm":
                return fn(view(x), normalized_shape, kw.get("weight"), kw.get("bias"), eps)
            return fn(view(x), normalized_shape, kw.get("weight"), eps)
        return f

    ours_fn = getattr(fa, kind)
    theirs_fn = F.layer_norm if kind == "layer_norm" else F.rms_norm
    ref_fn = getattr(reference, kind)
    ref_eps = reference.default_rms_eps(x.dtype) if eps is None else eps  # the float64 run must use x's default
    dy = torch.randn(view(x).shape, device=x.device).to(x.dtype)
    ours, ours_grads = run(call(lambda *a: ours_fn(*a, backend=backend), eps), leaves, dy)
    theirs, theirs_grads = run(call(theirs_fn, eps), leaves, dy)
    ref, ref_grads = run(call(ref_fn, ref_eps), [t.double() for t in leaves], dy.double())
    assert ours.dtype == x.dtype
    assert_close(ours, theirs, ref, kind)
    for name, a, b, r, leaf in zip(["input"] + present, ours_grads, theirs_grads, ref_grads, leaves):
        assert a.dtype == leaf.dtype, f"{kind} {name} grad dtype {a.dtype}, expected {leaf.dtype}"
        assert_close(a, b, r, f"{kind} {name} grad")
    return ours


# ---------------------------------------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 17, 127, 1000, 4097])
def test_layer_norm_row_lengths(backend, device, n, dtype):
    x = (torch.randn(3, n, device=device) * 2 + 1).to(dtype)
    check_norm("layer_norm", backend, x, (n,), *params(n, device, dtype))


def test_layer_norm_one_element_rows_give_zero_input_grad(backend, device):
    """Over one element x - mean is 0, so dx is exactly 0, as float64 and torch's CUDA kernel give it. Fusing
    dy * w - mean(dy * w) into one fma leaves dy * w's rounding error there, times rstd = 1/sqrt(eps): 1e-5 off,
    as torch's CPU kernel is, which failed the tolerance against torch's CUDA kernel on the H200."""
    x = torch.randn(1000, 1, device=device, requires_grad=True)
    w, b = (torch.randn(1, device=device, requires_grad=True) for _ in range(2))
    fa.layer_norm(x, (1,), w, b, backend=backend).backward(torch.randn(1000, 1, device=device))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight, bias", [(False, False), (True, False), (False, True)])
def test_layer_norm_without_weight_or_bias(backend, device, weight, bias, dtype):
    x = torch.randn(5, 127, device=device).to(dtype)
    check_norm("layer_norm", backend, x, (127,), *params(127, device, dtype, weight, bias))


def test_layer_norm_bias_gradient_without_weight_keeps_its_range(backend, device):
    """A float32 bias beside float16 rows and no weight (torch's CUDA kernel takes the mix): dbias sums every
    row's dy, 81,920 here, past float16's largest value (65,504). It is summed and returned in float32, as
    torch's; it was inf."""
    x = torch.randn(40, 2, device=device).half().requires_grad_()
    bias = torch.zeros(2, device=device, requires_grad=True)
    out = fa.layer_norm(x, (2,), None, bias, backend=backend)
    out.backward(torch.full_like(out, 2048))
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 2048 * 40), rtol=0, atol=0)


def test_layer_norm_two_normalized_dims(backend, device):
    x = torch.randn(2, 3, 5, 7, device=device)
    check_norm("layer_norm", backend, x, (5, 7), *params((5, 7), device, torch.float32), eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_non_contiguous(backend, device, dtype):
    x = torch.randn(20, 12, device=device).to(dtype)
    check_norm("layer_norm", backend, x, (20,), *params(20, device, dtype), view=lambda t: t.t())
    check_norm("layer_norm", backend, x, (5,), *params(5, device, dtype), view=lambda t: t[1::3, 2:12:2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_magnitude_1e4(backend, device, dtype):
    """Squares of 1e4 overflow float16. A mean 20 times the spread costs E[x^2] - E[x]^2 in fp32 about 1e-7 * 20^2
    of the variance, far over the tolerance, while the half-ulp rounding of an fp32 mean stays under it."""
    x = torch.randn(3, 300, device=device).clamp(-5, 5) * 1e4
    x[1] = 1e4 + torch.randn(300, device=device) * 500
    y = check_norm("layer_norm", backend, x.to(dtype), (300,), *params(300, device, dtype))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("shape, normalized_shape", [((0, 8), (8,)), ((2, 0), (0,)), ((2, 3, 0), (3, 0))])
def test_layer_norm_empty(backend, device, shape, normalized_shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    w, b = (torch.randn(normalized_shape, device=device, requires_grad=True) for _ in range(2))
    y = fa.layer_norm(x, normalized_shape, w, b, backend=backend)
    assert y.shape == F.layer_norm(x, normalized_shape, w, b).shape == x.shape
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ------------------------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 17, 127, 1000, 4097])
def test_rms_norm_row_lengths(backend, device, n, dtype):
    x = (torch.randn(3, n, device=device) * 2 + 1).to(dtype)
    check_norm("rms_norm", backend, x, (n,), params(n, device, dtype)[0], eps=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_without_weight(backend, device, dtype):
    check_norm("rms_norm", backend, torch.randn(5, 127, device=device).to(dtype), (127,), None, eps=1e-6)


def test_rms_norm_two_normalized_dims(backend, device):
    x = torch.randn(2, 3, 5, 7, device=device)
    check_norm("rms_norm", backend, x, (5, 7), params((5, 7), device, torch.float32)[0], eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_non_contiguous(backend, device, dtype):
    x = torch.randn(20, 12, device=device).to(dtype)
    check_norm("rms_norm", backend, x, (20,), params(20, device, dtype)[0], eps=None, view=lambda t: t.t())
    check_norm("rms_norm", backend, x, (5,), params(5, device, dtype)[0], eps=None, view=lambda t: t[1::3, 2:12:2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_magnitude_1e4(backend, device, dtype):
    x = torch.randn(3, 300, device=device).clamp(-5, 5) * 1e4
    y = check_norm("rms_norm", backend, x.to(dtype), (300,), params(300, device, dtype)[0], eps=None)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("shape, normalized_shape", [((0, 8), (8,)), ((2, 0), (0,)), ((2, 3, 0), (3, 0))])
def test_rms_norm_empty(backend, device, shape, normalized_shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(normalized_shape, device=device, requires_grad=True)
    y = fa.rms_norm(x, normalized_shape, w, backend=backend)
    assert y.shape == F.rms_norm(x, normalized_shape, w).shape == x.shape
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


# ------------------------------------------------------------------------------------ deterministic weight grads
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grads_bitwise_deterministic(backend, device, kind, dtype):
    """Two backward passes over the same inputs give the same bits for dweight and dbias. The row count is
    uneven and larger than the number of partial-sum programs, so several programs each reduce several rows."""
    M, N = (3001, 257) if GPU else (11, 257)
    x = torch.randn(M, N, device=device).to(dtype)
    weight, bias = params(N, device, dtype, bias=kind == "layer_norm")
    dy = torch.randn(M, N, device=device).to(dtype)
    fn = getattr(fa, kind)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (weight, bias) if t is not None]
        out = fn(x, (N,), *leaves, backend=backend)
        out.backward(dy)
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)
    check_norm(kind, backend, x, (N,), weight, bias)


# ---------------------------------------------------------------------------------- the Triton kernels themselves
def spy_on(monkeypatch, module, *names):
    spies = {name: Spy(getattr(module, name)) for name in names}
    for name, spy in spies.items():
        monkeypatch.setattr(module, name, spy)
    return spies


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight, bias", [(True, True), (False, False), (False, True)])
def test_triton_layer_norm_multi_block_path(device, monkeypatch, weight, bias, dtype):
    """Rows longer than the block cap take the multi-block kernels (streaming Welford statistics, two-pass
    backward with read-modify-write partial sums), and they are right."""
    module = importlib.import_module("fast_attention.kernels.layer_norm")
    monkeypatch.setattr(module, "MAX_BLOCK_N", 64)  # short rows reach the multi-block path quickly on the CPU
    spies = spy_on(monkeypatch, module, "_layer_norm_forward_kernel", "_layer_norm_backward_kernel")
    N = 1000
    x = torch.randn(5, N, device=device) * 3 + 5
    x[1] = 1e4 + torch.randn(N, device=device) * 500  # a mean far from zero: the variance must not cancel
    x[2, 960:] += 40  # a shift that only the last, partial block sees
    check_norm("layer_norm", "triton", x.to(dtype), (N,), *params(N, device, dtype, weight, bias))
    for spy in spies.values():
        assert [(launch["ONE_BLOCK"], launch["BLOCK_N"]) for launch in spy.launches] == [(False, 32)]  # half the cap


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight", [True, False])
def test_triton_rms_norm_multi_block_path(device, monkeypatch, weight, dtype):
    module = importlib.import_module("fast_attention.kernels.rms_norm")
    monkeypatch.setattr(module, "MAX_BLOCK_N", 64)
    spies = spy_on(monkeypatch, module, "_layer_norm_forward_kernel", "_layer_norm_backward_kernel")
    N = 1000
    x = torch.randn(5, N, device=device) * 3
    x[2, 960:] *= 50
    check_norm("rms_norm", "triton", x.to(dtype), (N,), params(N, device, dtype)[0] if weight else None, eps=None)
    for spy in spies.values():
        assert [(launch["ONE_BLOCK"], launch["BLOCK_N"]) for launch in spy.launches] == [(False, 32)]  # half the cap


@needs_triton
def test_triton_partial_sums_cover_uneven_rows():
    """The weight-gradient partition: each program gets a contiguous row range, together exactly the M rows."""
    module = importlib.import_module("fast_attention.kernels.layer_norm")
    device = torch.device("cuda" if GPU else "cpu")
    for M in (1, 2, 7, 11, 1000, 100_003):
        G, rows_per_program = module.partial_programs(device, M)
        assert (G - 1) * rows_per_program < M <= G * rows_per_program


@needs_triton
def test_triton_partial_programs_grow_as_rows_shrink(monkeypatch):
    """On a GPU, short rows get more backward programs per SM (more loads in flight), down to one for long rows."""
    module = importlib.import_module("fast_attention.kernels.layer_norm")
    monkeypatch.setattr(module, "properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda, M = torch.device("cuda", 0), 132 * 16 * 64
    programs = {N: module.partial_programs(cuda, M, 2 * N * 2)[0] for N in (256, 1024, 4096, 16384, 65536)}
    assert programs == {256: 132 * 16, 1024: 132 * 16, 4096: 132 * 4, 16384: 132, 65536: 132}
    assert module.partial_programs(cuda, 5, 2 * 1024 * 2) == (5, 1)  # never more programs than rows


@needs_triton
def test_triton_sum_partials(device):
    """The second, fixed-order reduction, over more partial rows than one tile holds."""
    module = importlib.import_module("fast_attention.kernels.layer_norm")
    partial, other = torch.randn(70, 300, device=device), torch.randn(70, 300, device=device)
    (sums,) = module.sum_partials((partial, torch.float32))
    assert_close(sums, partial.sum(0), partial.double().sum(0), "column sums")
    assert torch.equal(sums, module.sum_partials((partial, torch.float32))[0])
    # two buffers in one launch: each gets its own sums, in its own dtype
    both = module.sum_partials((partial, torch.float32), (other, torch.bfloat16))
    assert torch.equal(both[0], sums) and both[1].dtype == torch.bfloat16
    assert_close(both[1], other.sum(0).bfloat16(), other.double().sum(0), "second column sums")


@needs_triton_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [768, 8192, 16384, 16385, 65537])
def test_triton_norms_long_rows_gpu(n, dtype):
    """Real block sizes on the GPU, at and beyond the one-block cap, with many rows per partial-sum program."""
    x = torch.randn(300, n, device="cuda").to(dtype)
    w, b = params(n, "cuda", dtype)
    check_norm("layer_norm", "triton", x, (n,), w, b)
    check_norm("rms_norm", "triton", x, (n,), w, eps=None)
