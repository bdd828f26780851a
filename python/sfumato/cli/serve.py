"""``sfumato serve``: the HTTP server, and the settings its flags make (``worker`` shares them)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from sfumato.errors import SfumatoError
from sfumato.server.settings import ServerSettings


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The settings of ``serve`` or ``worker``: each flag whose destination names a setting,
    the store and API key from the environment when their flags are not given."""
    import os

    given = {f.name: getattr(args, f.name) for f in fields(ServerSettings) if hasattr(args, f.name)}
    given["store"] = args.store or os.environ.get("SFUMATO_STORE")
    if hasattr(args, "api_key"):
        given["api_key"] = args.api_key or os.environ.get("SFUMATO_API_KEY")
    if hasattr(args, "retention_hours"):
        given["retention_s"] = args.retention_hours * 3600
    return ServerSettings(**given)


def serve(args: argparse.Namespace) -> int:
    from sfumato.server.app import serve

    if args.queue_size < 1:
        raise SfumatoError(f"--queue-size must be at least 1, got {args.queue_size}")
    settings = server_settings(args)
    serve(settings, log_level="info" if args.verbose else "warning")
    return 0
