"""Attention forward, backward and forward+backward: fast_attention's backends against torch SDPA (each of its
kernels), torch.nn.MultiheadAttention, the reference under torch.compile, and flash-attn / xformers when installed.

GPU grid (FlashAttention's benchmark shape): bf16, 16k tokens per batch (B * L = 16384), model width 2048, so
H = 2048 / D; D 64 and 128; L 1k to 16k; causal and not.
Run alone: `python -m bench --suite attention` or `python bench/bench_attention.py [--quick]`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

# bench.harness first: on a machine without a GPU it sets TRITON_INTERPRET before triton is imported.
from bench.harness import (ATTENTION_FLOPS, DEVICE, DIRECTIONS, SHORT, Case, Check, Mode, Skip, Suite, compiled,
                           directed, dtype_name, optional_import, timed_backends, triplets)
import fast_attention as fa
from fast_attention import reference

DIRECTION_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}
WIDTH, TOKENS = 2048, 16384

# torch SDPA's kernels, by the name torch.nn.attention.SDPBackend gives them; efficient and cuDNN are CUDA only.
SDPA_KERNELS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                "cudnn": "CUDNN_ATTENTION"}


def attention_flops(B, H, Lq, Lk, D, causal, direction) -> float:
    """4 B H D FLOPs per score cell computed, forward; causal (top-left) computes Lq^2 / 2 cells when Lq <= Lk
    (FlashAttention's half of the square when Lq = Lk), and Lq Lk - Lk^2 / 2 when the queries outnumber the keys."""
    cells = (Lq * Lq / 2 if Lq <= Lk else Lq * Lk - Lk * Lk / 2) if causal else Lq * Lk
    return 4.0 * B * H * cells * D * DIRECTION_FACTOR[direction]


def cases(mode: Mode) -> list:
    if mode.gpu:
        dtype = torch.bfloat16
        lengths = (1024, 4096, 16384) if mode.quick else (1024, 2048, 4096, 8192, 16384)
        heads_dims = [(WIDTH // D, D) for D in (64, 128)]
        batch = lambda L: TOKENS // L  # noqa: E731
    else:
        dtype, lengths, heads_dims, batch = torch.float32, (128, 512), [(4, 64)], (lambda L: 2)
    out = []
    for direction in DIRECTIONS:
        for H, D in heads_dims:
            for causal in (False, True):
                for L in lengths:
                    B = batch(L)
                    out.append(Case({"direction": direction, "D": D, "causal": causal, "L": L, "B": B, "H": H,
                                     "dtype": dtype_name(dtype)},
                                    flops=attention_flops(B, H, L, L, D, causal, direction)))
    return out


def label(p: dict) -> str:
    return f"{SHORT[p['direction']]} D{p['D']} {'causal' if p['causal'] else 'full'} B{p['B']} H{p['H']} L{p['L']}"


def _qkv(p: dict, layout: str = "BHLD") -> list:
    """q, k, v (B, H, L, D), or (B, L, H, D) for flash-attn and xformers, which take that layout natively."""
    B, H, L, D = p["B"], p["H"], p["L"], p["D"]
    shape = (B, H, L, D) if layout == "BHLD" else (B, L, H, D)
    dtype = getattr(torch, p["dtype"])
    return [torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]


REFERENCE_LIMIT_GIB = 8


def _skip_huge_reference(p: dict) -> None:
    """The reference materializes the (B, H, L, L) scores in fp32 several times over: past a few GiB it only
    measures the allocator (or runs out of memory) and costs the suite minutes."""
    gib = p["B"] * p["H"] * p["L"] * p["L"] * 4 / 2**30
    if gib > REFERENCE_LIMIT_GIB:
        raise Skip(f"skipped: the reference materializes the B*H*L*L scores ({gib:.0f} GiB in fp32)")


def providers(case: Case) -> dict:
    p = case.params
    direction, causal = p["direction"], p["causal"]
    made = {}

    def ours(backend):
        def setup():
            if backend == "reference":
                _skip_huge_reference(p)
            q, k, v = _qkv(p)
            return directed(direction, lambda: fa.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                               backend=backend), (q, k, v))
        return setup

    for backend in timed_backends():
        made[f"fa:{backend}"] = ours(backend)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(kernel):
        def setup():
            q, k, v = _qkv(p)

            def forward():
                with sdpa_kernel(kernel):  # backward uses the kernel chosen in forward
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return directed(direction, forward, (q, k, v))
        return setup

    for short, name in SDPA_KERNELS.items():
        kernel = getattr(SDPBackend, name, None)
        if kernel is not None and (DEVICE == "cuda" or short in ("math", "flash")):
            made[f"torch.sdpa[{short}]"] = sdpa(kernel)

    def mha(need_weights):
        def setup():
            B, H, L, D = p["B"], p["H"], p["L"], p["D"]
            dtype = getattr(torch, p["dtype"])
            module = torch.nn.MultiheadAttention(H * D, H, batch_first=True, device=DEVICE, dtype=dtype)
            module.train(direction != "forward")  # eval + no_grad lets torch take its fused inference path
            x = torch.randn(B, L, H * D, device=DEVICE, dtype=dtype, requires_grad=True)
            mask = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE, dtype=dtype) if causal \
                else None
            forward = lambda: module(x, x, x, attn_mask=mask, is_causal=causal,  # noqa: E731
                                     need_weights=need_weights)[0]
            return directed(direction, forward, (x, *module.parameters()))
        return setup

    made["torch MHA need_weights=True"] = mha(True)
    made["torch MHA need_weights=False"] = mha(False)

    def compiled_reference():
        _skip_huge_reference(p)
        q, k, v = _qkv(p)
        attend = compiled(reference.scaled_dot_product_attention)
        return directed(direction, lambda: attend(q, k, v, is_causal=causal), (q, k, v))

    made["compile(reference)"] = compiled_reference

    if DEVICE == "cuda":
        flash_attn = optional_import("flash_attn")
        if flash_attn is not None:
            def flash():
                q, k, v = _qkv(p, "BLHD")
                return directed(direction, lambda: flash_attn.flash_attn_func(q, k, v, causal=causal), (q, k, v))
            made["flash-attn"] = flash
        xops = optional_import("xformers.ops")
        if xops is not None:
            def xformers():
                q, k, v = _qkv(p, "BLHD")
                bias = xops.LowerTriangularMask() if causal else None
                return directed(direction, lambda: xops.memory_efficient_attention(q, k, v, attn_bias=bias),
                                (q, k, v))
            made["xformers"] = xformers
    return made


def checks(mode: Mode) -> list:
    """Small odd shapes, forward and every gradient, in each dtype the backends take on this device."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if mode.gpu else (torch.float16, torch.float32)
    shapes = [(1, 2, 33, 33, 16, False), (2, 3, 17, 40, 32, True), (1, 2, 50, 23, 64, True)]
    out = []
    for dtype in dtypes:
        for B, H, Lq, Lk, D, causal in shapes:
            def run(backend, B=B, H=H, Lq=Lq, Lk=Lk, D=D, causal=causal, dtype=dtype):
                inputs = {"query": torch.randn(B, H, Lq, D, device=DEVICE, dtype=dtype),
                          "key": torch.randn(B, H, Lk, D, device=DEVICE, dtype=dtype),
                          "value": torch.randn(B, H, Lk, D, device=DEVICE, dtype=dtype)}
                return triplets(
                    lambda **t: fa.scaled_dot_product_attention(**t, is_causal=causal, backend=backend),
                    lambda **t: F.scaled_dot_product_attention(**t, is_causal=causal),
                    lambda **t: reference.scaled_dot_product_attention(**t, is_causal=causal), inputs)
            out.append(Check(f"sdpa {dtype_name(dtype)} B{B} H{H} Lq{Lq} Lk{Lk} D{D}"
                             f"{' causal' if causal else ''}", run))
    return out


SUITE = Suite(
    name="attention",
    title="Attention forward / backward / forward+backward",
    metric="TFLOP/s",
    convention=ATTENTION_FLOPS + "; torch MHA rows also run the in/out projections, which are not counted",
    label=label,
    cases=cases,
    providers=providers,
    checks=checks,
    x="L",
    panels=("direction", "D", "causal"),
)

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "attention", *sys.argv[1:]]))
