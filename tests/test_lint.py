"One linter for the library, the tests and the notebooks: `ruff check` (settings in ruff.toml) must be clean."
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.lint
def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is a dev requirement: pip install -e '.[dev]'")
    cmd = [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "mdxlib", "tests", "nbs"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, f"ruff check found problems (fix them, or `ruff check --fix`):\n{res.stdout[-6000:]}"
