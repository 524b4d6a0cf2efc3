"""The op layer: custom-op registration (opcheck), the eager path around it, torch.compile, backend resolution and
bad input."""
import contextlib
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tolerance import assert_close

import fast_attention as fa
from fast_attention import backends, reference

OPS = torch.ops.fast_attention


def _softmax_case(device, backend):
    x = torch.randn(3, 17, device=device, requires_grad=True)
    return OPS.softmax.default, (x, 1, backend)


def _layer_norm_case(device, backend):
    x = torch.randn(3, 17, device=device, requires_grad=True)
    w = torch.randn(17, device=device, requires_grad=True)
    b = torch.randn(17, device=device, requires_grad=True)
    return OPS.layer_norm.default, (x, [17], w, b, 1e-5, backend, backend)  # forward and backward backends


def _rms_norm_case(device, backend):
    x = torch.randn(3, 17, device=device, requires_grad=True)
    w = torch.randn(17, device=device, requires_grad=True)
    return OPS.rms_norm.default, (x, [17], w, 1e-6, backend, backend)


def _attention_inputs(backend):
    """(dtype, head dim) of the attention cases: float32 at 16, or what the CUDA kernels take."""
    return (torch.float16, 32) if backend == "cuda" else (torch.float32, 16)


def _attention_case(device, backend):
    dtype, D = _attention_inputs(backend)
    q, k, v = (torch.randn(1, 2, L, D, device=device, dtype=dtype, requires_grad=True) for L in (5, 7, 7))
    mask = torch.randn(1, 1, 5, 7, device=device, dtype=dtype)
    return OPS.scaled_dot_product_attention.default, (q, k, v, mask, 0.0, False, 0.25, torch.tensor(0), backend)


def _attention_strided_case(device, backend):
    """query, key and value as projections give them: (B, L, H, D) storage seen as (B, H, L, D)."""
    dtype, D = _attention_inputs(backend)
    q, k, v = (torch.randn(1, L, 2, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_() for L in (5, 7, 7))
    return OPS.scaled_dot_product_attention.default, (q, k, v, None, 0.0, True, 0.25, torch.tensor(0), backend)


def _attention_weights_case(device, backend):
    _, (q, k, v, mask, dropout_p, is_causal, scale, seed, _) = _attention_case(device, backend)
    stats = OPS.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale, seed, "reference")[1]
    return OPS.attention_weights.default, (q, k, stats, mask, is_causal, scale, backend)


def _sinks(device):
    return torch.randn(2, device=device, requires_grad=True)  # one per head of the attention cases


def _attention_sinks_case(device, backend):
    op, args = _attention_case(device, backend)
    return op, (*args, _sinks(device))


def _attention_weights_sinks_case(device, backend):
    op, args = _attention_weights_case(device, backend)
    return op, (*args, _sinks(device))


SOFTCAP = 0.5


def _attention_softcap_case(device, backend):
    op, args = _attention_case(device, backend)
    return op, (*args, _sinks(device), SOFTCAP)


def _attention_weights_softcap_case(device, backend):
    op, args = _attention_weights_case(device, backend)
    return op, (*args, None, SOFTCAP)


def _attention_mask_grad_case(device, backend):
    """A float mask that requires grad, broadcast over the batch: the backward op returns its gradient."""
    op, (q, k, v, mask, *rest) = _attention_case(device, backend)
    return op, (q, k, v, mask.requires_grad_(), *rest)


WINDOW = (2, 1)


def _attention_window_case(device, backend):
    op, args = _attention_case(device, backend)
    return op, (*args, None, 0.0, *WINDOW)


def _attention_weights_window_case(device, backend):
    op, args = _attention_weights_case(device, backend)
    return op, (*args, None, 0.0, *WINDOW)


@pytest.mark.parametrize("case", [_softmax_case, _layer_norm_case, _rms_norm_case, _attention_case,
                                  _attention_strided_case, _attention_weights_case, _attention_sinks_case,
                                  _attention_weights_sinks_case, _attention_softcap_case,
                                  _attention_weights_softcap_case, _attention_mask_grad_case, _attention_window_case,
                                  _attention_weights_window_case],
                         ids=["softmax", "layer_norm", "rms_norm", "attention", "attention_strided",
                              "attention_weights", "attention_sinks", "attention_weights_sinks", "attention_softcap",
                              "attention_weights_softcap", "attention_mask_grad", "attention_window",
                              "attention_weights_window"])
def test_opcheck(case, backend, device):
    # The op is called with the backend named, past the checks that turn a call the backend cannot run into
    # NotImplementedError: each case gives it inputs it takes.
    op, args = case(device, backend)
    torch.library.opcheck(op, args)


def test_profiler_shows_ops(backend, device):
    x = torch.randn(4, 8, device=device)
    q = torch.randn(1, 2, 4, 16, device=device)
    with torch.profiler.profile() as prof:
        fa.softmax(x, backend=backend)
        fa.layer_norm(x, (8,), backend=backend)
        fa.rms_norm(x, (8,), backend=backend)
        fa.scaled_dot_product_attention(q, q, q, backend=backend)
    names = {e.name for e in prof.events()}
    for op in ("softmax", "layer_norm", "rms_norm", "scaled_dot_product_attention"):
        assert f"fast_attention::{op}" in names


def _every_op(backend, device):
    """Each public op with grad through every input: (name, output, inputs)."""
    x = torch.randn(3, 17, device=device, requires_grad=True)
    w, b = (torch.randn(17, device=device, requires_grad=True) for _ in range(2))
    q, k, v = (torch.randn(1, 2, L, 16, device=device, requires_grad=True) for L in (5, 7, 7))
    mask = torch.randn(1, 1, 5, 7, device=device)
    _, weights = fa.functional.scaled_dot_product_attention_with_weights(q, k, v, backend=backend)
    return [("softmax", fa.softmax(x, 1, backend=backend), (x,)),
            ("layer_norm", fa.layer_norm(x, (17,), w, b, backend=backend), (x, w, b)),
            ("rms_norm", fa.rms_norm(x, (17,), w, backend=backend), (x, w)),
            ("scaled_dot_product_attention",
             fa.scaled_dot_product_attention(q, k, v, mask, backend=backend), (q, k, v)),
            ("attention_weights", weights, (q, k))]


def test_eager_calls_skip_the_dispatcher_with_the_same_bits(backend, device):
    """In plain eager mode an op runs its body directly (ops/_direct.py); under the profiler it goes through the
    registered custom op. Outputs and gradients are the same bits either way."""
    seed = torch.seed()
    direct = _every_op(backend, device)
    torch.manual_seed(seed)
    with torch.profiler.profile():
        registered = _every_op(backend, device)
    for (name, out, inputs), (_, out_r, inputs_r) in zip(direct, registered):
        assert type(out.grad_fn).__name__ == "_RegisteredBackward", name
        assert f"fast_attention_{name}" in type(out_r.grad_fn).__name__, name
        assert torch.equal(out, out_r), name
        dout = torch.randn_like(out)
        for g, g_r in zip(torch.autograd.grad(out, inputs, dout), torch.autograd.grad(out_r, inputs_r, dout)):
            assert torch.equal(g, g_r), name


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_registered_ops(backend, device):
    x = torch.randn(3, 17, device=device, requires_grad=True)
    with _Recorder() as recorder:
        fa.layer_norm(x, (17,), backend=backend).sum().backward()
    ours = [op for op in recorder.ops if op.startswith("fast_attention.")]
    assert ours == ["fast_attention.layer_norm.default", "fast_attention.layer_norm_backward.default"]


def test_jit_trace_records_the_registered_op(backend, device):
    """torch.jit.trace sees dispatcher calls only: a direct call would leave the kernel out of the trace."""
    x = torch.randn(4, 8, device=device)
    traced = torch.jit.trace(lambda x: fa.softmax(x, 1, backend=backend), (x,))
    assert "fast_attention::softmax" in {node.kind() for node in traced.graph.nodes()}
    x2 = torch.randn(4, 8, device=device)
    assert torch.equal(traced(x2), fa.softmax(x2, 1, backend=backend))


def test_double_backward_raises_on_either_path(device):
    """The backward ops have no autograd: differentiating a gradient raises, never treats it as a constant."""
    for registered in (False, True):
        x = torch.randn(3, 17, device=device, requires_grad=True)
        with torch.profiler.profile() if registered else contextlib.nullcontext():
            y = fa.softmax(x, 1, backend="reference")
        (g,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
        with pytest.raises(RuntimeError, match="no autograd formula"):
            (g.sum() + x.sum()).backward()


class _Block(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.weight = torch.nn.Parameter(torch.randn(16))
        self.bias = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):  # x (B, H, L, 16)
        h = fa.layer_norm(x, (16,), self.weight, self.bias, backend=self.backend)
        h = fa.rms_norm(h, (16,), self.weight, backend=self.backend)
        h = fa.scaled_dot_product_attention(h, h, h, is_causal=True, backend=self.backend)
        return fa.softmax(h, dim=-2, backend=self.backend)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device, compiler):
    torch._dynamo.reset()
    block = _Block(backend).to(device)
    x = torch.randn(2, 2, 5, 16, device=device, requires_grad=True)
    eager = block(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    out = compiled(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_attention_sinks_and_softcap(backend, device, compiler):
    """Learned sinks (ops/attention.py) traced around the op, a logit cap, a local window and a learned bias (a
    float mask that requires grad, broadcast over the batch): the output, the weights and every gradient, the
    sinks' and the bias's among them, as eager."""
    torch._dynamo.reset()
    dtype, D = _attention_inputs(backend)
    q, k, v = (torch.randn(2, 2, L, D, device=device, dtype=dtype, requires_grad=True) for L in (5, 9, 9))
    sinks = _sinks(device)
    bias = torch.randn(1, 2, 5, 9, device=device, dtype=dtype).triu(1).masked_fill(
        torch.ones(5, 9, dtype=torch.bool, device=device).triu(1), float("-inf")).requires_grad_(backend != "cuda")
    # the CUDA kernels neither cap, nor give a mask's gradient, nor take a window
    softcap, window = (None, None) if backend == "cuda" else (0.5, (3, 2))

    def loss(q, k, v, sinks, bias):
        out, w = fa.functional.scaled_dot_product_attention_with_weights(q, k, v, attn_mask=bias, backend=backend,
                                                                         sinks=sinks, softcap=softcap,
                                                                         window_size=window)
        return out.float().square().sum() + w.square().sum()

    leaves = (q, k, v, sinks, bias) if bias.requires_grad else (q, k, v, sinks)
    results = []
    for f in (loss, torch.compile(loss, fullgraph=True, backend=compiler)):
        value = f(q, k, v, sinks, bias)
        results.append((value, *torch.autograd.grad(value, leaves)))
    torch.testing.assert_close(results[1], results[0])


def test_torch_export(backend, device):
    """torch.export keeps each op as one fast_attention:: node, and the exported program computes what eager does."""
    block = _Block(backend).to(device)
    x = torch.randn(2, 2, 5, 16, device=device)
    program = torch.export.export(block, (x,))
    exported = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("fast_attention.")}
    assert exported == {f"fast_attention.{op}.default" for op in
                        ("layer_norm", "rms_norm", "scaled_dot_product_attention", "softmax")}
    x = torch.randn(2, 2, 5, 16, device=device)
    torch.testing.assert_close(program.module()(x), block(x))


def test_compile_fullgraph_as_the_first_call_in_a_process(device, fresh_python):
    """A fresh process whose first call is inside torch.compile(fullgraph=True): every op resolves its backend
    without importing anything (dynamo cannot trace an import). In this process the backends are loaded already."""
    returncode, stderr = fresh_python(f"""
        import torch, fast_attention as fa
        def block(x):
            h = fa.layer_norm(x, (16,))
            h = fa.rms_norm(h, (16,))
            return fa.softmax(fa.scaled_dot_product_attention(h, h, h, is_causal=True), dim=-1)
        x = torch.randn(1, 2, 5, 16, device="{device}")
        torch.testing.assert_close(torch.compile(block, fullgraph=True, backend="aot_eager")(x), block(x))
    """, timeout=300)
    assert returncode == 0, stderr


@pytest.mark.parametrize("need_weights", [False, True])
def test_compile_multihead_attention_training(backend, device, need_weights):
    """A compiled training step of the drop-in module: its query, key and value are strided views of the
    projections, and need_weights=True (torch's default) backpropagates through the weights too. Gradients match
    eager, so the fake kernels give the strides the backends really return."""
    torch._dynamo.reset()
    mha = fa.nn.MultiheadAttention(16, 2, batch_first=True, backend=backend).to(device)
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    results = []
    for fn in (mha, torch.compile(mha, fullgraph=True, backend="aot_eager")):
        out, weights = fn(x, x, x, need_weights=need_weights)
        loss = out.sum() + (weights.square().sum() if need_weights else 0)
        results.append((out, *torch.autograd.grad(loss, (x, mha.in_proj_weight))))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_compile_dropout_is_seeded(backend, device):
    torch._dynamo.reset()
    q = torch.randn(1, 2, 6, 16, device=device, dtype=torch.float16 if backend == "cuda" else torch.float32)
    # Eagerly first: a backend without dropout raises NotImplementedError (reported as a skip), which dynamo
    # would wrap in its own error.
    fa.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend=backend)
    f = torch.compile(lambda q: fa.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend=backend),
                      fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    a = f(q)
    torch.manual_seed(1)
    b = f(q)
    c = f(q)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------ backend choice
def test_available_backends():
    names = fa.available_backends()
    assert "reference" in names
    assert names == [n for n in backends.NAMES if n in names]  # fastest first
    if backends.TRITON_INTERPRET or torch.cuda.is_available():
        assert "triton" in names, f"the Triton backend did not load: {backends._load_errors.get('triton')}"


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False)])
def test_triton_interpreter_refuses_numpy_it_cannot_run_with(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter fails inside every kernel with numpy 2.4 (triton-lang/triton#9171): the backend
    says so and names the fix, instead."""
    triton, numpy = pytest.importorskip("triton"), pytest.importorskip("numpy")
    from fast_attention.kernels import attention, unavailable

    monkeypatch.setattr(attention, "INTERPRET", True)
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = unavailable()
    assert ("numpy<2.4 or triton>=3.7" in reason) if refused else reason is None


def test_unavailable_backend_is_left_out_with_its_reason(monkeypatch):
    """A backend whose module loads but says it cannot run here is not offered, and the reason is kept."""
    import fast_attention.reference

    monkeypatch.setattr(fast_attention.reference, "unavailable", lambda: "no reason at all", raising=False)
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    assert "reference" not in fa.available_backends()
    assert backends._load_errors["reference"] == "RuntimeError: no reason at all"


def test_triton_backend_that_cannot_load_warns_where_it_was_asked_for(monkeypatch):
    """With TRITON_INTERPRET=1 the user asked for Triton on the CPU: its falling back to the reference is said, once."""
    import fast_attention.kernels

    monkeypatch.setattr(backends, "TRITON_INTERPRET", True)
    monkeypatch.setattr(fast_attention.kernels, "unavailable", lambda: "the interpreter cannot run here")
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_load_errors", {})
    with pytest.warns(UserWarning, match="the triton backend is not available .*the interpreter cannot run here"):
        assert "triton" not in fa.available_backends()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "triton" not in fa.available_backends()  # said once


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="'triton', 'cuda', 'reference'"):
        fa.softmax(torch.randn(3), backend="tpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        fa.use_backend("tpu")


def test_use_backend_sets_default_and_restores():
    x = torch.randn(2, 3)
    with fa.use_backend("reference"):
        with torch.profiler.profile() as prof:
            fa.softmax(x)
        assert backends.default_backend() == "reference"
    assert backends.default_backend() is None
    assert any(e.name == "fast_attention::softmax" for e in prof.events())
    fa.use_backend("reference")  # a plain call: the whole process's default
    try:
        seen = []
        thread = threading.Thread(target=lambda: seen.append(backends.default_backend()))
        thread.start()
        thread.join()
        assert seen == ["reference"]
    finally:
        fa.use_backend(None)


def test_use_backend_blocks_belong_to_their_thread():
    """Threads in `with fa.use_backend(...)` blocks at once each see their own, and leave no default behind."""
    names = ["reference", "triton", None, "reference", "triton", None] * 2
    barrier = threading.Barrier(len(names))
    seen = {}

    def work(i, name):
        with fa.use_backend(name):
            barrier.wait()  # every block entered before any reads or leaves
            seen[i] = backends.default_backend()
            barrier.wait()

    threads = [threading.Thread(target=work, args=(i, name)) for i, name in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == dict(enumerate(names)) and backends.default_backend() is None and backends._default is None


def test_auto_choice_falls_back_for_float64(device):
    x = torch.randn(3, 5, dtype=torch.float64, device=device)
    assert backends.resolve("softmax", None, x.device, input=x) == "reference"
    torch.testing.assert_close(fa.softmax(x), torch.softmax(x, -1))


def test_float64_is_float64_accurate(device):
    """float64 runs on the reference backend in float64, its saved statistics (mean, rstd, attention's row max and
    log sum) and the attention weights included: the gradients match torch's float64 ones, not merely to float32's
    precision."""
    def grads(f, *leaves):
        out = f(*leaves)
        outs = out if isinstance(out, tuple) else (out,)
        return outs, torch.autograd.grad(outs, leaves, [torch.randn_like(o) for o in outs])

    def same(f, g, *shapes):
        leaves = [torch.randn(s, dtype=torch.float64, device=device, requires_grad=True) for s in shapes]
        state = torch.get_rng_state()  # the same output gradients for both
        ours = grads(f, *leaves)
        torch.set_rng_state(state)
        theirs = grads(g, *leaves)
        for a, b in zip([*ours[0], *ours[1]], [*theirs[0], *theirs[1]]):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    tf = torch.nn.functional
    same(lambda x, w, b: fa.layer_norm(x, (33,), w, b), lambda x, w, b: tf.layer_norm(x, (33,), w, b),
         (5, 33), (33,), (33,))
    same(lambda x, w: fa.rms_norm(x, (33,), w), lambda x, w: tf.rms_norm(x, (33,), w), (5, 33), (33,))
    same(lambda q, k, v: fa.scaled_dot_product_attention(q, k, v, is_causal=True),
         lambda q, k, v: tf.scaled_dot_product_attention(q, k, v, is_causal=True), (2, 3, 9, 8), (2, 3, 13, 8),
         (2, 3, 13, 8))
    ours, theirs = fa.nn.MultiheadAttention(8, 2, dtype=torch.float64), torch.nn.MultiheadAttention(8, 2)
    ours.to(device).load_state_dict(theirs.double().to(device).state_dict())
    same(lambda x: ours(x, x, x), lambda x: theirs(x, x, x), (4, 2, 8))  # the weights too


def test_norm_backward_resolves_on_its_own_only_without_a_backend_asked_for(monkeypatch):
    monkeypatch.setattr(backends, "why_not", lambda name, op, device, **args: None)  # every backend can run it
    cpu = torch.device("cpu")
    assert backends.resolve_backward("layer_norm", None, "triton", cpu) == "cuda"
    assert backends.resolve_backward("rms_norm", None, "triton", cpu) == "cuda"
    assert backends.resolve_backward("layer_norm", "triton", "triton", cpu) == "triton"
    assert backends.resolve_backward("softmax", None, "triton", cpu) == "triton"
    with fa.use_backend("triton"):
        assert backends.resolve_backward("rms_norm", None, "triton", cpu) == "triton"


def test_decoding_prefers_cuda_and_under_torch_compile_triton(monkeypatch):
    """backend=None runs decoding (Lq <= 16 queries, >= 1024 keys, not causal, no window or dropout) on the CUDA
    backend, where the Triton one's launch path dominates each eager call, the same inside a CUDA-graph capture
    (which its eager warm-up must have compiled), and on Triton under torch.compile (backends._DECODING_ORDER).
    Stand-ins for CUDA tensors: only shapes and the device are read."""
    from types import SimpleNamespace
    monkeypatch.setattr(backends, "why_not", lambda name, op, device, **args: None)  # every backend can run it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)  # must not matter
    gpu = torch.device("cuda")

    def resolve(Lq=1, Lk=4096, backend=None, **args):
        q = SimpleNamespace(shape=(2, 8, Lq, 64), device=gpu)
        k = SimpleNamespace(shape=(2, 2, Lk, 64), device=gpu)
        return backends.resolve("scaled_dot_product_attention", backend, gpu, query=q, key=k, value=k, **args)

    assert resolve() == resolve(Lq=16, Lk=1024) == "cuda"
    assert resolve(Lq=17) == resolve(Lk=1023) == resolve(is_causal=True) == resolve(dropout_p=0.1) == "triton"
    assert resolve(window=(500, 0)) == "triton"  # CUDA's split-KV kernel takes no window, Triton's does
    assert resolve(backend="triton") == "triton"
    with fa.use_backend("triton"):
        assert resolve() == "triton"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve() == "triton"


def test_decoding_bounds_agree_with_the_kernels():
    """backends' decoding shapes are those the kernels give their split-KV path: the Triton launcher's bounds and
    the CUDA ones (csrc/attention/decode_kernel.cuh). backends cannot import either (triton, the extension)."""
    import re
    from pathlib import Path
    header = (Path(__file__).parent.parent / "csrc" / "attention" / "decode_kernel.cuh").read_text()
    assert int(re.search(r"kDecodeMaxQ = (\d+);", header)[1]) == backends.DECODE_MAX_LQ
    assert int(re.search(r"kDecodeMinKeys = (\d+);", header)[1]) == backends.DECODE_MIN_LK
    if "triton" in fa.available_backends():
        from fast_attention.kernels import attention as kernels
        assert (kernels.DECODE_MAX_LQ, kernels.DECODE_MIN_LK) == (backends.DECODE_MAX_LQ, backends.DECODE_MIN_LK)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norm_backward_on_another_backend_than_the_forward(op, monkeypatch, device):
    """backend=None may run a norm's backward on another backend than its forward (backends._BACKWARD_ORDER):
    the backward backend gets the forward's mean / rstd, and the gradients are right. Here the forward runs on the
    first backend and the backward on the reference; on a GPU with both kernel backends, the default order
    (Triton forward, CUDA backward) runs too."""
    names = fa.available_backends()
    if len(names) < 2:
        pytest.skip("needs two backends")
    orders = [(names[0], ("reference",))]
    if {"triton", "cuda"} <= set(names):
        orders.append(("triton", backends._BACKWARD_ORDER[op]))
    for forward, order in orders:
        monkeypatch.setitem(backends._BACKWARD_ORDER, op, order)
        backward = order[0]
        ran = []
        module = backends.get(backward)
        real = getattr(module, f"{op}_backward")
        monkeypatch.setattr(module, f"{op}_backward", lambda *a, real=real: ran.append(backward) or real(*a))
        x = (torch.randn(5, 33, device=device) * 2 + 1).requires_grad_()
        w = torch.randn(33, device=device, requires_grad=True)
        params = (w, torch.randn(33, device=device, requires_grad=True)) if op == "layer_norm" else (w,)
        assert backends.resolve(op, None, x.device, input=x) == forward
        out = getattr(fa, op)(x, (33,), *params)
        expected = getattr(reference, op)(x, (33,), *params)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, *params), dout)
        assert ran == [backward]
        for g, e in zip(grads, torch.autograd.grad(expected, (x, *params), dout)):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend='cuda'.*CUDA tensors"):
        fa.softmax(torch.randn(3), backend="cuda")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, error, match", [
    (lambda: fa.softmax(torch.arange(6)), TypeError, "input must be a floating-point tensor"),
    (lambda: fa.softmax(torch.randn(2, 3), dim=2), IndexError, "dim must be in"),
    (lambda: fa.softmax(torch.randn(2, 3), dim=True), TypeError, "dim must be an int, got bool"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3.0,)), TypeError, "normalized_shape must be an int"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (4,)), ValueError, "normalized_shape"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3,), torch.randn(4)), ValueError, "weight must have shape"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3,), None, torch.randn(2)), ValueError, "bias must have shape"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3,), torch.ones(3, dtype=torch.int32)), TypeError, "weight"),
    (lambda: fa.rms_norm(torch.randint(0, 3, (2, 3)), (3,)), TypeError, "input"),
    (lambda: fa.rms_norm(torch.randn(2, 3), (2, 3, 1)), ValueError, "normalized_shape"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3,), torch.randn(3, device="meta")), ValueError, "weight is on meta"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3,), eps=None), TypeError, "eps must be a float, got NoneType"),
    (lambda: fa.layer_norm(torch.randn(2, 3), (3,), eps="1e-5"), TypeError, "eps must be a float, got str"),
    (lambda: fa.rms_norm(torch.randn(2, 3), (3,), eps="x"), TypeError, "eps must be a float, got str"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_integer_arguments_take_what_torch_takes():
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3)
    torch.testing.assert_close(fa.softmax(x, np.int64(1)), torch.softmax(x, 1))
    torch.testing.assert_close(fa.layer_norm(x, (np.int64(3),)), torch.nn.functional.layer_norm(x, (3,)))


def test_float_arguments_take_what_torch_takes():
    """eps, scale and dropout_p: Python and numpy numbers, and one-element tensors, as torch's argument parser."""
    np = pytest.importorskip("numpy")
    x, (q, k, v) = torch.randn(2, 3), _qkv()
    for eps in (np.float32(0.25), torch.tensor(0.25), 1):
        torch.testing.assert_close(fa.layer_norm(x, (3,), eps=eps), torch.nn.functional.layer_norm(x, (3,), eps=eps))
        torch.testing.assert_close(fa.rms_norm(x, (3,), eps=eps), torch.nn.functional.rms_norm(x, (3,), eps=eps))
    for scale in (np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(fa.scaled_dot_product_attention(q, k, v, scale=scale, dropout_p=torch.tensor(0.0)),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5))


def _qkv(B=1, H=2, Lq=4, Lk=6, D=16, Hkv=None, dtype=torch.float32):
    Hkv = H if Hkv is None else Hkv
    return (torch.randn(B, H, Lq, D, dtype=dtype), torch.randn(B, Hkv, Lk, D, dtype=dtype),
            torch.randn(B, Hkv, Lk, D, dtype=dtype))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((torch.randn(2, 2, 4, 16), torch.randn(3, 2, 6, 16), torch.randn(3, 2, 6, 16)), {}, ValueError,
     "must broadcast"),
    ((_qkv()[0], torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)), {}, ValueError, "key's head dim"),
    ((torch.randn(1, 4, 4, 16), *_qkv(Hkv=2)[1:]), {}, ValueError, "enable_gqa=True"),
    ((torch.randn(1, 3, 4, 16), *_qkv(Hkv=2)[1:]), {"enable_gqa": True}, ValueError, "divisible"),
    ((_qkv()[0], _qkv()[1], _qkv(dtype=torch.float16)[2]), {}, TypeError, "same dtype"),
    (_qkv(), {"attn_mask": torch.ones(3, 6, dtype=torch.bool)}, ValueError, "attn_mask of shape"),
    (_qkv(), {"attn_mask": torch.ones(4, 6, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
    (_qkv(), {"dropout_p": 1.5}, ValueError, "dropout_p"),
    (_qkv(), {"dropout_p": None}, TypeError, "dropout_p must be a float, got NoneType"),
    (_qkv(), {"scale": "a"}, TypeError, "scale must be a float, got str"),
    (_qkv(), {"attn_mask": [[True] * 6] * 4}, TypeError, "attn_mask must be a torch.Tensor or None, got list"),
    (_qkv(), {"dropout_p": 1.0}, NotImplementedError, "dropout_p=1"),
    ((torch.randn(16), torch.randn(4, 16), torch.randn(4, 16)), {}, ValueError, "query must have at least 2 dims"),
    ((torch.randn(4, 0), torch.randn(4, 0), torch.randn(4, 16)), {}, NotImplementedError, "head dim of 0"),
    ((torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16)), {}, ValueError,
     "same number of heads"),
    ((_qkv()[0], _qkv()[1], torch.randn(1, 2, 5, 16)), {}, ValueError, "value must have as many positions"),
])
def test_attention_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fa.scaled_dot_product_attention(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_float_mask_gradient(backend, dtype):
    """A float attn_mask that requires grad (a learned bias broadcast over the batch, as T5's): torch's output and
    gradients, the mask's included (dS from the dQ kernel, summed over the mask's broadcast dims), and the weights,
    differentiable too."""
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, Lq=5, Lk=7, dtype=dtype))
    bias = torch.randn(1, 2, 5, 7, dtype=dtype)
    bias[..., 0, 3:] = float("-inf")
    bias.requires_grad_()
    leaves = (q, k, v, bias)
    r_leaves = [t.detach().double().requires_grad_() for t in leaves]
    out = fa.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend=backend)
    dout = torch.randn_like(out)
    with sdpa_kernel(SDPBackend.MATH):
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    oracle = reference.scaled_dot_product_attention(*r_leaves[:3], attn_mask=r_leaves[3])
    assert_close(out, theirs, oracle)
    for name, ours, their_grad, oracle_grad in zip(
            ("dq", "dk", "dv", "dmask"), torch.autograd.grad(out, leaves, dout),
            torch.autograd.grad(theirs, leaves, dout), torch.autograd.grad(oracle, r_leaves, dout.double())):
        assert ours.shape == oracle_grad.shape, name
        assert_close(ours, their_grad, oracle_grad, name)
    # the weights: float32, and a loss through them reaches the mask as torch's softmax does
    _, weights = fa.functional.scaled_dot_product_attention_with_weights(q, k, v, attn_mask=bias, backend=backend)
    theirs = torch.softmax(q @ k.transpose(-2, -1) / 4 + bias, -1)
    oracle = torch.softmax(r_leaves[0] @ r_leaves[1].transpose(-2, -1) / 4 + r_leaves[3], -1)
    assert weights.dtype == torch.float32 and weights.shape == (2, 2, 5, 7)
    assert_close(weights.to(dtype), theirs, oracle, "weights")
    dw = torch.randn_like(oracle)
    assert_close(torch.autograd.grad(weights, bias, dw.float())[0], torch.autograd.grad(theirs, bias, dw.to(dtype))[0],
                 torch.autograd.grad(oracle, r_leaves[3], dw)[0], "dmask through the weights")



@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4)])
def test_empty_tensors_behave_as_torch(backend, device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = fa.softmax(x, dim=-1, backend=backend)
    assert y.shape == torch.softmax(x, -1).shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    if shape[-1] > 0:
        w = torch.randn(shape[-1], device=device, requires_grad=True)
        out = fa.layer_norm(x, (shape[-1],), w, backend=backend)
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (shape[-1],), w))
        out.sum().backward()
        torch.testing.assert_close(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("shapes", [[(1, 1, 0, 0)] * 3, [(0, 2, 3, 0), (0, 2, 4, 0), (0, 2, 4, 5)],
                                    [(2, 0, 3, 8)] * 3, [(2, 3, 8), (2, 0, 8), (2, 0, 8)]])
def test_attention_empty_shapes_as_torch(device, shapes):
    """Empty outputs, a head dim of 0 among them (no scale to divide by), come back in torch's shape (its math
    kernel's: torch 2.11's default CPU kernel dies with SIGFPE on zero heads, taking pytest with it)."""
    q, k, v = (torch.randn(s, device=device) for s in shapes)
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(q, k, v).shape
    assert fa.scaled_dot_product_attention(q, k, v).shape == expected


@pytest.mark.parametrize("op", ["rms_norm_backward", "layer_norm_backward"])
def test_empty_input_parameter_gradients_match_their_fake(device, op):
    """An empty input's weight gradient has the weight's dtype, as the fake kernel says: inductor sizes and reads
    its buffers by the fake's dtype, and read a float16 result as float32 before."""
    x = torch.empty(0, 5, dtype=torch.float16, device=device)
    w, stat = torch.randn(5, device=device), torch.empty(0, device=device)
    args = (x, x, [5], w, stat, "reference") if op == "rms_norm_backward" else (x, x, [5], w, stat, stat, True,
                                                                                 "reference")
    torch.library.opcheck(getattr(OPS, op).default, args)


def test_reference_oracle_matches_torch():
    # The oracle is what every other test trusts: check it against torch itself, in float64.
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(reference.softmax(x, 1), torch.softmax(x, 1))
    w, b = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(reference.layer_norm(x, (4, 7), w, b), torch.nn.functional.layer_norm(x, (4, 7), w, b))
    torch.testing.assert_close(reference.rms_norm(x, (7,), w[0]), torch.nn.functional.rms_norm(x, (7,), w[0]))
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    kv2 = (k[:, :2], v[:, :2])
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": torch.rand(5, 5) > 0.3},
                   {"attn_mask": torch.randn(2, 1, 5, 5, dtype=torch.float64)}, {"scale": 0.3}):
        torch.testing.assert_close(reference.scaled_dot_product_attention(q, k, v, **kwargs),
                                   torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs))
    torch.testing.assert_close(reference.scaled_dot_product_attention(q, *kv2, enable_gqa=True),
                               torch.nn.functional.scaled_dot_product_attention(q, *kv2, enable_gqa=True))
