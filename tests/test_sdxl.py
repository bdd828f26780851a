"""SDXL: detection and companion checks (before any engine call), the mapping
onto the engine's context, and real engine runs on self-made random weights in
both layouts: the all-in-one checkpoint (full-depth 2.6B UNet, CLIP-L,
OpenCLIP-G, VAE) and the split one (UNet-only GGUF plus ``clip_l``, ``clip_g``
and VAE files), from the SDK and from the CLI.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import sfumato
from sfumato import errors
from sfumato.cli.flags import parse_args
from sfumato.families.companions import sdxl_projection_hint
from sfumato.families.detect import FAMILY_SDXL, detect, read_tensor_table
from sfumato.images import decode_png

from .helpers import CaptureSpec, header_file, run, sfumato_cli

COMPANION_KEYS = {"clip_l": "clip_l_model_src", "clip_g": "clip_g_model_src", "vae": "vae_model_src"}


def _split_config(parts: dict[str, Path], **overrides: object) -> dict[str, object]:
    config: dict[str, object] = {key: parts[role] for role, key in COMPANION_KEYS.items()}
    config["threads"] = 2
    config.update(overrides)
    return config


# --- detection --------------------------------------------------------------


def test_all_in_one_and_split_files_are_detected(sdxl_gguf: Path, sdxl_parts: dict[str, Path]) -> None:
    whole = detect(sdxl_gguf)
    assert (whole.family, whole.split, whole.has_vae, whole.format) == (FAMILY_SDXL, False, True, "gguf")
    unet = detect(sdxl_parts["unet"])
    assert (unet.family, unet.split, unet.has_vae) == (FAMILY_SDXL, True, False)


@pytest.mark.usefixtures("no_engine_calls")
def test_the_refiner_architecture_is_refused_by_name(tmp_path: Path) -> None:
    refiner = header_file(
        tmp_path / "refiner.safetensors",
        {
            "model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": (1536, 2560),
            "conditioner.embedders.0.model.token_embedding.weight": (49408, 1280),
        },
    )
    with pytest.raises(errors.UnsupportedModelError, match="SDXL refiner architecture"):
        sfumato.load_model(refiner)


@pytest.mark.usefixtures("no_engine_calls")
def test_a_checkpoint_with_one_of_two_text_encoders_is_refused(tmp_path: Path) -> None:
    half = header_file(
        tmp_path / "half.safetensors",
        {
            "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        },
    )
    with pytest.raises(errors.InvalidModelError, match="one of its two text encoders"):
        sfumato.load_model(half)


# --- companion validation (no engine call) ----------------------------------


@pytest.mark.usefixtures("no_engine_calls")
@pytest.mark.parametrize("role", list(COMPANION_KEYS))
def test_a_missing_companion_names_its_role_and_key(sdxl_parts: dict[str, Path], role: str) -> None:
    config = _split_config(sdxl_parts)
    del config[COMPANION_KEYS[role]]
    label = {"clip_l": "CLIP-L text encoder", "clip_g": "CLIP-G text encoder", "vae": "VAE"}[role]
    with pytest.raises(errors.InvalidParameterError, match=f"pass its {label} here") as caught:
        sfumato.load_model(sdxl_parts["unet"], model_config=config)
    assert caught.value.field == f"model_config.{COMPANION_KEYS[role]}"


@pytest.mark.usefixtures("no_engine_calls")
def test_swapped_text_encoders_are_refused(sdxl_parts: dict[str, Path]) -> None:
    config = _split_config(sdxl_parts, clip_l_model_src=sdxl_parts["clip_g"], clip_g_model_src=sdxl_parts["clip_l"])
    with pytest.raises(errors.InvalidParameterError, match=r"1280-wide CLIP text encoder \(CLIP-G text encoder\)") as e:
        sfumato.load_model(sdxl_parts["unet"], model_config=config)
    assert e.value.field == "model_config.clip_l_model_src"


@pytest.mark.usefixtures("no_engine_calls")
def test_a_companion_of_the_wrong_kind_is_refused(sdxl_parts: dict[str, Path], tmp_path: Path) -> None:
    config = _split_config(sdxl_parts, clip_g_model_src=sdxl_parts["vae"])
    with pytest.raises(errors.InvalidParameterError, match="not a CLIP text encoder; SDXL needs its CLIP-G"):
        sfumato.load_model(sdxl_parts["unet"], model_config=config)
    flux_vae = header_file(tmp_path / "ae.safetensors", {"decoder.conv_in.weight": (512, 16, 3, 3)})
    with pytest.raises(errors.InvalidParameterError, match="16 latent channels; SDXL decodes 4-channel latents"):
        sfumato.load_model(sdxl_parts["unet"], model_config=_split_config(sdxl_parts, vae_model_src=flux_vae))


@pytest.mark.usefixtures("no_engine_calls")
def test_text_encoders_are_refused_beside_an_all_in_one_file(sdxl_gguf: Path, sdxl_parts: dict[str, Path]) -> None:
    with pytest.raises(errors.InvalidParameterError, match="carries its own CLIP-G text encoder") as caught:
        sfumato.load_model(sdxl_gguf, model_config={"clip_g_model_src": sdxl_parts["clip_g"]})
    assert caught.value.field == "model_config.clip_g_model_src"


@pytest.mark.usefixtures("no_engine_calls")
def test_a_registry_constant_as_companion_resolves_like_model_src(sdxl_parts: dict[str, Path]) -> None:
    # Offline with an empty cache (conftest): the same error as for model_src.
    with pytest.raises(errors.ModelNotFoundError) as as_model:
        sfumato.load_model("FLUX_2_KLEIN_4B_VAE")
    config = _split_config(sdxl_parts, vae_model_src=sfumato.FLUX_2_KLEIN_4B_VAE)
    with pytest.raises(errors.ModelNotFoundError) as as_companion:
        sfumato.load_model(sdxl_parts["unet"], model_config=config)
    assert str(as_companion.value) == str(as_model.value)
    assert "black-forest-labs/FLUX.2-klein-4B/resolve/main/vae/diffusion_pytorch_model.safetensors" in str(
        as_model.value
    )


# --- mapping onto the engine's context --------------------------------------


def test_each_layout_maps_onto_its_context_paths(
    sdxl_gguf: Path, sdxl_parts: dict[str, Path], load_spec: CaptureSpec
) -> None:
    split = load_spec(sdxl_parts["unet"], _split_config(sdxl_parts)).context
    whole = load_spec(sdxl_gguf).context
    assert split is not None and whole is not None
    # The engine reads a UNet alone as no family until it sees a CLIP-L token
    # embedding; the hint file supplies a 1-row one that the CLIP-L file replaces.
    assert split.model_path is not None
    hint = read_tensor_table(Path(split.model_path)).shapes
    assert hint == {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (1, 768)}
    assert split.diffusion_model_path == str(sdxl_parts["unet"].resolve())
    assert (split.clip_l_path, split.clip_g_path, split.vae_path) == tuple(
        str(sdxl_parts[role].resolve()) for role in ("clip_l", "clip_g", "vae")
    )
    assert (split.t5xxl_path, split.llm_path) == (None, None)
    assert whole.model_path == str(sdxl_gguf.resolve())
    assert (whole.diffusion_model_path, whole.clip_l_path, whole.vae_path) == (None,) * 3
    # CLIP-G's pooled projection, which the checkpoint stores as OpenCLIP multiplies by it,
    # goes to the engine transposed in a file of its own (the engine keeps the last
    # tensor of a name): the checkpoint's q4_0 blocks, dequantized here by hand.
    assert whole.clip_g_path is not None
    with safe_open(whole.clip_g_path, "numpy") as hint_file:
        assert list(hint_file.keys()) == ["text_projection.weight"]
        given = hint_file.get_tensor("text_projection.weight")
    [stored] = [t for t in gguf.GGUFReader(sdxl_gguf).tensors if t.name == OPEN_CLIP_PROJECTION]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q4_0
    np.testing.assert_array_equal(given, _q4_0_values(np.asarray(stored.data), 1280).T)


OPEN_CLIP_PROJECTION = "conditioner.embedders.1.model.text_projection"


def test_the_projection_hint_transposes_a_safetensors_projection_and_skips_a_pickled_one(tmp_path: Path) -> None:
    import torch

    projection = np.arange(12, dtype=np.float32).reshape(3, 4)
    save_file({OPEN_CLIP_PROJECTION: projection.astype(np.float16)}, tmp_path / "sdxl.safetensors")
    hint = sdxl_projection_hint(tmp_path / "sdxl.safetensors", tmp_path / "hints")
    assert hint is not None and hint.parent == tmp_path / "hints"
    with safe_open(str(hint), "numpy") as hint_file:
        np.testing.assert_array_equal(hint_file.get_tensor("text_projection.weight"), projection.T)
    # The same projection gives the same file; a checkpoint without one needs none.
    assert sdxl_projection_hint(tmp_path / "sdxl.safetensors", tmp_path / "hints") == hint
    save_file({"conditioner.embedders.1.transformer.text_projection.weight": projection}, tmp_path / "hf.safetensors")
    assert sdxl_projection_hint(tmp_path / "hf.safetensors", tmp_path / "hints") is None
    # sfumato reads no pickled tensor data: a .ckpt keeps the engine's own reading.
    torch.save({"state_dict": {OPEN_CLIP_PROJECTION: torch.from_numpy(projection)}}, tmp_path / "sdxl.ckpt")
    assert sdxl_projection_hint(tmp_path / "sdxl.ckpt", tmp_path / "hints") is None


def _q4_0_values(raw: np.ndarray, cols: int) -> np.ndarray:
    """ggml's Q4_0 rows as float32: per 32 values an f16 scale d and 16 bytes whose low
    nibbles are values 0-15 and high nibbles 16-31, each d * (nibble - 8)."""
    blocks = raw.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:]
    nibbles = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32) - 8
    return (d * nibbles).reshape(-1, cols)


# --- the engine -------------------------------------------------------------


@pytest.mark.slow
def test_all_in_one_generates_from_the_sdk(sdxl_gguf: Path) -> None:
    model_id = sfumato.load_model(sdxl_gguf, model_config={"threads": 2})
    try:
        # The engine rounds UNet sizes up to a multiple of 64 (the VAE's 8 times
        # the UNet's 8) and would hand back another size than asked: refused first.
        with pytest.raises(errors.InvalidParameterError, match="multiple of 64") as caught:
            sfumato.diffusion(model_id, prompt="x", width=96, height=64)
        assert caught.value.field == "width"
        outputs, stats, ticks = run(model_id, width=128, height=64, steps=2)
        plain = decode_png(outputs[0])
        assert plain.shape == (64, 128, 3) and plain.std() > 0
        assert (stats.width, stats.height) == (128, 64)
        assert [t.step for t in ticks if t.phase == "sampling"][-1] == 2
        # Distilled settings: with cfg_scale 1 the engine runs no unconditional
        # pass, so the negative prompt cannot change the picture; with 7 it does.
        turbo = dict(sfumato.presets.SDXL_TURBO, width=64, height=64)
        a, _, _ = run(model_id, **turbo, negative_prompt="")
        b, _, _ = run(model_id, **turbo, negative_prompt="blurry, low quality")
        assert np.array_equal(decode_png(a[0]), decode_png(b[0]))
        guided = dict(turbo, cfg_scale=7.0)
        c, _, _ = run(model_id, **guided, negative_prompt="")
        d, _, _ = run(model_id, **guided, negative_prompt="blurry, low quality")
        assert not np.array_equal(decode_png(c[0]), decode_png(d[0]))
    finally:
        sfumato.unload_model(model_id)


@pytest.mark.slow
@pytest.mark.parametrize("unet", ["ssd-1b-unet", "vega-unet"])
def test_the_distilled_unets_run_with_sdxl_s_companions(
    sdxl_parts: dict[str, Path], sdxl_distilled_unets: dict[str, Path], unet: str
) -> None:
    # The engine builds SSD-1B's and Vega's shallower UNets from the blocks the file lacks;
    # were it to build SDXL's, the load would fail on the missing middle block.
    info = detect(sdxl_distilled_unets[unet])
    assert (info.family, info.split, info.variant) == (FAMILY_SDXL, True, None)
    model_id = sfumato.load_model(sdxl_distilled_unets[unet], model_config=_split_config(sdxl_parts))
    try:
        outputs, stats, _ = run(model_id, steps=1, cfg_scale=1.0)
    finally:
        sfumato.unload_model(model_id)
    picture = decode_png(outputs[0])
    assert picture.shape == (64, 64, 3) and picture.std() > 0 and stats.total_steps == 1


@pytest.mark.slow
def test_split_layout_generates_from_the_cli(sdxl_parts: dict[str, Path], tmp_path: Path) -> None:
    done = sfumato_cli(
        "generate", "--model", str(sdxl_parts["unet"]), "--clip-l", str(sdxl_parts["clip_l"]),
        "--clip-g", str(sdxl_parts["clip_g"]), "--vae", str(sdxl_parts["vae"]), "--threads", "2",
        "--preset", "sdxl-lightning-4step", "-W", "64", "-H", "64", "--steps", "2", "--seed", "5", "--quiet",
        "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = sorted(tmp_path.glob("sfumato_5_*.png"))
    assert len(pngs) == 1
    picture = decode_png(pngs[0].read_bytes())
    assert picture.shape == (64, 64, 3) and picture.std() > 0
    assert '"total_steps": 2' in done.stdout


def test_a_cli_preset_sets_defaults_that_flags_override() -> None:
    args = parse_args(["generate", "--preset", "sdxl-lightning-4step", "--steps", "2", "-W", "64"])
    assert (args.sampling_method, args.scheduler, args.cfg_scale) == ("euler", "sgm_uniform", 1.0)
    assert (args.steps, args.width, args.height) == (2, 64, 1024)
    plain = parse_args(["generate"])
    assert (plain.sampling_method, plain.steps) == (None, 20)
