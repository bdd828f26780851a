"""The ``sfumato`` command, run as a real process on self-made models."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from safetensors.numpy import save_file

from sfumato.cli import main
from sfumato.cli.flags import DEFAULT_PROMPT, parse_args

from .helpers import SIZE, sfumato_cli


def _stats(stdout: str) -> dict[str, object]:
    return json.loads(stdout[stdout.index("{") :])  # type: ignore[no-any-return]


def test_info_reports_engine_library_and_devices() -> None:
    done = sfumato_cli("info", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["engine_version"] == "0.4.7"
    assert Path(info["library"]).is_file()
    assert "AVX" in info["system_info"] or "NEON" in info["system_info"]
    assert any(d["type"] == "cpu" for d in info["devices"])
    # sfumato's own kernels run in the CPU module this process chose (csrc/).
    assert info["kernels"] == {"choice": "sfumato", "running": info["modules"][0]["kernels"]}
    assert "conv_2d" in info["kernels"]["running"]
    text = sfumato_cli("info")
    assert "library:" in text.stdout and "devices:" in text.stdout


def test_generate_writes_pngs_and_prints_stats(sd1_tiny_gguf: Path, esrgan_1b: Path, tmp_path: Path) -> None:
    done = sfumato_cli(
        "generate", "a boat", "--model", str(sd1_tiny_gguf), "--width", str(SIZE), "--height", str(SIZE),
        "--steps", "2", "--seed", "11", "--batch-count", "2", "--threads", "2",
        "--upscaler", str(esrgan_1b), "--upscale", "--output", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["sfumato_11_0.png", "sfumato_11_1.png"]
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (4 * SIZE, 4 * SIZE)
    stats = _stats(done.stdout)
    assert stats["seed"] == 11 and stats["total_steps"] == 4 and stats["total_images"] == 2
    assert "sampling" in done.stderr  # the progress bar


def test_generate_img2img(sd1_tiny_gguf: Path, gradient_image: np.ndarray, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(gradient_image).save(source)
    out = tmp_path / "out"
    done = sfumato_cli(
        "generate", "-m", str(sd1_tiny_gguf), "-p", "oil paint", "--init-image", str(source), "--strength", "0.5",
        "--steps", "2", "--seed", "3", "--threads", "2", "-q", "-o", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert 1 <= _stats(done.stdout)["total_steps"] <= 2  # type: ignore[operator]
    assert len(list(out.glob("*.png"))) == 1


def test_generate_with_a_refiner(sd1_tiny_gguf: Path, sd2_gguf: Path, tmp_path: Path) -> None:
    common = ("-m", str(sd1_tiny_gguf), "-p", "a boat", "-W", str(SIZE), "-H", str(SIZE), "--steps", "4", "--seed", "8",
              "--threads", "2", "-q")  # fmt: skip
    done = sfumato_cli(
        "generate", *common, "--refiner", str(sd2_gguf), "--refiner-switch-at", "0.5", "-o", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    plain = sfumato_cli("generate", *common, "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    # Four base steps, then about half of four more on the refiner.
    assert 4 < _stats(done.stdout)["total_steps"] < 8 and _stats(plain.stdout)["total_steps"] == 4  # type: ignore[operator]
    refined, base = (np.asarray(Image.open(next(d.glob("*.png")))) for d in (tmp_path, tmp_path / "plain"))
    assert refined.shape == base.shape and not np.array_equal(refined, base)


def test_generate_timeout_stops_the_job(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    done = sfumato_cli(
        "generate", "-m", str(sd1_tiny_gguf), "-W", str(SIZE), "-H", str(SIZE), "--steps", "500", "--threads", "2",
        "--timeout", "2", "-q", "-o", str(tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    assert "sfumato: error: the job was cancelled (timeout)" in done.stderr
    assert list(tmp_path.glob("*.png")) == []


def test_ctrl_c_cancels_the_job_and_leaves_no_worker_behind(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "sfumato", "generate", "-m", str(sd1_tiny_gguf), "-W", str(SIZE), "-H", str(SIZE),
         "--steps", "500", "--threads", "2", "-o", str(tmp_path)],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert cli.stderr is not None
    seen = ""
    while "sampling" not in seen:  # the progress bar: the job runs in the worker
        line = cli.stderr.readline()
        assert line, f"the CLI ended before sampling: {seen}"
        seen += line
    workers = psutil.Process(cli.pid).children(recursive=True)
    assert workers, "the model runs in a worker process"
    os.killpg(cli.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, rest = cli.communicate(timeout=60)  # drains stderr: a full pipe would stall the CLI
    assert cli.returncode == 130
    assert "interrupted; the job was cancelled" in rest
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_ctrl_c_at_any_moment_ends_the_cli_with_130_and_no_worker(sd1_tiny_gguf: Path, tmp_path: Path) -> None:
    """Interrupts at random moments of a short job: while the model loads, in the first
    steps, while the VAE decodes, as it writes its files."""
    moments = random.Random(20261206)
    outcomes: list[int] = []
    for attempt in range(8):
        cli = subprocess.Popen(
            [sys.executable, "-m", "sfumato", "generate", "-m", str(sd1_tiny_gguf), "-W", str(SIZE), "-H", str(SIZE),
             "--steps", "6", "--threads", "2", "-o", str(tmp_path / str(attempt))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        workers: list[psutil.Process] = []
        while not workers and cli.poll() is None:  # the model starts loading in its worker
            workers = psutil.Process(cli.pid).children(recursive=True)
        time.sleep(moments.uniform(0.0, 2.5))
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGINT)
        out, err = cli.communicate(timeout=60)
        finished = cli.returncode == 0 and '"total_steps": 6' in out
        assert cli.returncode == 130 or finished, (attempt, cli.returncode, err[-2000:])
        if cli.returncode == 130:
            assert "interrupted; the job was cancelled" in err
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), attempt
        outcomes.append(cli.returncode)
    assert outcomes.count(130) >= 4, outcomes  # most of the moments fall inside the job


def test_upscale_command(esrgan_1b: Path, gradient_image: np.ndarray, tmp_path: Path) -> None:
    source = tmp_path / "small.png"
    Image.fromarray(gradient_image[:16, :16]).save(source)
    done = sfumato_cli("upscale", str(source), "--model", str(esrgan_1b), "--repeats", "2", "--threads", "2")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "small-upscaled.png") as image:
        assert image.size == (256, 256)


def test_the_prompt_is_a_positional_argument_or_a_flag_but_not_both() -> None:
    assert parse_args(["generate", "a cat", "-m", "m.gguf"]).prompt == "a cat"
    assert parse_args(["generate", "-m", "m.gguf", "a cat"]).prompt == "a cat"
    assert parse_args(["generate", "--prompt", "a dog"]).prompt == "a dog"
    assert parse_args(["generate"]).prompt == DEFAULT_PROMPT  # the demo prompt of a bare `sfumato generate`
    twice = sfumato_cli("generate", "a cat", "--prompt", "a dog")
    assert twice.returncode == 2
    assert "the prompt is given twice, as PROMPT and as --prompt" in twice.stderr


def test_errors_exit_2_with_the_message(tmp_path: Path) -> None:
    done = sfumato_cli("generate", "--model", str(tmp_path / "missing.gguf"))
    assert done.returncode == 2
    assert "sfumato: error: model_src: no file or folder" in done.stderr
    offline = subprocess.run(
        [sys.executable, "-m", "sfumato", "generate"], capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "SFUMATO_CACHE": str(tmp_path), "HOME": str(tmp_path)},
    )  # fmt: skip
    assert offline.returncode == 2
    assert "SD_V2_1_1B_Q8_0 is not in the model cache" in offline.stderr


def test_models_lists_a_folder_with_each_file_s_family(
    sd1_tiny_gguf: Path, sdxl_parts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tiny.gguf").symlink_to(sd1_tiny_gguf)
    (tmp_path / "xl-unet.gguf").symlink_to(sdxl_parts["unet"])
    (tmp_path / "notes.safetensors").write_bytes(b"not a model")
    save_file({"model.diffusion_model.cap_embedder.0.weight": np.zeros((2, 2), np.float16)}, tmp_path / "z.safetensors")
    save_file({"transformer_blocks.0.img_mod.1.weight": np.zeros((2, 2), np.float16)}, tmp_path / "qwen.safetensors")
    save_file({"blocks.0.cross_attn.norm_k.weight": np.zeros((2, 2), np.float16)}, tmp_path / "wan.safetensors")
    (tmp_path / "readme.txt").write_text("not listed")
    assert main(["models", str(tmp_path)]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert lines == {
        "notes.safetensors": "not loadable: not a model file (expected GGUF, safetensors or a PyTorch checkpoint)",
        "tiny.gguf": "SD 1.x",
        "xl-unet.gguf": "SDXL; needs clip_l_model_src, clip_g_model_src, vae_model_src",
        "z.safetensors": "Z-Image; needs llm_model_src, vae_model_src",
        "qwen.safetensors": "Qwen-Image; needs llm_model_src, vae_model_src",
        "wan.safetensors": "not loadable: a Wan 2.x video model; sfumato makes images, not video",
    }
    assert main(["models", str(tmp_path / "readme.txt")]) == 2
    assert "is not a folder" in capsys.readouterr().err
