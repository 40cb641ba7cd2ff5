"mdxlib.kernels.md4 from the outside: the masked cross-entropy (torch, Triton interpreted) and the fused linear path."
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from mdxlib.kernels import HAS_TRITON, TRITON_INTERPRET, check_op
from mdxlib.kernels.md4 import (fused_linear_masked_ce, fused_linear_masked_ce_ref, fused_linear_masked_ce_torch,
                                masked_ce, masked_ce_ref, masked_ce_triton)

CAN_TRITON = HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available())
needs_triton = pytest.mark.skipif(not CAN_TRITON, reason="triton (or its interpreter) is not available")


def ce_inputs(rate):
    def make(shape, dtype, gen):
        N, V = shape
        return ((3 * torch.randn(N, V, generator=gen)).to(dtype), torch.randint(0, V, (N,), generator=gen),
                torch.rand(N, generator=gen) * 4 * (torch.rand(N, generator=gen) < rate))
    return make


def test_ref_matches_cross_entropy_on_weighted_rows():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 11, generator=g), torch.randint(0, 11, (6,), generator=g)
    w = torch.tensor([0.0, 1.0, 2.5, 0.0, 3.0, 1.0])
    expected = w * F.cross_entropy(z, y, reduction="none")
    assert torch.allclose(masked_ce_ref(z, y, w), expected, atol=1e-6)
    assert masked_ce(z, y, w).dtype == torch.float32  # CPU 'auto': the torch path
    assert torch.allclose(masked_ce(z, y, w), expected, atol=1e-6)


def test_ref_skips_rows_entirely():
    z = torch.randn(3, 4, requires_grad=True)
    loss = masked_ce_ref(z, torch.tensor([0, 99, 1]), torch.tensor([1.0, 0.0, 1.0]))  # row 1's target is never read
    loss.sum().backward()
    assert loss[1] == 0 and z.grad[1].abs().sum() == 0


@pytest.mark.parametrize("kw,err,msg", [(dict(target=torch.tensor([0, 5])), ValueError, "target must lie"),
                                        (dict(weight=torch.tensor([1.0, -2.0])), ValueError, "weight must be finite"),
                                        (dict(weight=torch.tensor([1.0, math.nan])), ValueError,
                                         "weight must be finite"),
                                        (dict(logits=torch.zeros(2, 5, 1)), TypeError, "logits"),
                                        (dict(target=torch.tensor([0.0, 1.0])), ValueError, "target must be int"),
                                        (dict(weight=torch.ones(3)), ValueError, "weight must be a float"),
                                        (dict(logits=[[0.0]]), TypeError, "logits")])
def test_bad_input(kw, err, msg):
    args = dict(logits=torch.zeros(2, 5), target=torch.tensor([0, 1]), weight=torch.ones(2)) | kw
    with pytest.raises(err, match=msg):
        masked_ce_ref(**args)


@needs_triton
@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("block_size", [None, 16])
def test_triton_matches_ref(rate, block_size):
    op = functools.partial(masked_ce_triton, block_size=block_size)
    report = check_op(op, masked_ce_ref, ce_inputs(rate), shapes=((1, 3), (5, 37)),
                      dtypes=(torch.float32, torch.float16, torch.bfloat16))
    assert len(report) > 0


@needs_triton
def test_triton_zero_rows_have_zero_loss_and_gradient():
    z = torch.randn(3, 20, requires_grad=True)
    loss = masked_ce(z, torch.tensor([1, 2, 3]), torch.tensor([0.0, 2.0, 0.0]), backend="triton")
    (loss * torch.tensor([5.0, 0.5, 7.0])).sum().backward()  # a non-uniform upstream gradient
    assert loss[0] == 0 and loss[2] == 0 and z.grad[0].abs().sum() == 0 and z.grad[2].abs().sum() == 0
    ref = 0.5 * 2.0 * (torch.softmax(z[1].detach(), -1) - F.one_hot(torch.tensor(2), 20))
    assert torch.allclose(z.grad[1], ref, atol=1e-6)


@needs_triton
def test_triton_bad_block_and_dtype():
    with pytest.raises(ValueError, match="block_size"):
        masked_ce_triton(torch.zeros(2, 5), torch.tensor([0, 1]), torch.ones(2), block_size=12)
    with pytest.raises(TypeError, match="fp64"):
        masked_ce(torch.zeros(2, 5, dtype=torch.float64), torch.tensor([0, 1]), torch.ones(2), backend="triton")


def linear_inputs(rate, V=23):
    def make(shape, dtype, gen):
        N, D = shape
        hidden, proj = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen) / math.sqrt(D)
        target = torch.randint(0, V, (N,), generator=gen)
        weight = torch.rand(N, generator=gen) * 2 * (torch.rand(N, generator=gen) < rate)
        return hidden.to(dtype), proj.to(dtype), target, weight, (0.1 * torch.randn(V, generator=gen)).to(dtype)
    return make


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4)}


@pytest.mark.parametrize("rate", [0.0, 0.4, 1.0])
def test_fused_torch_path_matches_naive(rate):
    op = lambda h, W, y, w, b: fused_linear_masked_ce_torch(h, W, y, w, b, chunk_size=2)
    check_op(op, fused_linear_masked_ce_ref, linear_inputs(rate), shapes=((1, 4), (9, 8)), tol=TOL)


@needs_triton
@pytest.mark.parametrize("rate", [0.4, 1.0])
def test_fused_triton_path_matches_naive(rate):
    op = lambda h, W, y, w, b: fused_linear_masked_ce(h, W, y, w, b, chunk_size=3, backend="triton")
    check_op(op, fused_linear_masked_ce_ref, linear_inputs(rate), shapes=((1, 4), (7, 8)), tol=TOL)


def test_fused_without_bias_and_bad_input():
    h, W = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4, requires_grad=True)
    y, w = torch.randint(0, 7, (5,)), torch.tensor([1.0, 0, 2, 0, 1])
    loss = fused_linear_masked_ce(h, W, y, w)
    assert torch.allclose(loss, fused_linear_masked_ce_ref(h, W, y, w), atol=1e-5)
    loss.backward()
    assert h.grad[1].abs().sum() == 0 and W.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="proj must have shape"):
        fused_linear_masked_ce(h, torch.randn(7, 3), y, w)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_masked_ce(h, W, y, w, chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_masked_ce(h, W, y, w, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="target must lie"):
        fused_linear_masked_ce(h, W, torch.full((5,), 7), w)


def test_value_checks_can_be_skipped_where_the_caller_vouches():
    z, y, w = torch.randn(3, 5), torch.tensor([0, 4, 2]), torch.tensor([1.0, 0.0, 2.0])
    assert torch.equal(masked_ce_ref(z, y, w, check=False), masked_ce_ref(z, y, w))
    with pytest.raises(ValueError, match="target must lie"):  # checked by default
        masked_ce_ref(z, torch.tensor([0, 4, 5]), w)
    with pytest.raises(ValueError, match="weight must be a float"):  # shapes and dtypes are always checked
        masked_ce_ref(z, y, w[:2], check=False)
    if HAS_TRITON and (TRITON_INTERPRET or torch.cuda.is_available()):
        assert torch.allclose(masked_ce(z, y, w, backend="triton", check=False), masked_ce_ref(z, y, w), atol=1e-6)


# --- the gradient written into the logits buffer (inplace=True) ---

PATHS = ["torch", "triton"] if CAN_TRITON else ["torch"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_inplace_matches_ref_values_and_gradients(path, rate):
    "Odd shapes, three dtypes: the logits come from an op (x * 1), so they may be overwritten."
    op = lambda z, y, w: masked_ce(z * 1, y, w, inplace=True, backend=path)
    dtypes = (torch.float32, torch.float16, torch.bfloat16) + ((torch.float64,) if path == "torch" else ())
    report = check_op(op, masked_ce_ref, ce_inputs(rate), shapes=((1, 1), (1, 3), (5, 37), (3, 129)), dtypes=dtypes,
                      seed=int(rate * 10))
    assert set(report.tensor) == {"out[0]", "grad[0]"}


@pytest.mark.parametrize("path", PATHS)
def test_inplace_buffer_holds_the_gradient_and_backward_scales_it(path):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 23, generator=g, requires_grad=True)
    y, w = torch.randint(0, 23, (6,), generator=g), torch.tensor([0.0, 1.5, 2.0, 0.0, 1.0, 3.0])
    z = x * 2  # the logits buffer
    loss = masked_ce(z, y, w, inplace=True, backend=path)
    expected = w[:, None] * (torch.softmax(2 * x.detach(), -1) - F.one_hot(y, 23))
    torch.testing.assert_close(z.detach(), expected, atol=1e-6, rtol=1e-5)  # overwritten by the forward
    torch.testing.assert_close(loss, masked_ce_ref(2 * x.detach(), y, w), atol=1e-6, rtol=1e-5)
    up = torch.arange(6.0)  # a non-uniform upstream gradient
    (dz,) = torch.autograd.grad((loss * up).sum(), z)
    assert dz.data_ptr() == z.data_ptr()  # the backward scaled the same buffer: no second (N, V) tensor
    torch.testing.assert_close(dz, expected * up[:, None], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_inplace_contract(path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 9, generator=g, requires_grad=True)
    y, w = torch.randint(0, 9, (4,), generator=g), torch.ones(4)
    with pytest.raises(ValueError, match="not a leaf"):  # a parameter or input would be destroyed
        masked_ce(x, y, w, inplace=True, backend=path)
    with pytest.raises(ValueError, match="not a leaf"):  # a view of one too
        masked_ce(x[1:], y[1:], w[1:], inplace=True, backend=path)
    t = torch.tanh(x)  # tanh's backward needs its output: overwriting it must fail loudly, not silently
    loss = masked_ce(t, y, w, inplace=True, backend=path)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()
    loss = masked_ce(x * 1, y, w, inplace=True, backend=path)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.sum().backward()
    frozen = x.detach().clone()  # no gradient asked for: nothing is written
    masked_ce(frozen, y, w, inplace=True, backend=path)
    assert torch.equal(frozen, x.detach())
    with torch.no_grad():
        masked_ce(x * 1, y, w, inplace=True, backend=path)  # no graph: nothing to overwrite either


def test_inplace_torch_path_runs_in_chunks(monkeypatch):
    "Rows processed a few at a time (small chunks force several and a ragged last one): same values."
    import mdxlib.kernels.md4 as md4k
    monkeypatch.setattr(md4k, "_CHUNK_ELEMENTS", 40)  # 2 rows of 17 per chunk
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 17, generator=g, dtype=torch.float64, requires_grad=True)
    y, w = torch.randint(0, 17, (9,), generator=g), torch.rand(9, generator=g, dtype=torch.float64) * (
        torch.arange(9) % 3 != 0)
    loss = masked_ce(x * 1, y, w, inplace=True)
    (dx,) = torch.autograd.grad(loss.sum(), x)
    ref = masked_ce_ref(x, y, w)
    (dref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(dx, dref)


@pytest.mark.parametrize("N,V", [(1, 1), (5, 37), (9, 129)])
def test_masked_ce_grad_torch_in_place_matches_autograd(N, V):
    "The torch path written into the logits buffer itself: loss and w(softmax - onehot) as autograd gives them."
    from mdxlib.kernels.md4 import masked_ce_grad_torch

    g = torch.Generator().manual_seed(N * V)
    logits = torch.randn(N, V, generator=g) * 3
    target = torch.randint(0, V, (N,), generator=g)
    weight = torch.rand(N, generator=g) * (torch.rand(N, generator=g) > 0.3)
    ref = logits.clone().requires_grad_()
    expected = weight * F.cross_entropy(ref, target, reduction="none")
    expected.sum().backward()
    buffer = logits.clone()
    loss = masked_ce_grad_torch(buffer, target, weight, out=buffer)
    torch.testing.assert_close(loss, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(buffer, ref.grad, atol=1e-6, rtol=1e-5)  # skipped rows (weight 0) hold zeros
