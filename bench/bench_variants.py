"""Attention beyond torch SDPA, as models learned it: scores capped with softcap (Gemma 2), learned sinks
(gpt-oss) and a sliding window (Mistral, Gemma, gpt-oss). fast_attention's backends against the formula as
transformers' eager attention writes it, that formula under torch.compile, torch's FlexAttention (softcap as a
score_mod, the window as a block mask; on the CPU it has no backward), for the window torch's SDPA with the mask
transformers' sdpa attention builds, and fast_attention's own plain causal attention on the same shapes (what the
cap or the sinks cost, what the window saves).

And packed sequences (fa.varlen_attn, causal per sequence): a padding-free batch of sequences of L, 3L/4, L/2 and
L/4 tokens, against torch's varlen_attn (FlashAttention's varlen kernel, on a GPU), torch's SDPA over the packed
row with the block-diagonal mask transformers' sdpa attention builds for it, FlexAttention with a document mask,
the formula run per sequence, and fast_attention's plain causal attention on the batch padded to L (what packing
saves).

GPU grid: bf16, causal, D 128, 16k tokens per batch at width 2048 (H 16), L 1k to 16k; forward and
forward+backward. Run alone: `python -m bench --suite variants`.
"""
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# bench.harness first: on a machine without a GPU it sets TRITON_INTERPRET before triton is imported.
from bench.harness import (ATTENTION_FLOPS, DEVICE, SHORT, Case, Check, Mode, Skip, Suite, compiled, directed,
                           dtype_name, timed_backends, triplets)
from bench.bench_attention import TOKENS, WIDTH, _qkv, _skip_huge_reference, attention_flops
import fast_attention as fa
from fast_attention import reference

SOFTCAP = 30.0  # Gemma 2's attn_logit_softcapping (scores past it are rare in the timed random inputs, as in a model)
WINDOW = {True: 1024, False: 32}  # keys each query sees, on a GPU (about 4096 in Mistral 7B, 128 in gpt-oss) and here
VARIANTS = ("softcap", "sinks", "window", "packed")


def packed_lengths(L: int, gpu: bool) -> list[int]:
    """A packed batch whose longest sequence is L: L, 3L/4, L/2 and L/4 tokens, repeated on a GPU up to about the
    suites' TOKENS."""
    pattern = [L, 3 * L // 4, L // 2, L // 4]
    return pattern * (max(1, TOKENS // sum(pattern)) if gpu else 1)


def window_cells(L: int, W: int) -> float:
    """Score cells a causal sliding window of W keys computes over L queries (all of the first W rows' causal
    triangle, then W per row), on the causal convention of attention_flops (L^2 / 2 when W >= L)."""
    return L * L / 2 if W >= L else W * W / 2 + (L - W) * W


def _flops(p: dict) -> float:
    if p["variant"] == "packed":
        return sum(attention_flops(1, p["H"], n, n, p["D"], True, p["direction"]) for n in p["lengths"])
    flops = attention_flops(p["B"], p["H"], p["L"], p["L"], p["D"], True, p["direction"])
    if p["variant"] == "window":
        flops *= window_cells(p["L"], p["W"]) / (p["L"] * p["L"] / 2)
    return flops


def cases(mode: Mode) -> list:
    if mode.gpu:
        dtype, D, lengths = torch.bfloat16, 128, (1024, 16384) if mode.quick else (1024, 4096, 16384)
        heads, batch = WIDTH // D, (lambda L: TOKENS // L)
    else:
        dtype, D, lengths, heads, batch = torch.float32, 64, (128,), 4, (lambda L: 2)
    out = []
    for direction in ("forward", "forward+backward"):
        for variant in VARIANTS:
            for L in lengths:
                p = {"direction": direction, "variant": variant, "D": D, "causal": True, "L": L, "B": batch(L),
                     "H": heads, "dtype": dtype_name(dtype)}
                if variant == "window":
                    p["W"] = WINDOW[mode.gpu]
                if variant == "packed":
                    p["lengths"] = packed_lengths(L, mode.gpu)
                    p["B"] = len(p["lengths"])
                out.append(Case(p, flops=_flops(p)))
    return out


def label(p: dict) -> str:
    variant = {"window": f"window {p.get('W')}", "packed": f"packed {sum(p.get('lengths', ()))} tokens"}.get(
        p["variant"], p["variant"])
    return f"{SHORT[p['direction']]} {variant} D{p['D']} causal B{p['B']} H{p['H']} L{p['L']}"


def _extra(p: dict) -> tuple[dict, tuple]:
    """The variant's argument, softcap=, sinks= (one learned value per head) or window_size=, and the leaves it
    adds."""
    if p["variant"] == "softcap":
        return {"softcap": SOFTCAP}, ()
    if p["variant"] == "window":
        return {"window_size": (p["W"] - 1, -1)}, ()
    sinks = torch.randn(p["H"], device=DEVICE, requires_grad=True)
    return {"sinks": sinks}, (sinks,)


def providers(case: Case) -> dict:
    p = case.params
    if p["variant"] == "packed":
        return packed_providers(p)
    direction = p["direction"]

    def ours(backend, plain=False):
        def setup():
            if backend == "reference":
                _skip_huge_reference(p)
            q, k, v = _qkv(p)
            extra, leaves = ({}, ()) if plain else _extra(p)
            return directed(direction, lambda: fa.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                               backend=backend, **extra),
                            (q, k, v, *leaves))
        return setup

    made = {}
    for backend in timed_backends():
        made[f"fa:{backend}"] = ours(backend)
    for backend in timed_backends():
        if backend != "reference":
            made[f"fa:{backend} plain"] = ours(backend, plain=True)

    def eager(compile_it):
        def setup():
            _skip_huge_reference(p)
            q, k, v = _qkv(p)
            extra, leaves = _extra(p)
            attend = compiled(reference.scaled_dot_product_attention) if compile_it else \
                reference.scaled_dot_product_attention
            return directed(direction, lambda: attend(q, k, v, is_causal=True, **extra), (q, k, v, *leaves))
        return setup

    made["eager"] = eager(False)
    made["compile(eager)"] = eager(True)

    if p["variant"] == "window":
        def sdpa():  # transformers' sdpa attention: the sliding mask, materialized, through torch's SDPA
            q, k, v = _qkv(p)
            keep = reference.window_mask((p["W"] - 1, -1), p["L"], p["L"], DEVICE).tril()
            return directed(direction, lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=keep), (q, k, v))
        made["torch.sdpa(mask)"] = sdpa

    if p["variant"] in ("softcap", "window"):
        def flex():
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            except ImportError:
                raise Skip("skipped: this torch has no FlexAttention") from None
            q, k, v = _qkv(p)
            if direction == "forward":  # FlexAttention refuses inputs that require grad where it has no backward
                q, k, v = (t.detach() for t in (q, k, v))
            L = p["L"]

            def capped(score, b, h, q_idx, kv_idx):
                return SOFTCAP * torch.tanh(score / SOFTCAP)

            W = p.get("W", L)
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < W),
                                           None, None, L, L, device=DEVICE)
            score_mod = capped if p["variant"] == "softcap" else None
            attend = _compiled_flex(flex_attention)
            return directed(direction, lambda: attend(q, k, v, score_mod=score_mod, block_mask=block_mask),
                            (q, k, v))
        made["torch.flex_attention"] = flex
    return made


def _packed_qkv(p: dict) -> tuple[list, torch.Tensor]:
    """Packed q, k, v (total, H, D) and the int32 offsets of p["lengths"]."""
    lengths = torch.tensor(p["lengths"], device=DEVICE)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    shape = (int(lengths.sum()), p["H"], p["D"])
    return [torch.randn(shape, device=DEVICE, dtype=getattr(torch, p["dtype"]), requires_grad=True)
            for _ in range(3)], cu


def _torch_varlen():
    """torch's varlen_attn as a causal call (its keyword changed: is_causal before torch 2.10's window_size), or
    None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    import inspect

    causal = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters
              else {"is_causal": True})
    return functools.partial(varlen_attn, **causal)


def packed_providers(p: dict) -> dict:
    direction, L, total = p["direction"], p["L"], sum(p["lengths"])
    longest = dict(p, B=1)  # the reference's largest score matrix is the longest sequence's

    def ours(backend, plain=False):
        def setup():
            if backend == "reference":
                _skip_huge_reference(longest)
            if plain:  # the batch padded to its longest sequence, through the dense causal kernels
                q, k, v = _qkv(p)
                return directed(direction, lambda: fa.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                   backend=backend), (q, k, v))
            (q, k, v), cu = _packed_qkv(p)
            return directed(direction, lambda: fa.varlen_attn(q, k, v, cu, cu, L, L, window_size=(-1, 0),
                                                              backend=backend), (q, k, v))
        return setup

    made = {f"fa:{backend}": ours(backend) for backend in timed_backends()}
    made.update({f"fa:{backend} plain": ours(backend, plain=True) for backend in timed_backends()
                 if backend != "reference"})

    def eager():  # the formula, one sequence at a time
        _skip_huge_reference(longest)
        (q, k, v), cu = _packed_qkv(p)
        return directed(direction, lambda: reference.varlen_attn(q, k, v, cu, cu, window_size=(-1, 0)), (q, k, v))

    def compiled_eager():
        raise Skip("skipped: the formula loops over offsets read on the host, no single graph to compile")

    def torch_varlen():
        attend = _torch_varlen()
        if attend is None or DEVICE != "cuda":
            raise Skip("skipped: torch's varlen_attn runs FlashAttention's CUDA kernels, not here")
        (q, k, v), cu = _packed_qkv(p)
        return directed(direction, lambda: attend(q, k, v, cu, cu, L, L), (q, k, v))

    def documents() -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(p["lengths"]), device=DEVICE),
                                       torch.tensor(p["lengths"], device=DEVICE))

    def sdpa():  # transformers' sdpa attention on a packed row: the block-diagonal causal mask, materialized
        if total * total > MASK_LIMIT:
            raise Skip(f"skipped: the {total} x {total} mask would take {total * total / 2**30:.0f} GiB")
        (q, k, v), _ = _packed_qkv(p)
        doc = documents()
        keep = (doc[:, None] == doc[None, :]).tril()
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
        return directed(direction, lambda: torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=keep), (q, k, v))

    def flex():
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            raise Skip("skipped: this torch has no FlexAttention") from None
        (q, k, v), _ = _packed_qkv(p)
        if direction == "forward":
            q, k, v = (t.detach() for t in (q, k, v))
        doc = documents()
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx),
                                       None, None, total, total, device=DEVICE)
        attend = _compiled_flex(flex_attention)
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
        return directed(direction, lambda: attend(q4, k4, v4, block_mask=block_mask), (q, k, v))

    made.update({"eager": eager, "compile(eager)": compiled_eager, "torch.varlen_attn": torch_varlen,
                 "torch.sdpa(mask)": sdpa, "torch.flex_attention": flex})
    return made


MASK_LIMIT = 2**32  # mask cells: 4 GiB as bool, twice that as torch's SDPA's float copy of it


@functools.cache
def _compiled_flex(flex_attention):
    """flex_attention under torch.compile with static shapes (one compile per shape, dynamic=False: dynamo's
    automatic dynamic shapes would recompile it dynamic at the second shape): with dynamic shapes inductor's
    lowering of it failed (torch 2.13, CPU: a C++ compile error for the packed batch's document mask)."""
    return torch.compile(flex_attention, dynamic=False)


def checks(mode: Mode) -> list:
    """Small odd shapes, forward and every gradient (the sinks' too), against the formula in the same dtype and in
    float64."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if mode.gpu else (torch.float16, torch.float32)
    out = []
    for dtype in dtypes:
        for variant in VARIANTS[:-1]:
            def run(backend, dtype=dtype, variant=variant):  # CUDA with float32: NotImplementedError
                B, H, Lq, Lk, D = 2, 4, 37, 45, 64
                inputs = {"query": 3 * torch.randn(B, H, Lq, D, device=DEVICE, dtype=dtype),
                          "key": torch.randn(B, H, Lk, D, device=DEVICE, dtype=dtype),
                          "value": torch.randn(B, H, Lk, D, device=DEVICE, dtype=dtype)}
                cap = {"softcap": {"softcap": 2.0}, "window": {"window_size": (6, -1)}}.get(variant, {})
                if variant == "sinks":
                    inputs["sinks"] = torch.randn(H, device=DEVICE)
                return triplets(
                    lambda **t: fa.scaled_dot_product_attention(**t, is_causal=True, **cap, backend=backend),
                    lambda **t: reference.scaled_dot_product_attention(**t, is_causal=True, **cap),
                    lambda **t: reference.scaled_dot_product_attention(**t, is_causal=True, **cap), inputs)
            out.append(Check(f"{variant} {dtype_name(dtype)} B2 H4 Lq37 Lk45 D64 causal", run))

        def packed(backend, dtype=dtype):
            lengths_q, lengths_k = torch.tensor([37, 1, 0, 20]), torch.tensor([45, 3, 6, 20])
            cu_q, cu_k = (torch.nn.functional.pad(n.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)
                          for n in (lengths_q, lengths_k))
            inputs = {"query": 3 * torch.randn(int(lengths_q.sum()), 4, 64, device=DEVICE, dtype=dtype),
                      "key": torch.randn(int(lengths_k.sum()), 2, 64, device=DEVICE, dtype=dtype),
                      "value": torch.randn(int(lengths_k.sum()), 2, 64, device=DEVICE, dtype=dtype)}
            args = dict(cu_seq_q=cu_q, cu_seq_k=cu_k, window_size=(-1, 0), enable_gqa=True)
            return triplets(lambda **t: fa.varlen_attn(**t, **args, max_q=37, max_k=45, backend=backend),
                            lambda **t: reference.varlen_attn(**t, **args),
                            lambda **t: reference.varlen_attn(**t, **args), inputs)
        out.append(Check(f"packed {dtype_name(dtype)} Lq 37+1+0+20 Lk 45+3+6+20 H4/2 D64 causal", packed))
    return out


SUITE = Suite(
    name="variants",
    title="Attention with a logit cap (Gemma 2), learned sinks (gpt-oss), a sliding window and packed sequences",
    metric="TFLOP/s",
    convention=ATTENTION_FLOPS + f"; softcap {SOFTCAP}; the cap's tanh and the sinks' row scaling are not counted; "
                                 "a window counts only the cells inside it (window_cells), packed sequences each "
                                 "sequence's causal cells",
    label=label,
    cases=cases,
    providers=providers,
    checks=checks,
    x="L",
    panels=("direction", "variant"),
)

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "variants", *sys.argv[1:]]))
