"""The CUDA kernels (csrc/) run on the CPU: built by the host C++ compiler against the CPU emulation of the CUDA
execution model in csrc/emulate/ (emu.h; ptx.h for the attention kernels' inline PTX), then checked against
float64 by csrc/emulate/rows_test.cpp and attention_test.cpp (tiles_test.cpp and dropout_test.cpp check two of
their pieces on their own).

This checks the kernels' logic (indexing, fragment layouts, reductions, masking, the partition of rows and columns
among blocks) on a machine without a GPU; their speed, memory ordering and races need the GPU (tests/test_cuda.py,
csrc/sanitize.py). It needs g++ with C++20 and the CUDA headers (for the bf16/fp16 types), as the extension's
build does, and an x86-64 machine (the emulated CUDA threads are fibers switched in x86-64 assembly).
"""
import os
import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    homes = [os.environ.get("CUDA_HOME"), str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"]
    return next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_bf16.h").exists()), None)


CXX = shutil.which("g++")
INCLUDE = _cuda_include()
pytestmark = [
    pytest.mark.skipif(CXX is None or INCLUDE is None, reason="needs g++ and the CUDA headers"),
    # csrc/emulate/emu.h switches its fibers (the emulated CUDA threads) in x86-64 assembly
    pytest.mark.skipif(platform.machine() != "x86_64", reason="the emulation's fibers are x86-64 code"),
    # With a GPU, tests/test_cuda.py runs the kernels themselves; the emulation would only spend a minute of CPU.
    pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: tests/test_cuda.py runs the real kernels"),
]

LAUNCH = re.compile(r"([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>")
EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];")
PTX_BLOCK = re.compile(r"// --- inline PTX.*?// --- end of inline PTX\n", re.DOTALL)
EX2 = 'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));'


def emulated_source(text: str) -> str:
    """A CUDA source's text for the emulation: `kernel<<<config>>>(args)` becomes `emu::launch(kernel, config)(args)`,
    an `extern __shared__` array a pointer to emu::dynamic_smem, primitives.cuh's block of inline PTX ptx.h, and
    the row kernels' inline PTX exp2 std::exp2."""
    text = LAUNCH.sub(r"emu::launch(\1, \2)", text)
    text = EXTERN_SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(emu::dynamic_smem);", text)
    text = PTX_BLOCK.sub('#include "ptx.h"\n', text)
    return text.replace(EX2, "y = std::exp2(x);")


def test_source_rewrites():
    assert (emulated_source("k<T, A><<<p.rows, threads, 0, stream>>>(a);")
            == "emu::launch(k<T, A>, p.rows, threads, 0, stream)(a);")
    assert (emulated_source("kernel<<<static_cast<unsigned>(G), t, 0, s>>>(a, b);")
            == "emu::launch(kernel, static_cast<unsigned>(G), t, 0, s)(a, b);")
    assert (emulated_source("  extern __shared__ __align__(16) unsigned char smem[];")
            == "  unsigned char* smem = reinterpret_cast<unsigned char*>(emu::dynamic_smem);")
    primitives = emulated_source((CSRC / "attention" / "primitives.cuh").read_text())
    assert '#include "ptx.h"' in primitives and "asm" not in primitives, "primitives.cuh's PTX block has moved"
    assert "asm" not in emulated_source((CSRC / "common" / "device.cuh").read_text()), "new inline PTX in device.cuh"


MAINS = ("emulate/rows_test.cpp", "emulate/attention_test.cpp", "emulate/dropout_test.cpp", "emulate/tiles_test.cpp")


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Every csrc/ unit and the emulation's own, compiled for the emulation: {name: object path}."""
    tmp = tmp_path_factory.mktemp("emulated")
    src = tmp / "csrc"
    shutil.copytree(CSRC, src)
    for unit in list(src.rglob("*.cu")) + list(src.rglob("*.cuh")):
        unit.write_text(emulated_source(unit.read_text()))
    units = sorted(str(p.relative_to(src)) for p in src.rglob("*.cu")) + [
        "emulate/runtime.cpp", *MAINS]
    flags = ["-std=c++20", "-O1", "-w", f"-I{INCLUDE}", f"-I{src}", f"-I{src / 'emulate'}", "-x", "c++",
             "-include", str(src / "emulate" / "emu.h")]

    def compile_unit(unit):
        obj = tmp / (unit.replace("/", "_") + ".o")
        proc = subprocess.run([CXX, *flags, "-c", str(src / unit), "-o", str(obj)], capture_output=True, text=True)
        return unit, obj, proc

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        built = list(pool.map(compile_unit, units))
    for unit, _, proc in built:
        assert proc.returncode == 0, f"{unit}:\n{proc.stderr[-3000:]}"
    return {unit: obj for unit, obj, _ in built}


def _link(objects, main: str, tmp_path) -> Path:
    """`main` linked with every kernel unit: the executable."""
    objs = [str(o) for unit, o in objects.items() if unit not in MAINS or unit == main]
    exe = tmp_path / Path(main).stem
    link = subprocess.run([CXX, *objs, "-o", str(exe), "-lpthread"], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-3000:]
    return exe


def _run(objects, main: str, tmp_path) -> str:
    """Link `main` and run it; its output, which must end in '0 failed'."""
    run = subprocess.run([str(_link(objects, main, tmp_path))], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.rstrip().endswith(" 0 failed"), run.stdout[-5000:] + run.stderr[-2000:]
    return run.stdout


def test_row_kernels_match_float64_under_emulation(objects, tmp_path):
    _run(objects, "emulate/rows_test.cpp", tmp_path)


def test_attention_kernels_match_float64_under_emulation(objects, tmp_path):
    _run(objects, "emulate/attention_test.cpp", tmp_path)


def test_attention_tiles_load_within_their_bounds(objects, tmp_path):
    _run(objects, "emulate/tiles_test.cpp", tmp_path)


# Dropout: the CUDA kernels must drop what the Triton kernels drop for the same seed (kernels/attention.py draws
# tl.rand(seed, ((b * H + h) * Lq + i) * Lk + j) >= p), so that the backends agree with dropout on.
def _triton_interpreted():
    import fast_attention as fa

    return "triton" in fa.available_backends() and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _triton_interpreted(), reason="compares with the Triton kernels under the interpreter")
def test_dropout_uniforms_are_tritons(objects, tmp_path):
    import triton
    import triton.language as tl

    @triton.jit
    def uniforms(Out, Offsets, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(Out + i, tl.rand(seed, tl.load(Offsets + i)))

    # Offsets past 2^32 (the counter's second word) and seeds past 2^32 (the key's second word), as int64 like the
    # kernels' counters; random ones and the extremes.
    offsets = torch.cat([torch.randint(0, 2**40, (120,)), torch.tensor([0, 1, 2**32 - 1, 2**32, 2**40 + 7,
                                                                        2**62, 2**63 - 1, 12345])])
    exe = _link(objects, "emulate/dropout_test.cpp", tmp_path)
    for seed in (0, 1, 2**31 + 5, int(torch.randint(0, 2**62, ()))):
        expected = torch.empty(len(offsets), dtype=torch.float32)
        uniforms[(1,)](expected, offsets, seed, N=len(offsets))
        pairs = "".join(f"{seed} {o}\n" for o in offsets.tolist())
        run = subprocess.run([str(exe), "uniforms"], input=pairs, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        got = torch.tensor([int(w, 16) for w in run.stdout.split()], dtype=torch.int64).to(torch.int32)
        assert torch.equal(got.view(torch.float32), expected), f"seed {seed}"


@pytest.mark.skipif(not _triton_interpreted(), reason="compares with the Triton kernels under the interpreter")
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_tritons(objects, tmp_path, p):
    from fast_attention.kernels import attention as kernels

    B, H, Lq, Lk = 2, 3, 7, 45
    seed = int(torch.randint(0, 2**62, ()))
    expected = kernels.dropout_mask(seed, p, B, H, Lq, Lk, "cpu")
    exe = _link(objects, "emulate/dropout_test.cpp", tmp_path)
    run = subprocess.run([str(exe), "mask", str(B), str(H), str(Lq), str(Lk), repr(p), str(seed)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = torch.tensor([c == "1" for c in run.stdout.strip()]).view(B, H, Lq, Lk)
    assert torch.equal(got, expected)
