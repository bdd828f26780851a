"""``sfumato worker``: a farm's worker, running a shared store's jobs on this machine."""

from __future__ import annotations

import argparse
import logging

from sfumato.cli.serve import server_settings


def worker(args: argparse.Namespace) -> int:
    from sfumato.server.jobs.farm_worker import work

    logging.getLogger("sfumato").setLevel(logging.INFO if args.verbose else logging.WARNING)
    work(server_settings(args))
    return 0
