"LTE (mdxlib.lte) through its public API on tiny Llama and GPT-2 models and on SmolLM2-135M."
import copy
import math

import pytest
import torch

from mdxlib.lte import (SEP_EPS, ExpertPredictor, LTEHistory, SparsityReport, expert_norms, finetune, fit_predictors,
                        group_neurons, lte_layers, lte_losses, router_flops, set_routing, sparsity_report, to_lte,
                        train_lte)
from mdxlib.models import ModelNotAvailableError, adapter, load_lm, tiny_lm
from mdxlib.train import evaluate_lm

IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
TOKENS = torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def stock(request):
    model, _ = tiny_lm(request.param, seed=0)
    with torch.no_grad():
        logits = model(IDS).logits
    return request.param, model, logits


def converted(stock, **kw):
    arch, model, logits = stock
    return to_lte(copy.deepcopy(model), expert_size=32, seed=0, **kw), logits


# grouping --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["balanced_kmeans", "random"])
def test_group_neurons_is_a_balanced_partition(method):
    if method == "balanced_kmeans":
        pytest.importorskip("k_means_constrained")
    w = torch.randn(96, 12, generator=torch.Generator().manual_seed(0))
    g = group_neurons(w, 16, method, seed=1)
    assert g.shape == (6, 16) and g.dtype == torch.int64
    assert torch.equal(g.flatten().sort().values, torch.arange(96))
    assert torch.equal(g, group_neurons(w, 16, method, seed=1))


def test_balanced_kmeans_groups_similar_neurons():
    pytest.importorskip("k_means_constrained")
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    order = torch.randperm(64, generator=g)
    w = centres.repeat_interleave(16, 0)[order] + 0.1 * torch.randn(64, 16, generator=g)
    groups = group_neurons(w, 16)
    truth = torch.arange(4).repeat_interleave(16)[order]  # the cluster of each neuron
    assert all(len(set(truth[row].tolist())) == 1 for row in groups)
    rand = group_neurons(w, 16, "random")
    assert not all(len(set(truth[row].tolist())) == 1 for row in rand)


@pytest.mark.parametrize("kw,err,msg", [(dict(expert_size=7), ValueError, "must divide d_ff"),
                                        (dict(expert_size=0), ValueError, "expert_size must be"),
                                        (dict(method="kmeans"), ValueError, "method must be"),
                                        (dict(weight=torch.zeros(4)), ValueError, "weight must have 2")])
def test_group_neurons_bad_inputs(kw, err, msg):
    with pytest.raises(err, match=msg):
        group_neurons(**(dict(weight=torch.zeros(32, 4), expert_size=8) | kw))


# conversion and modes ---------------------------------------------------------------------------------------------

def test_dense_mode_is_the_stock_model(stock):
    model, logits = converted(stock, method="random")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, atol=1e-5, rtol=1e-5)
    layers = lte_layers(model)
    assert sorted(layers) == [0, 1] and all(m.expert_size == 32 for m in layers.values())
    assert adapter(model).d_ff == layers[0].n_experts * 32  # the adapter still reads the converted model


def test_balanced_kmeans_conversion_is_also_exact(stock):
    pytest.importorskip("k_means_constrained")
    model, logits = converted(stock, layers=[1])
    assert sorted(lte_layers(model)) == [1]
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, logits, atol=1e-5, rtol=1e-5)


def test_modes(stock):
    model, logits = converted(stock, method="random")
    n = lte_layers(model)[0].n_experts
    with torch.no_grad():
        set_routing(model, "soft")
        soft = model(IDS).logits
        assert not torch.allclose(soft, logits, atol=1e-4)
        set_routing(model, "hard")
        hard = model(IDS).logits
        m = lte_layers(model)[1]
        assert torch.equal(m.last_active, m.last_scores > m.tau)
        set_routing(model, "hard", sparse=True)
        torch.testing.assert_close(model(IDS).logits, hard, atol=1e-5, rtol=1e-5)
        set_routing(model, "topk", k=2)
        topk = model(IDS).logits
        assert (lte_layers(model)[0].last_active.sum(-1) == 2).all()
        set_routing(model, "topk", k=2, sparse=True)
        torch.testing.assert_close(model(IDS).logits, topk, atol=1e-5, rtol=1e-5)
        set_routing(model, "magnitude", k=n)
        torch.testing.assert_close(model(IDS).logits, logits, atol=1e-5, rtol=1e-5)
        set_routing(model, "hard", tau=0.999)  # nothing passes: the FFNs are off
        model(IDS)
        assert not lte_layers(model)[0].last_active.any()


@pytest.mark.parametrize("kw,msg", [(dict(mode="nope"), "mode must be"), (dict(mode="topk"), "needs k"),
                                    (dict(mode="topk", k=0), "k must be"), (dict(mode="magnitude", k=1.5), "k must be"),
                                    (dict(mode="topk", k={5: 1}), "no entry for layer"),
                                    (dict(mode="soft", sparse=True), "sparse=True needs"),
                                    (dict(mode="hard", tau=0.0), "tau must be")])
def test_set_routing_bad_inputs(stock, kw, msg):
    model, _ = converted(stock, method="random")
    with pytest.raises(ValueError, match=msg):
        set_routing(model, **kw)


def test_to_lte_bad_inputs(stock):
    arch, model, _ = stock
    with pytest.raises(ValueError, match="must divide"):
        to_lte(copy.deepcopy(model), expert_size=48)
    with pytest.raises(ValueError, match="layers must be"):
        to_lte(copy.deepcopy(model), expert_size=32, layers=[2])
    with pytest.raises(ValueError, match="tau must be"):
        to_lte(copy.deepcopy(model), expert_size=32, tau=1.0)
    with pytest.raises(TypeError, match="model must be"):
        to_lte(torch.nn.Linear(2, 2))
    conv, _ = converted(stock, method="random")
    with pytest.raises(ValueError, match="already converted"):
        to_lte(conv)
    with pytest.raises(ValueError, match="no LTE layers"):
        set_routing(model, "soft")


# losses, training, reports ---------------------------------------------------------------------------------------

def test_lte_losses_follow_eq4(stock):
    model, _ = converted(stock, method="random")
    set_routing(model, "soft")
    model(IDS)
    l_eff, l_sep = lte_losses(model)
    per_layer = [m.last_scores for m in lte_layers(model).values()]
    assert torch.allclose(l_eff, torch.stack([g.pow(2).mean() for g in per_layer]).mean())
    assert torch.allclose(l_sep, torch.stack([(1 / ((g - 0.5) ** 2 + SEP_EPS)).mean() for g in per_layer]).mean())
    assert l_sep <= 1 / SEP_EPS
    l_eff.backward()
    assert lte_layers(model)[0].router.weight.grad.abs().sum() > 0
    set_routing(model, "dense")
    model(IDS)
    with pytest.raises(ValueError, match="no sigmoid router scores"):
        lte_losses(model)


def test_train_lte_stages(stock):
    model, _ = converted(stock, method="random")
    routers = [m.router.weight.detach().clone() for m in lte_layers(model).values()]
    h1 = train_lte(model, TOKENS, eta=2.0, stage=1, steps=3, lr=1e-3, router_lr=1e-2, batch_size=2, seq_len=16,
                   show_progress=False)
    assert len(h1.loss) == 3 and all(math.isfinite(v) for v in h1.loss)
    assert all(not torch.equal(r, m.router.weight) for r, m in zip(routers, lte_layers(model).values()))
    after1 = [m.router.weight.detach().clone() for m in lte_layers(model).values()]
    w_before = adapter(model).mlp_out_weight(0).detach().clone()
    train_lte(model, TOKENS, stage=2, steps=2, lr=1e-3, batch_size=2, seq_len=16, show_progress=False)
    assert all(torch.equal(r, m.router.weight) for r, m in zip(after1, lte_layers(model).values()))
    assert not torch.equal(w_before, adapter(model).mlp_out_weight(0))
    assert all(m.mode == "hard" and m.router.weight.requires_grad for m in lte_layers(model).values())


def test_eta_drives_sparsity():
    "A larger eta gives a sparser model after the same stage-1 training (tiny llama, routers only)."
    base, _ = tiny_lm("llama", seed=0)
    sparsity = []
    for eta in (0.0, 20.0):
        model = to_lte(copy.deepcopy(base), expert_size=16, method="random")
        routers = [p for m in lte_layers(model).values() for p in m.router.parameters()]
        train_lte(model, TOKENS, eta=eta, lam=0.0, steps=15, router_lr=5e-2, batch_size=4, seq_len=16,
                  params=[], show_progress=False)
        set_routing(model, "hard")
        sparsity.append(sparsity_report(model, [IDS]).overall)
        assert routers
    assert sparsity[1] > sparsity[0] + 0.2, sparsity


def test_lam_schedule_and_probe(stock):
    "lam is 0 for the first lam_start of the steps, then ramps; the probe logs the share of scores on their start side."
    model, _ = converted(stock, method="random")
    probe = {i: torch.randn(32, m.router.in_features, generator=torch.Generator().manual_seed(i))
             for i, m in lte_layers(model).items()}
    h = train_lte(model, TOKENS, eta=1.0, lam=0.5, steps=8, lr=1e-3, router_lr=1e-2, batch_size=2, seq_len=16,
                  lam_start=0.5, lam_warmup=0.25, probe=probe, show_progress=False)
    assert h.lam == pytest.approx([0, 0, 0, 0, 0, 0.25, 0.5, 0.5])
    assert len(h.same_side) == 8 and all(0 <= v <= 1 for v in h.same_side) and h.same_side[0] == 1.0
    h = train_lte(model, TOKENS, steps=3, lam=0.5, batch_size=2, seq_len=16, show_progress=False)
    assert h.lam == [0.5, 0.5, 0.5] and h.same_side == []  # the paper's constant lam; no probe, no same_side
    with pytest.raises(ValueError, match="lam_start"):
        train_lte(model, TOKENS, lam_start=1.5)
    with pytest.raises(ValueError, match="probe"):
        train_lte(model, TOKENS, probe={99: probe[next(iter(probe))]})


def test_train_lte_bad_inputs(stock):
    model, _ = converted(stock, method="random")
    with pytest.raises(ValueError, match="stage must be"):
        train_lte(model, TOKENS, stage=0)
    with pytest.raises(ValueError, match="lam must be"):
        train_lte(model, TOKENS, lam=float("nan"))
    with pytest.raises(ValueError, match="no LTE layers"):
        train_lte(stock[1], TOKENS)


def test_sparsity_report_counts_and_flops(stock):
    model, _ = converted(stock, method="random")
    n = lte_layers(model)[0].n_experts
    set_routing(model, "topk", k=1)
    rep = sparsity_report(model, [IDS, IDS[:1]])
    assert isinstance(rep, SparsityReport)
    assert all(math.isclose(s, 1 - 1 / n) for s in rep.per_layer.values()) and math.isclose(rep.overall, 1 - 1 / n)
    a = adapter(model)
    assert math.isclose(rep.flops["ffn_lte"], rep.flops["ffn_dense"] / n)
    assert rep.flops["router"] == a.n_layers * 2 * a.d_model * n
    f = rep.flops
    assert math.isclose(f["lte"], f["dense"] - f["ffn_dense"] + f["ffn_lte"] + f["router"])
    assert math.isclose(rep.ppl, evaluate_lm(model, [IDS, IDS[:1]])["ppl"], rel_tol=1e-6)
    set_routing(model, "dense")
    assert sparsity_report(model, [IDS]).overall == 0
    with pytest.raises(ValueError, match="no target"):
        sparsity_report(model, [])


def test_softmax_router_baseline(stock):
    model, logits = converted(stock, method="random", router="softmax")
    with pytest.raises(ValueError, match="softmax routers train in 'topk' mode"):
        train_lte(model, TOKENS, steps=1)
    with pytest.raises(ValueError, match="needs sigmoid routers"):
        set_routing(model, "hard")
    set_routing(model, "topk", k=0.5)
    h = train_lte(model, TOKENS, steps=2, lr=1e-3, batch_size=2, seq_len=16, show_progress=False)
    assert math.isfinite(h.loss[-1])
    model.eval()
    with torch.no_grad():
        model(IDS)
    m = lte_layers(model)[0]
    torch.testing.assert_close(m.last_scores.sum(-1), torch.ones(2, 13))  # probabilities
    assert (m.last_active.sum(-1) == m.n_experts // 2).all()


# the real model --------------------------------------------------------------------------------------------------

def test_smollm2_one_layer():
    try:
        model, tok = load_lm("smollm2-135m-instruct")
    except ModelNotAvailableError as e:
        pytest.skip(str(e))
    ids = torch.tensor([tok("it is a truth universally acknowledged")["input_ids"]])
    with torch.no_grad():
        ref = model(ids).logits
        to_lte(model, expert_size=32, layers=[29], method="random")
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        m = lte_layers(model)[29]
        assert m.n_experts == 48
        set_routing(model, "hard")
        hard = model(ids).logits
        set_routing(model, "hard", sparse=True)
        torch.testing.assert_close(model(ids).logits, hard, atol=1e-4, rtol=1e-4)
        rep = sparsity_report(model, [ids])
    assert 0 <= rep.overall <= 1 and rep.flops["dense"] > 2e8 and math.isfinite(rep.ppl)


# bad input caught before the model changes ------------------------------------------------------------------------

def _unchanged(model, logits):
    with torch.no_grad():
        return not lte_layers(model) and torch.equal(model(IDS).logits, logits)


@pytest.mark.parametrize("bad, msg", [(dict(expert_size=0), "expert_size"), (dict(expert_size="32"), "expert_size"),
                                      (dict(expert_size=32.0), "expert_size"), (dict(layers=[0, 0]), "distinct"),
                                      (dict(method="kmeans"), "method"), (dict(router="relu"), "router"),
                                      (dict(tau=float("nan")), "tau")])
def test_to_lte_refuses_bad_arguments(stock, bad, msg):
    _, model, logits = stock
    with pytest.raises(ValueError, match=msg):
        to_lte(model, **{"expert_size": 32, "method": "random", **bad})
    assert _unchanged(model, logits)


def test_to_lte_validates_every_group_before_changing_anything(stock):
    _, model, logits = stock
    a = adapter(model)
    good = {i: group_neurons(a.mlp_in_weights(i)[next(iter(a.mlp_in_weights(i)))], 32, "random", seed=i)
            for i in range(a.n_layers)}
    repeated = good[1].clone()
    repeated[0, 0] = repeated[0, 1]  # one neuron twice, another never: dense mode would no longer be the stock model
    cases = [({**good, 1: repeated}, "exactly once"), ({**good, 1: good[1][:2]}, "shape"),
             ({**good, 1: good[1].float()}, "int"), ({**good, 1: good[1] + 1}, "exactly once"), ({0: good[0]}, "every")]
    for groups, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            to_lte(model, expert_size=32, groups=groups)
        assert _unchanged(model, logits)  # layer 0 was valid, yet nothing was converted
    conv = to_lte(copy.deepcopy(model), expert_size=32, groups=good)
    with torch.no_grad():
        torch.testing.assert_close(conv(IDS).logits, logits, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(m.groups, good[i]) for i, m in lte_layers(conv).items())


def test_lte_runs_on_any_llama_style_family():
    model, _ = tiny_lm("qwen2", seed=0)
    with torch.no_grad():
        ref = model(IDS).logits
        conv = to_lte(model, expert_size=32, method="random")
        torch.testing.assert_close(conv(IDS).logits, ref, atol=1e-5, rtol=1e-5)
        set_routing(conv, "hard")
        hard = conv(IDS).logits
        set_routing(conv, "hard", sparse=True)
        torch.testing.assert_close(conv(IDS).logits, hard, atol=1e-5, rtol=1e-5)
    assert lte_layers(conv)[0].family == "llama" and lte_layers(conv)[0].parts.gate is not None


def test_sparsity_report_perplexity_counts_only_targets(stock):
    model, _ = converted(stock, method="random")
    set_routing(model, "topk", k=2)
    labels = IDS.clone()
    labels[:, 7:] = -100  # only the first 7 tokens are scored: 6 targets per row
    with torch.no_grad():
        loss = model(IDS, labels=labels).loss.item()
    rep = sparsity_report(model, [dict(input_ids=IDS, labels=labels), IDS[:, :1]])  # one-token rows predict nothing
    assert math.isclose(math.log(rep.ppl), loss, rel_tol=1e-5)
    assert math.isclose(rep.overall, 1 - 2 / lte_layers(model)[0].n_experts)  # every token counts for sparsity


# fine-tuning under a mask, the loss terms ------------------------------------------------------------------------

def test_finetune_keeps_the_mode_and_freezes_routers(stock):
    model, _ = converted(stock, method="random")
    set_routing(model, "topk", k=0.5)
    routers = [m.router.weight.detach().clone() for m in lte_layers(model).values()]
    w0 = adapter(model).mlp_out_weight(0).detach().clone()
    h = finetune(model, TOKENS, steps=3, lr=1e-3, batch_size=2, seq_len=16, show_progress=False)
    assert isinstance(h, LTEHistory) and len(h.task) == 3 and h.eff == h.sep == h.below_tau == []
    assert math.isclose(h.task[0], h.loss[0], rel_tol=1e-6)  # no extra term
    assert all(torch.equal(r, m.router.weight) for r, m in zip(routers, lte_layers(model).values()))
    assert not torch.equal(w0, adapter(model).mlp_out_weight(0))
    assert all(m.mode == "topk" and m.k == m.n_experts // 2 for m in lte_layers(model).values())


def test_finetune_a_stock_model(stock):
    _, model, _ = stock
    model = copy.deepcopy(model)
    w0 = adapter(model).mlp_out_weight(1).detach().clone()
    finetune(model, TOKENS, steps=2, lr=1e-3, batch_size=2, seq_len=16, show_progress=False)
    assert not torch.equal(w0, adapter(model).mlp_out_weight(1))


def test_finetune_bad_inputs(stock):
    model, _ = converted(stock, method="random")
    set_routing(model, "soft")
    with pytest.raises(ValueError, match="'soft' mode"):
        finetune(model, TOKENS, steps=1)
    set_routing(model, "hard")
    with pytest.raises(ValueError, match="steps must be"):
        finetune(model, TOKENS, steps=0)
    with pytest.raises(TypeError, match="model must be"):
        finetune("model", TOKENS)


def test_stage1_history_records_the_terms(stock):
    model, _ = converted(stock, method="random")
    h = train_lte(model, TOKENS, eta=1.0, lam=0.5, stage=1, steps=3, lr=1e-3, batch_size=2, seq_len=16,
                  show_progress=False)
    assert len(h.task) == len(h.eff) == len(h.sep) == len(h.below_tau) == 3
    assert all(0 <= b <= 1 and 0 < e < 1 and 0 < s <= 1 / SEP_EPS for b, e, s in zip(h.below_tau, h.eff, h.sep))
    total = [t + 1.0 * e + 0.5 * s for t, e, s in zip(h.task, h.eff, h.sep)]  # lam constant: no warmup
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(total, h.loss))
    h2 = train_lte(model, TOKENS, stage=2, steps=2, lr=1e-3, batch_size=2, seq_len=16, show_progress=False)
    assert len(h2.task) == 2 and h2.eff == []


# the Deja Vu-style predictor baseline ----------------------------------------------------------------------------

def test_router_flops_known_values():
    assert router_flops(torch.nn.Linear(64, 8, bias=False)) == 2 * 64 * 8
    assert router_flops(ExpertPredictor(64, 8, hidden=16)) == 2 * (64 * 16 + 16 * 8)  # biases left out
    assert ExpertPredictor(64, 8, hidden=16)(torch.zeros(3, 5, 64)).shape == (3, 5, 8)


def test_expert_norms_split_the_activations_and_restore_modes(stock):
    model, _ = converted(stock, method="random")
    set_routing(model, "topk", k=2)
    seen = expert_norms(model, [IDS, dict(input_ids=IDS[:1], labels=IDS[:1])])
    for i, m in lte_layers(model).items():
        x, norms = seen[i]
        assert x.shape == (3 * 13, adapter(model).d_model) and norms.shape == (3 * 13, m.n_experts)
        with torch.no_grad():
            torch.testing.assert_close(norms.pow(2).sum(-1), m.neurons(x).pow(2).sum(-1), rtol=1e-4, atol=1e-6)
        assert m.mode == "topk" and m.k == 2
    with pytest.raises(ValueError, match="empty"):
        expert_norms(model, [])
    with pytest.raises(ValueError, match="no LTE layers"):
        expert_norms(stock[1], [IDS])


def _overlap(router, x, norms, k):
    "Share of the oracle's top-k experts the router's top-k finds."
    with torch.no_grad():
        pick = torch.zeros_like(norms).scatter_(-1, router(x).topk(k, -1).indices, 1.0)
    return float((pick * torch.zeros_like(norms).scatter_(-1, norms.topk(k, -1).indices, 1.0)).sum() / (k * len(x)))


def test_fit_predictors_learns_the_oracle_choice(stock):
    model, _ = converted(stock, method="random")
    train = [TOKENS[i:i + 64].view(4, 16) for i in range(0, 2560, 64)]
    held = [TOKENS[2600:2856].view(8, 32)]
    x, norms = expert_norms(model, held)[1]
    n = lte_layers(model)[1].n_experts
    random_router = copy.deepcopy(lte_layers(model)[1].router)
    curves = fit_predictors(model, train, keep=0.5, hidden=32, steps=200, batch_tokens=128, lr=3e-3)
    pred = lte_layers(model)[1].router
    assert isinstance(pred, ExpertPredictor) and sorted(curves) == [0, 1] and len(curves[1]) == 200
    assert sum(curves[1][-20:]) < sum(curves[1][:20])
    assert _overlap(pred, x, norms, n // 2) > _overlap(random_router, x, norms, n // 2) + 0.05
    set_routing(model, "topk", k=0.5)
    rep = sparsity_report(model, held)
    assert rep.flops["router"] == sum(router_flops(m.router) for m in lte_layers(model).values())
    with torch.no_grad():  # the sparse inference path reads the predictor too
        masked = model(IDS).logits
        set_routing(model, "topk", k=0.5, sparse=True)
        torch.testing.assert_close(model(IDS).logits, masked, atol=1e-5, rtol=1e-5)


def test_fit_predictors_is_seeded_and_keep_one_labels_everything(stock):
    a, _ = converted(stock, method="random")
    b, _ = converted(stock, method="random")
    data = [TOKENS[:256].view(8, 32)]
    ca = fit_predictors(a, data, keep=1.0, hidden=8, steps=60, batch_tokens=64, lr=1e-2, seed=3)
    cb = fit_predictors(b, data, keep=1.0, hidden=8, steps=60, batch_tokens=64, lr=1e-2, seed=3)
    assert ca == cb and ca[0][-1] < 0.1  # every expert matters: the all-ones label is easy
    with torch.no_grad():
        assert (lte_layers(a)[0].router(torch.randn(5, adapter(a).d_model)) > 0).all()


@pytest.mark.parametrize("kw,err,msg", [(dict(keep=0.0), ValueError, "keep must be"),
                                        (dict(keep=1.5), ValueError, "keep must be"),
                                        (dict(hidden=0), ValueError, "hidden must be"),
                                        (dict(steps=0), ValueError, "steps must be")])
def test_fit_predictors_bad_inputs(stock, kw, err, msg):
    model, _ = converted(stock, method="random")
    with pytest.raises(err, match=msg):
        fit_predictors(model, [IDS], **kw)


def test_fit_predictors_needs_sigmoid_routers(stock):
    model, _ = converted(stock, method="random", router="softmax")
    with pytest.raises(ValueError, match="sigmoid routers"):
        fit_predictors(model, [IDS])


def test_history_documents_itself():
    "The docs build renders every exported class: LTEHistory's inherited annotations must resolve in its module."
    import inspect

    from mdxlib.lte import LTEHistory

    params = inspect.signature(LTEHistory, eval_str=True).parameters
    assert {"ema", "checkpoint", "below_tau", "same_side"} <= set(params)
