"""The one benchmark harness. A suite (bench/bench_<slice>.py) only says WHAT to run: its cases (shapes), a setup
function per provider that returns the callable to time, and small correctness checks. The harness does the rest:
timing, metrics against limits it measures itself, the terminal table, JSON, markdown and plots.

Timing: on a GPU, triton.testing.do_bench (warm-up, L2 flush, median of many runs); on the CPU,
time.perf_counter around each call after a warm-up, median of the repeats. Peak memory is
torch.cuda.max_memory_allocated during one call (inputs and saved tensors included), GPU only.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

GPU = torch.cuda.is_available()
if not GPU:
    # Must be set before triton is imported (fast_attention imports it): the Triton backend then runs, slowly but
    # exactly, on the CPU, which is what the CPU suite's correctness checks need.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fast_attention as fa  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = "cuda" if GPU else "cpu"
INTERPRETED = not GPU  # Triton's interpreter: correct, but its speed means nothing

ATTENTION_FLOPS = ("attention FLOPs: forward 4*B*H*Lq*Lk*D (causal: half when Lq = Lk, the top-left triangle's "
                   "cells otherwise), backward 2.5x forward, forward+backward 3.5x forward")
ROW_BYTES = ("bytes: each user-visible input read once and each output written once (x, weight, bias, dy in; "
             "y, dx, dweight, dbias out); the M-sized fp32 statistics are not counted")


class Skip(Exception):
    """Raised by a setup function when its provider cannot run this case here; the message says why."""


@dataclass
class Mode:
    gpu: bool
    quick: bool
    checks: bool = True        # run the suite's correctness checks before timing
    exclude: str | None = None  # a regular expression: providers whose name it matches are not timed
    cases: str | None = None    # a regular expression: only the cases whose label it matches are timed
    graphs: bool = False       # time forward calls as CUDA-graph replays (GPU only)


@dataclass
class Case:
    """One measurement point. params name it (and feed the table, the plots and the JSON); the work it does gives
    the rates: flops -> TFLOP/s, bytes -> GB/s, tokens -> tokens/s."""
    params: dict
    flops: float | None = None
    bytes: float | None = None
    tokens: int | None = None
    backward: bool = False  # the timed call runs a backward pass itself (a training step): --cuda-graphs skips it


@dataclass
class Check:
    """A correctness check: run(backend) returns [(what, ours, torch_same_dtype, reference_float64), ...]."""
    label: str
    run: Callable[[str], list]


@dataclass
class Suite:
    name: str
    title: str
    metric: str                         # "TFLOP/s", "GB/s" or "tokens/s": the plotted and summarized rate
    convention: str                     # how flops / bytes / tokens are counted, printed with the results
    label: Callable[[dict], str]        # a case's short name in the table
    cases: Callable[[Mode], list]       # -> [Case]
    providers: Callable[[Case], dict]   # -> {name: setup}; setup() -> fn or (fn, tensors whose .grad to clear)
    checks: Callable[[Mode], list] = lambda mode: []  # -> [Check]
    x: str | None = None                # the param on the plot's x axis
    panels: tuple = ()                  # params that split the plot into panels
    notes: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------
# Providers: the names of our kernels, and helpers the suites share.
# ------------------------------------------------------------------------------------------------------------
def timed_backends() -> list[str]:
    """Backends whose speed means something here: under the Triton interpreter only the checks run Triton."""
    return [b for b in fa.available_backends() if not (b == "triton" and INTERPRETED)]


def ours(provider: str) -> bool:
    """Our kernels, alone or under torch.compile ("fa:triton + torch.compile(model)"); not the reference."""
    return provider.startswith("fa:") and not provider.startswith("fa:reference")


def directed(direction: str, forward: Callable, leaves) -> tuple:
    """The callable to time for one direction of `forward` (a zero-argument function of `leaves`, which require
    grad). forward: inference under no_grad; backward: replays one saved graph (retain_graph), so only backward
    kernels are timed; forward+backward: both."""
    leaves = [t for t in leaves if t.requires_grad]
    if direction == "forward":
        def run():
            with torch.no_grad():
                return forward()
        return run, ()
    saved = forward()
    grad = torch.randn_like(saved)
    if direction == "backward":
        return (lambda: saved.backward(grad, retain_graph=True)), leaves
    return (lambda: forward().backward(grad)), leaves


_compiled: dict = {}


def compiled(fn: Callable) -> Callable:
    """fn under torch.compile, compiled once for all shapes (dynamic=True), so a suite does not pay one
    compilation per case nor hit dynamo's recompile limit."""
    if fn not in _compiled:
        import torch._functorch.config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            # Donated buffers forbid backward(retain_graph=True), which the backward-only timing replays.
            functorch_config.donated_buffer = False
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


def optional_import(module: str):
    """The module, or None when it is not installed (flash-attn, xformers, Liger are optional baselines)."""
    try:
        return importlib.import_module(module)
    except Exception:  # ImportError, or a broken install raising at import: either way, no baseline
        return None


def triplets(ours_fn: Callable, torch_fn: Callable, ref_fn: Callable, inputs: dict, grad: bool = True) -> list:
    """Forward output and input gradients of three implementations of one op, for a Check.

    inputs: {name: tensor in the dtype under test}. ours_fn/torch_fn get fresh leaf copies of them, ref_fn gets
    float64 copies. Returns [(what, ours, torch_same_dtype, reference_float64), ...]."""
    runs = []
    for fn, dtype in ((ours_fn, None), (torch_fn, None), (ref_fn, torch.float64)):
        leaves = {}
        for name, t in inputs.items():
            float_input = t.is_floating_point()
            t = t.detach().to(dtype) if dtype and float_input else t.detach().clone()
            leaves[name] = t.requires_grad_(grad and float_input)
        runs.append((fn(**leaves), leaves))
    results = [("output", runs[0][0], runs[1][0], runs[2][0])]
    if grad:
        names = [name for name, t in inputs.items() if t.is_floating_point()]
        dout = torch.randn_like(runs[2][0])
        grads = [torch.autograd.grad(out, [leaves[n] for n in names], dout.to(out.dtype)) for out, leaves in runs]
        results += [(f"grad {n}", grads[0][i], grads[1][i], grads[2][i]) for i, n in enumerate(names)]
    return results


# ------------------------------------------------------------------------------------------------------------
# Timing and the device's limits.
# ------------------------------------------------------------------------------------------------------------
def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def time_ms(fn: Callable, clear=(), quick: bool = False) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of fn(), after a warm-up call."""
    if GPU:
        import triton.testing
        warmup, rep = (10, 40) if quick else (25, 100)
        med, lo, hi = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=list(clear) or None,
                                              quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    budget = 0.05 if quick else 0.12  # the CPU figures are indicative; the CPU suite must stay short
    _clear(clear)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 200):
        _clear(clear)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


HOST_CALLS = 20
HOST_BELOW_MS = 1.0  # past this much device time per call the host's share cannot show; not measured there


def host_us(fn: Callable, clear=()) -> float:
    """Microseconds of host (CPU) time per call of fn: HOST_CALLS calls queued back to back without waiting for
    the device, then one sync. When this passes the device time, the GPU waits on the launch path (Python,
    argument checks, dispatch, kernel launches) and the median time measures that path, not the kernels."""
    _sync()
    start = time.perf_counter()
    for _ in range(HOST_CALLS):
        _clear(clear)
        fn()
    seconds = time.perf_counter() - start
    _sync()
    return seconds / HOST_CALLS * 1e6


def device_us(fn: Callable, clear=()) -> float | None:
    """Microseconds of device time per call of fn: the summed durations of the kernels, memsets and copies its
    HOST_CALLS calls put on the GPU, from torch.profiler. Unlike the median, this leaves out the time the GPU
    idles while it waits on the launch path: the kernels' own speed. None when the profiler saw no device work."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(HOST_CALLS):
            _clear(clear)
            fn()
        _sync()
    spans = [e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA]
    return sum(spans) / HOST_CALLS if spans else None


def measure_limits(quick: bool) -> dict:
    """What this device reaches on the two things every kernel is bound by, measured now: a large copy (bytes
    read + written per second) and a large matmul (bf16 on a GPU, fp32 on the CPU)."""
    if GPU:
        n_bytes, n, dtype = 2**30, 8192, torch.bfloat16
    else:
        n_bytes, n, dtype = 2**26, 1024, torch.float32
    copy_ms = _time_binary(torch.Tensor.copy_, torch.empty(n_bytes, dtype=torch.uint8, device=DEVICE),
                           torch.empty(n_bytes, dtype=torch.uint8, device=DEVICE).random_(), quick)
    mm_ms = _time_binary(torch.matmul, torch.randn(n, n, dtype=dtype, device=DEVICE),
                         torch.randn(n, n, dtype=dtype, device=DEVICE), quick)
    _release()
    return {
        "copy GB/s": 2 * n_bytes / copy_ms / 1e6,
        "copy": f"{n_bytes // 2**20} MiB device-to-device copy_ (read + write)",
        "matmul TFLOP/s": 2 * n**3 / mm_ms / 1e9,
        "matmul": f"torch.matmul {str(dtype).removeprefix('torch.')} {n}x{n}x{n}",
    }


def _time_binary(op: Callable, a, b, quick: bool) -> float:
    return time_ms(lambda: op(a, b), quick=quick)[0]


# ------------------------------------------------------------------------------------------------------------
# Running a suite.
# ------------------------------------------------------------------------------------------------------------
def _short(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return (text[:157] + "...") if len(text) > 160 else text


def _failure_note(e: BaseException) -> str:
    if isinstance(e, Skip):
        return str(e)
    if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
        return "OOM"
    if isinstance(e, NotImplementedError):
        return "unsupported: " + _short(e)
    return f"error: {type(e).__name__}: {_short(e)}"


def _release() -> None:
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


def graphed(fn: Callable) -> Callable:
    """fn captured once in a CUDA graph; returns its replay. Warmed up first on a side stream (compilation,
    autotuning and allocations happen outside the capture), as torch.cuda.graphs asks. A replay launches the
    recorded kernels with none of the host work around them: what a serving engine's decoding step pays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(setup: Callable, case: Case, limits: dict, quick: bool, graphs: bool = False) -> dict:
    """Time one provider on one case; never raises: a failure becomes the row's note."""
    row: dict = {"ms": None}
    try:
        made = setup()
        fn, clear = made if isinstance(made, tuple) else (made, ())
        if graphs:
            if clear or case.backward:
                raise Skip("skipped: --cuda-graphs times forward calls only (a replayed backward would accumulate "
                           "into the same gradients)")
            fn = graphed(fn)
        _clear(clear)
        fn()  # compiles, autotunes, and shows failures before timing
        _sync()
        if GPU:
            _clear(clear)
            torch.cuda.reset_peak_memory_stats()
            fn()
            _sync()
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["ms"], row["p20_ms"], row["p80_ms"] = time_ms(fn, clear, quick)
        if GPU and row["ms"] < HOST_BELOW_MS:
            row["host_us"] = host_us(fn, clear)
            try:
                row["kernel_us"] = device_us(fn, clear)
            except Exception as e:  # a side measure: the profiler failing costs this column, not the row
                row["kernel_error"] = _short(e)
    except Exception as e:  # every failure is reported in the table, never raised: the other rows still run
        row["note"] = _failure_note(e)
        return row
    finally:
        made = fn = clear = None
        _release()
    seconds = row["ms"] / 1e3
    if case.flops:
        row["tflops"] = case.flops / seconds / 1e12
    if case.bytes:
        row["gbs"] = case.bytes / seconds / 1e9
    if case.tokens:
        row["tokens_per_s"] = case.tokens / seconds
    if case.bytes and row.get("kernel_us"):
        row["kernel_fraction"] = case.bytes / (row["kernel_us"] * 1e3) / limits["copy GB/s"]
    if "tflops" in row and not case.bytes:
        row["fraction"] = row["tflops"] / limits["matmul TFLOP/s"]
    elif "gbs" in row:
        row["fraction"] = row["gbs"] / limits["copy GB/s"]
    return row


def run_checks(suite: Suite, mode: Mode) -> list[dict]:
    """Each available backend against torch in the same dtype and the float64 reference, under the project's one
    tolerance rule (tests/tolerance.py). A backend that declines a case (NotImplementedError) is reported, not
    failed. The Triton attention kernels run their first fitting config, as in the tests: autotuning each small
    odd shape would compile every config of every kernel for numbers nobody reads."""
    assert_close = _tolerance().assert_close
    rows = []
    with _autotuning_off():
        for check in suite.checks(mode):
            rows += _run_check(check, assert_close)
    return rows


def _autotuning_off():
    """The Triton attention launchers take their first fitting config inside the block."""
    attention = sys.modules.get("fast_attention.kernels.attention")
    return contextlib.nullcontext() if attention is None else mock.patch.object(attention, "AUTOTUNE", False)


def _run_check(check: Check, assert_close) -> list[dict]:
    rows = []
    for backend in fa.available_backends():
        row = {"check": check.label, "backend": backend}
        try:
            worst = 0.0
            for what, ours_t, torch_t, ref_t in check.run(backend):
                assert_close(ours_t, torch_t, ref_t, name=what)
                error = (ours_t.double().cpu() - ref_t.double().cpu()).abs().nan_to_num(0.0)
                worst = max(worst, error.max().item() if error.numel() else 0.0)
            row.update(result="PASS", detail=f"max |err| {worst:.2e}")
        except NotImplementedError as e:
            row.update(result="n/a", detail=_short(e))
        except AssertionError as e:  # the tolerance rule's verdict, reported as FAIL
            row.update(result="FAIL", detail=_short(e))
        except Exception as e:  # a crash is a failure too
            row.update(result="FAIL", detail=f"{type(e).__name__}: {_short(e)}")
        rows.append(row)
    return rows


def _tolerance():
    """tests/tolerance.py, loaded by path: it is the project's one tolerance rule and tests/ is no package."""
    spec = importlib.util.spec_from_file_location("fast_attention_tolerance", REPO / "tests" / "tolerance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_suite(suite: Suite, mode: Mode, limits: dict, out: Path, progress: bool = True) -> dict:
    """Checks, then every (case, provider) pair; the JSON is rewritten after each case, so a run cut short still
    leaves its results."""
    result = {"suite": suite.name, "title": suite.title, "metric": suite.metric, "convention": suite.convention,
              "notes": list(suite.notes), "env": environment(), "limits": limits, "mode": vars(mode).copy(),
              "checks": [], "results": [], "complete": False}
    if not mode.gpu:
        result["notes"].append("CPU run: GPU figures need a GPU. Triton runs under its interpreter here, so it is "
                               "checked for correctness but not timed; the timings compare the reference backend "
                               "with torch on the CPU.")
    if mode.graphs:
        result["notes"].append("Timed as CUDA-graph replays (--cuda-graphs): the kernels without the host's launch "
                               "path; backward cases skipped.")
    if mode.checks:
        result["checks"] = run_checks(suite, mode)
    else:
        result["notes"].append("Correctness checks not run with this timing run (--no-checks).")
    cases = [case for case in suite.cases(mode)
             if not mode.cases or re.search(mode.cases, suite.label(case.params))]
    if mode.cases and not cases:
        result["notes"].append(f"--cases {mode.cases!r} matches none of this suite's cases: nothing timed.")
        print(f"{suite.name}: --cases {mode.cases!r} matches none of its cases", file=sys.stderr)
    work = [(case, name, setup) for case in cases for name, setup in suite.providers(case).items()
            if not (mode.exclude and re.search(mode.exclude, name))]
    bar = _progress(len(work), suite.name, progress)
    cpu_before, wall_before = cpu_seconds(), time.perf_counter()
    last_of_case = {id(case): i for i, (case, _, _) in enumerate(work)}
    for i, (case, name, setup) in enumerate(work):
        bar.set_postfix_str(f"{suite.label(case.params)} {name}"[:60])
        row = {"case": suite.label(case.params), "params": case.params, "provider": name,
               **measure(setup, case, limits, mode.quick, mode.graphs)}
        result["results"].append(row)
        bar.update(1)
        if last_of_case[id(case)] == i:
            _speedups(result["results"])
            result["triton_autotune"] = triton_autotune_choices()
            _save_json(result, out)
    bar.close()
    result["other_cpu_cores"] = other_cpu_cores(cpu_before, cpu_seconds(), time.perf_counter() - wall_before)
    if mode.gpu and (result["other_cpu_cores"] or 0) > BUSY_HOST_CORES:
        result["notes"].append(f"Other processes kept {result['other_cpu_cores']:.1f} CPU cores busy on average "
                               f"while this suite ran: a median whose host µs passes its kernel µs measures that "
                               f"host, and its kernel µs the kernels.")
    result["complete"] = True
    _save_json(result, out)
    return result


BUSY_HOST_CORES = 0.5  # other processes' average CPU use past which a GPU run's notes say the host was busy


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has spent busy, those of this process and its descendants), or None where
    /proc is not there (not Linux)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return (user + nice + system + irq + softirq + steal) / ticks, (
        sum(r.ru_utime + r.ru_stime for r in own) + _live_descendants_ticks() / ticks)


def _live_descendants_ticks() -> int:
    """CPU ticks of this process's descendants still running (torch.compile's compile workers, say), which
    RUSAGE_CHILDREN counts only once they have ended and been waited for."""
    parent, ticks = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:  # after the command's closing parenthesis: state ppid ... utime (12th) stime (13th)
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            parent[int(entry.name)], ticks[int(entry.name)] = int(fields[1]), int(fields[11]) + int(fields[12])
    ours, found = {os.getpid()}, True
    while found:
        found = {pid for pid, ppid in parent.items() if ppid in ours and pid not in ours}
        ours |= found
    return sum(ticks[pid] for pid in ours if pid != os.getpid())


def other_cpu_cores(before, after, wall_s: float) -> float | None:
    """The CPU cores that other processes kept busy on average over wall_s, from two cpu_seconds() readings: the
    host's share of a timing run (a busy host slows every call's launch path, torch's too)."""
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


def triton_autotune_choices() -> list[dict]:
    """The config the Triton attention autotuner kept per (kernel, dtype, length bucket, flags), with whether it
    reads through tensor descriptors (TMA): which tiles won, and whether the Hopper path paid, in this run."""
    attention = sys.modules.get("fast_attention.kernels.attention")
    if attention is None:
        return []
    names = ["kernel", "dtype", "device", "tma_possible"] + [f"{k} (pow2)" if k in ("Lq", "Lk") else k
                                                            for k in attention._TUNING_KEY]
    return [{**{n: v if isinstance(v, (bool, int)) else str(v) for n, v in zip(names, bucket)},
             **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
            for bucket, c in attention._tuned_configs.items()]


def _speedups(rows: list[dict]) -> None:
    """For every baseline row: how many times faster each of our backends is on the same case."""
    by_case: dict = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    for group in by_case.values():
        mine = {r["provider"]: r["ms"] for r in group if ours(r["provider"]) and r["ms"]}
        for r in group:
            if not ours(r["provider"]) and r["ms"]:
                r["speedup"] = {p: r["ms"] / ms for p, ms in mine.items()}


class _NoBar:
    def set_postfix_str(self, s):
        pass

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, name: str, enabled: bool):
    tqdm = optional_import("tqdm")
    if not enabled or tqdm is None:
        return _NoBar()
    return tqdm.tqdm(total=total, desc=name, unit="run", leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------------
# Environment and output.
# ------------------------------------------------------------------------------------------------------------
def device_name() -> str:
    if GPU:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:  # not Linux: the architecture will do
        pass
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def default_out() -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-") if GPU else "cpu"
    return RESULTS / slug


@functools.cache
def _git_commit() -> str:
    """HEAD, with "-dirty" when tracked files other than the results differ from it: the numbers then belong to no
    commit as such. The results are left out, since a run rewrites them (the committed bench/results/cpu/ among
    them)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except Exception:  # no git, or not a checkout: the rest of the metadata still stands
        return "unknown"


def _short_commit(commit: str) -> str:
    return commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")


def environment() -> dict:
    triton = optional_import("triton")
    return {
        "device": device_name(),
        "gpu": torch.cuda.get_device_name() if GPU else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", None),
        "fast_attention": fa.__version__,
        "backends": fa.available_backends(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _save_json(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['suite']}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


COLUMNS = ("case", "provider", "ms", "host µs", "kernel µs", "TFLOP/s", "GB/s", "tokens/s", "% peak", "peak MiB")


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """The terminal table: one row per (case, provider); baseline rows say how much faster each of ours is."""
    rows = result["results"]
    mine = sorted({r["provider"] for r in rows if ours(r["provider"])})
    used = [c for c, key in zip(COLUMNS, (None, None, "ms", "host_us", "kernel_us", "tflops", "gbs", "tokens_per_s",
                                          "fraction", "peak_mib"))
            if key is None or any(r.get(key) is not None for r in rows)]
    header = used + [f"{p.removeprefix('fa:')} x" for p in mine] + ["note"]
    body, previous = [], None
    for r in rows:
        cells = {"case": r["case"] if r["case"] != previous else "", "provider": r["provider"],
                 "ms": _fmt(r.get("ms"), 4), "host µs": _fmt(r.get("host_us")),
                 "kernel µs": _fmt(r.get("kernel_us")), "TFLOP/s": _fmt(r.get("tflops")),
                 "GB/s": _fmt(r.get("gbs")),
                 "tokens/s": _fmt(r.get("tokens_per_s")), "peak MiB": _fmt(r.get("peak_mib")),
                 "% peak": "" if r.get("fraction") is None else f"{100 * r['fraction']:.0f}%"}
        previous = r["case"]
        speed = r.get("speedup", {})
        body.append([cells[c] for c in used] + [_fmt(speed.get(p)) for p in mine] + [r.get("note", "")])
    return header, body


def print_result(result: dict) -> None:
    env, limits = result["env"], result["limits"]
    print(f"\n== {result['title']} ({result['suite']}) on {env['device']}: torch {env['torch']}, triton "
          f"{env['triton']}, CUDA {env['cuda']}, commit {_short_commit(env['git_commit'])}")
    print(f"   limits measured now: copy {limits['copy GB/s']:.1f} GB/s ({limits['copy']}), "
          f"matmul {limits['matmul TFLOP/s']:.2f} TFLOP/s ({limits['matmul']})")
    print(f"   {result['convention']}")
    for note in result["notes"]:
        print(f"   note: {note}")
    _print_checks(result["suite"], result["checks"])
    header, body = table_rows(result)
    if body:
        _print_table(f"{result['suite']}: {result['metric']}; 'x' columns = speed-up of that backend over the row",
                     header, body)


def _print_checks(suite: str, checks: list[dict]) -> None:
    if checks:
        _print_table(f"{suite}: correctness (tests/tolerance.py rule vs float64 reference)",
                     ["check", "backend", "result", "detail"],
                     [[c["check"] if i == 0 or c["check"] != checks[i - 1]["check"] else "", c["backend"],
                       c["result"], c["detail"]] for i, c in enumerate(checks)])


def _print_table(title: str, header: list[str], body: list[list[str]]) -> None:
    rich = optional_import("rich.console")
    if rich is not None:
        from rich.table import Table
        table = Table(title=title, title_justify="left", header_style="bold")
        for h in header:
            table.add_column(h, justify="left" if h in ("case", "provider", "note", "check", "backend", "detail")
                             else "right", overflow="fold")
        from rich.markup import escape
        for i, cells in enumerate(body):
            style = "red" if "FAIL" in cells else None
            last_of_group = i + 1 < len(body) and body[i + 1][0] != ""
            table.add_row(*(escape(c) for c in cells), style=style, end_section=last_of_group)
        rich.Console(width=max(160, rich.Console().width)).print(table)
        return
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for cells in body:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def write_summary(out: Path) -> Path:
    """summary.md from every suite's JSON in `out`: one table per suite, cases down, providers across."""
    lines = ["# Benchmark summary", ""]
    order = {name: i for i, name in enumerate(SUITES)}
    for path in sorted(out.glob("*.json"), key=lambda path: (order.get(path.stem, len(order)), path.stem)):
        result = json.loads(path.read_text())
        env, limits, key = result["env"], result["limits"], _metric_key(result["metric"])
        lines += [f"## {result['title']}", "",
                  f"{env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit "
                  f"`{_short_commit(env['git_commit'])}`, {env['date']}"
                  f"{'' if result['complete'] else ' (incomplete run)'}.",
                  f"Measured limits: copy {limits['copy GB/s']:.1f} GB/s, matmul {limits['matmul TFLOP/s']:.2f} "
                  f"TFLOP/s ({limits['matmul']}). {result['convention']}.", ""]
        lines += [f"- {note}" for note in result["notes"]] + ([""] if result["notes"] else [])
        checks = result["checks"]
        if checks:
            failed = [c for c in checks if c["result"] == "FAIL"]
            passed = sum(c["result"] == "PASS" for c in checks)
            lines += [f"Correctness: {passed} PASS, {len(failed)} FAIL, "
                      f"{sum(c['result'] == 'n/a' for c in checks)} n/a over {len(checks)} (check, backend) pairs."]
            lines += [f"- FAIL {c['check']} [{c['backend']}]: {c['detail']}" for c in failed]
            lines.append("")
        rows = result["results"]
        if not rows:
            continue
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        cases = list(dict.fromkeys(r["case"] for r in rows))
        cell = {(r["case"], r["provider"]): r for r in rows}
        speedup = any(ours(p) for p in providers)
        lines += [f"{result['metric']} (median time when no rate applies)"
                  + ("; last column: the fastest fast_attention backend over the fastest baseline." if speedup else
                     "."), "",
                  "| case | " + " | ".join(providers) + (" | speed-up |" if speedup else " |"),
                  "|---|" + "---|" * (len(providers) + speedup)]
        for case in cases:
            values = []
            for p in providers:
                r = cell.get((case, p), {})
                v = r.get(key) if r.get(key) is not None else (r.get("ms") and f"{_fmt(r['ms'], 4)} ms")
                values.append(_fmt(v) if isinstance(v, float) else (v or _abbrev(r.get("note", ""))))
            tail = f" | {_best_speedup(case, rows)} |" if speedup else " |"
            lines.append(f"| {case} | " + " | ".join(values) + tail)
        lines.append("")
    path = out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _metric_key(metric: str) -> str:
    return {"TFLOP/s": "tflops", "GB/s": "gbs", "tokens/s": "tokens_per_s"}[metric]


def _abbrev(note: str) -> str:
    if note.startswith("error"):
        return "error"
    if note.startswith("unsupported"):
        return "n/a"
    return note.split(":")[0][:24]


def _best_speedup(case: str, rows: list[dict]) -> str:
    group = [r for r in rows if r["case"] == case and r["ms"]]
    mine = [r["ms"] for r in group if ours(r["provider"])]
    base = [r["ms"] for r in group if not ours(r["provider"])]
    return f"{min(base) / min(mine):.2f}x" if mine and base else ""


def plot(result: dict, out: Path, x: str | None, panels: tuple) -> Path | None:
    """One PNG per suite: the suite's rate against `x`, one line per provider, one panel per value of `panels`."""
    rows = [r for r in result["results"] if r.get(_metric_key(result["metric"])) is not None]
    if x is None or not rows:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    key = _metric_key(result["metric"])
    groups = list(dict.fromkeys(tuple(r["params"][p] for p in panels) for r in rows))
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    # One colour per provider in every panel, and one legend entry each, whichever panels it appears in.
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colours = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    lines = {}
    for ax, group in zip(axes.flat, groups):
        sub = [r for r in rows if tuple(r["params"][p] for p in panels) == group]
        for provider in dict.fromkeys(r["provider"] for r in sub):
            points = sorted((r["params"][x], r[key]) for r in sub if r["provider"] == provider)
            lines[provider], = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3,
                                       linewidth=2.2 if ours(provider) else 1.2, color=colours[provider])
        ax.set_xscale("log", base=2)
        ticks = sorted({r["params"][x] for r in sub})
        ax.set_xticks(ticks, [f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title(", ".join(f"{p}={v}" for p, v in zip(panels, group)), fontsize=8)
        ax.set_xlabel(x, fontsize=8)
        ax.set_ylabel(result["metric"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    labels = [p for p in providers if p in lines]
    fig.legend([lines[p] for p in labels], labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7,
               frameon=False)
    fig.suptitle(f"{result['title']} on {result['env']['device']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 6), 1, 0.96))
    path = out / f"{result['suite']}.png"
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path


def _pyplot():
    matplotlib = optional_import("matplotlib")
    if matplotlib is None:
        print("   (matplotlib is not installed: no plots; pip install -e .[bench])")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# ------------------------------------------------------------------------------------------------------------
# Grids shared by the suites, and the command line.
# ------------------------------------------------------------------------------------------------------------
DIRECTIONS = ("forward", "backward", "forward+backward")
SHORT = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}


ROW_ELEMENTS = 2**27  # per tensor in a GPU row-op case: 256 MB in bf16, four times the H200's L2


def row_shapes(mode: Mode) -> list[tuple[int, int, torch.dtype]]:
    """(rows M, row size N, dtype) for the row ops: rows of 1k-16k elements, fp16 and bf16, on a GPU with
    ROW_ELEMENTS elements per tensor (M = ROW_ELEMENTS / N), so a call moves hundreds of MB and the kernels set
    the time, not the launch path (8192 rows of 1k bf16 are 16 MB, a few microseconds of copying, and every
    implementation measured there its launch overhead); a few small fp32 shapes on the CPU."""
    if not mode.gpu:
        return [(512, n, torch.float32) for n in (256, 1024, 4096)]
    sizes = (1024, 4096, 16384) if mode.quick else (1024, 2048, 4096, 8192, 16384)
    dtypes = (torch.bfloat16,) if mode.quick else (torch.bfloat16, torch.float16)
    return [(ROW_ELEMENTS // n, n, dtype) for dtype in dtypes for n in sizes]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SUITES = ("attention", "variants", "decoding", "softmax", "layernorm", "rmsnorm", "model")


def _checks_only(names, mode: Mode) -> int:
    failed = []
    for name in names:
        suite = importlib.import_module(f"bench.bench_{name}").SUITE
        checks = run_checks(suite, mode)
        _print_checks(name, checks)
        failed += [f"{name}: {c['check']} [{c['backend']}]" for c in checks if c["result"] == "FAIL"]
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED:\n  " + "\n  ".join(failed))
    return 1 if failed else 0


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="all", choices=("all",) + SUITES, help="which slice to run (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter timing, and on a GPU fewer shapes (the CPU suite is small already)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/<gpu-name> or bench/results/cpu)")
    parser.add_argument("--no-plots", action="store_true", help="skip the matplotlib PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.add_argument("--checks-only", action="store_true",
                        help="only each suite's correctness checks of every backend, no timing and no files: a "
                             "smoke test (a minute on a GPU)")
    parser.add_argument("--no-checks", action="store_true",
                        help="time without running the correctness checks first (after a --checks-only run)")
    parser.add_argument("--exclude", metavar="REGEX", default=None,
                        help="skip the providers whose name matches, e.g. 'compile|need_weights=True'")
    parser.add_argument("--cases", metavar="REGEX", default=None,
                        help="time only the cases whose label matches, e.g. '^fwd D' (attention forward only)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="GPU: time each forward call as a CUDA-graph replay, without the host's launch path "
                             "(backward cases are skipped); use with --out, apart from the eager results")
    args = parser.parse_args(argv)
    out = args.out or default_out()
    if args.cuda_graphs and not GPU:
        parser.error("--cuda-graphs needs a GPU")
    for option, pattern in (("--exclude", args.exclude), ("--cases", args.cases)):
        try:
            re.compile(pattern or "")
        except re.error as e:
            parser.error(f"{option} {pattern!r} is not a regular expression: {e}")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    mode = Mode(gpu=GPU, quick=args.quick, checks=not args.no_checks, exclude=args.exclude, cases=args.cases,
                graphs=args.cuda_graphs)
    names = SUITES if args.suite == "all" else (args.suite,)
    print(f"fast_attention benchmarks on {device_name()}: backends {fa.available_backends()}, "
          f"torch {torch.__version__}")
    if args.checks_only:
        return _checks_only(names, mode)
    if not GPU:
        print("No GPU here: running the small CPU suite (correctness of every backend, Triton under its interpreter, "
              "and reference/torch timings on the CPU). GPU figures need a GPU: run this again on one.")
        # One thread: on a small shared machine, torch's threads wait on each other whenever another process takes
        # a core, and the medians then measure the neighbours rather than the code.
        torch.set_num_threads(1)
    limits = measure_limits(args.quick)
    failed = []
    for name in names:
        suite = importlib.import_module(f"bench.bench_{name}").SUITE
        start = time.perf_counter()
        result = run_suite(suite, mode, limits, out, progress=not args.no_progress)
        print_result(result)
        print(f"   {name}: {time.perf_counter() - start:.0f} s")
        if not args.no_plots:
            png = plot(result, out, suite.x, suite.panels)
            if png:
                print(f"   plot: {png}")
        failed += [f"{name}: {c['check']} [{c['backend']}]" for c in result["checks"] if c["result"] == "FAIL"]
    print(f"\nresults: {out}/ (JSON per suite), summary: {write_summary(out)}")
    if failed:
        print(f"{len(failed)} correctness check(s) FAILED:\n  " + "\n  ".join(failed))
        return 1
    return 0
