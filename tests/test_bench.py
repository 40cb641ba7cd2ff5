"mdxlib.bench from the outside: the quick run on CPU at tiny sizes, its JSON and Markdown, a failing check, the CLI."
import json
import math

import pytest
import torch

from mdxlib.bench import (SUITES, Case, Suite, bench_cases, bench_markdown, discover_suites, kernel_check,
                          register_suite, run_bench, write_report)
from mdxlib.kernels import KernelOp, OPS, check_op, triton_available
from mdxlib.reproduce import main

CPU = torch.device("cpu")


def _tiny_suite(name="tiny_add", broken=False):
    "A suite with a two-call case; `broken` makes its op 0.1 % off its reference."
    def check(device, quick):
        op = (lambda x: x * 2.002) if broken else (lambda x: x * 2)
        table = check_op(op, lambda x: x + x, shapes=[(3, 5)], dtypes=(torch.float32,), device=device)
        return table.assign(path="torch")

    def cases(device, quick):
        def setup(i):
            a = torch.randn(8, 8, generator=torch.Generator().manual_seed(i))
            return {"add": lambda: a + a, "mul": lambda: a * 2}
        return [Case(dict(n=8), setup, n_bytes=2 * 64 * 4)]
    return register_suite(Suite(name, check, cases, "a tiny test suite"))


@pytest.fixture
def tiny():
    yield _tiny_suite()
    SUITES.pop("tiny_add", None)


def test_discovery_finds_every_kernel():
    assert {"softmax", "masked_ce", "sparse_ffn"} <= set(discover_suites())


def test_quick_run_writes_valid_json_and_markdown(tiny, tmp_path):
    out = tmp_path / "sub" / "bench.json"
    report = run_bench(["tiny_add"], quick=True, out=out, device="cpu", inputs=8, repeats=2)
    saved = json.loads(out.read_text())
    assert saved == report and report["ok"] and report["device"] == "cpu" and report["quick"] is True
    assert {"device_name", "torch", "triton", "interpret", "kernels_run", "inputs", "repeats", "seconds",
            "suites"} <= set(report)
    entry = report["suites"]["tiny_add"]
    assert entry["check"]["status"] == "ok" and entry["check"]["rows"][0]["tensor"] == "out[0]"
    rows = entry["bench"]
    assert [r["impl"] for r in rows] == ["add", "mul"] and all(r["samples"] == 16 for r in rows)
    for r in rows:
        assert r["min_us"] <= r["q25_us"] <= r["time_us"] <= r["q75_us"] <= r["max_us"] and r["GB/s"] > 0
    assert rows[0]["speedup"] == 1.0 and "peak_MB" not in rows[0]  # CPU peak memory only when a case asks
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# mdxlib bench") and "## tiny_add" in md and "| impl" in md and "**ok**" in md
    assert not list(tmp_path.rglob("*.tmp"))  # written through a rename, nothing left behind


def test_a_broken_op_fails_its_check(tmp_path):
    _tiny_suite("tiny_broken", broken=True)
    try:
        report = run_bench(["tiny_broken"], quick=True, device="cpu", inputs=1, repeats=1)
    finally:
        SUITES.pop("tiny_broken")
    check = report["suites"]["tiny_broken"]["check"]
    assert check["status"] == "failed" and "out of tolerance" in check["error"] and not report["ok"]
    assert report["suites"]["tiny_broken"]["bench"]  # the benchmark still ran
    assert "**FAILED**" in bench_markdown(report)


def test_a_broken_kernel_path_is_caught_by_kernel_check():
    broken = KernelOp("broken_double", lambda x: x + x, lambda x: x * 2.01)
    try:
        if triton_available(CPU):  # the "triton" path runs here (interpreter on): it must be compared too
            with pytest.raises(AssertionError, match="out of tolerance"):
                kernel_check(broken, lambda x: 2 * x, CPU, [(2, 3)], (torch.float32,))
        else:
            assert set(kernel_check(broken, lambda x: 2 * x, CPU, [(2, 3)], (torch.float32,)).path) == {"torch"}
    finally:
        del OPS["broken_double"]


def test_every_kernel_check_passes_on_cpu_at_quick_sizes():
    report = run_bench(["softmax", "masked_ce"], quick=True, device="cpu", inputs=1, repeats=1)
    for name in ("softmax", "masked_ce"):
        check = report["suites"][name]["check"]
        assert check["status"] == "ok", check.get("error")
        assert {r["dtype"] for r in check["rows"]} == {"float32", "float16", "bfloat16"}
        assert any(r["tensor"].startswith("grad") for r in check["rows"])  # gradients compared, not only outputs
    rows = report["suites"]["masked_ce"]["bench"]
    assert {r["masked"] for r in rows} == {0.15, 0.5, 0.85}
    assert {r["impl"] for r in rows} == {"torch full", "masked_ce", "masked_ce inplace"}  # no torch.compile on CPU
    peak = {r["impl"]: r["peak_MB"] for r in rows if r["masked"] == 0.5}  # CPU peak memory, asked for by the cases
    assert peak["masked_ce inplace"] < peak["torch full"]  # the gradient lives in the logits buffer


def test_bench_cases_and_bad_arguments(tiny):
    table = bench_cases(tiny.cases(CPU, True), CPU, inputs=2, repeats=1, warmup=0)
    assert list(table.columns[:2]) == ["n", "impl"] and math.isclose(table.speedup.iloc[0], 1.0)
    with pytest.raises(ValueError, match="baseline"):
        bench_cases([Case({}, tiny.cases(CPU, True)[0].setup, baseline="dense")], CPU, inputs=1, repeats=1)
    with pytest.raises(ValueError, match="only must name suites"):
        run_bench(["no_such_kernel"])
    with pytest.raises(ValueError, match="repeats"):
        run_bench(["tiny_add"], repeats=0)
    with pytest.raises(TypeError, match="Suite"):
        register_suite("tiny_add")


def test_write_report_and_cli_exit_code(tiny, tmp_path, capsys):
    empty = {"device": "cpu", "device_name": "x", "torch": "t", "triton": None, "interpret": True, "inputs": 1,
             "repeats": 1, "seconds": 0.0, "quick": True, "suites": {}}
    path, md = write_report(empty, tmp_path / "r.json")
    assert json.loads(path.read_text())["suites"] == {} and md.exists()
    assert main(["bench", "--only", "tiny_add", "--quick", "--out", str(tmp_path / "cli.json")]) == 0
    assert "## tiny_add" in capsys.readouterr().out and (tmp_path / "cli.md").exists()
    _tiny_suite("tiny_broken", broken=True)
    try:
        assert main(["bench", "--only", "tiny_broken", "--quick", "--out", str(tmp_path / "bad.json")]) == 1
    finally:
        SUITES.pop("tiny_broken")


def test_cpu_peak_memory_on_request():
    "Peak resident memory of one call on CPU: a 4 MB copy is seen, a view is not; absent unless asked for."
    from mdxlib.kernels import bench, cpu_peak_supported
    big = torch.randn(1024, 1024)
    calls = {"copy": lambda: big.clone(), "view": lambda: big.view(-1)}
    assert "peak_MB" not in bench(calls, "cpu", repeats=1)
    table = bench(calls, "cpu", repeats=1, cpu_memory=True)
    if not cpu_peak_supported():
        assert table.peak_MB.isna().all()
        return
    assert 3.5 < table.loc["copy", "peak_MB"] < 4.5 and table.loc["view", "peak_MB"] < 0.5
