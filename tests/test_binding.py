"""The in-process binding: locator, ABI check, handle ownership, callbacks, buffers."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import cffi
import numpy as np
import pytest

from sfumato.engine import ContextParams, DiffusionContext, ImageRequest, ProgressTick, UpscalerContext, _cdefs
from sfumato.engine.library import (
    ENGINE_DISTRIBUTION,
    ENV_LIBRARY,
    check_abi,
    load_engine,
    locate_library,
    make_ffi,
)
from sfumato.errors import ClosedError, EngineABIError, EngineNotFoundError

from .helpers import SIZE


def test_locator_finds_the_library_sfumato_built() -> None:
    path = locate_library()
    assert path.is_file()
    assert path.parts[-4:] == ("sfumato", "engine", "lib", "libstable-diffusion.so")
    engine = load_engine()
    assert engine.path == path
    assert engine.build is not None
    assert engine.version == engine.build.engine_version == "0.4.7"


def test_locator_env_override_accepts_file_and_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    real = locate_library()
    monkeypatch.setenv(ENV_LIBRARY, str(real))
    assert locate_library() == real
    monkeypatch.setenv(ENV_LIBRARY, str(real.parent))
    assert locate_library() == real


def test_locator_env_override_to_a_missing_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_LIBRARY, str(tmp_path / "nope.so"))
    with pytest.raises(EngineNotFoundError, match=ENV_LIBRARY):
        locate_library()


def test_locator_without_engine_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from sfumato.engine import library

    monkeypatch.delenv(ENV_LIBRARY, raising=False)
    monkeypatch.setattr(library, "package_library", lambda: None)
    with pytest.raises(EngineNotFoundError, match="pip install") as caught:
        locate_library()
    assert ENV_LIBRARY in str(caught.value)
    assert f"{ENGINE_DISTRIBUTION} 0.4.7" in str(caught.value)


def _opened(ffi: cffi.FFI) -> Any:
    """The engine library opened through ``ffi``, after :func:`load_engine` has put
    the CPU module's symbols in the process's global scope (the engine library needs them)."""
    load_engine()
    return ffi.dlopen(str(locate_library()))


def test_abi_check_passes_on_the_real_declarations() -> None:
    ffi = make_ffi()
    check_abi(ffi, _opened(ffi))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("    bool circular_x;\n", "", id="ctx-missing-field"),
        pytest.param(
            "    float max_vram;\n} sd_ctx_params_t;", "    double max_vram;\n} sd_ctx_params_t;", id="ctx-wrong-type"
        ),
        pytest.param(
            "    float flow_shift;\n} sd_sample_params_t;",
            "    double flow_shift;\n} sd_sample_params_t;",
            id="sample-wrong-type",
        ),
        pytest.param("    int64_t seed;\n", "    int32_t seed;\n", id="gen-narrow-seed"),
        pytest.param(
            "    sd_hires_params_t hires;\n} sd_img_gen_params_t;",
            "    int stray;\n    sd_hires_params_t hires;\n} sd_img_gen_params_t;",
            id="gen-extra-field",
        ),
        pytest.param("    float reuse_threshold;\n", "    int reuse_threshold;\n", id="cache-wrong-type"),
    ],
)
def test_abi_check_catches_a_wrong_struct(old: str, new: str) -> None:
    assert old in _cdefs.ALL
    ffi = make_ffi(_cdefs.ALL.replace(old, new, 1))
    with pytest.raises(EngineABIError, match="does not match"):
        check_abi(ffi, _opened(ffi))


@pytest.fixture(scope="module")
def context(sd1_tiny_gguf: Path) -> DiffusionContext:
    return DiffusionContext(ContextParams(model_path=str(sd1_tiny_gguf), n_threads=2))


def job_body(**overrides: object) -> ImageRequest:
    base: dict[str, object] = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 1, "seed": 3}
    base.update(overrides)
    return ImageRequest(**base)  # type: ignore[arg-type]


def test_generated_images_are_python_owned_copies(context: DiffusionContext) -> None:
    out = context.generate(job_body(batch_count=2))
    assert len(out.images) == 2
    for image in out.images:
        assert image.shape == (SIZE, SIZE, 3)
        assert image.dtype == np.uint8
        assert image.flags.owndata and image.flags.writeable
    assert not np.array_equal(out.images[0], out.images[1])


def test_an_exception_in_a_progress_listener_is_raised_after_the_engine_returns(context: DiffusionContext) -> None:
    seen: list[ProgressTick] = []

    def explode(tick: ProgressTick) -> None:
        seen.append(tick)
        raise RuntimeError("listener failed")

    with pytest.raises(RuntimeError, match="listener failed"):
        context.generate(job_body(steps=2), on_tick=explode)
    assert len(seen) == 1  # reporting stops at the first error
    again = context.generate(job_body(steps=2))  # the process and the context are fine
    assert again.images[0].shape == (SIZE, SIZE, 3)


def test_diffusion_context_close_is_idempotent_and_guards_use(sd1_tiny_gguf: Path) -> None:
    with DiffusionContext(ContextParams(model_path=str(sd1_tiny_gguf), n_threads=2)) as ctx:
        assert not ctx.closed
        assert ctx.default_sample_method() == "euler_a"
    assert ctx.closed
    ctx.close()
    ctx.close()
    with pytest.raises(ClosedError):
        ctx.generate(job_body())
    with pytest.raises(ClosedError):
        ctx.default_sample_method()


def test_diffusion_context_is_collected(sd1_tiny_gguf: Path) -> None:
    ctx = DiffusionContext(ContextParams(model_path=str(sd1_tiny_gguf), n_threads=2))
    ref = weakref.ref(ctx)
    del ctx
    gc.collect()
    assert ref() is None


def test_upscaler_context(esrgan_1b: Path, context: DiffusionContext, gradient_image: np.ndarray) -> None:
    with UpscalerContext(str(esrgan_1b), n_threads=2, tile_size=32, parent=context) as up:
        assert up.parent is context
        assert up.factor == 4
        out = up.upscale(gradient_image[:16, :24])
        assert out.shape == (64, 96, 3)
        assert out.flags.owndata
    with pytest.raises(ClosedError):
        up.upscale(gradient_image)
    up.close()


def test_engine_request_fields_reach_the_engine(context: DiffusionContext, gradient_image: np.ndarray) -> None:
    """The request fields the SDK does not expose yet (hires fix, mask, clip_skip)
    map onto the engine: each one changes what the engine does."""
    from sfumato.engine import HiresParams

    ticks: list[ProgressTick] = []
    hires = context.generate(
        job_body(steps=2, hires=HiresParams(scale=2.0, steps=1, denoising_strength=0.5)), ticks.append
    )
    assert hires.images[0].shape == (2 * SIZE, 2 * SIZE, 3)
    assert "hires" in {t.phase for t in ticks} and hires.phase_ms.get("hires", 0) > 0

    plain = context.generate(job_body(steps=2)).images[0]
    skipped = context.generate(job_body(steps=2, clip_skip=2)).images[0]
    assert not np.array_equal(plain, skipped)

    mask = np.zeros((SIZE, SIZE, 1), np.uint8)
    mask[:, SIZE // 2 :] = 255
    masked = context.generate(job_body(steps=2, init_image=gradient_image, mask_image=mask, strength=0.8)).images[0]
    unmasked = context.generate(job_body(steps=2, init_image=gradient_image, strength=0.8)).images[0]
    assert masked.shape == (SIZE, SIZE, 3) and not np.array_equal(masked, unmasked)
