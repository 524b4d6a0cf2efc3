"""The CUDA row kernels (csrc/rows) run on the CPU: built by the host C++ compiler against the CPU emulation of the
CUDA execution model in csrc/emulate/emu.h, then checked against float64 by csrc/emulate/rows_test.cpp.

This checks the kernels' logic (indexing, reductions, the partition of rows and columns among blocks) on a machine
without a GPU; their speed, memory ordering and races need the GPU (tests/test_cuda.py, csrc/sanitize.py).
It needs g++ with C++20 and the CUDA headers (for the bf16/fp16 types), as the extension's build does.
"""
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
UNITS = ["rows/softmax_fwd.cu", "rows/softmax_bwd.cu", "rows/norm_fwd.cu", "rows/norm_bwd.cu", "common/error.cu"]


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    homes = [os.environ.get("CUDA_HOME"), str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"]
    return next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_bf16.h").exists()), None)


CXX = shutil.which("g++")
INCLUDE = _cuda_include()
pytestmark = pytest.mark.skipif(CXX is None or INCLUDE is None, reason="needs g++ and the CUDA headers")

LAUNCH = re.compile(r"([\w:]+(?:<[^;<>]*>)?)<<<(.*?)>>>")
EX2 = 'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));'


def emulated_source(text: str) -> str:
    """A .cu file's text with each `kernel<<<config>>>(args)` turned into `emu::launch(kernel, config)(args)` and
    the inline PTX exp2 into std::exp2."""
    return LAUNCH.sub(r"emu::launch(\1, \2)", text).replace(EX2, "y = std::exp2(x);")


def test_launch_rewrite():
    assert (emulated_source("k<T, A><<<p.rows, threads, 0, stream>>>(a);")
            == "emu::launch(k<T, A>, p.rows, threads, 0, stream)(a);")
    assert (emulated_source("kernel<<<static_cast<unsigned>(G), t, 0, s>>>(a, b);")
            == "emu::launch(kernel, static_cast<unsigned>(G), t, 0, s)(a, b);")


def test_row_kernels_match_float64_under_emulation(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    for unit in list(src.rglob("*.cu")) + list(src.rglob("*.cuh")):
        unit.write_text(emulated_source(unit.read_text()))
    assert EX2 not in (src / "common" / "device.cuh").read_text(), "the inline PTX to replace has changed"
    flags = ["-std=c++20", "-O1", "-w", f"-I{INCLUDE}", f"-I{src}", f"-I{src / 'emulate'}"]

    def compile_unit(unit):
        obj = tmp_path / (Path(unit).name + ".o")
        cmd = [CXX, *flags, "-x", "c++", "-include", str(src / "emulate" / "emu.h"), "-c", str(src / unit),
               "-o", str(obj)]
        return obj, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        built = list(pool.map(compile_unit, UNITS + ["emulate/runtime.cpp", "emulate/rows_test.cpp"]))
    for obj, proc in built:
        assert proc.returncode == 0, f"{obj.name}:\n{proc.stderr[-3000:]}"
    exe = tmp_path / "rows_test"
    link = subprocess.run([CXX, *[str(obj) for obj, _ in built], "-o", str(exe), "-lpthread"], capture_output=True,
                          text=True)
    assert link.returncode == 0, link.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.rstrip().endswith(" 0 failed"), run.stdout[-5000:] + run.stderr[-2000:]
