"Tests of mdxlib.data through its public API."
import gzip
import struct

import numpy as np
import pytest
import torch

from mdxlib.data import (CHARS, CORPORA, EASY_VQA_COLOURS, EASY_VQA_SHAPES, SPLITS, build_austen8, decode_chars,
                         encode_chars, load_char_corpus, load_digits_pixels, load_easy_vqa, load_fashion_mnist,
                         random_batches, sequential_batches, to_text8)


# ---- alphabet -------------------------------------------------------------------------------------------------

def test_alphabet():
    assert CHARS == " abcdefghijklmnopqrstuvwxyz" and len(CHARS) == 27


def test_encode_decode_round_trip():
    text = "the quick brown fox jumps over the lazy dog "
    ids = encode_chars(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert ids[:4].tolist() == [20, 8, 5, 0]
    assert decode_chars(ids) == text
    assert decode_chars(ids.tolist()) == text and decode_chars(ids.numpy()) == text
    assert encode_chars("").shape == (0,) and decode_chars(torch.tensor([], dtype=torch.long)) == ""


@pytest.mark.parametrize("bad", ["Hello", "a-b", "tab\there", "caf\u00e9", "snow\u2603", "7"])
def test_encode_rejects_characters_outside_alphabet(bad):
    with pytest.raises(ValueError, match="to_text8"):
        encode_chars(bad)


def test_encode_decode_bad_types():
    with pytest.raises(TypeError, match="text"):
        encode_chars(b"abc")
    with pytest.raises(ValueError, match="ids"):
        decode_chars([0, 27])
    with pytest.raises(ValueError, match="ids"):
        decode_chars(torch.tensor([-1]))
    with pytest.raises(ValueError, match="ids"):
        decode_chars(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        decode_chars(torch.tensor([1.0, 2.0]))


def test_to_text8_cleaning():
    assert to_text8("It was 1811, Mr. Darcy's \u00a320,000!") == \
        "it was one eight one one mr darcy s two zero zero zero zero"
    assert to_text8("Na\u00efve  r\u00e9sum\u00e9\n\n--_Emma_--") == "naive resume emma"
    assert to_text8("...") == ""
    out = to_text8("\u00c6sop \u00df 3\u00bd \u2603 x")
    assert set(out) <= set(CHARS) and "  " not in out and out == out.strip()
    assert encode_chars(out).max() < 27
    with pytest.raises(TypeError, match="text"):
        to_text8(None)


# ---- corpora --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def austen():
    return {s: load_char_corpus("austen", s) for s in SPLITS}


def test_austen_splits_sizes_and_values(austen):
    n = sum(len(v) for v in austen.values())
    assert 3_500_000 < n < 4_500_000
    assert len(austen["validation"]) == len(austen["test"]) == n // 20
    assert len(austen["train"]) == n - 2 * (n // 20)
    assert abs(len(austen["train"]) / n - 0.9) < 1e-3
    for v in austen.values():
        assert v.dtype == torch.int64 and v.ndim == 1
        assert int(v.min()) == 0 and int(v.max()) == 26  # every split uses the whole alphabet


def test_austen_splits_are_contiguous_and_disjoint(austen):
    tr, va, te = austen["train"], austen["validation"], austen["test"]
    # the splits are consecutive pieces of one text: train ends where validation begins, etc.
    whole = torch.cat([tr, va, te])
    assert torch.equal(whole[len(tr):len(tr) + len(va)], va)
    text = decode_chars(whole)
    assert text.startswith("sense and sensibility by jane austen")
    assert text.endswith("finis")  # the last word of Persuasion
    assert "  " not in text and text == text.strip()
    # a window straddling the train/validation boundary is ordinary prose (no seam)
    assert " " in decode_chars(whole[len(tr) - 20:len(tr) + 20])
    # disjoint: a 64-character window of the test split does not occur in train
    probe = decode_chars(te[1000:1064])
    assert probe not in decode_chars(tr)


def test_austen_deterministic_and_cached(austen):
    again = load_char_corpus("austen", "train")
    assert torch.equal(again, austen["train"])
    assert torch.equal(load_char_corpus("austen", "val"), austen["validation"])
    assert torch.equal(load_char_corpus(), austen["train"])  # defaults


def test_austen_statistics(austen):
    counts = torch.bincount(austen["train"], minlength=27).double()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    assert 3.9 < entropy < 4.2
    assert int(p.argmax()) == 0 and CHARS[int(p[1:].argmax()) + 1] == "e"


@pytest.mark.parametrize("kwargs, arg", [
    ({"name": "wikitext103"}, "name"), ({"name": "Austen"}, "name"), ({"name": None}, "name"),
    ({"split": "dev"}, "split"), ({"split": "TRAIN"}, "split"), ({"split": 0}, "split"),
])
def test_load_char_corpus_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg} must be one of") as e:
        load_char_corpus(**kwargs)
    assert ("'austen'" in str(e.value)) == (arg == "name")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_text8_offline_error_names_austen(monkeypatch, var):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, "1")
    assert "text8" in CORPORA
    with pytest.raises(ConnectionError, match="'austen'"):
        load_char_corpus("text8", "validation")


def test_damaged_shipped_corpus_names_the_file(tmp_path, monkeypatch):
    "A truncated, garbled or foreign data file is an error that names it, not a crash deep inside lzma."
    import lzma

    from mdxlib.core import data_dir
    from mdxlib.data import AUSTEN8_FILE

    shipped = (data_dir() / AUSTEN8_FILE).read_bytes()
    cases = {"cut": shipped[:4000], "garbled": shipped[:100] + bytes(200) + shipped[300:],
             "not_text8": lzma.compress(b"Hello, World!" * 10), "empty": b""}
    for name, content in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / AUSTEN8_FILE).write_bytes(content)
        monkeypatch.setenv("MDXLIB_DATA", str(folder))
        with pytest.raises(ValueError, match=f"{folder / AUSTEN8_FILE}.*damaged"):
            load_char_corpus("austen", "train")
    monkeypatch.setenv("MDXLIB_DATA", str(tmp_path / "missing"))
    (tmp_path / "missing").mkdir()
    with pytest.raises(FileNotFoundError, match="austen8.txt.xz is missing"):
        load_char_corpus("austen", "train")


def test_damaged_fashion_mnist_file_names_it(tmp_path):
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2), False)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is damaged"):
        load_fashion_mnist("test", root=tmp_path)


def test_build_austen8_without_debian_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="r-cran-janeaustenr"):
        build_austen8(tmp_path, out=tmp_path / "out.xz")
    assert not (tmp_path / "out.xz").exists()


# ---- batches --------------------------------------------------------------------------------------------------

def test_random_batches_shapes_windows_and_determinism():
    data = torch.arange(1000)
    it = random_batches(data, 8, 16, torch.Generator().manual_seed(0))
    batches = [next(it) for _ in range(5)]
    for b in batches:
        assert b.shape == (8, 16) and b.dtype == torch.int64
        # windows of consecutive ids, entirely inside the data
        assert torch.equal(b - b[:, :1], torch.arange(16).expand(8, 16))
        assert b.min() >= 0 and b.max() < 1000
    again = random_batches(data, 8, 16, torch.Generator().manual_seed(0))
    assert all(torch.equal(next(again), b) for b in batches)
    other = next(random_batches(data, 8, 16, torch.Generator().manual_seed(1)))
    assert not torch.equal(other, batches[0])
    assert not torch.equal(batches[0], batches[1])  # the iterator moves on


def test_random_batches_uniform_over_all_starts():
    data = torch.arange(12)
    it = random_batches(data, 100, 5, torch.Generator().manual_seed(0))
    starts = torch.cat([next(it)[:, 0] for _ in range(80)])  # 8,000 windows
    counts = torch.bincount(starts, minlength=12)
    assert counts[8:].sum() == 0  # the last start is len - seq_len
    expected = len(starts) / 8
    chi2 = float(((counts[:8] - expected) ** 2 / expected).sum())
    assert chi2 < 30  # 7 degrees of freedom; P(chi2 > 30) < 1e-4


def test_random_batches_full_length_and_device_and_dtype():
    data = torch.arange(7, dtype=torch.int32)
    b = next(random_batches(data, 3, 7, torch.Generator().manual_seed(0), device="cpu"))
    assert b.dtype == torch.int64 and torch.equal(b, torch.arange(7).expand(3, 7))


def test_random_batches_global_generator_is_seedable():
    data = torch.arange(500)
    torch.manual_seed(3)
    a = next(random_batches(data, 4, 10))
    torch.manual_seed(3)
    assert torch.equal(next(random_batches(data, 4, 10)), a)


@pytest.mark.parametrize("kwargs, exc, arg", [
    ({"data": "abc"}, TypeError, "data"),
    ({"data": torch.zeros(2, 50, dtype=torch.long)}, ValueError, "data"),
    ({"data": torch.rand(50)}, TypeError, "data"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 2.0}, ValueError, "batch_size"),
    ({"seq_len": -1}, ValueError, "seq_len"),
    ({"seq_len": 51}, ValueError, "seq_len"),
    ({"generator": 42}, TypeError, "generator"),
])
def test_random_batches_bad_arguments_fail_at_call(kwargs, exc, arg):
    args = {"data": torch.arange(50), "batch_size": 2, "seq_len": 5, **kwargs}
    with pytest.raises(exc, match=f"^{arg}"):
        random_batches(**args)  # no next(): errors come at the call, not at the first batch


@pytest.mark.parametrize("n, batch_size, seq_len, shapes", [
    (23, 2, 5, [(2, 5), (2, 5), (1, 3)]),
    (25, 2, 5, [(2, 5), (2, 5), (1, 5)]),
    (20, 2, 5, [(2, 5), (2, 5)]),
    (3, 2, 5, [(1, 3)]),
    (10, 8, 1, [(8, 1), (2, 1)]),
])
def test_sequential_batches_shapes_and_ends(n, batch_size, seq_len, shapes):
    data = torch.arange(n)
    batches = list(sequential_batches(data, batch_size, seq_len))
    assert [tuple(b.shape) for b in batches] == shapes
    assert torch.equal(torch.cat([b.flatten() for b in batches]), data)  # each element exactly once, in order


def test_sequential_batches_cover_a_split_once(austen):
    val = austen["validation"]
    batches = list(sequential_batches(val, 32, 256))
    assert all(b.dtype == torch.int64 for b in batches)
    assert sum(b.numel() for b in batches) == len(val)
    assert torch.equal(torch.cat([b.flatten() for b in batches]), val)
    assert len(list(sequential_batches(val, 32, 256))) == len(batches)  # a fresh iterator each call


def test_sequential_batches_bad_arguments():
    with pytest.raises(ValueError, match="^batch_size"):
        sequential_batches(torch.arange(10), 0, 2)
    with pytest.raises(ValueError, match="^seq_len"):
        sequential_batches(torch.arange(10), 2, 0)
    with pytest.raises(TypeError, match="^data"):
        sequential_batches("0123456789", 2, 2)


# ---- images ---------------------------------------------------------------------------------------------------

def test_digits_pixels_split_and_values():
    x_tr, y_tr = load_digits_pixels("train")
    x_te, y_te = load_digits_pixels("test")
    assert x_tr.shape == (1438, 64) and x_te.shape == (359, 64)
    assert y_tr.shape == (1438,) and y_te.shape == (359,)
    assert x_tr.dtype == y_tr.dtype == torch.int64
    assert int(x_tr.min()) == 0 and int(x_tr.max()) == 16 and int(x_te.max()) <= 16
    assert set(y_tr.tolist()) == set(range(10))
    x_small, _ = load_digits_pixels("test", test_fraction=0.1)
    assert len(x_small) == 180


def test_digits_pixels_deterministic_given_seed():
    a, ya = load_digits_pixels("test", seed=5)
    b, yb = load_digits_pixels("test", seed=5)
    c, _ = load_digits_pixels("test", seed=6)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    # train and test partition the 1,797 images for any seed
    tr, _ = load_digits_pixels("train", seed=6)
    assert len(tr) + len(c) == 1797


@pytest.mark.parametrize("kwargs, arg", [
    ({"split": "validation"}, "split"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"test_fraction": 0.0}, "test_fraction"), ({"test_fraction": 1}, "test_fraction"),
    ({"test_fraction": "0.2"}, "test_fraction"),
])
def test_digits_pixels_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        load_digits_pixels(**kwargs)


@pytest.fixture(scope="module")
def vqa_test():
    return load_easy_vqa("test")


def test_easy_vqa_structure(vqa_test):
    v = vqa_test
    assert v.images.shape == (1000, 64, 64, 3) and v.images.dtype == torch.uint8
    assert len(v) == len(v.questions) == len(v.answers) == len(v.answer_ids) == len(v.image_ids) == 9673
    assert len(v.answer_vocab) == 13 and {"yes", "no", "circle", "red"} <= set(v.answer_vocab)
    assert all(v.answer_vocab[i] == a for i, a in zip(v.answer_ids.tolist(), v.answers))
    assert int(v.image_ids.min()) == 0 and int(v.image_ids.max()) == 999
    assert v.shapes.shape == v.colours.shape == (1000,)
    assert v.shape_names == EASY_VQA_SHAPES and v.colour_names == EASY_VQA_COLOURS
    assert set(v.shapes.tolist()) == set(range(3)) and set(v.colours.tolist()) == set(range(8))


def test_easy_vqa_labels_agree_with_every_question(vqa_test):
    v = vqa_test
    checked = 0
    for q, a, i in zip(v.questions, v.answers, v.image_ids.tolist()):
        shape, colour = v.shape_names[v.shapes[i]], v.colour_names[v.colours[i]]
        words = q.rstrip("?").split()
        if q.startswith(("what color", "what is the color")):
            assert a == colour, (q, a, colour)
        elif q.startswith("what shape"):
            assert a == shape, (q, a, shape)
        elif a in ("yes", "no"):  # "is there not a red shape?" etc.
            target = next(w for w in words if w in EASY_VQA_SHAPES or w in EASY_VQA_COLOURS)
            holds = target in (shape, colour)
            negated = "not" in words or "no" in words
            assert (a == "yes") == (holds != negated), (q, a, shape, colour)
        checked += 1
    assert checked == len(v)


def test_easy_vqa_limit_and_determinism(vqa_test):
    small = load_easy_vqa("test", limit=25)
    assert small.images.shape == (25, 64, 64, 3) and int(small.image_ids.max()) == 24
    assert torch.equal(small.images, vqa_test.images[:25]) and torch.equal(small.shapes, vqa_test.shapes[:25])
    n = int((vqa_test.image_ids < 25).sum())
    assert len(small) == n and small.questions == vqa_test.questions[:n]
    assert load_easy_vqa("test", limit=10_000) is load_easy_vqa("test")


@pytest.mark.parametrize("kwargs, arg", [({"split": "validation"}, "split"), ({"limit": 0}, "limit"),
                                         ({"limit": 2.5}, "limit")])
def test_easy_vqa_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        load_easy_vqa(**kwargs)


def _write_idx(path, array, gz):
    header = struct.pack(f">I{array.ndim}I", 0x800 + array.ndim, *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_fashion_mnist_missing_files_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        load_fashion_mnist("train", root=tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    ext = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labels, gz)
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert x.shape == (5, 28, 28) and x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images))
    assert y.dtype == torch.int64 and y.tolist() == [3, 1, 4, 1, 5]
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_corrupt_files(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + bytes(12))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1), False)
    with pytest.raises(ValueError, match="IDX"):
        load_fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="^split"):
        load_fashion_mnist("val", root=tmp_path)
    with pytest.raises(TypeError, match="^root"):
        load_fashion_mnist("train", root=3)


def test_batches_bad_device():
    with pytest.raises(ValueError, match="device"):
        random_batches(torch.arange(10), 2, 3, device="tpu-please")
    with pytest.raises(ValueError, match="device"):
        sequential_batches(torch.arange(10), 2, 3, device="not-a-device")
