"mdxlib.tpr from the outside: losses, reservoir, TPR head, GZSL evaluation and calibration, training, data worlds."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mdxlib.models import ModelNotAvailableError
from mdxlib.tpr import (TPR, AlignedDualEncoder, AttributeReservoir, AttributeWorld, CLIPDualEncoder, GZSLScores,
                        ZeroShot, contrastive_loss, easy_vqa_world, gzsl_evaluate, gzsl_from_scores, harmonic_mean,
                        pretrain_alignment, seen_unseen_curve, texture_world, topology_loss, tpr_loss, train_tpr,
                        tune_calibration)
from mdxlib.train import TrainConfig


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _tpr(n_classes=6, d=8, n_static=5, n_learnable=3, seed=0):
    z = _unit(n_classes, d, seed=seed)
    return TPR(AttributeReservoir(_unit(n_static, d, seed=seed + 1), n_learnable, dim=d), z)


# ---------------------------------------------------------------- losses

def test_topology_loss_is_minus_one_for_identical_structure_and_scale_invariant():
    z = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    g = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    assert topology_loss(z, z).item() == pytest.approx(-1.0, abs=1e-6)
    assert topology_loss(z, 3.5 * z).item() == pytest.approx(-1.0, abs=1e-6)
    assert topology_loss(2 * z, 10 * g).item() == pytest.approx(topology_loss(z, g).item(), abs=1e-6)
    assert -1 <= topology_loss(z, g).item() <= 1


def test_topology_loss_is_plus_one_for_reversed_structure():
    # three classes on a line: similarities (a,b), (a,c), (b,c); a structure with the opposite ordering
    ref = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    rev = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [0.0, 1.0]])
    s_ref = [0.8, 0.0, 0.6]
    s_rev = [-0.6, 0.0, 0.8]
    expected = -torch.corrcoef(torch.tensor([s_ref, s_rev]))[0, 1]
    assert topology_loss(ref, rev).item() == pytest.approx(expected.item(), abs=1e-6)


def test_topology_loss_bad_input():
    with pytest.raises(ValueError, match="C >= 3"):
        topology_loss(torch.randn(4, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="reference"):
        topology_loss(torch.randn(4), torch.randn(4, 3))


def test_contrastive_loss_known_values():
    protos = torch.eye(4) * 10
    y = torch.arange(4)
    assert contrastive_loss(protos[y], protos, y).item() < 1e-4
    # uniform similarities: both directions are log(C) (or log(B)) exactly
    same = torch.ones(4, 3)
    assert contrastive_loss(same, same[:4], y).item() == pytest.approx(math.log(4), abs=1e-5)
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(protos, protos, y + 1)
    with pytest.raises(ValueError, match="shapes"):
        contrastive_loss(protos, protos[:, :3], y)


# ---------------------------------------------------------------- reservoir and head

def test_learnable_tokens_are_parameters_and_receive_gradients():
    model = _tpr()
    assert [n for n, _ in model.reservoir.named_parameters()] == ["learnable"]
    assert "static" in dict(model.reservoir.named_buffers())
    x, y = _unit(10, 8, seed=5), torch.tensor([0, 1, 2] * 3 + [0])
    loss, parts = tpr_loss(model, x, y, torch.tensor([0, 1, 2]))
    loss.backward()
    assert model.reservoir.learnable.grad is not None and model.reservoir.learnable.grad.abs().sum() > 0
    assert model.reservoir.static.grad is None
    assert set(parts) == {"cl", "ca", "tp"}


def test_reservoir_bad_input():
    with pytest.raises(ValueError, match="n_learnable"):
        AttributeReservoir(torch.randn(3, 4), -2)
    with pytest.raises(ValueError, match="static_words or n_learnable"):
        AttributeReservoir(torch.empty(0, 4), 0, dim=4)
    with pytest.raises(ValueError, match="dim"):
        AttributeReservoir(torch.empty(0, 4), 2)
    with pytest.raises(ValueError, match="static_words"):
        AttributeReservoir(torch.randn(3), 2)
    assert AttributeReservoir(torch.empty(0, 4), 2, dim=4)().shape == (2, 4)


def test_tpr_starts_at_the_frozen_model():
    model = _tpr()
    x = _unit(9, 8, seed=3)
    torch.testing.assert_close(model.scores(x), ZeroShot(model.class_texts).scores(x))
    f_v, g_v = model.image_branch(x)
    f_l, g_l = model.text_branch()
    assert f_v.shape == (9, 8) and g_v.shape == (9, 8) and f_l.shape == (6, 8) and g_l.shape == (6, 8)


def test_tpr_bad_shapes():
    model = _tpr()
    with pytest.raises(ValueError, match="images"):
        model.scores(torch.randn(3, 7))
    with pytest.raises(ValueError, match="class_texts"):
        TPR(AttributeReservoir(torch.randn(3, 8), 2), torch.randn(4, 5))


# ---------------------------------------------------------------- GZSL evaluation

S_TOY = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                      [0.1, 0.9, 0.0, 0.0],
                      [0.6, 0.0, 0.5, 0.0],
                      [0.0, 0.0, 0.0, 0.7]])
Y_TOY = torch.tensor([0, 1, 2, 3])


class _Fixed(torch.nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.s = scores

    def scores(self, x):
        return self.s


def test_harmonic_mean():
    assert harmonic_mean(1.0, 0.5) == pytest.approx(2 / 3)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.8, 0.8) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="S"):
        harmonic_mean(1.5, 0.5)


def test_gzsl_known_values_and_calibration():
    r = gzsl_from_scores(S_TOY, Y_TOY, [0, 1], [2, 3])
    assert isinstance(r, GZSLScores) and (r.S, r.U) == (1.0, 0.5) and r.H == pytest.approx(2 / 3)
    assert gzsl_from_scores(S_TOY, Y_TOY, [0, 1], [2, 3], calibration=0.2)[:3] == (1.0, 1.0, 1.0)
    # too large an offset hands seen images to unseen classes
    assert gzsl_from_scores(S_TOY, Y_TOY, [0, 1], [2, 3], calibration=2.0).S == 0.0
    assert gzsl_evaluate(_Fixed(S_TOY), torch.zeros(4, 1), Y_TOY, [0, 1], [2, 3])[:3] == r[:3]
    assert tune_calibration(_Fixed(S_TOY), torch.zeros(4, 1), Y_TOY, [0, 1], [2, 3]) == pytest.approx(0.105)


def test_gzsl_uses_per_class_accuracy():
    # class 0 has three images (all right), class 1 one image (wrong): per-class S = 0.5, not 0.75
    labels = torch.tensor([0, 0, 0, 1, 2])
    scores = torch.tensor([[1.0, 0.0, 0.0]] * 4 + [[0.0, 0.0, 1.0]])
    r = gzsl_from_scores(scores, labels, [0, 1], [2])
    assert r.S == 0.5 and r.U == 1.0 and r.per_class == {0: 1.0, 1: 0.0, 2: 1.0}


def test_calibration_shifts_the_seen_classes_wherever_they_are():
    # seen classes are the LAST two columns: a boolean mask shifts them (an integer 0/1 mask would shift columns 0, 1)
    scores = torch.tensor([[0.5, 0.0, 0.6, 0.0], [0.0, 0.9, 0.0, 0.1], [0.0, 0.0, 0.9, 0.0]])
    labels = torch.tensor([0, 1, 2])
    assert gzsl_from_scores(scores, labels, seen=[2, 3], unseen=[0, 1]).U == 0.5
    r = gzsl_from_scores(scores, labels, seen=[2, 3], unseen=[0, 1], calibration=0.2)
    assert (r.S, r.U) == (1.0, 1.0)


def test_seen_unseen_curve_known_values():
    c = seen_unseen_curve(S_TOY, Y_TOY, [0, 1], [2, 3])
    assert c.S.tolist() == [0.0, 1.0, 1.0, 1.0] and c.U.tolist() == [1.0, 1.0, 0.5, 0.0]
    assert c.auc == 1.0 and c.best_H == 1.0
    assert list(c.gamma) == sorted(c.gamma, reverse=True)


def test_seen_unseen_curve_agrees_with_every_offset_and_bounds_tuned_h():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(300, 10, generator=g), torch.randint(0, 10, (300,), generator=g)
    seen, unseen = list(range(6)), list(range(6, 10))
    c = seen_unseen_curve(scores, labels, seen, unseen)
    assert np.all(np.diff(c.S) >= 0) and np.all(np.diff(c.U) <= 0)  # S rises, U falls as gamma decreases
    assert 0 <= c.auc <= 1
    for gamma in np.linspace(-0.6, 0.6, 25):
        r = gzsl_from_scores(scores, labels, seen, unseen, float(gamma))
        i = int(np.searchsorted(-c.gamma, -gamma, "right")) - 1
        assert c.S[i] == pytest.approx(r.S, abs=1e-6) and c.U[i] == pytest.approx(r.U, abs=1e-6)
        assert r.H <= c.best_H + 1e-6


def test_seen_unseen_curve_bad_input():
    with pytest.raises(ValueError, match="overlap"):
        seen_unseen_curve(S_TOY, Y_TOY, [0, 1], [1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        seen_unseen_curve(S_TOY, Y_TOY[:3], [0, 1], [2, 3])
    with pytest.raises(ValueError, match="seen and one unseen"):
        seen_unseen_curve(S_TOY[:2], Y_TOY[:2], [0, 1], [2, 3])


@pytest.mark.parametrize("kwargs, err", [
    (dict(seen=[], unseen=[2, 3]), "seen"),
    (dict(seen=[0, 1], unseen=[]), "unseen"),
    (dict(seen=[0, 1], unseen=[1, 2, 3]), "overlap"),
    (dict(seen=[0, 1], unseen=[2, 7]), "unseen"),
    (dict(seen=[0, 0], unseen=[2, 3]), "twice"),
])
def test_gzsl_bad_splits(kwargs, err):
    with pytest.raises(ValueError, match=err):
        gzsl_from_scores(S_TOY, Y_TOY, **kwargs)


def test_gzsl_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="labels"):
        gzsl_from_scores(S_TOY, Y_TOY[:3], [0, 1], [2, 3])
    with pytest.raises(ValueError, match="seen ∪ unseen"):
        gzsl_from_scores(S_TOY, Y_TOY, [0], [2, 3])
    with pytest.raises(ValueError, match="calibration"):
        gzsl_from_scores(S_TOY, Y_TOY, [0, 1], [2, 3], calibration=float("nan"))
    with pytest.raises(TypeError, match="model"):
        gzsl_evaluate(object(), torch.zeros(4, 1), Y_TOY, [0, 1], [2, 3])
    with pytest.raises(ValueError, match="images"):
        gzsl_evaluate(_tpr(), torch.zeros(4), Y_TOY, [0, 1], [2, 3])
    with pytest.raises(ValueError, match="grid"):
        tune_calibration(_Fixed(S_TOY), torch.zeros(4, 1), Y_TOY, [0, 1], [2, 3], grid=[])


# ---------------------------------------------------------------- training

def _planted(n_classes=6, d=16, n=240, seed=0):
    "Images near their class embedding."
    g = torch.Generator().manual_seed(seed)
    z = _unit(n_classes, d, seed=seed)
    y = torch.randint(n_classes, (n,), generator=g)
    return F.normalize(z[y] + 0.5 * torch.randn(n, d, generator=g) / math.sqrt(d), dim=-1), y, z


def test_train_tpr_fits_seen_classes_and_updates_tokens():
    x, y, z = _planted()
    seen = torch.tensor([0, 1, 2, 3])
    model = TPR(AttributeReservoir(_unit(5, 16, seed=9), 4), z)
    before = model.reservoir.learnable.detach().clone()
    fit = torch.isin(y, seen)
    hist = train_tpr(model, x[fit], y[fit], seen, TrainConfig(steps=30, lr=1e-3), batch_size=32)
    assert hist.loss[-1] < hist.loss[0]
    assert not torch.equal(model.reservoir.learnable, before)
    r = gzsl_evaluate(model, x, y, seen, [4, 5])
    assert r.S > 0.5


def test_train_tpr_bad_input():
    x, y, z = _planted()
    model = TPR(AttributeReservoir(_unit(5, 16, seed=9), 4), z)
    with pytest.raises(ValueError, match="seen classes"):
        train_tpr(model, x, y, [0, 1], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="labels"):
        train_tpr(model, x, y[:5], [0, 1, 2, 3, 4, 5], TrainConfig(steps=1))
    with pytest.raises(ValueError, match="eta"):
        train_tpr(model, x, y, list(range(6)), TrainConfig(steps=1), eta=-1.0)


# ---------------------------------------------------------------- dual encoders and worlds

class _Text:
    dim = 8

    def encode(self, texts):
        return torch.stack([_unit(8, seed=sum(map(ord, t))) for t in texts])  # a fixed unit vector per text


def test_aligned_dual_encoder_pretraining_aligns_images_with_captions():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(64, 12, generator=g)
    captions = ["a photo of a red shape." if f[0] > 0 else "a photo of a circle." for f in feats]
    enc = AlignedDualEncoder(image_encoder=None, text_encoder=_Text(), image_dim=12)
    hist = pretrain_alignment(enc, feats, captions, TrainConfig(steps=150, lr=3e-2), batch_size=32)
    assert hist.loss[-1] < hist.loss[0]
    with torch.no_grad():
        x = enc.encode_features(feats)
    t = enc.encode_texts(["a photo of a red shape.", "a photo of a circle."])
    pred = (x @ t.T).argmax(1)
    assert (pred == (feats[:, 0] <= 0).long()).float().mean() > 0.9
    with pytest.raises(ValueError, match="features"):
        enc.encode_features(torch.randn(3, 5))
    with pytest.raises(ValueError, match="captions"):
        pretrain_alignment(enc, feats, captions[:3], TrainConfig(steps=1))


def test_clip_backend_says_what_to_use_offline(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="AlignedDualEncoder"):
        CLIPDualEncoder(str(tmp_path))


def test_worlds():
    w = easy_vqa_world()
    assert w.n_classes == 24 and w.descriptions()[9] == "a photo of a green rectangle."
    caps = w.single_attribute_captions(torch.tensor([9] * 20), torch.Generator().manual_seed(0))
    assert set(caps) == {"a photo of a green shape.", "a photo of a rectangle."}
    with pytest.raises(ValueError, match="labels"):
        w.single_attribute_captions(torch.tensor([-1]), torch.Generator())
    with pytest.raises(ValueError, match="attributes"):
        AttributeWorld("x", [])
    tw, images, labels = texture_world(2, seed=3, size=32)
    assert images.shape == (48, 32, 32, 3) and images.dtype == torch.uint8 and labels.bincount().tolist() == [2] * 24
    assert torch.equal(texture_world(2, seed=3, size=32)[1], images)
    assert tw.descriptions()[0] == "a photo of a red striped pattern."
    with pytest.raises(ValueError, match="n_per_class"):
        texture_world(0)
    with pytest.raises(ValueError, match="size"):
        texture_world(1, size=4)
