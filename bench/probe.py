"""One measurement in a fresh process, so that its peak RSS is its own.

``python -m bench.probe '<json>'`` runs one configuration and prints one JSON
line: seconds per sampling step, seconds per VAE decode, load and total
seconds, and the process's peak RSS (``VmHWM``). Kinds:

- ``engine``: sfumato's in-process engine layer (``sfumato.engine``) on a model
  path, with the context options (``wtype``, ``flash_attn``, ``conv_direct``,
  ``threads``, ``taesd``: a tiny autoencoder's path, ``tae_preview_only``) and a
  txt2img request (``size``, ``steps``, ``batch``, ``preview``: a preview mode,
  ``preview_interval``); on the
  engine library ``engine_lib`` if given, else the installed one; ``env`` sets
  environment variables before the library opens (the backend modules and device).
- ``diffusers``: the reference pipeline (:class:`tests.support.reference.SDReference`,
  fp32, or its UNet and VAE in bf16 with ``dtype: "bf16"``) on a diffusers folder, with
  ``attention_slicing`` / ``channels_last``.
- Both of those save their first image as a ``.npy`` of uint8 pixels at ``image``, if given.
- ``family``: a model of any family with its ``model_config`` (companion files), loaded
  through sfumato's own detection and mapping, one txt2img run of ``steps`` at ``size``.
- ``upscale``: an ESRGAN on a ``size`` x ``size`` image with ``tile_size``.
- ``cancel``: a cancel mid-step through the SDK at ``size`` (``mode`` ``soft``: the
  worker stops the job and keeps the model; ``kill``: the fallback that ends the worker),
  then the next job: the cancel's latency, and the time to the next job's start and to
  its first step (medians of ``repeats``).
- ``ops_sfumato`` / ``ops_torch``: single operations of an SD step at 512 (:data:`OPS`),
  as the engine runs them on one CPU ``module`` (sfumato's kernels) or in PyTorch, fp32
  or ``bf16``: the best of 3 runs of each, in seconds.
- ``queue``: the job store's claims, no engine: ``jobs`` queued jobs on ``store``
  (a ``postgresql://`` URL, or ``None`` for SQLite in ``folder``) claimed and ended
  by ``connections`` threads, each a worker with a connection of its own.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "a lighthouse at dusk"
SEED = 7


def _peak_rss_mb() -> float:
    """This process's own high-water mark (``VmHWM``). ``ru_maxrss`` would not do:
    Linux keeps it across exec, so a child of a big parent starts at the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def engine(config: dict[str, Any]) -> dict[str, Any]:
    from sfumato.engine import ContextParams, DiffusionContext, ImageRequest
    from sfumato.engine.library import load_engine

    started = time.perf_counter()
    params = ContextParams(
        model_path=config["model"],
        n_threads=config["threads"],
        wtype=config.get("wtype"),
        flash_attn=config.get("flash_attn", False),
        diffusion_flash_attn=config.get("flash_attn", False),
        diffusion_conv_direct=config.get("conv_direct", False),
        vae_conv_direct=config.get("conv_direct", False),
        taesd_path=config.get("taesd"),
        tae_preview_only=config.get("tae_preview_only", False),
    )
    with DiffusionContext(params) as context:
        loaded = time.perf_counter()
        # Warm-up (one step at 64x64, like the diffusers probe): first-call set-up is not a step's cost.
        context.generate(ImageRequest(prompt=PROMPT, width=64, height=64, steps=1, seed=SEED))
        size, steps, batch = config["size"], config["steps"], config.get("batch", 1)
        request = ImageRequest(prompt=PROMPT, width=size, height=size, steps=steps, seed=SEED, batch_count=batch,
                               cfg_scale=7.0, preview=config.get("preview"),
                               preview_interval=config.get("preview_interval", 1))  # fmt: skip
        measured = time.perf_counter()
        out = context.generate(request)
        done = time.perf_counter()
    if config.get("image"):  # the first image, for comparisons between runs
        np.save(config["image"], out.images[0])
    choice = load_engine().cpu_choice  # this process's CPU variant
    return {
        "device": context.device,  # the engine's own report
        "cpu_variant": choice.variant if choice is not None else None,
        "step_s": out.phase_ms["sampling"] / 1000.0 / out.sampling_steps,
        "vae_s": out.phase_ms["vae"] / 1000.0 / batch,
        "conditioning_s": out.phase_ms.get("conditioning", 0.0) / 1000.0,
        "load_s": loaded - started,
        "generate_s": done - measured,
    }


def family(config: dict[str, Any]) -> dict[str, Any]:
    """A model of any family through sfumato's own loading path (detection, companion
    checks, the context it maps to), run in this process at ``size`` with the family's
    default ``cfg_scale``: load seconds, seconds per step and per phase."""
    from sfumato.engine import DiffusionContext, ImageRequest
    from sfumato.loading import context_params, diffusion_parts
    from sfumato.params import DEFAULT_CFG_SCALE, FAMILY_CFG_SCALE, parse_model_config

    started = time.perf_counter()
    model_config = parse_model_config(config["model_config"])
    path = Path(config["model"])
    parts = diffusion_parts(model_config, path)
    with DiffusionContext(context_params(model_config, path, parts, None, None)) as context:
        loaded = time.perf_counter()
        cfg = FAMILY_CFG_SCALE.get(parts.info.family, DEFAULT_CFG_SCALE)
        size = config["size"]
        out = context.generate(
            ImageRequest(prompt=PROMPT, width=size, height=size, steps=config["steps"], seed=SEED, cfg_scale=cfg)
        )
    return {
        "load_s": loaded - started,
        "step_s": out.phase_ms["sampling"] / 1000.0 / out.sampling_steps,
        "conditioning_s": out.phase_ms.get("conditioning", 0.0) / 1000.0,
        "vae_s": out.phase_ms["vae"] / 1000.0,
    }


def diffusers(config: dict[str, Any]) -> dict[str, float]:
    import torch
    from tests.support.reference import SDReference, sd_token_ids, torch_noise

    started = time.perf_counter()
    ref = SDReference(Path(config["model"]), threads=config["threads"])
    dtype = torch.bfloat16 if config.get("dtype") == "bf16" else torch.float32
    ref.unet.to(dtype)  # the text encoder stays fp32: its output is cast below
    ref.vae.to(dtype)
    if config.get("channels_last"):
        ref.unet.to(memory_format=torch.channels_last)
        ref.vae.to(memory_format=torch.channels_last)
    loaded = time.perf_counter()
    size, steps = config["size"], config["steps"]
    pipe = ref.pipeline(ref.scheduler())
    if config.get("attention_slicing"):
        pipe.enable_attention_slicing()
    ids = sd_token_ids("")
    # bf16: the UNet's and VAE's weights converted once (above), and autocast for the f32
    # tensors the pipeline's scheduler makes between steps.
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), cast:
        # Warm-up (one step at 64x64 and a decode, like the engine probe).
        pipe(
            prompt_embeds=ref.encode_ids(ids).to(dtype),
            negative_prompt_embeds=ref.encode_ids(ids).to(dtype),
            width=64,
            height=64,
            num_inference_steps=1,
            guidance_scale=7.0,
            output_type="np",
        )
        t0 = time.perf_counter()
        cond, uncond = ref.encode_ids(ids).to(dtype), ref.encode_ids(ids).to(dtype)
        t1 = time.perf_counter()
        latents = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            latents=torch_noise(SEED, (1, 4, size // 8, size // 8)).to(dtype),
            output_type="latent",
        ).images
        t2 = time.perf_counter()
        decoded = ref.vae.decode((latents / ref.vae.config.scaling_factor).to(dtype)).sample
        t3 = time.perf_counter()
    if config.get("image"):  # as diffusers' image processor makes uint8 pixels of it
        pixels = ((decoded[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
        np.save(config["image"], pixels.numpy())
    return {
        "step_s": (t2 - t1) / steps,
        "vae_s": t3 - t2,
        "conditioning_s": t1 - t0,
        "load_s": loaded - started,
        "generate_s": t3 - t0,
    }


def upscale(config: dict[str, Any]) -> dict[str, float]:
    from sfumato.engine import UpscalerContext

    started = time.perf_counter()
    with UpscalerContext(config["model"], n_threads=config["threads"], tile_size=config["tile_size"]) as ctx:
        loaded = time.perf_counter()
        rng = np.random.default_rng(SEED)
        image = rng.integers(0, 256, (config["size"], config["size"], 3), dtype=np.uint8)
        out = ctx.upscale(image)
        done = time.perf_counter()
    megapixels = out.shape[0] * out.shape[1] / 1e6
    return {"upscale_s": done - loaded, "load_s": loaded - started, "out_mp": megapixels}


def queue(config: dict[str, Any]) -> dict[str, float]:
    import threading

    from sfumato.server.jobs import open_store
    from sfumato.server.jobs.store import DONE

    def opened() -> Any:
        return open_store(config["store"], Path(config["folder"]) / "jobs.sqlite3", config["jobs"] + 1)

    filler = opened()
    for i in range(config["jobs"]):
        filler.add("txt2img", {"payload": {"i": i}}, "m")
    latencies: list[float] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        store, mine = opened(), []
        while True:
            began = time.perf_counter()
            job = store.claim(f"w{n}", ["m"], ["m"])
            mine.append(time.perf_counter() - began)
            if job is None:
                break
            store.end(job.id, DONE, result={}, claim=job.claim, images=[b"x" * 1024])
        store.close()
        with lock:
            latencies.extend(mine[:-1])  # the last one found the queue empty

    threads = [threading.Thread(target=work, args=(n,)) for n in range(config["connections"])]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    counts = filler.counts_by_state()
    filler.close()
    assert counts == {DONE: config["jobs"]}, counts  # each job claimed and ended once
    ms = np.array(latencies) * 1000
    return {"jobs_per_s": config["jobs"] / elapsed, "claim_p50_ms": float(np.percentile(ms, 50)),
            "claim_p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def cancel(config: dict[str, Any]) -> dict[str, float]:
    import dataclasses

    import sfumato
    from sfumato.api import _pool

    model = sfumato.load_model(config["model"], model_config={"threads": config["threads"]})
    size = config["size"]

    def first_step(result: Any) -> None:
        for tick in result.progress_stream:
            if tick.phase == "sampling":
                return

    figures: dict[str, list[float]] = {"cancel_s": [], "to_next_start_s": [], "to_next_step_s": []}
    for attempt in range(config.get("repeats", 2)):
        if config["mode"] == "kill":  # the fallback: the worker says it cannot stop a job itself
            worker = _pool.get(model)._worker
            assert worker is not None and worker.ready is not None
            worker.ready = dataclasses.replace(worker.ready, soft_cancel=False)
        running = sfumato.diffusion(model, prompt=PROMPT, width=size, height=size, steps=30, seed=SEED + attempt)
        first_step(running)
        asked = time.perf_counter()
        running.cancel()
        figures["cancel_s"].append(time.perf_counter() - asked)
        asked = time.perf_counter()
        following = sfumato.diffusion(model, prompt=PROMPT, width=size, height=size, steps=30, seed=SEED)
        while following.state == "queued":
            time.sleep(0.002)
        figures["to_next_start_s"].append(time.perf_counter() - asked)
        first_step(following)
        figures["to_next_step_s"].append(time.perf_counter() - asked)
        following.cancel()
    sfumato.unload_model(model)
    return {name: float(np.median(values)) for name, values in figures.items()}


# The single operations ``ops`` times: name -> (kind, shape). conv: batch, channels in,
# side, channels out (3x3, padding 1); linear: tokens, in, out; attention: heads,
# tokens, head size (self-attention).
OPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "conv 3x3 320->320 at 64x64, batch 2 (UNet, 512)": ("conv", (2, 320, 64, 320)),
    "conv 3x3 640->640 at 32x32, batch 2 (UNet, 512)": ("conv", (2, 640, 32, 640)),
    "conv 3x3 512->512 at 128x128 (VAE, 512)": ("conv", (1, 512, 128, 512)),
    "conv 3x3 128->128 at 512x512 (VAE, 512)": ("conv", (1, 128, 512, 128)),
    "linear 320->320, 8192 tokens": ("linear", (8192, 320, 320)),
    "linear 320->2560 (GEGLU), 8192 tokens": ("linear", (8192, 320, 2560)),
    "linear 1280->320, 8192 tokens": ("linear", (8192, 1280, 320)),
    "attention 16 heads x 4096 tokens x 40": ("attention", (16, 4096, 40)),
}


def op_flops(kind: str, shape: tuple[int, ...]) -> float:
    """Multiply-adds times two of one operation of :data:`OPS`."""
    if kind == "conv":
        n, ic, side, oc = shape
        return 2.0 * n * oc * ic * 9 * side * side
    if kind == "linear":
        tokens, c_in, c_out = shape
        return 2.0 * tokens * c_in * c_out
    heads, tokens, head = shape
    return 2.0 * 2 * heads * tokens * tokens * head


def _best_of(run: Any, repeats: int = 3) -> float:
    run()  # warm-up: threads, caches, packed weights
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def ops_sfumato(config: dict[str, Any]) -> dict[str, Any]:
    """Each of :data:`OPS` as the engine runs it on one CPU module (``module``), graph
    compute only: direct CONV_2D, MUL_MAT and FLASH_ATTN_EXT with f16 keys and values;
    ``bf16``: the bf16 mode, with bf16 weights."""
    from tests.support.kernels import _BF16, _F16, _F32, _PREC_F32, Module

    module = Module(Path(config["module"]), config["threads"])
    ffi, lib = module.ffi, module.lib
    module.kernels.sfumato_bf16_set_enabled(1 if config.get("bf16") else 0)
    weight_type, weight_dtype = (_BF16, np.uint16) if config.get("bf16") else (_F16, np.float16)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for name, (kind, shape) in OPS.items():
        params = ffi.new("struct ggml_init_params *")
        params.mem_size = lib.ggml_tensor_overhead() * 8 + lib.ggml_graph_overhead()
        params.no_alloc = True
        ctx = lib.ggml_init(params[0])
        if kind == "conv":
            n, ic, side, oc = shape
            w = lib.ggml_new_tensor_4d(ctx, weight_type, 3, 3, ic, oc)
            x = lib.ggml_new_tensor_4d(ctx, _F32, side, side, ic, n)
            inputs, result = [(w, weight_dtype), (x, np.float32)], lib.ggml_conv_2d_direct(ctx, w, x, 1, 1, 1, 1, 1, 1)
        elif kind == "linear":
            tokens, c_in, c_out = shape
            w = lib.ggml_new_tensor_4d(ctx, weight_type, c_in, c_out, 1, 1)
            x = lib.ggml_new_tensor_4d(ctx, _F32, c_in, tokens, 1, 1)
            inputs, result = [(w, weight_dtype), (x, np.float32)], lib.ggml_mul_mat(ctx, w, x)
        else:
            heads, tokens, head = shape
            q = lib.ggml_new_tensor_4d(ctx, _F32, head, tokens, heads, 1)
            k = lib.ggml_new_tensor_4d(ctx, _F16, head, tokens, heads, 1)
            v = lib.ggml_new_tensor_4d(ctx, _F16, head, tokens, heads, 1)
            result = lib.ggml_flash_attn_ext(ctx, q, k, v, ffi.NULL, head**-0.5, 0.0, 0.0)
            lib.ggml_flash_attn_ext_set_prec(result, _PREC_F32)
            inputs = [(q, np.float32), (k, np.float16), (v, np.float16)]
        graph = lib.ggml_new_graph(ctx)
        lib.ggml_build_forward_expand(graph, result)
        buffer = lib.ggml_backend_alloc_ctx_tensors(ctx, module.backend)
        for tensor, dtype in inputs:
            size = int(lib.ggml_nbytes(tensor))
            values = rng.standard_normal(size // np.dtype(dtype).itemsize).astype(np.float32) * 0.05
            data = (values.view(np.uint32) >> 16).astype(np.uint16) if dtype == np.uint16 else values.astype(dtype)
            lib.ggml_backend_tensor_set(tensor, ffi.from_buffer(data), 0, size)
        out[name] = _best_of(lambda: lib.ggml_backend_graph_compute(module.backend, graph))  # noqa: B023 - run at once
        lib.ggml_backend_buffer_free(buffer)
        lib.ggml_free(ctx)
    return {"seconds": out}


def ops_torch(config: dict[str, Any]) -> dict[str, Any]:
    """Each of :data:`OPS` in PyTorch (oneDNN's convolutions, its matmul, its fused
    scaled-dot-product attention), fp32 or with ``bf16`` tensors."""
    import torch

    torch.set_num_threads(config["threads"])
    dtype = torch.bfloat16 if config.get("bf16") else torch.float32
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, (kind, shape) in OPS.items():
            if kind == "conv":
                n, ic, side, oc = shape
                x, w = torch.randn(n, ic, side, side, dtype=dtype), torch.randn(oc, ic, 3, 3, dtype=dtype)
                out[name] = _best_of(lambda: torch.nn.functional.conv2d(x, w, padding=1))  # noqa: B023
            elif kind == "linear":
                tokens, c_in, c_out = shape
                x, w = torch.randn(tokens, c_in, dtype=dtype), torch.randn(c_out, c_in, dtype=dtype)
                out[name] = _best_of(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
            else:
                heads, tokens, head = shape
                q = torch.randn(1, heads, tokens, head, dtype=dtype)
                sdpa = torch.nn.functional.scaled_dot_product_attention
                out[name] = _best_of(lambda: sdpa(q, q, q))  # noqa: B023
    return {"seconds": out}


KINDS = {
    "engine": engine, "diffusers": diffusers, "upscale": upscale, "queue": queue, "cancel": cancel,
    "ops_sfumato": ops_sfumato, "ops_torch": ops_torch, "family": family,
}  # fmt: skip


def main() -> None:
    config = json.loads(sys.argv[1])
    if "engine_lib" in config:  # another build of the engine, chosen before the library opens
        os.environ["SFUMATO_ENGINE_LIB"] = config["engine_lib"]
    os.environ.update(config.get("env", {}))
    figures = KINDS[config["kind"]](config)
    figures["peak_rss_mb"] = _peak_rss_mb()
    print("PROBE " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
