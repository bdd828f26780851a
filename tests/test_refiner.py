"""The refiner: a second pass on another loaded model, as the job-queue API's
``refiner_checkpoint`` / ``refiner_switch_at``. The engine runs both passes;
the mechanism is the same for every family, so the fast SD layouts stand in
for SDXL base and refiner (an SD 2.x file refines an SD 1.x one here)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import sfumato
from sfumato.images import decode_png

from .helpers import SIZE, run


@pytest.fixture(scope="module")
def refiner_model(sd2_gguf: Path) -> Iterator[str]:
    model_id = sfumato.load_model(sd2_gguf, model_config={"threads": 2})
    yield model_id
    sfumato.unload_model(model_id)


def test_the_refiner_pass_is_img2img_on_the_refiner_from_the_base_image(sd1_model: str, refiner_model: str) -> None:
    base, base_stats, _ = run(sd1_model, steps=4, seed=11)
    refined, stats, ticks = run(sd1_model, steps=4, seed=11, refiner={"model_id": refiner_model, "switch_at": 0.5})
    # The same as doing it by hand: the refiner model, the base image, strength 1 - switch_at, the same seed.
    by_hand, hand_stats, _ = run(refiner_model, steps=4, seed=11, init_image=base[0], strength=0.5)
    assert np.array_equal(decode_png(refined[0]), decode_png(by_hand[0]))
    assert not np.array_equal(decode_png(refined[0]), decode_png(base[0]))
    phases = [t.phase for t in ticks]
    assert "refiner" in phases and phases.index("refiner") > phases.index("sampling")
    assert stats.total_steps == base_stats.total_steps + hand_stats.total_steps
    assert (stats.width, stats.height, stats.seed) == (SIZE, SIZE, 11)


def test_switching_at_the_end_skips_the_refiner(sd1_model: str, refiner_model: str) -> None:
    base, _, _ = run(sd1_model, seed=12)
    same, _, ticks = run(sd1_model, seed=12, refiner={"model_id": refiner_model, "switch_at": 1.0})
    assert np.array_equal(decode_png(same[0]), decode_png(base[0]))
    assert "refiner" not in {t.phase for t in ticks}


def test_each_image_of_a_batch_is_refined_and_upscales_run_last(sd1_model: str, refiner_model: str) -> None:
    outputs, stats, _ = run(
        sd1_model, seed=13, batch_count=2, upscale=True, refiner={"model_id": refiner_model, "switch_at": 0.6}
    )
    assert [decode_png(png).shape for png in outputs] == [(SIZE * 4, SIZE * 4, 3)] * 2
    assert (stats.width, stats.height, stats.total_pixels) == (SIZE * 4, SIZE * 4, 2 * (SIZE * 4) ** 2)
    # Image i is the refinement of base image i (seed + i).
    second, _, _ = run(sd1_model, seed=14, upscale=True, refiner={"model_id": refiner_model, "switch_at": 0.6})
    assert np.array_equal(decode_png(outputs[1]), decode_png(second[0]))


def test_cancel_during_the_refiner_pass(sd1_model: str, refiner_model: str) -> None:
    result = sfumato.diffusion(
        sd1_model, prompt="x", width=SIZE, height=SIZE, steps=2, seed=15,
        refiner={"model_id": refiner_model, "switch_at": 0.1},
    )  # fmt: skip
    seen = threading.Event()

    def watch() -> None:
        for tick in result.progress_stream:
            if tick.phase == "refiner":
                seen.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    assert seen.wait(120), "the refiner pass never started"
    assert result.cancel()
    assert result.state == "cancelled"
    with pytest.raises(sfumato.JobCancelledError):
        result.outputs.result(timeout=60)
    # Both models still serve.
    assert run(sd1_model)[0] and run(refiner_model)[0]


def test_refiner_fields_are_validated(sd1_model: str, upscaler_model: str) -> None:
    cases = [
        ({"model_id": "nope"}, "refiner.model_id", "no loaded model"),
        ({"model_id": upscaler_model}, "refiner.model_id", "mode='upscale'"),
        ({"model_id": sd1_model, "switch_at": 1.5}, "refiner.switch_at", "between 0.0 and 1.0"),
        ({"model": sd1_model}, "refiner", "unknown key"),
        ("a-model", "refiner", "must be a mapping"),
    ]
    for value, field, says in cases:
        with pytest.raises(sfumato.InvalidParameterError, match=says) as caught:
            sfumato.diffusion(sd1_model, prompt="x", width=SIZE, height=SIZE, refiner=value)  # type: ignore[arg-type]
        assert caught.value.field == field
