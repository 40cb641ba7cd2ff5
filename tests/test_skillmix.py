"""Skill-Mix through the public API: detectors, writer, rubric, metrics, prompts, student training and evaluation."""
import random

import numpy as np
import pytest
import torch

from mdxlib.models import tiny_lm
from mdxlib.skillmix import (SKILLS, TOPICS, LMGrader, SkillText, evaluate_model, finetune, generate_texts, grade,
                             plain_prompt, ratio_all_skills, ratio_full_marks, sample_combinations, sentence_limit,
                             skill_split, skillmix_prompt, skills_fraction, tiny_student, topic_split,
                             word_tokenizer, write_text)
from mdxlib.train import TrainConfig

NEGATIVES = {  # one sentence per skill that does not show it
    "rhetorical question": "The cook bakes the bread.", "hyperbole": "The cook bakes bread twice.",
    "simile": "The river runs fast.", "exclamation": "The team wins.", "quotation": "The cook says that it is good.",
    "passive voice": "The cook baked the bread.", "conditional": "The farmer smiles when it rains.",
    "negation": "The sailor leaves the harbour.", "imperative": "The train leaves early.",
    "relative clause": "The painter paints the wall.", "alliteration": "The soft grey sand warms the beach.",
    "onomatopoeia": "The bees work hard.", "repetition": "The cat walks slowly home.",
    "list of three": "The chef buys bread and cheese.", "contrast": "The road is long and the driver is patient.",
    "causation": "The crowd cheers and the team scores.", "comparison": "The tower is tall.",
    "superlative": "It is a fine garden.", "statistic": "In most cases the bus is late.",
    "temporal clause": "The baker opens the shop at dawn.", "personification": "The wind blows over the trees.",
    "parenthesis": "The market opens at dawn.",
}


@pytest.mark.parametrize("name", sorted(SKILLS))
def test_each_detector_on_positive_and_negative(name):
    assert SKILLS[name].detect(SKILLS[name].example)
    assert not SKILLS[name].detect(NEGATIVES[name])


def test_catalogue_and_splits():
    assert len(SKILLS) >= 20 and len(TOPICS) >= 8
    assert set(skill_split("train")).isdisjoint(skill_split("held_out"))
    assert set(topic_split("train")).isdisjoint(topic_split("held_out"))
    with pytest.raises(ValueError, match="split"):
        topic_split("dev")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_writer_texts_earn_full_marks(k):
    for t in generate_texts(k, 200, seed=k):
        assert len(t.skills) == k
        p = grade(t.text, t.skills, t.topic)
        assert p.shape == (k + 3,) and p.all(), t


def test_writer_varies_and_is_seeded():
    texts = [t.text for t in generate_texts(2, 50, skills=["simile", "negation"], topics=["cooking"], seed=0)]
    assert len(set(texts)) > 25  # not one fixed template
    assert generate_texts(3, 5, seed=4) == generate_texts(3, 5, seed=4)


def test_grade_rubric_rows():
    text = "If the chef bakes the bread, the cook stirs the soup like a storm."
    assert grade(text, ["conditional", "simile"], "cooking").tolist() == [1, 1, 1, 1, 1]
    assert grade(text, ["conditional", "simile"], "chess").tolist() == [1, 1, 0, 1, 1]  # off topic
    assert grade(text, ["negation", "simile"], "cooking").tolist() == [0, 1, 1, 1, 1]
    assert grade("A simile: the cook is like a lion.", ["simile"], "cooking")[0] == 0  # named, not shown
    two = "The cook bakes the bread. The chef is like a lion."
    assert grade(two, ["simile", "negation"], "cooking")[-1] == 0 and grade(two, ["simile"] * 1, "cooking")[-1] == 0
    assert grade(two, ["simile", "negation", "contrast"], "cooking")[-1] == 1  # k = 3 allows 2 sentences


def test_metrics_on_hand_made_points():
    p = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert ratio_full_marks(p)[0] == pytest.approx(0.25)
    assert ratio_all_skills(p)[0] == pytest.approx(0.5)
    assert skills_fraction(p)[0] == pytest.approx(0.375)
    mean, se = ratio_full_marks(np.ones((4, 4)))
    assert mean == 1 and se == 0
    # k = 1: all skills needs the skill point and 2 of the other 3
    assert ratio_all_skills(np.array([[1, 1, 0, 0], [1, 1, 1, 0]]))[0] == pytest.approx(0.5)


def test_bad_inputs():
    with pytest.raises(ValueError, match="k"):
        generate_texts(len(SKILLS) + 1, 1)
    with pytest.raises(ValueError, match="unknown skill"):
        grade("text", ["sarcasm"], "cooking")
    with pytest.raises(ValueError, match="topic"):
        write_text(["simile"], "knitting", random.Random(0))
    with pytest.raises(ValueError, match="k"):
        sample_combinations(8, "held_out", 2)
    with pytest.raises(ValueError, match="points"):
        skills_fraction(np.ones((0, 5)))
    with pytest.raises(ValueError, match="sentence|k"):
        sentence_limit(0)


def test_prompts():
    first, second = skillmix_prompt(["simile", "negation", "contrast"], "music")
    assert "at most 2 sentences" in first and "music" in first and all(s in first for s in ["simile", "negation"])
    assert second and plain_prompt(["simile"], "music") == "skills: simile. topic: music. text:"


def test_student_learns_and_evaluates():
    texts = generate_texts(1, 200, skills=["simile", "negation"], topics=["cooking"], seed=0)
    tok = word_tokenizer([plain_prompt(t.skills, t.topic) + " " + t.text for t in texts])
    model = tiny_student(tok, n_layer=1, n_embd=64, seed=0)
    hist = finetune(model, texts, tok, TrainConfig(steps=60, lr=5e-3, seed=0), batch_size=16)
    assert np.mean(hist.loss[-5:]) < 0.5 * np.mean(hist.loss[:5])
    ev = evaluate_model(model, tok, 1, "all", 6, seed=0, max_new_tokens=30)
    assert ev.points.shape == (6, 4) and len(ev.samples) == 6 and not ev.truncated.all()
    with pytest.raises(ValueError, match="texts"):
        finetune(model, [], tok, TrainConfig(steps=1))
    with pytest.raises(ValueError, match="empty"):
        finetune(model, [SkillText(("simile",), "cooking", "")], tok, TrainConfig(steps=1))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chat_protocol_and_lm_grader_on_tiny_models(arch):
    model, tok = tiny_lm(arch, seed=0, max_position_embeddings=2048)  # byte-level chat prompts are long
    ev = evaluate_model(model, tok, 2, "train", 2, prompt_format="chat", max_new_tokens=6, batch_size=2)
    assert ev.points.shape == (2, 5) and ev.truncated.all()  # a random model never ends within 6 tokens
    judge = LMGrader(model, tok, batch_size=4)
    rows = judge.rows("The cook bakes the bread like a lion.", ["simile"], "cooking")
    assert len(rows) == 3 and all(isinstance(r, bool) for r in rows)


def test_lora_finetune_merges_back():
    model, tok = tiny_lm("llama", seed=0)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    finetune(model, generate_texts(1, 8, seed=0), tok, TrainConfig(steps=2, lr=1e-2), batch_size=4, lora_r=2)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not torch.equal(w, model.model.layers[0].self_attn.q_proj.weight)
