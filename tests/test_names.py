"""One set of names everywhere: the SDK signature, the parameter dataclasses, the
CLI flags and every HTTP schema carry the same fields with the same defaults."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import MISSING, fields

from pydantic import BaseModel

import sfumato
from sfumato.cli.flags import build_parser
from sfumato.params import DiffusionParams, HiresConfig, ModelConfig, UpscalerConfig


def _subparser(name: str) -> object:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]  # type: ignore[index]


def test_diffusion_signature_matches_the_parameter_dataclass() -> None:
    signature = inspect.signature(sfumato.diffusion)
    # model_id picks the model, refiner a second one, and timeout governs the job; the rest is the request.
    names = [n for n in signature.parameters if n not in ("model_id", "refiner", "timeout")]
    assert names == [f.name for f in fields(DiffusionParams)]
    for f in fields(DiffusionParams):
        param = signature.parameters[f.name]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY
        expected = inspect.Parameter.empty if f.default is MISSING else f.default
        assert param.default == expected, f.name


def test_cli_generate_flags_match_the_parameter_dataclass() -> None:
    generate = _subparser("generate")
    actions = {a.dest: a for a in generate._actions}  # type: ignore[attr-defined]
    for f in fields(DiffusionParams):
        assert f.name in actions, f"--{f.name.replace('_', '-')} is missing"
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in actions[f.name].option_strings
        if f.name not in ("prompt", "upscale", "hires", "loras", "init_images"):  # built from repeated or other flags
            assert actions[f.name].default == f.default, f.name


def test_cli_choices_are_the_sdk_choices() -> None:
    generate = _subparser("generate")
    actions = {a.dest: a for a in generate._actions}  # type: ignore[attr-defined]
    assert tuple(actions["sampling_method"].choices) == sfumato.SAMPLING_METHODS
    assert tuple(actions["scheduler"].choices) == sfumato.SCHEDULER_NAMES
    assert list(actions["cache_preset"].choices) == list(sfumato.CACHE_PRESETS)


def test_reference_names_are_all_accepted() -> None:
    # The QVAC reference lists 14 samplers and 11 schedulers; all must be accepted.
    qvac_samplers = {
        "euler", "euler_a", "heun", "dpm2", "dpm++2m", "dpm++2mv2", "dpm++2s_a", "lcm",
        "ipndm", "ipndm_v", "ddim_trailing", "tcd", "res_multistep", "res_2s",
    }  # fmt: skip
    qvac_schedulers = {
        "discrete", "karras", "exponential", "ays", "gits", "sgm_uniform", "simple", "lcm",
        "smoothstep", "kl_optimal", "bong_tangent",
    }  # fmt: skip
    assert qvac_samplers <= set(sfumato.SAMPLING_METHODS)
    assert qvac_schedulers == set(sfumato.SCHEDULER_NAMES)
    assert sfumato.CACHE_PRESETS == {"slow": 0.60, "medium": 0.40, "fast": 0.25, "ultra": 0.15}


# Each HTTP API family's own defaults, as the documents that specify it give them
# (the job-queue API's field comments, the parameter-schema API's parameter table, Workers AI's JSON schema,
# AUTOMATIC1111's API, OpenAI's images API), checked against the schemas' fields.
SPECIFIED_DEFAULTS: dict[str, dict[str, object]] = {
    "sfumato.server.apis.job_queue.Txt2ImgRequest": {
        "steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512, "jpeg_quality": 85, "refiner_switch_at": 0.8,
        "seed": -1, "fileType": "jpg", "sampler_name": "DPM++ 2M Karras", "scheduler_type": "karras",
    },
    "sfumato.server.apis.job_queue.HiresFields": {
        "scale": 2.0, "upscaler": "Latent", "steps": 20, "denoising_strength": 0.4,
    },
    "sfumato.server.apis.param_schema.DiffusionBody": {
        "steps": 20, "guidance": 7.5, "width": 320, "height": 320, "seed": 1, "strength": 0.75, "cimg": 1,
    },
    "sfumato.server.apis.workers_ai.RunBody": {"num_steps": 20, "guidance": 7.5, "strength": 1},
    "sfumato.server.apis.a1111.schemas.Txt2ImgBody": {
        "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "seed": -1, "batch_size": 1, "n_iter": 1,
    },
    "sfumato.server.apis.openai.GenerationsBody": {"n": 1, "size": "auto", "output_format": "png"},
}  # fmt: skip


def _schema(path: str) -> type[BaseModel]:
    module, _, name = path.rpartition(".")
    schema = getattr(importlib.import_module(module), name)
    assert issubclass(schema, BaseModel)
    return schema


def test_every_http_schema_has_its_specified_defaults() -> None:
    for path, expected in SPECIFIED_DEFAULTS.items():
        schema = _schema(path)
        have = {field: schema.model_fields[field].default for field in expected}
        assert have == expected, path


# A minimal request of each API family, and what its defaults mean in the SDK's
# names (the sampler names resolved to the engine's, as sfumato.server.models.names maps them).
MINIMAL_REQUESTS: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "sfumato.server.apis.job_queue.Txt2ImgRequest": (
        {"prompt": "p"},
        {"steps": 30, "cfg_scale": 7.0, "width": 512, "height": 512, "seed": -1, "batch_count": 1,
         "sampling_method": "dpm++2m", "scheduler": "karras", "hires": None, "init_image": None},
    ),
    "sfumato.server.apis.param_schema.DiffusionBody": (
        {"word": "p"},
        {"steps": 20, "cfg_scale": 7.5, "width": 320, "height": 320, "seed": 1, "batch_count": 1,
         "sampling_method": None, "scheduler": None, "init_image": None},
    ),
    "sfumato.server.apis.workers_ai.RunBody": (
        {"prompt": "p"},
        {"steps": 20, "cfg_scale": 7.5, "width": 512, "height": 512, "seed": -1, "batch_count": 1, "init_image": None},
    ),
    "sfumato.server.apis.a1111.schemas.Txt2ImgBody": (
        {},
        {"prompt": "", "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "seed": -1, "batch_count": 1,
         "sampling_method": "euler", "scheduler": None, "hires": None, "loras": []},
    ),
}  # fmt: skip


def test_each_schema_turns_its_defaults_into_the_sdk_params() -> None:
    for path, (body, expected) in MINIMAL_REQUESTS.items():
        params = _schema(path).model_validate(body).to_params()  # type: ignore[attr-defined]
        assert isinstance(params, DiffusionParams)
        assert {key: getattr(params, key) for key in expected} == expected, path
    openai = _schema("sfumato.server.apis.openai.GenerationsBody").model_validate({"prompt": "p"})
    params = openai.to_params((512, 512))  # type: ignore[attr-defined]
    assert (params.steps, params.batch_count, params.strength) == (20, 1, DiffusionParams.strength)  # quality auto
    assert openai.to_params((512, 512), b"image", b"mask").strength == 1.0  # type: ignore[attr-defined]


def test_every_renamed_field_names_a_field_the_client_sends() -> None:
    sdk = {f.name for f in fields(DiffusionParams)} | {"model", "control_net", "vae"}  # and the plan's model choices
    for path in SPECIFIED_DEFAULTS:
        schema = _schema(path)
        sent_as: dict[str, str] = getattr(schema, "SENT_AS", {})
        for ours, theirs in sent_as.items():
            assert ours.split(".")[0] in sdk, (path, ours)
            assert theirs.split(".")[0] in schema.model_fields, (path, theirs)


def test_the_cli_model_flags_have_the_model_config_defaults() -> None:
    generate = {a.dest: a for a in _subparser("generate")._actions}  # type: ignore[attr-defined]
    for f in fields(ModelConfig):
        if f.name not in ("mode", "upscaler"):  # mode is the subcommand; upscaler is --upscaler and --tile-size
            assert generate[f.name].default == f.default, f.name
    assert generate["tile_size"].default == {f.name: f.default for f in fields(UpscalerConfig)}["tile_size"]
    hires = {f.name: f.default for f in fields(HiresConfig)}
    flags = {"hires_scale": "scale", "hires_upscaler": "upscaler", "hires_steps": "steps",
             "hires_strength": "denoising_strength"}  # fmt: skip
    for flag, name in flags.items():
        assert generate[flag].default == hires[name], flag


def test_the_sdk_cli_and_http_share_the_refiner_switch_and_the_seed_range() -> None:
    from sfumato.limits import MAX_SEED
    from sfumato.params import RefinerConfig
    from sfumato.server.apis import job_queue, openai
    from sfumato.server.apis.a1111 import schemas as a1111

    switch = {f.name: f.default for f in fields(RefinerConfig)}["switch_at"]
    generate = {a.dest: a for a in _subparser("generate")._actions}  # type: ignore[attr-defined]
    assert generate["refiner_switch_at"].default == switch
    assert job_queue.Txt2ImgRequest.model_fields["refiner_switch_at"].default == switch
    assert a1111.Txt2ImgBody.model_fields["refiner_switch_at"].default == switch
    for schema in (job_queue.Txt2ImgRequest, a1111.Txt2ImgBody, openai.GenerationsBody):
        limits = {type(m).__name__: m for m in schema.model_fields["seed"].metadata}
        assert limits["Le"].le == MAX_SEED == 2**63 - 1, schema  # the engine's int64 seed


def test_the_cli_passes_every_model_config_flag() -> None:
    from sfumato.cli.flags import model_config_of

    config = model_config_of(build_parser().parse_args(["generate"]), "diffusion")
    assert set(config) == {f.name for f in fields(ModelConfig)} - {"upscaler"}  # upscaler: only with --upscaler


# The request schemas of each HTTP API, and the table key prefix of nested ones.
API_SCHEMAS: dict[str, list[str]] = {
    "job_queue": ["Txt2ImgRequest", "Img2ImgRequest", "HiresFields", "LoRA"],
    "a1111": ["schemas.Txt2ImgBody", "schemas.Img2ImgBody", "schemas.ControlUnit", "schemas.HonouredOptions",
              "schemas.PreviewOptions", "schemas.ExtraSingleImageBody", "schemas.ExtraBatchImagesBody"],
    "param_schema": ["DiffusionBody"],
    "workers_ai": ["RunBody"],
    "openai": ["GenerationsBody"],
}  # fmt: skip
NESTED = {"HiresFields": "hires.", "LoRA": "loras."}


def test_every_schema_takes_its_defaults_and_bounds_from_the_limits_table() -> None:
    from sfumato import limits

    checked = 0
    for api, names in API_SCHEMAS.items():
        for name in names:
            schema = _schema(f"sfumato.server.apis.{api}.{name}")
            for field_name, info in schema.model_fields.items():
                key = NESTED.get(schema.__name__, "") + field_name
                bounds = {type(m).__name__.lower(): getattr(m, type(m).__name__.lower()) for m in info.metadata
                          if type(m).__name__ in ("Ge", "Le", "Gt", "Lt")}  # fmt: skip
                where = f"{api}: {schema.__name__}.{field_name}"
                row = limits.APIS[api].get(key) or limits.SDK.get(key)
                if row is None:
                    assert not bounds, f"{where} has bounds {bounds} that the limits table does not declare"
                    continue
                assert info.default == row.default, where
                declared = {k: v for k, v in (("ge", row.ge), ("le", row.le), ("gt", row.gt)) if v is not None}
                assert bounds == declared, where
                checked += 1
    assert checked >= 40  # every API's numeric fields, not a vacuous pass


def test_the_sdk_refuses_each_value_past_its_row_of_the_limits_table() -> None:
    from sfumato import limits
    from sfumato.errors import InvalidParameterError
    from sfumato.params import validate_diffusion

    for name in ("steps", "cfg_scale", "guidance", "seed", "batch_count", "strength", "clip_skip", "eta",
                 "img_cfg_scale", "control_strength", "preview_interval"):  # fmt: skip
        row = limits.SDK[name]
        assert row.ge is not None and row.le is not None
        validate_diffusion(DiffusionParams(prompt="p", **{name: row.le}))  # the bound itself is allowed
        past = row.le + 1
        try:
            validate_diffusion(DiffusionParams(prompt="p", **{name: past}))
        except InvalidParameterError as exc:
            assert exc.field == name, (name, exc.field)
        else:
            raise AssertionError(f"{name}={past} passed the SDK's check")
