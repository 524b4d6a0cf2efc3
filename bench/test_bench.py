"""The benchmark suites' cases as pytest-benchmark tests: `pytest bench/ --benchmark-only` (add
`--benchmark-autosave` or `--benchmark-json=FILE` to keep them, `--benchmark-compare` to compare runs;
BENCH_QUICK=1 for the --quick grid). The project's test run (`pytest tests`) does not collect this file.

A provider that cannot run a case here (a missing kernel, OOM, no torch.compile) is skipped with the reason, as
the harness notes it; an error in one of fast_attention's own backends fails the test.
"""
import importlib
import os

import pytest
import torch

from bench import harness

MODE = harness.Mode(gpu=harness.GPU, quick=os.environ.get("BENCH_QUICK", "0") == "1")
ROUNDS = 20 if harness.GPU else 5


def _params():
    for name in harness.SUITES:
        suite = importlib.import_module(f"bench.bench_{name}").SUITE
        for case in suite.cases(MODE):
            for provider, setup in suite.providers(case).items():
                yield pytest.param(suite, case, provider, setup, id=f"{name}-{suite.label(case.params)}-{provider}")


@pytest.mark.parametrize("suite, case, provider, setup", list(_params()))
def test_bench(benchmark, suite, case, provider, setup):
    benchmark.group = f"{suite.name}: {suite.label(case.params)}"
    benchmark.extra_info.update(case.params, flops=case.flops, bytes=case.bytes, tokens=case.tokens)
    try:
        made = setup()
        fn, clear = made if isinstance(made, tuple) else (made, ())
        fn()  # compile / autotune outside the timed rounds
    except Exception as e:  # a baseline that cannot run here is skipped with the harness's reason
        if harness.ours(provider) and not isinstance(e, (harness.Skip, torch.cuda.OutOfMemoryError)):
            raise
        pytest.skip(harness._failure_note(e))

    def call():
        fn()
        harness._sync()  # GPU kernels are asynchronous: time until they finish

    benchmark.pedantic(call, setup=lambda: harness._clear(clear), rounds=ROUNDS, warmup_rounds=1)
