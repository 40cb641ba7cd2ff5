"""mdxlib.prefrank from the outside: ranking accuracies, the idealized accuracy, the DPO loss and its theorems,
log-likelihoods of completions, DPO training with held-out tracking, flips by margin, the on-policy preference set."""
import math

import pytest
import torch
import torch.nn.functional as F

from mdxlib.models import encode_completions
from mdxlib.prefrank import (PAPER_BETAS, PairScores, PreferencePairs, SequenceLogprobs, block_inputs,
                             completion_logprobs, decoder_block_params, dpo_loss, flip_threshold, flips_by_margin,
                             idealized_ranking_accuracy, idealized_ranking_summary, load_capitals,
                             make_preference_pairs, optimal_log_ratio, ranked_correctly, ranking_accuracy,
                             ranking_accuracy_listwise, rate_ci, rate_pairs, sample_completions, sequence_logprobs,
                             sorting_reward, sorting_task, train_dpo, train_sft)
from mdxlib.train import TrainConfig


def _rand(n, seed, scale=5.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * scale for _ in range(4)]


# ---------------------------------------------------------------- ranking accuracy

def test_ranking_accuracy_counts_ties_in_likelihood_as_correct():
    assert ranking_accuracy([-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -3.0, -5.0]) == 0.75
    assert ranking_accuracy(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0


def test_tied_votes_use_probability_difference_in_log_space():
    # probabilities e^-50 and e^-60 differ by far less than 0.01 (and would underflow in float32 as plain numbers)
    correct = ranked_correctly([-50.0, -0.1, -0.1], [-60.0, -2.0, -0.1005], tie_votes=[True, True, True])
    assert correct.tolist() == [True, False, True]
    # a tied pair ranked "wrong" can still count as correct, and tie_eps matters
    assert ranked_correctly([-2.0], [-1.99], tie_votes=[True]).tolist() == [True]
    assert ranked_correctly([-0.5], [-0.4], tie_votes=[True], tie_eps=0.2).tolist() == [True]
    assert ranked_correctly([-0.5], [-0.4], tie_votes=[True], tie_eps=0.01).tolist() == [False]


@pytest.mark.parametrize("kwargs, err", [
    (dict(logp_chosen=[0.0, 1.0], logp_rejected=[0.0]), "lengths do not match"),
    (dict(logp_chosen=[float("nan")], logp_rejected=[0.0]), "NaN"),
    (dict(logp_chosen=[[0.0]], logp_rejected=[[0.0]]), "dimension"),
    (dict(logp_chosen=[], logp_rejected=[]), "empty"),
    (dict(logp_chosen=[0.0], logp_rejected=[0.0], tie_votes=[True, False]), "lengths do not match"),
    (dict(logp_chosen=[0.0], logp_rejected=[0.0], tie_eps=0.0), "tie_eps"),
])
def test_ranking_accuracy_bad_input(kwargs, err):
    with pytest.raises(ValueError, match=err):
        ranking_accuracy(**kwargs)


def test_ranking_accuracy_type_error_names_argument():
    with pytest.raises(TypeError, match="logp_rejected"):
        ranking_accuracy([0.0], "x")


def test_listwise_is_exact_match_and_reduces_to_pairwise():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -3.0, -2.0], [-2.0, -2.0, -5.0]])
    assert ranking_accuracy_listwise(lp, [[0, 1, 2], [0, 1, 2], [1, 0, 2]]) == pytest.approx(2 / 3)
    assert ranking_accuracy_listwise(lp, [[2, 1, 0]] * 3) == 0.0
    c, r, *_ = _rand(100, 0)
    assert ranking_accuracy_listwise(torch.stack([c, r], 1), [[0, 1]] * 100) == ranking_accuracy(c, r)


@pytest.mark.parametrize("ranking, err", [([[0, 0, 1]], "permutation"), ([[0, 1]], "shape"),
                                          ([[0.0, 1.0, 2.0]], "permutation")])
def test_listwise_bad_input(ranking, err):
    with pytest.raises(ValueError, match=err):
        ranking_accuracy_listwise([[0.0, 1.0, 2.0]], ranking)


# ---------------------------------------------------------------- idealized ranking accuracy

def test_optimal_log_ratio_known_value_and_clipping():
    assert optimal_log_ratio([-3.0], [-1.0], [0.8], beta=0.5).item() == pytest.approx(-2 + 2 * math.log(4), rel=1e-12)
    assert optimal_log_ratio([0.0], [0.0], [1.0], beta=1.0).item() == pytest.approx(math.log(999), rel=1e-9)
    assert optimal_log_ratio([0.0], [0.0], [0.0], beta=1.0, eps=0.01).item() == pytest.approx(-math.log(99), rel=1e-9)


def test_idealized_accuracy_works_in_log_space():
    # sequence log-likelihoods of -1000 nats: probabilities underflow to 0, their log-ratio does not
    assert idealized_ranking_accuracy([-1000.0], [-1001.0], [0.5], beta=1.0) == 1.0
    assert idealized_ranking_accuracy([-1001.0], [-1000.0], [0.9], beta=1.0) == 1.0  # logit(0.9) = 2.2 > 1
    assert idealized_ranking_accuracy([-1001.0], [-1000.0], [0.9], beta=10.0) == 0.0


def test_idealized_accuracy_monotone_in_beta_for_majority_votes():
    c, r, *_ = _rand(500, 1)
    alpha = torch.rand(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5 + 0.5
    values = [idealized_ranking_accuracy(c, r, alpha, b) for b in sorted(PAPER_BETAS)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # alpha >= 1/2: smaller beta, votes count more


def test_summary_min_median_max_and_gap():
    s = idealized_ranking_summary([-3.0, -1.0], [-1.0, -2.0], [0.8, 0.6], observed=0.25)
    assert (s["min"], s["median"], s["max"]) == (0.5, 0.5, 1.0)
    assert s["gap"] == pytest.approx(0.25) and set(s["per_beta"]) == set(PAPER_BETAS)
    assert "gap" not in idealized_ranking_summary([0.0], [0.0], [0.7])
    with pytest.raises(ValueError, match="betas"):
        idealized_ranking_summary([0.0], [0.0], [0.7], betas=[])
    with pytest.raises(ValueError, match="observed"):
        idealized_ranking_summary([0.0], [0.0], [0.7], observed=1.5)


@pytest.mark.parametrize("kwargs, err", [
    (dict(alpha=[1.2, 0.5]), "alpha"), (dict(alpha=[-0.1, 0.5]), "alpha"), (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"), (dict(beta=float("nan")), "beta"), (dict(alpha=[0.5]), "lengths do not match"),
    (dict(eps=0.5), "eps"),
])
def test_idealized_bad_input(kwargs, err):
    args = dict(ref_logp_chosen=[0.0, 1.0], ref_logp_rejected=[1.0, 0.0], alpha=[0.8, 0.9], beta=1.0)
    with pytest.raises(ValueError, match=err):
        idealized_ranking_accuracy(**{**args, **kwargs})


# ---------------------------------------------------------------- DPO loss and the theorems (property tests)

def test_dpo_loss_gamma_one_is_dpo():
    pc, pr, rc, rr = _rand(50, 2)
    expected = -F.logsigmoid(0.3 * ((pc - rc) - (pr - rr)))
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, 0.3), expected)
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, 0.3, gamma=0.0), -F.logsigmoid(0.3 * (pc - pr)))
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, 0.3, gamma=2.0), -F.logsigmoid(0.3 * ((pc - pr) + 2 * (rr - rc))))


def test_dpo_loss_gradient_reaches_policy_only():
    pc, pr = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rc, rr = torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)
    dpo_loss(pc, pr, rc, rr, beta=0.1).sum().backward()
    g = -0.1 * (1 - torch.sigmoid(torch.tensor(0.1)))
    assert torch.allclose(pc.grad, g.expand(3)) and torch.allclose(pr.grad, -g.expand(3))
    assert rc.grad is None and rr.grad is None


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta, gamma", [(0.01, 1.0), (0.1, 1.0), (1.0, 1.0), (10.0, 1.0), (0.5, 0.25), (2.0, 2.0)])
def test_thm_4_1_and_prop_2_6_on_random_inputs(seed, beta, gamma):
    pc, pr, rc, rr = _rand(20_000, seed)
    pr[:100] = pc[:100]  # policy ties: ranked correctly, the loss exactly at the threshold
    loss, thr = dpo_loss(pc, pr, rc, rr, beta, gamma), flip_threshold(rc, rr, beta, gamma)
    correct = ranked_correctly(pc, pr)
    clear = (beta * (pc - pr)).abs() > 1e-9
    assert torch.equal((loss <= thr)[clear], correct[clear])  # Thm 4.1: R = 1 iff L <= -log sigma(beta gamma c)
    assert (loss <= thr)[:100].all() and correct[:100].all()
    if gamma == 1.0:
        prop = (rc >= rr) & (loss <= 0.6)
        assert prop.any() and correct[prop].all()  # Prop 2.6
        assert (thr[rc >= rr] >= math.log(2) - 1e-12).all() and (thr[rc < rr] < math.log(2)).all()


@pytest.mark.parametrize("seed", range(3))
def test_thm_3_1_optimum_is_stationary_point_of_rater_level_dpo(seed):
    "At the log-ratio of Thm 3.1 the expected DPO loss over the raters' votes has zero gradient."
    _, _, rc, rr = _rand(200, seed)
    alpha = torch.rand(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.98 + 0.01
    beta = 0.3
    d = optimal_log_ratio(rc, rr, alpha, beta).clone().requires_grad_(True)  # policy log pi(y_w) - log pi(y_l)
    zero = torch.zeros_like(d)
    loss = alpha * dpo_loss(d, zero, rc, rr, beta) + (1 - alpha) * dpo_loss(zero, d, rr, rc, beta)
    (grad,) = torch.autograd.grad(loss.sum(), d)
    assert grad.abs().max() < 1e-10


@pytest.mark.parametrize("kwargs, exc, err", [
    (dict(beta=0.0), ValueError, "beta"), (dict(beta=-1), ValueError, "beta"), (dict(gamma=-0.5), ValueError, "gamma"),
    (dict(pol_r=torch.zeros(3)), ValueError, "lengths do not match"), (dict(pol_c=[0.0, 0.0]), TypeError, "pol_c"),
    (dict(ref_c=torch.zeros(2, 1)), ValueError, "ref_c"),
])
def test_dpo_loss_bad_input(kwargs, exc, err):
    args = dict(pol_c=torch.zeros(2), pol_r=torch.zeros(2), ref_c=torch.zeros(2), ref_r=torch.zeros(2), beta=0.1)
    with pytest.raises(exc, match=err):
        dpo_loss(**{**args, **kwargs})


def test_flip_threshold_bad_input():
    with pytest.raises(ValueError, match="lengths do not match"):
        flip_threshold([0.0, 1.0], [0.0], 0.1)
    with pytest.raises(ValueError, match="beta"):
        flip_threshold([0.0], [0.0], 0.0)


# ---------------------------------------------------------------- log-likelihoods of completions

PROMPTS = ["Q: What is the capital of France?\nA:", "Hi", "Q: 2 + 2 =", "A much longer prompt, to force padding:"]
COMPLETIONS = [" Paris", " there, how are you doing today?", " 4", " ok"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    from mdxlib.models import tiny_lm

    return tiny_lm(request.param)


def test_sequence_logprobs_batch_and_padding_invariant(lm):
    model, tok = lm
    full = sequence_logprobs(model, tok, PROMPTS, COMPLETIONS, batch_size=4)
    assert isinstance(full, SequenceLogprobs) and full.logp.shape == (4,) and (full.logp < 0).all()
    for bs in (1, 2, 3):
        again = sequence_logprobs(model, tok, PROMPTS, COMPLETIONS, batch_size=bs)
        assert torch.allclose(again.logp, full.logp, atol=1e-5)
    perm = [3, 1, 0, 2]  # other neighbours in the batch, other padding
    shuffled = sequence_logprobs(model, tok, [PROMPTS[i] for i in perm], [COMPLETIONS[i] for i in perm], batch_size=4)
    assert torch.allclose(shuffled.logp, full.logp[perm], atol=1e-5)
    assert torch.equal(full.n_tokens, torch.tensor([len(c.encode()) for c in COMPLETIONS]))
    assert torch.allclose(full.mean, full.logp / full.n_tokens)


def test_sequence_logprobs_matches_hand_computation_and_excludes_prompt(lm):
    model, tok = lm
    got = sequence_logprobs(model, tok, PROMPTS[:1], COMPLETIONS[:1]).logp[0]
    ids = tok(PROMPTS[0]).input_ids + tok(COMPLETIONS[0], add_special_tokens=False).input_ids
    n_prompt = len(tok(PROMPTS[0]).input_ids)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(got, logp[n_prompt - 1 :].sum(), atol=1e-5)
    assert not torch.allclose(got, logp.sum(), atol=1e-3)


def test_sequence_logprobs_chat_template_and_mode_restored(lm):
    model, tok = lm
    model.train()
    plain = sequence_logprobs(model, tok, PROMPTS, COMPLETIONS)
    chat = sequence_logprobs(model, tok, PROMPTS, COMPLETIONS, chat_template=True)
    assert model.training  # the caller's mode is restored
    model.eval()
    assert torch.equal(plain.n_tokens, chat.n_tokens) and not torch.allclose(plain.logp, chat.logp)


def test_sequence_logprobs_bad_input(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="pair up"):
        sequence_logprobs(model, tok, PROMPTS, COMPLETIONS[:2])
    with pytest.raises(ValueError, match=r"completions\[1\]"):
        sequence_logprobs(model, tok, ["a", "b"], ["x", ""])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        sequence_logprobs(model, tok, [""], ["x"])
    with pytest.raises(TypeError, match="prompts"):
        sequence_logprobs(model, tok, "a prompt", ["x"])
    with pytest.raises(ValueError, match="batch_size"):
        sequence_logprobs(model, tok, PROMPTS, COMPLETIONS, batch_size=0)
    with pytest.raises(TypeError, match="model"):
        sequence_logprobs("gpt2", tok, PROMPTS, COMPLETIONS)


def test_cached_block_inputs_give_the_full_forward(lm):
    model, tok = lm
    enc = encode_completions(tok, PROMPTS, COMPLETIONS)
    with torch.no_grad():
        full = completion_logprobs(model, enc).logp
        cached = block_inputs(model, enc, block=1, batch_size=3)
        assert [h.shape[0] for h in cached] == [len(p) + len(c) for p, c in enc]
        part = completion_logprobs(model, enc, start_block=1, block_inputs=cached).logp
        assert torch.allclose(part, full, atol=1e-5)
        assert torch.allclose(completion_logprobs(model, enc).logp, full, atol=1e-6)  # all blocks back in place
    with pytest.raises(ValueError, match="block_inputs"):
        completion_logprobs(model, enc, start_block=1)
    with pytest.raises(ValueError, match="block"):
        block_inputs(model, enc, block=2)


# ---------------------------------------------------------------- data

def test_capitals_and_pairs():
    facts = load_capitals()
    assert len(facts) == 104 and list(facts.columns) == ["country", "capital", "distractor"]
    assert (facts.capital != facts.distractor).all() and facts.country.is_unique
    pairs = make_preference_pairs(20, 10, seed=3)
    assert len(pairs) == 30 and ((pairs.alpha > 0.5) & (pairs.alpha <= 1)).all()
    assert set((pairs.alpha * 5).round().tolist()) <= {3.0, 4.0, 5.0}
    assert pairs.kind.count("capital") == 20 and pairs.kind.count("sum") == 10
    right = dict(zip(facts.country, facts.capital))
    for p, c, r, k in zip(pairs.prompts, pairs.chosen, pairs.rejected, pairs.kind):
        if k == "capital":
            assert right[p.split("capital of ")[1].split("?")[0]] in (c.strip(), r.strip())
    assert make_preference_pairs(20, 10, seed=3).chosen == pairs.chosen
    sub = pairs[[0, 2]]
    assert sub.prompts == [pairs.prompts[0], pairs.prompts[2]] and torch.equal(sub.alpha, pairs.alpha[[0, 2]])


@pytest.mark.parametrize("kwargs, err", [(dict(n_raters=4), "n_raters"), (dict(n_capitals=200), "n_capitals"),
                                         (dict(n_capitals=0, n_sums=0), "n_sums")])
def test_make_pairs_bad_input(kwargs, err):
    with pytest.raises(ValueError, match=err):
        make_preference_pairs(**kwargs)


def test_preference_pairs_validates():
    with pytest.raises(ValueError, match="alpha"):
        PreferencePairs(["a"], ["b"], ["c"], [1.5])
    with pytest.raises(ValueError, match="lengths do not match"):
        PreferencePairs(["a", "b"], ["b"], ["c"], [0.6])


# ---------------------------------------------------------------- DPO training

def test_train_dpo_tracks_R_and_flips_and_trains_only_subset():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    pairs = make_preference_pairs(4, 4, seed=0)
    params = decoder_block_params(model, 1)
    chosen = {id(p) for p in params}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in chosen}
    cfg = TrainConfig(steps=8, lr=3e-3, weight_decay=0.0, eval_every=4, seed=0)
    run = train_dpo(model, None, pairs, beta=0.5, tokenizer=tok, config=cfg, params=params, batch_size=4)
    ev = run.evals
    assert ev.step.tolist() == [0, 4, 8] and set(ev.columns) >= {"R", "loss", "flipped"}
    assert ev.loss[0] == pytest.approx(math.log(2), rel=1e-5) and ev.flipped[0] == 0
    assert ev.loss.iloc[-1] < ev.loss[0]
    assert ev.R.iloc[-1] == ranking_accuracy(run.pol_c, run.pol_r)
    loss, thr = dpo_loss(run.pol_c, run.pol_r, run.ref_c, run.ref_r, 0.5), flip_threshold(run.ref_c, run.ref_r, 0.5)
    assert torch.equal(loss <= thr, ranked_correctly(run.pol_c, run.pol_r))
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if id(p) not in chosen)
    assert all(p.requires_grad for p in model.parameters())  # the loop gives back requires_grad


def test_train_dpo_precomputed_reference_equals_model_reference():
    from mdxlib.models import tiny_lm

    pairs = make_preference_pairs(3, 3, seed=1)
    cfg = TrainConfig(steps=2, lr=1e-3, weight_decay=0.0, seed=0)
    m1, tok = tiny_lm("llama")
    ref_model, _ = tiny_lm("llama", seed=1)  # a reference different from the policy
    a = train_dpo(m1, ref_model, pairs, 0.1, tok, cfg, batch_size=3)
    rc = sequence_logprobs(ref_model, tok, pairs.prompts, pairs.chosen).logp
    rr = sequence_logprobs(ref_model, tok, pairs.prompts, pairs.rejected).logp
    assert torch.allclose(a.ref_c, rc.double(), atol=1e-5) and a.evals.loss[0] != pytest.approx(math.log(2))
    m2, _ = tiny_lm("llama")
    b = train_dpo(m2, (rc, rr), pairs, 0.1, tok, cfg, batch_size=3)
    assert torch.allclose(a.pol_c, b.pol_c, atol=1e-4) and torch.allclose(a.pol_r, b.pol_r, atol=1e-4)


def test_train_dpo_bad_input():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    pairs = make_preference_pairs(2, 2, seed=0)
    cfg = TrainConfig(steps=1)
    with pytest.raises(ValueError, match="beta"):
        train_dpo(model, None, pairs, 0.0, tok, cfg)
    with pytest.raises(ValueError, match="gamma"):
        train_dpo(model, None, pairs, 0.1, tok, cfg, gamma=-1.0)
    with pytest.raises(TypeError, match="pairs"):
        train_dpo(model, None, [("a", "b", "c")], 0.1, tok, cfg)
    with pytest.raises(TypeError, match="ref"):
        train_dpo(model, "ref", pairs, 0.1, tok, cfg)
    with pytest.raises(ValueError, match="lengths do not match"):
        train_dpo(model, (torch.zeros(3), torch.zeros(3)), pairs, 0.1, tok, cfg)
    with pytest.raises(ValueError, match="last"):
        decoder_block_params(model, 5)
    with pytest.raises(ValueError, match="train_blocks"):
        train_dpo(model, None, pairs, 0.1, tok, cfg, params=decoder_block_params(model, 1), train_blocks=1)
    with pytest.raises(ValueError, match="last"):
        train_dpo(model, None, pairs, 0.1, tok, cfg, train_blocks=3)


def test_train_dpo_cached_blocks_equal_plain_subset():
    from mdxlib.models import tiny_lm

    pairs = make_preference_pairs(3, 3, seed=2)
    cfg = TrainConfig(steps=3, lr=3e-3, weight_decay=0.0, seed=0)
    m1, tok = tiny_lm("llama")
    m2, _ = tiny_lm("llama")
    a = train_dpo(m1, None, pairs, 0.5, tok, cfg, train_blocks=1, batch_size=3)
    b = train_dpo(m2, None, pairs, 0.5, tok, cfg, params=decoder_block_params(m2, 1), batch_size=3)
    assert torch.allclose(a.pol_c, b.pol_c, atol=1e-4) and torch.allclose(a.pol_r, b.pol_r, atol=1e-4)
    assert not torch.allclose(a.pol_c, a.ref_c)


def test_sequence_logprobs_from_tokens():
    s = SequenceLogprobs.from_tokens([torch.tensor([-1.0, -2.0]), torch.tensor([-3.0])])
    assert s.logp.tolist() == [-3.0, -3.0] and s.n_tokens.tolist() == [2, 1] and s.mean.tolist() == [-1.5, -3.0]


def test_listwise_without_prompts_is_an_error():
    with pytest.raises(ValueError, match="N >= 1"):
        ranking_accuracy_listwise(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))


@pytest.mark.parametrize("gamma", [float("nan"), float("inf"), -1.0])
def test_flip_threshold_refuses_a_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        flip_threshold([0.0, 1.0], [1.0, 0.0], 0.1, gamma=gamma)
    with pytest.raises(ValueError, match="gamma"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1, gamma=gamma)


# ---------------------------------------------------------------- held-out tracking and the kept checkpoint

def _swapped(pairs):
    return PreferencePairs(pairs.prompts, pairs.rejected, pairs.chosen, 1 - pairs.alpha)


def test_train_dpo_keeps_lowest_heldout_loss_not_last_step():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    pairs = make_preference_pairs(4, 4, seed=0)
    cfg = TrainConfig(steps=8, lr=3e-3, weight_decay=0.0, eval_every=2, seed=0)
    run = train_dpo(model, None, pairs, 0.5, tok, cfg, batch_size=4, heldout=_swapped(pairs))
    ev = run.evals
    assert ev.step.tolist() == [0, 2, 4, 6, 8]
    assert {"heldout_R", "heldout_loss", "heldout_flipped"} <= set(ev.columns)
    assert ev.loss.iloc[-1] < ev.loss[0] and ev.heldout_loss.iloc[-1] > ev.heldout_loss[0]  # last step is the worst
    assert run.best_step == 0 and ev.heldout_loss.idxmin() == 0
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # the model is the kept checkpoint
    assert torch.equal(run.pol_c, run.ref_c) and torch.equal(run.heldout.pol_c, run.heldout.ref_c)
    assert not torch.allclose(run.train_final.pol_c, run.ref_c)  # ... while the end of training moved
    assert ev.heldout_loss.iloc[-1] == pytest.approx(run.heldout_final.metrics(0.5)["loss"])


def test_train_dpo_kept_checkpoint_is_the_returned_model():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    pairs = make_preference_pairs(4, 4, seed=3)
    heldout = make_preference_pairs(3, 3, seed=4)
    cfg = TrainConfig(steps=6, lr=3e-3, weight_decay=0.0, eval_every=1, seed=0)
    run = train_dpo(model, None, pairs, 0.5, tok, cfg, batch_size=4, heldout=heldout)
    ev = run.evals.set_index("step")
    assert ev.heldout_loss[run.best_step] == ev.heldout_loss.min()
    now = [sequence_logprobs(model, tok, heldout.prompts, y).logp.double() for y in (heldout.chosen, heldout.rejected)]
    assert torch.allclose(now[0], run.heldout.pol_c, atol=1e-5) and torch.allclose(now[1], run.heldout.pol_r, atol=1e-5)
    assert run.heldout.metrics(0.5)["loss"] == pytest.approx(ev.heldout_loss.min())
    assert ev.R[run.best_step] == pytest.approx(ranking_accuracy(run.pol_c, run.pol_r))


def test_train_dpo_without_heldout_keeps_last_step():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    pairs = make_preference_pairs(3, 3, seed=0)
    run = train_dpo(model, None, pairs, 0.5, tok, TrainConfig(steps=3, lr=3e-3, seed=0), batch_size=3)
    assert run.best_step == 3 and run.heldout is None and run.heldout_final is None
    assert torch.equal(run.train.pol_c, run.train_final.pol_c)


def test_train_dpo_heldout_with_precomputed_reference():
    from mdxlib.models import tiny_lm

    pairs, heldout = make_preference_pairs(3, 3, seed=0), make_preference_pairs(2, 2, seed=5)
    cfg = TrainConfig(steps=2, lr=1e-3, seed=0)
    ref_model, tok = tiny_lm("llama", seed=1)
    m1, _ = tiny_lm("llama")
    a = train_dpo(m1, ref_model, pairs, 0.1, tok, cfg, batch_size=3, heldout=heldout)
    m2, _ = tiny_lm("llama")
    b = train_dpo(m2, (a.ref_c, a.ref_r), pairs, 0.1, tok, cfg, batch_size=3, heldout=heldout,
                  heldout_ref=(a.heldout.ref_c, a.heldout.ref_r))
    assert torch.allclose(a.heldout.pol_c, b.heldout.pol_c, atol=1e-5) and a.best_step == b.best_step


def test_train_dpo_heldout_bad_input():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    pairs = make_preference_pairs(2, 2, seed=0)
    cfg = TrainConfig(steps=1)
    ref = (torch.zeros(4), torch.zeros(4))
    with pytest.raises(TypeError, match="heldout"):
        train_dpo(model, None, pairs, 0.1, tok, cfg, heldout=[("a", "b", "c")])
    with pytest.raises(ValueError, match="heldout_ref"):
        train_dpo(model, None, pairs, 0.1, tok, cfg, heldout_ref=ref)
    with pytest.raises(ValueError, match="heldout_ref"):
        train_dpo(model, ref, pairs, 0.1, tok, cfg, heldout=pairs)
    with pytest.raises(ValueError, match="lengths do not match"):
        train_dpo(model, ref, pairs, 0.1, tok, cfg, heldout=pairs, heldout_ref=(torch.zeros(3), torch.zeros(3)))
    with pytest.raises(TypeError, match="heldout_ref"):
        train_dpo(model, ref, pairs, 0.1, tok, cfg, heldout=pairs, heldout_ref="ref")


# ---------------------------------------------------------------- flips by reference margin

def _scores():
    return PairScores(ref_c=torch.tensor([-5.0, -5.0, -5.0, -5.0, -1.0, -9.0]),
                      ref_r=torch.tensor([-4.5, -4.0, -1.0, -2.0, -3.0, -1.0]),
                      pol_c=torch.tensor([-4.0, -5.0, -5.0, -1.0, -1.0, -9.0]),
                      pol_r=torch.tensor([-4.5, -4.0, -1.0, -2.0, -3.0, -1.0]))


def test_rate_ci_is_wilson():
    ci = rate_ci([1] * 5 + [0] * 15)
    assert ci.estimate == 0.25
    assert ci.low == pytest.approx(0.1119, abs=1e-4) and ci.high == pytest.approx(0.4687, abs=1e-4)
    none, every = rate_ci([False] * 10), rate_ci([True] * 10)
    assert none.low == 0.0 and 0.2 < none.high < 0.35 and every.high == pytest.approx(1.0) and every.low < 1
    assert rate_ci([True] * 5 + [False] * 15, confidence=0.5).high < ci.high  # narrower at lower confidence


def test_flips_by_margin_counts_and_bins():
    s = _scores()
    assert s.initially_wrong.tolist() == [True, True, True, True, False, True]
    assert s.flipped.tolist() == [True, False, False, True, False, False]
    t = flips_by_margin(s, edges=[0, 2, 5, math.inf])
    assert t.c.tolist() == ["(0, 2]", "(2, 5]", "(5, inf]", "all"]
    assert t.n.tolist() == [2, 2, 1, 5] and t.flipped.tolist() == [1, 1, 0, 2]
    assert t.share.tolist() == [0.5, 0.5, 0.0, 0.4] and ((t.low <= t.share) & (t.share <= t.high)).all()
    d = flips_by_margin(s, n_bins=2)  # equal-count bins over the mis-ranked pairs' c
    assert d.n.iloc[:-1].sum() == 5 and d.iloc[-1].tolist()[1:3] == [5, 2]
    assert flips_by_margin(s, edges=[10, 20]).c.tolist() == ["all"]  # empty bins are left out


def test_flips_by_margin_bad_input():
    s = _scores()
    with pytest.raises(ValueError, match="strictly increasing"):
        flips_by_margin(s, edges=[2, 0])
    with pytest.raises(ValueError, match="strictly increasing"):
        flips_by_margin(s, edges=[1])
    with pytest.raises(ValueError, match="nothing to flip"):
        flips_by_margin(PairScores(*[torch.zeros(2)] * 4))
    with pytest.raises(TypeError, match="scores"):
        flips_by_margin((s.ref_c, s.ref_r, s.pol_c, s.pol_r))
    with pytest.raises(ValueError, match="n_bins"):
        flips_by_margin(s, n_bins=0)
    with pytest.raises(ValueError, match="hits"):
        rate_ci([])
    with pytest.raises(ValueError, match="hits"):
        rate_ci([0, 2])
    with pytest.raises(ValueError, match="confidence"):
        rate_ci([1, 0], confidence=1.0)


# ---------------------------------------------------------------- the on-policy preference set

def test_sorting_task_and_reward():
    prompts, answers = sorting_task(20, 12, 36, seed=0)
    assert prompts == sorting_task(20, 12, 36, seed=0)[0] and prompts != sorting_task(20, 12, 36, seed=1)[0]
    for p, a in zip(prompts, answers):
        digits = p.removeprefix("sort: ").removesuffix(" =").split()
        assert 12 <= len(digits) <= 36 and a.split() == sorted(digits) and sorting_reward(a, a) == 1.0
    assert sorting_reward(" 1 2", " 1 2 3") == pytest.approx(0.8) and sorting_reward("", " 1") == 0.0
    with pytest.raises(ValueError, match="max_len"):
        sorting_task(2, 5, 4)
    with pytest.raises(ValueError, match="n"):
        sorting_task(0)
    with pytest.raises(TypeError, match="completion"):
        sorting_reward(3, " 1")


def test_rate_pairs_majority_and_alpha():
    n = 400
    g = torch.Generator().manual_seed(0)
    r1, r2 = torch.rand(n, generator=g), torch.rand(n, generator=g)
    first, second = [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)]
    p = rate_pairs(["x"] * n, first, second, r1, r2, n_raters=5, sharpness=10.0, seed=0)
    assert ((p.alpha > 0.5) & (p.alpha <= 1)).all() and set((5 * p.alpha).round().tolist()) <= {3.0, 4.0, 5.0}
    better_won = torch.tensor([c.startswith("a") for c in p.chosen]) == (r1 > r2)
    assert better_won.double().mean() > 0.8  # Bradley-Terry raters mostly side with the higher reward
    assert p.chosen == rate_pairs(["x"] * n, first, second, r1, r2, seed=0).chosen  # seeded
    with pytest.raises(ValueError, match="n_raters"):
        rate_pairs(["x"], ["a"], ["b"], [1.0], [0.0], n_raters=2)
    with pytest.raises(ValueError, match="sharpness"):
        rate_pairs(["x"], ["a"], ["b"], [1.0], [0.0], sharpness=0.0)
    with pytest.raises(ValueError, match="lengths do not match"):
        rate_pairs(["x", "y"], ["a"], ["b"], [1.0], [0.0])


def test_sft_then_sampling_stops_and_flags_truncation():
    from mdxlib.models import tiny_lm

    model, tok = tiny_lm("llama")
    prompts, answers = sorting_task(64, 2, 4, seed=0)
    hist = train_sft(model, tok, prompts, answers, TrainConfig(steps=30, lr=1e-2, seed=0), batch_size=32)
    assert hist.loss[-1] < hist.loss[0] / 2
    s = sample_completions(model, tok, prompts[:8], max_new_tokens=12, batch_size=4, seed=0)
    assert s.text == sample_completions(model, tok, prompts[:8], max_new_tokens=12, batch_size=4, seed=0).text
    assert s.truncated.tolist() == [not t.endswith(tok.eos_token) for t in s.text]
    assert ((s.n_tokens >= 1) & (s.n_tokens <= 12)).all() and (~s.truncated).any()
    short = sample_completions(model, tok, prompts[:4], max_new_tokens=1, seed=0)
    assert short.truncated.all() or all(t == tok.eos_token for t, c in zip(short.text, short.truncated) if not c)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample_completions(model, tok, prompts[:2], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        sample_completions(model, tok, [])
