"""``sfumato generate``: one generation on a model this process loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

from sfumato.cli.flags import lora_arg, model_config_of
from sfumato.cli.terminal import run_job, write_pngs
from sfumato.errors import JobCancelledError
from sfumato.families.companions import ROLES
from sfumato.params import DiffusionParams


def generate(args: argparse.Namespace) -> int:
    import sfumato

    model_id = sfumato.load_model(args.model, model_config=model_config_of(args, "diffusion"))
    result = None
    refiner_id = None
    try:
        if args.refiner:
            companions = {role.key: None for role in ROLES.values()}  # the refiner is a file that loads alone
            config = {**model_config_of(args, "diffusion"), **companions, "upscaler": None}
            refiner_id = sfumato.load_model(args.refiner, model_config=config)
        params = {f.name: getattr(args, f.name) for f in fields(DiffusionParams)}
        params["upscale"] = {"repeats": args.upscale} if args.upscale is not None else None
        params["loras"] = [lora_arg(text) for text in args.loras]
        params["hires"] = (
            {
                "scale": args.hires_scale,
                "upscaler": args.hires_upscaler,
                "steps": args.hires_steps,
                "denoising_strength": args.hires_strength,
            }
            if args.hires
            else None
        )
        refiner = {"model_id": refiner_id, "switch_at": args.refiner_switch_at} if refiner_id else None
        result = sfumato.diffusion(model_id, **params, refiner=refiner, timeout=args.timeout)
        watch = None
        if args.preview:
            args.output.mkdir(parents=True, exist_ok=True)
            watch = args.output / "sfumato_preview.png"
        outputs, stats = run_job(result, args.quiet, watch)
    except (JobCancelledError, KeyboardInterrupt):
        if result is not None:  # keep what the job finished before it stopped
            write_pngs(args.output, "sfumato_cancelled", result.partial_outputs)
        raise
    finally:
        sfumato.unload_model(model_id)
        if refiner_id is not None:
            sfumato.unload_model(refiner_id)
    write_pngs(args.output, f"sfumato_{stats.seed}", outputs)
    print(json.dumps(asdict(stats), indent=2))
    return 0
