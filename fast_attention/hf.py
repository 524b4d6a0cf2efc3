"""Hugging Face transformers integration: the attention function registered as `attn_implementation=
"fast_attention"`, and what swap() needs to switch a built model and recognize its RMSNorm modules.

transformers stays optional and is never imported here: importing it takes seconds. If it is already imported
when fast_attention is, we register at once; otherwise a one-shot import hook registers right after
`transformers.modeling_utils` (which defines the registry) finishes importing, so either import order works.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch
from torch import Tensor

from . import functional as F
from . import nn as fa_nn

NAME = "fast_attention"
_TRIGGER = "transformers.modeling_utils"
_registered = False


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """transformers' attention-function signature, computed by fast_attention.scaled_dot_product_attention.

    query (B, H, Lq, D), key and value (B, Hkv, Lk, D) with H a multiple of Hkv (grouped-query attention runs
    without repeating key/value); attention_mask None, or bool (True = attend) / float (added) broadcastable to
    (B, H, Lq, Lk) -> (attn_output (B, Lq, H, D), attn_weights). The weights (B, H, Lq, Lk), in query's dtype and
    before dropout, only when transformers asks for them (`output_attentions=True`), else None; they come from the
    kernels' tiled weights pass, so the forward itself stays fused (eager computes them on every call, sdpa never).
    `s_aux` (gpt-oss's learned sinks, one per head) and `softcap` (Gemma 2's logit cap) become fast_attention's
    `sinks` and `softcap`. A sliding-window layer's `sliding_window` W becomes a window_size (W, W) where query
    and key lengths are equal (training, prefill): the mask transformers built stays the exact rule (query i sees
    keys i - W < j <= i, or |i - j| <= W where bidirectional), the window lets the kernels skip the key blocks
    outside it, so such a layer costs about L * W rather than L * L.

    A packed batch (padding-free training: transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    puts the sequences end to end in one row and passes their offsets, cu_seq_lens_q / cu_seq_lens_k, and longest
    lengths, max_length_q / max_length_k) runs on fa.varlen_attn (_packed).
    """
    Lq, Lk = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    packed = _packed(query, key, value, dropout, scaling, bool(is_causal), kwargs)
    if packed is not None:
        return packed, None
    # transformers' mask function returns None exactly when the mask is causal (or absent) and can be dropped;
    # a single query row attends every cached key, so it is never causal
    is_causal = bool(is_causal) and attention_mask is None and Lq > 1
    if is_causal and Lk > Lq:
        # prefill into an empty static cache: the keys past Lq are unused slots, and torch's top-left causal
        # alignment is only right without them
        key, value = key[:, :, :Lq], value[:, :, :Lq]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        attention_mask = _add_position_bias(position_bias, attention_mask, is_causal, Lq, key.shape[2])
        is_causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    args = dict(attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                enable_gqa=key.shape[1] != query.shape[1], sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"),
                window_size=_window(kwargs.get("sliding_window"), Lq, key.shape[2]))
    weights = None
    if _weights_wanted(kwargs):
        out, weights = F.scaled_dot_product_attention_with_weights(query, key, value, **args)
        if key.shape[2] < Lk:  # the empty cache slots dropped above: zero columns, as eager gives them
            weights = torch.nn.functional.pad(weights, (0, Lk - key.shape[2]))
        weights = weights.to(query.dtype)
    else:
        out = F.scaled_dot_product_attention(query, key, value, **args)
    return out.transpose(1, 2).contiguous(), weights


def _packed(query: Tensor, key: Tensor, value: Tensor, dropout: float, scaling: float | None, is_causal: bool,
            kwargs) -> Tensor | None:
    """A packed batch's attention output (1, L, H, D) from fa.varlen_attn, or None where this call is not one it
    runs. The offsets among the kwargs say where each sequence starts, as they do for transformers' own flash
    implementations, which read the same kwargs: each sequence attends causally to itself (a sliding layer's
    window of W keys is window_size=(W - 1, 0); sinks and a logit cap as in the dense call), and the mask
    transformers built from the position ids, which holds the same rule as an L x L block diagonal (or, with a
    cache object, is missing), is not read. The kernels then skip every block outside the sequences, where the mask
    path computes all of the L x L scores. None, and the mask path, for what varlen_attn does not take:
    bidirectional layers, several rows, cached keys, dropout, a position bias, or the weights."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    L = query.shape[2]
    if cu_q is None or cu_k is None or not is_causal or query.shape[0] != 1 or key.shape[2] != L:
        return None
    if dropout or kwargs.get("position_bias") is not None or _weights_wanted(kwargs):
        return None
    W = kwargs.get("sliding_window")
    window = (W - 1, 0) if isinstance(W, int) and W > 0 else (-1, 0)
    out = F.varlen_attn(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                        cu_q.to(torch.int32), cu_k.to(torch.int32), int(kwargs.get("max_length_q") or L),
                        int(kwargs.get("max_length_k") or L), scale=scaling, window_size=window,
                        enable_gqa=key.shape[1] != query.shape[1], sinks=kwargs.get("s_aux"),
                        softcap=kwargs.get("softcap"))
    return out[None]  # (1, L, H, D), contiguous: transformers' layout


def _window(sliding_window, Lq: int, Lk: int) -> tuple[int, int] | None:
    """The window_size of a sliding-window layer's call: (W, W) holds every sliding mask transformers builds (causal,
    i - W < j <= i; bidirectional, |i - j| <= W) where query i and key i are the same position, which equal lengths
    mean (no cached keys before the queries); elsewhere (decoding) None, and the mask alone does it. Where
    transformers drops the mask (no padding, L below W) the window takes no key away."""
    if not isinstance(sliding_window, int) or sliding_window <= 0 or Lq != Lk:
        return None
    return sliding_window, sliding_window


def _weights_wanted(kwargs) -> bool:
    """Whether transformers wants this call's attention weights: `output_attentions` among the kwargs (Llama's
    family passes it down), or an attention output being captured (transformers' output-capturing hooks, which
    record the attention module's second output; GPT-2 passes nothing down). The collector is transformers'
    private state, read defensively: without it, only the kwargs count."""
    if kwargs.get("output_attentions"):
        return True
    collector = getattr(sys.modules.get("transformers.utils.output_capturing"), "_active_collector", None)
    try:
        captured = collector.get() if collector is not None else None
    except Exception:  # another transformers' layout: no weights rather than a failed forward
        return False
    return isinstance(captured, dict) and any(key.endswith("attentions") for key in captured)


def _add_position_bias(bias: Tensor, mask: Tensor | None, is_causal: bool, Lq: int, Lk: int) -> Tensor:
    """One additive mask (B or 1, H, Lq, Lk) from a learned position bias and the attention mask. Masked entries
    take the dtype's finfo.min, as transformers' eager attention adds: a row masked everywhere (a left-padded
    decoder position) is then the uniform average eager gives, not a dead row of zeros."""
    bias = bias[..., :Lk]
    if mask is None and is_causal:
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=bias.device).tril()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
    return bias + mask


def register() -> bool:
    """Register "fast_attention" in transformers' attention and mask registries (idempotent); False when
    transformers is not installed or too old to have them."""
    global _registered
    if _registered:
        return True
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(NAME, attention_forward)
    # our kernel takes SDPA's masks (bool, True = attend; None when causal alone), so reuse transformers' builder
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of transformers.modeling_utils so register() runs after it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding us again
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        register()


def install() -> None:
    """Called on `import fast_attention`."""
    if _TRIGGER in sys.modules:
        register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())


# ----------------------------------------------------------------------------------------------------------
# What swap() needs
# ----------------------------------------------------------------------------------------------------------
def is_model(module: torch.nn.Module) -> bool:
    """A transformers PreTrainedModel (duck-typed, so transformers is not imported)."""
    return callable(getattr(module, "set_attn_implementation", None)) and hasattr(module, "config")


def attn_implementation(model: torch.nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def set_attn_implementation(model: torch.nn.Module, name: str) -> bool:
    """Switch a built model (and its sub-models) to attention implementation `name`; False when the model does
    not dispatch through transformers' AttentionInterface."""
    if name == NAME and not register():
        return False
    model.set_attn_implementation(name)
    return attn_implementation(model) == name


def rms_norm_eps(module: torch.nn.Module) -> float | None:
    """eps of a transformers RMSNorm (class name ending in "RMSNorm", or T5's "T5LayerNorm" and its copies (MT5,
    UMT5, LongT5, ...), a `weight` Parameter and a float `variance_epsilon` or `eps`), else None."""
    name = type(module).__name__
    if not (name.endswith("RMSNorm") or is_t5_style(module)) or isinstance(module, torch.nn.RMSNorm):
        return None
    if not isinstance(getattr(module, "weight", None), torch.nn.Parameter):
        return None
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, float):
            return eps
    return None


def is_t5_style(module: torch.nn.Module) -> bool:
    """T5's RMSNorm ("T5LayerNorm", copied as MT5LayerNorm, UMT5LayerNorm, ...), whose output takes the weight's
    dtype when that is 16-bit (T5RMSNorm below), unlike the RMSNorms of Llama's family."""
    return type(module).__name__.endswith("T5LayerNorm")


def rms_norm_offset(module: torch.nn.Module, eps: float) -> float | None:
    """The offset o for which module(x) == x / sqrt(mean(x^2) + eps) * (o + weight) on a probe input, to the
    precision of its output's dtype (T5's is a 16-bit weight's): 0 for Llama's family, 1 for Gemma's, whose weight
    is zero centred; None for an RMSNorm that computes neither, which must be left alone. The probe uses its own
    generator, not torch's."""
    weight = module.weight
    if weight.is_meta:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *weight.shape, generator=g, dtype=torch.float32, device="cpu").to(weight.device)
    with torch.no_grad():
        out = type(module).forward(module, x)  # not module(x): its hooks must not see the probe
    rtol = 1e-3 if out.dtype in (torch.float32, torch.float64) else 2 * torch.finfo(out.dtype).eps
    for offset in (0.0, 1.0):
        want = torch.nn.functional.rms_norm(x, tuple(weight.shape), offset + weight.float(), eps)
        if out.shape == want.shape and torch.allclose(out.float(), want, rtol=rtol, atol=1e-4):
            return offset
    return None


class RMSNorm(fa_nn.RMSNorm):
    """What swap() puts in place of a Hugging Face RMSNorm (LlamaRMSNorm and its copies), which returns
    weight * normalized(x).to(x.dtype): the result takes the promoted dtype of the weight and x. Where the two
    agree, that is rms_norm with the weight; where they differ (a float32 weight beside bfloat16 activations, as
    `_keep_in_fp32_modules` leaves it), the normalization in x's dtype times the weight, as HF computes it."""

    def forward(self, input: Tensor) -> Tensor:
        if self.weight is None or self.weight.dtype == input.dtype:
            return super().forward(input)
        return self.weight * F.rms_norm(input, self.normalized_shape, None, self.eps, backend=self.backend)


class GemmaRMSNorm(fa_nn.RMSNorm):
    """What swap() puts in place of an RMSNorm that scales by 1 + weight (Gemma's family: GemmaRMSNorm,
    Gemma2RMSNorm, Gemma3RMSNorm, ...), whose weight is zero centred: rms_norm with the float32 weight 1 + weight,
    computed in float32 and rounded once to x's dtype, as Gemma computes it (in float32, then .type_as(x))."""

    def forward(self, input: Tensor) -> Tensor:
        return F.rms_norm(input, self.normalized_shape, 1.0 + self.weight.float(), self.eps, backend=self.backend)


class T5RMSNorm(fa_nn.RMSNorm):
    """What swap() puts in place of T5's RMSNorm (T5LayerNorm and its copies). Its output has the weight's dtype when
    that is 16-bit, else float32 (or float64): the normalization is in float32 and then, for a 16-bit weight,
    rounded to it before the product. Here rms_norm runs on the input, upcast first when the output is wider, and
    the result is rounded once to the output's dtype."""

    def forward(self, input: Tensor) -> Tensor:
        if self.weight is None:
            return super().forward(input)
        w = self.weight.dtype
        out_dtype = w if w in (torch.float16, torch.bfloat16) else torch.promote_types(
            w, torch.promote_types(input.dtype, torch.float32))
        if torch.promote_types(input.dtype, out_dtype) != input.dtype:
            input = input.to(out_dtype)
        return super().forward(input).to(out_dtype)

