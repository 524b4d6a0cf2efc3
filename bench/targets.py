"""The issues' speed targets judged from a results folder, so a GPU run's verdict is read off, not eyeballed.

`python -m bench.targets [DIR ...]` (default: every GPU run under bench/results/, oldest first, the newest last)
prints, per target, how many cases it covers, the worst ratio (and its case), the median, and MET / MISSED / not
measured. A run is a folder of suite JSONs; its graphs/ subfolder (the same session's --cuda-graphs run) stands in
for the suites it holds, as the decoding target is about the kernels without the host's launch path. The ratio is a
speed-up (baseline median time / ours) or, for the bandwidth targets, the fraction of the copy bandwidth measured
in the same run. It reports and never fails: exit status 0 whatever the verdicts.

Each attention, decoding and CUDA row-op target is judged twice: on the median time, and on the kernels alone
(`kernel_us`, the profiler's device time, ours and the baseline's). Where the host's launch path takes longer than
the kernels, the first measures that path (and whatever else kept the CPU busy during the run); the issues' bars are
about the kernels.
"""
from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"
ROW_SUITES = {"softmax": "torch.softmax", "layernorm": "torch F.layer_norm", "rmsnorm": "torch F.rms_norm"}


@dataclass(frozen=True)
class Target:
    issue: str
    what: str
    suites: tuple[str, ...]
    ours: str                             # the provider judged
    baseline: str | None                  # provider name, "sdpa" (the fastest torch.sdpa kernel), or None: bandwidth
    threshold: float
    select: Callable[[dict], bool]        # which cases (by params) the target covers
    fraction: str = "fraction"            # bandwidth targets: the row's key for its fraction of the copy rate
    time: str = "ms"                      # speed-up targets: the row's key for its time ("kernel_us": kernels alone)


def _attention_grid(direction: str) -> Callable[[dict], bool]:
    return lambda p: (p.get("direction") == direction and p.get("dtype") == "bfloat16" and p.get("D") in (64, 128)
                      and 1024 <= p.get("L", 0) <= 16384)


def _rows(direction: str) -> Callable[[dict], bool]:
    return lambda p: p.get("direction") == direction and 1024 <= p.get("N", 0) <= 16384


ATTENTION = [("#3", "Triton attention forward >= 1.0x torch SDPA flash", "fa:triton", 1.0, "forward"),
             ("#3", "Triton attention backward >= 0.9x torch SDPA flash", "fa:triton", 0.9, "backward"),
             ("#4", "CUDA attention forward >= 0.8x torch SDPA flash", "fa:cuda", 0.8, "forward")]
ALONE = ", kernels alone"

TARGETS = [
    *[Target(issue, what, ("attention",), ours, "torch.sdpa[flash]", bar, _attention_grid(d))
      for issue, what, ours, bar, d in ATTENTION],
    *[Target(issue, what + ALONE, ("attention",), ours, "torch.sdpa[flash]", bar, _attention_grid(d),
             time="kernel_us") for issue, what, ours, bar, d in ATTENTION],
    *[Target("#3", f"Triton decoding >= 1.0x torch SDPA (its fastest kernel){alone}", ("decoding",), "fa:triton",
             "sdpa", 1.0, lambda p: True, time=time) for alone, time in (("", "ms"), (ALONE, "kernel_us"))],
    *[Target("#4", f"CUDA {suite} {d} >= 85% of copy bandwidth", (suite,), "fa:cuda", None, 0.85, _rows(d))
      for suite in ROW_SUITES for d in ("forward", "backward")],
    *[Target("#4", f"CUDA {suite} {d} >= 85% of copy bandwidth{ALONE}", (suite,), "fa:cuda", None, 0.85,
             _rows(d), fraction="kernel_fraction") for suite in ROW_SUITES for d in ("forward", "backward")],
    *[Target("#4", f"CUDA {suite} {d} faster than {ROW_SUITES[suite]}{alone}", (suite,), "fa:cuda",
             ROW_SUITES[suite], 1.0, _rows(d), time=time)
      for alone, time in (("", "ms"), (ALONE, "kernel_us")) for suite in ROW_SUITES for d in ("forward", "backward")],
]


KERNEL_BOUND_MS = 1.0  # harness.HOST_BELOW_MS: from this median on, the harness runs no profiler


def _time(row: dict, key: str) -> float | None:
    """A row's time by key; for "kernel_us", the profiler's device time, or the median where the harness ran no
    profiler (a call of KERNEL_BOUND_MS or more, where the launch path cannot show)."""
    if key == "kernel_us" and not row.get("kernel_us") and (row.get("ms") or 0) >= KERNEL_BOUND_MS:
        return row["ms"] * 1e3
    return row.get(key)


def _ratios(target: Target, results: dict[str, dict]) -> list[tuple[float, str]]:
    """(ratio, case) for every case of the target that both sides measured."""
    out = []
    for suite in target.suites:
        rows = results.get(suite, {}).get("results", [])
        by_case: dict[str, dict[str, dict]] = {}
        for r in rows:
            if r.get("ms") and target.select(r["params"]):
                by_case.setdefault(r["case"], {})[r["provider"]] = r
        for case, providers in by_case.items():
            ours = providers.get(target.ours)
            if ours is None:
                continue
            if target.baseline is None:
                if ours.get(target.fraction) is not None:
                    out.append((ours[target.fraction], case))
                continue
            if target.baseline == "sdpa":
                base = [_time(r, target.time) for p, r in providers.items() if p.startswith("torch.sdpa[")]
                base_time = min((t for t in base if t), default=None)
            else:
                base_time = _time(providers.get(target.baseline, {}), target.time)
            ours_time = _time(ours, target.time)
            if base_time and ours_time:
                out.append((base_time / ours_time, case))
    return out


def judge(results: dict[str, dict]) -> list[dict]:
    """One verdict per target from {suite: its JSON}."""
    verdicts = []
    for t in TARGETS:
        ratios = _ratios(t, results)
        row = {"issue": t.issue, "target": t.what, "cases": len(ratios)}
        if ratios:
            worst, case = min(ratios)
            row.update(worst=worst, worst_case=case, median=statistics.median(r for r, _ in ratios),
                       verdict="MET" if worst >= t.threshold else "MISSED")
        else:
            row.update(verdict="not measured")
        verdicts.append(row)
    return verdicts


SUITES = ("attention", "variants", "decoding", "softmax", "layernorm", "rmsnorm", "model")


def load(folder: Path) -> dict[str, dict]:
    """{suite: its JSON} of a run folder, those of its graphs/ subfolder in place of the eager ones."""
    paths = {p.stem: p for p in sorted(folder.glob("*.json")) if p.stem in SUITES}
    paths.update({p.stem: p for p in sorted((folder / "graphs").glob("*.json")) if p.stem in SUITES})
    return {suite: json.loads(path.read_text()) for suite, path in paths.items()}


def runs(root: Path = RESULTS) -> list[Path]:
    """The GPU runs under root: folders holding suite JSONs (not cpu/, and graphs/ goes with its run), by date."""
    found = [d for d in [root, *root.rglob("*")] if d.is_dir() and d.name != "graphs"
             and "cpu" not in d.relative_to(root).parts and any((d / f"{s}.json").exists() for s in SUITES)]
    return sorted(found, key=lambda d: (_date(load(d)), str(d)))


def _date(results: dict[str, dict]) -> str:
    return min((r.get("env", {}).get("date") or "" for r in results.values()), default="")


def markdown(folder: Path, verdicts: list[dict], results: dict[str, dict] | None = None) -> str:
    env = next(iter((results or {}).values()), {}).get("env", {})
    run = f" ({env.get('gpu')}, commit {str(env.get('git_commit'))[:10]}, {env.get('date')})" if env else ""
    lines = [f"Targets judged from `{folder}`{run}:", "",
             "| issue | target | cases | worst (case) | median | verdict |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        worst = f"{v['worst']:.2f} ({v['worst_case']})" if "worst" in v else ""
        median = f"{v['median']:.2f}" if "median" in v else ""
        lines.append(f"| {v['issue']} | {v['target']} | {v['cases']} | {worst} | {median} | {v['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folders = [Path(a) for a in args] or runs()
    if not folders:
        print(f"no GPU results under {RESULTS} yet: run the benchmark suites on a GPU first")
    for folder in folders:
        results = load(folder)
        if not results:
            print(f"{folder}: no suite results ({', '.join(s + '.json' for s in SUITES)}) here\n")
            continue
        print(markdown(folder, judge(results), results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
