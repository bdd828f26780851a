"""``sfumato models``: the registry constants and their cache state, or what a folder of
models holds, each file with its family (or why it is refused)."""

from __future__ import annotations

import argparse
from pathlib import Path


def models(args: argparse.Namespace) -> int:
    folder: Path | None = getattr(args, "folder", None)
    if folder is not None:
        return _folder(folder)
    from sfumato.registry import REGISTRY, cached_path

    for name, model in REGISTRY.items():
        path = cached_path(model)
        state = f"cached at {path}" if path.is_file() else f"not cached ({model.source_url})"
        print(f"{name:<28} {model.family:<7} {state}")
    return 0


def describe(path: Path) -> str:
    """One file's (or diffusers folder's) line: its family and variant, and the companion
    files it needs (``model_config`` keys); or why sfumato does not load it."""
    from sfumato.errors import SfumatoError
    from sfumato.families.companions import ROLES, family_files
    from sfumato.families.detect import FAMILY_NAMES, detect

    try:
        info = detect(path)
    except SfumatoError as exc:
        return f"not loadable: {str(exc).removeprefix(f'{path}: ')}"
    kind = FAMILY_NAMES[info.family] + (f" ({info.variant})" if info.variant else "")
    needs = [ROLES[role].key for role in family_files(info).required]
    return f"{kind}; needs {', '.join(needs)}" if needs else kind


def _folder(folder: Path) -> int:
    from sfumato.errors import SfumatoError
    from sfumato.server.models.catalog import MODEL_SUFFIXES, candidates

    if not folder.is_dir():
        raise SfumatoError(f"folder: {folder} is not a folder")
    found = candidates(folder)
    width = max((len(p.name) for p in found), default=0)
    for path in found:
        print(f"{path.name:<{width}}  {describe(path)}")
    if not found:
        print(f"no model file in {folder} ({', '.join(MODEL_SUFFIXES)}, or a diffusers folder)")
    return 0
