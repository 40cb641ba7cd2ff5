"mdxlib.reproduce (the `mdxlib` command) from the outside."
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from mdxlib.core import Results, read_json, results_path, write_json
from mdxlib.reproduce import (PAPERS, find_notebooks, keep_outputs, main, notebook_markdown, papers_table,
                              results_frame, results_markdown, run_notebook, source_hash)

ROOT = Path(__file__).resolve().parent.parent


def _nb(path, *sources):
    params = nbformat.v4.new_code_cell('scale = "cpu"\nseed = 0', metadata={"tags": ["parameters"]})
    nb = nbformat.v4.new_notebook(cells=[params,
                                         *[nbformat.v4.new_code_cell(s) for s in sources]])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_find_notebooks():
    names = [p.stem for p in find_notebooks()]
    assert names[0] == "00_core" and names[-1] == "index"
    assert [p.stem for p in find_notebooks(only=["core", "index"])] == ["00_core", "index"]
    with pytest.raises(ValueError, match="only: no notebook named 'zz'"):
        find_notebooks(only=["zz"])


def test_run_notebook_passes_parameters_and_reports_failures(tmp_path):
    ok = _nb(tmp_path / "a.ipynb", "from mdxlib.core import Results\nResults('a', scale, seed).log('s', len(scale))")
    run = run_notebook(ok, tmp_path / "out", scale="smoke", seed=3, results=tmp_path / "res")
    assert run.ok, run.error
    data = json.loads((tmp_path / "res" / "smoke" / "a.json").read_text())
    assert data["status"] == "complete" and data["source_hash"] == source_hash(ok)
    assert data["scale"] == "smoke" and data["seed"] == 3 and data["metrics"]["s"]["value"] == 5
    bad = _nb(tmp_path / "b.ipynb", "x = 1", "raise RuntimeError('boom')")
    run = run_notebook(bad, tmp_path / "out", scale="smoke", results=tmp_path / "res")
    assert not run.ok and "RuntimeError: boom" in run.error and "cell In [" in run.error
    with pytest.raises(ValueError, match="scale"):
        run_notebook(ok, tmp_path / "out", scale="large")


def test_results_table(tmp_path):
    Results("10_md4", "cpu", 0, path=results_path("10_md4", "cpu", tmp_path)).log("bpc_md4_linear", 2.0, paper=1.37,
                                                                                  setting="tiny")
    Results("10_md4", "smoke", 0, path=results_path("10_md4", "smoke", tmp_path)).log("bpc_md4_linear", 9.0)
    df = results_frame(tmp_path, scale="cpu")
    assert df.loc[0, "ours"] == 2.0 and df.loc[0, "paper"] == 1.37
    md = results_markdown(df)
    assert "bpc_md4_linear" in md and "1.37" in md
    table = papers_table(tmp_path)
    assert len(PAPERS) == 10 and table.count("\n") == 12
    assert "2 (cpu scale)" in table  # the largest scale that ran, not the smoke run


def test_cli_help_and_errors():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "--scale", "gigantic"])
    assert e.value.code == 2
    with pytest.raises(ValueError, match="only"):
        main(["reproduce", "--only", "nope", "--no-site"])


def test_cli_reproduce_only_core(tmp_path, monkeypatch):
    "With --out, the executed copies, the results and the table all go under that folder."
    monkeypatch.setenv("MDXLIB_RESULTS", str(tmp_path / "results_elsewhere"))
    exe = Path(sys.executable).parent / "mdxlib"
    out = tmp_path / "out"
    res = subprocess.run([str(exe), "reproduce", "--only", "core", "--scale", "smoke", "--out", str(out), "--no-site"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "cosine_integral" in res.stdout and (out / "smoke" / "00_core.ipynb").exists()
    assert "cosine_integral" in (out / "results.md").read_text()
    assert results_path("00_core", "smoke", out / "results").exists() and not (tmp_path / "results_elsewhere").exists()
    assert "IPKernelApp" not in "".join(
        o.get("text", "") for c in nbformat.read(out / "smoke" / "00_core.ipynb", as_version=4).cells
        for o in c.get("outputs", []))


def test_notebook_markdown_skips_code():
    md = notebook_markdown(ROOT / "nbs" / "index.ipynb")
    assert md.startswith("# mdxlib") and "import" not in md.split("## Using")[0]


def test_gpu_notebooks_are_skipped_without_cuda(tmp_path):
    import torch

    path = _nb(tmp_path / "g.ipynb", "raise RuntimeError('must not run')")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["mdxlib"] = {"gpu": True}
    nbformat.write(nb, path)
    run = run_notebook(path, tmp_path / "out", scale="smoke", results=tmp_path / "res")
    if torch.cuda.is_available():
        assert not run.ok
    else:
        assert run.ok and run.skipped and "GPU" in run.skipped


def test_nbdev_clean_keeps_the_gpu_marker(tmp_path):
    "settings.ini allows the `mdxlib` notebook metadata key, so cleaning never drops a notebook's GPU marker."
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    assert "mdxlib" in cfg["DEFAULT"]["allowed_metadata_keys"].split()


def test_run_notebooks_collects_failures_and_runs_index_last(tmp_path):
    from mdxlib.reproduce import run_notebooks

    a = _nb(tmp_path / "index.ipynb", "x = 1")
    b = _nb(tmp_path / "10_bad.ipynb", "raise ValueError('nope')")
    c = _nb(tmp_path / "00_ok.ipynb", "y = 2")
    runs = run_notebooks([a, b, c], tmp_path / "out", scale="smoke", jobs=2)
    assert [r.name for r in runs][-1] == "index" and {r.name for r in runs} == {"index", "10_bad", "00_ok"}
    assert [r.ok for r in runs if r.name == "10_bad"] == [False]
    with pytest.raises(ValueError, match="jobs"):
        run_notebooks([a], tmp_path / "out", jobs=0)


def test_keep_outputs_drops_injected_cell_and_refuses_other_scales(tmp_path):
    from mdxlib.reproduce import nbs_dir

    assert (nbs_dir() / "index.ipynb").exists()
    src, executed = tmp_path / "nbs", tmp_path / "executed"
    src.mkdir()
    nb = _nb(src / "a.ipynb", "print(1)")
    assert run_notebook(nb, executed, scale="cpu", results=tmp_path / "res").ok
    assert keep_outputs(executed, nbs=src) == [src / "a.ipynb"]
    kept = nbformat.read(str(src / "a.ipynb"), as_version=4)
    assert len(kept.cells) == 2 and kept.cells[1].outputs and "papermill" not in kept.metadata
    assert sorted(p.name for p in src.iterdir()) == ["a.ipynb"]  # written atomically: no temporary left
    assert run_notebook(nb, executed, scale="smoke", results=tmp_path / "res").ok
    with pytest.raises(ValueError, match="cpu"):
        keep_outputs(executed, nbs=src)


def test_keep_outputs_never_damages_a_notebook(tmp_path):
    "Only complete runs are kept, and never over a notebook edited since its run started."
    src, executed = tmp_path / "nbs", tmp_path / "executed"
    src.mkdir()
    good = _nb(src / "a.ipynb", "x = 1")
    assert run_notebook(good, executed, scale="cpu", results=tmp_path / "res").ok
    edited = good.read_text().replace("x = 1", "x = 2")  # someone edits the notebook while it runs
    good.write_text(edited)
    with pytest.raises(ValueError, match="a.ipynb changed since its run started"):
        keep_outputs(executed, nbs=src)
    assert good.read_text() == edited
    bad = _nb(src / "b.ipynb", "raise RuntimeError('late')")
    before = bad.read_bytes()
    assert not run_notebook(bad, executed, scale="cpu", results=tmp_path / "res").ok
    with pytest.raises(ValueError, match="b.ipynb is not a run papermill recorded as complete"):
        keep_outputs(executed, names=["b"], nbs=src)
    assert bad.read_bytes() == before
    plain = executed / "c.ipynb"  # an executed copy that did not come from run_notebook
    nbformat.write(nbformat.v4.new_notebook(metadata={"papermill": {"end_time": "x", "exception": None}}), plain)
    with pytest.raises(ValueError, match="not executed by mdxlib"):
        keep_outputs(executed, names=["c"], nbs=src)


def _logs(path, value, fail=""):
    return _nb(path, f"from mdxlib.core import Results\nResults({path.stem!r}, scale, seed).log('acc', {value})", fail)


def test_failed_or_interrupted_runs_lose_no_results(tmp_path, monkeypatch):
    res = tmp_path / "res"
    nb = _logs(tmp_path / "11_x.ipynb", 0.9)
    assert run_notebook(nb, tmp_path / "out", scale="smoke", results=res).ok
    complete = results_path("11_x", "smoke", res)
    assert read_json(complete)["metrics"]["acc"]["value"] == 0.9
    _logs(nb, 0.1, "raise RuntimeError('late')")
    run = run_notebook(nb, tmp_path / "out", scale="smoke", results=res)
    assert not run.ok and read_json(complete)["metrics"]["acc"]["value"] == 0.9
    failed = read_json(results_path("11_x", "smoke", res, failed=True))
    assert failed["status"] == "failed" and failed["metrics"]["acc"]["value"] == 0.1 and "late" in failed["error"]
    df = results_frame(res)
    assert list(df.status) == ["failed"] and list(df.ours) == [0.9]  # the last complete value, flagged
    _logs(nb, 0.5, "import os; os._exit(1)")  # the kernel dies
    assert not run_notebook(nb, tmp_path / "out", scale="smoke", results=res).ok
    assert read_json(complete)["metrics"]["acc"]["value"] == 0.9
    import papermill

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_notebook(nb, tmp_path / "out", scale="smoke", results=res)
    assert read_json(complete)["metrics"]["acc"]["value"] == 0.9
    assert read_json(results_path("11_x", "smoke", res, failed=True))["error"] == "interrupted"
    assert sorted(p.name for p in (res / "smoke").iterdir()) == ["11_x.failed.json", "11_x.json"]  # no staging left
    monkeypatch.undo()
    _logs(nb, 0.8)
    assert run_notebook(nb, tmp_path / "out", scale="smoke", results=res).ok
    assert sorted(p.name for p in (res / "smoke").iterdir()) == ["11_x.json"]
    assert list(results_frame(res).status) == ["ok"]


def test_stale_results_are_flagged(tmp_path):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    nb = _logs(nbs / "11_x.ipynb", 0.9)
    assert run_notebook(nb, tmp_path / "out", scale="smoke", results=tmp_path / "res").ok
    assert list(results_frame(tmp_path / "res", nbs=nbs).status) == ["ok"]
    book = nbformat.read(str(nb), as_version=4)
    book.cells.append(nbformat.v4.new_markdown_cell("Prose changes nothing the results depend on."))
    nbformat.write(book, str(nb))
    assert list(results_frame(tmp_path / "res", nbs=nbs).status) == ["ok"]
    _logs(nb, 0.7)  # the notebook's code changed since its results were written
    assert list(results_frame(tmp_path / "res", nbs=nbs).status) == ["stale"]


def test_cli_results_and_docs_errors(tmp_path, capsys):
    bad = results_path("10_md4", "cpu", tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text('{"notebook": ')
    assert main(["results", "--folder", str(tmp_path)]) == 1
    assert str(bad) in capsys.readouterr().err
    write_json(bad, dict(notebook="10_md4", scale="cpu", seed=0, metrics={"m": {"value": 1.5}}))
    assert main(["results", "--folder", str(tmp_path), "--scale", "cpu"]) == 0
    assert "1.5" in capsys.readouterr().out
    assert main(["docs", "--executed", str(tmp_path / "typo")]) == 1
    assert "typo" in capsys.readouterr().err


def test_parallel_notebooks_share_the_cores(tmp_path, monkeypatch):
    "With several notebooks at once, each kernel gets its share of the cores through MDXLIB_THREADS (unless set)."
    import os

    from mdxlib.reproduce import run_notebooks

    monkeypatch.delenv("MDXLIB_THREADS", raising=False)
    code = "import os, pathlib\npathlib.Path({!r}).write_text(os.environ.get('MDXLIB_THREADS', 'unset'))"
    paths = [_nb(tmp_path / f"{i}_t.ipynb", code.format(str(tmp_path / f"{i}.txt"))) for i in range(2)]
    assert all(r.ok for r in run_notebooks(paths, tmp_path / "out", scale="smoke", jobs=2))
    assert {(tmp_path / f"{i}.txt").read_text() for i in range(2)} == {str(max(1, (os.cpu_count() or 1) // 2))}
    assert "MDXLIB_THREADS" not in os.environ  # restored afterwards
    monkeypatch.setenv("MDXLIB_THREADS", "3")
    assert all(r.ok for r in run_notebooks(paths, tmp_path / "out", scale="smoke", jobs=2))
    assert (tmp_path / "0.txt").read_text() == "3"


def test_tidy_outputs_drops_kernel_log_lines_and_ansi_codes(tmp_path):
    from mdxlib.reproduce import tidy_outputs

    warning = ("[IPKernelApp] WARNING | Kernel is running over TCP without encryption. All communication is sent "
               "in plain text.\n")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="bar: 100%|##| 2/2" + warning + "\n"),
        nbformat.v4.new_output("stream", name="stdout", text="\x1b[1;31mred\x1b[0m and \x1b[2Kplain\n"),
        nbformat.v4.new_output("stream", name="stderr", text=warning),
        nbformat.v4.new_output("error", ename="E", evalue="x", traceback=["\x1b[0;31mE\x1b[0m: x"]),
        nbformat.v4.new_output("execute_result", data={"text/plain": "\x1b[32mok\x1b[0m"})])])
    nbformat.write(nb, tmp_path / "a.ipynb")
    assert tidy_outputs(tmp_path / "a.ipynb")
    outs = nbformat.read(tmp_path / "a.ipynb", as_version=4).cells[0].outputs
    text = nbformat.writes(nbformat.read(tmp_path / "a.ipynb", as_version=4))
    assert "IPKernelApp" not in text and "\\u001b" not in text
    assert [o.output_type for o in outs] == ["stream", "stream", "error", "execute_result"]
    assert outs[0].text == "bar: 100%|##| 2/2\n" and outs[1].text == "red and plain\n"
    assert outs[2].traceback == ["E: x"] and outs[3].data["text/plain"] == "ok"


def test_tidy_outputs_keeps_the_last_state_of_progress_bars(tmp_path, monkeypatch):
    from mdxlib.reproduce import run_notebook, tidy_outputs

    monkeypatch.delenv("MDXLIB_PROGRESS", raising=False)  # the tests turn bars off; this one wants the default

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="x:   0%| | 0/3"),
        nbformat.v4.new_output("stream", name="stderr", text="\rx:  33%|#| 1/3\rx: 100%|###| 3/3\n"),
        nbformat.v4.new_output("stream", name="stdout", text="plain\nlines\n"),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "a"},
                                                     "text/plain": "Loading weights:   0%|   | 0/272"}),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "b"},
                                                     "text/plain": "IntSlider(value=0)"})])])
    nbformat.write(nb, tmp_path / "a.ipynb")
    assert tidy_outputs(tmp_path / "a.ipynb") and not tidy_outputs(tmp_path / "a.ipynb")
    outs = nbformat.read(tmp_path / "a.ipynb", as_version=4).cells[0].outputs
    assert [o.get("text") for o in outs[:2]] == ["x: 100%|###| 3/3\n", "plain\nlines\n"]
    assert len(outs) == 3 and outs[2].data["text/plain"] == "IntSlider(value=0)"  # a tqdm widget goes, others stay
    # a real run: the library's bars are plain text in the executed copy, with only their final state
    code = ("from mdxlib.core import progress\nfrom tqdm.auto import tqdm\n"
            "for _ in progress(range(3), desc='loop', mininterval=0): pass\n"
            "for _ in tqdm(range(3), desc='other'): pass")
    run = run_notebook(_nb(tmp_path / "b.ipynb", code), tmp_path / "out", scale="smoke", results=tmp_path / "res")
    outs = [o for c in nbformat.read(str(run.output), as_version=4).cells for o in c.outputs]
    text = "".join(o.get("text", "") for o in outs)
    assert run.ok and "loop: 100%" in text and "\r" not in text and "0%" not in text.replace("100%", "")
    assert "other" not in text  # other libraries' bars are widgets in a kernel: removed from executed copies


def test_a_complete_run_clears_a_failure_even_without_results(tmp_path):
    "A notebook that logs no Results: its failure flag goes once a run of it completes."
    res = tmp_path / "res"
    nb = _nb(tmp_path / "12_y.ipynb", "x = 1", "raise RuntimeError('boom')")
    assert not run_notebook(nb, tmp_path / "out", scale="smoke", results=res).ok
    assert read_json(results_path("12_y", "smoke", res, failed=True))["status"] == "failed"
    _nb(nb, "x = 1")
    assert run_notebook(nb, tmp_path / "out", scale="smoke", results=res).ok
    assert not list((res / "smoke").iterdir())
