"""``sfumato serve``: the HTTP server, and the settings its flags make (``worker`` shares them)."""

from __future__ import annotations

import argparse
from typing import Any

from sfumato.errors import SfumatoError
from sfumato.server.settings import ServerSettings


def server_settings(args: argparse.Namespace, **more: Any) -> ServerSettings:
    """The settings of ``serve`` or ``worker`` from their shared flags (and ``more``)."""
    import os

    return ServerSettings(
        models_dir=args.models,
        loras_dir=args.loras,
        upscalers_dir=args.upscalers,
        embeddings_dir=args.embeddings,
        controlnets_dir=args.controlnets,
        vaes_dir=args.vaes,
        data_dir=args.data,
        models_config=args.config,
        store=args.store or os.environ.get("SFUMATO_STORE"),
        lease_s=args.lease,
        threads=args.threads,
        jobs_per_device=args.jobs_per_device,
        device=args.device,
        precision=args.precision,
        **more,
    )


def serve(args: argparse.Namespace) -> int:
    import os

    from sfumato.server.app import serve

    if args.queue_size < 1:
        raise SfumatoError(f"--queue-size must be at least 1, got {args.queue_size}")
    settings = server_settings(
        args,
        host=args.host,
        port=args.port,
        default_model=args.default_model,
        workers=args.workers,
        queue_size=args.queue_size,
        api_key=args.api_key or os.environ.get("SFUMATO_API_KEY"),
        retention_s=args.retention_hours * 3600,
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        max_images=args.max_images,
        allow_private_urls=args.allow_private_urls,
        preview_method=args.preview_method,
    )
    serve(settings, log_level="info" if args.verbose else "warning")
    return 0
