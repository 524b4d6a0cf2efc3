"""Convergence (Liger-Kernel's test idea): a model trained with fast_attention's kernels follows the loss curve of
the same model without them, step by step, and ends with the same weights. The tolerance rule applies to the whole
run: the model without our kernels in the same dtype is torch's own, the same model in float64 the oracle.

Two models: a stock torch.nn language model (nn.TransformerEncoder under a causal mask, with key padding) before
and after fast_attention.swap(), and fast_attention.models' decoder (GQA, RoPE, RMSNorm) on each backend against
its reference backend."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fast_attention as fa
from bench.bench_model import TorchLM
from fast_attention.models import Transformer, TransformerConfig
from tolerance import FLOOR, assert_close

VOCAB, T, BATCH, STEPS = 13, 16, 4, 12  # both models have heads of 32, a head dim every backend compiles
DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def batches(device) -> list:
    """STEPS batches of (idx, targets, padding) from a periodic text, so the loss must fall; the last row is
    right-padded (its targets there are ignored)."""
    text = torch.arange(64) % 7 + 3
    out = []
    for _ in range(STEPS):
        starts = torch.randint(0, len(text) - T - 1, (BATCH,))
        idx = torch.stack([text[s:s + T] for s in starts])
        targets = torch.stack([text[s + 1:s + T + 1] for s in starts])
        padding = torch.zeros(BATCH, T, dtype=torch.bool)
        padding[-1, T - 5:] = True
        idx[padding], targets[padding] = 0, -1
        out.append((idx.to(device), targets.to(device), padding.to(device)))
    return out


def train(model, data, forward) -> tuple:
    """SGD with momentum (its update is linear in the gradient, so rounding differences stay comparable across
    dtypes) -> (loss per step, what training added to each weight, in float64)."""
    start = {name: p.detach().to(torch.float64, copy=True) for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for idx, targets, padding in data:
        logits = forward(model, idx, padding)  # (B, T, VOCAB)
        loss = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), ignore_index=-1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), {name: p.detach().double() - start[name] for name, p in model.named_parameters()}


def stock_lm(backend):
    """(ours, torch's own): one stock model, and a copy of it swapped to `backend`."""
    model = TorchLM(VOCAB, d_model=64, n_heads=2, n_layers=2, max_seq_len=T)
    ours = copy.deepcopy(model)
    fa.swap(ours, backend=backend)
    return ours, model


def decoder(backend):
    """(ours, torch's own): fast_attention.models' decoder on `backend` and, with the same fresh weights, on the
    reference backend."""
    seed = int(torch.randint(2**31, ()))

    def build(backend):
        torch.manual_seed(seed)
        return Transformer(TransformerConfig(kind="decoder", vocab_size=VOCAB, max_seq_len=T, n_layers=2,
                                             d_model=64, n_heads=2, n_kv_heads=1, d_ff=96, pos_encoding="rope",
                                             norm="rmsnorm", dropout=0.0, backend=backend))
    return build(backend), build("reference")


MODELS = {  # name: (build(backend) -> (ours, torch's own), forward(model, idx, padding) -> logits)
    "swapped-torch-lm": (stock_lm, lambda model, idx, padding: model(idx, padding)),
    "fa-models-decoder": (decoder, lambda model, idx, padding: model(idx)[0]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_loss_curve_and_weights_match(backend, name, dtype, device):
    if backend == "reference":
        pytest.skip("the reference backend is the baseline here")
    build, forward = MODELS[name]
    ours, theirs = build(backend)
    oracle = copy.deepcopy(theirs).to(device, torch.float64)
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    data = batches(device)
    if name == "swapped-torch-lm":
        idx, _, padding = data[0]
        with torch.profiler.profile() as prof:
            forward(ours, idx, padding)
        assert "fast_attention::scaled_dot_product_attention" in {e.name for e in prof.events()}
    (loss, update), (loss_torch, update_torch), (loss_64, update_64) = (
        train(model, data, forward) for model in (ours, theirs, oracle))
    assert loss_64[-1] < 0.5 * loss_64[0], f"the oracle did not learn: {loss_64[0]:.3f} -> {loss_64[-1]:.3f}"
    assert_close(loss.to(dtype), loss_torch.to(dtype), loss_64, "loss curve")
    for key in update_64:
        # The floor scales with the update, not with the weight (whose size would hide a wrong gradient).
        floor = FLOOR[dtype] * update_64[key].abs().max().item()
        assert_close(update[key], update_torch[key], update_64[key], f"change of {key} over {STEPS} steps", floor)
