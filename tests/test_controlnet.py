"""ControlNet on the real engine: a control image guides a model loaded with a
ControlNet (``model_config.control_net_src``), with ``control_strength``; a
ControlNet of another family, or a control image without a ControlNet, is
refused by name before any engine call. SDK, CLI and A1111's
``alwayson_scripts.controlnet`` with its ``/controlnet/model_list``."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sfumato
from sfumato.server.app import create_app
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, error_body, header_file, pixels, run, sfumato_cli


@pytest.fixture(scope="module")
def controlled(sd1_gguf: Path, sd1_controlnet: Path) -> Iterator[str]:
    """The suite's full SD 1.x model with its ControlNet."""
    model_id = sfumato.load_model(sd1_gguf, model_config={"threads": 2, "control_net_src": sd1_controlnet})
    yield model_id
    sfumato.unload_model(model_id)


def _edges(invert: bool = False) -> np.ndarray:
    """A control picture: a white square outline on black (or the reverse)."""
    picture = np.zeros((SIZE, SIZE, 3), np.uint8)
    picture[16:48, 16:48] = 255
    picture[20:44, 20:44] = 0
    return 255 - picture if invert else picture


def test_the_control_image_and_its_strength_guide_the_image(controlled: str) -> None:
    (plain,), _, _ = run(controlled, seed=9)
    (guided,), _, _ = run(controlled, seed=9, control_image=_edges())
    (again,), _, _ = run(controlled, seed=9, control_image=_edges())
    (other,), _, _ = run(controlled, seed=9, control_image=_edges(invert=True))
    (weak,), _, _ = run(controlled, seed=9, control_image=_edges(), control_strength=0.3)
    (off,), _, _ = run(controlled, seed=9, control_image=_edges(), control_strength=0.0)
    assert guided == again
    assert len({plain, guided, other, weak}) == 4
    assert off == plain  # strength 0 adds nothing to the UNet


def test_bad_control_requests_are_refused_by_name(
    controlled: str, sd1_model: str, sd1_gguf: Path, tmp_path: Path
) -> None:
    with pytest.raises(sfumato.InvalidParameterError, match="needs a ControlNet") as caught:
        run(sd1_model, control_image=_edges())
    assert caught.value.field == "control_image"
    with pytest.raises(sfumato.InvalidParameterError) as caught:
        run(controlled, control_image=_edges(), control_strength=2.5)
    assert caught.value.field == "control_strength"
    # An SD 2.x ControlNet (cross-attention 1024 wide) on an SD 1.x model; then a file that is no ControlNet.
    sd2 = _sd2_controlnet_header(tmp_path / "control_sd21.safetensors")
    lora = header_file(tmp_path / "lora.safetensors", {"lora_unet_x.lora_down.weight": (4, 320)})
    for source, message in ((sd2, "is a ControlNet for SD 2.x; this model is SD 1.x"), (lora, "is not a ControlNet")):
        with pytest.raises(sfumato.InvalidParameterError, match=message) as caught:
            sfumato.load_model(sd1_gguf, model_config={"control_net_src": source})
        assert caught.value.field == "model_config.control_net_src"


def test_the_cli_runs_a_controlnet(sd1_gguf: Path, sd1_controlnet: Path, tmp_path: Path) -> None:
    control = tmp_path / "edges.png"
    Image.fromarray(_edges()).save(control)
    done = sfumato_cli(
        "generate", "-m", str(sd1_gguf), "--control-net", str(sd1_controlnet), "--control-image", str(control),
        "--control-strength", "1.2", "-p", "a red cube", "-W", str(SIZE), "-H", str(SIZE), "--steps", "2",
        "--seed", "9", "--threads", "2", "-q", "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    model_id = sfumato.load_model(sd1_gguf, model_config={"threads": 2, "control_net_src": sd1_controlnet})
    try:
        (same,), _, _ = run(model_id, prompt="a red cube", seed=9, control_image=control, control_strength=1.2)
    finally:
        sfumato.unload_model(model_id)
    assert (tmp_path / "sfumato_9_0.png").read_bytes() == same


def _png(picture: np.ndarray) -> str:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def _sd2_controlnet_header(path: Path) -> Path:
    """The header of an SD 2.x ControlNet: cross-attention keys 1024 wide."""
    return header_file(
        path,
        {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
         "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
    )  # fmt: skip


def test_a1111_alwayson_controlnet(settings: ServerSettings, sd1_gguf: Path, sd1_controlnet: Path) -> None:
    (settings.models_dir / "full.gguf").symlink_to(sd1_gguf)
    controlnets = settings.models_dir.parent / "controlnets"
    controlnets.mkdir()
    (controlnets / "control_v11p_sd15_canny.safetensors").symlink_to(sd1_controlnet)
    _sd2_controlnet_header(controlnets / "control_v11p_sd21_depth.safetensors")
    settings = ServerSettings(**{**settings.__dict__, "controlnets_dir": controlnets})
    body = {"prompt": "a red cube", "steps": 2, "width": SIZE, "height": SIZE, "seed": 9,
            "override_settings": {"sd_model_checkpoint": "full"}}  # fmt: skip
    unit = {"enabled": True, "module": "none", "model": "control_v11p_sd15_canny [a1b2c3d4]", "weight": 1.0,
            "image": _png(_edges())}  # fmt: skip
    with TestClient(create_app(settings)) as client:
        listed = client.get("/controlnet/model_list").json()
        assert listed == {"model_list": ["control_v11p_sd15_canny", "control_v11p_sd21_depth"]}
        assert client.get("/controlnet/module_list").json() == {"module_list": ["none"]}
        plain = client.post("/sdapi/v1/txt2img", json=body).json()["images"][0]
        scripts = {"controlnet": {"args": [unit]}}
        guided = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts}).json()["images"][0]
        assert guided != plain
        # The same run through the SDK gives the same pixels.
        model_id = sfumato.load_model(sd1_gguf, model_config={"threads": 2, "control_net_src": sd1_controlnet})
        try:
            (same,), _, _ = run(model_id, prompt="a red cube", seed=9, steps=2, control_image=_edges(),
                                control_strength=1.0, sampling_method="euler")  # fmt: skip
        finally:
            sfumato.unload_model(model_id)
        assert np.array_equal(pixels(base64.b64decode(guided)), pixels(same))  # the A1111 PNG adds its infotext
        preprocessed = {"controlnet": {"args": [{**unit, "module": "canny"}]}}
        refused = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": preprocessed})
        assert "canny" in error_body(refused, 422, "alwayson_scripts.controlnet.args[0].module")["error"]
        field = "alwayson_scripts.controlnet.args[0].model"
        for model, message in (("control_sdxl_depth", "no ControlNet named"), ("control_v11p_sd21_depth", "SD 2.x")):
            scripts = {"controlnet": {"args": [{**unit, "model": model}]}}
            refused = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts})
            assert message in error_body(refused, 422, field)["error"]


def test_a_control_plan_survives_its_json_round_trip() -> None:
    from sfumato.params import DiffusionParams
    from sfumato.server.jobs.plan import JobPlan

    work = DiffusionParams(
        prompt="p", width=SIZE, height=SIZE, steps=2, cfg_scale=7.0, seed=1, control_image=b"\x89PNG",
        control_strength=1.3,
    )  # fmt: skip
    plan = JobPlan(model="full", work=work, control_net="control_v11p_sd15_canny")
    stored = plan.to_json()
    assert stored["control_net"] == "control_v11p_sd15_canny"
    assert JobPlan.from_json(stored) == plan
    assert JobPlan.from_json({k: v for k, v in stored.items() if k != "control_net"}).control_net is None
