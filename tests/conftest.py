"""Test setup: Triton's interpreter on machines without a GPU, and the `backend` / `device` fixtures."""
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported (fast_attention imports it), so the Triton backend runs on the CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, autotuning would benchmark (and first compile) every config of a kernel for each new shape bucket and
# flag set the suite meets: many minutes of compiling. The tests check each kernel with its first config that
# fits; test_autotuned_gpu turns autotuning back on, and FAST_ATTENTION_AUTOTUNE=1 runs everything with it.
os.environ.setdefault("FAST_ATTENTION_AUTOTUNE", "0")
# torch.compile keeps compiled graphs across processes (/tmp/torchinductor_<user>), keyed on the traced graph but not
# on our ops' fake kernels: a graph compiled against another checkout's ops, whose outputs had other shapes, would be
# reused and fail its shape asserts. Each test session compiles into a directory of its own.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fast_attention-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import pytest  # noqa: E402

import fast_attention as fa  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = torch.cuda.is_available()


def pytest_report_header(config):
    return f"fast_attention backends: {fa.available_backends()} on {DEVICE}"


@pytest.fixture(params=fa.available_backends())
def backend(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test run with backend=X that asks X for something X does not implement (the CUDA kernels take no
    float32 or head dim 256, say) gets NotImplementedError naming X and the reason, by design: report
    it as skipped with that reason, so the shared tests can run every backend on a GPU. Any other error fails."""
    outcome = yield
    report = outcome.get_result()
    backend = getattr(item, "callspec", None) and item.callspec.params.get("backend")
    if (call.when == "call" and backend and call.excinfo is not None
            and call.excinfo.errisinstance(NotImplementedError)
            and f"backend={backend!r} cannot run this call" in str(call.excinfo.value)):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs every run; the seed is printed so a failure can be replayed.
    seed = int(os.environ.get("FA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"torch.manual_seed({seed}); replay with FA_TEST_SEED={seed}")  # shown with a failure
    yield seed


@pytest.fixture
def fresh_python():
    """run(code, timeout) -> exit code and stderr tail of `code` (dedented) in a fresh Python process that imports
    this checkout's fast_attention, with this process's environment (TRITON_INTERPRET included)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}

    def run(code: str, timeout: float) -> tuple[int, str]:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                                text=True, timeout=timeout)
        return result.returncode, result.stderr[-3000:]
    return run
