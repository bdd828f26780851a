"""The engine's ABI as sfumato declares it, and the check that a loaded library matches:
the version it must be, the engine's enum names in enum order, and each struct's
layout proven by reading the engine's defaults and having it print back values written
through sfumato's view."""

from __future__ import annotations

import functools
from typing import Any

import cffi

from sfumato.errors import EngineABIError

ENGINE_DISTRIBUTION = "stable-diffusion-cpp-python"
ENGINE_VERSION_REQUIRED = "0.4.7"

# Engine enum names in enum order, as the engine spells them. The ABI check
# proves that the loaded library agrees with these tables.
SAMPLE_METHOD_ENUM: tuple[str, ...] = (
    "euler", "euler_a", "heun", "dpm2", "dpm++2s_a", "dpm++2m", "dpm++2mv2", "ipndm",
    "ipndm_v", "lcm", "ddim_trailing", "tcd", "res_multistep", "res_2s", "er_sde",
)  # fmt: skip
SCHEDULER_ENUM: tuple[str, ...] = (
    "discrete", "karras", "exponential", "ays", "gits", "sgm_uniform", "simple",
    "smoothstep", "kl_optimal", "lcm", "bong_tangent",
)  # fmt: skip
PREDICTION_ENUM: tuple[str, ...] = ("eps", "v", "edm_v", "sd3_flow", "flux_flow", "flux2_flow")


def _expect(problems: list[str], text: str, fragment: str, what: str) -> None:
    if fragment not in text:
        problems.append(f"{what}: expected {fragment.strip()!r}")


def _oversized(ffi: cffi.FFI, ctype: str, keep: list[Any]) -> Any:
    """A zeroed struct with generous slack behind it, so that an engine whose
    struct is larger than our view writes and reads inside our memory."""
    buf = ffi.new("char[]", ffi.sizeof(ctype) * 4 + 4096)
    keep.append(buf)
    return ffi.cast(ctype + "*", buf)


def _check_init_defaults(ffi: cffi.FFI, lib: Any, problems: list[str]) -> None:
    """Phase one: let the engine fill its defaults and read them through our view.

    Nothing here hands the engine a value we wrote, so a wrong layout shows up
    as wrong numbers, never as a pointer the engine would follow.
    """
    keep: list[Any] = []
    inf = float("inf")
    ctx = _oversized(ffi, "sd_ctx_params_t", keep)
    lib.sd_ctx_params_init(ctx)
    gen = _oversized(ffi, "sd_img_gen_params_t", keep)
    lib.sd_img_gen_params_init(gen)
    expected: list[tuple[str, Any, Any]] = [
        ("sd_ctx_params_t.vae_decode_only", ctx.vae_decode_only, True),
        ("sd_ctx_params_t.free_params_immediately", ctx.free_params_immediately, True),
        ("sd_ctx_params_t.n_threads", ctx.n_threads, int(lib.sd_get_num_physical_cores())),
        ("sd_ctx_params_t.wtype", ctx.wtype, lib.SD_TYPE_COUNT),
        ("sd_ctx_params_t.rng_type", ctx.rng_type, lib.CUDA_RNG),
        ("sd_ctx_params_t.sampler_rng_type", ctx.sampler_rng_type, lib.RNG_TYPE_COUNT),
        ("sd_ctx_params_t.prediction", ctx.prediction, lib.PREDICTION_COUNT),
        ("sd_ctx_params_t.chroma_use_dit_mask", ctx.chroma_use_dit_mask, True),
        ("sd_ctx_params_t.chroma_t5_mask_pad", ctx.chroma_t5_mask_pad, 1),
        ("sd_ctx_params_t.max_vram", ctx.max_vram, 0.0),
        ("sd_img_gen_params_t.clip_skip", gen.clip_skip, -1),
        ("sd_img_gen_params_t.width", gen.width, 512),
        ("sd_img_gen_params_t.height", gen.height, 512),
        ("sample_params.txt_cfg", gen.sample_params.guidance.txt_cfg, 7.0),
        ("sample_params.img_cfg", gen.sample_params.guidance.img_cfg, inf),
        ("sample_params.distilled_guidance", gen.sample_params.guidance.distilled_guidance, 3.5),
        ("sample_params.scheduler", gen.sample_params.scheduler, lib.SCHEDULER_COUNT),
        ("sample_params.sample_method", gen.sample_params.sample_method, lib.SAMPLE_METHOD_COUNT),
        ("sample_params.sample_steps", gen.sample_params.sample_steps, 20),
        ("sample_params.flow_shift", gen.sample_params.flow_shift, inf),
        ("sd_img_gen_params_t.strength", gen.strength, 0.75),
        ("sd_img_gen_params_t.seed", gen.seed, -1),
        ("sd_img_gen_params_t.batch_count", gen.batch_count, 1),
        ("sd_img_gen_params_t.control_strength", round(gen.control_strength, 4), 0.9),
        ("pm_params.style_strength", gen.pm_params.style_strength, 20.0),
        ("vae_tiling_params.target_overlap", gen.vae_tiling_params.target_overlap, 0.5),
        ("cache.reuse_threshold", gen.cache.reuse_threshold, inf),
        ("cache.Fn_compute_blocks", gen.cache.Fn_compute_blocks, 8),
        ("cache.spectrum_m", gen.cache.spectrum_m, 3),
        ("cache.spectrum_warmup_steps", gen.cache.spectrum_warmup_steps, 4),
        ("cache.spectrum_stop_percent", round(gen.cache.spectrum_stop_percent, 4), 0.9),
        ("hires.upscaler", gen.hires.upscaler, lib.SD_HIRES_UPSCALER_LATENT),
        ("hires.scale", gen.hires.scale, 2.0),
        ("hires.denoising_strength", round(gen.hires.denoising_strength, 4), 0.7),
        ("hires.upscale_tile_size", gen.hires.upscale_tile_size, 128),
    ]
    for name, got, want in expected:
        if got != want:
            problems.append(f"{name}: the engine's default reads as {got!r}, expected {want!r}")


class _Printer:
    """C strings that live as long as it does, and the engine's printed texts (freed once read)."""

    def __init__(self, ffi: cffi.FFI, lib: Any) -> None:
        self.ffi, self.lib = ffi, lib
        self.keep: list[Any] = []

    def cstr(self, text: str) -> Any:
        buf = self.ffi.new("char[]", text.encode())
        self.keep.append(buf)
        return buf

    def printed(self, pointer: Any) -> str:
        if pointer == self.ffi.NULL:
            raise EngineABIError("the engine returned NULL from a *_to_str function")
        try:
            return bytes(self.ffi.string(pointer)).decode()
        finally:
            self.lib.free(pointer)


def _check_print_back(ffi: cffi.FFI, lib: Any, problems: list[str]) -> None:
    """Phase two: values written through our view must be printed back by the engine."""
    printer = _Printer(ffi, lib)
    for struct, written, fragments in (
        ("sd_ctx_params_t", _ctx_written(lib), _CTX_PRINTED),
        ("sd_img_gen_params_t", _gen_written(lib), _GEN_PRINTED),
    ):
        value = _oversized(ffi, struct, printer.keep)
        getattr(lib, struct.removesuffix("_t") + "_init")(value)
        for path, item in written.items():
            *parents, name = path.split(".")
            target = functools.reduce(getattr, parents, value)
            setattr(target, name, printer.cstr(item) if isinstance(item, str) else item)
        text = printer.printed(getattr(lib, struct.removesuffix("_t") + "_to_str")(value))
        for fragment in fragments:
            _expect(problems, text, fragment, struct)


def _ctx_written(lib: Any) -> dict[str, Any]:
    """What phase two writes into the context parameters, by field."""
    return {
        "model_path": "abi-model",
        "vae_path": "abi-vae",
        "llm_vision_path": "abi-llm-vision",
        "tensor_type_rules": "abi-rules",
        "photo_maker_path": "abi-pm",
        "n_threads": 37,
        "wtype": lib.SD_TYPE_Q8_0,
        "sampler_rng_type": lib.CPU_RNG,
        "prediction": lib.FLUX2_FLOW_PRED,
        "flash_attn": True,
        "circular_y": True,
        "chroma_use_t5_mask": True,
        "chroma_t5_mask_pad": 29,
        "max_vram": 2.25,
    }


_CTX_PRINTED = (
    *("model_path: abi-model\n", "vae_path: abi-vae\n", "llm_vision_path: abi-llm-vision\n"),
    *("photo_maker_path: abi-pm\n", "tensor_type_rules: abi-rules\n", "vae_decode_only: true\n"),
    *("free_params_immediately: true\n", "n_threads: 37\n", "wtype: q8_0\n", "rng_type: cuda\n"),
    *("sampler_rng_type: cpu\n", "prediction: flux2_flow\n", "max_vram: 2.250\n", "flash_attn: true\n"),
    *("circular_x: false\n", "circular_y: true\n", "chroma_use_dit_mask: true\n"),
    *("chroma_use_t5_mask: true\n", "chroma_t5_mask_pad: 29\n"),
)
"""What the engine must print back of them (and of the defaults around them)."""


def _gen_written(lib: Any) -> dict[str, Any]:
    """What phase two writes into the image generation parameters, by field path."""
    return {
        "prompt": "abi-prompt",
        "negative_prompt": "abi-negative",
        "clip_skip": 3,
        "width": 328,
        "height": 456,
        "sample_params.guidance.txt_cfg": 4.5,
        "sample_params.guidance.img_cfg": 1.25,
        "sample_params.guidance.distilled_guidance": 2.75,
        "sample_params.guidance.slg.layer_start": 0.125,
        "sample_params.scheduler": lib.BONG_TANGENT_SCHEDULER,
        "sample_params.sample_method": lib.RES_2S_SAMPLE_METHOD,
        "sample_params.sample_steps": 17,
        "sample_params.eta": 0.5,
        "sample_params.shifted_timestep": 11,
        "sample_params.flow_shift": 3.25,
        "strength": 0.375,
        "seed": 1234567890123,
        "batch_count": 5,
        "increase_ref_index": True,
        "control_strength": 0.625,
        "pm_params.style_strength": 21.5,
        "vae_tiling_params.enabled": True,
        "hires.enabled": True,
        "hires.upscaler": lib.SD_HIRES_UPSCALER_LANCZOS,
        "hires.model_path": "abi-hires",
        "hires.scale": 1.5,
        "hires.target_width": 640,
        "hires.target_height": 768,
        "hires.steps": 9,
        "hires.denoising_strength": 0.45,
        "cache.mode": lib.SD_CACHE_EASYCACHE,
        "cache.reuse_threshold": 0.375,
        "cache.start_percent": 0.25,
        "cache.end_percent": 0.875,
    }


_GEN_PRINTED = (
    *("prompt: abi-prompt\n", "negative_prompt: abi-negative\n", "clip_skip: 3\n", "width: 328\n"),
    *("height: 456\n", "txt_cfg: 4.50,", "img_cfg: 1.25,", "distilled_guidance: 2.75,", "slg.layer_count: 0,"),
    *("slg.layer_start: 0.12,", "scheduler: bong_tangent,", "sample_method: res_2s,", "sample_steps: 17,"),
    *("eta: 0.50,", "shifted_timestep: 11,", "flow_shift: 3.25)", "strength: 0.38\n"),
    *("seed: 1234567890123\n", "batch_count: 5\n", "ref_images_count: 0\n", "auto_resize_ref_image: false\n"),
    *("increase_ref_index: true\n", "control_strength: 0.62\n", "style_strength = 21.50, id_images_count = 0"),
    "VAE tiling: true\n",
    "hires: {enabled=true, upscaler=Lanczos, model_path=abi-hires, scale=1.50, "
    "target=640x768, steps=9, denoising_strength=0.45}",
    "cache: easycache (threshold=0.375, start=0.25, end=0.88)",
)
"""What the engine must print back of them."""


def check_abi(ffi: cffi.FFI, lib: Any) -> None:
    """Prove that the declarations in ``ffi`` match the library's struct layouts.

    Phase one reads the engine's own defaults through our view of each struct.
    Only when they all agree does phase two write distinctive values through our
    view and have the engine print them back. The last fields of each struct
    are among those checked, so a wrong size or a shifted field is caught, and
    the structs live in oversized zeroed buffers, so a mismatch cannot make the
    engine read or write outside our memory.

    Raises
    ------
    EngineABIError
        Listing each field whose value did not come back.
    """
    problems: list[str] = []
    _check_init_defaults(ffi, lib, problems)
    if not problems:
        _check_print_back(ffi, lib, problems)
    for table, name_of, count in (
        (SAMPLE_METHOD_ENUM, lib.sd_sample_method_name, lib.SAMPLE_METHOD_COUNT),
        (SCHEDULER_ENUM, lib.sd_scheduler_name, lib.SCHEDULER_COUNT),
        (PREDICTION_ENUM, lib.sd_prediction_name, lib.PREDICTION_COUNT),
    ):
        engine_names = tuple(bytes(ffi.string(name_of(i))).decode() for i in range(count))
        if engine_names != table:
            problems.append(f"enum names: engine has {engine_names}, sfumato declares {table}")
    if problems:
        raise EngineABIError(
            "the engine library does not match sfumato's declarations (is it "
            f"{ENGINE_DISTRIBUTION}=={ENGINE_VERSION_REQUIRED}?): " + "; ".join(problems)
        )
