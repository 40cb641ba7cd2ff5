"mdxlib.train from the outside: exact resume, gradient accumulation, EMA, schedule, checkpoints and bad input."
import math
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from mdxlib.train import (History, TrainConfig, evaluate_lm, latest_checkpoint, load_weights, make_scheduler,
                          param_groups, train)

W_TRUE = torch.randn(6, 1, generator=torch.Generator().manual_seed(0))


def batches(generator, batch_size=8):
    "A factory: endless regression batches drawn lazily from `generator`."
    while True:
        x = torch.randn(batch_size, 6, generator=generator)
        yield x, x @ W_TRUE + 0.1 * torch.randn(batch_size, 1, generator=generator)


def fixed_batches(n, batch_size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    it = batches(gen, batch_size)
    return [next(it) for _ in range(n)]


def mlp(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def fit(*args, **kwargs):
    return train(*args, show_progress=False, **kwargs)


# --- configuration ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    (dict(steps=0), "steps"), (dict(steps=1.5), "steps"), (dict(steps=True), "steps"),
    (dict(steps=10, lr=0.0), "lr"), (dict(steps=10, lr=math.inf), "lr"),
    (dict(steps=10, weight_decay=-0.1), "weight_decay"),
    (dict(steps=10, warmup_steps=10), "warmup_steps"), (dict(steps=10, warmup_steps=-1), "warmup_steps"),
    (dict(steps=10, grad_clip=-1.0), "grad_clip"), (dict(steps=10, grad_accum=0), "grad_accum"),
    (dict(steps=10, ema_decay=0.0), "ema_decay"), (dict(steps=10, ema_decay=1.0), "ema_decay"),
    (dict(steps=10, eval_every=0), "eval_every"), (dict(steps=10, log_every=0), "log_every"),
    (dict(steps=10, checkpoint_every=5), "checkpoint_dir"), (dict(steps=10, checkpoint_dir=3), "checkpoint_dir"),
    (dict(steps=10, seed=-1), "seed"), (dict(steps=10, betas=(0.9, 1.0)), "betas"),
    (dict(steps=10, lr_schedule="step"), "lr_schedule"), (dict(steps=10, min_lr_ratio=2.0), "min_lr_ratio"),
    (dict(steps=10, lr_schedule="constant", min_lr_ratio=0.1), "min_lr_ratio"),
    (dict(steps=10, keep_checkpoints=0), "keep_checkpoints"),
    (dict(steps=10, mixed_precision="fp8x"), "mixed_precision"),
])
def test_bad_config_names_the_field(kwargs, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        TrainConfig(**kwargs)


def test_param_groups_decay_only_matrices():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(model.parameters(), lr=0.1, weight_decay=0.5)
    assert [p.ndim for p in decay["params"]] == [2] and decay["weight_decay"] == 0.5
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0 and no_decay["lr"] == 0.1
    assert len(param_groups([nn.Parameter(torch.zeros(3))], 0.1, 0.1)) == 1  # empty groups dropped
    with pytest.raises(TypeError, match=r"params\[0\]"):
        param_groups(["not a tensor"], 0.1, 0.0)


@pytest.mark.parametrize("kind, ratio, last", [("cosine", 0.0, 0.0), ("cosine", 0.2, 0.2), ("linear", 0.0, 0.0),
                                                ("constant", 0.0, 1.0)])
def test_schedule_shape(kind, ratio, last):
    config = TrainConfig(steps=50, lr=2.0, warmup_steps=5, lr_schedule=kind, min_lr_ratio=ratio)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    sched, lrs = make_scheduler(opt, config), []
    for _ in range(config.steps):
        lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
    lrs = np.array(lrs) / config.lr
    assert np.allclose(lrs[:6], np.arange(6) / 5)  # linear warmup from 0 to the peak at step W + 1
    assert np.all(np.diff(lrs[5:]) <= 1e-12) and lrs.max() == 1.0
    assert np.isclose(lrs[-1], last, atol=0.03)
    if kind == "cosine":  # halfway through the decay, halfway between the peak and the floor
        assert np.isclose(lrs[5 + 45 // 2], ratio + (1 - ratio) * 0.5 * (1 + np.cos(np.pi * (45 // 2) / 45)))


# --- the loop ----------------------------------------------------------------------------------------------------

def test_train_learns_and_records_every_step():
    config = TrainConfig(steps=120, lr=1e-2, warmup_steps=10, eval_every=40)
    hist = fit(mlp(), mse, batches, config, eval_fn=lambda m: {"w_norm": m[0].weight.norm()})
    assert isinstance(hist, History) and hist.step == list(range(1, 121))
    assert len(hist.loss) == len(hist.lr) == len(hist.grad_norm) == 120 and hist.ema is None
    assert np.mean(hist.loss[-10:]) < 0.2 * np.mean(hist.loss[:5])
    assert hist.lr[0] == 0.0 and hist.lr[10] == 1e-2 and hist.lr[-1] < 1e-4
    assert [e["step"] for e in hist.evals] == [40, 80, 120] and isinstance(hist.evals[0]["w_norm"], float)


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = mlp(), mlp(), mlp()
    fit(a, mse, batches, TrainConfig(steps=10, seed=3))
    fit(b, mse, batches, TrainConfig(steps=10, seed=3))
    fit(c, mse, batches, TrainConfig(steps=10, seed=4))
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))


def test_resume_continues_bitwise(tmp_path):
    "N steps in one go == N/2 steps, a crash, and a resume from a different initialisation."
    config = TrainConfig(steps=16, lr=1e-2, warmup_steps=4, grad_accum=2, ema_decay=0.9, checkpoint_dir=tmp_path,
                         checkpoint_every=8, keep_checkpoints=None)
    full = mlp(0)
    hist_full = fit(full, mse, batches, config)
    shutil.rmtree(tmp_path / "step_00000016")  # the crash: the last checkpoint never got written
    assert latest_checkpoint(tmp_path).name == "step_00000008"
    resumed = mlp(1)
    hist = fit(resumed, mse, batches, config, resume=True)
    assert torch.equal(flat(full), flat(resumed))
    assert torch.equal(flat(hist_full.ema.module), flat(hist.ema.module))
    assert hist.loss == hist_full.loss and hist.lr == hist_full.lr and hist.step == list(range(1, 17))
    assert hist.checkpoint == tmp_path / "step_00000016"


def test_resume_of_a_plain_iterable_skips_used_batches(tmp_path):
    data = fixed_batches(12)
    config = TrainConfig(steps=12, lr=1e-2, checkpoint_dir=tmp_path, checkpoint_every=5)
    full = mlp(0)
    fit(full, mse, data, config)
    resumed = mlp(1)
    fit(resumed, mse, data, config, resume=tmp_path / "step_00000010")
    assert torch.equal(flat(full), flat(resumed))


def test_resume_true_without_checkpoint_starts_fresh(tmp_path):
    a, b = mlp(), mlp()
    fit(a, mse, batches, TrainConfig(steps=5))
    hist = fit(b, mse, batches, TrainConfig(steps=5, checkpoint_dir=tmp_path), resume=True)
    assert torch.equal(flat(a), flat(b)) and hist.checkpoint == tmp_path / "step_00000005"


def test_resume_refuses_a_different_run(tmp_path):
    fit(mlp(), mse, batches, TrainConfig(steps=4, checkpoint_dir=tmp_path))
    with pytest.raises(ValueError, match="differs in lr"):
        fit(mlp(), mse, batches, TrainConfig(steps=4, lr=0.5, checkpoint_dir=tmp_path), resume=True)
    with pytest.raises(ValueError, match="ema_decay"):
        fit(mlp(), mse, batches, TrainConfig(steps=4, ema_decay=0.5, checkpoint_dir=tmp_path), resume=True)
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        fit(mlp(), mse, batches, TrainConfig(steps=4), resume=tmp_path / "nope")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        fit(mlp(), mse, batches, TrainConfig(steps=4), resume=True)
    with pytest.raises(TypeError, match="resume"):
        fit(mlp(), mse, batches, TrainConfig(steps=4), resume=1)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    "A damaged newest checkpoint is named in a warning and skipped; the run still ends bit for bit."
    config = TrainConfig(steps=12, lr=1e-2, ema_decay=0.9, checkpoint_dir=tmp_path, checkpoint_every=4,
                         keep_checkpoints=None)
    full = mlp(0)
    fit(full, mse, batches, config)
    state = tmp_path / "step_00000012" / "state.pt"
    state.write_bytes(state.read_bytes()[:500])  # truncated
    (tmp_path / "step_00000008" / "rng_0.pt").write_bytes(b"not a pickle")  # overwritten
    resumed = mlp(1)
    with pytest.warns(UserWarning) as caught:
        hist = fit(resumed, mse, batches, config, resume=True)
    messages = [str(w.message) for w in caught]
    assert any("step_00000012" in m and "damaged" in m for m in messages)
    assert any("step_00000008" in m and "damaged" in m for m in messages)
    assert torch.equal(flat(full), flat(resumed)) and hist.step == list(range(1, 13))  # resumed from step 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008", "step_00000012"]
    (tmp_path / "step_00000004" / "state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="step_00000004.*damaged"):
        fit(mlp(), mse, batches, config, resume=tmp_path / "step_00000004")
    with pytest.raises(ValueError, match="step_00000004.*damaged"):
        load_weights(mlp(), tmp_path / "step_00000004")


def test_checkpoint_files_are_synced_and_shareable(tmp_path, monkeypatch):
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    fit(mlp(), mse, batches, TrainConfig(steps=2, checkpoint_dir=tmp_path))
    assert len(synced) >= 2  # state.pt and rng_0.pt at least, before the rename
    ckpt = tmp_path / "step_00000002"
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]
    assert ckpt.stat().st_mode & 0o055 == 0o055  # readable by group and others, not mkdtemp's 0o700


def test_evaluate_lm_counts_only_targets():
    "One-token rows add nothing (no NaN), -100 labels and padding are not targets, and empty input is an error."
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    x = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    whole = evaluate_lm(lm, [x])
    assert whole["tokens"] == 3 * 7 and math.isclose(whole["loss"], lm(input_ids=x, labels=x).loss.item(), rel_tol=1e-5)
    assert math.isclose(whole["ppl"], math.exp(whole["loss"]))
    ones = evaluate_lm(lm, [x, x[:, :1]])
    assert ones == whole and all(math.isfinite(v) for v in ones.values())
    labels = x.clone()
    labels[:, :5] = -100  # scored: positions 5, 6, 7 of each row
    part = evaluate_lm(lm, [{"input_ids": x, "labels": labels}])
    logits = lm(input_ids=x).logits[:, 4:-1]  # predictions of positions 5..7
    expected = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 5:].flatten()).item()
    assert part["tokens"] == 3 * 3 and math.isclose(part["loss"], expected, rel_tol=1e-5)
    mask = torch.ones_like(x)
    mask[0, 6:] = 0  # right padding: not scored
    assert evaluate_lm(lm, [{"input_ids": x, "attention_mask": mask}])["tokens"] == 3 * 7 - 2
    with pytest.raises(ValueError, match="no target token"):
        evaluate_lm(lm, [x[:, :1]])
    with pytest.raises(ValueError, match="no target token"):
        evaluate_lm(lm, [{"input_ids": x, "labels": torch.full_like(x, -100)}])
    with pytest.raises(TypeError, match="input_ids"):
        evaluate_lm(lm, [[1, 2, 3]])
    with pytest.raises(ValueError, match="labels must have the shape"):
        evaluate_lm(lm, [{"input_ids": x, "labels": x[:, :4]}])


def test_checkpoints_are_pruned_and_load_back(tmp_path):
    config = TrainConfig(steps=12, lr=1e-2, ema_decay=0.5, checkpoint_dir=tmp_path, checkpoint_every=3,
                         keep_checkpoints=2)
    model = mlp()
    hist = fit(model, mse, batches, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000009", "step_00000012"]
    (tmp_path / "step_00000099.tmp").mkdir()  # a half-written checkpoint is never picked
    assert latest_checkpoint(tmp_path).name == "step_00000012" and latest_checkpoint(tmp_path / "empty") is None
    assert torch.equal(flat(load_weights(mlp(5), tmp_path)), flat(model))
    assert torch.equal(flat(load_weights(mlp(5), tmp_path / "step_00000012", ema=True)), flat(hist.ema.module))
    fit(mlp(), mse, batches, TrainConfig(steps=2, checkpoint_dir=tmp_path / "raw"))
    with pytest.raises(ValueError, match="no EMA"):
        load_weights(mlp(), tmp_path / "raw", ema=True)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_weights(mlp(), tmp_path / "missing")


def test_grad_accumulation_equals_a_larger_batch():
    k, steps = 4, 6
    big = fixed_batches(steps, batch_size=32)
    small = [(x[i::k], y[i::k]) for x, y in big for i in range(k)]
    a, b = mlp(dropout=0.0), mlp(dropout=0.0)
    h_big = fit(a, mse, big, TrainConfig(steps=steps, lr=1e-2, grad_clip=0.5))
    h_small = fit(b, mse, small, TrainConfig(steps=steps, lr=1e-2, grad_clip=0.5, grad_accum=k))
    assert torch.allclose(flat(a), flat(b), atol=1e-6) and not torch.equal(flat(a), flat(mlp(dropout=0.0)))
    assert np.allclose(h_big.loss, h_small.loss, atol=1e-6)
    assert np.allclose(h_big.grad_norm, h_small.grad_norm, atol=1e-5)


def test_ema_follows_its_formula_and_tracks_the_weights():
    decay, raw_weights = 0.7, []
    model = mlp()
    init = flat(model).clone()

    def record(m):
        if m is model:
            raw_weights.append(flat(m).clone())
        return {"one": 1}

    hist = fit(model, mse, batches, TrainConfig(steps=25, lr=1e-2, ema_decay=decay, eval_every=1), eval_fn=record)
    expected = raw_weights[0]
    for theta in raw_weights[1:]:
        expected = decay * expected + (1 - decay) * theta
    ema = flat(hist.ema.module)
    assert torch.allclose(ema, expected, atol=1e-6) and not torch.equal(ema, flat(model))
    assert (ema - flat(model)).norm() < 0.3 * (init - flat(model)).norm()
    assert set(hist.evals[0]) == {"step", "one", "ema_one"}


def test_evaluation_does_not_change_the_run():
    def noisy(m):
        return {"r": torch.rand(()) + np.random.rand() + random.random()}
    a, b = mlp(), mlp()
    fit(a, mse, batches, TrainConfig(steps=9))
    fit(b, mse, batches, TrainConfig(steps=9, eval_every=2), eval_fn=noisy)
    assert torch.equal(flat(a), flat(b)) and b.training


def test_params_subset_and_custom_optimizer():
    model = mlp()
    first, last = flat(model[0]).clone(), flat(model[3]).clone()
    fit(model, mse, batches, TrainConfig(steps=5, lr=1e-2), params=list(model[3].parameters()))
    assert torch.equal(flat(model[0]), first) and not torch.equal(flat(model[3]), last)
    assert all(p.requires_grad for p in model.parameters())  # the frozen ones are unfrozen afterwards
    seen = {}

    def sgd(groups):
        seen["groups"] = groups
        return torch.optim.SGD(groups, momentum=0.9)

    hist = fit(mlp(), mse, batches, TrainConfig(steps=60, lr=2e-2, weight_decay=0.2), optimizer=sgd)
    assert [g["weight_decay"] for g in seen["groups"]] == [0.2, 0.0]
    assert np.mean(hist.loss[-10:]) < 0.5 * np.mean(hist.loss[:10])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        fit(mlp(), mse, batches, TrainConfig(steps=2), optimizer=lambda groups: "adam")


def test_bad_arguments_fail_clearly():
    cfg = TrainConfig(steps=3)
    with pytest.raises(TypeError, match="model"):
        fit("model", mse, batches, cfg)
    with pytest.raises(TypeError, match="config"):
        fit(mlp(), mse, batches, {"steps": 3})
    with pytest.raises(TypeError, match="loss_fn"):
        fit(mlp(), "mse", batches, cfg)
    with pytest.raises(TypeError, match="scalar tensor"):
        fit(mlp(), lambda m, b: m(b[0]), batches, cfg)
    with pytest.raises(TypeError, match="scalar tensor"):
        fit(mlp(), lambda m, b: 1.0, batches, cfg)
    with pytest.raises(ValueError, match="requires_grad"):
        fit(mlp(), lambda m, b: torch.tensor(1.0), batches, cfg)
    with pytest.raises(ValueError, match="not a parameter of model"):
        fit(mlp(), mse, batches, cfg, params=mlp().parameters())
    with pytest.raises(TypeError, match="params"):
        fit(mlp(), mse, batches, cfg, params=torch.zeros(3))
    with pytest.raises(TypeError, match=r"params\[0\] must be a parameter"):
        fit(mlp(), mse, batches, cfg, params=mlp().named_parameters())
    frozen = mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        fit(frozen, mse, batches, cfg)
    with pytest.raises(ValueError, match="ran out after 2 micro-batches; this run needs 3"):
        fit(mlp(), mse, fixed_batches(2), cfg)
    with pytest.raises(TypeError, match="one argument"):
        fit(mlp(), mse, lambda: batches, cfg)
    with pytest.raises(TypeError, match="batches"):
        fit(mlp(), mse, 42, cfg)
    with pytest.raises(ValueError, match="eval_fn"):
        fit(mlp(), mse, batches, TrainConfig(steps=3, eval_every=1))
    with pytest.raises(TypeError, match="dict of metrics"):
        fit(mlp(), mse, batches, cfg, eval_fn=lambda m: 1.0)
    with pytest.raises(ValueError, match="'bad' is nan at step 3"):
        fit(mlp(), mse, batches, cfg, eval_fn=lambda m: {"bad": float("nan")})


def test_gradients_left_on_the_model_are_dropped():
    clean, dirty = mlp(), mlp()
    (1e6 * dirty(torch.ones(2, 6)).sum()).backward()  # stale gradients from before training
    fit(clean, mse, batches, TrainConfig(steps=2, grad_clip=None))
    fit(dirty, mse, batches, TrainConfig(steps=2, grad_clip=None))
    assert torch.equal(flat(clean), flat(dirty))


def test_non_finite_loss_stops_before_the_weights_change():
    model, calls, seen = mlp(), [], []

    def loss_fn(m, b):
        calls.append(1)
        return mse(m, b) * (math.inf if len(calls) == 3 else 1.0)

    with pytest.raises(FloatingPointError, match="at step 3"):
        fit(model, loss_fn, batches, TrainConfig(steps=5, lr=1e-2, eval_every=1),
            eval_fn=lambda m: seen.append(flat(m)) or {})
    assert len(seen) == 2 and torch.equal(flat(model), seen[-1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trains_real_architectures(family, tmp_path):
    "Tiny random-initialised transformers: the loss falls and resume is exact (tied embeddings included)."
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    def make(seed):
        torch.manual_seed(seed)
        if family == "llama":
            return LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
        return GPT2LMHeadModel(GPT2Config(vocab_size=11, n_embd=32, n_layer=1, n_head=2, n_positions=32))

    def sequences(generator):  # counting mod 11 from a random start: learnable in a few steps
        while True:
            yield (torch.randint(0, 11, (8, 1), generator=generator) + torch.arange(16)) % 11  # (B, T)

    lm_loss = lambda m, x: m(input_ids=x, labels=x).loss
    config = TrainConfig(steps=20, lr=2e-2, warmup_steps=2, checkpoint_dir=tmp_path, checkpoint_every=10)
    a = make(0)
    hist = fit(a, lm_loss, sequences, config)
    assert np.mean(hist.loss[-3:]) < 0.5 * hist.loss[0]
    b = make(1)
    fit(b, lm_loss, sequences, config, resume=tmp_path / "step_00000010")
    assert torch.equal(flat(a), flat(b))
