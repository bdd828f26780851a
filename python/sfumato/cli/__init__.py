"""The ``sfumato`` command: ``generate``, ``upscale``, ``serve``, ``info``, ``models``.

Flags carry the SDK's field names (``--cfg-scale`` is ``cfg_scale``) and take
their defaults from :class:`sfumato.params.DiffusionParams`, so the CLI, the SDK
and the HTTP schemas agree.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

from sfumato.cli.flags import parse_args
from sfumato.cli.generate import generate
from sfumato.cli.info import info
from sfumato.cli.models import models
from sfumato.cli.serve import serve
from sfumato.cli.terminal import on_ctrl_c
from sfumato.cli.upscale import upscale
from sfumato.cli.worker import worker
from sfumato.errors import SfumatoError


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sfumato`` command; returns the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    handlers = {
        "generate": generate,
        "upscale": upscale,
        "serve": serve,
        "worker": worker,
        "info": info,
        "models": models,
    }
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        return handlers[args.command](args)
    except SfumatoError as exc:
        print(f"sfumato: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sfumato: interrupted; the job was cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
