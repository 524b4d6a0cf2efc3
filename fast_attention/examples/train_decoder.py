"""Train a small character-level decoder on fables.txt (shipped beside this file), generate text, and plot the
attention maps of one sentence.

    python -m fast_attention.examples.train_decoder --steps 1000 --out attention_map.png

On a CPU it uses the reference backend (Triton's interpreter is far too slow to train with) and takes a minute or
two on an idle machine; on a GPU it uses the fastest backend there.
"""
from __future__ import annotations

import argparse
import math
import time
from importlib import resources

import torch

from fast_attention.models import Transformer, TransformerConfig

SENTENCE = "the pizza came out of the oven and it tasted good"


def load_text() -> str:
    return resources.files("fast_attention.examples").joinpath("fables.txt").read_text(encoding="utf-8")


class Characters:
    """Character-level tokenizer over the training text's alphabet."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, s: str) -> torch.Tensor:
        unknown = sorted(set(s) - set(self.index))
        if unknown:
            raise ValueError(f"characters not in the training text: {unknown}")
        return torch.tensor([self.index[c] for c in s], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def batches(data: torch.Tensor, batch_size: int, block: int, device: str, generator: torch.Generator):
    """Endless random windows: x (B, block) and the next characters y (B, block)."""
    while True:
        starts = torch.randint(len(data) - block - 1, (batch_size,), generator=generator)
        x = torch.stack([data[s:s + block] for s in starts])
        y = torch.stack([data[s + 1:s + block + 1] for s in starts])
        yield x.to(device), y.to(device)


@torch.no_grad()
def evaluate(model: Transformer, data: torch.Tensor, block: int, device: str) -> float:
    """Mean loss over consecutive, non-overlapping windows of the held-out text."""
    model.eval()
    n = (len(data) - 1) // block
    x = data[:n * block].view(n, block).to(device)  # (n, block)
    y = data[1:n * block + 1].view(n, block).to(device)
    loss = model(x, y)[1].item()
    model.train()
    return loss


def plot_attention(maps: list[torch.Tensor], sentence: str, path: str) -> None:
    """maps: per layer (1, H, T, T) -> a PNG grid, one row per layer, one column per head."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    layers, heads = len(maps), maps[0].shape[1]
    labels = [c if c != " " else "\u2423" for c in sentence]  # an open box shows where the spaces are
    fig, axes = plt.subplots(layers, heads, figsize=(3.6 * heads, 3.6 * layers), squeeze=False)
    for layer, weights in enumerate(maps):
        for head in range(heads):
            ax = axes[layer][head]
            # a square-root color scale, so that the many small weights stay visible beside the few large ones
            ax.imshow(weights[0, head].cpu().numpy(), cmap="viridis", norm=PowerNorm(0.5, 0.0, 1.0))
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(len(labels)), labels if layer == layers - 1 else [], fontsize=5)
            ax.set_yticks(range(len(labels)), labels if head == 0 else [], fontsize=5)
            ax.tick_params(length=0)
    fig.supxlabel("key (attended to)")
    fig.supylabel("query")
    fig.suptitle(f"causal self-attention on \u201c{sentence}\u201d")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, choices=["reference", "triton", "cuda"],
                        help="fast_attention backend (default: reference on CPU, the fastest on a GPU)")
    parser.add_argument("--out", default="./attention_map.png", help="where to write the attention map PNG")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    backend = args.backend or ("reference" if args.device == "cpu" else None)
    text = load_text()
    chars = Characters(text)
    data = chars.encode(text)
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]

    block, batch_size = 128, 8  # 1024 characters a step: a few tenths of a second on two CPU cores
    cfg = TransformerConfig(kind="decoder", vocab_size=len(chars.chars), max_seq_len=block, n_layers=4, d_model=128,
                            n_heads=4, dropout=0.1, backend=backend)
    model = Transformer(cfg).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, {len(text)} characters ({len(chars.chars)} distinct), "
          f"device {args.device}, backend {backend or 'auto'}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then cosine decay to 10%
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, args.steps) /
                                                                                     args.steps)))
    stream = batches(train, batch_size, block, args.device, torch.Generator().manual_seed(args.seed))
    print(f"step 0: val loss {evaluate(model, val, block, args.device):.3f} (uniform guess: "
          f"{math.log(len(chars.chars)):.3f})")
    start = time.time()
    progress = tqdm(range(1, args.steps + 1), desc="training", unit="step")
    for step in progress:
        x, y = next(stream)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            progress.write(f"step {step}: train loss {loss.item():.3f}, val loss "
                           f"{evaluate(model, val, block, args.device):.3f}")
    progress.close()
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")

    prompt = chars.encode("THE ").to(args.device).expand(3, -1)  # (3, 4): three samples of the same prompt
    out = model.generate(prompt, max_new_tokens=cfg.max_seq_len - prompt.shape[1], temperature=0.8, top_k=10)
    for sample in out.tolist():
        print(f"--- generated ---\n{chars.decode(sample)}")
    print("-----------------")

    sentence = chars.encode(SENTENCE).to(args.device)[None]  # (1, T)
    model.eval()
    maps = model.attention_maps(sentence)  # per layer (1, H, T, T), fp32
    plot_attention(maps, SENTENCE, args.out)
    print(f"attention maps of {SENTENCE!r} written to {args.out}")


if __name__ == "__main__":
    main()
