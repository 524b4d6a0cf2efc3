"""Compile the Triton attention kernels' configs for the attention benchmark's shapes in parallel, before it runs.

The first time the autotuner meets a (head dim, causal, dtype) combination it compiles every config of the kernel
one after another, then times them: some thirty compilations for the forward, dK/dV and dQ kernels together, each
a few seconds of ptxas, so minutes of a GPU session spent on one CPU core. Here worker i launches config i of each
kernel (of those the autotuner would keep) once on those shapes, so every compiled kernel lands in Triton's on-disk
cache, and the autotuner in the benchmark then only times them. GPU only; nothing is timed or checked here.

    python -m bench.precompile [--quick] [--jobs N]
"""
import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

def _shapes(quick: bool) -> list:
    """(B, H, L, D, causal) of the attention benchmark's GPU cases, bf16."""
    import torch

    from bench import bench_attention
    from bench.harness import Mode

    cases = bench_attention.cases(Mode(gpu=torch.cuda.is_available(), quick=quick))
    return sorted({(c.params["B"], c.params["H"], c.params["L"], c.params["D"], c.params["causal"]) for c in cases})


def _worker(index: int, shapes: list) -> str:
    """Run the forward and backward once per shape with the index-th config the autotuner would keep (modulo
    their number) in each kernel."""
    os.environ["FAST_ATTENTION_AUTOTUNE"] = "0"  # the launchers then take the first config _prune returns
    import torch

    import fast_attention as fa
    from fast_attention.kernels import attention

    keep = attention._prune

    def prune_to_one(kind):
        def prune(configs, named_args, **kwargs):
            kept = keep(kind)(configs, named_args, **kwargs)
            return [kept[index % len(kept)]]
        return prune

    attention._prune = prune_to_one
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: under the interpreter, for its test
    start = time.perf_counter()
    for B, H, L, D, causal in shapes:
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        out = fa.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="triton")
        out.backward(torch.randn_like(out))
    if device == "cuda":
        torch.cuda.synchronize()
    return f"config {index}: {len(shapes)} shapes in {time.perf_counter() - start:.0f} s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.precompile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shapes of `python -m bench --quick`")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: the most configs a "
                        "kernel has, at most the CPU count)")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench.precompile: no GPU here, nothing to compile (the interpreter compiles nothing)")
        return 0
    from fast_attention.kernels import attention

    shapes = _shapes(args.quick)
    most = max(len(attention._configs(kind)) for kind in attention._KERNELS)
    jobs = args.jobs or min(most, os.cpu_count() or 1)
    start = time.perf_counter()
    # spawn: CUDA cannot be used in a forked child of a process that initialized it
    import multiprocessing
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, i, shapes) for i in range(most)]
        failed = 0
        for future in futures:
            try:
                print(future.result(), flush=True)
            except Exception as e:  # a config that fails to compile or launch: the autotuner will say so too
                failed += 1
                print(f"failed: {type(e).__name__}: {str(e).strip().splitlines()[:1]}", flush=True)
    print(f"bench.precompile: {most} configs x {len(shapes)} shapes in {time.perf_counter() - start:.0f} s, "
          f"{failed} worker(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
