"""The benchmark tools a GPU session leans on: bench/targets.py, which judges the issues' speed targets from
results JSON (its arithmetic and case selection, on made-up rows: the real figures need a GPU), and
`python -m bench --checks-only`."""
import random

from bench import targets


def _row(case, provider, ms, **params):
    return {"case": case, "provider": provider, "ms": ms, "params": params}


def _attention(triton_ms, flash_ms, **overrides):
    params = dict(direction="forward", dtype="bfloat16", D=128, causal=False, L=4096)
    params.update(overrides)
    case = "|".join(f"{k}={v}" for k, v in params.items())
    return [_row(case, "fa:triton", triton_ms, **params), _row(case, "torch.sdpa[flash]", flash_ms, **params)]


def _verdict(results, target):
    return next(v for v in targets.judge(results) if v["target"] == target)


def test_attention_forward_worst_case_decides():
    fast = random.uniform(0.5, 0.9)
    rows = _attention(fast, 1.0, L=1024) + _attention(1.25, 1.0, L=16384)
    rows += _attention(9.0, 1.0, L=512) + _attention(9.0, 1.0, dtype="float16")  # outside the target's grid
    v = _verdict({"attention": {"results": rows}}, "Triton attention forward >= 1.0x torch SDPA flash")
    assert v["cases"] == 2 and v["verdict"] == "MISSED"
    assert abs(v["worst"] - 0.8) < 1e-12 and "L=16384" in v["worst_case"]
    assert abs(v["median"] - (0.8 + 1.0 / fast) / 2) < 1e-12

    rows = _attention(0.9, 1.0) + _attention(0.5, 0.6, L=2048)
    assert _verdict({"attention": {"results": rows}},
                    "Triton attention forward >= 1.0x torch SDPA flash")["verdict"] == "MET"


def test_backward_and_missing_providers():
    rows = _attention(1.05, 1.0, direction="backward")  # 0.95x: over the 0.9x bar
    results = {"attention": {"results": rows}}
    assert _verdict(results, "Triton attention backward >= 0.9x torch SDPA flash")["verdict"] == "MET"
    assert _verdict(results, "CUDA attention forward >= 0.8x torch SDPA flash")["verdict"] == "not measured"


def test_decoding_against_the_fastest_sdpa_kernel():
    p = dict(Lq=1, Lk=8192)
    rows = [_row("c", "fa:triton", 1.0, **p), _row("c", "torch.sdpa[flash]", 1.5, **p),
            _row("c", "torch.sdpa[efficient]", 0.9, **p), _row("c", "torch.sdpa[math]", None, **p)]
    v = _verdict({"decoding": {"results": rows}}, "Triton decoding >= 1.0x torch SDPA (its fastest kernel)")
    assert v["verdict"] == "MISSED" and abs(v["worst"] - 0.9) < 1e-12


def test_row_ops_bandwidth_and_native_baseline():
    rows = []
    for n, fraction, ours_ms in ((1024, 0.9, 1.0), (16384, 0.8, 1.0), (32768, 0.1, 9.0)):
        p = dict(direction="forward", dtype="bfloat16", M=8192, N=n)
        rows += [dict(_row(f"N{n}", "fa:cuda", ours_ms, **p), fraction=fraction),
                 _row(f"N{n}", "torch.softmax", 1.1, **p)]
    results = {"softmax": {"results": rows}}
    bandwidth = _verdict(results, "CUDA softmax forward >= 85% of copy bandwidth")
    assert bandwidth["cases"] == 2 and bandwidth["verdict"] == "MISSED" and bandwidth["worst_case"] == "N16384"
    native = _verdict(results, "CUDA softmax forward faster than torch.softmax")
    assert native["cases"] == 2 and native["verdict"] == "MET"


def test_markdown_lists_every_target(tmp_path):
    text = targets.markdown(tmp_path, targets.judge({}))
    assert text.count("not measured") == len(targets.TARGETS)


def test_checks_only_runs_every_backend_and_writes_nothing(tmp_path, capsys):
    """`python -m bench --checks-only`: the smoke test of a GPU session, correctness checks without timing."""
    from bench import harness

    assert harness.main(["--checks-only", "--suite", "softmax", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for backend in harness.fa.available_backends():
        assert backend in printed
    assert "PASS" in printed and "FAIL" not in printed and not any(tmp_path.iterdir())
