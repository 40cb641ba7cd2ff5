"The library is what the notebooks export, the notebooks are clean, and README.md is what the index notebook says."
import filecmp
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("sync")  # one worker builds the fixture once
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    "A copy of the parts nbdev reads and writes, so the checkout itself is never touched."
    d = tmp_path_factory.mktemp("sync")
    for name in ("settings.ini", "setup.py", "README.md", "_quarto.yml"):
        shutil.copy(ROOT / name, d / name)
    shutil.copytree(ROOT / "nbs", d / "nbs", symlinks=True, ignore=shutil.ignore_patterns(".*", "results"))
    shutil.copytree(ROOT / "mdxlib", d / "mdxlib", ignore=shutil.ignore_patterns("__pycache__"))
    return d


def _run(tool, cwd):
    exe = BIN / tool
    assert exe.exists(), f"{tool} is not installed: pip install -e '.[dev]'"
    subprocess.run([str(exe)], cwd=cwd, check=True, capture_output=True, text=True)


def _differences(a: Path, b: Path, pattern: str) -> list[str]:
    files = sorted({p.relative_to(a) for p in a.rglob(pattern)} | {p.relative_to(b) for p in b.rglob(pattern)})
    return [str(f) for f in files
            if not ((a / f).exists() and (b / f).exists() and filecmp.cmp(a / f, b / f, shallow=False))]


def test_library_in_sync_with_notebooks(copy):
    _run("nbdev_export", copy)
    diff = _differences(ROOT / "mdxlib", copy / "mdxlib", "*.py")
    assert not diff, f"nbdev_export changes {diff}: run nbdev_export and commit the library"


def test_notebooks_clean(copy):
    _run("nbdev_clean", copy)
    diff = _differences(ROOT / "nbs", copy / "nbs", "*.ipynb")
    assert not diff, f"nbdev_clean changes {diff}: run nbdev_clean and commit the notebooks"


def test_readme_from_index(tmp_path):
    from mdxlib.reproduce import write_readme

    fresh = write_readme(readme=tmp_path / "README.md")
    assert fresh.read_text() == (ROOT / "README.md").read_text(), "README.md is stale: run `mdxlib readme`"


def test_quarto_yml_is_one_config():
    link = ROOT / "nbs" / "_quarto.yml"
    assert link.is_symlink() and link.resolve() == (ROOT / "_quarto.yml").resolve()


def test_ci_runs_the_readme_test_command():
    import re

    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_demo_cells_do_not_mix_imports_and_code():
    "nbdev runs every importing cell while building the docs (no parameters cell): keep imports in cells of their own."
    import ast

    import nbformat

    bad = []
    for nb_path in sorted((ROOT / "nbs").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(str(nb_path), as_version=4).cells):
            src = cell.source
            if cell.cell_type != "code" or re.search(r"^#\|\s*(export|exporti|exports)\b", src, re.M):
                continue
            try:
                tree = ast.parse(src)
            except SyntaxError:
                continue  # IPython magics
            imports = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
            if imports and not all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
                bad.append(f"{nb_path.name} cell {i}")
    assert not bad, "cells mixing imports with other code (move the imports to an import-only cell): " + ", ".join(bad)
