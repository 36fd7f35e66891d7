"""The documentation site builds in strict mode, and its API reference covers the public API.

Strict mode turns every warning into an error: a docstring whose ``Args:`` name a parameter
the signature does not have, or a broken cross-reference, fails this test (and CI's
``make docs``). Skipped when the ``docs`` extra (mkdocs, mkdocstrings) is not installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dnn2bnn

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
         "-f", str(ROOT / "mkdocs.yml"), "-d", str(site_dir)],
        capture_output=True, text=True, timeout=300, cwd=site_dir,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return site_dir


def _anchors(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text()))


@pytest.mark.slow
def test_every_public_name_is_in_the_api_reference(site: Path) -> None:
    anchors = _anchors(site / "api" / "index.html")
    missing = [
        name
        for name in dnn2bnn.__all__
        if not inspect.ismodule(getattr(dnn2bnn, name)) and f"dnn2bnn.{name}" not in anchors
    ]
    assert not missing, f"api/index.html does not document {missing}"
    # Submodules listed in __all__ have a page of their own.
    for name in dnn2bnn.__all__:
        if inspect.ismodule(getattr(dnn2bnn, name)):
            assert (site / "api" / f"{name}.html").exists(), f"no API page for dnn2bnn.{name}"


@pytest.mark.slow
def test_every_public_module_has_a_page(site: Path) -> None:
    modules = [
        p.stem if p.suffix == ".py" else p.name
        for p in (ROOT / "dnn2bnn").iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists())
    ]
    assert modules
    for module in modules:
        page = site / "api" / f"{module}.html"
        assert page.exists(), f"no API page for dnn2bnn.{module}"
        assert f"dnn2bnn.{module}" in _anchors(page)


@pytest.mark.slow
def test_google_sections_render(site: Path) -> None:
    html = (site / "api" / "index.html").read_text()
    start = html.index('id="dnn2bnn.WithBNNLoss"')
    block = html[start : html.index('id="dnn2bnn.WithBNNLoss.elbo"')]
    # Args -> a parameter table, Attributes -> a table, Example -> highlighted doctest code.
    assert "Parameters:" in block and "<code>bnn_factor</code>" in block
    assert "Attributes:" in block and "last_kl" in block
    assert 'class="gp">&gt;&gt;&gt; </span>' in block
    assert ":func:" not in html and ":class:" not in html
