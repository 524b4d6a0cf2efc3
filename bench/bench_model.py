"""Whole models, in tokens/s (and the training step's TFLOP/s):

- fast_attention.models' decoder-only Transformer: one training step (forward, loss, backward, AdamW step) and
  KV-cached generation on each backend; the reference backend is the baseline, and on a GPU the fastest backend is
  also run under torch.compile. GPU model: Llama-like (~200M parameters), 12 layers, width 1024, 16 heads of 64
  over 4 key/value heads (GQA), RoPE, RMSNorm, no bias or dropout, bf16 weights; training on 16k tokens per step,
  generation of 64 tokens after prompts of 128 to 1536, batch 8.
- A model a user already has: a causal language model built from stock torch.nn (nn.TransformerEncoder of
  pre-norm layers, i.e. nn.MultiheadAttention and nn.LayerNorm), timed as it is (torch's own attention path: SDPA
  inside nn.MultiheadAttention, and in inference its fused encoder-layer path) and after fast_attention.swap(model)
  on each backend: a training step and an inference forward. GPU size: 12 layers, width 1024, 16 heads, GELU
  feed-forward of 4096, bf16, 16k tokens per call.

Run alone: `python -m bench --suite model` or `python bench/bench_model.py [--quick]`.
"""
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

# bench.harness first: on a machine without a GPU it sets TRITON_INTERPRET before triton is imported.
from bench.harness import DEVICE, Case, Check, Mode, Skip, Suite, timed_backends, triplets
import fast_attention as fa

try:
    from fast_attention.models import Transformer, TransformerConfig
    MISSING = None
except Exception as e:  # the model is written separately: without it this suite says why instead of failing
    Transformer = TransformerConfig = None
    MISSING = f"fast_attention.models is not available ({type(e).__name__}: {e}); the model suite needs it"

NEW_TOKENS = {True: 64, False: 8}  # per generation call, on a GPU and on the CPU


def model_config(mode: Mode, backend=None):
    if mode.gpu:
        size = dict(n_layers=12, d_model=1024, n_heads=16, n_kv_heads=4, vocab_size=32000, max_seq_len=2048)
    else:
        size = dict(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=256)
    return TransformerConfig(kind="decoder", pos_encoding="rope", norm="rmsnorm", bias=False, dropout=0.0,
                             backend=backend, **size)


def cases(mode: Mode) -> list:
    if mode.gpu:
        train = (1024,) if mode.quick else (512, 1024, 2048)
        prompts = (512,) if mode.quick else (128, 512, 1536)
        tokens_per_step, gen_batch = 16384, 8
    else:
        train, prompts, tokens_per_step, gen_batch = (64, 128), (32, 64), 256, 2
    new = NEW_TOKENS[mode.gpu]
    out = [Case({"task": "train step", "T": T, "B": tokens_per_step // T}, tokens=tokens_per_step,
                flops=_train_flops(mode, tokens_per_step // T, T), backward=True) for T in train]
    out += [Case({"task": "generate", "T": P, "B": gen_batch, "new": new}, tokens=gen_batch * new) for P in prompts]
    for task in ("swap: train step", "swap: inference"):
        out += [Case({"task": task, "T": T, "B": tokens_per_step // T}, tokens=tokens_per_step,
                     flops=_torch_lm_flops(mode, tokens_per_step // T, T, task == "swap: train step"),
                     backward=task == "swap: train step")
                for T in train]
    return out


def _train_flops(mode: Mode, B: int, T: int) -> float | None:
    """6 FLOPs per matmul weight per token (forward 2, backward 4), plus causal attention's forward and backward
    (3.5 x 4*B*H*T*T*D / 2) in every layer."""
    if MISSING is not None:
        return None
    cfg = model_config(mode)
    with torch.device("meta"):
        model = Transformer(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 3.5 * 4 * B * cfg.n_heads * T * T * (cfg.d_model // cfg.n_heads) / 2 * cfg.n_layers
    return 6.0 * weights * B * T + attention


def label(p: dict) -> str:
    if p["task"] == "generate":
        return f"generate B{p['B']} prompt {p['T']} +{p['new']}"
    return f"{p['task'].replace('step', '')} B{p['B']} T{p['T']}".replace("  ", " ")


class TorchLM(nn.Module):
    """A causal language model from stock torch.nn parts, the kind of model a user has before
    fast_attention.swap(model): token and learned position embeddings, nn.TransformerEncoder of pre-norm layers
    under a causal mask, a final LayerNorm and the vocabulary head. idx (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, max_seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """padding: optional (B, T) bool, True at padded tokens (nn.TransformerEncoder's src_key_padding_mask)."""
        T = idx.shape[1]
        x = self.embed(idx) + self.position(torch.arange(T, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device, dtype=x.dtype)
        if padding is not None:  # as an additive mask, like the causal one (torch deprecates mixing the kinds)
            padding = torch.zeros_like(padding, dtype=x.dtype).masked_fill(padding, float("-inf"))
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True, src_key_padding_mask=padding)))


def _torch_lm_size(mode: Mode) -> dict:
    if mode.gpu:
        return dict(vocab_size=32000, d_model=1024, n_heads=16, n_layers=12, max_seq_len=2048)
    return dict(vocab_size=256, d_model=64, n_heads=4, n_layers=2, max_seq_len=256)


def _torch_lm(size: dict, backend: str | None, dtype: torch.dtype) -> nn.Module:
    """The stock model of this size with fixed weights, swapped to `backend` unless it is None."""
    torch.manual_seed(0)
    model = TorchLM(**size).to(device=DEVICE, dtype=dtype)
    if backend is not None:
        fa.swap(model, backend=backend)
    return model


def _torch_lm_flops(mode: Mode, B: int, T: int, train: bool) -> float:
    """2 FLOPs per matmul weight per token forward (6 with the backward), plus causal attention: forward
    4*B*H*T*T*D/2 per layer, 3.5x that with the backward."""
    size = _torch_lm_size(mode)
    with torch.device("meta"):
        model = TorchLM(**size)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    weights += sum(m.in_proj_weight.numel() for m in model.modules() if isinstance(m, nn.MultiheadAttention))
    attention = 4 * B * T * T * size["d_model"] / 2 * size["n_layers"]
    return (6.0 if train else 2.0) * weights * B * T + (3.5 if train else 1.0) * attention


def _model(backend: str) -> torch.nn.Module:
    """The benchmark model on this device, bf16 on a GPU (fp32 on the CPU), same weights for every backend."""
    torch.manual_seed(0)
    mode = Mode(gpu=DEVICE == "cuda", quick=False)
    dtype = torch.bfloat16 if mode.gpu else torch.float32
    return Transformer(model_config(mode, backend)).to(device=DEVICE, dtype=dtype)


def providers(case: Case) -> dict:
    p = case.params
    if MISSING is not None:
        def missing():
            raise Skip(MISSING)
        return {"fast_attention.models": missing}

    def train(backend, compile_model=False):
        def setup():
            model = _model(backend)
            idx = torch.randint(0, model.cfg.vocab_size, (p["B"], p["T"] + 1), device=DEVICE)
            inputs, targets = idx[:, :-1], idx[:, 1:]
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            forward = torch.compile(model) if compile_model else model

            def step():
                _, loss = forward(inputs, targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step
        return setup

    def generate(backend):
        def setup():
            model = _model(backend)
            prompt = torch.randint(0, model.cfg.vocab_size, (p["B"], p["T"]), device=DEVICE)

            def run():
                with torch.no_grad():
                    return model.generate(prompt, p["new"], temperature=0)
            return run
        return setup

    if p["task"].startswith("swap"):
        return _swap_providers(p)
    made_for = train if p["task"] == "train step" else generate
    made = {f"fa:{b}": made_for(b) for b in timed_backends()}
    fastest = timed_backends()[0]
    # One length only: each compilation of the whole training step takes about a minute.
    if DEVICE == "cuda" and p["task"] == "train step" and p["T"] == 1024 and fastest != "reference":
        made[f"fa:{fastest} + torch.compile(model)"] = train(fastest, compile_model=True)
    return made


def _swap_providers(p: dict) -> dict:
    """The stock torch model as it is, then swapped to each backend: a training step or an inference forward."""
    mode = Mode(gpu=DEVICE == "cuda", quick=False)
    dtype = torch.bfloat16 if mode.gpu else torch.float32

    def made(backend):
        def setup():
            model = _torch_lm(_torch_lm_size(mode), backend, dtype)
            idx = torch.randint(0, model.head.out_features, (p["B"], p["T"] + 1), device=DEVICE)
            inputs, targets = idx[:, :-1], idx[:, 1:]
            if p["task"] == "swap: inference":
                model.eval()  # stock torch then takes its fused encoder-layer path; swap() turns that off

                def forward():
                    with torch.no_grad():
                        return model(inputs)
                return forward
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                logits = model(inputs)
                torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step
        return setup

    providers = {"torch (nn.MultiheadAttention)": made(None)}
    providers.update({f"fa:{b}": made(b) for b in timed_backends()})
    return providers


def checks(mode: Mode) -> list:
    """A tiny model's logits on each backend against the reference backend in float32 and in float64."""
    if MISSING is not None:
        return []

    def logits(backend, dtype):
        torch.manual_seed(0)
        cfg = TransformerConfig(kind="decoder", n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=64,
                                max_seq_len=32, pos_encoding="rope", norm="rmsnorm", dropout=0.0, backend=backend)
        model = Transformer(cfg).to(device=DEVICE, dtype=dtype)
        return lambda idx: model(idx)[0]

    def run(backend):
        idx = torch.randint(0, 64, (2, 13), device=DEVICE)
        return triplets(logits(backend, torch.float32), logits("reference", torch.float32),
                        logits("reference", torch.float64), {"idx": idx}, grad=False)
    def swapped(backend):
        """The stock torch model swapped to `backend` against itself unswapped, in float32 and float64."""
        size = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=32)
        idx = torch.randint(0, 64, (2, 13), device=DEVICE)
        return triplets(_torch_lm(size, backend, torch.float32), _torch_lm(size, None, torch.float32),
                        _torch_lm(size, None, torch.float64), {"idx": idx}, grad=False)
    return [Check("decoder logits float32 B2 T13", run),
            Check("swapped nn.TransformerEncoder LM logits float32 B2 T13", swapped)]


SUITE = Suite(
    name="model",
    title="Whole models: the decoder (training step, generation); a stock torch model as is and swapped",
    metric="tokens/s",
    convention=("tokens/s: B*T per training step, B*new per generate() call (prefill included); training FLOPs: "
                "6 per matmul weight per token plus causal attention (forward+backward 3.5x 4*B*H*T*T*D/2) per layer"),
    label=label,
    cases=cases,
    providers=providers,
    checks=checks,
    x="T",
    panels=("task",),
)
if MISSING is not None:
    SUITE.notes.append(MISSING)

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "model", *sys.argv[1:]]))
