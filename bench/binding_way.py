"""One way of driving the engine, in a process of its own, for the binding case.

``python -m bench.binding_way '<json>'`` loads the model the chosen ``way``
needs, makes one warm-up generation, prints ``READY <sha256 of its pixels>``,
then answers every ``run`` line on stdin with ``TIME <seconds>`` for one more
generation (ending in PNG bytes, as the SDK's does). Each way gets a process
like every other: none shares its address space, heap or threads with another
way's model, and all drive one library (the ctypes package's build), so what
differs between them is the binding alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

WAYS = ("sfumato.engine", "sfumato SDK (worker)", "stable-diffusion-cpp-python")


def _engine(config: dict[str, Any]) -> Callable[[], list[bytes]]:
    from sfumato.engine import ContextParams, DiffusionContext, ImageRequest
    from sfumato.images import encode_png

    request = ImageRequest(
        prompt=config["prompt"], width=config["size"], height=config["size"], steps=config["steps"], seed=config["seed"]
    )
    context = DiffusionContext(ContextParams(model_path=config["model"], n_threads=config["threads"]))
    return lambda: [encode_png(image) for image in context.generate(request).images]


def _sdk(config: dict[str, Any]) -> Callable[[], list[bytes]]:
    import sfumato

    model_id = sfumato.load_model(config["model"], model_config={"threads": config["threads"]})

    def run() -> list[bytes]:
        result = sfumato.diffusion(
            model_id,
            prompt=config["prompt"],
            width=config["size"],
            height=config["size"],
            steps=config["steps"],
            seed=config["seed"],
        )
        return result.outputs.result()

    return run


def _sdcpp_python(config: dict[str, Any]) -> Callable[[], list[bytes]]:
    import stable_diffusion_cpp

    from sfumato.images import encode_png

    model = stable_diffusion_cpp.StableDiffusion(model_path=config["model"], n_threads=config["threads"], verbose=False)

    def run() -> list[bytes]:
        # That package passes eta=0 unless told; the engine's own default for its
        # default sampler (euler_a) is 1, which sfumato leaves in place.
        images = model.generate_image(
            prompt=config["prompt"],
            width=config["size"],
            height=config["size"],
            sample_steps=config["steps"],
            seed=config["seed"],
            cfg_scale=7.0,
            eta=1.0,
        )
        return [encode_png(np.asarray(image.convert("RGB"))) for image in images]

    return run


def _ctypes_package_library() -> str:
    """The engine library inside ``stable-diffusion-cpp-python`` (its stock build)."""
    spec = importlib.util.find_spec("stable_diffusion_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "the binding case needs `pip install stable-diffusion-cpp-python==0.4.7` (sfumato's bench extra)"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "lib" / "libstable-diffusion.so")


def main() -> None:
    from sfumato.images import decode_png

    config = json.loads(sys.argv[1])
    # Every way drives the same library, the ctypes package's own build, so that what
    # differs between them is the binding alone (the SDK's worker inherits this).
    os.environ["SFUMATO_ENGINE_LIB"] = _ctypes_package_library()
    make = dict(zip(WAYS, (_engine, _sdk, _sdcpp_python), strict=True))[config["way"]]
    run = make(config)
    digest = hashlib.sha256(b"".join(decode_png(png).tobytes() for png in run())).hexdigest()
    print(f"READY {digest}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        started = time.perf_counter()
        run()
        print(f"TIME {time.perf_counter() - started:.6f}", flush=True)


if __name__ == "__main__":
    main()
