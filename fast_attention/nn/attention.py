"""MultiheadAttention: torch.nn.MultiheadAttention's constructor, parameters, state_dict and forward, with the
attention itself computed by fast_attention's fused kernel."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as torch_F
from torch import Tensor
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.parameter import Parameter

from .. import functional as F
from ..ops._autocast import attention_weights_dtype


class MultiheadAttention(torch.nn.Module):
    """torch.nn.MultiheadAttention, with the attention computed by `fast_attention.scaled_dot_product_attention`
    (or, for need_weights=True, by the same kernel plus the probabilities rebuilt from its saved statistics).

    Same constructor arguments and defaults, parameter names and state_dict keys (`in_proj_weight`, or
    `q_proj_weight` / `k_proj_weight` / `v_proj_weight` when kdim or vdim differ from embed_dim; `in_proj_bias`;
    `out_proj`; `bias_k`, `bias_v`), so state dicts load both ways. The one addition is the keyword-only
    `backend=` (None: automatic choice, see fast_attention/backends.py).

    Shapes (N batch, L target length, S source length, E embed_dim):
        query (L, N, E), key (S, N, kdim), value (S, N, vdim); (N, L, E) etc. with batch_first; (L, E) unbatched
        key_padding_mask (N, S) or (S,) unbatched: bool (True = ignore this key) or float (added)
        attn_mask (L, S) or (N * num_heads, L, S): bool (True = not allowed) or float (added)
        -> attn_output like query; attn_weights (N, L, S) averaged over heads, (N, num_heads, L, S) if not
           average_attn_weights, without the N for unbatched input; None unless need_weights.

    Differences from torch, both on purpose:
      - a query row whose every key is masked gives zeros (output and weights), where torch gives NaN;
      - with dropout in training mode, the returned weights are the probabilities before dropout (torch returns
        them after dropout); the output uses dropout as torch does.

    Inside nn.TransformerEncoderLayer, use `fast_attention.swap(model)`: it also turns off torch's fused
    eval-mode path (torch._transformer_encoder_layer_fwd), which would bypass this module.
    """

    __constants__ = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 backend: str | None = None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and "
                             f"num_heads={num_heads} instead")
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.backend = backend
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialization, so a freshly built module is distributed like torch's
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def __setstate__(self, state):
        # modules pickled by torch 1.1 lack the flag; torch assumes True, so do we
        state.setdefault("_qkv_same_embed_dim", True)
        state.setdefault("backend", None)
        super().__setstate__(state)

    def merge_masks(self, attn_mask, key_padding_mask, query):
        """torch's fused nn.TransformerEncoderLayer path calls this just before bypassing the module; refuse."""
        raise RuntimeError("fast_attention.nn.MultiheadAttention: torch's fused TransformerEncoderLayer path "
                           "(eval mode, no grad) would bypass this module's kernels; replace modules with "
                           "fast_attention.swap(model), which turns that path off for the layers it changes")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError("fast_attention.nn.MultiheadAttention: is_causal=True needs attn_mask (torch reads "
                               "is_causal as a hint that attn_mask is causal); build one with "
                               "torch.nn.Transformer.generate_square_subsequent_mask")
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise TypeError(f"fast_attention.nn.MultiheadAttention: {name} must be bool or floating point, got "
                                f"{mask.dtype}")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                          "both instead.", stacklevel=2)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
            if attn_mask is not None and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
        elif self.batch_first:
            # one transpose per distinct tensor, as torch, so that self-attention (query is key is value) keeps
            # its packed projection in _project
            same_qk, same_kv = query is key, key is value
            query = query.transpose(0, 1)
            key = query if same_qk else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        # from here on, (L, N, E) layout, as torch's functional MHA
        L, N, _ = query.shape
        q, k, v = self._project(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        extra = 0  # key columns appended below; every query attends them
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, N, -1)])
            v = torch.cat([v, self.bias_v.expand(1, N, -1)])
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, N, self.embed_dim)])
            v = torch.cat([v, v.new_zeros(1, N, self.embed_dim)])
            extra += 1
        H, D = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (H, D)).permute(1, 2, 0, 3) for t in (q, k, v))  # (N, H, L or S', D), views

        causal = bool(is_causal) and key_padding_mask is None and not need_weights  # torch's rule
        mask = None if causal else self._merge_masks(attn_mask, key_padding_mask, extra, N, query.dtype)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = F.scaled_dot_product_attention_with_weights(q, k, v, mask, dropout_p, causal,
                                                                       backend=self.backend)
            weights = (weights.mean(dim=1) if average_attn_weights else weights).to(
                attention_weights_dtype(query))
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal, backend=self.backend)
        # (N, H, L, D) -> (L, N, E) for torch's layout, or (N, L, E) for batch_first, contiguous either way
        if batched and self.batch_first:
            out = out.transpose(1, 2).reshape(N, L, self.embed_dim)
        else:
            out = out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)
        out = torch_F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return (out if batched else out.squeeze(1)), weights

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """torch's shape rules (F._mha_shape_check and multi_head_attention_forward); True when batched."""
        name = "fast_attention.nn.MultiheadAttention"
        if query.dim() not in (2, 3):
            raise ValueError(f"{name}: query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{name}: for {query.dim()}-D query, key and value must be {query.dim()}-D too, got "
                             f"{key.dim()}-D and {value.dim()}-D")
        if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
            raise ValueError(f"{name}: key_padding_mask must be {'2-D (N, S)' if batched else '1-D (S,)'} for "
                             f"{query.dim()}-D query, got {key_padding_mask.dim()}-D")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"{name}: query's last dim must be embed_dim={self.embed_dim}, got {query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"{name}: key's and value's last dims must be kdim={self.kdim} and vdim={self.vdim}, "
                             f"got {key.shape[-1]} and {value.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{name}: key and value must agree on every dim but the last, got "
                             f"{tuple(key.shape)} and {tuple(value.shape)}")
        batch_dim = 0 if self.batch_first else 1
        N = query.shape[batch_dim] if batched else 1
        L = query.shape[1 - batch_dim] if batched else query.shape[0]
        S = key.shape[1 - batch_dim] if batched else key.shape[0]
        if batched and key.shape[batch_dim] != N:
            raise ValueError(f"{name}: query and key must have the same batch size, got {N} and "
                             f"{key.shape[batch_dim]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((N, S) if batched else (S,)):
            raise ValueError(f"{name}: key_padding_mask must have shape {(N, S) if batched else (S,)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            allowed = {2: (L, S), 3: (N * self.num_heads, L, S)}
            if tuple(attn_mask.shape) != allowed.get(attn_mask.dim()):
                raise ValueError(f"{name}: attn_mask must have shape {allowed[2]} or {allowed[3]}, got "
                                 f"{tuple(attn_mask.shape)}")
        return batched

    def _project(self, query, key, value):
        """The input projections; query (L, N, E), key (S, N, kdim), value (S, N, vdim) -> each (.., N, E)."""
        E = self.embed_dim
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (torch_F.linear(query, self.q_proj_weight, bq), torch_F.linear(key, self.k_proj_weight, bk),
                    torch_F.linear(value, self.v_proj_weight, bv))
        if query is key and key is value:  # self-attention: one matmul, split by views
            qkv = torch_F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, E))
            return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        return torch_F.linear(query, wq, bq), torch_F.linear(key, wk, bk), torch_F.linear(value, wv, bv)

    def _merge_masks(self, attn_mask, key_padding_mask, extra, N, dtype):
        """One SDPA mask (bool: True = attend, or float: added) broadcastable to (N, H, L, S'), from torch's
        attn_mask (True = masked) and key_padding_mask (True = ignore). Only the given masks' own shapes are
        built: (N, 1, 1, S') for padding alone, (1, 1, L, S') or (N, H, L, S') for attn_mask alone, and their
        broadcast when both are given. `extra` columns (bias_k, zero attention) are appended as attended."""
        masks = []
        if attn_mask is not None:
            L, S = attn_mask.shape[-2:]
            masks.append(attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2
                         else attn_mask.reshape(-1, self.num_heads, L, S))
        if key_padding_mask is not None:
            masks.append(key_padding_mask.view(N, 1, 1, -1))
        if not masks:
            return None
        if len(masks) == 2 and masks[0].dtype != masks[1].dtype:  # mixed: torch adds them as floats
            masks = [m if m.is_floating_point() else _additive(m, dtype) for m in masks]
        masks = [(~m if m.dtype == torch.bool else m.to(dtype)) for m in masks]
        if extra:
            masks = [torch_F.pad(m, (0, extra), value=True if m.dtype == torch.bool else 0.0) for m in masks]
        if len(masks) == 1:
            return masks[0]
        a, b = masks
        return a & b if a.dtype == torch.bool else a + b


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's bool mask (True = masked) as an additive float mask: -inf where masked, else 0."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
