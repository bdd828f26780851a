"""``sfumato models``: the registry constants and their cache state."""

from __future__ import annotations

import argparse


def models(_args: argparse.Namespace) -> int:
    from sfumato.registry import REGISTRY, cached_path

    for name, model in REGISTRY.items():
        path = cached_path(model)
        state = f"cached at {path}" if path.is_file() else f"not cached ({model.source_url})"
        print(f"{name:<28} {model.family:<7} {state}")
    return 0
