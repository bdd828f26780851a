"""Benchmark fixtures: the same self-made models as the tests (random weights
in the real layouts), from the same cache folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sfumato.testing import models

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


@pytest.fixture(scope="session")
def sd1_gguf() -> Path:
    """A full-size SD 1.x model (859M-parameter UNet) as one GGUF file."""
    folder = models.models_dir(ROOT / ".test-models")
    return models.cached(folder, "sd1.gguf", lambda p: models.write_sd_checkpoint(p, "sd1"))


def write_result(name: str, table: list[dict[str, object]], note: str) -> None:
    """Write one case's figures to ``bench/results/<name>.json`` and ``.md``."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(table, indent=2) + "\n")
    columns = list(table[0])
    lines = [f"| {' | '.join(columns)} |", f"|{'---|' * len(columns)}"]
    lines += [f"| {' | '.join(str(row[c]) for c in columns)} |" for row in table]
    (RESULTS / f"{name}.md").write_text("\n".join([note, "", *lines]) + "\n")
