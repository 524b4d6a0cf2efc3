"""Softmax over the last dim, forward, backward and forward+backward: fast_attention's backends against
torch.softmax, the reference under torch.compile, and Liger's softmax when installed. Memory-bound, so GB/s.

GPU grid: rows of 1k to 16k elements, 2^27 elements per tensor (131072 to 8192 rows), bf16 and fp16.
Run alone: `python -m bench --suite softmax` or `python bench/bench_softmax.py [--quick]`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

# bench.harness first: on a machine without a GPU it sets TRITON_INTERPRET before triton is imported.
from bench.harness import (DEVICE, DIRECTIONS, ROW_BYTES, SHORT, Case, Check, Mode, Skip, Suite, compiled, directed,
                           dtype_name, optional_import, row_shapes, timed_backends, triplets)
import fast_attention as fa
from fast_attention import reference

# Tensors of M x N elements moved: forward reads x, writes y; backward reads y and dy, writes dx.
MOVED = {"forward": 2, "backward": 3, "forward+backward": 5}


def cases(mode: Mode) -> list:
    out = []
    for direction in DIRECTIONS:
        for M, N, dtype in row_shapes(mode):
            out.append(Case({"direction": direction, "dtype": dtype_name(dtype), "M": M, "N": N},
                            bytes=MOVED[direction] * M * N * dtype.itemsize))
    return out


def label(p: dict) -> str:
    return f"{SHORT[p['direction']]} {p['dtype']} {p['M']}x{p['N']}"


def _x(p: dict) -> torch.Tensor:
    return torch.randn(p["M"], p["N"], device=DEVICE, dtype=getattr(torch, p["dtype"]), requires_grad=True)


def providers(case: Case) -> dict:
    p = case.params
    made = {}

    def ours(backend):
        def setup():
            x = _x(p)
            return directed(p["direction"], lambda: fa.softmax(x, -1, backend=backend), (x,))
        return setup

    for backend in timed_backends():
        made[f"fa:{backend}"] = ours(backend)

    def native():
        x = _x(p)
        return directed(p["direction"], lambda: torch.softmax(x, -1), (x,))

    def compiled_reference():
        x = _x(p)
        softmax = compiled(reference.softmax)
        return directed(p["direction"], lambda: softmax(x, -1), (x,))

    made["torch.softmax"] = native
    made["compile(reference)"] = compiled_reference
    liger = optional_import("liger_kernel.transformers")
    if DEVICE == "cuda" and liger is not None:
        def liger_softmax():
            module = getattr(liger, "LigerSoftmax", None)
            if module is None:
                raise Skip("this Liger version has no LigerSoftmax")
            x = _x(p)
            return directed(p["direction"], lambda: module()(x), (x,))
        made["liger"] = liger_softmax
    return made


def checks(mode: Mode) -> list:
    """Odd row sizes, one longer than a block (the multi-block path), and a softmax over a middle dim."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if mode.gpu else (torch.float16, torch.float32)
    out = []
    for dtype in dtypes:
        for shape, dim in (((37, 129), -1), ((3, 5000), -1), ((6, 9, 33), 1)):
            def run(backend, shape=shape, dim=dim, dtype=dtype):
                x = torch.randn(shape, device=DEVICE, dtype=dtype) * 4
                return triplets(lambda input: fa.softmax(input, dim, backend=backend),
                                lambda input: torch.softmax(input, dim),
                                lambda input: reference.softmax(input, dim), {"input": x})
            out.append(Check(f"softmax {dtype_name(dtype)} {tuple(shape)} dim={dim}", run))
    return out


SUITE = Suite(
    name="softmax",
    title="Softmax over the last dim",
    metric="GB/s",
    convention=ROW_BYTES,
    label=label,
    cases=cases,
    providers=providers,
    checks=checks,
    x="N",
    panels=("direction", "dtype"),
)

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "softmax", *sys.argv[1:]]))
