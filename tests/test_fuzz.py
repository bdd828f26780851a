"""Schemathesis against the server's own OpenAPI document, on a real
``sfumato serve`` process with the tiny self-made model: no 5xx, no dead process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from sfumato.server.settings import ServerSettings

from .helpers import serving

HOOKS = Path(__file__).with_name("fuzz_hooks.py")
FUZZ_SECONDS = int(os.environ.get("SFUMATO_FUZZ_SECONDS", "90"))
# Jobs stay cheap on the 2-core CI machine: 128x128 at most, 2 steps, 2 images.
LIMITS = ("--queue-size", "4", "--max-pixels", str(128 * 128), "--max-steps", "2", "--max-images", "2")


def test_schemathesis_finds_no_server_error(settings: ServerSettings, tmp_path: Path) -> None:
    with serving(settings, *LIMITS, log=tmp_path / "serve.log") as url:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
             "--max-time", str(FUZZ_SECONDS), "--seed", "1", "--workers", "1", "--request-timeout", "120",
             "--max-examples", "50"],
            env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}, cwd=tmp_path, capture_output=True, text=True,
            timeout=FUZZ_SECONDS + 300,
        )  # fmt: skip
        summary = run.stdout[run.stdout.rfind("SUMMARY") :]
        print(summary)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        with urllib.request.urlopen(f"{url}/queue?limit=200", timeout=10) as response:
            jobs = json.load(response)["jobs"]
    assert jobs, "the fuzzing never got a job accepted"
    assert not [j for j in jobs if j["state"] == "error"], [j for j in jobs if j["state"] == "error"]
    print(f"{len(jobs)} jobs accepted during fuzzing: {sorted({j['state'] for j in jobs})}")
