"mdxlib.md4 from the outside: schedules, forward process, losses, the ELBO, GenMD4, the sampler, bad inputs."
import itertools
import math

import pytest
import torch

from mdxlib.md4 import (GenMD4Schedule, TransformerDenoiser, apply_rope, ar_nll, forward_mask, genmd4_integrand,
                        genmd4_loss, masking_schedule, md4_discrete_loss, md4_elbo, md4_loss, mirror_kl, rope_tables,
                        sample, time_features, time_grid)

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


def test_distance_slopes_default_explicit_and_bad():
    default = TransformerDenoiser(6, 10, d_model=16, n_layers=1, n_heads=2)
    assert torch.allclose(default.slopes, torch.tensor([2.0 ** -4, 2.0 ** -8]))  # ALiBi's 2^(-8 h / H)
    torch.manual_seed(0)
    steep = TransformerDenoiser(6, 10, d_model=16, n_layers=1, n_heads=2, slopes=(0.5, 0.25))
    torch.manual_seed(0)
    flat = TransformerDenoiser(6, 10, d_model=16, n_layers=1, n_heads=2, slopes=(0.0, 0.0))
    x = torch.randint(0, 7, (2, 10))
    assert torch.equal(steep.slopes, torch.tensor([0.5, 0.25]))
    assert not torch.allclose(steep(x), flat(x))  # the same weights, a different locality prior
    for bad in ((0.5,), (0.5, -1.0), (0.5, float("nan"))):
        with pytest.raises(ValueError, match="slopes"):
            TransformerDenoiser(6, 10, d_model=16, n_layers=1, n_heads=2, slopes=bad)


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


def test_rope_scores_depend_only_on_the_signed_offset():
    cos, sin = rope_tables(16, 8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 8, generator=g)  # (H, hd) the same vectors placed at every position
    qr = apply_rope(q[:, None].expand(3, 16, 8), cos, sin)  # (H, L, hd)
    kr = apply_rope(k[:, None].expand(3, 16, 8), cos, sin)
    scores = qr @ kr.transpose(1, 2)  # (H, L, L): q_m . k_n
    for d in range(-15, 16):
        diag = torch.diagonal(scores, d, dim1=1, dim2=2)  # (H, L - |d|): all pairs with n - m = d
        assert torch.allclose(diag, diag[:, :1].expand_as(diag), atol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 2, 1, 2)[:, 0], torch.diagonal(scores, -2, 1, 2)[:, 0])
    # and it equals the score of q at position 0 with k at the offset
    assert torch.allclose(scores[:, 5, 9], (apply_rope(q[:, None], cos, sin)[:, 0] * kr[:, 4]).sum(-1), atol=1e-5)
    assert torch.allclose(qr.norm(dim=-1), q.norm(dim=-1, keepdim=True).expand(3, 16))  # a rotation
    with pytest.raises(ValueError, match="head_dim must be even"):
        rope_tables(8, 5)
    with pytest.raises(ValueError, match="even for RoPE"):
        TransformerDenoiser(5, 8, d_model=6, n_heads=2)


def _counting(n: int, L: int, V: int, g) -> torch.Tensor:
    "Sequences a, a+1, ..., a+L-1 (mod V): which neighbour is on the left decides the answer."
    return (torch.randint(0, V, (n, 1), generator=g) + torch.arange(L)) % V


def _train_on_counting(net, steps=120, V=8, L=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    sch = masking_schedule("linear")
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        x0 = _counting(64, L, V, g)
        t = torch.rand(64, generator=g)
        xt = forward_mask(x0, t, sch, V, generator=g, check=False)
        loss = md4_loss(net(xt, check=False), x0, xt, t, sch, V, check=False).mean() / L
        opt.zero_grad(); loss.backward(); opt.step()
    return net.eval()


def test_rope_denoiser_learns_direction_and_beats_a_mirror_blind_one():
    V, L = 8, 8
    torch.manual_seed(0)
    rope = _train_on_counting(TransformerDenoiser(V, L, d_model=32, n_layers=2, n_heads=2))
    torch.manual_seed(0)
    blind = TransformerDenoiser(V, L, d_model=32, n_layers=2, n_heads=2, rope=False)
    with torch.no_grad():
        blind.pos.zero_()  # no learned positions: only the symmetric distance penalty, exactly mirror-blind
    blind.pos.requires_grad_(False)
    blind = _train_on_counting(blind)
    g = torch.Generator().manual_seed(1)
    x0 = _counting(512, L, V, g)
    t = torch.full((512,), 0.6)
    xt = forward_mask(x0, t, masking_schedule("linear"), V, generator=g)
    kl_rope, kl_blind = mirror_kl(rope, xt, V), mirror_kl(blind, xt, V)
    assert kl_blind < 1e-6 and kl_rope > 0.5, (kl_rope, kl_blind)  # nats
    with torch.no_grad():
        ce = {k: md4_loss(m(xt), x0, xt, t, masking_schedule("linear", eps=0), V).sum() / (xt == V).sum() * 0.6
              for k, m in (("rope", rope), ("blind", blind))}  # mean CE per masked position, nats
    assert ce["rope"] < ce["blind"] - 0.5, ce


def test_time_free_path_is_unchanged_and_time_conditioning_starts_from_it():
    x = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6, 1, 2], [5, 6, 4, 3, 6, 2, 1, 0, 6, 3]])
    torch.manual_seed(0)
    old = TransformerDenoiser(6, 10, d_model=16, n_layers=2, n_heads=2, rope=False)
    with torch.no_grad():  # the outputs of the denoiser before RoPE and time conditioning, same seed and input
        y = old(x)
    assert torch.allclose(y[0, 0], torch.tensor([-0.093894, -0.191307, 0.573745, 0.926477, -0.946912, -0.258336]),
                          atol=1e-5)
    assert y.sum().item() == pytest.approx(14.079660, abs=1e-4) and y.abs().sum().item() == pytest.approx(50.777168,
                                                                                                          abs=1e-4)
    t = torch.tensor([0.2, 0.9])
    torch.manual_seed(0)
    free = TransformerDenoiser(6, 10, d_model=16, n_layers=2, n_heads=2)
    torch.manual_seed(0)
    timed = TransformerDenoiser(6, 10, d_model=16, n_layers=2, n_heads=2, time_conditioning=True)
    assert not any("time" in k or "ada" in k for k in free.state_dict())  # MD4's default has no time parameters
    with torch.no_grad():
        assert torch.equal(free(x), free(x, t)) and torch.equal(free(x), free(x, t.flip(0)))  # t is ignored
        assert torch.equal(free(x), timed(x, t))  # adaLN-zero: the same function at initialisation
        timed.ada[1].weight.normal_()
        assert not torch.allclose(timed(x, t), timed(x, t.flip(0)))
    assert timed.load_state_dict(free.state_dict(), strict=False).missing_keys  # only time parameters are extra
    with pytest.raises(ValueError, match="t is required"):
        timed(x)
    with pytest.raises(ValueError, match="t must lie"):
        timed(x, torch.tensor([0.2, 1.5]))
    assert time_features(t, 8).shape == (2, 8)
    with pytest.raises(ValueError, match="dim must be even"):
        time_features(t, 7)


def test_genmd4_sampler_matches_the_exact_posterior_and_reveals_large_w_first():
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    sched = GenMD4Schedule(3)
    with torch.no_grad():
        sched.raw.copy_(torch.tensor([0.3, 3.0, 1.0]).expm1().log())  # w = (0.3, 3, 1)
    assert torch.allclose(sched.w, torch.tensor([0.3, 3.0, 1.0]), atol=1e-6)
    # independent positions: p(x0 = v | masked at rescaled time t) ∝ pi_v t^{w_v}
    posterior = lambda xt, t: (pi.log() + sched.w.detach().double() * t.double().log()[:, None, None]).expand(
        *xt.shape, 3)
    out = sample(posterior, (600, 16), sched, 3, steps=12, cache=False, generator=torch.Generator().manual_seed(0),
                 return_states=True)
    assert (out.x < 3).all() and len(out.states) == 13 and out.nfe <= 12
    freq = torch.bincount(out.x.reshape(-1), minlength=3) / out.x.numel()
    assert torch.allclose(freq, pi.float(), atol=0.02), freq
    masked = [(s == 3).float().mean().item() for s in out.states]
    assert all(a >= b for a, b in zip(masked, masked[1:]))  # masks only ever disappear
    first = torch.stack([s != 3 for s in out.states]).float().argmax(0)  # the step each position unmasked at
    by_token = [first[out.x == v].float().mean().item() for v in range(3)]
    assert by_token[1] < by_token[2] < by_token[0]  # w = 3 first, w = 0.3 last
    # MD4's sampler on the same "model" ignores the per-token schedule and gets the frequencies wrong
    md4 = sample(posterior, (600, 16), masking_schedule("linear"), 3, steps=12, cache=False,
                 generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(torch.bincount(md4.x.reshape(-1), minlength=3) / md4.x.numel(), pi.float(), atol=0.02)
    # a time-conditioned denoiser is re-evaluated every step (the cache would be stale)
    torch.manual_seed(0)
    net = TransformerDenoiser(3, 8, d_model=16, n_layers=1, n_heads=2, time_conditioning=True).eval()
    runs = [sample(net, (4, 8), sched, 3, steps=16, cache=c, generator=torch.Generator().manual_seed(1))
            for c in (True, False)]
    assert torch.equal(runs[0].x, runs[1].x) and runs[0].nfe == runs[1].nfe
    with pytest.raises(ValueError, match="schedule.vocab_size"):
        sample(TransformerDenoiser(4, 8, d_model=16, n_layers=1, n_heads=2), (2, 8), sched, 4, steps=4)
    with pytest.raises(TypeError, match="schedule"):
        sample(net, (2, 8), "linear", 3, steps=4)


def test_mirror_kl_bad_input():
    net = TransformerDenoiser(5, 8, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="bidirectional"):
        mirror_kl(TransformerDenoiser(5, 8, d_model=16, n_layers=1, n_heads=2, causal=True), torch.zeros(1, 8).long(),
                  5)
    with pytest.raises(ValueError, match="at least one masked"):
        mirror_kl(net, torch.zeros(2, 8, dtype=torch.long), 5)
    assert mirror_kl(net, torch.full((2, 8), 5), 5) >= 0


def test_sampler_reproduces_a_correlated_joint_with_exact_conditionals():
    # the model is the exact conditional of a correlated 3x3x3 joint: with many steps (about one token revealed at a
    # time) the sampler draws from the joint itself; with T = 2 most tokens are revealed together, independently
    g = torch.Generator().manual_seed(0)
    M, K = 3, 3
    joint = -torch.log(torch.rand(K ** M, dtype=torch.float64, generator=g))
    joint = joint / joint.sum()
    outcomes = torch.tensor(list(itertools.product(range(K), repeat=M)))  # (27, 3)

    def exact(xt, t):
        keep = torch.ones(len(xt), len(outcomes), dtype=torch.bool)
        for n in range(M):
            known = xt[:, n] != K
            keep &= ~known[:, None] | (outcomes[None, :, n] == xt[:, n, None])
        p = joint[None] * keep  # (B, 27)
        out = torch.stack([torch.zeros(len(xt), K, dtype=torch.float64).index_add(1, outcomes[:, n], p)
                           for n in range(M)], 1)  # (B, M, K) unnormalised marginals
        return out.clamp_min(1e-300).log()

    def tv(steps):
        x = sample(exact, (8_000, M), masking_schedule("linear"), K, steps=steps,
                   generator=torch.Generator().manual_seed(1)).x
        emp = torch.bincount(x[:, 0] * 9 + x[:, 1] * 3 + x[:, 2], minlength=27).double() / len(x)
        return 0.5 * (emp - joint).abs().sum().item()

    assert tv(64) < 0.04  # measured 0.028; sampling noise alone is about 0.02 at this size
    assert tv(2) > 0.08  # measured 0.14: two steps ignore most of the correlation
