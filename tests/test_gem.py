"mdxlib.gem from the outside: sprites, oracle, relation graph, recovery, graph prior, beta-VAE / GEM, MIG and DCI."
import numpy as np
import pytest
import torch

from mdxlib.core import seed_everything
from mdxlib.gem import (ATTRIBUTES, CORRELATIONS, INDEPENDENT, AttributeOracle, BetaVAE, GEM, attribute_accuracy, dci,
                        dci_scores, emulate_errors, encode_means, fit_vae, graph_correlation, graph_recovery, mig,
                        pixel_scores, reconstruction_error, relation_graph, true_relation, correlated_sprites)
from mdxlib.models import ModelNotAvailableError


@pytest.fixture(scope="module")
def sprites():
    return correlated_sprites(6000, seed=3)


# data --------------------------------------------------------------------------------------------------------------

def test_sprites_shapes_and_seeding(sprites):
    assert sprites.images.shape == (6000, 1, 32, 32) and sprites.images.dtype == torch.float32
    assert 0 <= sprites.images.min() and sprites.images.max() <= 1
    assert list(sprites.factors.columns) == ["shape", "scale", "x", "y", "brightness"]
    assert sprites.labels.shape == (6000, len(ATTRIBUTES)) and sprites.attributes == ATTRIBUTES
    again = correlated_sprites(6000, seed=3)
    assert torch.equal(again.images, sprites.images) and torch.equal(again.labels, sprites.labels)
    assert not torch.equal(correlated_sprites(50, seed=4).images, sprites.images[:50])
    assert correlated_sprites(5, size=48).images.shape == (5, 1, 48, 48)


def test_sprites_statistics_match_the_stated_correlations(sprites):
    y = sprites.labels.double()
    circle, top = y[:, 0] == 1, y[:, 5] == 1
    assert abs(y[circle, 3].mean() - CORRELATIONS["large|circle"]) < 0.03
    assert abs(y[~circle, 3].mean() - CORRELATIONS["large|other"]) < 0.03
    assert abs(y[top, 4].mean() - CORRELATIONS["bright|top"]) < 0.03
    assert abs(y[~top, 4].mean() - CORRELATIONS["bright|bottom"]) < 0.03
    assert (y[:, :3].sum(1) == 1).all()  # exactly one shape
    # the asymmetry of the planted relation: P(large | circle) - P(large) > P(circle | large) - P(circle)
    assert sprites.relation[0, 3] > sprites.relation[3, 0] > 0
    assert (relation_graph(sprites.labels.float()) - sprites.relation).abs().max() < 0.03


def test_true_relation_known_values():
    w, p = true_relation()
    torch.testing.assert_close(p[:3], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(p[3], torch.tensor((0.8 + 0.35 + 0.35) / 3, dtype=torch.float64))
    torch.testing.assert_close(w[0, 3], torch.tensor(0.8 - 0.5, dtype=torch.float64))
    torch.testing.assert_close(w[3, 0], torch.tensor(0.8 / 3 / 0.5 - 1 / 3, dtype=torch.float64))
    assert (w[6] == 0).all() and (w[:, 6] == 0).all() and (w.diagonal() == 0).all()
    w_ind, _ = true_relation(INDEPENDENT)
    assert (w_ind[3:, :] == 0).all() and (w_ind[:, 3:] == 0).all()


def test_sprites_bad_input():
    with pytest.raises(ValueError, match="n must be a positive integer"):
        correlated_sprites(0)
    with pytest.raises(ValueError, match="size"):
        correlated_sprites(4, size=4)
    with pytest.raises(ValueError, match="seed"):
        correlated_sprites(4, seed=-1)
    with pytest.raises(ValueError, match="unknown keys"):
        correlated_sprites(4, correlations={"small|circle": 0.5})
    with pytest.raises(ValueError, match=r"correlations\['large\|circle'\]"):
        correlated_sprites(4, correlations={"large|circle": 1.2})
    with pytest.raises(TypeError, match="correlations"):
        correlated_sprites(4, correlations=[0.5])


# oracle ------------------------------------------------------------------------------------------------------------

def test_pixel_oracle_is_accurate_and_errors_are_emulated(sprites):
    x, y = sprites.images[:1000], sprites.labels[:1000]
    clean = AttributeOracle("pixels").score(x)
    assert clean.shape == (1000, 7) and attribute_accuracy(clean, y) > 0.95
    noisy = AttributeOracle("pixels", noise=0.4, zero_rate=0.3, seed=1).score(x)
    assert attribute_accuracy(noisy, y) < attribute_accuracy(clean, y)
    assert torch.equal(noisy, AttributeOracle("pixels", noise=0.4, zero_rate=0.3, seed=1).score(x))
    assert torch.equal(AttributeOracle("pixels").score(x, ["top", "circle"]), pixel_scores(x)[:, [5, 0]])
    ones = torch.ones(4000, 1)
    assert abs((emulate_errors(ones, zero_rate=0.25, seed=0) == 0).double().mean() - 0.25) < 0.03


def test_encoder_oracle_probe():
    pytest.importorskip("efficientnet_lite_pytorch")
    train = correlated_sprites(300, seed=5, correlations=INDEPENDENT)
    test = correlated_sprites(200, seed=6)
    oracle = AttributeOracle("encoder").fit(train.images, train.labels)
    s = oracle.score(test.images)
    assert s.shape == (200, 7) and 0 <= s.min() and s.max() <= 1
    assert attribute_accuracy(s, test.labels) > 0.8
    feats = oracle.features(test.images[:20])
    assert feats.shape == (20, 1280)
    assert torch.allclose(oracle.score(test.images[:20], features=feats), s[:20], atol=1e-5)


def test_oracle_bad_input(sprites):
    with pytest.raises(ValueError, match="backend"):
        AttributeOracle("gpt-4o")
    with pytest.raises(ValueError, match="noise"):
        AttributeOracle(noise=-0.1)
    with pytest.raises(ValueError, match="zero_rate"):
        AttributeOracle(zero_rate=1.1)
    with pytest.raises(ValueError, match="vlm"):
        AttributeOracle("vlm")
    with pytest.raises(ValueError, match="attributes"):
        AttributeOracle().score(sprites.images[:3], ["hairy"])
    with pytest.raises(TypeError, match="attributes"):
        AttributeOracle().score(sprites.images[:3], "circle")
    with pytest.raises(ValueError, match="images"):
        AttributeOracle().score(sprites.images[0])
    with pytest.raises(ValueError, match="fit"):
        AttributeOracle().fit(sprites.images[:3], sprites.labels[:3])
    with pytest.raises(ValueError, match="scores and labels"):
        attribute_accuracy(torch.rand(3, 7), torch.ones(3, 6))


def test_vlm_backend_offline_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    oracle = AttributeOracle("vlm", vlm="HuggingFaceTB/SmolVLM-256M-Instruct")
    with pytest.raises(ModelNotAvailableError, match="offline"):
        oracle.score(torch.zeros(1, 1, 32, 32), ["circle"])


# relation graph and recovery ---------------------------------------------------------------------------------------

def test_relation_graph_known_values_and_pruning():
    a = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.float32)
    w = relation_graph(a)
    torch.testing.assert_close(w[0, 1], torch.tensor(2 / 3 - 1 / 2, dtype=torch.float64))
    torch.testing.assert_close(w[1, 0], torch.tensor(1 - 3 / 4, dtype=torch.float64))
    torch.testing.assert_close(w[1, 2], torch.tensor(0 - 1 / 2, dtype=torch.float64))
    assert (w.diagonal() == 0).all()
    pruned = relation_graph(a, top_m=2)
    assert (pruned != 0).sum() == 2 and set(pruned[pruned != 0].tolist()) <= set(w[w != 0].tolist())
    torch.testing.assert_close(relation_graph(a * 0.9, tau=0.5), w)  # only the thresholded scores matter


def test_relation_graph_recovers_a_planted_structure_from_noiseless_scores(sprites):
    est = relation_graph(sprites.labels.float())
    rec = graph_recovery(est, sprites.relation)
    assert rec["precision_at_k"] == 1.0 and rec["sign_agreement"] == 1.0 and rec["k"] == 14
    rec_pix = graph_recovery(relation_graph(pixel_scores(sprites.images)), sprites.relation)
    assert rec_pix["precision_at_k"] >= 0.9
    permuted = graph_recovery(relation_graph(sprites.labels[:, [6, 5, 4, 3, 2, 1, 0]].float()), sprites.relation)
    assert permuted["spearman"] < rec["spearman"]


def test_graph_recovery_and_correlation_bad_input():
    w, p = true_relation()
    with pytest.raises(ValueError, match="estimated and true"):
        graph_recovery(w[:3, :3], w)
    with pytest.raises(ValueError, match="no edges"):
        graph_recovery(w, torch.zeros(7, 7))
    with pytest.raises(ValueError, match="k must be"):
        graph_recovery(w, w, k=0)
    with pytest.raises(ValueError, match="top_m"):
        relation_graph(torch.rand(5, 3), top_m=0)
    with pytest.raises(ValueError, match="tau"):
        relation_graph(torch.rand(5, 3), tau=-0.5)
    with pytest.raises(ValueError, match="at least 2"):
        relation_graph(torch.rand(5, 1))
    with pytest.raises(ValueError, match="scores"):
        relation_graph(torch.tensor([[0.1, float("nan")]]))
    with pytest.raises(ValueError, match="graph"):
        graph_correlation(w, p[:4])


def test_graph_correlation_is_a_correlation_matrix(sprites):
    w, p = true_relation()
    c = graph_correlation(w, p)
    torch.testing.assert_close(c, c.T)
    torch.testing.assert_close(c.diagonal(), torch.ones(7, dtype=torch.float64))
    assert torch.linalg.eigvalsh(c).min() > 0
    phi = torch.corrcoef(sprites.labels.double().T)
    assert (c[3:, 3:] - phi[3:, 3:]).abs().max() < 0.04  # eq. 4 recovers the attributes' correlation
    torch.testing.assert_close(graph_correlation(torch.zeros(7, 7), p), torch.eye(7, dtype=torch.float64))


# models ------------------------------------------------------------------------------------------------------------

def test_gem_prior_kl_matches_torch_distributions():
    w, p = true_relation()
    model = GEM(w, p, latent_dim=9, hidden=8)
    mu, logvar = torch.randn(4, 9), 0.3 * torch.randn(4, 9)
    cov = torch.eye(9, dtype=torch.float64)
    cov[:7, :7] = graph_correlation(w, p)
    q = torch.distributions.MultivariateNormal(mu.double(), torch.diag_embed(logvar.double().exp()))
    prior = torch.distributions.MultivariateNormal(torch.zeros(9, dtype=torch.float64), cov)
    torch.testing.assert_close(model.prior_kl(mu, logvar).double(), torch.distributions.kl_divergence(q, prior),
                               rtol=1e-4, atol=1e-4)
    iso = GEM(torch.zeros(7, 7), p, latent_dim=9, hidden=8)
    torch.testing.assert_close(iso.prior_kl(mu, logvar), BetaVAE(9, hidden=8).prior_kl(mu, logvar), rtol=1e-5,
                               atol=1e-5)


def test_training_is_seeded_and_gem_matches_attributes(sprites):
    x, s = sprites.images[:512], sprites.labels[:512].float()
    w, p = relation_graph(s), s.mean(0).double()
    seed_everything(0)
    gem = GEM(w, p, latent_dim=8, hidden=32, gamma=20.0)
    hist = fit_vae(gem, x, s, steps=300, batch_size=64, seed=0, show_progress=False)
    assert len(hist.loss) == 300 and np.mean(hist.loss[-10:]) < np.mean(hist.loss[:10])
    seed_everything(0)
    again = GEM(w, p, latent_dim=8, hidden=32, gamma=20.0)
    fit_vae(again, x, s, steps=300, batch_size=64, seed=0, show_progress=False)
    torch.testing.assert_close(encode_means(gem, x[:32]), encode_means(again, x[:32]))
    with torch.no_grad():
        acc = attribute_accuracy(torch.sigmoid(gem.attribute_logits(encode_means(gem, x))), sprites.labels[:512])
    assert acc > 0.7  # the matched latents read the attributes
    assert reconstruction_error(gem, x[:64]) > 0


def test_model_bad_input(sprites):
    w, p = true_relation()
    with pytest.raises(ValueError, match="latent_dim"):
        GEM(w, p, latent_dim=6)
    with pytest.raises(ValueError, match="beta"):
        BetaVAE(beta=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        GEM(w, p, gamma=-1.0)
    with pytest.raises(ValueError, match="x must be"):
        BetaVAE().encode(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="scores"):
        fit_vae(GEM(w, p, hidden=8), sprites.images[:16], steps=1)
    with pytest.raises(ValueError, match=r"scores must be \(B, K\)"):
        GEM(w, p, hidden=8).loss(sprites.images[:4], torch.rand(4, 3))
    with pytest.raises(ValueError, match="batch_size"):
        fit_vae(BetaVAE(hidden=8), sprites.images[:16], steps=1, batch_size=32)
    with pytest.raises(ValueError, match="steps"):
        fit_vae(BetaVAE(hidden=8), sprites.images[:16], steps=0, batch_size=8)
    with pytest.raises(TypeError, match="model"):
        fit_vae(torch.nn.Linear(2, 2), sprites.images[:16], steps=1)


# metrics -----------------------------------------------------------------------------------------------------------

def test_mig_hand_computed_cases():
    v = np.array([[0], [0], [1], [1]] * 25)
    other = np.array([[0], [1], [0], [1]] * 25)
    assert mig(np.hstack([v, other]), v) == pytest.approx(1.0)  # (ln 2 - 0) / ln 2
    assert mig(np.hstack([v, v]), v) == pytest.approx(0.0)
    # a latent that knows v half the time: I(z; v) for z = v on half the pairs, constant elsewhere
    z = np.array([[0], [0], [1], [2]] * 25)  # z separates v = 1 into two halves: I(z; v) = H(v) still
    assert mig(np.hstack([z, other]), v) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    f = rng.random((3000, 3))
    assert mig(f[:, [1, 2, 0]], f) > 0.9 > mig(f @ rng.random((3, 3)), f)


def test_dci_hand_computed_cases():
    assert dci_scores(np.eye(4)) == {"disentanglement": 1.0, "completeness": 1.0}
    r = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])  # two latents share factor 0: disentangled, less complete
    out = dci_scores(r)
    assert out["disentanglement"] == pytest.approx(1.0)
    assert out["completeness"] == pytest.approx((1 - np.log(2) / np.log(3) + 1) / 2)  # factor 0: 1 - H_3(1/2, 1/2, 0)
    rng = np.random.default_rng(1)
    f = rng.random((1500, 3))
    good, mixed = dci(f[:, [2, 0, 1]], f), dci(f @ rng.random((3, 3)), f)
    assert good["disentanglement"] > 0.8 > mixed["disentanglement"]
    shape = rng.integers(0, 3, (1500, 1))
    assert dci(np.hstack([shape + 0.01 * rng.random((1500, 1)), f[:, :1]]), shape)["informativeness"] > 0.95


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="latents"):
        mig(np.zeros((10, 1)), np.zeros((10, 1)))
    with pytest.raises(ValueError, match="lengths"):
        mig(np.zeros((10, 2)), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="constant"):
        mig(np.random.rand(10, 2), np.zeros((10, 1)))
    with pytest.raises(ValueError, match="importance"):
        dci_scores(np.array([[-1.0, 0.0]]))
    with pytest.raises(ValueError, match="discrete"):
        dci(np.random.rand(20, 2), np.random.rand(20, 2), discrete=[True])
    with pytest.raises(ValueError, match="factors"):
        dci(np.random.rand(20, 2), np.full((20, 1), np.nan))
