"""A real ``sfumato serve`` process on a free loopback port, for the tests that
talk to it as outside clients do (browser, load, fuzzing)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sfumato.server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(settings: ServerSettings, *flags: str, log: Path | None = None) -> Iterator[str]:
    """Run ``sfumato serve`` on ``settings``' folders until the block ends; yields its base URL."""
    port = free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "sfumato", "serve", "--port", str(port), "--models", str(settings.models_dir),
         "--upscalers", str(settings.upscalers_dir), "--loras", str(settings.loras_dir),
         "--data", str(settings.data_dir), "--threads", "2", *flags],
        stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/hello", timeout=2) as response:
                    assert json.load(response) == {"ok": True}
                break
            except OSError:
                assert server.poll() is None, f"sfumato serve exited with {server.returncode}"
                assert time.monotonic() < deadline, "sfumato serve did not come up in 60 s"
                time.sleep(0.2)
        yield url
        assert server.poll() is None, f"sfumato serve died with {server.returncode}"
    finally:
        server.terminate()
        server.wait(60)
        if log:
            out.close()  # type: ignore[union-attr]
