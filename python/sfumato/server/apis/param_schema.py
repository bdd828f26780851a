"""The parameter-schema API (the shape of OpenSourceAIs' ai_diffusion): a parameter-schema
document for building a UI, and one POST for txt2img, or img2img from an image URL (``url_upload``).

``GET /api/v1/public/config/diffusion`` lists every parameter of the POST
with its type, default, range or choices, and whether it is required, in the
seed's ``aParam`` shape; ``out`` names the sfumato SDK parameter it feeds.
It is built from the request model itself, so it cannot drift from what the
POST accepts. ``POST /api/v1/private/client/ai/diffusion`` answers 201 with
the job's ``uid``; the job is then followed with ``GET /queue/{uid}``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

import sfumato
from sfumato.limits import field
from sfumato.params import DiffusionParams
from sfumato.server.errors import responses
from sfumato.server.fetch import fetch_image
from sfumato.server.planning import carried, job_plan, left_unset
from sfumato.server.state import ServerState, require_key

SIDES = (320, 384, 448, 512, 640, 768)


def _ui(out: str, title: str, widget: str) -> dict[str, Any]:
    return {"out": out, "title": title, "widget": widget}


class DiffusionBody(BaseModel):
    """The parameter-schema API's request, with the defaults its POST documents."""

    model_config = ConfigDict(extra="forbid")

    word: str = Field(
        min_length=1,
        description="what to generate",
        json_schema_extra=_ui("prompt", "Input (text and/or image)", "uiEdit"),
    )
    url_upload: str | None = Field(
        None,
        description="http(s) URL of a PNG or JPEG: img2img from it (resized to width x height)",
        json_schema_extra=_ui("init_image", "Guiding image", "uiSelectPicture"),
    )
    steps: int = field("param_schema", "steps", json_schema_extra=_ui("steps", "Step Count", "uiRangeSlider"))
    guidance: float = field(
        "param_schema", "guidance", json_schema_extra=_ui("cfg_scale", "Guidance scale", "uiRangeSlider")
    )
    strength: float = field(
        "param_schema",
        "strength",
        description="img2img only",
        json_schema_extra=_ui("strength", "Strength", "uiRangeSlider"),
    )
    width: Literal[SIDES] = field(  # type: ignore[valid-type]
        "param_schema", "width", json_schema_extra=_ui("width", "Output width", "uiMultiToggle")
    )
    height: Literal[SIDES] = field(  # type: ignore[valid-type]
        "param_schema", "height", json_schema_extra=_ui("height", "Output height", "uiMultiToggle")
    )
    cimg: Literal[1, 2, 3, 4] = Field(
        1, description="number of images", json_schema_extra=_ui("batch_count", "Number of images", "uiMultiToggle")
    )
    seed: int = field("param_schema", "seed", json_schema_extra=_ui("seed", "Seed", "uiEdit"))
    model: str | None = Field(
        None,
        description="a name from GET /models (default: the server's)",
        json_schema_extra=_ui("model", "Model", "uiSelect"),
    )

    # The SDK's names of fields -> this request's (each field's ``out`` says the same), for errors.
    SENT_AS: ClassVar[dict[str, str]] = {
        "prompt": "word",
        "cfg_scale": "guidance",
        "batch_count": "cimg",
        "init_image": "url_upload",
    }

    def to_params(self, init_image: bytes | None = None) -> DiffusionParams:
        """The SDK's params of this request; ``init_image`` is the image fetched from ``url_upload``."""
        sent = ("prompt", "width", "height", "steps", "cfg_scale", "seed", "batch_count")
        params = DiffusionParams(**carried(self, sent, self.SENT_AS), init_image=init_image)
        return params if init_image is None else replace(params, strength=self.strength)


class ConfigDocument(BaseModel):
    data: dict[str, Any]


class Created(BaseModel):
    data: dict[str, str]


_TYPES = {"integer": "int", "number": "float", "string": "string", "boolean": "bool"}


def parameter_schema(model_names: list[str]) -> list[dict[str, Any]]:
    """The ``aParam`` list: one entry per field of :class:`DiffusionBody`."""
    schema = DiffusionBody.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema["properties"].items():
        kinds = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
        kind = kinds[0] if kinds else prop
        ui: dict[str, Any] = {"title": prop["title"], "widget": prop["widget"]}
        if "description" in prop:
            ui["tooltip"] = prop["description"]
        for key, target in (("minimum", "min"), ("maximum", "max")):
            if key in kind:
                ui[target] = kind[key]
        entry: dict[str, Any] = {
            "in": name,
            "out": prop["out"],
            "isMandatory": name in required,
            "type": _TYPES.get(kind.get("type", "string"), "string"),
            "default": prop.get("default"),
            "ui": ui,
        }
        choices = kind.get("enum") or (model_names if name == "model" else None)
        if choices:
            entry["accept"] = {"$in": list(choices), "display": [str(c) for c in choices]}
        params.append(entry)
    return params


def router(state: ServerState) -> APIRouter:
    api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_key(state.settings))], tags=["parameter schema"])

    @api.get("/public/config/diffusion", response_model=ConfigDocument, responses=responses())
    def config() -> ConfigDocument:
        """Every parameter of the POST: type, default, range or choices, required or not."""
        return ConfigDocument(
            data={
                "engine": "diffusion",
                "version": sfumato.__version__,
                "name": "sfumato",
                "description": "Text to Image, and Image to Image from a URL",
                "isFree": True,
                "requiresGPU": False,
                "aParam": parameter_schema([e.name for e in state.catalog.models()]),
            }
        )

    @api.post("/private/client/ai/diffusion", status_code=201, response_model=Created, responses=responses(409))
    def diffusion(body: DiffusionBody) -> Created:
        """Queue a job (201 with its ``uid``); 409 when the backlog is full."""
        init = fetch_image(body.url_upload, state.settings) if body.url_upload else None
        unset = left_unset(body.model_fields_set, body.SENT_AS)
        plan = job_plan(state, body.to_params(init), model=body.model, sent_as=body.SENT_AS, unset=unset)
        job_id = state.enqueue("diffusion", body.model_dump(), plan)
        created = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return Created(data={"uid": job_id, "created_at": created})

    return api
