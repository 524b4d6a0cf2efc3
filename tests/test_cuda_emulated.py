"""The CUDA kernels (csrc/) run on the CPU: built by the host C++ compiler against the CPU emulation of the CUDA
execution model in csrc/emulate/ (emu.h; ptx.h for the attention kernels' inline PTX), then checked against
float64 by csrc/emulate/rows_test.cpp and attention_test.cpp.

This checks the kernels' logic (indexing, fragment layouts, reductions, masking, the partition of rows and columns
among blocks) on a machine without a GPU; their speed, memory ordering and races need the GPU (tests/test_cuda.py,
csrc/sanitize.py). It needs g++ with C++20 and the CUDA headers (for the bf16/fp16 types), as the extension's
build does.
"""
import os
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


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Every csrc/ unit and the emulation's own, compiled for the emulation: {name: object path}."""
    tmp = tmp_path_factory.mktemp("emulated")
    src = tmp / "csrc"
    shutil.copytree(CSRC, src)
    for unit in list(src.rglob("*.cu")) + list(src.rglob("*.cuh")):
        unit.write_text(emulated_source(unit.read_text()))
    units = sorted(str(p.relative_to(src)) for p in src.rglob("*.cu")) + [
        "emulate/runtime.cpp", "emulate/rows_test.cpp", "emulate/attention_test.cpp"]
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


def _run(objects, main: str, tmp_path) -> str:
    """Link `main` with every kernel unit and run it; its output, which must end in '0 failed'."""
    others = ("emulate/rows_test.cpp", "emulate/attention_test.cpp")
    objs = [str(o) for unit, o in objects.items() if unit not in others or unit == main]
    exe = tmp_path / Path(main).stem
    link = subprocess.run([CXX, *objs, "-o", str(exe), "-lpthread"], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and run.stdout.rstrip().endswith(" 0 failed"), run.stdout[-5000:] + run.stderr[-2000:]
    return run.stdout


def test_row_kernels_match_float64_under_emulation(objects, tmp_path):
    _run(objects, "emulate/rows_test.cpp", tmp_path)


def test_attention_kernels_match_float64_under_emulation(objects, tmp_path):
    _run(objects, "emulate/attention_test.cpp", tmp_path)
