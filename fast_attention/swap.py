"""swap(model): put fast_attention's modules in place of torch.nn's (and switch Hugging Face models to the
"fast_attention" attention function), in place, keeping the very same Parameter objects; unswap(model) undoes it.

Nothing is patched globally: only the given model's module tree and a few of its modules' attributes change, and
each change is listed in the returned report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from . import backends, hf
from . import nn as fa_nn

# Where swap() keeps what unswap() restores, on the module itself so it survives copy.deepcopy and pickling.
_ORIGINAL = "_fast_attention_original"  # on a new module: the module it replaced (shares its parameters)
_SAVED = "_fast_attention_saved"  # on a torch Transformer layer / encoder or a HF model: {attribute: old value}

# torch.nn type -> our type (exact types only: see _why_not)
_OURS = {
    nn.MultiheadAttention: fa_nn.MultiheadAttention,
    nn.LayerNorm: fa_nn.LayerNorm,
    nn.RMSNorm: fa_nn.RMSNorm,
    nn.Softmax: fa_nn.Softmax,
}


class Entry(NamedTuple):
    name: str  # qualified name in the model ("" for the model itself)
    type: str  # the module's class name
    reason: str


@dataclass
class SwapReport:
    """What swap() / unswap() did: `replaced` modules, `skipped` modules (with why), and `adjusted` attributes
    (torch's fused paths turned off, a Hugging Face attention implementation switched)."""
    replaced: list[Entry] = field(default_factory=list)
    skipped: list[Entry] = field(default_factory=list)
    adjusted: list[Entry] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} modules, skipped {len(self.skipped)}, "
                 f"adjusted {len(self.adjusted)}"]
        for kind, entries in (("replaced", self.replaced), ("skipped", self.skipped), ("adjusted", self.adjusted)):
            lines += [f"  {kind:8} {e.name or '<model>'} ({e.type}): {e.reason}" for e in entries]
        return "\n".join(lines)


def swap(model: nn.Module, *, backend: str | None = None) -> SwapReport:
    """Replace every torch.nn.MultiheadAttention, LayerNorm, RMSNorm and Softmax in `model` (and every Hugging Face
    RMSNorm, T5's T5LayerNorm among them, that computes plain RMSNorm or Gemma's, scaled by 1 + weight) by its
    fast_attention counterpart, in its parent module, sharing the original's Parameter objects (so device, dtype,
    optimizer state and tying are kept) and its training mode. Hugging Face models are switched to
    attn_implementation="fast_attention".

    In torch.nn.TransformerEncoderLayer / TransformerEncoder whose modules were replaced, torch's fused eval-mode
    path and nested-tensor conversion are turned off (they would bypass the new modules). Subclasses, modules
    whose parameters are reparametrized (parametrize, pruning, weight norm) and modules whose forward was wrapped
    per instance are skipped, with the reason in the report. `backend` is given to every new module (None:
    automatic choice) and, when given, to the fast_attention.nn modules already there. Every module is judged
    before any is replaced. Returns the report; `unswap` undoes it.
    """
    if backend is not None:
        backends._check_name(backend)
    report = SwapReport()
    makers: dict[int, object] = {}  # id -> how to replace the module (None: left as it is), judged once
    plan = []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in makers:
            makers[id(module)] = _judge(name, module, backend, report)
        if makers[id(module)] is not None:
            plan.append((name, module, makers[id(module)]))
    done: dict[int, nn.Module] = {}  # a module shared by several parents gets one replacement, put in each
    for name, module, maker in plan:
        if id(module) not in done:
            new = maker(module, backend)
            _share(module, new)
            object.__setattr__(new, _ORIGINAL, module)
            done[id(module)] = new
            report.replaced.append(Entry(name, type(module).__name__, f"-> {_public_name(type(new))}"))
        _set_child(model, name, done[id(module)])
    _turn_off_torch_fast_paths(model, report)
    _switch_hf_attention(model, report)
    return report


def _judge(name: str, module: nn.Module, backend: str | None, report: SwapReport):
    """The function that builds module's replacement, or None (with the reason in the report where it is one of
    the modules swap() replaces)."""
    if isinstance(module, tuple(_OURS.values())):
        if backend is not None:
            module.backend = backend
        report.skipped.append(Entry(name, type(module).__name__, "already fast_attention.nn" + (
            f"; backend set to {backend!r}" if backend is not None else "")))
        return None
    maker, why_not = _maker(module)
    if maker is not None and not name:
        why_not = "the model itself cannot be replaced in place; use fast_attention.nn directly"
    if why_not is not None:
        report.skipped.append(Entry(name, type(module).__name__, why_not))
        return None
    return maker


def unswap(model: nn.Module) -> SwapReport:
    """Undo swap(): put back the modules it replaced (or, for fast_attention.nn modules built directly, their
    torch.nn counterparts), sharing the current Parameter objects, and restore the attributes swap() changed."""
    report = SwapReport()
    done: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in done:
            _set_child(model, name, done[id(module)])
            continue
        if not isinstance(module, tuple(_OURS.values())):
            continue
        if not name:
            report.skipped.append(Entry(name, type(module).__name__, "the model itself cannot be replaced in place"))
            continue
        old = module.__dict__.get(_ORIGINAL)
        if old is None:
            torch_type = next(t for t, ours in _OURS.items() if isinstance(module, ours))
            old = _MAKERS[torch_type](module, None, torch_type)
        _share(module, old)
        _set_child(model, name, old)
        done[id(module)] = old
        report.replaced.append(Entry(name, type(module).__name__, f"-> {type(old).__name__} (restored)"))
    for name, module in model.named_modules():
        saved = module.__dict__.pop(_SAVED, None)
        if not saved:
            continue
        for attr, value in saved.items():
            if attr == "attn_implementation":
                hf.set_attn_implementation(module, value)
            else:
                setattr(module, attr, value)
            report.adjusted.append(Entry(name, type(module).__name__, f"{attr} restored to {value!r}"))
    return report


# ----------------------------------------------------------------------------------------------------------
# Module construction: new modules are built on the meta device (no allocation, no init) and then given the
# original's parameters and submodules.
# ----------------------------------------------------------------------------------------------------------
def _mha(m, backend, cls=fa_nn.MultiheadAttention):
    kwargs = {} if cls is nn.MultiheadAttention else {"backend": backend}
    return cls(m.embed_dim, m.num_heads, m.dropout, bias=m.in_proj_bias is not None,
               add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
               batch_first=m.batch_first, device="meta", **kwargs)


def _layer_norm(m, backend, cls=fa_nn.LayerNorm):
    kwargs = {} if cls is nn.LayerNorm else {"backend": backend}
    return cls(m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None, device="meta", **kwargs)


def _rms_norm(m, backend, cls=fa_nn.RMSNorm):
    kwargs = {} if cls is nn.RMSNorm else {"backend": backend}
    return cls(m.normalized_shape, m.eps, m.elementwise_affine, device="meta", **kwargs)


def _softmax(m, backend, cls=fa_nn.Softmax):
    return cls(m.dim) if cls is nn.Softmax else cls(m.dim, backend=backend)


_MAKERS = {nn.MultiheadAttention: _mha, nn.LayerNorm: _layer_norm, nn.RMSNorm: _rms_norm, nn.Softmax: _softmax}


def _public_name(cls: type) -> str:
    """fast_attention.nn.LayerNorm, not fast_attention.nn.norms.LayerNorm; fast_attention.hf.T5RMSNorm."""
    module = "fast_attention.nn" if cls.__module__.startswith("fast_attention.nn.") else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _hf_rms_norm(cls):
    def make(m, backend):
        return cls(tuple(m.weight.shape), hf.rms_norm_eps(m), device="meta", backend=backend)
    return make


def _maker(module):
    """(function building the replacement, None), (None, reason to skip), or (None, None) when not ours."""
    for torch_type, make in _MAKERS.items():
        if isinstance(module, torch_type):
            why_not = _why_not(module, torch_type)
            return (make, None) if why_not is None else (None, why_not)
    eps = hf.rms_norm_eps(module)
    if eps is None:
        return None, None
    if set(module._parameters) != {"weight"} or module._buffers or module._modules:
        return None, "it holds more than a `weight` parameter"
    if "forward" in module.__dict__:
        return None, "its forward is wrapped on the instance (e.g. by accelerate hooks)"
    offset = hf.rms_norm_offset(module, eps)
    if offset is None:
        return None, ("its forward is not x / sqrt(mean(x^2) + eps) * weight, nor * (1 + weight) (checked on a probe "
                      "input)")
    if offset:
        return _hf_rms_norm(hf.GemmaRMSNorm), None
    return _hf_rms_norm(hf.T5RMSNorm if hf.is_t5_style(module) else hf.RMSNorm), None


def _why_not(module: nn.Module, torch_type: type) -> str | None:
    """Why an instance of torch_type (one of _MAKERS') cannot be replaced, or None when it can."""
    kind = f"torch.nn.{torch_type.__name__}"
    if nn.utils.parametrize.is_parametrized(module):
        return "its parameters are parametrized (torch.nn.utils.parametrize)"
    if type(module).forward is not torch_type.forward:
        return f"subclass of {kind} with its own forward"
    if type(module) is not torch_type:
        return f"subclass of {kind}: the replacement would not keep its type, methods and attributes"
    if "forward" in module.__dict__:
        return "its forward is wrapped on the instance (e.g. by accelerate hooks)"
    fresh = _MAKERS[torch_type](module, None, torch_type)  # the same configuration, on the meta device
    if (module._parameters.keys(), module._buffers.keys()) != (fresh._parameters.keys(), fresh._buffers.keys()):
        return f"its parameters or buffers are not {kind}'s (pruning and weight norm rename them)"
    return None


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
          "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _share(src: nn.Module, dst: nn.Module) -> None:
    """Give dst src's parameters and submodules (the same objects), hooks (the same dicts, so their handles
    still remove them) and training mode."""
    for name, p in src._parameters.items():
        setattr(dst, name, p)
    for name, child in src._modules.items():
        setattr(dst, name, child)
    for name in ("bias_k", "bias_v"):  # torch keeps these as plain None attributes when absent
        if name in src.__dict__:
            setattr(dst, name, src.__dict__[name])
    shared = {id(p) for p in src.parameters()}
    unset = [n for n, p in dst.named_parameters() if p.is_meta and id(p) not in shared]
    if unset:
        raise AssertionError(f"fast_attention.swap: {type(dst).__name__} kept unset parameters {unset}")
    for hooks in _HOOKS:
        if hasattr(src, hooks):
            setattr(dst, hooks, getattr(src, hooks))
    dst.train(src.training)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


# ----------------------------------------------------------------------------------------------------------
# Attributes of other modules
# ----------------------------------------------------------------------------------------------------------
def _adjust(module: nn.Module, attr: str, value, name: str, report: SwapReport, why: str) -> None:
    current = hf.attn_implementation(module) if attr == "attn_implementation" else getattr(module, attr)
    if current == value:
        return
    module.__dict__.setdefault(_SAVED, {}).setdefault(attr, current)
    if attr == "attn_implementation":
        if not hf.set_attn_implementation(module, value):
            module.__dict__[_SAVED].pop(attr)
            report.skipped.append(Entry(name, type(module).__name__, f"attention stays {current!r}: the model does "
                                        f"not dispatch it through transformers' AttentionInterface"))
            return
    else:
        setattr(module, attr, value)
    report.adjusted.append(Entry(name, type(module).__name__, f"{attr} {current!r} -> {value!r}: {why}"))


def _turn_off_torch_fast_paths(model: nn.Module, report: SwapReport) -> None:
    ours = tuple(_OURS.values())
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            if any(isinstance(getattr(module, n, None), ours) for n in ("self_attn", "norm1", "norm2")):
                # torch takes its fused path (torch._transformer_encoder_layer_fwd, reading the weights directly)
                # only when this flag is nonzero; it is read nowhere else in forward
                _adjust(module, "activation_relu_or_gelu", 0, name, report,
                        "turns off torch's fused eval path, which would bypass the new modules")
        elif isinstance(module, nn.TransformerEncoder):
            if any(isinstance(m, ours) for m in module.modules()):
                _adjust(module, "use_nested_tensor", False, name, report,
                        "nested tensors would be handed to modules that take padded tensors")


def _switch_hf_attention(model: nn.Module, report: SwapReport) -> None:
    for name, module in model.named_modules():
        if hf.is_model(module) and hf.attn_implementation(module) != hf.NAME:
            if not hf.register():
                reason = "transformers is too old to register an attention function"
                report.skipped.append(Entry(name, type(module).__name__,
                                            f"attention stays {hf.attn_implementation(module)!r}: {reason}"))
                continue
            _adjust(module, "attn_implementation", hf.NAME, name, report,
                    "attention runs fast_attention.scaled_dot_product_attention")
