"""fast_attention.swap / unswap: torch.nn.Transformer and TransformerEncoder in train and eval mode, and tiny
Hugging Face BERT, GPT-2 and Llama models, give the original's outputs after swap() while the profiler shows
fast_attention's ops (and not torch's fused paths); unswap() restores the original modules."""
import copy

import pytest
import torch
from tolerance import assert_close
from torch import nn

import fast_attention as fa


@pytest.fixture(autouse=True)
def _on_test_device(device):
    with torch.device(device):  # modules, inputs and masks built in a test live on the test device
        yield


def profiled(fn):
    """fn() under torch's profiler -> (result, set of op names)."""
    with torch.profiler.profile() as prof:
        result = fn()
    return result, {e.name for e in prof.events()}


def assert_ran_ours(names, *ops):
    for op in ("scaled_dot_product_attention",) + ops:
        assert f"fast_attention::{op}" in names, f"fast_attention::{op} did not run"
    bypass = {n for n in names if "_transformer_encoder_layer_fwd" in n or "_native_multi_head_attention" in n}
    assert not bypass, f"torch's fused path ran: {bypass}"


def tiny_transformer(batch_first):
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
                          dropout=0.0, batch_first=batch_first)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swap_transformer_matches_original(backend, batch_first, mode):
    model = tiny_transformer(batch_first)
    original = copy.deepcopy(model)
    reference = copy.deepcopy(model).double()
    for m in (model, original, reference):
        m.train(mode == "train")
    report = fa.swap(model, backend=backend)
    assert len(report.replaced) == 3 + 2 + 3 + 2  # attentions, encoder and decoder layer norms, final norms
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(5)

    def run(m, dtype=torch.float32):
        return m(src.to(dtype), tgt.to(dtype), tgt_mask=causal.to(dtype), tgt_is_causal=True,
                 src_key_padding_mask=pad, memory_key_padding_mask=pad)

    grad = torch.no_grad() if mode == "eval" else torch.enable_grad()
    with grad:
        ours, names = profiled(lambda: run(model))
        assert_close(ours, run(original), run(reference, torch.float64))
    assert_ran_ours(names, "layer_norm")
    if mode == "train":
        dy = torch.randn(ours.shape)
        grads = []
        for m, out in ((model, ours), (original, run(original)), (reference, run(reference, torch.float64))):
            (out * dy.to(out.dtype)).sum().backward()
            grads.append({n: p.grad for n, p in m.named_parameters()})
        for name in grads[0]:
            assert_close(grads[0][name], grads[1][name], grads[2][name], f"grad of {name}")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swap_transformer_encoder_with_padding(backend, mode):
    """Eval mode with a padding mask is where torch converts to nested tensors and takes its fused layer path;
    after swap neither may happen. torch's nested path zeroes padded positions, so only real tokens compare."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16)).train(mode == "train")
    original, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fa.swap(model, backend=backend)
    adjusted = {(e.name, e.reason.split()[0]) for e in report.adjusted}
    assert {("", "use_nested_tensor"), ("layers.0", "activation_relu_or_gelu"),
            ("layers.1", "activation_relu_or_gelu")} <= adjusted
    x = torch.randn(3, 6, 16)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[0, 4:] = True
    pad[2, 1:] = True
    real = ~pad
    with torch.no_grad():
        ours, names = profiled(lambda: model(x, src_key_padding_mask=pad))
        assert_close(ours[real], original(x, src_key_padding_mask=pad)[real],
                     reference(x.double(), src_key_padding_mask=pad)[real])
    assert_ran_ours(names, "layer_norm")
    assert not ours.is_nested


def test_swap_keeps_parameters_state_dict_and_modes(backend):
    model = tiny_transformer(batch_first=True).double()
    model.decoder.train(False)  # mixed modes must survive
    params = dict(model.named_parameters())
    keys = list(model.state_dict().keys())
    modes = {n: m.training for n, m in model.named_modules()}
    fa.swap(model, backend=backend)
    assert list(model.state_dict().keys()) == keys
    for name, p in model.named_parameters():
        assert p is params[name], f"{name} is not the original Parameter"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(m.backend == backend for m in model.modules() if isinstance(m, fa.nn.LayerNorm))
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # strict: same keys and shapes


def test_unswap_restores(backend):
    model = tiny_transformer(batch_first=True).eval()
    originals = {n: m for n, m in model.named_modules()}
    flags = [layer.activation_relu_or_gelu for layer in model.encoder.layers], model.encoder.use_nested_tensor
    swapped = fa.swap(model, backend=backend)
    assert isinstance(model.encoder.layers[0].self_attn, fa.nn.MultiheadAttention)
    report = fa.unswap(model)
    assert len(report.replaced) == len(swapped.replaced)
    for name, module in model.named_modules():
        assert module is originals[name], f"{name} was not restored"
    assert ([layer.activation_relu_or_gelu for layer in model.encoder.layers],
            model.encoder.use_nested_tensor) == flags
    _, names = profiled(lambda: model(torch.randn(2, 4, 16), torch.randn(2, 3, 16)))
    assert not any(n.startswith("fast_attention::") for n in names)


def test_unswap_turns_directly_built_modules_into_torch():
    model = nn.Sequential(fa.nn.LayerNorm(6), fa.nn.Softmax(-1))
    weight = model[0].weight
    fa.unswap(model)
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is nn.Softmax and model[0].weight is weight


def test_swap_skips_what_it_cannot_replace_and_reports_it():
    class ScaledLayerNorm(nn.LayerNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    class ShiftedRMSNorm(nn.Module):  # named like an RMSNorm, but neither Llama's formula nor Gemma's (1 + weight)
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight + 1

    shared = nn.LayerNorm(6)
    model = nn.Sequential(ScaledLayerNorm(6), ShiftedRMSNorm(6), shared, nn.Sequential(shared))
    state = torch.get_rng_state()
    report = fa.swap(model)
    assert torch.equal(torch.get_rng_state(), state)  # the probe of ShiftedRMSNorm used its own generator
    assert [(e.name, e.type) for e in report.skipped] == [("0", "ScaledLayerNorm"), ("1", "ShiftedRMSNorm")]
    assert "own forward" in report.skipped[0].reason and "probe" in report.skipped[1].reason
    assert isinstance(model[2], fa.nn.LayerNorm) and model[3][0] is model[2]  # one replacement, in both places
    text = str(report)
    assert "skipped  0 (ScaledLayerNorm)" in text and "replaced 2 (LayerNorm)" in text
    assert [e.name for e in fa.swap(nn.LayerNorm(4)).skipped] == [""]  # the root has no parent to put it in
    with pytest.raises(ValueError, match="backend must be one of"):
        fa.swap(model, backend="nope")


def test_swap_leaves_reparametrized_modules_and_subclasses_whole():
    """Modules swap() cannot rebuild faithfully are judged before any module is replaced, and left as they are:
    parametrized, pruned and weight-normed parameters, and subclasses (their type, methods and attributes)."""
    from torch.nn.utils import parametrize, prune

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    class Tagged(nn.LayerNorm):  # the torch forward, but a type and an attribute of its own
        tag = "mine"

    parametrized = nn.LayerNorm(8)
    parametrize.register_parametrization(parametrized, "weight", Double())
    pruned = nn.MultiheadAttention(8, 2)
    prune.l1_unstructured(pruned, "in_proj_weight", 0.3)
    with pytest.warns(FutureWarning):
        weight_normed = nn.utils.weight_norm(nn.LayerNorm(8), dim=0)
    model = nn.Sequential(parametrized, pruned, weight_normed, Tagged(8), nn.LayerNorm(8))
    x = torch.randn(3, 2, 8)
    before = model[0](x), model[1](x, x, x)[0], model[2](x), model[3](x)
    report = fa.swap(model)
    assert [e.name for e in report.skipped] == ["0", "1", "2", "3"] and [e.name for e in report.replaced] == ["4"]
    assert "parametrized" in report.skipped[0].reason and "pruning" in report.skipped[1].reason
    assert "weight norm" in report.skipped[2].reason and "subclass" in report.skipped[3].reason
    assert type(model[3]) is Tagged and isinstance(model[4], fa.nn.LayerNorm)
    after = model[0](x), model[1](x, x, x)[0], model[2](x), model[3](x)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_swap_keeps_the_backend_of_fast_attention_modules_unless_given_one():
    model = nn.Sequential(fa.nn.LayerNorm(4, backend="reference"))
    assert "backend set" not in fa.swap(model).skipped[0].reason and model[0].backend == "reference"
    fa.swap(model, backend="triton" if "triton" in fa.available_backends() else "reference")
    assert model[0].backend == ("triton" if "triton" in fa.available_backends() else "reference")


def test_swap_keeps_hooks():
    model = nn.Sequential(nn.LayerNorm(6))
    seen, saved = [], []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(type(m)))
    model[0].register_state_dict_post_hook(lambda m, state, prefix, local: saved.append(type(m)))
    fa.swap(model)
    model(torch.randn(2, 6))
    handle.remove()
    model(torch.randn(2, 6))
    model.state_dict()
    assert seen == [fa.nn.LayerNorm] and saved == [fa.nn.LayerNorm]


# ---------------------------------------------------------------------------------------------------- Hugging Face
HF_CONFIGS = {
    "bert": ("BertForMaskedLM", "BertConfig", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=48,
                                                    max_position_embeddings=16)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                                   bos_token_id=1, eos_token_id=2)),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,  # GQA
                                                      intermediate_size=48, max_position_embeddings=16)),
}
NORM_OP = {"bert": "layer_norm", "gpt2": "layer_norm", "llama": "rms_norm"}


def hf_model(kind, **config_kwargs):
    transformers = pytest.importorskip("transformers")
    model_cls, config_cls, kwargs = HF_CONFIGS[kind]
    config = getattr(transformers, config_cls)(**kwargs, **config_kwargs)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_swap_hugging_face_model(backend, kind, padding):
    model = hf_model(kind)
    original, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    report = fa.swap(model, backend=backend)
    assert model.config._attn_implementation == "fast_attention"
    assert [e.type for e in report.adjusted] == [type(model).__name__]
    assert len(report.replaced) == {"bert": 6, "gpt2": 5, "llama": 5}[kind]  # every LayerNorm / RMSNorm
    ids = torch.randint(3, 100, (2, 7))
    mask = None
    if padding:  # left padding for the decoders, right padding for BERT; both give HF a 4-D mask
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, slice(5, None) if kind == "bert" else slice(0, 2)] = 0
    with torch.no_grad():
        ours, names = profiled(lambda: model(input_ids=ids, attention_mask=mask).logits)
        theirs = original(input_ids=ids, attention_mask=mask).logits
        ref = reference(input_ids=ids, attention_mask=mask).logits
    real = slice(None) if mask is None else mask.bool()
    assert_close(ours[real], theirs[real], ref[real])
    assert_ran_ours(names, NORM_OP[kind])
    fa.unswap(model)
    assert model.config._attn_implementation == original.config._attn_implementation
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_hugging_face_output_attentions(backend, kind):
    """output_attentions=True: every layer's weights, from the kernels' weights pass, in the model's dtype, as
    eager's on the real query rows (a padded row masked everywhere is zeros here and uniform in eager)."""
    model = hf_model(kind)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # (in float64, eager's padded rows are NaN: no oracle here)
    fa.swap(model)
    ids, mask = torch.randint(3, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, slice(5, None) if kind == "bert" else slice(0, 2)] = 0
    with torch.no_grad(), fa.use_backend(backend):
        ours, names = profiled(lambda: model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions)
        theirs = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        assert "fast_attention::attention_weights" in names
        none, names = profiled(lambda: model(input_ids=ids, attention_mask=mask).attentions)
        assert none is None and "fast_attention::attention_weights" not in names  # not asked for: not computed
    assert len(ours) == len(theirs) == 2
    real = mask.bool()  # (batch, query row)
    for layer, (o, t) in enumerate(zip(ours, theirs)):
        assert o.shape == t.shape and o.dtype == t.dtype, layer
        torch.testing.assert_close(o.transpose(1, 2)[real], t.transpose(1, 2)[real], msg=lambda m: f"{layer}: {m}")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_attn_implementation_at_construction(backend, kind):
    model = hf_model(kind, attn_implementation="fast_attention")
    assert model.config._attn_implementation == "fast_attention"
    sdpa = hf_model(kind)
    sdpa.load_state_dict(model.state_dict())
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad(), fa.use_backend(backend):
        ours, names = profiled(lambda: model(input_ids=ids).logits)
        torch.testing.assert_close(ours, sdpa(input_ids=ids).logits)
    assert "fast_attention::scaled_dot_product_attention" in names


def test_hugging_face_llama_under_autocast(backend, device):
    """Under autocast Llama hands attention float32 query and key (out of its rotary embedding) and a bfloat16
    value: torch's autocast casts all three, and so do we."""
    model = hf_model("llama")
    original, reference = copy.deepcopy(model), copy.deepcopy(model).double()
    fa.swap(model, backend=backend)
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        with torch.autocast(device, dtype=torch.bfloat16):
            ours, names = profiled(lambda: model(input_ids=ids).logits)
            theirs = original(input_ids=ids).logits
        ref = reference(input_ids=ids).logits
    assert ours.dtype == theirs.dtype
    assert_close(ours, theirs, ref)
    assert_ran_ours(names, "rms_norm")


def test_hugging_face_attention_left_alone_says_why():
    """swap() leaves a model's attention as it is, with the reason in its report, where fast_attention cannot run
    it: Falcon does not dispatch attention through transformers' AttentionInterface. The model runs as before."""
    transformers = pytest.importorskip("transformers")
    config = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    model = transformers.FalconForCausalLM(config).eval()
    before = model.config._attn_implementation
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    report = fa.swap(model)
    assert model.config._attn_implementation == before
    skipped = {e.name: e.reason for e in report.skipped}
    assert not report.adjusted and skipped[""].startswith(f"attention stays {before!r}")
    assert "AttentionInterface" in skipped[""]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def _tiny_beyond_sdpa(kind):
    """A tiny gpt-oss (learned sinks) or Gemma 2 (logit softcapping), each with a sliding-window layer and a full
    one."""
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, max_position_embeddings=64, sliding_window=4)
    if kind == "gpt_oss":
        config = transformers.GptOssConfig(**sizes, intermediate_size=32, num_local_experts=2, num_experts_per_tok=1)
        model = transformers.GptOssForCausalLM(config).eval()
    else:
        # weights large enough for scores past the cap: with the default init the cap changes the logits by 1e-7
        config = transformers.Gemma2Config(**sizes, intermediate_size=48, attn_logit_softcapping=1.0,
                                           initializer_range=0.3)
        model = transformers.Gemma2ForCausalLM(config).eval()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # gpt-oss's default grouped_mm takes no float64 (the oracle)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
                m.sinks.normal_()  # initialized at 0 or garbage otherwise
    return model


def _sinks_of(model):
    return [m.sinks for m in model.modules() if isinstance(getattr(m, "sinks", None), torch.nn.Parameter)]


@pytest.mark.parametrize("kind", ["gpt_oss", "gemma2"])
def test_hugging_face_sinks_and_softcap(backend, kind):
    """gpt-oss's learned sinks (transformers' s_aux) and Gemma 2's logit cap (softcap) run as fast_attention's, in
    sliding-window and full layers: eager's logits and gradients (the sinks' among them) against the float64 model,
    and with left padding eager's logits and greedy KV-cached generation. (In float64, a padded row gives NaN in
    eager without sinks, and the NaN reaches every row through its value's zero weight: no oracle there.)"""
    model = _tiny_beyond_sdpa(kind)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    reference = copy.deepcopy(eager).double()
    report = fa.swap(model, backend=backend)
    assert [e.type for e in report.adjusted] == [type(model).__name__] and not report.skipped
    assert report.replaced  # the norms (Gemma's scale by 1 + weight: fast_attention.hf.GemmaRMSNorm)
    ids = torch.randint(3, 100, (2, 9))
    ours, names = profiled(lambda: model(input_ids=ids).logits)
    theirs, ref = eager(input_ids=ids).logits, reference(input_ids=ids).logits
    assert "fast_attention::scaled_dot_product_attention" in names
    assert_close(ours, theirs, ref)
    for logits in (ours, theirs, ref):
        logits.square().mean().backward()
    grads = [[p.grad for name, p in m.named_parameters() if "self_attn" in name] for m in (model, eager, reference)]
    assert len(grads[0]) >= 4 and (kind != "gpt_oss" or len(_sinks_of(model)) == 2)
    for ours_g, theirs_g, ref_g in zip(*grads, strict=True):
        assert_close(ours_g, theirs_g, ref_g, "attention parameters' gradients")

    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        real = mask.bool()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[real],
                                   eager(input_ids=ids, attention_mask=mask).logits[real])
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(generated, eager.generate(ids, attention_mask=mask, max_new_tokens=6,
                                                             do_sample=False))


@pytest.mark.parametrize("padding", [False, True])
def test_hugging_face_sliding_window_reaches_the_kernels(backend, monkeypatch, padding):
    """Mistral with a window of 8 over 70 tokens (several kernel tiles): each layer's call carries window_size
    (8, 8) beside the mask transformers built, so the kernels skip the blocks outside it; eager's logits and
    gradients against the float64 model (with left padding, eager's logits: the float64 model gives NaN there, see
    test_hugging_face_sinks_and_softcap), and eager's greedy generation, whose one-query steps take no window."""
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128,
                                        sliding_window=8)
    model = transformers.MistralForCausalLM(config).eval()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    reference = copy.deepcopy(eager).double()
    fa.swap(model, backend=backend)
    if backend == "cuda":
        backend = None  # the CUDA kernels take no float32 (this model's): Triton runs these calls
    windows = []
    real_attention = fa.functional.scaled_dot_product_attention

    def spy(query, key, *args, window_size=None, **kwargs):
        windows.append((query.shape[2], kwargs.get("is_causal"), window_size))
        return real_attention(query, key, *args, window_size=window_size, **kwargs)

    monkeypatch.setattr(fa.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, 100, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    if padding:
        mask[1, :5] = 0
    real = mask.bool()
    if padding:
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[real],
                                       eager(input_ids=ids, attention_mask=mask).logits[real])
    else:
        logits = [m(input_ids=ids).logits for m in (model, eager, reference)]
        assert_close(*logits)
        for x in logits:
            x.square().mean().backward()
        grads = [[p.grad for name, p in m.named_parameters() if "self_attn" in name]
                 for m in (model, eager, reference)]
        for ours_g, theirs_g, ref_g in zip(*grads, strict=True):
            assert_close(ours_g, theirs_g, ref_g, "attention parameters' gradients")
    assert [w[2] for w in windows] == [(8, 8)] * 2, windows
    windows.clear()
    with torch.no_grad():
        generated = model.generate(ids[:, :40], attention_mask=mask[:, :40], max_new_tokens=4, do_sample=False)
        torch.testing.assert_close(generated, eager.generate(ids[:, :40], attention_mask=mask[:, :40],
                                                             max_new_tokens=4, do_sample=False))
    assert [w[2] for w in windows if w[0] == 1] == [None] * 6 and windows[0][2] == (8, 8)


@pytest.mark.parametrize("model_name", ["Llama", "Mistral", "gpt_oss", "gemma2"])
def test_hugging_face_packed_sequences_run_on_varlen(monkeypatch, model_name):
    """A packed batch (DataCollatorWithFlattening(return_flash_attn_kwargs=True): four sequences of 40, 1, 25 and 9
    tokens end to end) runs on fa.varlen_attn, causal, and a sliding layer of W keys with window_size (W - 1, 0),
    gpt-oss's sinks and Gemma 2's logit cap as in the dense call: the logits and the attention parameters'
    gradients are those of each sequence run alone, by eager and by the float64 model. With transformers' default
    use_cache=True the mask path gets no mask for such a batch (eager and sdpa then let the sequences attend to
    each other); the offsets make it right here too. (Transformers' attention calls pass no backend: one run.)"""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=128)
    if model_name == "Llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    elif model_name == "Mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=8)).eval()
    else:
        model = _tiny_beyond_sdpa(model_name)
    W = getattr(model.config, "sliding_window", None)
    layers = getattr(model.config, "layer_types", None) or ["sliding_attention" if W else "full_attention"] * 2
    expected = [(W - 1, 0) if kind == "sliding_attention" else (-1, 0) for kind in layers]
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    reference = copy.deepcopy(eager).double()
    fa.swap(model)
    windows = []
    real_varlen = fa.functional.varlen_attn

    def spy(*args, window_size=(-1, -1), **kwargs):
        windows.append(window_size)
        return real_varlen(*args, window_size=window_size, **kwargs)

    monkeypatch.setattr(fa.functional, "varlen_attn", spy)
    sequences = [torch.randint(3, 100, (n,)).tolist() for n in (40, 1, 25, 9)]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": ids} for ids in sequences])
    batch.pop("labels")
    for use_cache in (True, False):
        windows.clear()
        with torch.no_grad():
            logits = model(**batch, use_cache=use_cache).logits[0]
        assert windows == expected
        alone = torch.cat([eager(input_ids=torch.tensor([ids])).logits[0] for ids in sequences])
        torch.testing.assert_close(logits, alone, atol=2e-5, rtol=0)
    logits = [model(**batch, use_cache=False).logits[0]]
    logits += [torch.cat([m(input_ids=torch.tensor([ids])).logits[0] for ids in sequences]) for m in (eager, reference)]
    assert_close(*logits)
    for x in logits:
        x.square().mean().backward()
    grads = [[p.grad for name, p in m.named_parameters() if "self_attn" in name] for m in (model, eager, reference)]
    for ours, theirs, exact in zip(*grads, strict=True):
        assert_close(ours, theirs, exact, "attention parameters' gradients")


def _tiny_t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    stock = transformers.T5ForConditionalGeneration(config)
    stock.set_attn_implementation("eager")
    return stock


def test_hugging_face_t5_with_padding(backend):
    """T5's position bias and mask as one additive mask, padded positions at finfo.min as eager attention adds
    them: the decoder's left-padded rows, masked everywhere, are eager's uniform average too, not zeros."""
    stock = _tiny_t5().eval()
    model, reference = copy.deepcopy(stock), copy.deepcopy(stock).double()
    report = fa.swap(model)
    # T5's RMSNorms (T5LayerNorm): two per encoder block, three per decoder block, one after each stack
    assert [e.type for e in report.replaced] == ["T5LayerNorm"] * 12
    ids, decoder_ids = torch.randint(1, 100, (2, 7)), torch.randint(1, 100, (2, 5))
    mask, decoder_mask = torch.ones(2, 7, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    mask[1, 5:] = 0
    decoder_mask[1, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids,
                  decoder_attention_mask=decoder_mask)
    with torch.no_grad(), fa.use_backend(backend):
        ours, names = profiled(lambda: model(**kwargs).logits)
        assert_close(ours, stock(**kwargs).logits, reference(**kwargs).logits)
    assert_ran_ours(names, "rms_norm")


def test_hugging_face_t5_generates_as_eager(backend):
    """Greedy generate() with a KV cache: each step's single query gets the position bias of its cached keys."""
    stock = _tiny_t5().eval()
    model = copy.deepcopy(stock)
    fa.swap(model)
    ids, mask = torch.randint(2, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad(), fa.use_backend(backend):
        ours, theirs = model.generate(**kwargs), stock.generate(**kwargs)
    for step, (o, t) in enumerate(zip(ours.scores, theirs.scores)):
        torch.testing.assert_close(o, t, msg=lambda m: f"step {step}: {m}")
        if not torch.equal(o.argmax(-1), t.argmax(-1)):  # a near tie may pick another token: the rest differs
            assert (t.topk(2).values.diff(dim=-1).abs() < 1e-4).any(), step
            break


def test_hugging_face_t5_trains_its_learned_position_bias(backend):
    """T5 adds a learned relative position bias, which requires grad in training, to its attention scores: a
    training step, with padding, gives the stock model's loss and gradients, the bias's included (dS from the
    kernels' backward, summed over the batch). The CUDA kernels give no gradient for a mask: asked for by name they
    say so."""
    stock = _tiny_t5().train()
    model, reference = copy.deepcopy(stock), copy.deepcopy(stock).double()
    fa.swap(model, backend=None if backend == "cuda" else backend)
    assert model.config._attn_implementation == "fast_attention"
    ids, labels = torch.randint(1, 100, (2, 7)), torch.randint(1, 100, (2, 5))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with fa.use_backend(None if backend == "cuda" else backend):
        losses, names = profiled(lambda: [m(input_ids=ids, attention_mask=mask, labels=labels).loss
                                          for m in (model, stock, reference)])
        assert_close(*losses, "loss")
        for m, loss in zip((model, stock, reference), losses):
            loss.backward()
    assert "fast_attention::scaled_dot_product_attention" in names
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    params = [dict(m.named_parameters()) for m in (model, stock, reference)]
    assert params[0][bias].grad is not None and params[0][bias].grad.abs().sum() > 0
    for name in params[1]:
        assert_close(*(p[name].grad for p in params), name)
    if backend == "cuda":
        with fa.use_backend("cuda"), pytest.raises(NotImplementedError, match="backend='cuda' cannot run.*mask"):
            model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("weight_dtype,input_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                      (torch.float32, torch.bfloat16), (torch.float16, torch.float32),
                                                      (torch.float32, torch.float32)])
def test_hugging_face_t5_rms_norm_keeps_its_dtype(weight_dtype, input_dtype):
    """T5LayerNorm normalizes in float32 and returns the weight's dtype when that is 16-bit (rounding to it before
    the product), else float32: its replacement too, whatever the input's dtype."""
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    norm = T5LayerNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    reference = copy.deepcopy(norm).double()
    model = nn.Sequential(norm.to(weight_dtype))
    x = torch.randn(4, 8, dtype=input_dtype)
    expected = model(x)
    report = fa.swap(model)
    assert [e.reason for e in report.replaced] == ["-> fast_attention.hf.T5RMSNorm"]
    got = model(x)
    assert got.dtype == expected.dtype
    assert_close(got, expected, reference(x.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hugging_face_gemma_rms_norm_scales_by_one_plus_weight(backend, dtype):
    """Gemma's RMSNorm scales by 1 + weight (zero centred) in float32 and returns x's dtype: its replacement too,
    with the gradients of x and of the weight."""
    pytest.importorskip("transformers")
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(std=0.5)
    reference = copy.deepcopy(norm).double()
    original = nn.Sequential(copy.deepcopy(norm).to(dtype))
    model = nn.Sequential(norm.to(dtype))
    report = fa.swap(model, backend=backend)
    assert [e.reason for e in report.replaced] == ["-> fast_attention.hf.GemmaRMSNorm"]
    x = torch.randn(5, 16, dtype=dtype, requires_grad=True)
    dy = torch.randn(5, 16, dtype=dtype)
    outputs = []
    for m, inp in ((model, x), (original, x), (reference, x.detach().double().requires_grad_())):
        y = m(inp)
        outputs.append((y, *torch.autograd.grad(y, (inp, m[0].weight if m is not reference else m.weight),
                                                dy.to(y.dtype))))
    assert outputs[0][0].dtype == dtype
    for name, ours, theirs, ref in zip(("output", "dx", "dweight"), *outputs):
        assert_close(ours, theirs, ref, name)


def test_hugging_face_rms_norm_keeps_its_dtype_and_hooks_see_no_probe():
    """LlamaRMSNorm returns weight * normalized(x).to(x.dtype): a float32 weight beside bfloat16 activations gives
    float32, and so must its replacement. Judging it (a probe forward) must not run its hooks."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    calls = []
    norm.register_forward_hook(lambda *args: calls.append(1))
    model = nn.Sequential(norm)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    expected = model(x)
    report = fa.swap(model)
    assert len(calls) == 1 and [e.name for e in report.replaced] == ["0"]
    got = model(x)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-6)  # HF's two roundings, to a bfloat16 ulp


def test_hugging_face_registration_in_either_import_order(fresh_python):
    """transformers imported before fast_attention: registered at import; after: by the import hook (the
    order the rest of this test session uses)."""
    pytest.importorskip("transformers")
    returncode, stderr = fresh_python("""
        from transformers import GPT2Config, GPT2LMHeadModel
        import fast_attention
        config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=8, bos_token_id=1,
                            eos_token_id=2, attn_implementation="fast_attention")
        assert GPT2LMHeadModel(config).config._attn_implementation == "fast_attention"
    """, timeout=120)
    assert returncode == 0, stderr
