"""MkDocs hooks of the documentation site (mkdocs.yml names this file).

The API reference is generated from the SDK's docstrings; a public name without one
would leave a hole in it, so each is reported as a warning, which ``mkdocs build
--strict`` (as ``.ci/run`` runs it) turns into a failure.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import griffe

log = logging.getLogger("mkdocs.plugins.sfumato")

SOURCE = Path(__file__).resolve().parent.parent / "python"

# The packages the reference documents: every name each exports in ``__all__``.
DOCUMENTED = ("sfumato", "sfumato.engine")


def _missing(obj: Any, where: str) -> list[str]:
    """The public objects under ``obj`` (itself, a class's methods) without a docstring."""
    missing = [] if obj.docstring else [where]
    if obj.is_class:
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or not member.is_function:
                continue
            if not member.docstring:
                missing.append(f"{where}.{name}")
    return missing


def on_config(config: Any) -> Any:
    """Warn for every documented public name, and every public method of a documented
    class, that has no docstring."""
    for package in DOCUMENTED:
        module = griffe.load(package, search_paths=[str(SOURCE)], resolve_aliases=True)
        names = module.exports or []
        for name in names:
            member = module.members.get(str(name))
            if member is None:
                log.warning("%s.__all__ names %s, which it does not define", package, name)
                continue
            target = member.final_target if member.is_alias else member
            if target.is_attribute or target.is_module:
                continue
            for where in _missing(target, f"{package}.{name}"):
                log.warning("%s has no docstring: the API reference would show nothing for it", where)
    return config
