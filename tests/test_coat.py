"""COAT through its public API: the AG7 generator against its definition, FCI on the truth, the loop with each
backend, malformed language-model output, the metrics' known values and bad input."""
import numpy as np
import pytest

from mdxlib.coat import (AG_BLANKET, AG_EDGES, AG_FACTORS, AG_TARGET, COAT, LEXICON, CausalGraph, DataDrivenProposer,
                         Factor, LexiconAnnotator, LMAnnotator, LMProposer, NoDataProposer, OracleProposer,
                         RandomFeedbackCOAT, apple_gastronome, blanket_scores, cached_logprobs, fci_graph,
                         parse_factors, sample_factor_table, structural_hamming_distance, true_graph, write_review,
                         y_classes)
from mdxlib.models import tiny_lm

ORACLE = [LEXICON[k] for k in ("size", "aroma", "taste", "recommendation", "nutrition")]


@pytest.fixture(scope="module")
def ag():
    return apple_gastronome(200, seed=0)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", max_position_embeddings=2048)


def test_generator_matches_its_definition():
    t = sample_factor_table(20_000, np.random.default_rng(1))
    assert np.allclose((t[["size", "aroma", "taste", "nutrition"]] != 0).mean(), 0.9, atol=0.01)
    tasted = t[(t.taste != 0) & (t.juiciness != 0)]
    assert abs((tasted.juiciness == tasted.taste).mean() - 0.7) < 0.015
    assert abs((t["score"] - t["taste"] - t["size"] - t["aroma"]).std() - 0.5) < 0.01
    strong = t[t["score"].abs() > 1]
    assert ((strong.recommendation == np.sign(strong["score"])) | (strong.recommendation == 0)).all()
    assert abs(np.corrcoef(t.nutrition, t["score"])[0, 1]) < 0.03  # the spouse is marginally independent


def test_reviews_mention_exactly_the_nonzero_factors():
    row = dict(size=1, aroma=0, taste=-1, nutrition=0, juiciness=0, recommendation=1, colour=0, price=0, origin=0)
    text = write_review(row, np.random.default_rng(0))
    annotator = LexiconAnnotator()
    got = {k: int(annotator.annotate([text], LEXICON[k])[0]) for k in row}
    assert all(got[k] in (row[k], 0) for k in row) and got["aroma"] == got["colour"] == 0


def test_faithful_draw_and_fci_recover_the_truth(ag):
    assert len(ag.texts) == 200 and ag.attempts >= 1
    assert apple_gastronome(200, seed=0).texts == ag.texts
    found = fci_graph(ag.factors)
    assert found.markov_blanket(AG_TARGET) == set(AG_BLANKET)
    assert structural_hamming_distance(found, true_graph()) == 0
    assert {frozenset((a, b)) for a, _, b in found.edges} == {frozenset(e) for e in AG_EDGES}


def test_oracle_loop_finds_the_spouse_after_its_child(ag):
    coat = COAT(OracleProposer(ORACLE), LexiconAnnotator(), rounds=3, seed=0)
    run = coat.run(ag.texts, ag.y, true_blanket=AG_BLANKET)
    assert [r.proposed for r in run.rounds] == [["size", "aroma"], ["taste", "recommendation"], ["nutrition"]]
    assert set(run.blanket) == set(AG_BLANKET) and blanket_scores(run.blanket)["f1"] == 1.0
    assert [r.p for r in run.rounds] == [1.0, 1.0, 1.0]
    assert run.annotations.shape == (200, 5) and len(run.table()) == 3 and "cluster" not in run.table()
    assert len(run.rounds[0].cluster) == 100 and all(r.cluster_size == len(r.cluster) for r in run.rounds)
    assert all(len(np.unique(r.cluster)) == r.cluster_size for r in run.rounds)


def test_data_driven_and_no_data_loops_run(ag):
    coat = COAT(DataDrivenProposer(), LexiconAnnotator(0.1, seed=0), rounds=3, seed=0, stop_early=False)
    run = coat.run(ag.texts, ag.y)
    assert len(run.rounds) == 3 and all(len(r.proposed) <= 2 for r in run.rounds)
    assert all(set(r.kept) <= set(r.proposed) and r.p is None for r in run.rounds)
    assert set(run.blanket) <= set(run.annotations.columns)
    nodata = COAT(NoDataProposer(n_factors=4, seed=0), LexiconAnnotator(), rounds=1).run(ag.texts, ag.y)
    assert len(nodata.rounds[0].proposed) == 4


def test_random_feedback_control_feeds_back_random_halves(ag):
    "The control differs from COAT only in the samples fed back: a seeded random half every round, same budget."
    args = (DataDrivenProposer(), LexiconAnnotator(0.1, seed=0))
    run = RandomFeedbackCOAT(*args, rounds=3, seed=0, stop_early=False).run(ag.texts, ag.y, true_blanket=AG_BLANKET)
    again = RandomFeedbackCOAT(*args, rounds=3, seed=0, stop_early=False).run(ag.texts, ag.y)
    assert isinstance(run, type(COAT(*args).run(ag.texts, ag.y)))
    assert all(r.cluster_size == 100 and len(np.unique(r.cluster)) == 100 for r in run.rounds)
    assert [r.cluster.tolist() for r in run.rounds] == [r.cluster.tolist() for r in again.rounds]  # seeded
    assert run.rounds[1].cluster.tolist() != run.rounds[2].cluster.tolist()  # a fresh half each round
    assert all(len(r.proposed) <= 2 for r in run.rounds) and len(run.rounds) == 3
    coat = COAT(*args, rounds=3, seed=0, stop_early=False).run(ag.texts, ag.y)
    assert coat.rounds[0].cluster.tolist() == run.rounds[0].cluster.tolist()  # round 1 is random in both
    assert any(a.cluster.tolist() != b.cluster.tolist() for a, b in zip(coat.rounds[1:], run.rounds[1:]))
    with pytest.raises(TypeError, match="proposer"):
        RandomFeedbackCOAT("gpt-4", LexiconAnnotator())


def test_one_round_without_threshold_spends_more_of_its_budget(ag):
    shown = {c: [t for t, k in zip(ag.texts, y_classes(ag.y)) if k == c][:20] for c in (0, 1)}
    capped = DataDrivenProposer(max_factors=6).propose(shown, [])
    free = DataDrivenProposer(max_factors=6, min_score=0.0).propose(shown, [])
    assert len(capped) <= len(free) <= 6 and [f.name for f in capped] == [f.name for f in free][: len(capped)]


def test_kernel_ci_test_runs():
    small = apple_gastronome(60, seed=0, faithful=False)
    proposer = OracleProposer([LEXICON["size"], LEXICON["taste"]])
    run = COAT(proposer, LexiconAnnotator(), ci_test="kci", rounds=1).run(small.texts, small.y)
    assert set(run.blanket) <= set(run.rounds[0].kept) <= {"size", "taste"}


def test_constant_and_duplicate_factors_are_rejected(ag):
    never = LEXICON["shelf life"]  # the writer never uses it: all zeros
    twin = Factor("flavour", "same as taste", LEXICON["taste"].positive, LEXICON["taste"].negative)
    proposer = OracleProposer([LEXICON["taste"], never, twin], max_factors=3)
    run = COAT(proposer, LexiconAnnotator(), rounds=1).run(ag.texts, ag.y)
    assert run.rounds[0].kept == ["taste"]
    assert "constant" in run.rounds[0].rejected["shelf life"] and "duplicate" in run.rounds[0].rejected["flavour"]


def test_lm_backend_runs_and_survives_malformed_output(ag, lm, tmp_path):
    model, tok = lm
    scored = LMProposer(model, tok, n_show=1, model_id="tiny", cache=tmp_path / "lp.json")
    run = COAT(scored, LexiconAnnotator(), rounds=2, stop_early=False).run(ag.texts, ag.y)
    assert len(run.rounds) == 2 and all(len(r.proposed) == 2 for r in run.rounds)
    assert (tmp_path / "lp.json").exists()
    free = LMProposer(model, tok, mode="generate", max_new_tokens=5)
    assert free.propose({0: ag.texts[:1], 1: ag.texts[1:2]}, []) == [] and free.malformed == 1
    values = LMAnnotator(model, tok).annotate(ag.texts[:2], LEXICON["taste"])
    assert values.shape == (2,) and set(values) <= {-1, 0, 1}


def test_cached_logprobs_reads_the_cache(lm, tmp_path):
    model, tok = lm
    first = cached_logprobs(model, tok, ["p", "q"], [" 1", " 0"], model_id="tiny", cache=tmp_path / "c.json")
    again = cached_logprobs(None, None, ["q"], [" 0"], model_id="tiny", cache=tmp_path / "c.json")  # no model needed
    assert first.shape == (2,) and (first < 0).all() and again[0] == first[1]


def test_parse_factors():
    assert parse_factors("factor: crunchiness; values: 1 if crunchy") == ([("crunchiness", "1 if crunchy")], 0)
    assert parse_factors("Factor: Size, criteria: big or small\nfactor?") == ([("size", "big or small")], 1)
    assert parse_factors("1, 2, 3, 4") == ([], 1) and parse_factors("") == ([], 0)


def test_metrics_known_values():
    s = blanket_scores(["size", "taste", "juiciness", "colour"])
    assert (s["precision"], s["recall"], s["n_blanket"], s["n_distractor"], s["n_irrelevant"]) == (0.5, 0.4, 2, 1, 1)
    assert blanket_scores(AG_BLANKET)["f1"] == 1.0 and blanket_scores([])["f1"] == 0.0
    assert structural_hamming_distance(CausalGraph([AG_TARGET], []), true_graph()) == len(AG_EDGES)
    extra = CausalGraph(true_graph().nodes + ["colour"], true_graph().edges + [("colour", "o->", "score")])
    assert structural_hamming_distance(extra, true_graph()) == 1
    reversed_ = CausalGraph(true_graph().nodes, [("recommendation", "-->", "score") if e[0] == "score" else e
                                                 for e in true_graph().edges])
    assert structural_hamming_distance(reversed_, true_graph()) == 1
    assert true_graph().markov_blanket(AG_TARGET) == set(AG_BLANKET)
    assert y_classes([1.0, 2.0, 1.0]).tolist() == [0, 1, 0] and set(AG_FACTORS) > set(AG_BLANKET)


def test_bad_input(ag):
    with pytest.raises(ValueError, match="n"):
        apple_gastronome(3)
    with pytest.raises(ValueError, match="seed"):
        apple_gastronome(200, seed=-2)
    with pytest.raises(ValueError, match="name"):
        Factor("Big Apple!", "criteria")
    with pytest.raises(ValueError, match="criteria"):
        Factor("size", "")
    with pytest.raises(ValueError, match="ci_test"):
        COAT(OracleProposer(ORACLE), LexiconAnnotator(), ci_test="pearson")
    with pytest.raises(ValueError, match="alpha"):
        COAT(OracleProposer(ORACLE), LexiconAnnotator(), alpha=1.5)
    with pytest.raises(ValueError, match="rounds"):
        COAT(OracleProposer(ORACLE), LexiconAnnotator(), rounds=0)
    with pytest.raises(TypeError, match="annotator"):
        COAT(OracleProposer(ORACLE), "gpt-4")
    with pytest.raises(ValueError, match="lengths"):
        COAT(OracleProposer(ORACLE), LexiconAnnotator()).run(ag.texts, ag.y[:5])
    with pytest.raises(TypeError, match="texts"):
        COAT(OracleProposer(ORACLE), LexiconAnnotator()).run("one review", [1.0])
    with pytest.raises(ValueError, match="noise"):
        LexiconAnnotator(noise=-0.1)
    with pytest.raises(TypeError, match="samples_by_class"):
        DataDrivenProposer().propose(["a review"], [])
    with pytest.raises(TypeError, match="known_factors"):
        DataDrivenProposer().propose({0: ["a"]}, ["taste"])
    with pytest.raises(ValueError, match="n_factors"):
        NoDataProposer(n_factors=100)
    with pytest.raises(ValueError, match="constant"):
        fci_graph(ag.factors.assign(taste=1))
    with pytest.raises(ValueError, match="target"):
        true_graph().markov_blanket("colour")
    with pytest.raises(TypeError, match="predicted"):
        blanket_scores("size")
    with pytest.raises(TypeError, match="text"):
        parse_factors(3)
