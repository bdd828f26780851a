"""The SDK on the real engine: determinism, batches, samplers, schedulers,
img2img, progress ticks, stats, upscaling, and the asyncio forms."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sfumato
from sfumato.images import decode_png

from .helpers import SIZE, run


def _size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def test_same_seed_same_bytes_different_seed_different_bytes(sd1_model: str) -> None:
    first, _, _ = run(sd1_model, seed=7)
    again, _, _ = run(sd1_model, seed=7)
    other, _, _ = run(sd1_model, seed=8)
    assert first == again
    assert first != other


def test_random_seed_is_reported_and_reproduces(sd1_model: str) -> None:
    outputs, stats, _ = run(sd1_model, seed=-1)
    assert stats.seed is not None and stats.seed >= 0
    replay, replay_stats, _ = run(sd1_model, seed=stats.seed)
    assert replay_stats.seed == stats.seed
    assert replay == outputs


def test_batch_count_gives_independent_images_with_consecutive_seeds(sd1_model: str) -> None:
    batch, stats, _ = run(sd1_model, seed=20, batch_count=3)
    assert len(batch) == 3 and len(set(batch)) == 3
    assert all(_size(png) == (SIZE, SIZE) for png in batch)
    # Image i of a batch uses seed + i, so it can be reproduced on its own.
    (second,), _, _ = run(sd1_model, seed=21)
    assert second == batch[1]
    assert stats.total_images == 3


@pytest.mark.parametrize("sampling_method", sfumato.SAMPLING_METHODS)
def test_every_sampling_method_runs(sd1_model: str, sampling_method: str) -> None:
    outputs, stats, ticks = run(sd1_model, sampling_method=sampling_method, steps=2)
    assert len(outputs) == 1 and _size(outputs[0]) == (SIZE, SIZE)
    assert stats.total_steps == 2
    assert [t.step for t in ticks if t.phase == "sampling"] == [1, 2]


@pytest.mark.parametrize("scheduler", sfumato.SCHEDULER_NAMES)
def test_every_scheduler_runs(sd1_model: str, scheduler: str) -> None:
    outputs, stats, _ = run(sd1_model, scheduler=scheduler, sampling_method="euler", steps=2)
    assert len(outputs) == 1 and _size(outputs[0]) == (SIZE, SIZE)
    assert stats.total_steps == 2


def test_schedulers_change_the_result(sd1_model: str) -> None:
    karras, _, _ = run(sd1_model, scheduler="karras", sampling_method="euler", steps=3)
    discrete, _, _ = run(sd1_model, scheduler="discrete", sampling_method="euler", steps=3)
    assert karras != discrete


@pytest.fixture(params=["bytes", "path", "pil", "numpy"])
def init_image(request: pytest.FixtureRequest, gradient_image: np.ndarray, tmp_path: Path) -> object:
    png = io.BytesIO()
    Image.fromarray(gradient_image).save(png, format="PNG")
    if request.param == "bytes":
        return png.getvalue()
    if request.param == "path":
        path = tmp_path / "init.png"
        path.write_bytes(png.getvalue())
        return path
    if request.param == "pil":
        return Image.fromarray(gradient_image)
    return gradient_image


def test_img2img_accepts_every_input_kind_identically(
    sd1_model: str, init_image: object, gradient_image: np.ndarray
) -> None:
    reference, _, _ = run(sd1_model, init_image=gradient_image, strength=0.5, steps=4, width=None, height=None)
    outputs, stats, _ = run(sd1_model, init_image=init_image, strength=0.5, steps=4, width=None, height=None)
    assert outputs == reference
    assert (stats.width, stats.height) == (SIZE, SIZE)  # defaults to the init image's size


def test_img2img_output_changes_with_strength(sd1_model: str, gradient_image: np.ndarray) -> None:
    weak, weak_stats, _ = run(sd1_model, init_image=gradient_image, strength=0.25, steps=4)
    strong, strong_stats, _ = run(sd1_model, init_image=gradient_image, strength=1.0, steps=4)
    txt2img, _, _ = run(sd1_model, steps=4)
    assert weak != strong
    assert weak != txt2img
    # The engine skips the first (1 - strength) of the schedule.
    assert weak_stats.total_steps is not None and strong_stats.total_steps == 4
    assert weak_stats.total_steps < strong_stats.total_steps


def test_img2img_resizes_the_init_image_to_the_requested_size(sd1_model: str, gradient_image: np.ndarray) -> None:
    outputs, stats, _ = run(sd1_model, init_image=gradient_image, width=128, height=64, steps=1)
    assert _size(outputs[0]) == (128, 64)
    assert (stats.width, stats.height) == (128, 64)


def test_ticks_arrive_in_order_and_count(sd1_model: str) -> None:
    _, stats, ticks = run(sd1_model, steps=3, batch_count=2, sampling_method="euler")
    # A batch runs image by image: each image is sampled, then decoded, and the
    # counts of each phase run on over the whole batch.
    phases = [t.phase for t in ticks]
    assert phases == ["sampling"] * 3 + ["vae"] + ["sampling"] * 3 + ["vae"]
    sampling = [(t.step, t.total_steps) for t in ticks if t.phase == "sampling"]
    assert sampling == [(i, 6) for i in range(1, 7)]
    assert [(t.step, t.total_steps) for t in ticks if t.phase == "vae"] == [(1, 2), (2, 2)]
    elapsed = [t.elapsed_ms for t in ticks]
    assert elapsed == sorted(elapsed)
    assert stats.total_wall_ms is not None and elapsed[-1] <= stats.total_wall_ms


def test_stats_are_consistent(sd1_model: str) -> None:
    outputs, s, _ = run(sd1_model, steps=3, batch_count=2, seed=99, sampling_method="euler")
    assert s.seed == 99
    assert s.total_steps == 6 and s.total_generations == 2 and s.total_images == 2
    assert (s.width, s.height) == (SIZE, SIZE)
    assert s.total_pixels == 2 * SIZE * SIZE
    assert s.model_load_ms is not None and s.model_load_ms > 0
    parts = [s.conditioning_ms, s.denoise_ms, s.vae_decode_ms, s.postprocess_ms]
    assert all(p is not None and p > 0 for p in parts)
    assert s.generation_ms is not None and s.total_generation_ms is not None and s.total_wall_ms is not None
    assert s.conditioning_ms + s.denoise_ms + s.vae_decode_ms <= s.generation_ms + 1.0  # type: ignore[operator]
    assert s.generation_ms <= s.total_generation_ms <= s.total_wall_ms + 1.0
    assert s.steps_per_second == pytest.approx(6 / (s.denoise_ms / 1000.0))  # type: ignore[operator]
    assert len(outputs) == 2


@pytest.mark.parametrize(("repeats", "batch_count"), [(1, 2), (2, 1)])
def test_paired_upscale_sizes(sd1_model: str, repeats: int, batch_count: int) -> None:
    upscale: object = True if repeats == 1 else {"repeats": repeats}
    outputs, stats, ticks = run(sd1_model, steps=1, batch_count=batch_count, upscale=upscale)
    side = SIZE * 4**repeats
    passes = batch_count * repeats
    assert [_size(png) for png in outputs] == [(side, side)] * batch_count
    assert (stats.width, stats.height, stats.total_pixels) == (side, side, batch_count * side * side)
    assert [(t.step, t.total_steps) for t in ticks if t.phase == "upscale"] == [
        (i, passes) for i in range(1, passes + 1)
    ]


def test_paired_upscale_keeps_each_batch_image_distinct(sd1_model: str) -> None:
    outputs, _, _ = run(sd1_model, steps=1, batch_count=2, upscale=True)
    plain, _, _ = run(sd1_model, steps=1, batch_count=2)
    assert outputs[0] != outputs[1]
    # Upscaling image i of the batch is the same as upscaling it alone.
    for big, small in zip(outputs, plain, strict=True):
        assert decode_png(big).shape[0] == 4 * decode_png(small).shape[0]


@pytest.mark.parametrize("repeats", [1, 2])
def test_standalone_upscale_sizes(upscaler_model: str, gradient_image: np.ndarray, repeats: int) -> None:
    result = sfumato.upscale(upscaler_model, image=gradient_image[:16, :32], repeats=repeats)
    ticks = list(result.progress_stream)
    (png,) = result.outputs.result()
    assert _size(png) == (32 * 4**repeats, 16 * 4**repeats)
    assert [t.step for t in ticks] == list(range(1, repeats + 1))
    stats = result.stats.result()
    assert stats.total_images == 1 and stats.width == 32 * 4**repeats


def test_upscale_through_the_paired_model(sd1_model: str, gradient_image: np.ndarray) -> None:
    result = sfumato.upscale(sd1_model, image=gradient_image[:16, :16])
    assert _size(result.outputs.result()[0]) == (64, 64)


def test_asyncio_forms(sd1_model: str) -> None:
    async def main() -> tuple[list[bytes], sfumato.DiffusionStats, list[sfumato.ProgressTick]]:
        result = sfumato.diffusion(sd1_model, prompt="a lamp", width=SIZE, height=SIZE, steps=2, seed=5)
        ticks = [t async for t in result.progress_stream]
        return await result.outputs, await result.stats, ticks

    outputs, stats, ticks = asyncio.run(main())
    blocking, _, blocking_ticks = run(sd1_model, prompt="a lamp", steps=2, seed=5)
    assert outputs == blocking
    assert stats.total_steps == 2
    assert [(t.phase, t.step) for t in ticks] == [(t.phase, t.step) for t in blocking_ticks]


def test_diffusion_returns_before_the_job_ends(sd1_model: str) -> None:
    result = sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, steps=3, seed=1)
    assert not result.outputs.done()
    assert len(result.outputs.result()) == 1
    # A second iteration replays every tick.
    assert list(result.progress_stream) == list(result.progress_stream)


@pytest.mark.parametrize("cache_preset", list(sfumato.CACHE_PRESETS))
def test_cache_presets_run_deterministically(sd1_model: str, cache_preset: str) -> None:
    cached, stats, _ = run(sd1_model, steps=3, sampling_method="euler", cache_preset=cache_preset)
    assert _size(cached[0]) == (SIZE, SIZE) and stats.total_steps == 3
    assert cached == run(sd1_model, steps=3, sampling_method="euler", cache_preset=cache_preset)[0]


def test_vae_tiling_runs(sd1_model: str) -> None:
    outputs, _, _ = run(sd1_model, steps=1, vae_tiling=True)
    assert _size(outputs[0]) == (SIZE, SIZE)


@pytest.mark.parametrize("layout", ["sd1_safetensors", "sd1_diffusers", "sd2_safetensors", "sd2_diffusers"])
def test_other_layouts_load_and_generate(layout: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(layout)
    model_id = sfumato.load_model(path, model_config={"threads": 2})
    try:
        outputs, stats, _ = run(model_id, steps=1)
        assert _size(outputs[0]) == (SIZE, SIZE) and stats.total_steps == 1
    finally:
        sfumato.unload_model(model_id)


@pytest.mark.parametrize("prediction", ["auto", "v"])
def test_sd2_generates(sd2_gguf: Path, prediction: str) -> None:
    model_id = sfumato.load_model(sd2_gguf, model_config={"threads": 2, "prediction": prediction})
    try:
        outputs, stats, _ = run(model_id, steps=1)
        assert _size(outputs[0]) == (SIZE, SIZE) and stats.total_steps == 1
    finally:
        sfumato.unload_model(model_id)


def test_sd2_prediction_changes_the_result(sd2_gguf: Path) -> None:
    results = []
    for prediction in ("eps", "v"):
        model_id = sfumato.load_model(sd2_gguf, model_config={"threads": 2, "prediction": prediction})
        try:
            results.append(run(model_id, steps=2, sampling_method="euler")[0])
        finally:
            sfumato.unload_model(model_id)
    assert results[0] != results[1]


def test_concurrent_callers_each_get_their_own_ticks(sd1_model: str) -> None:
    first = sfumato.diffusion(sd1_model, prompt="a", width=SIZE, height=SIZE, steps=2, seed=1)
    second = sfumato.diffusion(sd1_model, prompt="b", width=SIZE, height=SIZE, steps=3, seed=2, batch_count=2)
    assert [t.total_steps for t in second.progress_stream if t.phase == "sampling"] == [6] * 6
    assert [t.total_steps for t in first.progress_stream if t.phase == "sampling"] == [2] * 2
    assert len(first.outputs.result()) == 1 and len(second.outputs.result()) == 2


def test_clip_skip_eta_and_img_cfg_scale_have_the_engines_semantics(sd1_model: str) -> None:
    def image(**params: object) -> np.ndarray:
        return decode_png(run(sd1_model, seed=17, **params)[0][0])

    plain = image()
    # clip_skip: -1 and 0 take the family's own (1 for SD 1.x, the last layer); 2 skips one.
    assert np.array_equal(image(clip_skip=1), plain) and np.array_equal(image(clip_skip=0), plain)
    assert not np.array_equal(image(clip_skip=2), plain)
    # eta: the engine's default for euler_a (the SD default sampler) is 1; 0 takes its ancestral noise out.
    assert np.array_equal(image(eta=1.0), plain)
    assert not np.array_equal(image(eta=0.0), plain)
    # img_cfg_scale: the image guidance of instruct-pix2pix models; a plain txt2img model has none to scale.
    assert np.array_equal(image(img_cfg_scale=1.5), plain)
    with pytest.raises(
        sfumato.InvalidParameterError,
        match=r"reference images need FLUX\.2, FLUX\.1 Kontext or Qwen-Image-Edit",
    ) as caught:
        sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, init_images=[plain])
    assert caught.value.field == "init_images"
    # flow_shift: a flow-matching model's; SD 1.x predicts noise.
    with pytest.raises(
        sfumato.InvalidParameterError, match=r"flow-matching model's sigmas .*; SD 1\.x is not one"
    ) as e:
        sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, flow_shift=3.0)
    assert e.value.field == "flow_shift"
