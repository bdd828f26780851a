"""``sfumato upscale``: one image through an ESRGAN this process loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from sfumato.cli.flags import model_config_of
from sfumato.cli.terminal import run_job


def upscale(args: argparse.Namespace) -> int:
    import sfumato

    model_id = sfumato.load_model(args.model, model_config=model_config_of(args, "upscale"))
    try:
        result = sfumato.upscale(model_id, image=args.image, repeats=args.repeats, timeout=args.timeout)
        outputs, stats = run_job(result, args.quiet)
    finally:
        sfumato.unload_model(model_id)
    target = args.output or args.image.with_name(f"{args.image.stem}-upscaled.png")
    target.write_bytes(outputs[0])
    print(target)
    print(json.dumps(asdict(stats), indent=2))
    return 0
