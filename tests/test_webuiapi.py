"""The AUTOMATIC1111 API driven by ``webuiapi``, the common A1111 Python client, against
a real ``sfumato serve`` process with an API key (sent as HTTP Basic, as the client
does): txt2img, img2img with a mask, model switching, options, progress while a job
runs, interrupt, and every ``/sdapi/v1`` helper the client has (not its extension ones)."""

from __future__ import annotations

import threading
import time
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import webuiapi
from PIL import Image

from sfumato.server.settings import ServerSettings

from .helpers import MODEL, SIZE, serving

KEY = "s3cret"


def test_webuiapi_drives_the_a1111_api(settings: ServerSettings, gradient_image: np.ndarray) -> None:
    (settings.models_dir / "second.gguf").symlink_to((settings.models_dir / f"{MODEL}.gguf").resolve())
    with serving(settings, "--api-key", KEY) as url:
        where = urlsplit(url)
        api = webuiapi.WebUIApi(host=where.hostname, port=where.port, username="me", password=KEY,
                                sampler="Euler a", steps=2)  # fmt: skip
        small = {"width": SIZE, "height": SIZE, "steps": 2, "seed": 5}
        result = api.txt2img(prompt="a lighthouse", negative_prompt="fog", batch_size=2, **small)
        assert [image.size for image in result.images] == [(SIZE, SIZE)] * 2
        assert result.info["seed"] == 5 and result.info["all_seeds"] == [5, 6]

        source = Image.fromarray(gradient_image)
        mask = Image.fromarray(np.where(np.arange(SIZE)[None, :] < SIZE // 2, 0, 255).astype(np.uint8).repeat(SIZE, 0))
        edited = api.img2img(images=[source], mask_image=mask, prompt="a window", denoising_strength=1.0,
                             inpainting_fill=1, **small)  # fmt: skip
        out = np.asarray(edited.image.convert("RGB")).astype(np.int16)
        assert np.abs(out[:, : SIZE // 2] - gradient_image[:, : SIZE // 2]).max() <= 1  # kept outside the mask

        # Models: titles, switching (the client matches a title), and what options then say.
        assert api.util_get_model_names() == ["second.gguf", f"{MODEL}.gguf"]
        api.util_set_model("second.gguf")
        assert api.util_get_current_model() == "second.gguf"
        assert api.get_options()["sd_model_checkpoint"] == "second.gguf"
        api.set_options({"samples_format": "png", "sd_model_checkpoint": f"{MODEL}.gguf", "jpeg_quality": 90})
        assert api.get_options()["jpeg_quality"] == 90

        # Progress while a job runs, then interrupt: the waiting request answers the images made (none).
        answer: dict[str, Any] = {}
        caller = threading.Thread(
            target=lambda: answer.setdefault("r", api.txt2img(prompt="x", **{**small, "steps": 150}))
        )
        caller.start()
        deadline = time.monotonic() + 120
        while (progress := api.get_progress())["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline, progress
            time.sleep(0.1)
        assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
        api.interrupt()
        caller.join(60)
        assert answer["r"].images == [] and answer["r"].info["interrupted"] is True

        # Every /sdapi/v1 helper of the client.
        assert api.extra_single_image(source, upscaler_1="esrgan-x4", upscaling_resize=2).image.size == (2 * SIZE,) * 2
        batch = api.extra_batch_images([source, source], upscaler_1="Lanczos", upscaling_resize=0.5)
        assert [image.size for image in batch.images] == [(SIZE // 2, SIZE // 2)] * 2
        assert api.png_info(source).info == ""  # the client re-saves the image without its text
        with pytest.raises(RuntimeError, match="400"):
            api.interrogate(source)
        assert "sfumato cannot skip" in api.skip()["detail"]
        assert api.get_cmd_flags()["ckpt_dir"] == str(settings.models_dir)
        assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
        assert [u["name"] for u in api.get_upscalers()][-1] == "esrgan-x4"
        assert {m["name"] for m in api.get_latent_upscale_modes()} >= {"Latent", "Latent (nearest-exact)"}
        assert api.get_sd_vae() == api.get_loras() == api.get_hypernetworks() == api.get_face_restorers() == []
        assert [m["name"] for m in api.get_realesrgan_models()] == ["esrgan-x4"]
        assert api.get_prompt_styles() == [] and api.get_scripts() == {"txt2img": [], "img2img": []}
        assert api.refresh_checkpoints() is None  # A1111 answers null
        assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
        assert api.get_memory()["ram"]["total"] > 0
