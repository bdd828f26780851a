"""What ``sfumato serve`` runs with; every field has an embedded default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

CONFIG_NAME = "models.toml"
"""The models config read from the models folder when none is named."""

PreviewMethod = Literal["none", "auto", "latent2rgb", "taesd"]
"""ComfyUI's ``--preview-method`` names."""
PREVIEW_METHODS: tuple[PreviewMethod, ...] = get_args(PreviewMethod)


@dataclass(frozen=True)
class ServerSettings:
    """Attributes
    ----------
    host, port:
        Where to listen (loopback by default).
    models_dir, loras_dir, upscalers_dir:
        The folders models are chosen from, by name. A front end (``workers`` 0)
        whose models folder does not exist lists and checks against what the live
        workers register instead.
    embeddings_dir:
        Textual-inversion embeddings: each SD 1.x, SD 2.x and SDXL model loads
        the ones its text encoders take; a prompt uses one by saying its name.
    models_config:
        The models config (TOML): models made of several files, and per-model
        defaults. ``None`` reads ``models.toml`` in ``models_dir`` when it is there.
    vaes_dir:
        Separate VAE files a model can decode with instead of its own (A1111's
        ``sd_vae``, ComfyUI's ``VAELoader``).
    controlnets_dir:
        ControlNets that requests pair with a model by name (A1111's ``alwayson_scripts.controlnet``).
    data_dir:
        Where the job store (``jobs.sqlite3``) and the ``outputs/`` folder live.
    store:
        The job store: ``None`` for the SQLite file in ``data_dir``, or a
        ``postgresql://`` URL (``pip install "sfumato[postgres]"``).
    workers:
        How many workers run jobs inside the server: 1 (one job at a time, the
        models staying loaded), or 0 for a front end that only accepts and serves
        jobs that ``sfumato worker`` processes run (PostgreSQL only).
    lease_s:
        How long a worker's claim on a job holds without its heartbeat (every
        third of it); a job whose lease runs out is queued again.
    jobs_per_device:
        How many jobs a worker runs at once on its device. 1 (the default): on a
        CPU two jobs at once share the same cores and run no faster, and each
        holds its memory; run one worker per device to use several.
    device:
        The device models run on (``model_config.device``: ``auto``, ``cpu``, ``gpu``
        or an engine device name); a models config's ``device`` key overrides it per model.
    precision:
        The CPU kernels' arithmetic for the models (``model_config.precision``:
        ``exact`` or ``bf16``); a models config's ``precision`` key overrides it per model.
    default_model:
        The model used when a request names none (default: the first one listed).
    queue_size:
        How many jobs may be queued or running at once; more get 409.
    api_key:
        When set, every route but ``/hello`` needs it: ``Authorization: Bearer <key>``, or
        HTTP Basic with the key as the password (as A1111 clients send it).
    retention_s:
        How long finished jobs and their images are kept.
    max_body_bytes, max_prompt_chars:
        Request limits.
    max_pixels, max_steps, max_images:
        Job limits: the largest width x height of one image, the most sampling
        steps, the most images one request may ask for.
    allow_private_urls, fetch_timeout_s, fetch_max_bytes:
        How ``url_upload`` images are fetched: loopback, private and link-local
        addresses are refused unless allowed; a slower or larger answer fails.
    threads:
        CPU threads per model (``None``: the engine's count of physical cores).
    preview_method:
        Live previews of the ComfyUI API's prompts, as ComfyUI's ``--preview-method``:
        ``none``, ``latent2rgb`` (the latent projected), or ``taesd`` and ``auto`` (the
        model's tiny autoencoder, its ``NAME.taesd.safetensors`` sidecar, when it has
        one; else the projection).
    """

    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: Path = Path("models")
    loras_dir: Path = Path("loras")
    upscalers_dir: Path = Path("upscalers")
    embeddings_dir: Path = Path("embeddings")
    controlnets_dir: Path = Path("controlnets")
    vaes_dir: Path = Path("vaes")
    models_config: Path | None = None
    data_dir: Path = Path("sfumato-data")
    store: str | None = None
    workers: int = 1
    lease_s: float = 30.0
    jobs_per_device: int = 1
    device: str = "auto"
    precision: str = "exact"
    default_model: str | None = None
    queue_size: int = 64
    api_key: str | None = None
    retention_s: float = 7 * 24 * 3600.0
    max_body_bytes: int = 32 * 2**20
    max_prompt_chars: int = 4000
    max_pixels: int = 2048 * 2048
    max_steps: int = 150
    max_images: int = 16
    allow_private_urls: bool = False
    fetch_timeout_s: float = 15.0
    fetch_max_bytes: int = 16 * 2**20
    threads: int | None = None
    preview_method: PreviewMethod = "none"

    @property
    def models_config_path(self) -> Path:
        """The models config read: ``models_config``, else ``models.toml`` in the models folder."""
        return self.models_config if self.models_config is not None else self.models_dir / CONFIG_NAME

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def inputs_dir(self) -> Path:
        """Images uploaded for the ComfyUI API's LoadImage nodes."""
        return self.data_dir / "inputs"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"
