"The documentation site builds offline from _quarto.yml, with a page per notebook carrying its title, figures and maths."
import json
import re
from html import unescape
from pathlib import Path

import nbformat
import pytest

from mdxlib.reproduce import build_site, find_notebooks

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("site")  # one worker builds the fixture once


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(out=tmp_path_factory.mktemp("site") / "_docs")


def _title(nb) -> str:
    first = next(c for c in nb.cells if c.cell_type == "markdown")
    return re.match(r"#\s+(.+)", first.source).group(1).strip()


def _n_images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _has_math(nb) -> bool:
    return any(re.search(r"\$[^$\s][^$]*\$", c.source) for c in nb.cells if c.cell_type == "markdown")


def test_pages(site):
    pages = {p.stem for p in site.glob("*.html")}
    expected = {p.stem for p in find_notebooks()} | {"results"}
    assert pages == expected, f"stray or missing pages: {sorted(pages ^ expected)}"
    assert (site / "search.json").exists() and json.loads((site / "search.json").read_text())


@pytest.mark.parametrize("nb_path", find_notebooks(), ids=lambda p: p.stem)
def test_notebook_page(site, nb_path):
    nb = nbformat.read(str(nb_path), as_version=4)
    html = (site / f"{nb_path.stem}.html").read_text()
    title = _title(nb)
    assert f"<title>" in html and unescape(title) in unescape(html), f"title {title!r} not on the page"
    n_img = _n_images(nb)
    shown = len(re.findall(r"<img[^>]+src=\"(data:image/png|[^\"]+\.png)", html))
    assert shown >= n_img, f"{nb_path.name}: {n_img} figures in the notebook, {shown} on the page"
    for src in re.findall(r"<img[^>]+src=\"([^\"]+\.png)\"", html):
        assert (site / src).exists(), f"missing figure file {src}"
    if _has_math(nb):
        assert "katex" in html and ("\\(" in html or "\\[" in html), f"{nb_path.name}: maths not marked up for KaTeX"
    assert "$$" not in re.sub(r"<(pre|code)[^>]*>.*?</\1>", "", html, flags=re.S), "raw $$ left on the page"


def test_home_and_results_pages(site):
    home = (site / "index.html").read_text()
    assert "mdxlib reproduce" in home and "MD4" in home
    assert "Results" in (site / "results.html").read_text()


def test_build_writes_only_its_output(tmp_path):
    "Each build works in a private folder, so builds running at once (a notebook, the tests) never collide."
    before = sorted(p.name for p in ROOT.iterdir())
    out = build_site(out=tmp_path / "deep" / "site", results=tmp_path / "results")
    assert (out / "index.html").exists() and (out / "10_md4.html").exists()
    assert sorted(p.name for p in ROOT.iterdir()) == before, "the build wrote into the checkout"
