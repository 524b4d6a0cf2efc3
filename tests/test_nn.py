"""fast_attention.nn against torch.nn: MultiheadAttention over a grid of constructor and forward arguments
(outputs, attention weights, gradients of inputs and parameters, state_dict both ways), LayerNorm, RMSNorm and
Softmax (values, gradients, state_dict, constructor, extra_repr), on every backend. Float32 against torch's float32
with torch in float64 as the reference (tests/tolerance.py)."""
import inspect
import itertools
import warnings

import pytest
import torch
from tolerance import assert_close
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import fast_attention as fa
import fast_attention.functional

E, H = 8, 2  # head_dim 4
N, L, S = 2, 3, 5  # batch, target length, source length


@pytest.fixture(autouse=True)
def _on_test_device(device):
    with torch.device(device):  # modules, inputs and masks built in a test live on the test device
        yield


def randomize(module):
    """torch initializes biases to zero; tests want every parameter random."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return module


def trio(cls_ours, cls_torch, *args, backend, **kwargs):
    """(ours fp32, torch fp32, torch fp64), all with the same random parameters."""
    theirs = randomize(cls_torch(*args, **kwargs))
    ours = cls_ours(*args, backend=backend, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    reference = cls_torch(*args, **kwargs).double()
    reference.load_state_dict(theirs.state_dict())
    return ours, theirs, reference


def backward(out, weights, dy, dw):
    """Backpropagate sum(out * dy) + sum(weights * dw): the attention weights are differentiable, as torch's."""
    loss = (out * dy.to(out.dtype)).sum()
    if weights is not None:
        loss = loss + (weights * dw.to(weights.dtype)).sum()
    loss.backward()


def forward_and_grads(module, inputs, dy, dw=None, **kwargs):
    """module(*inputs, **kwargs) -> output, weights, gradients of (unique) inputs, gradients of parameters."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out, weights = module(*leaves, **kwargs)
    backward(out, weights, dy, dw)
    grads = [x.grad for x in leaves]
    param_grads = {n: p.grad for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return out, weights, grads, param_grads


def compare_mha(ours, theirs, reference, inputs, self_attention=False, **kwargs):
    """Run the three modules on the same inputs (query, key, value; one tensor when self_attention, so the packed
    projection runs) and compare output, weights and every gradient."""
    dy = dw = None
    results = []
    for module, dtype in ((ours, torch.float32), (theirs, torch.float32), (reference, torch.float64)):
        cast = [x.to(dtype) for x in inputs]
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kwargs.items()}
        if dy is None:
            with torch.no_grad():
                out, weights = module(*(cast * 3 if self_attention else cast), **kw)
            dy, dw = torch.randn_like(out), None if weights is None else torch.randn_like(weights)
        if self_attention:
            leaf = cast[0].detach().clone().requires_grad_()
            out, weights = module(leaf, leaf, leaf, **kw)
            backward(out, weights, dy, dw)
            grads, param_grads = [leaf.grad], {n: p.grad for n, p in module.named_parameters()}
            module.zero_grad(set_to_none=True)
        else:
            out, weights, grads, param_grads = forward_and_grads(module, cast, dy, dw, **kw)
        results.append((out, weights, grads, param_grads))
    (o, w, g, pg), (t, tw, tg, tpg), (r, rw, rg, rpg) = results
    assert o.dtype == torch.float32 and o.shape == r.shape
    assert_close(o, t, r, "output")
    if kwargs.get("need_weights", True):
        assert w.dtype == torch.float32
        assert_close(w, tw.detach(), rw.detach(), "attention weights")
    else:
        assert w is None and tw is None
    for i, (a, b, c) in enumerate(zip(g, tg, rg)):
        assert_close(a, b, c, f"grad of input {i}")
    assert pg.keys() == rpg.keys()
    for name in pg:
        assert_close(pg[name], tpg[name], rpg[name], f"grad of {name}")
    return o, w


def make_mask(kind, shape):
    """A random torch-convention mask: bool (True = masked) or float (added, with some -inf), never masking key
    0, so no row is fully masked (torch gives NaN there, we give zeros: tested apart)."""
    if kind is None:
        return None
    if kind == "bool":
        mask = torch.rand(shape) < 0.4
        mask[..., 0] = False
        return mask
    mask = torch.randn(shape).masked_fill(torch.rand(shape) < 0.3, float("-inf"))
    mask[..., 0] = torch.randn(mask[..., 0].shape)
    return mask


MODULE_CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False, batch_first=True),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
    dict(add_bias_kv=True, add_zero_attn=True, bias=False),
    dict(kdim=6, vdim=5),
    dict(kdim=6, vdim=5, batch_first=True, add_bias_kv=True),
]
MASK_CONFIGS = [  # (key_padding_mask, attn_mask)
    (None, None), ("bool", None), ("float", None), (None, "bool2"), (None, "float2"), (None, "bool3"),
    (None, "float3"), ("bool", "bool2"), ("float", "float3"), ("bool", "float2"),
]
WEIGHT_MODES = [dict(need_weights=False), dict(need_weights=True), dict(need_weights=True, average_attn_weights=False)]
# half of the (module, masks) pairs, a checkerboard: each masks config meets four module configs (both layouts,
# with and without bias_k / zero attention / kdim), and the weights mode rotates so it meets all three modes
MHA_GRID = [(cfg, masks, WEIGHT_MODES[(i + j) // 2 % 3])
            for (i, cfg), (j, masks) in itertools.product(enumerate(MODULE_CONFIGS), enumerate(MASK_CONFIGS))
            if (i + j) % 2 == 0]


def mha_inputs(cfg, batched=True):
    """query, key, value in the module's layout (unbatched: no batch dim)."""
    shapes = [(L, N, E), (S, N, cfg.get("kdim", E)), (S, N, cfg.get("vdim", E))]
    tensors = [torch.randn(shape) for shape in shapes]
    if not batched:
        return [t[:, 0] for t in tensors]
    return [t.transpose(0, 1) for t in tensors] if cfg.get("batch_first") else tensors


def mha_masks(kpm_kind, mask_kind, batched=True, heads=H):
    kpm = make_mask(kpm_kind, (N, S) if batched else (S,))
    mask = None
    if mask_kind is not None:
        dims = {"2": (L, S), "3": ((N if batched else 1) * heads, L, S)}[mask_kind[-1]]
        mask = make_mask(mask_kind[:-1], dims)
    return kpm, mask


@pytest.mark.parametrize("cfg,masks,mode", MHA_GRID, ids=lambda v: str(v).replace(" ", ""))
def test_multihead_attention_matches_torch(backend, cfg, masks, mode):
    ours, theirs, reference = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend=backend,
                                   **cfg)
    kpm, mask = mha_masks(*masks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixed mask types: torch and we both warn that it is deprecated
        compare_mha(ours, theirs, reference, mha_inputs(cfg), key_padding_mask=kpm, attn_mask=mask, **mode)


@pytest.mark.parametrize("cfg", [dict(), dict(batch_first=True, add_zero_attn=True), dict(add_bias_kv=True)])
def test_multihead_attention_self_attention(backend, cfg):
    """query is key is value: the packed in-projection path."""
    ours, theirs, reference = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend=backend,
                                   **cfg)
    x = torch.randn(N, S, E) if cfg.get("batch_first") else torch.randn(S, N, E)
    kpm = make_mask("bool", (N, S))
    compare_mha(ours, theirs, reference, [x], self_attention=True, key_padding_mask=kpm)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_self_attention_projects_once(monkeypatch, batch_first):
    """As torch: self-attention (query is key is value) takes one packed (3E, E) projection, batch_first too."""
    m = fa.nn.MultiheadAttention(E, H, batch_first=batch_first, backend="reference")
    shapes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: shapes.append(tuple(w.shape)) or
                        linear(x, w, b))
    x = torch.randn(N, S, E) if batch_first else torch.randn(S, N, E)
    m(x, x, x)
    assert shapes == [(3 * E, E), (E, E)]


def test_multihead_attention_weights_dtype_under_autocast():
    """softmax(bmm(q, k^T)) under CPU autocast: torch's weights come out in the autocast dtype (its CPU autocast
    leaves softmax alone), and so do ours."""
    ours, theirs, _ = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend="reference")
    q, k, v = mha_inputs({})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, w), (out_t, w_t) = ours(q, k, v), theirs(q, k, v)
    assert (out.dtype, w.dtype) == (out_t.dtype, w_t.dtype)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_multihead_attention_is_causal(backend, need_weights, with_padding):
    """is_causal is torch's hint that attn_mask is causal: torch wants both."""
    cfg = dict(batch_first=True)
    ours, theirs, reference = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend=backend,
                                   **cfg)
    x = torch.randn(N, S, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S)
    kpm = make_mask("float", (N, S)) if with_padding else None
    compare_mha(ours, theirs, reference, [x], self_attention=True, attn_mask=causal, is_causal=True,
                key_padding_mask=kpm, need_weights=need_weights)


@pytest.mark.parametrize("cfg,masks,mode", [
    (dict(), (None, None), WEIGHT_MODES[1]),
    (dict(batch_first=True), ("bool", "bool3"), WEIGHT_MODES[2]),
    (dict(add_bias_kv=True, kdim=6, vdim=5), ("float", "float2"), WEIGHT_MODES[0]),
    (dict(add_zero_attn=True), (None, "bool3"), WEIGHT_MODES[1]),
], ids=str)
def test_multihead_attention_unbatched(backend, cfg, masks, mode):
    ours, theirs, reference = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend=backend,
                                   **cfg)
    kpm, mask = mha_masks(*masks, batched=False)
    out, weights = compare_mha(ours, theirs, reference, mha_inputs(cfg, batched=False), key_padding_mask=kpm,
                               attn_mask=mask, **mode)
    assert out.shape == (L, E)


def test_multihead_attention_noncontiguous_inputs(backend):
    ours, theirs, reference = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend=backend,
                                   batch_first=True)
    q, k, v = (torch.randn(N, 2 * n, E)[:, ::2] for n in (L, S, S))  # every other position: strided
    assert not q.is_contiguous()
    compare_mha(ours, theirs, reference, [q, k, v], key_padding_mask=make_mask("bool", (N, S)))


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_fully_masked_rows_give_zeros(backend, need_weights):
    """Documented difference: torch gives NaN for a query whose every key is masked; we give zero attention, so
    the output row is out_proj's bias and the weights row is zero."""
    ours = randomize(fa.nn.MultiheadAttention(E, H, batch_first=True, backend=backend))
    theirs = torch.nn.MultiheadAttention(E, H, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    q, k = torch.randn(N, L, E), torch.randn(N, S, E)
    mask = torch.rand(L, S) < 0.3
    mask[:, 0] = False
    mask[1] = True  # query 1 sees no key
    out, weights = ours(q, k, k, attn_mask=mask, need_weights=need_weights)
    expected, expected_weights = theirs(q, k, k, attn_mask=mask, need_weights=need_weights)
    torch.testing.assert_close(out[:, 1], ours.out_proj.bias.expand(N, E).detach())
    keep = [0, 2]
    torch.testing.assert_close(out[:, keep], expected[:, keep])
    if need_weights:
        assert torch.equal(weights[:, 1], torch.zeros(N, S))
        torch.testing.assert_close(weights[:, keep], expected_weights[:, keep])


@pytest.mark.parametrize("cfg", [dict(), dict(kdim=6, vdim=5), dict(bias=False, add_bias_kv=True),
                                 dict(add_zero_attn=True, batch_first=True)], ids=str)
def test_multihead_attention_state_dict_both_ways(backend, cfg):
    theirs = randomize(torch.nn.MultiheadAttention(E, H, **cfg))
    ours = fa.nn.MultiheadAttention(E, H, backend=backend, **cfg)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())  # strict: same keys and shapes
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    back = torch.nn.MultiheadAttention(E, H, **cfg)
    randomize(ours)
    back.load_state_dict(ours.state_dict())
    q, k, v = mha_inputs(cfg)
    torch.testing.assert_close(ours(q, k, v)[0], back(q, k, v)[0])


def test_multihead_attention_attributes_and_constructor():
    """What nn.TransformerEncoderLayer and user code read, and the constructor: same as torch's."""
    for cfg in (dict(), dict(kdim=6, vdim=5, bias=False), dict(add_bias_kv=True, batch_first=True, dropout=0.25)):
        ours, theirs = fa.nn.MultiheadAttention(E, H, **cfg), torch.nn.MultiheadAttention(E, H, **cfg)
        for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            assert getattr(ours, attr) == getattr(theirs, attr), attr
        for attr in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k",
                     "bias_v"):
            assert (getattr(ours, attr) is None) == (getattr(theirs, attr) is None), attr
        assert type(ours.out_proj) is NonDynamicallyQuantizableLinear
        assert ours.backend is None and ours.training
    assert_same_constructor(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention)
    with pytest.raises(ValueError, match="divisible"):
        fa.nn.MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="num_heads"):
        fa.nn.MultiheadAttention(8, 0)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_float_masks_take_gradients(need_weights):
    """Float attn_mask and key_padding_mask that require grad (learned biases) get torch's gradients (the Triton
    kernels or the reference give a mask's; backend=None takes them over the CUDA kernels, which give none)."""
    ours, theirs, reference = trio(fa.nn.MultiheadAttention, torch.nn.MultiheadAttention, E, H, backend=None)
    q, k, v = mha_inputs({})
    bias, padding = torch.randn(L, S), torch.randn(N, S)
    results = []
    for module, dtype in ((ours, torch.float32), (theirs, torch.float32), (reference, torch.float64)):
        masks = [t.to(dtype).requires_grad_() for t in (bias, padding)]
        out, _ = module(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=masks[0], key_padding_mask=masks[1],
                        need_weights=need_weights)
        results.append((out, *torch.autograd.grad(out.square().sum(), masks)))
    for name, *values in zip(("output", "d attn_mask", "d key_padding_mask"), *results):
        assert_close(*values, name)


def test_multihead_attention_bad_input(backend):
    m = fa.nn.MultiheadAttention(E, H, backend=backend)
    q, k, v = mha_inputs({})
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        m(q, k, v, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        m(q, k, v, attn_mask=torch.zeros(L, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        m(q, k, v, key_padding_mask=torch.zeros(N, S + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="query's last dim"):
        m(torch.randn(L, N, E + 1), k, v)
    with pytest.raises(TypeError, match="key_padding_mask must be bool or floating point"):
        m(q, k, v, key_padding_mask=torch.zeros(N, S, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend must be one of"):
        fa.nn.MultiheadAttention(E, H, backend="nope")(q, k, v)


def test_multihead_attention_dropout_only_in_training(backend):
    ours = randomize(fa.nn.MultiheadAttention(E, H, dropout=0.5, backend=backend))
    plain = fa.nn.MultiheadAttention(E, H, backend=backend)
    plain.load_state_dict(ours.state_dict())
    q, k, v = mha_inputs({})
    ours.eval()
    torch.testing.assert_close(ours(q, k, v)[0], plain(q, k, v)[0])
    ours.train()
    torch.manual_seed(1)
    dropped, weights = ours(q, k, v, average_attn_weights=False)
    torch.manual_seed(1)
    again, _ = ours(q, k, v)
    assert not torch.allclose(dropped, plain(q, k, v)[0])
    torch.testing.assert_close(dropped, again)  # torch's generator seeds the dropout mask
    # the weights are the probabilities before dropout (documented): rows still sum to one
    torch.testing.assert_close(weights.sum(-1), torch.ones(N, H, L))


def test_multihead_attention_under_activation_checkpointing(backend):
    """torch.utils.checkpoint recomputes the forward in backward with the generator state it saved: the dropout
    mask drawn again is the same, so the output and gradients equal those without checkpointing."""
    mha = randomize(fa.nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True, backend=backend)).train()
    x = torch.randn(N, L, E, requires_grad=True)
    attend = lambda t: mha(t, t, t, need_weights=False)[0]  # noqa: E731
    results = []
    for fn in (attend, lambda t: torch.utils.checkpoint.checkpoint(attend, t, use_reentrant=False)):
        torch.manual_seed(3)
        out = fn(x)
        results.append((out, *torch.autograd.grad(out.square().sum(), (x, mha.in_proj_weight))))
    for plain, checkpointed in zip(*results):
        torch.testing.assert_close(checkpointed, plain)


def test_multihead_attention_masks_not_materialized(monkeypatch):
    """key_padding_mask alone reaches the kernel as (N, 1, 1, S); with a 2-D attn_mask as (N, 1, L, S)."""
    seen = []
    real = fast_attention.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, *args, **kwargs):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real(q, k, v, attn_mask, *args, **kwargs)

    monkeypatch.setattr(fast_attention.functional, "scaled_dot_product_attention", spy)
    m = fa.nn.MultiheadAttention(E, H, batch_first=True)
    q, k, v = mha_inputs(dict(batch_first=True))
    kpm, mask = make_mask("bool", (N, S)), make_mask("bool", (L, S))
    m(q, k, v, key_padding_mask=kpm, need_weights=False)
    m(q, k, v, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
    m(q, k, v, attn_mask=mask, need_weights=False)
    assert seen == [(N, 1, 1, S), (N, 1, L, S), (1, 1, L, S)]


# ---------------------------------------------------------------------------------------------------- norms
def assert_same_constructor(ours, theirs):
    """Same parameters and defaults, plus only the keyword-only backend=None."""
    a, b = inspect.signature(ours.__init__).parameters, inspect.signature(theirs.__init__).parameters
    extra = a["backend"]
    assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is None
    assert [(p.name, p.default) for p in a.values() if p.name != "backend"] == \
           [(p.name, p.default) for p in b.values()]


def compare_module(ours, theirs, reference, x):
    """Output and gradients of input and parameters; x is float32, possibly non-contiguous."""
    results = []
    dy = torch.randn(x.shape)
    for module, dtype in ((ours, torch.float32), (theirs, torch.float32), (reference, torch.float64)):
        leaf = x.to(dtype).detach().requires_grad_()
        out = module(leaf)
        (out * dy.to(dtype)).sum().backward()
        results.append((out, leaf.grad, {n: p.grad for n, p in module.named_parameters()}))
    (o, g, pg), (t, tg, tpg), (r, rg, rpg) = results
    assert o.dtype == torch.float32
    assert_close(o, t, r, "output")
    assert_close(g, tg, rg, "input grad")
    assert pg.keys() == rpg.keys()
    for name in pg:
        assert_close(pg[name], tpg[name], rpg[name], f"{name} grad")


@pytest.mark.parametrize("shape,kwargs", [(13, {}), ((13,), dict(eps=1e-3, bias=False)),
                                          (13, dict(elementwise_affine=False)), ((3, 5), {})], ids=str)
def test_layer_norm_module(backend, shape, kwargs):
    ours, theirs, reference = trio(fa.nn.LayerNorm, torch.nn.LayerNorm, shape, backend=backend, **kwargs)
    x = torch.randn(4, 5, *shape).transpose(0, 1) if shape == (3, 5) else torch.randn(2, 3, 2 * 13)[..., ::2]
    compare_module(ours, theirs, reference, x)


@pytest.mark.parametrize("shape,kwargs", [(13, {}), ((13,), dict(eps=1e-4)),
                                          (13, dict(elementwise_affine=False)), ((3, 5), {})], ids=str)
def test_rms_norm_module(backend, shape, kwargs):
    ours, theirs, reference = trio(fa.nn.RMSNorm, torch.nn.RMSNorm, shape, backend=backend, **kwargs)
    x = torch.randn(4, 5, *shape).transpose(0, 1) if shape == (3, 5) else torch.randn(2, 3, 2 * 13)[..., ::2]
    compare_module(ours, theirs, reference, x)


@pytest.mark.parametrize("dim,shape", [(-1, (3, 11)), (1, (2, 7, 3)), (0, (5, 3))], ids=str)
def test_softmax_module(backend, dim, shape):
    ours, theirs, reference = fa.nn.Softmax(dim, backend=backend), torch.nn.Softmax(dim), torch.nn.Softmax(dim)
    compare_module(ours, theirs, reference, torch.randn(shape) * 3)


def test_softmax_implicit_dim_warns_like_torch(backend):
    for shape in [(7,), (2, 5), (2, 3, 4), (2, 3, 4, 5)]:
        x = torch.randn(shape)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            ours = fa.nn.Softmax(backend=backend)(x)
        with pytest.warns(UserWarning, match="Implicit dimension"):
            theirs = torch.nn.Softmax()(x)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("ours,theirs,args", [(fa.nn.LayerNorm, torch.nn.LayerNorm, (6,)),
                                              (fa.nn.RMSNorm, torch.nn.RMSNorm, (6,)),
                                              (fa.nn.Softmax, torch.nn.Softmax, (1,))], ids=lambda v: str(v)[-12:])
def test_norm_modules_are_drop_in(ours, theirs, args):
    assert_same_constructor(ours, theirs)
    a, b = ours(*args), randomize(theirs(*args))
    assert repr(a) == repr(b).replace(type(b).__name__, type(a).__name__)
    assert isinstance(a, theirs)  # isinstance checks in user code (weight decay groups, init) keep working
    assert a.state_dict().keys() == b.state_dict().keys()
    a.load_state_dict(b.state_dict())
    b.load_state_dict(randomize(a).state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert "backend='reference'" in repr(ours(*args, backend="reference"))


def test_norm_modules_run_our_ops(backend):
    """The profiler shows fast_attention's ops, so the kernels ran (not torch's)."""
    x = torch.randn(3, 6)
    modules = [fa.nn.LayerNorm(6, backend=backend), fa.nn.RMSNorm(6, backend=backend),
               fa.nn.Softmax(-1, backend=backend)]
    with torch.profiler.profile() as prof:
        for m in modules:
            m(x)
    names = {e.name for e in prof.events()}
    assert {"fast_attention::layer_norm", "fast_attention::rms_norm", "fast_attention::softmax"} <= names
