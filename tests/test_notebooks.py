"""Every notebook in nbs/ runs at smoke scale through papermill, and its metrics match the stored references.

References live in tests/reference/smoke.json: per notebook and metric, the value and the tolerance the notebook
declared when it logged it (`Results.log(..., rtol=, atol=)`). After a deliberate change of a result:
`python -m pytest -n 0 tests/test_notebooks.py --update-references` (one worker).
"""
import json
import math
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch

from mdxlib.core import results_path, write_json
from mdxlib.reproduce import find_notebooks, needs_gpu, run_notebook

REFERENCE = Path(__file__).parent / "reference" / "smoke.json"
TIMEOUT = int(os.environ.get("MDXLIB_NB_TIMEOUT", "300"))  # seconds per notebook; smoke scale takes <= 90 s
NOTEBOOKS = find_notebooks()
_updates: dict = {}


def _traceback(executed: Path) -> str:
    "The error output of the failing cell of an executed notebook, without colour codes."
    nb = nbformat.read(str(executed), as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = "\n".join(out.get("traceback", []))
                return cell.source + "\n" + re.sub(r"\x1b\[[0-9;]*m", "", tb)
    return ""


def compare(reference: dict, metrics: dict) -> list[str]:
    "The differences between reference metrics and this run's, each within the reference's tolerance."
    problems = []
    for name, ref in reference.items():
        if name not in metrics:
            problems.append(f"{name}: in the reference but not recorded by this run")
            continue
        new = metrics[name]["value"]
        if not math.isclose(new, ref["value"], rel_tol=ref["rtol"], abs_tol=ref["atol"]):
            problems.append(f"{name}: {new!r} differs from the reference {ref['value']!r} "
                            f"(rtol {ref['rtol']}, atol {ref['atol']})")
    for name in sorted(set(metrics) - set(reference)):
        problems.append(f"{name}: recorded by this run but missing from the reference")
    return problems


def test_compare_catches_moves():
    ref = {"a": {"value": 1.0, "rtol": 0.01, "atol": 0.0}}
    assert compare(ref, {"a": {"value": 1.005}}) == []
    assert "differs" in compare(ref, {"a": {"value": 1.02}})[0]
    assert "not recorded" in compare(ref, {})[0]
    assert "missing from the reference" in compare(ref, {"a": {"value": 1.0}, "b": {"value": 2.0}})[0]


@pytest.fixture(scope="module")
def references(request):
    refs = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else {}
    yield refs
    if request.config.getoption("--update-references") and _updates:
        refs.update(_updates)
        write_json(REFERENCE, dict(sorted(refs.items())))  # atomic: an interrupted update leaves the old file


def test_notebooks_discovered():
    names = [p.stem for p in NOTEBOOKS]
    assert "00_core" in names and names[-1] == "index", names


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_smoke(nb, tmp_path, references, _results_dir, request):
    if needs_gpu(nb) and not torch.cuda.is_available():
        pytest.skip(f"{nb.name} needs a GPU (notebook metadata mdxlib.gpu)")
    results_file = results_path(nb.stem, "smoke", _results_dir)
    results_file.unlink(missing_ok=True)
    run = run_notebook(nb, tmp_path, scale="smoke", cell_timeout=TIMEOUT, results=_results_dir)
    if not run.ok:
        pytest.fail(f"{nb.name} failed at smoke scale: {run.error}\n\n{_traceback(run.output)}", pytrace=False)
    metrics = json.loads(results_file.read_text())["metrics"] if results_file.exists() else {}
    if metrics:
        assert json.loads(results_file.read_text())["scale"] == "smoke"
    if request.config.getoption("--update-references"):
        _updates[nb.stem] = {k: {key: m[key] for key in ("value", "rtol", "atol")} for k, m in metrics.items()}
        return
    problems = compare(references.get(nb.stem, {}), metrics)
    assert not problems, (f"{nb.name}: smoke-scale metrics moved (update with --update-references if deliberate):\n"
                          + "\n".join(problems))
