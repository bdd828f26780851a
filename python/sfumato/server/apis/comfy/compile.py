"""ComfyUI's API-format prompts (``{node_id: {"class_type", "inputs"}}``) compiled
into one :class:`~sfumato.server.jobs.plan.JobPlan`.

The graph is walked back from its output nodes (``SaveImage``, ``PreviewImage``).
Every node type sfumato runs has a :class:`Node` spec: its inputs, with ComfyUI's
types, defaults and bounds, and its outputs; ``object_info`` lists the specs.
Evaluating a node gives symbolic values (a checkpoint, a prompt, a latent to
sample, a decoded image), and the images the outputs save become one generation
or one upscale, checked by the same :func:`~sfumato.server.planning.job_plan` as
every other API's requests. Whatever cannot run is refused with ComfyUI's
``node_errors``, naming the node and the input; nothing is replaced silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sfumato.errors import InvalidParameterError
from sfumato.params import DiffusionParams
from sfumato.server.apis.comfy.nodes import NODES
from sfumato.server.apis.comfy.runs import RUNS
from sfumato.server.apis.comfy.values import Decoded, Picture, Upscaled
from sfumato.server.apis.comfy.walk import GraphError, NodeFailedError, Walk, node_error
from sfumato.server.jobs.plan import JobPlan, Upscale
from sfumato.server.models import names
from sfumato.server.planning import job_plan
from sfumato.server.state import ServerState

# --- the compiled prompt ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    """A prompt as the server runs it: the plan, and the nodes that progress messages name."""

    plan: JobPlan
    outputs: tuple[str, ...]  # the output nodes, in the prompt's order
    loader: str  # the node that loads the model
    sampler: str | None  # the node that samples (None for an upscale)
    decoder: str | None
    class_types: dict[str, str]
    upscaler: str | None = None  # the node upscaling the generation


def compile_prompt(state: ServerState, graph: object) -> Compiled:
    """The job of a ComfyUI prompt.

    Raises
    ------
    GraphError
        With ComfyUI's ``error`` and ``node_errors``.
    """
    if not isinstance(graph, Mapping) or not graph:
        raise GraphError("invalid_prompt", "The prompt must be a non-empty object of nodes")
    graph = {str(k): v for k, v in graph.items()}
    walk = Walk(state, graph, RUNS)
    class_types = {node_id: walk.class_of(node_id) for node_id in graph}
    unknown = {node_id: kind for node_id, kind in class_types.items() if kind not in NODES}
    if unknown:
        runs = f"sfumato runs: {', '.join(NODES)}"
        errors = {
            node_id: {
                "errors": [node_error("missing_node_type", f"Node type {kind!r} is not one sfumato runs", runs, None)],
                "dependent_outputs": [],
                "class_type": kind,
            }
            for node_id, kind in unknown.items()
        }
        first = next(iter(unknown.items()))
        raise GraphError(
            "missing_node_type", f"Node type {first[1]!r} (node {first[0]}) is not one sfumato runs", errors
        )
    outputs = [node_id for node_id, kind in class_types.items() if NODES[kind].output_node]
    if not outputs:
        raise GraphError("prompt_no_outputs", "Prompt has no outputs", details="add a SaveImage or PreviewImage node")
    images: dict[str, Any] = {}
    for node_id in outputs:
        try:
            images[node_id] = walk.node(node_id)[0]
        except NodeFailedError:
            pass
    first_image = next(iter(images.values()), None)
    for node_id, image in images.items():
        if image is not first_image:
            walk.refuse(node_id, "images", "sfumato runs one image chain per prompt; save the same images")
        elif not isinstance(image, (Decoded, Upscaled)):
            walk.refuse(node_id, "images", "nothing is generated: save a VAEDecode's or an upscale's images")
    _raise_for(walk, outputs)
    upscaled = first_image if isinstance(first_image, Upscaled) else None
    if upscaled is not None and isinstance(upscaled.image, Picture):
        work = Upscale(image=upscaled.image.data, repeats=upscaled.repeats)
        plan = JobPlan(model=upscaled.upscaler.name, work=work)
        return Compiled(plan, tuple(outputs), upscaled.upscaler.node, None, None, class_types)
    decoded = upscaled.image if upscaled is not None else first_image
    assert isinstance(decoded, Decoded) and decoded.latent.sampled is not None
    sampling = decoded.latent.sampled
    generation = _generation(state, decoded, walk, upscaled)
    _raise_for(walk, outputs)
    assert generation is not None
    return Compiled(
        generation,
        tuple(outputs),
        sampling.model.node,
        sampling.node,
        decoded.node,
        class_types,
        upscaled.node if upscaled is not None else None,
    )


def _raise_for(walk: Walk, outputs: list[str]) -> None:
    """ComfyUI's 400 for the errors the walk recorded, if any."""
    if walk.errors:
        for entry in walk.errors.values():
            entry["dependent_outputs"] = outputs
        raise GraphError("prompt_outputs_failed_validation", "Prompt outputs failed validation", walk.errors)


def _preview(state: ServerState, checkpoint: str) -> str | None:
    """The SDK's ``preview`` for ``--preview-method``, as ComfyUI reads it: ``taesd``
    (and ``auto``) use the model's tiny autoencoder when it has one, else the projection."""
    method = state.settings.preview_method
    if method == "none":
        return None
    entry = next((e for e in state.catalog.models() if e.name == checkpoint), None)
    tiny = entry is not None and entry.taesd is not None
    return "tae" if tiny and method in ("taesd", "auto") else "proj"


def _generation(state: ServerState, decoded: Decoded, walk: Walk, upscaled: Upscaled | None) -> JobPlan | None:
    """The checked plan of a decoded sampling (and its ESRGAN passes, when ``upscaled``);
    ``None`` with the error recorded on its node."""
    latent = decoded.latent
    s = latent.sampled
    assert s is not None
    clip = s.positive.clip
    size_node, size_input = latent.size_from
    origin: dict[str, tuple[str, str]] = {
        "prompt": (s.positive.node, s.positive.text_input),
        "width": latent.size_from,
        "height": (size_node, "height" if size_input == "width" else size_input),
        "batch_count": (size_node, "batch_size"),
        "model": (s.model.node, s.model.input),
        **s.origin,
    }
    if s.negative is not None:
        origin["negative_prompt"] = (s.negative.node, s.negative.text_input)
    if clip.clip_skip_node is not None:
        origin["clip_skip"] = (clip.clip_skip_node, "stop_at_clip_layer")
    if s.positive.guidance_node is not None:
        origin["guidance"] = (s.positive.guidance_node, "guidance")
    if s.model.flow_shift_node is not None:
        origin["flow_shift"] = (s.model.flow_shift_node, "shift")
    for i, lora in enumerate(s.model.loras):
        origin[f"loras[{i}]"] = (lora.node, "lora_name")
    if latent.init is not None:
        origin["init_image"] = (latent.init.node, "image")
    if latent.mask is not None:
        origin["mask"] = (latent.mask.node, "image")
    if s.positive.reference_node is not None:
        origin["init_images"] = (s.positive.reference_node, s.positive.reference_input)
    edit = s.positive.edit
    if s.positive.edit_node is not None:
        origin["init_images"] = (s.positive.edit_node, "pixels")
    params = DiffusionParams(
        prompt=s.positive.text,
        negative_prompt=s.negative.text if s.negative else "",
        width=latent.width,
        height=latent.height,
        steps=s.steps,
        cfg_scale=s.cfg,
        guidance=s.positive.guidance if s.positive.guidance is not None else DiffusionParams.guidance,
        sampling_method=names.COMFY_SAMPLERS[s.sampler],
        scheduler=names.COMFY_SCHEDULERS[s.scheduler],
        seed=s.seed,
        batch_count=latent.batch,
        init_image=latent.init.data if latent.init else None,
        mask=latent.mask.png if latent.mask else None,
        init_images=[picture.data for picture in (*s.positive.references, *((edit,) if edit else ()))],
        img_cfg_scale=s.img_cfg,
        flow_shift=s.model.flow_shift,
        strength=s.denoise if latent.init is not None else DiffusionParams.strength,
        loras=[{"name": lora.name, "scale": lora.scale} for lora in s.model.loras],
        clip_skip=clip.clip_skip,
        preview=_preview(state, s.model.checkpoint),
        upscale={"repeats": upscaled.repeats} if upscaled is not None else None,
    )
    if decoded.vae.file is not None:
        origin["vae"] = (decoded.vae.node, "vae_name")
    if upscaled is not None:
        origin["upscale"] = (upscaled.upscaler.node, "model_name")
    esrgan = upscaled.upscaler.name if upscaled is not None else None
    try:
        return job_plan(state, params, model=s.model.checkpoint, vae=decoded.vae.file, esrgan=esrgan)
    except InvalidParameterError as exc:
        node, input_name = origin.get(exc.field, (s.node, exc.field))
        walk.refuse(node, input_name, exc.message)
        return None
