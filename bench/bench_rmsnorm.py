"""RMSNorm over the last dim (with weight), forward, backward and forward+backward: fast_attention's backends
against torch.nn.functional.rms_norm, the reference under torch.compile, and Liger's and flash-attn's Triton RMSNorm
when installed. Memory-bound, so GB/s. The suite is bench_layernorm.norm_suite's, for rms_norm.

GPU grid: rows of 1k to 16k elements, 2^27 elements per tensor (131072 to 8192 rows), bf16 and fp16.
Run alone: `python -m bench --suite rmsnorm` or `python bench/bench_rmsnorm.py [--quick]`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_layernorm import norm_suite

SUITE = norm_suite("rms_norm")

if __name__ == "__main__":
    from bench.harness import main
    sys.exit(main(["--suite", "rmsnorm", *sys.argv[1:]]))
