"""A full Transformer on fast_attention's ops: encoder-only, decoder-only (causal, with KV-cached generation) and
encoder-decoder, as in "Attention Is All You Need" (Vaswani et al., 2017), with the usual modern options
(pre-norm, RMSNorm, rotary positions, grouped-query attention).

Every attention goes through one call site (`Attention.forward`) and every norm is `fast_attention.nn`'s, both
with the config's `backend`, so one field switches the whole model between the reference, Triton and CUDA kernels.

Shapes: B batch, T target/query length, S source/key length, C = d_model, H heads, Hkv key/value heads,
hd = head dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as torch_F

from .. import backends
from .. import functional as F
from ..nn import LayerNorm, RMSNorm

KINDS = ("decoder", "encoder", "encoder-decoder")
POSITIONS = ("sinusoidal", "learned", "rope")
NORMS = ("layernorm", "rmsnorm")


@dataclass
class TransformerConfig:
    kind: str = "decoder"             # "decoder" (GPT: causal LM), "encoder" (BERT-like), "encoder-decoder" (Vaswani)
    vocab_size: int = 256             # bytes fit, so a character-level model needs no tokenizer
    src_vocab_size: int | None = None  # encoder-decoder only; None shares the embedding, as Vaswani's shared BPE
    max_seq_len: int = 512            # size of the position tables and of the KV cache
    n_layers: int = 4                 # per stack (encoder and decoder each); Vaswani uses 6, a small model 4
    d_model: int = 256                # width of the residual stream
    n_heads: int = 8                  # d_model / n_heads = 32-dim heads, within every kernel's head-dim range
    n_kv_heads: int | None = None     # None: = n_heads (multi-head); fewer: grouped-query attention, smaller cache
    d_ff: int | None = None           # None: 4 * d_model, Vaswani's ratio (512 -> 2048)
    dropout: float = 0.1              # Vaswani's P_drop, on embeddings, attention weights and sublayer outputs
    pos_encoding: str = "sinusoidal"  # Vaswani's fixed sinusoids; "learned" (GPT-2) or "rope" (rotary, relative)
    rope_base: float = 10000.0        # RoPE's wavelength base, as Su et al. (2021)
    norm: str = "layernorm"           # "rmsnorm" drops the mean and the bias (Zhang & Sennrich, 2019)
    norm_first: bool = True           # pre-norm trains stably without warmup (Xiong et al., 2020); False: post-norm
    norm_eps: float = 1e-5            # torch.nn.LayerNorm's default
    bias: bool = True                 # biases in the linear layers and LayerNorm, as Vaswani
    tie_embeddings: bool = False      # True shares the output projection with the token embedding (Vaswani 3.4);
                                      # tied, the untrained model predicts its own input token (the embedding is
                                      # scaled up by sqrt(C)), so the first loss is ~2x a uniform guess's
    backend: str | None = None        # fast_attention backend for every op; None picks the fastest per call

    def __post_init__(self):
        for field, value, allowed in (("kind", self.kind, KINDS), ("pos_encoding", self.pos_encoding, POSITIONS),
                                      ("norm", self.norm, NORMS)):
            if value not in allowed:
                raise ValueError(f"TransformerConfig: {field} must be one of {allowed}, got {value!r}")
        if self.backend is not None and self.backend not in backends.NAMES:
            raise ValueError(f"TransformerConfig: backend must be one of {backends.NAMES} or None, got "
                             f"{self.backend!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for field in ("vocab_size", "src_vocab_size", "max_seq_len", "n_layers", "d_model", "n_heads", "n_kv_heads",
                      "d_ff"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"TransformerConfig: {field} must be at least 1, got {value!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"TransformerConfig: d_model ({self.d_model}) must be divisible by n_heads "
                             f"({self.n_heads}), and n_heads by n_kv_heads ({self.n_kv_heads})")
        if self.pos_encoding == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError("TransformerConfig: rotary positions need an even head dim (d_model // n_heads)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig: dropout must be in [0, 1), got {self.dropout}")


def sinusoids(length: int, dim: int) -> Tensor:
    """Vaswani's table (length, dim): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float64), 10000.0 ** (-torch.arange(0, dim, 2) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : dim // 2]
    return table.float()


def rotary_table(length: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of position p times frequency base^(-2i/head_dim): each (length, head_dim / 2)."""
    angles = torch.outer(torch.arange(length, dtype=torch.float64),
                         base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (x_i, x_{i + hd/2}) pair of x (B, H, T, hd) by its position's angle; cos, sin (T, hd/2), or
    (B, 1, T, hd/2) where each sequence has positions of its own."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, H, T, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class KVCache:
    """One attention layer's keys and values so far, in buffers preallocated for `max_len` positions so that each
    decoding step writes one position in place instead of copying the whole cache."""

    def __init__(self, max_len: int):
        self.max_len, self.length, self.k, self.v = max_len, 0, None, None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, Hkv, T, hd) -> every key and value cached so far, (B, Hkv, length, hd) views."""
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], self.max_len, k.shape[-1])  # (B, Hkv, max_len, hd)
            self.v = v.new_empty(*v.shape[:2], self.max_len, v.shape[-1])
        end = self.length + k.shape[2]
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head (or grouped-query) attention: self-attention, or cross-attention when given a `context`."""

    def __init__(self, cfg: TransformerConfig, causal: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_heads * self.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.causal, self.dropout, self.backend = causal, cfg.dropout, cfg.backend
        self.keep_weights, self.weights = False, None  # Transformer.attention_maps sets keep_weights

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                rotary: tuple[Tensor, Tensor] | None = None, cache: KVCache | None = None) -> Tensor:
        """x (B, T, C); context (B, S, C) or None for self-attention; mask bool, True = attend, broadcastable to
        (B, H, T, S); rotary (cos, sin) for x's positions; cache holds earlier keys/values -> (B, T, C)."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        q = q if rotary is None else apply_rotary(q, *rotary)
        k, v = self.keys_values(x if context is None else context, rotary, cache, cross=context is not None)
        is_causal, earlier = False, k.shape[2] - T  # `earlier`: cached positions before this call's queries
        if self.causal and earlier == 0 and mask is None:
            is_causal = True  # no cache, or prefill: torch's top-left causal mask is right when T == S
        elif self.causal and T > 1:  # new queries after cached keys: query i sees keys 0 .. earlier + i
            causal = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(earlier)  # (T, S)
            mask = causal if mask is None else mask & causal  # and the padding mask's keys, (B, 1, T, S)
        # and a single new query (T == 1) may see every cached key the mask leaves
        attend = F.scaled_dot_product_attention_with_weights if self.keep_weights else F.scaled_dot_product_attention
        y = attend(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
                   enable_gqa=self.n_kv_heads != self.n_heads, backend=self.backend)  # (B, H, T, hd)
        if self.keep_weights:
            y, self.weights = y  # weights fp32 (B, H, T, S)
        return self.out(y.transpose(1, 2).reshape(B, T, C))  # (B, T, H, hd) -> (B, T, C)

    def keys_values(self, source: Tensor, rotary, cache: KVCache | None, cross: bool) -> tuple[Tensor, Tensor]:
        """source (B, S, C) -> keys and values (B, Hkv, S', hd), S' counting the cached positions too."""
        if cross and cache is not None and cache.length > 0:
            return cache.k, cache.v  # the encoder's output does not change while decoding: project it once
        B, S, _ = source.shape
        kv = self.kv(source).view(B, S, 2, self.n_kv_heads, self.head_dim)  # (B, S, 2, Hkv, hd)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, Hkv, S, hd)
        k = k if rotary is None else apply_rotary(k, *rotary)
        return (k, v) if cache is None else cache.append(k, v)


class FeedForward(nn.Sequential):
    """Position-wise MLP: C -> d_ff -> GELU -> C."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__(nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias), nn.GELU(),
                         nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias))


def make_norm(cfg: TransformerConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps, backend=cfg.backend)
    return LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias, backend=cfg.backend)


class Block(nn.Module):
    """Self-attention, then cross-attention to the encoder's output (decoder of an encoder-decoder only), then the
    feed-forward net; each sublayer is wrapped as x + f(norm(x)) (pre-norm) or norm(x + f(x)) (post-norm)."""

    def __init__(self, cfg: TransformerConfig, causal: bool, cross: bool):
        super().__init__()
        self.self_attn, self.norm_self = Attention(cfg, causal), make_norm(cfg)
        self.cross_attn = Attention(cfg, causal=False) if cross else None
        self.norm_cross = make_norm(cfg) if cross else None
        self.ff, self.norm_ff = FeedForward(cfg), make_norm(cfg)
        self.drop, self.norm_first = nn.Dropout(cfg.dropout), cfg.norm_first

    def forward(self, x: Tensor, mask=None, rotary=None, memory=None, memory_mask=None, cache=None) -> Tensor:
        """x (B, T, C); memory (B, S, C) the encoder's output; cache a (self, cross) pair of KVCache -> (B, T, C)."""
        self_cache, cross_cache = cache if cache is not None else (None, None)
        x = self.sublayer(x, self.norm_self, lambda h: self.self_attn(h, None, mask, rotary, self_cache))
        if self.cross_attn is not None:
            x = self.sublayer(x, self.norm_cross, lambda h: self.cross_attn(h, memory, memory_mask, None, cross_cache))
        return self.sublayer(x, self.norm_ff, self.ff)

    def sublayer(self, x: Tensor, norm: nn.Module, f) -> Tensor:
        if self.norm_first:
            return x + self.drop(f(norm(x)))
        return norm(x + self.drop(f(x)))


class Embedding(nn.Module):
    """Tokens, scaled by sqrt(C) as Vaswani, plus absolute positions (none with rotary: those act in attention)."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int):
        super().__init__()
        self.tokens, self.scale = nn.Embedding(vocab_size, cfg.d_model), math.sqrt(cfg.d_model)
        self.positions = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        self.register_buffer("sinusoids", sinusoids(cfg.max_seq_len, cfg.d_model)
                             if cfg.pos_encoding == "sinusoidal" else None, persistent=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        """idx (B, T) token ids at positions start .. start + T - 1, or at `positions` (B, T) -> (B, T, C)."""
        x = self.tokens(idx) * self.scale
        if self.positions is not None:
            if positions is None:
                positions = torch.arange(start, start + idx.shape[1], device=idx.device)
            x = x + self.positions(positions)
        elif self.sinusoids is not None:  # a slice (a view) unless each sequence has positions of its own
            table = self.sinusoids[start:start + idx.shape[1]] if positions is None else self.sinusoids[positions]
            x = x + table.to(x.dtype)
        return self.drop(x)


class Transformer(nn.Module):
    """model(idx, targets=None, *, src=None, src_key_padding_mask=None) -> (logits (B, T, V), loss or None).

    kind "decoder": idx (B, T) is read causally; "encoder": idx is read in both directions; "encoder-decoder":
    src (B, S) is encoded and idx decoded causally with cross-attention to it. src_key_padding_mask (B, S) bool,
    True at padding, as torch.nn.Transformer: the encoder's input (idx for "encoder", src for "encoder-decoder").
    targets (B, T): the loss is the mean cross-entropy over positions whose target is not -100 (torch's ignore_index).
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg, cfg.vocab_size)
        self.src_embed = Embedding(cfg, cfg.src_vocab_size) if cfg.kind == "encoder-decoder" and \
            cfg.src_vocab_size is not None else None
        final_norm = make_norm if cfg.norm_first else (lambda cfg: nn.Identity())  # post-norm ends normalized
        self.encoder = self.encoder_norm = self.decoder = self.decoder_norm = None
        if cfg.kind != "decoder":
            self.encoder = nn.ModuleList(Block(cfg, causal=False, cross=False) for _ in range(cfg.n_layers))
            self.encoder_norm = final_norm(cfg)
        if cfg.kind != "encoder":
            self.decoder = nn.ModuleList(Block(cfg, causal=True, cross=cfg.kind == "encoder-decoder")
                                         for _ in range(cfg.n_layers))
            self.decoder_norm = final_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.pos_encoding == "rope":
            cos, sin = rotary_table(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)  # GPT-2's; keeps the initial residual stream small
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # std 1/sqrt(C): times sqrt(C) the tokens have unit scale, like the sinusoids they are added to
            nn.init.normal_(module.weight, std=self.cfg.d_model ** -0.5)

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, src: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        self._check_src(src, src_key_padding_mask)
        if self.cfg.kind == "encoder":
            logits = self.head(self.encode(idx, src_key_padding_mask))
        else:
            memory = None if src is None else self.encode(src, src_key_padding_mask)
            logits = self.decode(idx, memory, _attend_mask(src_key_padding_mask))
        if targets is None:
            return logits, None
        return logits, torch_F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # over B * T positions

    def _check_src(self, src: Tensor | None, src_key_padding_mask: Tensor | None = None) -> None:
        if (src is not None) != (self.cfg.kind == "encoder-decoder"):
            raise ValueError(f"Transformer: src is required by kind 'encoder-decoder' and only by it; this model is "
                             f"{self.cfg.kind!r} (an encoder-only model reads idx)")
        if src_key_padding_mask is not None and self.cfg.kind == "decoder":
            raise ValueError("Transformer: src_key_padding_mask masks the source of an encoder or encoder-decoder; "
                             "this model is a 'decoder', whose causal mask is its own")

    def encode(self, src: Tensor, src_key_padding_mask: Tensor | None = None) -> Tensor:
        """src (B, S) -> the encoder's output (B, S, C); padded positions are never attended to."""
        x, rotary, mask = (self.src_embed or self.embed)(src), self._rotary(0, src.shape[1]), \
            _attend_mask(src_key_padding_mask)
        for block in self.encoder:
            x = block(x, mask=mask, rotary=rotary)
        return self.encoder_norm(x)

    def decode(self, idx: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None,
               caches: list | None = None, start: int = 0, positions: Tensor | None = None,
               mask: Tensor | None = None) -> Tensor:
        """idx (B, T) at positions start.. -> logits (B, T, V); memory (B, S, C) from encode(); caches from
        new_caches() hold the keys and values of the columns before `start`. Left-padded prompts (generate's
        prompt_padding_mask): positions (B, T), each sequence's own, and mask (B, 1, 1, S) bool, True at the keys
        (cached ones first) that are tokens, not padding; causality is added to it."""
        x = self.embed(idx, start, positions)
        rotary = self._rotary(start, idx.shape[1], positions)
        for i, block in enumerate(self.decoder):
            x = block(x, mask=mask, rotary=rotary, memory=memory, memory_mask=memory_mask,
                      cache=None if caches is None else caches[i])
        return self.head(self.decoder_norm(x))

    def _rotary(self, start: int, length: int, positions: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        if self.cfg.pos_encoding != "rope":
            return None
        if positions is not None:  # each (B, 1, T, hd/2): a sequence's own positions, the same for every head
            return self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        return self.rope_cos[start:start + length], self.rope_sin[start:start + length]  # each (T, hd/2)

    def new_caches(self, max_len: int, src_len: int = 0) -> list[tuple[KVCache, KVCache]]:
        """One (self-attention, cross-attention) pair of empty caches per decoder layer."""
        return [(KVCache(max_len), KVCache(src_len)) for _ in self.decoder]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, *,
                 src: Tensor | None = None, src_key_padding_mask: Tensor | None = None, use_cache: bool = True,
                 prompt_padding_mask: Tensor | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, top_p: float | None = None) -> Tensor:
        """idx (B, T) prompt -> (B, T + max_new_tokens). temperature=0 takes the argmax; else the next token is
        sampled from the softmax of logits / temperature, from its top_k tokens and, with top_p (nucleus sampling,
        Holtzman et al. 2019), from the fewest most likely whose probabilities sum to top_p. With use_cache the prompt
        is run once (prefill) and each new token attends, alone, to the cached keys; without, every step reruns
        the whole sequence (the slow path, kept as the check of the fast one). Runs in eval mode (no dropout).

        Prompts of different lengths: left-pad them to T and pass prompt_padding_mask (B, T) bool, True at the
        padding (torch's key-padding convention), as Hugging Face generates from left-padded batches. Each
        sequence then has its own positions (its first token at 0) and no query attends to padding, so each
        sequence's tokens are those it would get alone. eos_token_id: a sequence that samples it is finished, and
        gets pad_token_id (default: eos_token_id) from then on; generation stops early once every sequence is,
        so the result may be shorter than T + max_new_tokens."""
        if self.decoder is None:
            raise ValueError("Transformer.generate: an encoder-only model does not generate")
        self._check_src(src)
        if idx.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"Transformer.generate: prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} "
                             f"exceeds max_seq_len {self.cfg.max_seq_len}")
        for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
            if token is not None and not 0 <= token < self.cfg.vocab_size:
                raise ValueError(f"Transformer.generate: {name} must be a token id in [0, {self.cfg.vocab_size}), "
                                 f"got {token}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"Transformer.generate: top_p must be in (0, 1], got {top_p}")
        padding = _left_padding(prompt_padding_mask, idx)  # (B,) padding columns of each prompt, or None
        keys = None if padding is None else ~prompt_padding_mask  # (B, columns): True where a key is a token
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        was_training = self.training
        self.eval()
        try:
            memory = None if src is None else self.encode(src, src_key_padding_mask)
            memory_mask = _attend_mask(src_key_padding_mask)
            caches = self.new_caches(idx.shape[1] + max_new_tokens, 0 if src is None else src.shape[1]) \
                if use_cache else None
            seen = 0  # columns already in the caches
            for _ in range(max_new_tokens):
                start = 0 if caches is None else seen  # the prompt first, then one token at a time
                positions = mask = None
                if padding is not None:
                    positions = (torch.arange(start, idx.shape[1], device=idx.device) - padding[:, None]).clamp(min=0)
                    mask = keys[:, None, None, :]  # (B, 1, 1, S)
                logits = self.decode(idx[:, start:], memory, memory_mask, caches, start, positions, mask)[:, -1]
                seen = idx.shape[1]
                token = self._sample(logits, temperature, top_k, top_p)  # logits (B, V) -> (B, 1)
                if eos_token_id is not None:
                    token = token.masked_fill(finished[:, None], pad_token_id)
                    finished |= token[:, 0] == eos_token_id
                idx = torch.cat((idx, token), dim=1)
                if keys is not None:
                    keys = torch.cat((keys, torch.ones_like(keys[:, :1])), dim=1)
                if eos_token_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx

    def _sample(self, logits: Tensor, temperature: float, top_k: int | None, top_p: float | None = None) -> Tensor:
        """logits (B, V) -> next token ids (B, 1)."""
        if temperature == 0.0:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None:  # drop the tokens after the smallest most-likely set whose probabilities reach top_p
            ordered, order = logits.sort(-1, descending=True)
            probs = F.softmax(ordered, -1, backend=self.cfg.backend)
            before = probs.cumsum(-1) - probs  # each token's: the probability of the more likely ones
            logits = logits.scatter(-1, order, ordered.masked_fill(before >= top_p, float("-inf")))
        return torch.multinomial(F.softmax(logits, -1, backend=self.cfg.backend), num_samples=1)

    @torch.no_grad()
    def attention_maps(self, idx: Tensor, **kwargs) -> list[Tensor]:
        """Run forward(idx, **kwargs) and return each self-attention layer's probabilities, fp32 (B, H, T, T),
        encoder layers first. In the model's mode: in training mode dropout acts on the layers before the last, so
        call eval() first for maps that do not vary from call to call."""
        layers = [b.self_attn for stack in (self.encoder, self.decoder) if stack is not None for b in stack]
        for attn in layers:
            attn.keep_weights = True
        try:
            self(idx, **kwargs)
        finally:
            for attn in layers:
                attn.keep_weights = False
        maps = [attn.weights for attn in layers]
        for attn in layers:
            attn.weights = None
        return maps


def _left_padding(prompt_padding_mask: Tensor | None, idx: Tensor) -> Tensor | None:
    """Each prompt's count of padding columns (B,), checking that the padding is on the left; None without a mask."""
    if prompt_padding_mask is None:
        return None
    if prompt_padding_mask.dtype != torch.bool or prompt_padding_mask.shape != idx.shape:
        raise ValueError(f"Transformer.generate: prompt_padding_mask must be bool of idx's shape {tuple(idx.shape)}, "
                         f"True at padding; got {prompt_padding_mask.dtype} of shape "
                         f"{tuple(prompt_padding_mask.shape)}")
    if prompt_padding_mask.device != idx.device:
        raise ValueError(f"Transformer.generate: prompt_padding_mask must be on idx's device ({idx.device}), got "
                         f"{prompt_padding_mask.device}")
    if bool((prompt_padding_mask[:, 1:] & ~prompt_padding_mask[:, :-1]).any()):
        raise ValueError("Transformer.generate: prompt_padding_mask must pad on the left (each prompt's padding "
                         "before its first token), as generation appends every sequence's tokens at the right")
    if bool(prompt_padding_mask[:, -1].any()):
        raise ValueError("Transformer.generate: every prompt needs at least one token (prompt_padding_mask has a row "
                         "of padding only)")
    return prompt_padding_mask.sum(1)


def _attend_mask(key_padding_mask: Tensor | None) -> Tensor | None:
    """(B, S) bool, True at padding -> (B, 1, 1, S) bool, True = attend, broadcast over heads and queries."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"src_key_padding_mask must be bool (True at padding), got {key_padding_mask.dtype}")
    return ~key_padding_mask[:, None, None, :]
