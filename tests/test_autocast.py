"""torch.autocast: each op casts its inputs as torch's autocast casts the aten op it stands for (output dtype and
values as torch's, gradients in the inputs' dtypes), then computes with autocast off, on every backend and in
torch.compile. On the CPU torch casts only attention; on a GPU its CUDA rules add softmax and the norms (rms_norm
only in newer torch: 2.13 has its rule, 2.11 does not)."""
import pytest
import torch
import torch.nn.functional as F
from tolerance import FLOOR, assert_close

import fast_attention as fa
from fast_attention.ops._autocast import FLOAT32, POLICY

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


# Each case: ours and torch's function, positional args, keyword args, and which args are differentiated. All
# float32 but one: the attention value is bfloat16 (Hugging Face's Llama hands attention float32 query and key,
# out of its rotary embedding, and a value straight from a projection).
def _cases(device):
    x = torch.randn(3, 17, 40, device=device) * 3 + 1
    w, b = torch.randn(40, device=device), torch.randn(40, device=device)
    q, k = torch.randn(2, 4, 9, 16, device=device), torch.randn(2, 2, 13, 16, device=device)
    v = torch.randn(2, 2, 13, 16, device=device, dtype=torch.bfloat16)
    mask = torch.randn(9, 13, device=device)  # float32 and added to the scores: torch's autocast casts it too
    return {
        "softmax": (fa.softmax, torch.softmax, (x, -1), {}, [0]),
        "layer_norm": (fa.layer_norm, F.layer_norm, (x, (40,), w, b), {}, [0, 2, 3]),
        "rms_norm": (fa.rms_norm, F.rms_norm, (x, (40,), w), {}, [0, 2]),
        "scaled_dot_product_attention": (fa.scaled_dot_product_attention, F.scaled_dot_product_attention,
                                         (q, k, v, mask), {"enable_gqa": True}, [0, 1, 2]),
    }


def _run(fn, args, kwargs, differentiated, grad_out=None, autocast_dtype=None):
    """fn(*args, **kwargs), under autocast unless autocast_dtype is None; its output, the gradients of the
    differentiated args, and the output gradient used."""
    args = [a.detach().requires_grad_() if i in differentiated else a for i, a in enumerate(args)]
    device = args[0].device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = fn(*args, **kwargs)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, [args[i] for i in differentiated], grad_out), grad_out


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("op", sorted(POLICY))
def test_casts_as_torch(backend, device, op, dtype):
    ours_fn, torch_fn, args, kwargs, differentiated = _cases(device)[op]
    ours, ours_grads, grad_out = _run(ours_fn, args, {**kwargs, "backend": backend}, differentiated,
                                      autocast_dtype=dtype)
    theirs, torch_grads, _ = _run(torch_fn, args, kwargs, differentiated, grad_out, autocast_dtype=dtype)
    assert ours.dtype == theirs.dtype, f"{op}: output {ours.dtype}, torch's {theirs.dtype}"
    # the float64 reference, from the inputs as autocast cast them (what both computed from)
    wide = [a.to(theirs.dtype).double() if isinstance(a, torch.Tensor) else a for a in args]
    ref, ref_grads, _ = _run(torch_fn, wide, kwargs, differentiated, grad_out.double())
    assert_close(ours, theirs, ref, f"{op} output")
    for i, g, g_torch, g_ref in zip(differentiated, ours_grads, torch_grads, ref_grads):
        assert g.dtype == g_torch.dtype == args[i].dtype, f"{op} grad {i}: {g.dtype}, torch's {g_torch.dtype}"
        # in the input's dtype, computed in the autocast one: that one's floor
        floor = FLOOR[theirs.dtype] * max(1.0, g_ref.abs().max().item())
        assert_close(g, g_torch, g_ref, f"{op} grad of arg {i}", floor=floor)


@pytest.mark.parametrize("op", sorted(POLICY))
def test_computes_with_autocast_off(backend, device, op):
    """Inputs already in the dtype autocast would cast them to are left as they are, and the backends' own math is
    not recast: the results equal the same call outside autocast, bit for bit (without the autocast-off
    registration the reference backend's float32 matmuls turn bfloat16)."""
    ours_fn, _, args, kwargs, differentiated = _cases(device)[op]
    precision, device_types = POLICY[op]
    already = torch.float32 if precision == FLOAT32 and device in device_types else torch.bfloat16
    args = [a.to(already) if isinstance(a, torch.Tensor) else a for a in args]
    kwargs = {**kwargs, "backend": backend}
    inside, inside_grads, grad_out = _run(ours_fn, args, kwargs, differentiated, autocast_dtype=torch.bfloat16)
    outside, outside_grads, _ = _run(ours_fn, args, kwargs, differentiated, grad_out)
    assert torch.equal(inside, outside)
    for g_inside, g_outside in zip(inside_grads, outside_grads):
        assert torch.equal(g_inside, g_outside)


def _block(x, w, backend):
    h = fa.layer_norm(x, (16,), w, None, backend=backend)
    h = fa.rms_norm(h, (16,), w, backend=backend)
    h = fa.scaled_dot_product_attention(h, h, h, is_causal=True, backend=backend)
    return fa.softmax(h, dim=-2, backend=backend)


def test_torch_compile_under_autocast(backend, device):
    torch._dynamo.reset()
    x = torch.randn(2, 2, 5, 16, device=device)
    w = torch.randn(16, device=device)
    eager = _run(_block, (x, w), {"backend": backend}, [0, 1], autocast_dtype=torch.bfloat16)
    compiled = _run(torch.compile(_block, fullgraph=True, backend="aot_eager"), (x, w), {"backend": backend},
                    [0, 1], eager[2], autocast_dtype=torch.bfloat16)
    assert compiled[0].dtype == eager[0].dtype
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def test_float32_policy(backend, device, monkeypatch):
    """The CUDA rule of softmax and the norms, float32 out of lower-precision inputs, run here on any device (on
    the CPU torch has no such rule, so the test lends it one)."""
    for op in ("softmax", "layer_norm", "rms_norm"):
        monkeypatch.setitem(POLICY, op, (FLOAT32, (device,)))
    x = torch.randn(4, 24, device=device, dtype=torch.bfloat16)
    w, b = torch.randn(2, 24, device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        results = (fa.softmax(x, backend=backend), fa.layer_norm(x, (24,), w, b, backend=backend),
                   fa.rms_norm(x, (24,), w, backend=backend))
    x, w, b = x.float(), w.float(), b.float()
    for ours, expected in zip(results, (torch.softmax(x, -1), F.layer_norm(x, (24,), w, b), F.rms_norm(x, (24,), w))):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, expected)
