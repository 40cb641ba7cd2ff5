"The sparse FFN of LTE (mdxlib.kernels.lte): torch path and Triton kernels against the dense masked reference."
import pytest
import torch

from mdxlib.kernels import HAS_TRITON, TRITON_INTERPRET
from mdxlib.kernels.lte import expert_runs, sparse_ffn, sparse_ffn_ref, sparse_ffn_torch, sparse_ffn_triton


def make(B, d, E, n, seed=0, mask="random", gate=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, wg, wu, wd = (torch.randn(s, generator=g).to(dtype) for s in ((B, d), (n * E, d), (n * E, d), (n * E, d)))
    active = {"random": torch.rand(B, n, generator=g) < 0.5, "all": torch.ones(B, n, dtype=torch.bool),
              "none": torch.zeros(B, n, dtype=torch.bool)}[mask]
    bu, bd = torch.randn(n * E, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    return dict(x=x, w_gate=wg if gate else None, w_up=wu, w_down=wd, active=active, expert_size=E,
                act="silu" if gate else "gelu_tanh", b_up=None if gate else bu, b_down=None if gate else bd)


STRATEGIES = (dict(dense_above=1.0, gather_below=0), dict(dense_above=1.0, gather_below=2**62), dict(dense_above=0.0))


def test_expert_runs():
    assert expert_runs(torch.tensor([False, True, True, False, True])) == [(1, 3), (4, 5)]
    assert expert_runs(torch.ones(4, dtype=torch.bool)) == [(0, 4)]
    assert expert_runs(torch.zeros(4, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="mask must be a 1-D bool"):
        expert_runs(torch.tensor([1, 0]))


def test_reference_masks_whole_experts():
    args = make(2, 7, 4, 3, mask="all")
    dense = sparse_ffn_ref(**args)
    h = torch.nn.functional.silu(args["x"] @ args["w_gate"].T) * (args["x"] @ args["w_up"].T)
    torch.testing.assert_close(dense, h @ args["w_down"])
    off = dict(args, active=torch.tensor([[True, False, True], [False, False, False]]))
    out = sparse_ffn_ref(**off)
    assert out[1].abs().max() == 0
    keep = torch.cat([torch.arange(0, 4), torch.arange(8, 12)])
    torch.testing.assert_close(out[0], h[0, keep] @ args["w_down"][keep])


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("mask", ["random", "all", "none"])
@pytest.mark.parametrize("gate", [True, False])
def test_torch_path_matches_reference(B, mask, gate):
    args = make(B, 19, 12, 5, seed=B, mask=mask, gate=gate)
    for kw in STRATEGIES:  # runs for both projections / one embedding_bag for the down one / dense fallback
        torch.testing.assert_close(sparse_ffn_torch(**args, **kw), sparse_ffn_ref(**args), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sparse_ffn(**args), sparse_ffn_ref(**args), atol=1e-4, rtol=1e-4)  # CPU: torch path


@pytest.mark.skipif(not (HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available())), reason="needs Triton")
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("mask", ["random", "all", "none"])
@pytest.mark.parametrize("gate", [True, False])
def test_triton_matches_reference(B, mask, gate):
    dev = "cuda" if torch.cuda.is_available() and not TRITON_INTERPRET else "cpu"
    args = make(B, 21, 12, 3, seed=10 + B, mask=mask, gate=gate)
    args = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    torch.testing.assert_close(sparse_ffn(**args, backend="triton"), sparse_ffn_ref(**args), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("gate", [True, False])
def test_triton_half_precision(dtype, tol, gate):
    "fp16/bf16 weights and activations, fp32 accumulation: compiled on a GPU, through the interpreter on a CPU."
    gpu = torch.cuda.is_available() and not TRITON_INTERPRET
    if not HAS_TRITON or not (gpu or TRITON_INTERPRET):
        pytest.skip("Triton kernels cannot run here")
    args = make(3, 100, 32, 7, dtype=dtype, gate=gate) if gpu else make(3, 40, 16, 3, dtype=dtype, gate=gate)
    args = {k: v.to("cuda" if gpu else "cpu") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ref = sparse_ffn_ref(**{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                            for k, v in args.items()})
    torch.testing.assert_close(sparse_ffn_triton(**args).float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


def test_split_does_not_change_the_result():
    if not (HAS_TRITON and TRITON_INTERPRET):
        pytest.skip("interpreter only")
    args = make(2, 16, 8, 6, seed=3)
    ref = sparse_ffn_ref(**args)
    for split in (1, 2, 5):
        torch.testing.assert_close(sparse_ffn_triton(**args, split=split), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change,err,msg", [
    (dict(w_down=torch.zeros(5, 36)), ValueError, "w_down must be neuron-major"),
    (dict(active=torch.ones(2, 4, dtype=torch.int64)), ValueError, "active must be a bool"),
    (dict(active=torch.ones(2, 5, dtype=torch.bool)), ValueError, "active must be a bool"),
    (dict(expert_size=5), ValueError, "w_up must be"),
    (dict(expert_size=0), ValueError, "expert_size must be a positive int"),
    (dict(act="swish"), ValueError, "act must be"),
    (dict(x=torch.zeros(2, 5, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(x=torch.zeros(5)), ValueError, "x must be a 2-D"),
    (dict(w_up=[[0.0]]), TypeError, "w_up must be a torch.Tensor"),
])
def test_bad_inputs(change, err, msg):
    args = make(2, 5, 9, 4)
    with pytest.raises(err, match=msg):
        sparse_ffn(**(args | change))
    with pytest.raises(err, match=msg):
        sparse_ffn_ref(**(args | change))


def test_gate_may_be_the_very_tensor_of_up():
    "A gate that *is* w_up gives silu(x Wu) * (x Wu), on every path (the kernel once dropped such a gate)."
    args = make(3, 20, 4, 4, seed=5)
    args["w_gate"] = args["w_up"]
    ref = sparse_ffn_ref(**args)
    u = args["x"] @ args["w_up"].T
    expected = (torch.nn.functional.silu(u) * u * args["active"].repeat_interleave(4, 1)) @ args["w_down"]
    torch.testing.assert_close(ref, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sparse_ffn(**args, backend="torch"), ref, atol=1e-4, rtol=1e-4)
    assert (ref - sparse_ffn_ref(**(args | dict(w_gate=None)))).abs().max() > 1e-2  # not the gate-less FFN
    if HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available()):
        dev = "cuda" if torch.cuda.is_available() and not TRITON_INTERPRET else "cpu"
        on = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        torch.testing.assert_close(sparse_ffn(**on, backend="triton").cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("B", [1, 4])
def test_torch_path_half_precision(dtype, tol, B):
    args = make(B, 33, 8, 6, seed=7, dtype=dtype)
    ref = sparse_ffn_ref(**{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                            for k, v in args.items()})
    for kw in STRATEGIES:
        out = sparse_ffn_torch(**args, **kw)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("gate", [True, False])
def test_torch_path_is_differentiable(gate):
    "With gradients asked for, the CPU path takes differentiable ops (out= products record no autograd)."
    args = make(3, 10, 4, 5, seed=8, gate=gate)
    leaves = [k for k in ("x", "w_gate", "w_up", "w_down", "b_up", "b_down") if args[k] is not None]
    a1 = args | {k: args[k].clone().requires_grad_() for k in leaves}
    a2 = args | {k: args[k].clone().requires_grad_() for k in leaves}
    up = torch.randn(3, 10)
    (sparse_ffn_torch(**a1, dense_above=1.0) * up).sum().backward()
    (sparse_ffn_ref(**a2) * up).sum().backward()
    for k in leaves:
        torch.testing.assert_close(a1[k].grad, a2[k].grad, atol=1e-4, rtol=1e-4)


def test_dense_fallback_only_above_the_threshold():
    "A mask with every expert on takes the dense products; the result is the same either way."
    args = make(1, 12, 4, 10, seed=9, mask="all")
    args["active"][0, 3] = False  # 90 % active
    ref = sparse_ffn_ref(**args)
    for above in (0.0, 0.85, 0.95, 1.0):
        torch.testing.assert_close(sparse_ffn_torch(**args, dense_above=above), ref, atol=1e-4, rtol=1e-4)


needs_triton = pytest.mark.skipif(not (HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available())),
                                  reason="needs Triton")
DEV = "cuda" if torch.cuda.is_available() and not TRITON_INTERPRET else "cpu"


def on_dev(args):
    return {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@needs_triton
@pytest.mark.parametrize("split_d", [1, 2, 3])
@pytest.mark.parametrize("gate", [True, False])
def test_split_k_over_d_does_not_change_the_result(split_d, gate):
    "d = 37 in chunks of block_d = 16: one chunk, two, three (the last ragged)."
    args = on_dev(make(3, 37, 6, 5, seed=12, gate=gate))
    ref = sparse_ffn_ref(**args)
    torch.testing.assert_close(sparse_ffn_triton(**args, block_d=16, split_d=split_d), ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_path_never_syncs_with_the_host(monkeypatch):
    "The grid is fixed by the shapes: no nonzero(), item(), tolist() or bool() of a device tensor in the call."
    args = on_dev(make(2, 20, 4, 6, seed=13))
    ref = sparse_ffn_ref(**args)

    def refuse(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")
        return f
    for name in ("nonzero", "item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    out = sparse_ffn_triton(**args)  # (the interpreter reads its arguments without these calls too)
    monkeypatch.undo()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_prefill_falls_back_to_dense():
    args = on_dev(make(5, 12, 4, 3, seed=14))
    ref = sparse_ffn_ref(**args)
    torch.testing.assert_close(sparse_ffn_triton(**args, prefill_rows=4), ref, atol=1e-4, rtol=1e-4)  # dense
    torch.testing.assert_close(sparse_ffn_triton(**args, prefill_rows=8), ref, atol=1e-4, rtol=1e-4)  # kernels
