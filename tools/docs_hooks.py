"""MkDocs hook: an API reference page for every public module of dnn2bnn, found at build time.

``api/index.md`` documents every name in ``dnn2bnn.__all__``; this hook adds one page per
public submodule (``dnn2bnn.<name>`` where ``<name>`` does not start with ``_``) and lists
them under "API reference" in the navigation. A module added to the package later gets
its page without editing mkdocs.yml. Modules are found from the file tree, not imported.

A page added under docs/ but not (yet) listed in mkdocs.yml's ``nav`` is listed under
"More guides" (titled by its first heading), so it is reachable from the site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PACKAGE = "dnn2bnn"
ROOT = Path(__file__).resolve().parents[1]
SECTION = "API reference"
EXTRA_SECTION = "More guides"


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


def _listed(nav: Any) -> set[str]:
    """Every page path in a (nested) nav configuration."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav)) if nav else set()
    return set()


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip().strip("`")
    return path.stem.replace("_", " ").capitalize()


def on_config(config: Any) -> Any:
    nav = config["nav"]
    docs = Path(config["docs_dir"])
    listed = _listed(nav)
    extra = [
        {_title(p): p.relative_to(docs).as_posix()}
        for p in sorted(docs.rglob("*.md"))
        if p.relative_to(docs).as_posix() not in listed and p.relative_to(docs).parts[0] != "api"
    ]
    for position, entry in enumerate(nav):
        if isinstance(entry, dict) and SECTION in entry:
            index = entry[SECTION]
            index = index if isinstance(index, str) else "api/index.md"
            entry[SECTION] = [{PACKAGE: index}] + [{m: _page(m)} for m in public_modules()]
            if extra:
                nav.insert(position, {EXTRA_SECTION: extra})
            break
    return config


def on_files(files: Files, config: Any) -> Files:
    for module in public_modules():
        content = f"# `{module}`\n\n::: {module}\n    options:\n      show_root_heading: false\n"
        files.append(File.generated(config, _page(module), content=content))
    return files
