"Shared test set-up: offline, quiet, results kept apart from the checkout; per-phase timings in the summary."
import os
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # CI machines have no hub access: fail fast, never hang
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MDXLIB_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "lint: the linter over the whole repository (deselect with -m 'not lint')")


def pytest_addoption(parser):
    parser.addoption("--update-references", action="store_true",
                     help="rewrite tests/reference/smoke.json from this run's smoke-scale notebook metrics")


@pytest.fixture(scope="session", autouse=True)
def _results_dir(tmp_path_factory):
    "Every notebook and test writes its results (`<scale>/<notebook>.json`) into a temporary folder, not the checkout."
    d = tmp_path_factory.mktemp("results")
    os.environ["MDXLIB_RESULTS"] = str(d)
    return d


_phase_times = defaultdict(float)


def pytest_runtest_logreport(report):
    "Add up the time of each test file (runs in the controller, so it also works with pytest-xdist)."
    _phase_times[Path(report.fspath).stem] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _phase_times:
        return
    terminalreporter.section("time per phase (test file, summed over workers)")
    for name, sec in sorted(_phase_times.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{name:<28} {sec:8.1f} s")
    terminalreporter.write_line(f"{'total':<28} {sum(_phase_times.values()):8.1f} s")
