"""fast_attention.softmax against the float64 reference, values and gradients, on every backend."""
import importlib

import pytest
import torch
from tolerance import assert_close

import fast_attention as fa
from fast_attention import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU = torch.cuda.is_available()
TRITON = "triton" in fa.available_backends()
# Triton's interpreter computes -inf - (-inf) in numpy, which warns; the NaN is the intended result for a row that
# is entirely -inf.
NAN_WARNING = "ignore:invalid value encountered:RuntimeWarning"


def run(fn, leaves, grad_out):
    """fn(*leaves) and the gradients of <fn(...), grad_out> with respect to fresh copies of `leaves`."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def check_softmax(x, dim, backend, view=lambda t: t):
    """Compare fa.softmax(view(x), dim) with torch.softmax in x's dtype and the float64 reference; `view` makes
    non-contiguous inputs out of the contiguous leaf x."""
    probe = view(x)
    dy = torch.randn(probe.shape, device=x.device).to(x.dtype)
    ours, (ours_dx,) = run(lambda t: fa.softmax(view(t), dim, backend=backend), [x], dy)
    theirs, (theirs_dx,) = run(lambda t: torch.softmax(view(t), dim), [x], dy)
    ref, (ref_dx,) = run(lambda t: reference.softmax(view(t), dim), [x.double()], dy.double())
    assert ours.dtype == x.dtype and ours_dx.dtype == x.dtype
    assert_close(ours, theirs, ref, "softmax")
    assert_close(ours_dx, theirs_dx, ref_dx, "softmax input grad")
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 17, 127, 1000, 4097])
def test_row_lengths(backend, device, n, dtype):
    check_softmax(torch.randn(3, n, device=device).to(dtype) * 3, -1, backend)


@pytest.mark.parametrize("dim", [0, 1, -2, 2])
def test_other_dims(backend, device, dim):
    check_softmax(torch.randn(4, 5, 7, device=device), dim, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous(backend, device, dtype):
    x = torch.randn(6, 33, device=device).to(dtype)
    check_softmax(x, -1, backend, view=lambda t: t.t())  # rows along the strided dim
    check_softmax(x, -1, backend, view=lambda t: t[1::2, 3:30:3])
    check_softmax(x, 0, backend, view=lambda t: t[:, ::5])


def test_scalar_and_single_element(backend, device):
    check_softmax(torch.randn((), device=device), 0, backend)
    check_softmax(torch.randn(4, 1, device=device), 1, backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_1e4(backend, device, dtype):
    """Without subtracting the max, exp(1e4) overflows to inf and every output turns NaN."""
    x = (torch.rand(3, 300, device=device) * 2 - 1) * 1e4
    x[1] = 1e4 + torch.randn(300, device=device)  # large and nearly equal: the result is not one-hot
    y = check_softmax(x.to(dtype), -1, backend)
    assert torch.isfinite(y).all()


@pytest.mark.filterwarnings(NAN_WARNING)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf(backend, device, dtype):
    x = torch.randn(4, 37, device=device)
    x[0, ::3] = float("-inf")  # some masked entries: finite result, zeros there
    x[1, 1:] = float("-inf")  # a single survivor: exactly one-hot
    x[2] = float("-inf")  # every entry masked: NaN, as torch
    y = check_softmax(x.to(dtype), -1, backend)
    assert (y[0, ::3] == 0).all() and torch.isfinite(y[0]).all()
    assert y[1, 0] == 1
    assert torch.isnan(y[2]).all() and torch.isnan(torch.softmax(x[2].to(dtype), -1)).all()
    assert torch.isfinite(y[3]).all()


@pytest.mark.parametrize("shape, dim", [((0, 5), -1), ((3, 0), -1), ((3, 0), 0), ((2, 0, 4), 2)])
def test_empty(backend, device, shape, dim):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = fa.softmax(x, dim, backend=backend)
    assert y.shape == torch.softmax(x, dim).shape and y.dtype == x.dtype
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------------------- the Triton kernels themselves
class Spy:
    """Wraps a @triton.jit kernel and records the keyword arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def record(*args, **kwargs):
            self.launches.append(kwargs)
            return launch(*args, **kwargs)

        return record


def triton_softmax_module():
    return importlib.import_module("fast_attention.kernels.softmax")


@pytest.mark.skipif(not TRITON, reason="the Triton backend is not available here")
@pytest.mark.filterwarnings(NAN_WARNING)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_multi_block_path(device, monkeypatch, dtype):
    """A row longer than the block cap goes through the online multi-block kernels, and they are right."""
    module = triton_softmax_module()
    monkeypatch.setattr(module, "MAX_BLOCK_N", 64)  # short rows reach the multi-block path quickly on the CPU
    assert module.row_config(1000, 64) == (64, 1, False) and module.row_config(64, 64)[2]
    one_block = Spy(module._softmax_forward_one_block)
    online = Spy(module._softmax_forward_online)
    backward = Spy(module._softmax_backward_kernel)
    monkeypatch.setattr(module, "_softmax_forward_one_block", one_block)
    monkeypatch.setattr(module, "_softmax_forward_online", online)
    monkeypatch.setattr(module, "_softmax_backward_kernel", backward)

    x = torch.randn(4, 1000, device=device) * 3
    x[0, 100:900] = float("-inf")  # whole blocks of -inf before and after finite ones
    x[1, :500] = float("-inf")  # the running max starts at -inf for several blocks
    x[2] = float("-inf")
    x[3, 999] = 20.0  # the max arrives in the last, partial block: every earlier block is rescaled
    y = check_softmax(x.to(dtype), -1, "triton")
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3]]).all()
    assert len(online.launches) == 1 and not one_block.launches
    assert [launch["ONE_BLOCK"] for launch in backward.launches] == [False]


@pytest.mark.skipif(not (TRITON and GPU), reason="needs the Triton backend on a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [2048, 16384, 16385, 100_003])
def test_triton_long_rows_gpu(n, dtype):
    """Real block sizes on the GPU, at and beyond the one-block cap."""
    x = torch.randn(64, n, device="cuda").to(dtype) * 4
    x[::7, ::5] = float("-inf")
    check_softmax(x, -1, "triton")


@pytest.mark.skipif(not (TRITON and GPU and torch.cuda.device_count() > 1), reason="needs two CUDA devices")
def test_triton_input_on_another_device():
    """Triton launches on the current device: an input on cuda:1 while cuda:0 is current must still be read on
    cuda:1 (the backend makes the input's device current), forward and backward."""
    with torch.cuda.device(0):
        check_softmax(torch.randn(5, 300, device="cuda:1"), -1, "triton")
        assert torch.cuda.current_device() == 0
