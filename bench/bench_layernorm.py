"""LayerNorm over the last dim (with weight and bias), forward, backward and forward+backward: fast_attention's
backends against torch.nn.functional.layer_norm, the reference under torch.compile, and Liger's and flash-attn's
Triton LayerNorm when installed. Memory-bound, so GB/s. bench_rmsnorm.py reuses norm_suite() below.

GPU grid: rows of 1k to 16k elements, 2^27 elements per tensor (131072 to 8192 rows), bf16 and fp16.
Run alone: `python -m bench --suite layernorm` or `python bench/bench_layernorm.py [--quick]`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

# bench.harness first: on a machine without a GPU it sets TRITON_INTERPRET before triton is imported.
from bench.harness import (DEVICE, DIRECTIONS, ROW_BYTES, SHORT, Case, Check, Mode, Skip, Suite, compiled, directed,
                           dtype_name, optional_import, row_shapes, timed_backends, triplets)
import fast_attention as fa
from fast_attention import reference

EPS = 1e-5


def norm_suite(op: str) -> Suite:
    """The suite for op "layer_norm" (x, weight, bias) or "rms_norm" (x, weight)."""
    has_bias = op == "layer_norm"
    ours_fn = getattr(fa, op)
    torch_fn = getattr(F, op)
    reference_fn = getattr(reference, op)
    # Per direction: (M x N tensors, N-vectors) moved. Forward reads x and the affine vectors, writes y; backward
    # reads dy, x and weight, writes dx and a gradient per affine vector.
    vectors = 2 if has_bias else 1
    moved = {"forward": (2, vectors), "backward": (3, 1 + vectors)}
    moved["forward+backward"] = tuple(a + b for a, b in zip(moved["forward"], moved["backward"]))

    def cases(mode: Mode) -> list:
        out = []
        for direction in DIRECTIONS:
            for M, N, dtype in row_shapes(mode):
                rows, vecs = moved[direction]
                out.append(Case({"direction": direction, "dtype": dtype_name(dtype), "M": M, "N": N},
                                bytes=(rows * M * N + vecs * N) * dtype.itemsize))
        return out

    def inputs(p: dict) -> list:
        """x (M, N), weight (N,) and, for LayerNorm, bias (N,): all leaves that require grad."""
        dtype = getattr(torch, p["dtype"])
        made = [torch.randn(p["M"], p["N"], device=DEVICE, dtype=dtype)]
        made += [torch.randn(p["N"], device=DEVICE, dtype=dtype) for _ in range(vectors)]
        return [t.requires_grad_() for t in made]

    def call(fn, p: dict, **kwargs):
        """setup() for an implementation with F.layer_norm / F.rms_norm's signature."""
        def setup():
            x, *affine = inputs(p)
            return directed(p["direction"], lambda: fn(x, (p["N"],), *affine, eps=EPS, **kwargs), (x, *affine))
        return setup

    def providers(case: Case) -> dict:
        p = case.params
        timed = timed_backends()
        made = {f"fa:{b}": call(ours_fn, p, backend=b) for b in timed}
        if {"triton", "cuda"} <= set(timed):  # backend=None: the Triton forward, then the CUDA backward
            made["fa:auto"] = call(ours_fn, p)
        made[f"torch F.{op}"] = call(torch_fn, p)
        made["compile(reference)"] = call(compiled(reference_fn), p)
        if DEVICE == "cuda":
            made.update(_optional_providers(op, p, inputs))
        return made

    def checks(mode: Mode) -> list:
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if mode.gpu else (torch.float16, torch.float32)
        out = []
        for dtype in dtypes:
            for M, N in ((37, 129), (4, 3000), (16, 64)):
                def run(backend, M=M, N=N, dtype=dtype):
                    x = torch.randn(M, N, device=DEVICE, dtype=dtype) * 3 + 1
                    named = {"input": x, "weight": torch.randn(N, device=DEVICE, dtype=dtype)}
                    if has_bias:
                        named["bias"] = torch.randn(N, device=DEVICE, dtype=dtype)
                    return triplets(lambda input, **a: ours_fn(input, (N,), **a, eps=EPS, backend=backend),
                                    lambda input, **a: torch_fn(input, (N,), **a, eps=EPS),
                                    lambda input, **a: reference_fn(input, (N,), **a, eps=EPS), named)
                out.append(Check(f"{op} {dtype_name(dtype)} ({M}, {N})", run))
        return out

    name = op.replace("_", "")
    return Suite(
        name=name,
        title=("LayerNorm over the last dim, with weight and bias" if has_bias else
               "RMSNorm over the last dim, with weight"),
        metric="GB/s",
        convention=ROW_BYTES,
        label=lambda p: f"{SHORT[p['direction']]} {p['dtype']} {p['M']}x{p['N']}",
        cases=cases,
        providers=providers,
        checks=checks,
        x="N",
        panels=("direction", "dtype"),
    )


def _optional_providers(op: str, p: dict, inputs) -> dict:
    """Liger's and flash-attn's Triton norms, when installed (CUDA only)."""
    made = {}
    liger = optional_import("liger_kernel.transformers")
    if liger is not None:
        def liger_norm():
            x = inputs(p)[0]
            if op == "layer_norm":
                module = liger.LigerLayerNorm(p["N"], eps=EPS)
            else:
                try:  # in_place=False: Liger would otherwise overwrite dy, which the backward timing replays
                    module = liger.LigerRMSNorm(p["N"], eps=EPS, in_place=False)
                except TypeError:
                    module = liger.LigerRMSNorm(p["N"], eps=EPS)
            module = module.to(device=DEVICE, dtype=x.dtype)
            return directed(p["direction"], lambda: module(x), (x, *module.parameters()))
        made["liger"] = liger_norm
    flash_norms = optional_import("flash_attn.ops.triton.layer_norm")
    if flash_norms is not None:
        def flash_norm():
            x, weight, *bias = inputs(p)
            if op == "layer_norm":
                forward = lambda: flash_norms.layer_norm_fn(x, weight, bias[0], eps=EPS)  # noqa: E731
            elif hasattr(flash_norms, "rms_norm_fn"):
                forward = lambda: flash_norms.rms_norm_fn(x, weight, None, eps=EPS)  # noqa: E731
            else:
                raise Skip("this flash-attn has no rms_norm_fn")
            return directed(p["direction"], forward, (x, weight, *bias))
        made["flash-attn triton"] = flash_norm
    return made


SUITE = norm_suite("layer_norm")

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "layernorm", *sys.argv[1:]]))
