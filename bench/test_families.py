"""Each family sfumato runs, on the machine's CPU at the smallest size it allows (64 for
the UNets, 16 for the transformers): load seconds, seconds per sampling step, the prompt's
encoding and the VAE decode, and peak RSS, each family in its own process
(``bench.probe`` kind ``family``, through sfumato's own loading path).

The files are the test suite's (random weights in the real layout, from the same cache
folder): the SD 1.x / 2.x and SDXL UNets at full size, SD3 Medium's and Z-Image's whole
transformers, and the
transformers of FLUX.1, Chroma, Ovis-Image, ERNIE-Image, Qwen-Image, Anima and FLUX.2 [klein] at their real
widths with one block of each kind (a released file has 19 + 38 or 5 + 20: its step costs about that many
times more). T5-XXL and the Qwen3s are their full encoders (FLUX.2's to the layer it reads); Qwen-Image's
Qwen2.5-VL has one layer (the engine reads its last, however deep).
Companions are q4_0 where the suite writes them so; the UNets are f16."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_benchmark.fixture import BenchmarkFixture
from tests.support import models

from .conftest import QUICK, Probe, _model_dir, fmt, write_result

STEPS = 2


def _file(name: str, write: Callable[[Path], object]) -> str:
    """A file of the test suite's cache, under the tests' own name (written once)."""
    return str(models.cached(_model_dir(), name, write))


def _families() -> dict[str, dict[str, Any]]:
    sdxl = {part: _file(name, lambda p, part=part: models.write_sdxl_part(p, part, quant="q4_0" if part == "unet"
                                                                          else None))
            for part, name in (("unet", "sdxl-unet-q4_0.gguf"), ("clip_l", "sdxl-clip_l.safetensors"),
                               ("clip_g", "sdxl-clip_g.safetensors"), ("vae", "sdxl-vae.safetensors"))}  # fmt: skip
    t5 = _file(models.T5XXL_FILE, models.write_t5xxl)
    flux_vae = _file("flux1-ae.safetensors", lambda p: models.write_flux1_part(p, "vae"))
    ovis_llm = _file("ovis-qwen3-q4_0.gguf", models.write_ovis_llm)
    flux2 = {part: _file(name, lambda p, part=part: models.write_flux2_part(p, part))
             for part, name in (("diffusion", "flux2-klein-q4_0.gguf"), ("llm", "flux2-qwen3-q4_0.gguf"),
                                ("vae", "flux2-vae.safetensors"))}  # fmt: skip
    return {
        "SD 1.x": {"model": _file("sd1.gguf", lambda p: models.write_sd_checkpoint(p, "sd1")), "size": 64},
        "SD 2.x": {"model": _file("sd2.gguf", lambda p: models.write_sd_checkpoint(p, "sd2")), "size": 64},
        "SDXL (split)": {"model": sdxl["unet"], "size": 64, "model_config": {
            "clip_l_model_src": sdxl["clip_l"], "clip_g_model_src": sdxl["clip_g"], "vae_model_src": sdxl["vae"]}},
        "SD3 Medium": {"model": _file("sd3-medium-q4_0.gguf", models.write_sd3_checkpoint), "size": 16,
                       "model_config": {"clip_l_model_src": sdxl["clip_l"], "clip_g_model_src": sdxl["clip_g"],
                                        "t5xxl_model_src": t5}},
        "FLUX.1 [dev]": {"model": _file("flux1-dev-q4_0.gguf", lambda p: models.write_flux1_part(p, "diffusion")),
                         "size": 16, "model_config": {"clip_l_model_src": sdxl["clip_l"], "t5xxl_model_src": t5,
                                                      "vae_model_src": flux_vae}},
        "Chroma": {"model": _file("chroma-q4_0.gguf", lambda p: models.write_flux1_part(p, "chroma")), "size": 16,
                   "model_config": {"t5xxl_model_src": t5, "vae_model_src": flux_vae}},
        "Ovis-Image": {"model": _file("ovis-image-q4_0.gguf", lambda p: models.write_flux1_part(p, "ovis")),
                       "size": 16, "model_config": {"llm_model_src": ovis_llm, "vae_model_src": flux_vae}},
        "Z-Image": {"model": _file("z-image-q4_0.gguf", models.write_z_image), "size": 16,
                    "model_config": {"llm_model_src": _file("qwen3-4b-q4_0.gguf", models.write_qwen3_4b),
                                     "vae_model_src": flux_vae}},
        "ERNIE-Image": {"model": _file("ernie-image-q4_0.gguf", models.write_ernie_image), "size": 16,
                        "model_config": {"llm_model_src": _file("ministral-3b-q4_0.gguf", models.write_ministral_3b),
                                         "vae_model_src": flux2["vae"]}},
        "Qwen-Image": {"model": _file("qwen-image-q4_0.gguf", models.write_qwen_image), "size": 16,
                       "model_config": {"llm_model_src": _file("qwen2.5-vl-7b-1-layer-q4_0.gguf",
                                                               models.write_qwen25_vl),
                                        "vae_model_src": _file("wan2.1-vae.safetensors", models.write_wan_vae)}},
        "Anima": {"model": _file("anima-q4_0.gguf", models.write_anima), "size": 16,
                  "model_config": {"llm_model_src": _file("qwen3-0.6b-q4_0.gguf", models.write_qwen3_0_6b),
                                   "vae_model_src": _file("wan2.1-vae.safetensors", models.write_wan_vae)}},
        "FLUX.2 [klein]": {"model": flux2["diffusion"], "size": 16,
                           "model_config": {"llm_model_src": flux2["llm"], "vae_model_src": flux2["vae"]}},
    }  # fmt: skip


def test_each_family_at_its_smallest_size(benchmark: BenchmarkFixture, probe: Probe) -> None:
    families = _families()
    if QUICK:
        families = {name: families[name] for name in ("SD 1.x",)}
    figures: dict[str, dict[str, float]] = {}

    def measure_all() -> None:
        for name, case in families.items():
            config = {"model_config": {}, **case}
            config["model_config"] = {**config["model_config"], "threads": 2}
            figures[name] = probe(kind="family", steps=STEPS, **config)

    benchmark.pedantic(measure_all, rounds=1, iterations=1)
    rows: list[dict[str, object]] = [
        {
            "family": name,
            "size": f"{families[name]['size']}x{families[name]['size']}",
            "load s": fmt(f["load_s"], 1),
            "s/step": fmt(f["step_s"], 3),
            "prompt encoding s": fmt(f["conditioning_s"], 1),
            "VAE decode s": fmt(f["vae_s"], 2),
            "peak RSS MB": fmt(f["peak_rss_mb"], 0),
        }
        for name, f in figures.items()
    ]
    benchmark.extra_info["figures"] = figures
    write_result(
        "families",
        rows,
        f"Each family at its smallest size, {STEPS} steps at its default cfg_scale, 2 threads, each in its own "
        "process (the test suite's random-weight files: FLUX.1, Chroma, Ovis-Image, ERNIE-Image, Qwen-Image, Anima "
        "and FLUX.2 with one block of each kind, SD3 Medium and Z-Image whole).",
    )
