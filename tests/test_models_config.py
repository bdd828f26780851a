"""The models config: models made of several files (FLUX.2 [klein], split SDXL,
SD3, FLUX.1) served by every API family, per-model defaults, and errors that
name the file, the model and the key.

The config and the catalog are checked on the real files' headers (the text
encoders that take minutes to write are header files here); split SDXL runs
through the job API, A1111 and a ComfyUI graph on the engine, and FLUX.2
[klein] and FLUX.1 do the same behind the ``heavy`` marker (Qwen3 and T5-XXL).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sfumato.cli import main
from sfumato.errors import InvalidParameterError
from sfumato.params import DiffusionParams
from sfumato.server.apis.comfy.compile import compile_prompt
from sfumato.server.apis.openai import QUALITY_STEPS
from sfumato.server.app import announcement, create_app
from sfumato.server.jobs.plan import JobPlan
from sfumato.server.models.config import ModelsConfigError, read_models_config
from sfumato.server.planning import job_plan
from sfumato.server.settings import ServerSettings

from .helpers import SIZE, pixels, png_bytes, wait_history, wait_job

LIMITS = {"max_steps": 150, "max_pixels": 2048 * 2048}


def _link(folder: Path, **files: Path) -> None:
    """Put each file into ``folder`` under a user's name (a symbolic link)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in files.items():
        (folder / name.replace("__", ".")).symlink_to(target)


def _settings(tmp_path: Path, **overrides: Any) -> ServerSettings:
    values: dict[str, Any] = {
        "models_dir": tmp_path / "models", "loras_dir": tmp_path / "loras", "upscalers_dir": tmp_path / "upscalers",
        "data_dir": tmp_path / "data", "threads": 2,
    }  # fmt: skip
    values.update(overrides)
    return ServerSettings(**values)


FAMILIES_TOML = """
[models.klein]
file = "flux-2-klein.gguf"
llm = "qwen3-4b.gguf"
vae = "flux2-vae.safetensors"
prediction = "flux2_flow"
steps = 4
cfg_scale = 1.0

[models.sdxl-split]
file = "sdxl-unet.gguf"
clip_l = "clip_l.safetensors"
clip_g = "clip_g.safetensors"
vae = "sdxl-vae.safetensors"
preset = "sdxl-lightning-4step"

[models.sd3]
file = "sd3-medium.gguf"
clip_l = "clip_l.safetensors"
clip_g = "clip_g.safetensors"
t5xxl = "t5xxl.safetensors"
sampler = "Euler"

[models.flux1-dev]
file = "flux1-dev.gguf"
clip_l = "clip_l.safetensors"
t5xxl = "t5xxl.safetensors"
vae = "ae.safetensors"
"""


@pytest.fixture
def family_folder(
    tmp_path: Path, flux2_headers: dict[str, Path], sdxl_parts: dict[str, Path], sd3_gguf: Path,
    flux1_parts: dict[str, Path], t5_header: Path, sd1_tiny_gguf: Path,
) -> Path:  # fmt: skip
    """A models folder as a user lays it out: one checkpoint that loads alone, and
    the files of four split families named by ``models.toml`` beside them."""
    models = tmp_path / "models"
    _link(
        models, **{"tiny-sd1__gguf": sd1_tiny_gguf, "flux-2-klein__gguf": flux2_headers["diffusion"],
                   "qwen3-4b__gguf": flux2_headers["llm"], "flux2-vae__safetensors": flux2_headers["vae"],
                   "sdxl-unet__gguf": sdxl_parts["unet"], "clip_l__safetensors": sdxl_parts["clip_l"],
                   "clip_g__safetensors": sdxl_parts["clip_g"], "sdxl-vae__safetensors": sdxl_parts["vae"],
                   "sd3-medium__gguf": sd3_gguf, "t5xxl__safetensors": t5_header,
                   "flux1-dev__gguf": flux1_parts["diffusion"], "ae__safetensors": flux1_parts["vae"]},
    )  # fmt: skip
    (models / "models.toml").write_text(FAMILIES_TOML)
    return models


def test_every_family_is_listed_by_every_api(family_folder: Path, tmp_path: Path) -> None:
    with TestClient(create_app(_settings(tmp_path))) as client:
        said = announcement(client.app.state.sfumato)  # type: ignore[attr-defined]  # what sfumato serve prints
        assert f"5 model(s) in {family_folder} and {family_folder / 'models.toml'}: " in said
        assert "klein (FLUX.2 [klein])" in said
        listed = {m["name"]: m["family"] for m in client.get("/models").json()["models"]}
        assert listed == {"tiny-sd1": "SD 1.x", "klein": "FLUX.2 [klein]", "sdxl-split": "SDXL", "sd3": "SD3",
                          "flux1-dev": "FLUX.1"}  # fmt: skip
        # A1111: one name for a model in sd-models and options; a configured model's is its own.
        titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
        assert titles == ["tiny-sd1.gguf", "klein", "sdxl-split", "sd3", "flux1-dev"]
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "klein"}).status_code == 200
        assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "klein"
        # ComfyUI: every model is a checkpoint; the split ones are diffusion models too, and
        # their companions are the text encoders and VAEs its loaders list.
        info = client.get("/object_info").json()
        required = {kind: node["input"]["required"] for kind, node in info.items()}
        assert required["CheckpointLoaderSimple"]["ckpt_name"][0] == titles
        assert required["UNETLoader"]["unet_name"][0] == ["klein", "sdxl-split", "flux1-dev"]  # SD3's carries a VAE
        encoders = ["clip_g.safetensors", "clip_l.safetensors", "qwen3-4b.gguf", "t5xxl.safetensors"]
        assert required["DualCLIPLoader"]["clip_name1"][0] == encoders
        assert client.get("/api/models/text_encoders").json() == encoders
        assert required["VAELoader"]["vae_name"][0] == ["ae.safetensors", "flux2-vae.safetensors",
                                                       "sdxl-vae.safetensors"]  # fmt: skip


def test_comfyui_loaders_must_name_the_models_own_files(family_folder: Path, tmp_path: Path) -> None:
    """A CLIP loader prompts a configured model only with exactly its text encoders, and
    a VAELoader's config VAE decodes only the model that names it (no engine runs)."""
    clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen3-4b.gguf", "type": "flux2"}}
    good = _comfy_graph(_split_loaders("klein", clip, "flux2-vae.safetensors"), ["10", 0], ["11", 0], ["12", 0],
                        seed=1, **ONE_STEP)  # fmt: skip
    with TestClient(create_app(_settings(tmp_path))) as client:
        compiled = compile_prompt(client.app.state.sfumato, good)  # type: ignore[attr-defined]
        assert (compiled.plan.model, compiled.plan.vae, compiled.loader) == ("klein", None, "10")
        assert compiled.plan.generation.steps == 1  # the graph's own, not the config's 4
        wrong_clip = {**good, "11": {"class_type": "CLIPLoader", "inputs": {"clip_name": "clip_l.safetensors",
                                                                            "type": "stable_diffusion"}}}  # fmt: skip
        errors = client.post("/prompt", json={"prompt": wrong_clip}).json()["node_errors"]
        [error] = errors["3"]["errors"]
        assert error["extra_info"]["input_name"] == "positive" and "qwen3-4b.gguf" in error["details"]
        wrong_vae = {**good, "12": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl-vae.safetensors"}}}
        [error] = client.post("/prompt", json={"prompt": wrong_vae}).json()["node_errors"]["8"]["errors"]
        assert error["extra_info"]["input_name"] == "vae" and "flux2-vae.safetensors" in error["details"]


def test_a_configs_models_carry_their_files_and_defaults(family_folder: Path) -> None:
    found = read_models_config(family_folder / "models.toml", **LIMITS)
    klein = found["klein"]
    assert klein.path == family_folder / "flux-2-klein.gguf"  # relative to the config's folder
    assert klein.load_config() == {"llm_model_src": family_folder / "qwen3-4b.gguf",
                                   "vae_model_src": family_folder / "flux2-vae.safetensors",
                                   "prediction": "flux2_flow"}  # fmt: skip
    assert klein.defaults == {"steps": 4, "cfg_scale": 1.0}
    # A preset's settings, as the SDK's presets module has them; a sampler title is the engine's name.
    assert found["sdxl-split"].defaults == {"sampling_method": "euler", "scheduler": "sgm_uniform", "steps": 4,
                                            "cfg_scale": 1.0, "width": 1024, "height": 1024}  # fmt: skip
    assert found["sd3"].defaults == {"sampling_method": "euler"}
    assert found["flux1-dev"].encoder_files() == {"clip_l.safetensors", "t5xxl.safetensors"}


def test_a_models_device_cpu_variant_and_precision_are_its_model_config_keys(family_folder: Path) -> None:
    config = family_folder / "devices.toml"
    config.write_text('[models.on-vulkan]\nfile = "tiny-sd1.gguf"\ndevice = "Vulkan0"\ncpu_variant = "haswell"\n'
                      '[models.bf16]\nfile = "tiny-sd1.gguf"\nprecision = "bf16"\n'
                      '[models.anywhere]\nfile = "tiny-sd1.gguf"\n')  # fmt: skip
    found = read_models_config(config, **LIMITS)
    assert found["on-vulkan"].load_config()["device"] == "Vulkan0"
    assert found["on-vulkan"].load_config()["cpu_variant"] == "haswell"
    assert found["bf16"].load_config()["precision"] == "bf16"
    # The server's --device and --precision apply, and the probe's CPU variant.
    assert not {"device", "cpu_variant", "precision"} & set(found["anywhere"].load_config())
    config.write_text('[models.half]\nfile = "tiny-sd1.gguf"\nprecision = "fp16"\n')
    with pytest.raises(ModelsConfigError, match=r"models\.half.*precision.*must be one of \['exact', 'bf16'\]"):
        read_models_config(config, **LIMITS)


@pytest.mark.parametrize(
    ("table", "key", "says"),
    [
        ('file = "flux-2-klein.gguf"\nvae = "flux2-vae.safetensors"', "llm", "required"),
        (
            'file = "flux-2-klein.gguf"\nllm = "qwen3-4b.gguf"\nvae = "flux2-vae.safetensors"\nclip_l = '
            '"clip_l.safetensors"',
            "clip_l",
            "not used",
        ),
        (
            'file = "sdxl-unet.gguf"\nclip_l = "clip_g.safetensors"\nclip_g = "clip_g.safetensors"\nvae = '
            '"sdxl-vae.safetensors"',
            "clip_l",
            "1280-wide",
        ),
        (
            'file = "flux1-dev.gguf"\nclip_l = "clip_l.safetensors"\nt5xxl = "t5xxl.safetensors"\nvae = '
            '"sdxl-vae.safetensors"',
            "vae",
            "4 latent channels",
        ),
        ('file = "missing.gguf"', "file", "no file at"),
        ('file = "qwen3-4b.gguf"', "file", "qwen3"),
        ('llm = "qwen3-4b.gguf"', "file", "missing"),
        ('file = "tiny-sd1.gguf"\nsteps = 200', "steps", "between 1 and 150"),
        ('file = "tiny-sd1.gguf"\nsampler = "Euler z"', "sampler", "unknown sampler"),
        ('file = "tiny-sd1.gguf"\npreset = "fast"', "preset", "sdxl-turbo"),
        ('file = "tiny-sd1.gguf"\nwidth = 100', "width", "multiple of 64"),
        ('file = "tiny-sd1.gguf"\ncfg = 5', "cfg", "unknown key"),
        ('file = "tiny-sd1.gguf"\nflow_shift = 3.0', "flow_shift", "SD 1.x is not one"),
        ('file = "tiny-sd1.gguf"\nprediction = "x0"', "prediction", "must be one of"),
        ('file = "tiny-sd1.gguf"\ndevice = 3', "device", "must be 'auto', 'cpu', 'gpu' or a device name"),
        ('file = "tiny-sd1.gguf"\ncpu_variant = ""', "cpu_variant", "must be 'auto' or a CPU variant's name"),
    ],
)
def test_a_config_error_names_the_file_the_model_and_the_key(
    family_folder: Path, table: str, key: str, says: str
) -> None:
    config = family_folder / "broken.toml"
    config.write_text(f"[models.mine]\n{table}\n")
    with pytest.raises(ModelsConfigError) as caught:
        read_models_config(config, **LIMITS)
    assert (caught.value.file, caught.value.model, caught.value.key) == (config, "mine", key)
    assert str(caught.value).startswith(f"{config}: models.mine.{key}: ")
    assert says.lower() in caught.value.message.lower(), caught.value.message


def test_serve_refuses_a_broken_config_at_start(
    family_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "sfumato.toml"
    bad.write_text('[models.mine]\nfile = "nowhere.gguf"\n')
    argv = ["serve", "--models", str(family_folder), "--data", str(tmp_path / "data")]
    assert main([*argv, "--config", str(bad)]) == 2
    assert f"{bad}: models.mine.file: no file at" in capsys.readouterr().err
    assert main([*argv, "--config", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml: no such file" in capsys.readouterr().err
    (tmp_path / "syntax.toml").write_text("[models.mine\n")
    assert main([*argv, "--config", str(tmp_path / "syntax.toml")]) == 2
    assert "syntax.toml: is not valid TOML" in capsys.readouterr().err
    (tmp_path / "other.toml").write_text('[model.mine]\nfile = "x"\n')
    assert main([*argv, "--config", str(tmp_path / "other.toml")]) == 2
    assert "other.toml: model: unknown key" in capsys.readouterr().err


def test_an_edit_applies_and_a_broken_edit_keeps_the_models(family_folder: Path, tmp_path: Path) -> None:
    config = family_folder / "models.toml"
    with TestClient(create_app(_settings(tmp_path))) as client:
        config.write_text(FAMILIES_TOML + '\n[models.tiny-fast]\nfile = "tiny-sd1.gguf"\nsteps = 2\n')
        os.utime(config, (1, 1))  # a new mtime whatever the clock's resolution
        names = [m["name"] for m in client.get("/models").json()["models"]]
        assert names[-1] == "tiny-fast" and "klein" in names
        config.write_text("[models.tiny-fast\n")
        os.utime(config, (2, 2))
        assert [m["name"] for m in client.get("/models").json()["models"]] == names


# --- per-model defaults, through the real engine -------------------------------------------


@pytest.fixture
def defaults_client(tmp_path: Path, sd1_tiny_gguf: Path) -> Iterator[TestClient]:
    """The tiny SD 1.x checkpoint served alone and, by the config, as ``tiny-fast``
    with its own defaults."""
    _link(tmp_path / "models", **{"tiny-sd1__gguf": sd1_tiny_gguf})
    config = tmp_path / "elsewhere" / "sfumato.toml"  # --config: any file; paths from its folder
    config.parent.mkdir()
    config.write_text(
        f'[models.tiny-fast]\nfile = "{os.path.relpath(sd1_tiny_gguf, config.parent)}"\nsteps = 2\n'
        f'sampler = "Euler"\nscheduler = "karras"\ncfg_scale = 5.0\nwidth = {SIZE}\nheight = {SIZE}\n'
    )
    with TestClient(create_app(_settings(tmp_path, models_config=config))) as client:
        yield client


def _plan(client: TestClient, job_id: str) -> JobPlan:
    job = client.app.state.sfumato.store.get(job_id)  # type: ignore[attr-defined]
    return JobPlan.from_json(job.request["plan"])


def test_defaults_fill_what_a_request_leaves_out(defaults_client: TestClient) -> None:
    client = defaults_client
    job_id = client.post("/txt2img", json={"prompt": "a lighthouse", "model": "tiny-fast", "seed": 3}).json()["job_id"]
    done = wait_job(client, job_id)
    assert done["state"] == "done" and (done["width"], done["height"]) == (SIZE, SIZE), done
    generation = _plan(client, job_id).generation
    fields = ("steps", "sampling_method", "scheduler", "cfg_scale", "width", "height")
    assert tuple(getattr(generation, f) for f in fields) == (2, "euler", "karras", 5.0, SIZE, SIZE)
    # What a request sends wins; a sampler title that names its scheduler names it for the request.
    sent = {"prompt": "x", "model": "tiny-fast", "steps": 3, "sampler_name": "DPM++ 2M Karras", "cfg_scale": 6.0}
    generation = _plan(client, client.post("/txt2img", json=sent).json()["job_id"]).generation
    assert tuple(getattr(generation, f) for f in fields) == (3, "dpm++2m", "karras", 6.0, SIZE, SIZE)
    # A1111: sampler_index, its legacy name, counts as sent; its info says what ran.
    model = {"sd_model_checkpoint": "tiny-fast"}
    answer = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_index": "Heun", "override_settings": model})
    assert answer.status_code == 200, answer.text
    assert pixels(base64.b64decode(answer.json()["images"][0])).shape == (SIZE, SIZE, 3)
    info = json.loads(answer.json()["info"])
    assert (info["sampler_name"], info["steps"], info["cfg_scale"], info["width"]) == ("Heun", 2, 5.0, SIZE)
    assert "Steps: 2, Sampler: Heun, Schedule type: Karras, CFG scale: 5.0" in info["infotexts"][0]
    info = json.loads(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": model}).json()["info"])
    assert info["sampler_name"] == "Euler" and "Schedule type: Karras" in info["infotexts"][0]
    # OpenAI: quality sets the steps; without it the model's apply.
    openai = {"prompt": "x", "model": "tiny-fast", "seed": 3}
    assert client.post("/v1/images/generations", json=openai).status_code == 200
    assert client.post("/v1/images/generations", json={**openai, "quality": "low"}).status_code == 200
    store = client.app.state.sfumato.store  # type: ignore[attr-defined]
    made = [_plan(client, job_id).generation for job_id in store.ids_of_kind("openai-generations")]
    assert sorted((g.steps, g.width) for g in made) == [(2, SIZE), (QUALITY_STEPS["low"], SIZE)]
    # The checkpoint itself keeps the request schemas' defaults (this job is cancelled at once).
    job_id = client.post("/txt2img", json={"prompt": "x", "model": "tiny-sd1"}).json()["job_id"]
    client.delete(f"/queue/{job_id}")
    assert (_plan(client, job_id).generation.steps, _plan(client, job_id).generation.width) == (30, 512)


# --- each split family through the three API families, on the engine ----------------------


def _comfy_graph(
    loaders: dict[str, Any], model: list[Any], clip: list[Any], vae: list[Any], **sampler: Any
) -> dict[str, Any]:
    graph: dict[str, Any] = {
        "3": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0,
            **sampler}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sfumato", "images": ["8", 0]}},
    }  # fmt: skip
    graph.update(loaders)
    return graph


def _served_alike(tmp_path: Path, model: str, files: dict[str, Path], table: str, graph: dict[str, Any]) -> None:
    """Serve ``files`` (linked under their keys' names) as the configured ``model``
    (``table``: its keys after ``file``, companions and defaults), then make the same
    generation through the job-queue API and A1111 (each leaving the steps, sampler,
    scheduler, CFG and size to the model's defaults) and the ComfyUI ``graph``: one
    picture, three times."""
    _link(tmp_path / "models", **files)
    (tmp_path / "models" / "models.toml").write_text(f"[models.{model}]\n{table}width = {SIZE}\nheight = {SIZE}\n")
    seed = graph["3"]["inputs"]["seed"]
    with TestClient(create_app(_settings(tmp_path))) as client:
        job_id = client.post("/txt2img", json={"prompt": "a lighthouse", "model": model, "seed": seed,
                                               "fileType": "png"}).json()["job_id"]  # fmt: skip
        done = wait_job(client, job_id)
        assert done["state"] == "done", done
        chosen = {"sd_model_checkpoint": model}
        a1111 = client.post(
            "/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "seed": seed, "override_settings": chosen}
        )
        assert a1111.status_code == 200, a1111.text
        accepted = client.post("/prompt", json={"prompt": graph})
        assert accepted.status_code == 200, accepted.text
        entry = wait_history(client, accepted.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry
        comfy = client.get("/view", params=entry["outputs"]["9"]["images"][0]).content
    images = [pixels(base64.b64decode(png)) for png in (done["image"], a1111.json()["images"][0])] + [pixels(comfy)]
    assert images[0].shape == (SIZE, SIZE, 3) and images[0].std() > 0
    for other in images[1:]:
        assert np.array_equal(images[0], other)


def _split_loaders(unet: str, clip: dict[str, Any], vae: str) -> dict[str, Any]:
    """ComfyUI's loaders of a model made of several files: UNETLoader, a CLIP loader, VAELoader."""
    return {"10": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}}, "11": clip,
            "12": {"class_type": "VAELoader", "inputs": {"vae_name": vae}}}  # fmt: skip


@pytest.mark.slow
def test_split_sdxl_is_served_by_every_api(tmp_path: Path, sdxl_parts: dict[str, Path]) -> None:
    files = {"sdxl-unet__gguf": sdxl_parts["unet"], "clip_l__safetensors": sdxl_parts["clip_l"],
             "clip_g__safetensors": sdxl_parts["clip_g"], "sdxl-vae__safetensors": sdxl_parts["vae"]}  # fmt: skip
    table = (
        'file = "sdxl-unet.gguf"\nclip_l = "clip_l.safetensors"\nclip_g = "clip_g.safetensors"\n'
        'vae = "sdxl-vae.safetensors"\nsteps = 2\nsampler = "euler"\nscheduler = "sgm_uniform"\ncfg_scale = 5.0\n'
    )
    graph = _comfy_graph(
        {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl-split"}}},
        ["4", 0], ["4", 1], ["4", 2], seed=8, steps=2, cfg=5.0, sampler_name="euler", scheduler="sgm_uniform",
    )  # fmt: skip
    _served_alike(tmp_path, "sdxl-split", files, table, graph)


SAMPLED_ONCE = 'steps = 1\nsampler = "euler"\nscheduler = "simple"\ncfg_scale = 1.0\n'
ONE_STEP = {"steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}


@pytest.mark.heavy
def test_flux2_klein_is_served_by_every_api(tmp_path: Path, flux2_parts: dict[str, Path]) -> None:
    files = {"klein__gguf": flux2_parts["diffusion"], "qwen3__gguf": flux2_parts["llm"],
             "flux2-vae__safetensors": flux2_parts["vae"]}  # fmt: skip
    table = 'file = "klein.gguf"\nllm = "qwen3.gguf"\nvae = "flux2-vae.safetensors"\nprediction = "flux2_flow"\n'
    clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen3.gguf", "type": "flux2"}}
    loaders = _split_loaders("klein", clip, "flux2-vae.safetensors")
    graph = _comfy_graph(loaders, ["10", 0], ["11", 0], ["12", 0], seed=21, **ONE_STEP)
    _served_alike(tmp_path, "klein", files, table + SAMPLED_ONCE, graph)


@pytest.mark.heavy
def test_flux1_is_served_by_every_api(
    tmp_path: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5xxl_gguf: Path
) -> None:
    files = {"flux1-dev__gguf": flux1_parts["diffusion"], "clip_l__safetensors": sdxl_parts["clip_l"],
             "t5xxl__gguf": t5xxl_gguf, "ae__safetensors": flux1_parts["vae"]}  # fmt: skip
    table = 'file = "flux1-dev.gguf"\nclip_l = "clip_l.safetensors"\nt5xxl = "t5xxl.gguf"\nvae = "ae.safetensors"\n'
    clip = {
        "class_type": "DualCLIPLoader",  # in the other order than the config's: a set
        "inputs": {"clip_name1": "t5xxl.gguf", "clip_name2": "clip_l.safetensors", "type": "flux"},
    }
    loaders = _split_loaders("flux1-dev", clip, "ae.safetensors")
    graph = _comfy_graph(loaders, ["10", 0], ["11", 0], ["12", 0], seed=41, **ONE_STEP)
    _served_alike(tmp_path, "flux1-dev", files, table + SAMPLED_ONCE, graph)


@pytest.mark.heavy
def test_chroma_is_listed_with_its_family_and_served_to_comfyui(
    tmp_path: Path, chroma_gguf: Path, flux1_parts: dict[str, Path], t5xxl_gguf: Path
) -> None:
    files = {"chroma__gguf": chroma_gguf, "t5xxl__gguf": t5xxl_gguf, "ae__safetensors": flux1_parts["vae"]}
    table = 'file = "chroma.gguf"\nt5xxl = "t5xxl.gguf"\nvae = "ae.safetensors"\n'
    clip = {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl.gguf", "type": "chroma"}}
    loaders = _split_loaders("chroma", clip, "ae.safetensors")
    graph = _comfy_graph(loaders, ["10", 0], ["11", 0], ["12", 0], seed=43, **ONE_STEP)
    # One API here (its T5-XXL encoding costs half a minute a request): ComfyUI's split loaders.
    _link(tmp_path / "models", **files)
    (tmp_path / "models" / "models.toml").write_text(f"[models.chroma]\n{table}")
    with TestClient(create_app(_settings(tmp_path))) as client:
        listed = client.get("/models").json()["models"]
        assert {m["name"]: m["family"] for m in listed}["chroma"] == "Chroma"
        accepted = client.post("/prompt", json={"prompt": graph})
        assert accepted.status_code == 200, accepted.text
        entry = wait_history(client, accepted.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry
        picture = pixels(client.get("/view", params=entry["outputs"]["9"]["images"][0]).content)
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 5


@pytest.mark.heavy
def test_ovis_is_listed_with_its_family_and_served_to_a1111(
    tmp_path: Path, ovis_gguf: Path, ovis_llm: Path, flux1_parts: dict[str, Path]
) -> None:
    _link(tmp_path / "models", ovis__gguf=ovis_gguf, qwen3__gguf=ovis_llm, ae__safetensors=flux1_parts["vae"])
    (tmp_path / "models" / "models.toml").write_text(
        f'[models.ovis]\nfile = "ovis.gguf"\nllm = "qwen3.gguf"\nvae = "ae.safetensors"\n{SAMPLED_ONCE}'
    )
    with TestClient(create_app(_settings(tmp_path))) as client:
        titles = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
        assert "ovis" in titles
        listed = client.get("/models").json()["models"]
        assert {m["name"]: m["family"] for m in listed}["ovis"] == "Ovis-Image"
        done = client.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "seed": 3, "width": SIZE,
                                                      "height": SIZE, "override_settings": {
                                                          "sd_model_checkpoint": "ovis"}})  # fmt: skip
    assert done.status_code == 200, done.text
    picture = pixels(base64.b64decode(done.json()["images"][0]))
    assert picture.shape == (SIZE, SIZE, 3) and picture.std() > 0


def test_reference_latents_edits_and_family_defaults_reach_a_flux1_plan(
    tmp_path: Path, flux1_parts: dict[str, Path], sdxl_parts: dict[str, Path], t5_header: Path, sd1_tiny_gguf: Path,
    flux1_depth_gguf: Path,
) -> None:  # fmt: skip
    files = {"flux1-dev__gguf": flux1_parts["diffusion"], "clip_l__safetensors": sdxl_parts["clip_l"],
             "t5xxl__safetensors": t5_header, "ae__safetensors": flux1_parts["vae"],
             "sd1__gguf": sd1_tiny_gguf, "flux1-depth__gguf": flux1_depth_gguf}  # fmt: skip
    _link(tmp_path / "models", **files)
    table = 'clip_l = "clip_l.safetensors"\nt5xxl = "t5xxl.safetensors"\nvae = "ae.safetensors"\n'
    dev = f'file = "flux1-dev.gguf"\n{table}'
    config = f"[models.kontext]\n{dev}\n[models.edits]\n{dev}edits = true\n"
    config += f'[models.depth]\nfile = "flux1-depth.gguf"\n{table}'
    (tmp_path / "models" / "models.toml").write_text(config)
    names = {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl.safetensors", "type": "flux"}
    clip = {"class_type": "DualCLIPLoader", "inputs": names}
    graph = _comfy_graph(_split_loaders("kontext", clip, "ae.safetensors"), ["10", 0], ["11", 0], ["12", 0],
                         seed=5, **ONE_STEP)  # fmt: skip
    graph["13"] = {"class_type": "LoadImage", "inputs": {"image": "source.png"}}
    graph["14"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["12", 0]}}
    graph["15"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["14", 0]}}
    graph["3"]["inputs"]["positive"] = ["15", 0]
    picture = png_bytes(np.full((SIZE, SIZE, 3), 128, np.uint8))
    with TestClient(create_app(_settings(tmp_path))) as client:
        uploaded = client.post("/upload/image", files={"image": ("source.png", picture, "image/png")})
        assert uploaded.status_code == 200, uploaded.text
        state = client.app.state.sfumato  # type: ignore[attr-defined]
        compiled = compile_prompt(state, graph)
        assert compiled.plan is not None and len(compiled.plan.generation.init_images) == 1
        assert compiled.plan.generation.init_image is None  # a reference, not an img2img source
        # A model that `edits` (Kontext) takes an img2img request's image (A1111, OpenAI) as its reference.
        for model, sources, references in (("kontext", 1, 0), ("edits", 0, 1)):
            work = job_plan(state, DiffusionParams(prompt="x", init_image=picture), model=model).generation
            assert (work.init_image is not None, len(work.init_images)) == (sources == 1, references)
        # What an HTTP request leaves out: FLUX.1 takes its family's cfg_scale and the engine's
        # sampler for a flow model; SD 1.x the API's defaults.
        asked = DiffusionParams(prompt="x", cfg_scale=7.0, sampling_method="dpm++2m", scheduler="karras")
        unset = ("cfg_scale", "sampling_method", "scheduler")
        chosen = {model: job_plan(state, asked, model=model, unset=unset).generation for model in ("kontext", "sd1")}
        assert {m: (w.cfg_scale, w.sampling_method, w.scheduler) for m, w in chosen.items()} == {
            "kontext": (1.0, None, None), "sd1": (7.0, "dpm++2m", "karras"),
        }  # fmt: skip
        # FLUX.1 Depth takes its control image without a ControlNet; [dev] needs one named.
        steered = job_plan(state, DiffusionParams(prompt="x", control_image=picture), model="depth")
        assert steered.control_net is None and steered.generation.control_image is not None
        with pytest.raises(InvalidParameterError, match="name one of the ControlNet folder") as caught:
            job_plan(state, DiffusionParams(prompt="x", control_image=picture), model="kontext")
        assert caught.value.field == "control_image"
        with pytest.raises(InvalidParameterError, match="steered by a control image") as caught:
            job_plan(state, DiffusionParams(prompt="x"), model="depth")
        graph["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1.gguf"}}
        for node in ("6", "7", "8", "14"):
            key = "clip" if node in ("6", "7") else "vae"
            graph[node]["inputs"][key] = ["10", 1 if key == "clip" else 2]
        refused = client.post("/prompt", json={"prompt": graph})
    assert refused.status_code == 400, refused.text
    [error] = refused.json()["node_errors"]["15"]["errors"]
    assert error["extra_info"]["input_name"] == "latent" and "FLUX.1 Kontext" in error["details"]


def test_edits_is_refused_on_a_file_that_is_not_flux1_dev_layout(tmp_path: Path, sd1_tiny_gguf: Path) -> None:
    _link(tmp_path, sd1__gguf=sd1_tiny_gguf)
    (tmp_path / "models.toml").write_text('[models.sd]\nfile = "sd1.gguf"\nedits = true\n')
    with pytest.raises(ModelsConfigError, match=r"models\.sd\.edits: is for FLUX\.1 Kontext.*SD 1\.x") as caught:
        read_models_config(tmp_path / "models.toml", max_steps=150, max_pixels=2**22)
    assert caught.value.key == "edits"
