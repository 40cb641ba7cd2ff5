"The documentation site builds offline from _quarto.yml: a page per notebook with its title, figures and maths."
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
    return sum("image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


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
    assert "<title>" in html and unescape(title) in unescape(html), f"title {title!r} not on the page"
    n_img = _n_images(nb)
    shown = len(re.findall(r"<img[^>]+src=\"(data:image/png|[^\"]+\.png)", html))
    assert shown >= n_img, f"{nb_path.name}: {n_img} figures in the notebook, {shown} on the page"
    for src in re.findall(r"<img[^>]+src=\"([^\"]+\.png)\"", html):
        assert (site / src).exists(), f"missing figure file {src}"
    if _has_math(nb):
        assert "<math" in html, f"{nb_path.name}: maths not converted to MathML"
        assert "katex" not in html.lower(), f"{nb_path.name}: KaTeX assets left on the page (they need a network)"
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


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _rendered_dom(page: Path) -> str:
    "The page's DOM after scripts ran, in headless Chromium with every network address unreachable."
    import subprocess

    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style|pre|code)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return unescape(re.sub(r"<[^>]+>", " ", dom))


@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian package chromium)")
def test_pages_in_a_browser_offline(site):
    "What a reader sees with no network: maths rendered, no parameters cells, working sidebar, every paper listed."
    from mdxlib.reproduce import PAPERS

    for name in ("index.html", "10_md4.html", "results.html"):
        dom = _rendered_dom(site / name)
        text = _visible_text(dom)
        assert "\\(" not in text and "\\[" not in text, f"{name}: raw LaTeX visible"
        assert "injected-parameters" not in dom and 'scale: str = "cpu"' not in text, f"{name}: parameters cell shown"
        if name == "10_md4.html":
            assert dom.count("<math") > 20, "maths not rendered as MathML"
        if name == "results.html":
            for _, title, *_ in PAPERS:
                assert unescape(title) in text, f"results page lacks {title!r}"
    home = (site / "index.html").read_text()
    nav = re.search(r'<nav[^>]*sidebar.*?</nav>', home, flags=re.S) or re.search(r'id="quarto-sidebar".*?</nav>', home,
                                                                                 flags=re.S)
    links = re.findall(r'href="([^"#:]+\.html)"', nav.group(0) if nav else home)
    assert links, "no sidebar links found"
    missing = [href for href in links if not (site / href).exists()]
    assert not missing, f"sidebar links that do not resolve: {missing}"
