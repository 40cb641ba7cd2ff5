"mdxlib.core from the outside."
import json
import math
import random

import numpy as np
import pytest
import torch

from mdxlib.core import (SCALES, Results, atomic_write, by_scale, check_scale, data_dir, file_digest, get_device,
                         load_results, progress, read_json, results_dir, results_path, seed_everything, set_style,
                         set_threads, write_json)


def test_scales():
    assert SCALES == ("smoke", "cpu", "full")
    for s in SCALES:
        assert check_scale(s) == s
    assert by_scale("cpu", 1, 2, 3) == 2
    for bad in ("tiny", None, 3, "CPU"):
        with pytest.raises(ValueError, match="scale must be one of 'smoke', 'cpu', 'full'"):
            check_scale(bad)


def test_seed_everything_repeats_all_generators():
    seed_everything(7)
    a = (random.random(), np.random.rand(), torch.randn(3))
    g = seed_everything(7)
    b = (random.random(), np.random.rand(), torch.randn(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert torch.equal(torch.rand(2, generator=g), torch.rand(2, generator=torch.Generator().manual_seed(7)))
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="seed"):
            seed_everything(bad)


def test_device(monkeypatch):
    assert get_device("cpu").type == "cpu"
    monkeypatch.setenv("MDXLIB_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device"):
        get_device("not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1
        monkeypatch.setenv("MDXLIB_THREADS", "1")
        assert set_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_results_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("MDXLIB_RESULTS", str(tmp_path))
    assert results_dir() == tmp_path
    r = Results("10_x", "smoke", 3)
    r.log("bpc", np.float32(1.5), paper=1.37, setting="tiny model", unit="bits/char", rtol=0.1)
    r.log("acc", torch.tensor(0.25))
    data = json.loads((tmp_path / "smoke" / "10_x.json").read_text())
    assert data["scale"] == "smoke" and data["seed"] == 3
    assert data["metrics"]["bpc"] == dict(value=1.5, paper=1.37, setting="tiny model", unit="bits/char", rtol=0.1,
                                          atol=1e-6)
    assert load_results()[0]["metrics"]["acc"]["value"] == 0.25
    assert sorted(p.name for p in (tmp_path / "smoke").iterdir()) == ["10_x.json"]  # no temporary files left


def test_results_are_kept_per_scale(tmp_path, monkeypatch):
    "A smoke run never replaces cpu results; a failed run's partial file is read only on request."
    monkeypatch.setenv("MDXLIB_RESULTS", str(tmp_path))
    Results("10_x", "cpu", 0).log("bpc", 1.4)
    Results("10_x", "smoke", 0).log("bpc", 9.9)
    assert [(r["scale"], r["metrics"]["bpc"]["value"]) for r in load_results()] == [("smoke", 9.9), ("cpu", 1.4)]
    assert load_results(scale="cpu")[0]["metrics"]["bpc"]["value"] == 1.4
    write_json(results_path("10_x", "cpu", failed=True), dict(notebook="10_x", scale="cpu", seed=0, metrics={},
                                                                status="failed"))
    assert len(load_results(scale="cpu")) == 1 and len(load_results(scale="cpu", failed=True)) == 2
    with pytest.raises(ValueError, match="notebook"):
        results_path("a/b", "cpu")


def test_results_stage_for_runs(tmp_path, monkeypatch):
    "Inside a `mdxlib reproduce` run, Results write to the run's staging folder, not over the last results."
    monkeypatch.setenv("MDXLIB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("MDXLIB_RESULTS_STAGE", str(tmp_path / "stage"))
    r = Results("10_x", "cpu", 0)
    r.log("bpc", 1.0)
    assert r.path == tmp_path / "stage" / "10_x.json" and not (tmp_path / "results").exists()


def test_results_of_the_flat_layout_are_still_read(tmp_path):
    "results/<notebook>.json from earlier versions stays visible until a run of that scale writes the new layout."
    write_json(tmp_path / "10_x.json", dict(notebook="10_x", scale="cpu", seed=0, metrics={"a": {"value": 1.0}}))
    assert [r["metrics"]["a"]["value"] for r in load_results(tmp_path)] == [1.0]
    assert load_results(tmp_path, scale="smoke") == []
    Results("10_x", "cpu", 0, path=results_path("10_x", "cpu", tmp_path)).log("a", 2.0)
    assert [r["metrics"]["a"]["value"] for r in load_results(tmp_path)] == [2.0]


def test_corrupt_results_file_is_named(tmp_path):
    bad = results_path("10_x", "cpu", tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text('{"notebook": "10_x", ')
    with pytest.raises(ValueError, match="10_x.json.*damaged"):
        load_results(tmp_path)
    bad.write_text('[1, 2]')
    with pytest.raises(ValueError, match="not a results file"):
        load_results(tmp_path)


def test_atomic_write(tmp_path):
    target = tmp_path / "a" / "b.json"
    write_json(target, {"x": 1}, fsync=True)
    assert read_json(target) == {"x": 1}
    assert (target.stat().st_mode & 0o077) != 0  # readable by others like a normal file, not mkstemp's 0600
    target.chmod(0o640)
    atomic_write(target, b"{}")
    assert target.stat().st_mode & 0o777 == 0o640 and read_json(target) == {}  # the file's mode is kept

    with pytest.raises(TypeError):  # a write that fails half-way leaves the old file and no temporary
        atomic_write(target, 12345)
    assert read_json(target) == {} and sorted(p.name for p in target.parent.iterdir()) == ["b.json"]
    assert len(file_digest(target)) == 32


def test_results_rejects_bad_input(tmp_path):
    r = Results("10_x", "cpu", 0, path=tmp_path / "x.json")
    with pytest.raises(ValueError, match="non-finite"):
        r.log("loss", math.nan)
    with pytest.raises(TypeError, match="loss"):
        r.log("loss", "high")
    with pytest.raises(ValueError, match="rtol"):
        r.log("loss", 1.0, rtol=-1)
    with pytest.raises(ValueError, match="scale"):
        Results("10_x", "huge", 0)
    with pytest.raises(ValueError, match="notebook"):
        Results("", "cpu", 0)
    with pytest.raises(ValueError, match="seed"):
        Results("10_x", "cpu", -1)
    assert not (tmp_path / "x.json").exists()


def test_data_dir(monkeypatch, tmp_path):
    assert (data_dir() / "README.md").exists()
    monkeypatch.setenv("MDXLIB_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="MDXLIB_DATA"):
        data_dir()


def test_style_and_progress(monkeypatch):
    import matplotlib.pyplot as plt
    set_style(dpi=72)
    assert plt.rcParams["figure.dpi"] == 72
    monkeypatch.setenv("MDXLIB_PROGRESS", "0")
    bar = progress(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]


def test_project_root_is_the_checkout(monkeypatch, tmp_path):
    from pathlib import Path

    from mdxlib.core import project_root

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root / "tests")
    assert project_root() == root and (root / "settings.ini").exists()
    clone = tmp_path / "clone"  # another checkout: a command run inside it writes there, not where mdxlib lives
    for sub in ("mdxlib", "nbs/sub"):
        (clone / sub).mkdir(parents=True)
    (clone / "settings.ini").write_text("[DEFAULT]\n")
    monkeypatch.chdir(clone / "nbs" / "sub")
    monkeypatch.delenv("MDXLIB_RESULTS", raising=False)
    assert project_root() == clone.resolve() and results_dir() == clone.resolve() / "results"
    monkeypatch.chdir(tmp_path)  # outside any checkout: the one the package was loaded from
    assert project_root() == root


def test_progress_text_mode(monkeypatch):
    import io

    monkeypatch.setenv("MDXLIB_PROGRESS", "text")
    out = io.StringIO()
    assert list(progress(range(3), desc="t", file=out, mininterval=0)) == [0, 1, 2]
    assert "t: 100%" in out.getvalue() and type(progress(range(1), file=out)).__module__ == "tqdm.std"


def test_evaluating_restores_the_mode_and_turns_off_gradients():
    import torch

    from mdxlib.core import evaluating

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.9)).train()
    with evaluating(net) as m:
        assert m is net and not net.training and not torch.is_grad_enabled()
        x = torch.ones(4, 2)
        assert torch.equal(net(x), net(x))
    assert net.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"):
        with evaluating(net):
            raise RuntimeError("boom")
    assert net.training
    net.eval()
    with evaluating(net):
        pass
    assert not net.training


def test_cached_computes_once_per_key(monkeypatch, tmp_path):
    from mdxlib.core import cache_dir, cache_key, cached

    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    calls = []

    def compute():
        calls.append(1)
        return {"t": torch.arange(4), "a": np.arange(3), "s": "x"}

    first = cached("paper/part", compute, n=2, grid={"b": (1, 2)})
    again = cached("paper/part", compute, grid={"b": [1, 2]}, n=2)  # same key: keyword order, tuple vs list
    assert len(calls) == 1 and torch.equal(first["t"], again["t"]) and np.array_equal(first["a"], again["a"])
    cached("paper/part", compute, n=3, grid={"b": (1, 2)})
    assert len(calls) == 2
    files = sorted(p.name for p in (tmp_path / "paper").iterdir())
    assert files == sorted(f"part-{cache_key(n=n, grid={'b': [1, 2]})}.pt" for n in (2, 3))  # no temporary left


def test_cached_rejects_bad_input(monkeypatch, tmp_path):
    from mdxlib.core import cached

    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path))
    with pytest.raises(TypeError, match="plain JSON"):
        cached("p/x", lambda: 1, tensor=torch.ones(2))  # its str could be shared by two different tensors
    with pytest.raises(ValueError, match="name"):
        cached("../outside", lambda: 1)
    with pytest.raises(ValueError, match="name"):
        cached("", lambda: 1)
    with pytest.raises(TypeError, match="compute"):
        cached("p/x", 1)
    assert not any(tmp_path.iterdir())


def test_cached_keeps_no_half_entry(monkeypatch, tmp_path):
    from mdxlib.core import cached

    monkeypatch.setenv("MDXLIB_CACHE", str(tmp_path))

    def fails():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cached("p/x", fails, n=1)
    assert cached("p/x", lambda: 5, n=1) == 5  # nothing was stored by the failed call
