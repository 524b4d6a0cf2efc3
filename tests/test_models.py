"""fast_attention.models.Transformer: every kind, position encoding and norm placement; causality; KV-cached
generation equal to recomputation; the Triton backend against the reference; training; profiler; padding."""
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fast_attention as fa
from fast_attention import functional
from fast_attention.models import Transformer, TransformerConfig
from fast_attention.models.transformer import Attention, apply_rotary, rotary_table, sinusoids
from tolerance import assert_close

VOCAB = 37


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These shapes are too small to gain from intra-op threads, and on a busy CPU two threads wait for each other
    # (5x slower measured); restored for the other test files.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> TransformerConfig:
    """Odd sizes where the config allows them; no dropout, so two runs can be compared."""
    args = dict(vocab_size=VOCAB, max_seq_len=40, n_layers=2, d_model=32, n_heads=4, d_ff=48, dropout=0.0,
                backend="reference")
    return TransformerConfig(**{**args, **overrides})


def tokens(*shape) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape)


def run(model, idx, **kwargs):
    return model(idx, **kwargs)[0]


@pytest.mark.parametrize("kind", ["decoder", "encoder", "encoder-decoder"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_shapes_loss_and_gradients(kind, n_kv_heads):
    model = Transformer(tiny(kind=kind, n_kv_heads=n_kv_heads, dropout=0.1))
    idx, targets = tokens(3, 11), tokens(3, 11)
    src = tokens(3, 7) if kind == "encoder-decoder" else None
    logits, loss = model(idx, targets, src=src)
    assert logits.shape == (3, 11, VOCAB)
    assert loss.shape == () and math.isfinite(loss.item())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert model.decoder is None if kind == "encoder" else len(model.decoder) == 2
    assert model.encoder is None if kind == "decoder" else len(model.encoder) == 2
    assert model.decoder is None or (model.decoder[0].cross_attn is not None) == (kind == "encoder-decoder")
    kv_width = 2 * n_kv_heads * (32 // 4)
    assert all(m.kv.out_features == kv_width for m in model.modules() if isinstance(m, Attention))


def test_sinusoids_follow_the_paper():
    table = sinusoids(50, 16).double()
    for pos in (0, 3, 49):
        for i in (0, 1, 7):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_table(40, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(m, n):
        qm = apply_rotary(q, cos[m:m + 1].double(), sin[m:m + 1].double())
        kn = apply_rotary(k, cos[n:n + 1].double(), sin[n:n + 1].double())
        return (qm * kn).sum().item()

    assert score(5, 2) == pytest.approx(score(25, 22), rel=1e-5, abs=1e-6)
    # and on it: over six offsets the score moves (two offsets alone can score within 0.1% by chance: 1.5829 vs
    # 1.5817 once in CI)
    scores = [score(5, 5 - d) for d in range(6)]
    assert max(scores) - min(scores) > 1e-3 * max(map(abs, scores))
    # position 0 is no rotation; apply_rotary computes in float32, so q and k arrive rounded to it
    assert score(0, 0) == pytest.approx((q.float().double() * k.float().double()).sum().item(), rel=1e-12)


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned", "rope"])
def test_each_position_encoding_makes_order_matter(pos_encoding):
    """Without positions an encoder is permutation-equivariant; each encoding must break that. (float64: at
    initialization attention is nearly uniform, so rotary positions move the logits only by about 1e-5.)"""
    model = Transformer(tiny(kind="encoder", pos_encoding=pos_encoding)).double().eval()
    idx = tokens(2, 9)
    perm = torch.randperm(9)
    while torch.equal(perm, torch.arange(9)) or torch.equal(idx[:, perm], idx):
        perm, idx = torch.randperm(9), tokens(2, 9)
    assert not torch.allclose(run(model, idx[:, perm]), run(model, idx)[:, perm], atol=1e-9, rtol=0)
    assert (model.embed.positions is not None) == (pos_encoding == "learned")
    assert (model.embed.sinusoids is not None) == (pos_encoding == "sinusoidal")


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_pre_and_post_norm(norm, norm_first):
    model = Transformer(tiny(norm=norm, norm_first=norm_first)).eval()
    norm_type = fa.nn.LayerNorm if norm == "layernorm" else fa.nn.RMSNorm
    block = model.decoder[0]
    assert all(isinstance(n, norm_type) and n.backend == "reference" for n in (block.norm_self, block.norm_ff))
    # pre-norm needs a final norm after the stack; post-norm's last sublayer already ends with one
    assert isinstance(model.decoder_norm, norm_type if norm_first else torch.nn.Identity)
    x = torch.randn(2, 9, 32) * 3 + 1
    y = block(x)
    rms = y.square().mean(-1).sqrt()
    if norm_first:  # the residual stream is not normalized: x plus the sublayers' outputs
        assert not torch.allclose(rms, torch.ones_like(rms), atol=0.05)
    else:  # norm(x + f(x)) with fresh (unit) weights: unit RMS, and zero mean for LayerNorm
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
        if norm == "layernorm":
            torch.testing.assert_close(y.mean(-1), torch.zeros_like(rms), atol=1e-5, rtol=0)
    logits, loss = model.train()(tokens(2, 9), tokens(2, 9))
    loss.backward()
    assert logits.shape == (2, 9, VOCAB)


@pytest.mark.parametrize("kind", ["decoder", "encoder-decoder"])
@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned", "rope"])
def test_decoder_is_causal(kind, pos_encoding):
    model = Transformer(tiny(kind=kind, pos_encoding=pos_encoding)).eval()
    src = tokens(2, 6) if kind == "encoder-decoder" else None
    idx = tokens(2, 13)
    t = 7
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % VOCAB
    before, after = run(model, idx, src=src), run(model, changed, src=src)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    assert (after[:, t:] - before[:, t:]).abs().amax(-1).min() > 1e-6, "later positions must see the change"


def test_encoder_is_bidirectional():
    model = Transformer(tiny(kind="encoder")).eval()
    idx = tokens(2, 9)
    changed = idx.clone()
    changed[:, -1] = (idx[:, -1] + 1) % VOCAB
    assert (run(model, changed)[:, 0] - run(model, idx)[:, 0]).abs().max() > 1e-6


GENERATE_CASES = [
    dict(kind="decoder"),
    dict(kind="decoder", pos_encoding="rope", n_kv_heads=2, norm="rmsnorm"),
    dict(kind="decoder", pos_encoding="learned", norm_first=False, n_kv_heads=1),
    dict(kind="encoder-decoder", pos_encoding="rope", n_kv_heads=2),
]


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(top_k=1)], ids=["argmax", "top_k=1"])
def test_generate_with_cache_equals_recomputing(case, sampling):
    """float64 so that no near-tie between two logits can flip an argmax: the tokens must be identical."""
    model = Transformer(tiny(**case)).double()
    prompt = tokens(3, 5)
    src = tokens(3, 8) if case["kind"] == "encoder-decoder" else None
    pad = torch.zeros(3, 8, dtype=torch.bool) if src is not None else None
    if pad is not None:
        pad[1, 5:] = True
    cached = model.generate(prompt, 12, **sampling, src=src, src_key_padding_mask=pad)
    recomputed = model.generate(prompt, 12, **sampling, src=src, src_key_padding_mask=pad, use_cache=False)
    assert cached.shape == (3, 17)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)
    assert model.training, "generate must restore training mode"


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "recomputed"])
def test_generate_left_padded_prompts_as_each_alone(case, use_cache):
    """Prompts of 6, 1 and 3 tokens left-padded into one batch (the padding random tokens, not a pad id): each
    sequence's new tokens are those it generates alone, unpadded, with and without the cache (float64, greedy).
    The query and output projections are scaled up, so that attention is far from uniform and moves the logits: at
    initialization a padding key that leaked in moves them by about 1e-3, which rarely flips an argmax."""
    model = Transformer(tiny(**case)).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.q.weight.mul_(20), module.out.weight.mul_(30)
    lengths = [6, 1, 3]
    prompts = tokens(3, 6)
    padding = torch.arange(6) < 6 - torch.tensor(lengths)[:, None]  # (3, 6): True on the left of each prompt
    src = tokens(3, 8) if case["kind"] == "encoder-decoder" else None
    out = model.generate(prompts, 7, temperature=0.0, src=src, prompt_padding_mask=padding, use_cache=use_cache)
    assert out.shape == (3, 13) and torch.equal(out[:, :6], prompts)
    for b, n in enumerate(lengths):
        alone = model.generate(prompts[b:b + 1, 6 - n:], 7, temperature=0.0,
                               src=None if src is None else src[b:b + 1])
        assert torch.equal(out[b, 6:], alone[0, n:]), f"sequence {b} ({n} prompt tokens)"


def test_generate_stops_each_sequence_at_eos():
    """A sequence that samples eos_token_id gets pad_token_id after it; the others go on as without eos; the call
    returns once every sequence has finished."""
    model = Transformer(tiny()).double()
    prompts = tokens(3, 4)
    free = model.generate(prompts, 10, temperature=0.0)[:, 4:]  # (3, 10) without eos
    eos = int(free[0, 2])  # row 0 finishes at its third token at the latest
    out = model.generate(prompts, 10, temperature=0.0, eos_token_id=eos, pad_token_id=VOCAB - 1)[:, 4:]
    firsts = [int((row == eos).nonzero()[0]) if (row == eos).any() else None for row in free]
    for row, first, got in zip(free, firsts, out):
        if first is None:
            assert torch.equal(got, row)
        else:
            assert torch.equal(got[:first + 1], row[:first + 1]) and bool((got[first + 1:] == VOCAB - 1).all())
    if all(first is not None for first in firsts):
        assert out.shape[1] == max(firsts) + 1  # stopped once every row had finished


def test_top_p_samples_from_the_nucleus_only():
    """Probabilities 0.5, 0.3, 0.15, 0.05 (and a token masked by top_k): top_p 0.7 keeps the first two, renormalized;
    top_p 0.5 only the first; 1.0 all; a tiny top_p is the argmax."""
    model = Transformer(tiny(vocab_size=5))
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05, 1e-9]]).log().expand(4000, 5)
    for top_p, expected in ((0.7, [0.625, 0.375, 0, 0, 0]), (0.5, [1, 0, 0, 0, 0]), (1.0, [0.5, 0.3, 0.15, 0.05, 0])):
        drawn = model._sample(logits, 1.0, 4, top_p)[:, 0]
        freq = torch.bincount(drawn, minlength=5) / len(drawn)
        torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float32), atol=0.04, rtol=0)  # sd < 0.008
    assert torch.equal(model._sample(logits[:3] * 7, 1.0, None, 1e-6), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        model.generate(tokens(1, 3) % 5, 2, top_p=0.0)


def test_generate_refuses_bad_prompt_padding():
    model = Transformer(tiny())
    prompts = tokens(2, 4)
    right = torch.tensor([[False] * 4, [False, False, True, True]])
    with pytest.raises(ValueError, match="prompt_padding_mask must pad on the left"):
        model.generate(prompts, 2, prompt_padding_mask=right)
    with pytest.raises(ValueError, match=r"prompt_padding_mask must be bool of idx's shape \(2, 4\)"):
        model.generate(prompts, 2, prompt_padding_mask=right.int())
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        model.generate(prompts, 2, prompt_padding_mask=torch.tensor([[False] * 4, [True] * 4]))
    with pytest.raises(ValueError, match=rf"pad_token_id must be a token id in \[0, {VOCAB}\), got {VOCAB}"):
        model.generate(prompts, 2, eos_token_id=1, pad_token_id=VOCAB)


def test_cached_decoding_attends_one_query_to_the_cache(monkeypatch):
    """Prefill is one causal call over the prompt; each later step is Lq=1 against every cached key, unmasked;
    and the logits of each step match the full forward's in float32."""
    calls = []
    real = functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask, dropout_p, is_causal, **kwargs)

    model = Transformer(tiny(n_layers=1)).eval()
    prompt = tokens(2, 6)
    monkeypatch.setattr(functional, "scaled_dot_product_attention", spy)
    caches = model.new_caches(10)
    logits = [model.decode(prompt, caches=caches)[:, -1]]
    idx = torch.cat((prompt, logits[-1].argmax(-1, keepdim=True)), 1)
    for _ in range(3):
        logits.append(model.decode(idx[:, -1:], caches=caches, start=idx.shape[1] - 1)[:, -1])
        idx = torch.cat((idx, logits[-1].argmax(-1, keepdim=True)), 1)
    assert calls == [(6, 6, True, True), (1, 7, True, False), (1, 8, True, False), (1, 9, True, False)]
    monkeypatch.undo()
    full = run(model, idx[:, :-1])  # (2, 9, V)
    for step, got in enumerate(logits):
        torch.testing.assert_close(got, full[:, 5 + step], atol=1e-5, rtol=1e-5)


def test_cache_with_several_new_tokens_uses_a_bottom_right_causal_mask():
    model = Transformer(tiny(pos_encoding="rope")).eval()
    idx = tokens(2, 12)
    caches = model.new_caches(12)
    first = model.decode(idx[:, :5], caches=caches)
    rest = model.decode(idx[:, 5:], caches=caches, start=5)  # 7 queries after 5 cached keys
    torch.testing.assert_close(torch.cat((first, rest), 1), run(model, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("triton" not in fa.available_backends(), reason="the Triton backend is not available here")
@pytest.mark.parametrize("case", [dict(), dict(pos_encoding="rope", n_kv_heads=1, norm="rmsnorm"),
                                  dict(kind="encoder-decoder", n_heads=1)],
                         ids=["mha-layernorm", "gqa-rope-rmsnorm", "encoder-decoder"])
def test_triton_backend_matches_reference(case, device):
    """ours: triton fp32; torch's same dtype: the reference backend in fp32; the oracle: the model in float64."""
    args = {**dict(n_layers=1, d_model=16, n_heads=2, d_ff=24), **case}
    models = {}
    for name, backend, dtype in (("triton", "triton", torch.float32), ("ref32", "reference", torch.float32),
                                 ("ref64", "reference", torch.float64)):
        torch.manual_seed(0)
        models[name] = Transformer(tiny(**{**args, "backend": backend})).to(device, dtype)
    idx, targets = tokens(2, 9).to(device), tokens(2, 9).to(device)
    src = tokens(2, 6).to(device) if case.get("kind") == "encoder-decoder" else None
    pad = None if src is None else torch.tensor([[False] * 6, [False] * 4 + [True] * 2], device=device)
    results = {}
    for name, model in models.items():
        logits, loss = model(idx, targets, src=src, src_key_padding_mask=pad)
        loss.backward()
        results[name] = (logits, {n: p.grad for n, p in model.named_parameters()})
    assert_close(results["triton"][0], results["ref32"][0], results["ref64"][0], "logits")
    for n in results["ref64"][1]:
        assert_close(results["triton"][1][n], results["ref32"][1][n], results["ref64"][1][n], f"grad of {n}")


@pytest.mark.skipif("triton" not in fa.available_backends(), reason="the Triton backend is not available here")
def test_triton_cached_decoding_matches_reference(device):
    """The decoding path (Lq=1 against the cache: Triton's split-KV kernel), teacher-forced so that every backend
    sees the same tokens: each step's logits under the tolerance rule."""
    idx = tokens(2, 12).to(device)
    logits = {}
    for name, backend, dtype in (("triton", "triton", torch.float32), ("ref32", "reference", torch.float32),
                                 ("ref64", "reference", torch.float64)):
        torch.manual_seed(0)
        model = Transformer(tiny(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, pos_encoding="rope",
                                 backend=backend)).to(device, dtype).eval()
        caches = model.new_caches(12)
        steps = [model.decode(idx[:, :5], caches=caches)[:, -1]]  # prefill
        steps += [model.decode(idx[:, t:t + 1], caches=caches, start=t)[:, -1] for t in range(5, 12)]
        logits[name] = torch.stack(steps, 1)  # (B, 8, V)
    assert_close(logits["triton"], logits["ref32"], logits["ref64"], "cached decoding logits")


def test_tiny_model_trains():
    torch.manual_seed(0)
    model = Transformer(tiny(n_layers=1, dropout=0.1))
    text = torch.arange(60) % 11  # a periodic sequence: the next token is fully predictable
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        starts = torch.randint(0, 60 - 17, (8,))
        x = torch.stack([text[s:s + 16] for s in starts])
        y = torch.stack([text[s + 1:s + 17] for s in starts])
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_dropout_only_in_training():
    model = Transformer(tiny(dropout=0.3))
    idx = tokens(2, 9)
    assert not torch.allclose(run(model, idx), run(model, idx))
    model.eval()
    assert torch.equal(run(model, idx), run(model, idx))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_profiler_shows_fast_attention_ops(norm):
    model = Transformer(tiny(kind="encoder-decoder", norm=norm))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens(2, 7), tokens(2, 7), src=tokens(2, 5))[1].backward()
    names = {e.key for e in prof.key_averages()}
    for op in ("scaled_dot_product_attention", "scaled_dot_product_attention_backward",
               "layer_norm" if norm == "layernorm" else "rms_norm"):
        assert f"fast_attention::{op}" in names, f"fast_attention::{op} missing from {sorted(names)}"


@pytest.mark.parametrize("kind", ["encoder", "encoder-decoder"])
def test_source_padding_is_ignored(kind):
    model = Transformer(tiny(kind=kind)).eval()
    src = tokens(3, 10)
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 6:], pad[2, 1:] = True, True
    other = src.clone()
    other[pad] = (src[pad] + 1) % VOCAB  # new tokens only where padded
    if kind == "encoder":
        before, after = run(model, src, src_key_padding_mask=pad), run(model, other, src_key_padding_mask=pad)
        keep = ~pad  # padded positions' own outputs are not meaningful; every real position's must not move
        torch.testing.assert_close(after[keep], before[keep], atol=1e-6, rtol=0)
    else:
        idx = tokens(3, 8)
        before, after = run(model, idx, src=src, src_key_padding_mask=pad), \
            run(model, idx, src=other, src_key_padding_mask=pad)
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
        unmasked = run(model, idx, src=other)
        assert (unmasked - before).abs().max() > 1e-5, "without the mask, padded tokens must matter"


def test_attention_maps():
    model = Transformer(tiny(n_kv_heads=2)).eval()
    maps = model.attention_maps(tokens(2, 9))
    assert len(maps) == 2 and all(m.shape == (2, 4, 9, 9) and m.dtype == torch.float32 for m in maps)
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 4, 9))
        assert torch.equal(m.triu(1), torch.zeros_like(m)), "a decoder's maps must be causal"
    assert all(a.weights is None and not a.keep_weights for a in model.modules() if isinstance(a, Attention))


def test_bad_configs_and_calls_raise():
    with pytest.raises(ValueError, match="kind"):
        TransformerConfig(kind="gpt")
    with pytest.raises(ValueError, match="backend"):
        TransformerConfig(backend="tpu")
    with pytest.raises(ValueError, match="pos_encoding"):
        TransformerConfig(pos_encoding="alibi")
    with pytest.raises(ValueError, match="n_kv_heads"):
        TransformerConfig(n_heads=8, n_kv_heads=3)
    for field in ("n_heads", "n_kv_heads", "d_model", "vocab_size", "max_seq_len", "n_layers"):
        with pytest.raises(ValueError, match=f"{field} must be at least 1"):
            TransformerConfig(**{field: 0})
    with pytest.raises(ValueError, match="src_key_padding_mask"):
        Transformer(tiny())(tokens(1, 3), src_key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(tiny()).generate(tokens(1, 30), 20)
    with pytest.raises(ValueError, match="encoder-only"):
        Transformer(tiny(kind="encoder")).generate(tokens(1, 3), 2)
    with pytest.raises(ValueError, match="src"):
        Transformer(tiny(kind="encoder-decoder"))(tokens(1, 3))
    with pytest.raises(ValueError, match="src"):
        Transformer(tiny(kind="encoder-decoder")).generate(tokens(1, 3), 2)
    with pytest.raises(ValueError, match="src"):
        Transformer(tiny())(tokens(1, 3), src=tokens(1, 3))
    with pytest.raises(TypeError, match="bool"):
        Transformer(tiny(kind="encoder"))(tokens(1, 3), src_key_padding_mask=torch.zeros(1, 3))
