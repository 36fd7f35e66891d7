"""MkDocs hook: an API reference page for every public module of dnn2bnn, found at build time.

``api/index.md`` documents every name in ``dnn2bnn.__all__``; this hook adds one page per
public submodule (``dnn2bnn.<name>`` where ``<name>`` does not start with ``_``) and lists
them under "API reference" in the navigation. A module added to the package later gets
its page without editing mkdocs.yml. Modules are found from the file tree, not imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PACKAGE = "dnn2bnn"
ROOT = Path(__file__).resolve().parents[1]
SECTION = "API reference"


def public_modules() -> list[str]:
    """Dotted names of the package's public first-level submodules, sorted."""
    names = []
    for path in sorted((ROOT / PACKAGE).iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        if name.startswith("_"):
            continue
        if (path.suffix == ".py") or (path.is_dir() and (path / "__init__.py").exists()):
            names.append(f"{PACKAGE}.{name}")
    return names


def _page(module: str) -> str:
    return f"api/{module.removeprefix(PACKAGE + '.')}.md"


def on_config(config: Any) -> Any:
    for entry in config["nav"]:
        if isinstance(entry, dict) and SECTION in entry:
            index = entry[SECTION]
            index = index if isinstance(index, str) else "api/index.md"
            entry[SECTION] = [{PACKAGE: index}] + [{m: _page(m)} for m in public_modules()]
    return config


def on_files(files: Files, config: Any) -> Files:
    for module in public_modules():
        content = f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
        files.append(File.generated(config, _page(module), content=content))
    return files
