"mdxlib.md4 from the outside: schedules, forward process, losses, the ELBO, GenMD4, the sampler, bad inputs."
import itertools
import math

import pytest
import torch

from mdxlib.md4 import (GenMD4Schedule, TransformerDenoiser, ar_nll, forward_mask, genmd4_integrand, genmd4_loss,
                        masking_schedule, md4_discrete_loss, md4_elbo, md4_loss, sample, time_grid)

NAMES = {"linear": {}, "cosine": {}, "poly": {"w": 3.0}, "geometric": {}}


@pytest.mark.parametrize("name", NAMES)
def test_schedule_endpoints_monotone_finite(name):
    s = masking_schedule(name, **NAMES[name])
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    a, w = s.alpha(t), s.weight(t)
    assert abs(a[0].item() - (1 - 1e-4)) < 1e-5 and a[-1].item() < 2e-4
    assert (a.diff() < 0).all() and torch.isfinite(w).all() and (w >= 0).all()
    tm = t[1:-1]
    fd = (s.alpha(tm + 1e-7) - s.alpha(tm - 1e-7)) / 2e-7
    assert torch.allclose(fd, s.dalpha(tm), rtol=1e-4, atol=1e-6)


def test_schedule_weights_match_the_table():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(masking_schedule("linear", eps=0).weight(t), 1 / t)
    assert torch.allclose(masking_schedule("poly", w=0.5, eps=0).weight(t), 0.5 / t)
    assert torch.allclose(masking_schedule("cosine", eps=0).weight(t), math.pi / 2 * torch.tan(math.pi / 2 * (1 - t)))


@pytest.mark.parametrize("kw,err,msg", [(dict(name="sqrt"), ValueError, "name"),
                                        (dict(name="poly", w=0), ValueError, "w"),
                                        (dict(name="geometric", beta_min=5, beta_max=1), ValueError, "beta_min"),
                                        (dict(name="linear", eps=0.5), ValueError, "eps"),
                                        (dict(name="linear", gamma=1), TypeError, "linear")])
def test_schedule_bad_input(kw, err, msg):
    with pytest.raises(err, match=msg):
        masking_schedule(**kw)


def test_schedule_rejects_bad_t():
    s = masking_schedule("cosine")
    with pytest.raises(ValueError, match="t must lie"):
        s.weight(torch.tensor([-0.1]))
    with pytest.raises(ValueError, match="t must lie"):
        s.alpha(torch.tensor([float("nan")]))
    with pytest.raises(TypeError, match="t must"):
        s.alpha("0.5")
    assert s.alpha(torch.tensor([1.5]), check=False).shape == (1,)  # unchecked: the caller vouches for t


def test_forward_mask_rates_and_untouched_tokens():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 7, (3, 4000), generator=g)
    xt = forward_mask(x0, torch.tensor([0.1, 0.5, 0.9]), masking_schedule("linear"), 7, generator=g)
    frac = (xt == 7).float().mean(1)
    assert torch.allclose(frac, torch.tensor([0.1, 0.5, 0.9]), atol=0.03)
    assert torch.equal(xt[xt != 7], x0[xt != 7])
    with pytest.raises(ValueError, match="shape"):
        forward_mask(x0, torch.tensor([0.5]), masking_schedule("linear"), 7)
    with pytest.raises(TypeError, match="x0"):
        forward_mask(x0.float(), torch.tensor([0.1, 0.5, 0.9]), masking_schedule("linear"), 7)


def test_md4_loss_known_value_and_gradient():
    V = 5
    x0 = torch.tensor([[0, 1, 2, 3]])
    xt = torch.tensor([[V, 1, V, V]])
    logits = torch.zeros(1, 4, V, requires_grad=True)
    loss = md4_loss(logits, x0, xt, torch.tensor([0.25]), masking_schedule("linear", eps=0), V)
    assert torch.allclose(loss, torch.tensor([3 * math.log(V) / 0.25]))
    loss.sum().backward()
    assert logits.grad[0, 1].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


@pytest.mark.parametrize("kw,err,msg", [(dict(mask_id=3), ValueError, "mask_id"),
                                        (dict(x0=torch.tensor([[0, 9]])), ValueError, "x0 must"),
                                        (dict(logits=torch.zeros(1, 3, 5)), ValueError, "shapes"),
                                        (dict(xt=torch.tensor([[5, 2]])), ValueError, "xt must equal"),
                                        (dict(logits=torch.zeros(1, 2, 5, dtype=torch.long)), TypeError, "logits")])
def test_md4_loss_bad_input(kw, err, msg):
    args = dict(logits=torch.zeros(1, 2, 5), x0=torch.tensor([[0, 1]]), xt=torch.tensor([[5, 1]]),
                t=torch.tensor([0.5]),
                schedule=masking_schedule("linear"), mask_id=5) | kw
    with pytest.raises(err, match=msg):
        md4_loss(**args)


def _exact_setup(seed=0):
    "A joint over 2 positions x 2 values and its exact conditionals as logits."
    g = torch.Generator().manual_seed(seed)
    joint = torch.rand(2, 2, generator=g, dtype=torch.float64) + 0.1
    joint /= joint.sum()

    def logits(xt):
        out = torch.empty(len(xt), 2, 2, dtype=torch.float64)
        for b, (a, c) in enumerate(xt.tolist()):
            p = joint.clone()
            if a != 2: p = p * (torch.arange(2) == a)[:, None]
            if c != 2: p = p * (torch.arange(2) == c)[None, :]
            out[b, 0], out[b, 1] = p.sum(1).log(), p.sum(0).log()
        return out
    return joint, logits


@pytest.mark.parametrize("name", ["linear", "cosine", "poly"])
def test_continuous_bound_is_exact_with_exact_conditionals(name):
    joint, logits = _exact_setup()
    sch = masking_schedule(name, **({"w": 2.0} if name == "poly" else {}), eps=0)
    masks = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.bool)
    import numpy as np
    nodes, weights = np.polynomial.legendre.leggauss(48)
    for x0 in itertools.product(range(2), repeat=2):
        x0 = torch.tensor([x0])
        xts = torch.where(masks, 2, x0.expand(4, 2))
        total = 0.0
        for tn, wn in zip((nodes + 1) / 2, weights / 2):
            t = torch.tensor([tn], dtype=torch.float64)
            a = sch.alpha(t)
            prob = a ** (~masks).sum(1) * (1 - a) ** masks.sum(1)
            total += wn * (prob * md4_loss(logits(xts), x0.expand(4, 2), xts, t.expand(4), sch, 2)).sum().item()
        assert total == pytest.approx(-joint[tuple(x0[0].tolist())].log().item(), abs=1e-8)


def test_discrete_loss_and_order_check():
    logits = torch.zeros(1, 2, 3)
    x0, xt = torch.tensor([[0, 1]]), torch.tensor([[3, 3]])
    s, t = torch.tensor([0.0]), torch.tensor([1.0])
    sch = masking_schedule("linear", eps=0)
    assert torch.allclose(md4_discrete_loss(logits, x0, xt, s, t, sch, 3), torch.tensor([2 * math.log(3)]))
    with pytest.raises(ValueError, match="s must be <= t"):
        md4_discrete_loss(logits, x0, xt, t, s, sch, 3)


def test_denoiser_shapes_causality_and_bad_input():
    torch.manual_seed(0)
    net = TransformerDenoiser(6, 10, d_model=16, n_layers=1, n_heads=2)
    x = torch.randint(0, 7, (2, 10))
    assert net(x).shape == (2, 10, 6) and net(x, torch.rand(2)).shape == (2, 10, 6)
    ar = TransformerDenoiser(6, 10, d_model=16, n_layers=1, n_heads=2, causal=True)
    x0 = torch.randint(0, 6, (2, 10))
    x1 = x0.clone(); x1[:, 7:] = (x1[:, 7:] + 1) % 6
    assert torch.allclose(ar(x0)[:, :8], ar(x1)[:, :8], atol=1e-6)
    assert not torch.allclose(net(x0)[:, :7], net(x1)[:, :7])  # the denoiser sees both sides
    assert ar_nll(ar, x0).shape == (2,)
    with torch.no_grad():  # eval mode computes the same function as training mode (dropout 0)
        assert torch.allclose(net.eval()(x0), net.train()(x0), atol=1e-6)
        assert torch.allclose(ar.eval()(x0), ar.train()(x0), atol=1e-6)
    with pytest.raises(ValueError, match="causal"):
        ar_nll(net, x0)
    with pytest.raises(ValueError, match="x must"):
        net(torch.full((1, 10), 7))
    with pytest.raises(ValueError, match="divisible"):
        TransformerDenoiser(6, 10, d_model=10, n_heads=3)


def test_elbo_of_a_uniform_model_is_log_m():
    m, L = 8, 32
    uniform = lambda xt, t: torch.zeros(*xt.shape, m)
    x0 = torch.randint(0, m, (16, L), generator=torch.Generator().manual_seed(0))
    e = md4_elbo(uniform, x0, masking_schedule("linear"), m, n_t=64, generator=torch.Generator().manual_seed(1))
    assert e.bits_per_token == pytest.approx(math.log2(m), rel=0.03)
    assert e.reconstruction == pytest.approx(1e-4 * math.log2(m), rel=1e-3)
    assert e.per_sequence.shape == (16,) and e.stderr > 0 and e.single_t_std > 0
    with pytest.raises(ValueError, match="n_t"):
        md4_elbo(uniform, x0, masking_schedule("linear"), m, n_t=0)


def test_genmd4_reduces_to_poly_and_reinforce_gives_w_gradients():
    torch.manual_seed(0)
    sched = GenMD4Schedule(5, w_init=1.5)
    assert torch.allclose(sched.w, torch.full((5,), 1.5))
    net = TransformerDenoiser(5, 6, d_model=16, n_layers=1, n_heads=2)
    x0 = torch.randint(0, 5, (4, 6))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    xt = sched.forward_mask(x0, t, 5, torch.Generator().manual_seed(0))
    logits = net(xt)
    gen = genmd4_integrand(logits, x0, xt, t, sched, 5) - sched.reconstruction(x0, 5)
    poly = md4_loss(logits, x0, xt, sched.rescale(t), masking_schedule("poly", w=1.5, eps=0), 5) * (1 - sched.t_min)
    assert torch.allclose(gen, poly, rtol=1e-5, atol=1e-5)
    loss, surrogate = genmd4_loss(net, x0, t, sched, 5)
    assert loss.shape == (4,) and surrogate.dim() == 0
    surrogate.backward()
    assert sched.raw.grad.abs().sum() > 0 and net.head.weight.grad.abs().sum() > 0
    e = md4_elbo(net, x0, sched, 5, n_t=4)
    assert math.isfinite(e.bits_per_token)
    with pytest.raises(ValueError, match="t_min"):
        GenMD4Schedule(5, t_min=1.0)
    with pytest.raises(ValueError, match="vocab_size"):
        GenMD4Schedule(0)


def test_time_grid():
    assert torch.allclose(time_grid(2), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    cg = time_grid(16, "cosine")
    assert cg[0] == 0 and cg[-1] == 1 and (cg.diff() > 0).all() and cg.diff()[-1] < cg.diff()[0]
    with pytest.raises(ValueError, match="grid"):
        time_grid(4, "exp")
    with pytest.raises(ValueError, match="steps"):
        time_grid(0)


def test_sampler_distribution_cache_and_states():
    probs = torch.tensor([0.6, 0.3, 0.1])
    fixed = lambda xt, t: probs.log().expand(*xt.shape, 3)
    out = sample(fixed, (300, 12), masking_schedule("linear"), 3, steps=6, generator=torch.Generator().manual_seed(0),
                 return_states=True)
    assert (out.x < 3).all() and len(out.states) == 7 and out.nfe <= 6
    assert torch.allclose(torch.bincount(out.x.reshape(-1), minlength=3) / out.x.numel(), probs, atol=0.02)
    torch.manual_seed(0)
    net = TransformerDenoiser(4, 8, d_model=16, n_layers=1, n_heads=2).eval()
    runs = {c: sample(net, (5, 8), masking_schedule("cosine"), 4, steps=32, grid="cosine", cache=c,
                      generator=torch.Generator().manual_seed(1)) for c in (False, True)}
    assert torch.equal(runs[False].x, runs[True].x)  # the denoiser ignores t: the cache is exact
    assert runs[True].nfe < runs[False].nfe <= 32
    with pytest.raises(ValueError, match="shape"):
        sample(net, (5,), masking_schedule("linear"), 4, steps=4)
    with pytest.raises(TypeError, match="gumbel_dtype"):
        sample(net, (1, 8), masking_schedule("linear"), 4, steps=4, gumbel_dtype=torch.int32)


def test_sampler_refuses_a_mask_id_inside_the_vocabulary():
    probs = torch.tensor([0.6, 0.3, 0.1])
    fixed = lambda xt, t: probs.log().expand(*xt.shape, 3)
    with pytest.raises(ValueError, match=r"mask_id must be outside the vocabulary \[0, 3\)"):
        sample(fixed, (2, 4), masking_schedule("linear"), 1, steps=4)  # 1 is a real token: it would never unmask
    net = TransformerDenoiser(4, 8, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match=r"mask_id must be outside the vocabulary \[0, 4\) of the model"):
        sample(net, (2, 8), masking_schedule("linear"), 2, steps=4)  # refused before any network call
    with pytest.raises(ValueError, match="mask_id"):
        sample(net, (2, 8), masking_schedule("linear"), -1, steps=4)


def test_value_checks_can_be_left_to_the_entry_point():
    "check=False skips the checks that sync with the device (ranges, xt against x0) and computes the same loss."
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 5, (3, 6), generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    sch = masking_schedule("cosine")
    xt = forward_mask(x0, t, sch, 5, generator=g, check=False)
    logits = torch.randn(3, 6, 5, generator=g)
    assert torch.equal(md4_loss(logits, x0, xt, t, sch, 5, check=False), md4_loss(logits, x0, xt, t, sch, 5))
    net = TransformerDenoiser(5, 6, d_model=16, n_layers=1, n_heads=2)
    assert torch.equal(net(xt, check=False), net(xt))
    gs = GenMD4Schedule(5)
    assert torch.allclose(genmd4_integrand(logits, x0, xt, t, gs, 5, check=False),
                          genmd4_integrand(logits, x0, xt, t, gs, 5))
    bad_t = torch.tensor([0.2, 0.5, 1.5])
    with pytest.raises(ValueError, match="t must lie"):
        md4_loss(logits, x0, xt, bad_t, sch, 5)
    with pytest.raises(ValueError, match="xt must equal"):  # the bad-input checks stay on by default
        genmd4_integrand(logits, x0, torch.where(xt == 5, xt, (xt + 1) % 5), t, gs, 5)
    with pytest.raises(ValueError, match="mask_id"):  # shape and id-space checks cost no sync: always on
        md4_loss(logits, x0, xt, t, sch, 2, check=False)
