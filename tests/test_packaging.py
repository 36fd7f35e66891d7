"""Packaging metadata: the type marker ships, the license is an SPDX expression (PEP 639)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_py_typed_marker_is_shipped_as_package_data():
    assert (ROOT / "dnn2bnn" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["dnn2bnn"]


def test_license_is_an_spdx_string_and_setuptools_can_read_it():
    assert PYPROJECT["project"]["license"] == "Apache-2.0"  # not the deprecated {text = ...} table
    requires = " ".join(PYPROJECT["build-system"]["requires"])
    version = re.search(r"setuptools>=(\d+)", requires)
    assert version and int(version.group(1)) >= 77  # the first setuptools with PEP 639 strings


def test_integration_extras_name_their_frameworks():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("transformers") for d in extras["transformers"])
    assert any(d.startswith("accelerate") for d in extras["transformers"])  # Trainer needs it
    assert any(d.startswith("lightning") for d in extras["lightning"])
