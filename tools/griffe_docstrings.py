"""Griffe extension: read the project's docstring conventions as Markdown-friendly Google style.

Two habits of the code base are valid Google style (and Sphinx napoleon) but render badly
with mkdocstrings, so they are rewritten before a docstring is parsed:

* ``Example:`` headers become ``Examples:``. Griffe recognises only the plural; it renders
  the singular as an admonition in which ``x["key"]`` looks like a Markdown link, and
  ``mkdocs build --strict`` fails on the broken cross-reference.
* A class or function whose docstring is assigned at run time (``__doc__ = TEMPLATE.format(...)``,
  as the Bayesian convolutions do) gets the run-time docstring; static analysis sees none.
* Sphinx roles (``:func:`name```, ``:class:``, ``:meth:``, ``:attr:``, ...) become plain
  inline code, instead of a literal ``:func:`` in front of it.

The source files are not changed; this only affects the documentation site.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from typing import Any

from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[1]
# A logger under "mkdocs": `mkdocs build --strict` counts its warnings as errors.
_log = logging.getLogger("mkdocs.plugins.dnn2bnn_docstrings")
_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|obj|data|exc|const):`~?([^`]+)`")


def to_markdown(text: str) -> str:
    """The docstring ``text`` with the two rewrites above applied."""
    return _ROLE.sub(r"`\1`", _SINGULAR.sub(r"\1Examples:", text))


class DocstringConventions(griffe.Extension):
    """Fill in run-time docstrings and apply :func:`to_markdown` to every docstring."""

    def on_instance(self, *, obj: griffe.Object, agent: Any = None, **kwargs: Any) -> None:
        if obj.docstring is None and (obj.is_class or obj.is_function):
            text = _runtime_docstring(obj.path)
            if text:
                obj.docstring = griffe.Docstring(
                    text,
                    parent=obj,
                    parser=getattr(agent, "docstring_parser", None),
                    parser_options=getattr(agent, "docstring_options", None),
                )
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)


def _runtime_docstring(path: str) -> str | None:
    """The object's own ``__doc__`` (not one inherited from a base class), or None."""
    try:
        runtime = griffe.dynamic_import(path, import_paths=[str(ROOT), *sys.path])
    except ImportError as exc:
        _log.warning("%s has no static docstring and cannot be imported to read one: %s", path, exc)
        return None
    own = vars(runtime).get("__doc__") if isinstance(runtime, type) else runtime.__doc__
    return inspect.cleandoc(own) if isinstance(own, str) else None
