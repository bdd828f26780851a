"""A1111's infotext: the generation parameters its PNGs carry as a ``parameters`` text
chunk, written and read back (``/png-info``)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

import sfumato
from sfumato.params import HIRES_UPSCALERS, DiffusionParams, HiresConfig


def infotext(params: DiffusionParams, seed: int, sampler: str, scheduler: str, model: str, img2img: bool) -> str:
    """A1111's generation-parameters text of one image: the prompt, ``Negative prompt:``,
    then ``Key: value, ...`` (a value with a comma or colon quoted), as its PNGs carry it."""
    fields: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": sampler,
        "Schedule type": scheduler,
        "CFG scale": params.cfg_scale,
        "Seed": seed,
        "Size": f"{params.width}x{params.height}",
        "Model": model,
    }
    if params.clip_skip > 1:
        fields["Clip skip"] = params.clip_skip
    if img2img:
        fields["Denoising strength"] = params.strength
    hires = params.hires
    if isinstance(hires, HiresConfig):  # a planned generation's hires is checked, typed
        upscaler = hires.upscaler
        fields.update(
            {
                "Hires upscale": hires.scale,
                "Hires steps": hires.steps,
                "Hires upscaler": upscaler if upscaler in HIRES_UPSCALERS else Path(upscaler).stem,
                "Denoising strength": hires.denoising_strength,
            }
        )
    fields["Version"] = f"sfumato {sfumato.__version__}"
    quoted = (json.dumps(str(v)) if any(c in str(v) for c in ',:"\n') else str(v) for v in fields.values())
    lines = [params.prompt, *([f"Negative prompt: {params.negative_prompt}"] if params.negative_prompt else [])]
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in zip(fields, quoted, strict=True))])


def with_infotext(data: bytes, text: str) -> bytes:
    """A PNG with A1111's ``parameters`` text chunk added (other formats as they are)."""
    if not data.startswith(b"\x89PNG"):
        return data
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    with Image.open(io.BytesIO(data)) as image:
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=meta)
    return out.getvalue()


def parse_parameters(text: str) -> dict[str, Any]:
    """A1111's generation-parameters text (the prompt, ``Negative prompt: ...``, then
    ``Key: value, ...``) as fields."""
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and re.match(r"^\w[\w ]*: ", lines[-1]) and ", " in lines[-1] else ""
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', settings):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out
