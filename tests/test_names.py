"""One set of names everywhere: the SDK signature, the parameter dataclass and
the CLI flags carry the same fields with the same defaults."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields

import sfumato
from sfumato.cli import build_parser
from sfumato.params import DiffusionParams


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
