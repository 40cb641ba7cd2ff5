"mdxlib.kernels from the outside: interpret mode, dispatcher, check_op, bench, softmax kernels (interpreted on CPU)."
import functools
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from mdxlib.kernels import (BACKENDS, HAS_TRITON, OPS, TOLERANCES, TRITON_INTERPRET, KernelOp, bench, check_op,
                            choose_interpret, pick_backend, randn_inputs, softmax, softmax_bwd,
                            softmax_fwd, softmax_ref, softmax_triton, triton_available)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS_RUN = triton_available(DEVICE)
needs_kernels = pytest.mark.skipif(not KERNELS_RUN,
                                   reason="Triton kernels cannot run here (no triton, or interpret mode off on CPU)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ODD_SHAPES = [(1, 1), (1, 37), (3, 5), (2, 3, 17), (2, 130)]


# --- interpret mode: decided once at import, checked in fresh interpreters --------------------------------------

def _run(code: str, fake_gpu: bool = False, block_triton: bool = False, **env) -> dict:
    "Import mdxlib.kernels in a fresh python with `env`, run `code`, return the JSON it prints last."
    pre = ""
    if fake_gpu:  # what a GPU machine reports, without needing one
        pre += "import torch; torch.cuda.is_available = lambda: True\n"
    if block_triton:  # what a machine without triton (macOS) sees
        pre += "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
    full = pre + "import json, os, torch\nimport mdxlib.kernels as K\n" + textwrap.dedent(code)
    drop = ("TRITON_INTERPRET", "MDXLIB_TRITON_INTERPRET", "MDXLIB_BACKEND")
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(env)
    proc = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, env=environ, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


STATE = """
import subprocess, sys
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"],
                       capture_output=True, text=True).stdout.strip()
print(json.dumps(dict(interp=K.TRITON_INTERPRET, env=os.environ.get('TRITON_INTERPRET'), has=K.HAS_TRITON,
                      knob=K.triton.knobs.runtime.interpret, child=child)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the automatic choice on a machine without GPU")
def test_interpret_on_automatically_without_gpu_and_kernels_launch():
    out = _run("""
        x = torch.randn(2, 7)
        err = (K.softmax(x, backend="triton") - K.softmax_ref(x)).abs().max().item()
        print(json.dumps(dict(interp=K.TRITON_INTERPRET, env=os.environ.get('TRITON_INTERPRET'), err=err)))
    """)
    assert out["interp"] is True and out["env"] is None and out["err"] < 1e-6  # on, without touching the environment


def test_interpret_never_automatic_on_gpu_machine():
    out = _run(STATE, fake_gpu=True)
    assert out["interp"] is False and out["knob"] is False and out["env"] is None


def test_interpret_override_on_even_with_gpu():
    out = _run(STATE, fake_gpu=True, MDXLIB_TRITON_INTERPRET="1")
    assert out["interp"] is True and out["knob"] is True and out["env"] is None


@pytest.mark.skipif(not HAS_TRITON, reason="the interpreter switch exists only with triton")
def test_interpret_choice_does_not_leak_to_child_processes():
    out = _run(STATE, MDXLIB_TRITON_INTERPRET="1")  # the process interprets; a child started after the import...
    assert out["interp"] is True and out["knob"] is True
    assert out["env"] is None and out["child"] == "None"  # ...does not inherit TRITON_INTERPRET
    out = _run(STATE, MDXLIB_TRITON_INTERPRET="1", TRITON_INTERPRET="0")  # a user's own value is kept as it was
    assert out["interp"] is True and out["env"] == "0" and out["child"] == "0"


def test_interpret_override_off_on_cpu():
    out = _run("""
        x = torch.randn(2, 7)
        try:
            K.softmax(x, backend="triton"); msg = ""
        except RuntimeError as e:
            msg = str(e)
        auto_ok = torch.allclose(K.softmax(x), K.softmax_ref(x))  # auto still takes torch
        print(json.dumps(dict(interp=K.TRITON_INTERPRET, env=os.environ.get('TRITON_INTERPRET'), msg=msg,
                              auto_ok=auto_ok)))
    """, MDXLIB_TRITON_INTERPRET="0", TRITON_INTERPRET="1")
    assert out["interp"] is False and out["env"] == "1" and out["auto_ok"]  # the user's variable is left alone
    assert "MDXLIB_TRITON_INTERPRET=1" in out["msg"]


def test_bad_override_fails_at_import():
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "import mdxlib.kernels"], capture_output=True, text=True,
                          env={**environ, "MDXLIB_TRITON_INTERPRET": "sometimes"}, timeout=120)
    assert proc.returncode != 0 and "MDXLIB_TRITON_INTERPRET must be 1/0" in proc.stderr


def test_library_imports_and_works_without_triton():
    out = _run("""
        x = torch.randn(3, 5, requires_grad=True)
        y = K.softmax(x)
        y.sum().backward()
        errs = []
        try: K.softmax(x, backend="triton")
        except RuntimeError as e: errs.append(str(e))
        try: K._softmax_fwd_kernel[(1,)](x, x, 5, 5, 5, BLOCK=8)
        except RuntimeError as e: errs.append(str(e))

        @K.triton.autotune(configs=[K.triton.Config({"BLOCK": 8})], key=["n"])
        @K.triton.jit
        def _kernel(x_ptr, n, BLOCK: K.tl.constexpr): pass
        try: _kernel[(1,)](x, 3)
        except RuntimeError as e: errs.append(str(e))
        print(json.dumps(dict(has=K.HAS_TRITON, ok=torch.allclose(y, K.softmax_ref(x)), errs=errs,
                              backend=K.pick_backend("auto", x))))
    """, block_triton=True)
    assert out["has"] is False and out["ok"] and out["backend"] == "torch"
    assert len(out["errs"]) == 3 and all("triton is not installed" in e for e in out["errs"])


def test_choose_interpret_rules():
    assert choose_interpret({}, gpu=False) is True
    assert choose_interpret({}, gpu=True) is False
    assert choose_interpret({"MDXLIB_TRITON_INTERPRET": "on"}, gpu=True) is True
    assert choose_interpret({"MDXLIB_TRITON_INTERPRET": "false"}, gpu=False) is False
    assert choose_interpret({"MDXLIB_TRITON_INTERPRET": "0", "TRITON_INTERPRET": "1"}, gpu=False) is False
    assert choose_interpret({"TRITON_INTERPRET": "1"}, gpu=True) is True
    assert choose_interpret({"MDXLIB_TRITON_INTERPRET": ""}, gpu=False) is True  # empty = unset
    for var in ("MDXLIB_TRITON_INTERPRET", "TRITON_INTERPRET"):
        with pytest.raises(ValueError, match=var):
            choose_interpret({var: "2"}, gpu=False)


# --- the dispatcher --------------------------------------------------------------------------------------------

def test_pick_backend_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MDXLIB_BACKEND", raising=False)
    x = torch.zeros(2)
    assert BACKENDS == ("auto", "torch", "triton")
    assert pick_backend("auto", x) == "torch" and pick_backend(None, x) == "torch"
    assert pick_backend("torch", x) == "torch"
    assert pick_backend("auto") == "torch"  # no tensors: nothing to run a kernel on
    if HAS_TRITON and TRITON_INTERPRET:
        assert pick_backend("triton", x) == "triton"
    monkeypatch.setenv("MDXLIB_BACKEND", "torch")
    assert pick_backend(None, x) == "torch"
    monkeypatch.setenv("MDXLIB_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"\$MDXLIB_BACKEND must be one of"):
        pick_backend(None, x)
    for bad in ("cuda", "Triton", 1):
        with pytest.raises(ValueError, match="backend must be one of"):
            pick_backend(bad, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA tensors")
def test_pick_backend_on_cuda_tensors():
    x = torch.zeros(2, device="cuda")
    assert pick_backend("auto", x) == ("triton" if HAS_TRITON and not TRITON_INTERPRET else "torch")
    assert pick_backend("auto", x, torch.zeros(2)) == "torch"  # mixed devices: not all on cuda


def test_kernel_op_calls_the_chosen_path(monkeypatch):
    monkeypatch.delenv("MDXLIB_BACKEND", raising=False)
    calls = []
    op = KernelOp("_test_op", lambda x, k=1: calls.append("torch") or x * k,
                  lambda x, k=1: calls.append("triton") or x * k)
    try:
        x = torch.ones(3)
        assert torch.equal(op(x, k=2), 2 * x) and calls == ["torch"]
        op(x, backend="torch")
        assert calls[-1] == "torch"
        if HAS_TRITON and TRITON_INTERPRET:
            op(x, backend="triton")
            assert calls[-1] == "triton"
        monkeypatch.setenv("MDXLIB_BACKEND", "triton")
        if HAS_TRITON and TRITON_INTERPRET:
            op(x=x)  # tensors passed by keyword count too
            assert calls[-1] == "triton"
        assert OPS["_test_op"] is op and "_test_op" in repr(op)
    finally:
        OPS.pop("_test_op", None)
    with pytest.raises(ValueError, match="name"):
        KernelOp("", softmax_ref, softmax_triton)
    with pytest.raises(TypeError, match="callables"):
        KernelOp("x", softmax_ref, None)
    assert OPS["softmax"] is softmax
    assert triton_available("cpu") == (HAS_TRITON and TRITON_INTERPRET)


# --- check_op ----------------------------------------------------------------------------------------------------

class _WrongBackward(torch.autograd.Function):
    "Softmax with the right forward and a backward that forgets the y * (...) factor."

    @staticmethod
    def forward(ctx, x):
        y = softmax_ref(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy - (dy * y).sum(-1, keepdim=True)


def test_check_op_passes_a_correct_op_and_reports_errors():
    table = check_op(lambda x: torch.softmax(x.float(), -1).to(x.dtype), softmax_ref, shapes=[(2, 3), (4,)],
                     dtypes=DTYPES)
    assert len(table) == 2 * 3 * 2 and set(table["tensor"]) == {"out[0]", "grad[0]"}
    assert set(table["dtype"]) == {"float32", "float16", "bfloat16"}
    assert (table["max_abs_err"] <= table["atol"] + table["rtol"]).all()
    assert len(check_op(softmax_ref, softmax_ref, grad=False, shapes=[(3,)])) == 1


def test_check_op_fails_on_wrong_ops():
    with pytest.raises(AssertionError, match=r"grad of input 0 at shape \(3, 5\), dtype float32: .*max abs err"):
        check_op(_WrongBackward.apply, softmax_ref, shapes=[(3, 5)])
    with pytest.raises(AssertionError, match=r"out\[0\] at shape \(2, 7\), dtype float32.*atol 1e-05"):
        check_op(lambda x: softmax_ref(x) * (1 + 1e-3), softmax_ref, shapes=[(2, 7)], grad=False)
    # an error within bf16 tolerance passes in bf16 but fails in fp32
    off = lambda x: (softmax_ref(x).float() + 2e-3).to(x.dtype)
    check_op(off, softmax_ref, shapes=[(2, 7)], dtypes=(torch.bfloat16,), grad=False)
    with pytest.raises(AssertionError, match="float32"):
        check_op(off, softmax_ref, shapes=[(2, 7)], dtypes=(torch.float32,), grad=False)
    with pytest.raises(AssertionError, match="NaN"):
        check_op(lambda x: torch.full_like(x, math.nan), softmax_ref, grad=False)
    with pytest.raises(AssertionError, match="shape"):
        check_op(lambda x: softmax_ref(x)[..., :-1], softmax_ref, shapes=[(2, 7)], grad=False)
    with pytest.raises(AssertionError, match="dtype"):
        check_op(lambda x: softmax_ref(x).double(), softmax_ref, shapes=[(2, 7)], grad=False)
    with pytest.raises(AssertionError, match="requires_grad is False for the op"):
        check_op(lambda x: softmax_ref(x).detach(), softmax_ref, shapes=[(2, 7)])


def test_check_op_bad_arguments():
    with pytest.raises(TypeError, match="callables"):
        check_op(None, softmax_ref)
    with pytest.raises(ValueError, match="shapes and dtypes"):
        check_op(softmax_ref, softmax_ref, shapes=[])
    with pytest.raises(ValueError, match="no tolerance for dtype torch.int32"):
        check_op(softmax_ref, softmax_ref, dtypes=(torch.int32,))
    custom = check_op(softmax_ref, softmax_ref, dtypes=(torch.float32,), tol={torch.float32: dict(atol=1.0, rtol=0.0)})
    assert (custom["atol"] == 1.0).all() and TOLERANCES[torch.float32]["atol"] == 1e-5
    g = torch.Generator().manual_seed(0)
    (x,) = randn_inputs((2, 3), torch.float16, g)
    assert x.shape == (2, 3) and x.dtype == torch.float16


# --- bench -------------------------------------------------------------------------------------------------------

def test_bench_returns_a_table():
    a = torch.randn(32, 32)
    table = bench({"add": lambda: a + a, "mul": lambda: a * a}, n_bytes=3 * a.numel() * 4, warmup=1, repeats=3,
                  number=2)
    assert list(table.index) == ["add", "mul"]
    assert {"time_us", "min_us", "q25_us", "q75_us", "max_us", "samples", "GB/s"} <= set(table.columns)
    assert ("peak_MB" in table.columns) == torch.cuda.is_available()
    assert (table["time_us"] > 0).all() and (table["min_us"] <= table["time_us"]).all()
    assert (table["time_us"] <= table["max_us"]).all() and (table["samples"] == 3).all()
    assert "GB/s" not in bench({"add": lambda: a + a}, repeats=1, device="cpu").columns


def test_bench_interleaves_over_inputs():
    order, made = [], []

    def setup(i):
        made.append(i)
        return {"a": lambda: order.append("a"), "b": lambda: order.append("b")}

    table = bench(setup, inputs=8, repeats=2, warmup=0, n_bytes={"a": 1e3}, device="cpu")
    assert made == list(range(8)) and (table["samples"] == 16).all()
    assert order[:4] == ["a", "b", "b", "a"]  # A B, then B A: the order rotates from round to round
    assert math.isnan(table.loc["b", "GB/s"]) and table.loc["a", "GB/s"] > 0
    with pytest.raises(ValueError, match="setup"):
        bench(lambda i: {"a": int} if i == 0 else {"c": int}, inputs=2, repeats=1, device="cpu")


def test_bench_bad_arguments():
    with pytest.raises(TypeError, match="fns"):
        bench({})
    with pytest.raises(TypeError, match="fns"):
        bench({"x": 3})
    for kw in (dict(repeats=0), dict(warmup=-1), dict(number=1.5), dict(inputs=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            bench({"x": lambda: None}, **kw)


# --- the softmax kernels (interpreted on CPU: tiny shapes) --------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("block_size", [None, 16])
def test_softmax_triton_matches_reference(block_size):
    op = functools.partial(softmax_triton, block_size=block_size)
    table = check_op(op, softmax_ref, shapes=ODD_SHAPES, dtypes=DTYPES, grad=True)
    assert len(table) == len(ODD_SHAPES) * len(DTYPES) * 2


@needs_kernels
def test_softmax_public_op_triton_backend_and_edge_cases():
    check_op(functools.partial(softmax, backend="triton"), softmax_ref, shapes=[(3, 33)], dtypes=(torch.float32,))
    x = torch.tensor([[0.0, -math.inf, 0.0], [1e4, 1e4, -1e4]], device=DEVICE)
    assert torch.equal(softmax_fwd(x).cpu(), torch.tensor([[0.5, 0.0, 0.5], [0.5, 0.5, 0.0]]))  # -inf, huge logits
    with warnings.catch_warnings():  # the interpreter's numpy warns about -inf - -inf; that NaN is the point
        warnings.simplefilter("ignore", RuntimeWarning)
        assert softmax_fwd(torch.full((1, 4), -math.inf, device=DEVICE)).isnan().all()  # as torch.softmax does
    xt = torch.randn(9, 4, device=DEVICE).t()  # non-contiguous rows
    assert torch.allclose(softmax(xt, backend="triton"), softmax_ref(xt), atol=1e-6)
    assert softmax_fwd(torch.empty(0, 5, device=DEVICE)).shape == (0, 5)
    y = softmax_fwd(torch.randn(2, 6, device=DEVICE))
    assert softmax_bwd(y, torch.zeros(2, 6, device=DEVICE)).abs().max() == 0
    assert (softmax_fwd(torch.randn(3, 50, device=DEVICE), block_size=8).sum(-1) - 1).abs().max() < 1e-6


def test_softmax_bad_inputs():
    for bad, err, match in ((torch.ones(3, dtype=torch.int64), TypeError, "x must be float32"),
                            (torch.tensor(1.0), ValueError, "x must have at least one dimension"),
                            ([1.0, 2.0], TypeError, "x must be a torch.Tensor")):
        with pytest.raises(err, match=match):
            softmax_fwd(bad)
    for bs in (0, 12, 2.0, True):
        with pytest.raises(ValueError, match="block_size"):
            softmax_fwd(torch.randn(2, 3), block_size=bs)  # checked before any launch
    with pytest.raises(ValueError, match="dy must have y's shape"):
        softmax_bwd(torch.randn(2, 3), torch.randn(3, 2))
    assert torch.allclose(softmax(torch.randn(4, 9)).sum(-1), torch.ones(4))


def test_row_block_launch_rule():
    from mdxlib.kernels import row_block

    assert row_block(1, None) == (1, 4) and row_block(37, None) == (64, 4)
    assert row_block(50_257, None) == (4096, 8) and row_block(37, 16) == (16, 4)
    for bad in (0, 24, True, 2.0):
        with pytest.raises(ValueError, match="block_size"):
            row_block(37, bad)
