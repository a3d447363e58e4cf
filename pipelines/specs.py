"""The models gen knows, as data: ``ModelSpec``, ``MODELS``, name lookup, geometry rules.

``MODELS`` maps a short name (``"wan2.1-t2v-1.3b"``, ``"tiny-wan"``, ...) to a frozen
``ModelSpec``: the diffusers pipeline class, the Hub repository of the diffusers-format
weights (``None`` for the tiny offline models), default geometry and sampling settings,
the VAE scale factors and patch size (so a spec gives the token grid and the
``TokenLayout`` of a render at any size), and the geometry rules.

Sizes are pixels and frames; every listed model takes height and width in multiples of
16 (8x VAE times 2x2 patches) and video frames of the form 4k+1 (4x temporal VAE).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["MODELS", "ModelSpec", "check_geometry", "get_spec", "parse_dtype"]

Family = Literal["wan", "hunyuan", "flux"]
Task = Literal["t2v", "i2v", "t2i"]


@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry.

    Attributes:
        name: registry key, e.g. ``"wan2.1-t2v-1.3b"``.
        family: ``"wan"``, ``"hunyuan"`` or ``"flux"`` (which attention processors apply).
        task: ``"t2v"`` text-to-video, ``"i2v"`` image-to-video, ``"t2i"`` text-to-image.
        pipeline_class: diffusers pipeline class name, e.g. ``"WanPipeline"``.
        repo_id: Hub repository with the diffusers-format weights; ``None`` for tiny models.
        height: default height in pixels.
        width: default width in pixels.
        frames: default frame count (1 for image models).
        steps: default number of denoising steps.
        guidance: default ``guidance_scale``.
        guidance_embedded: True when ``guidance`` is an input of a guidance-distilled
            transformer (HunyuanVideo, FLUX.1-dev): one transformer pass per step. False
            when it is classifier-free guidance (Wan: two passes per step when
            ``guidance > 1``) or unused (FLUX.1-schnell).
        fps: frames per second of the saved video (0 for image models).
        dtype: parameter dtype name to load in, e.g. ``"bfloat16"``.
        fp32_components: components kept in float32 whatever ``dtype`` is (Wan's VAE and
            CLIP image encoder, as the Wan 2.1 release runs them).
        vae_scale: the VAE's spatial downsampling (pixels per latent row or column).
        patch_size: latent rows (and columns) per token: the transformer's patchify
            (Wan, HunyuanVideo) or the pipeline's 2x2 packing (FLUX). Height and width
            must be multiples of ``spatial_multiple = vae_scale * patch_size`` pixels.
        temporal_multiple: the VAE's temporal compression: frames must be
            ``temporal_multiple * k + 1``; 0 for image models, which take exactly 1 frame.
            A latent frame is one token frame (temporal patch 1 in every listed model).
        heads: attention heads of the transformer (for per-head mask pictures).
        head_dim: channels per attention head (for synthetic attention inputs).
        bundled: folder name under ``gen/pipelines/weights/`` of a model whose trained
            weights ship with gen (``shapes-wan``); None for the others.
        prompt: an example prompt the model knows (benchmarks render it by default).
        text_tokens: text tokens per attention call at the pipeline's default
            ``max_sequence_length`` (Wan: cross-attention only; HunyuanVideo: joint, after
            the video; FLUX: joint, before the image).
        description: one line for listings.
    """

    name: str
    family: Family
    task: Task
    pipeline_class: str
    repo_id: str | None
    height: int
    width: int
    frames: int
    steps: int
    guidance: float
    guidance_embedded: bool
    fps: int
    dtype: str
    fp32_components: tuple[str, ...] = ()
    vae_scale: int = 8
    patch_size: int = 2
    temporal_multiple: int = 4
    text_tokens: int = 512
    heads: int = 2
    head_dim: int = 16
    bundled: str | None = None
    prompt: str = "a red panda walking through a snowy forest, cinematic"
    description: str = ""

    @property
    def is_tiny(self) -> bool:
        """True for the offline random-weight models (no ``repo_id``, nothing bundled)."""
        return self.repo_id is None and self.bundled is None

    @property
    def is_bundled(self) -> bool:
        """True for the small trained models whose weights ship with gen."""
        return self.bundled is not None

    @property
    def is_local(self) -> bool:
        """True for every model that loads on any machine and runs on a CPU (tiny or bundled)."""
        return self.repo_id is None

    @property
    def is_video(self) -> bool:
        """True for text- and image-to-video models."""
        return self.task != "t2i"

    @property
    def takes_negative_prompt(self) -> bool:
        """True where a negative prompt reaches the render: the video pipelines (Wan,
        HunyuanVideo) guide against it. FLUX is guidance-distilled (one pass per step);
        its pipeline would use one only with ``true_cfg_scale > 1``, a second pass per step
        that gen does not ask for, so the demo hides the box and the run core drops it."""
        return self.is_video

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return parse_dtype(self.dtype)

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this many pixels: one token's side."""
        return self.vae_scale * self.patch_size

    @property
    def adapter(self):
        """The family's ``FamilyAdapter`` (``gen.attention.processors``; imports no diffusers)."""
        from gen.attention.processors.adapter import get_adapter

        return get_adapter(self.family)

    @property
    def label(self) -> str:
        """The family's name in messages, e.g. ``"HunyuanVideo"``."""
        return self.adapter.label

    def _size(self, height: int | None, width: int | None, frames: int | None) -> tuple[int, int, int]:
        return (self.height if height is None else height, self.width if width is None else width,
                self.frames if frames is None else frames)

    def latent_grid(
        self, height: int | None = None, width: int | None = None, frames: int | None = None
    ) -> tuple[int, int, int]:
        """``(frames, rows, cols)`` of the VAE latent of a render (pixels and frames;
        defaults: the spec's). E.g. Wan 480x832x81 -> ``(21, 60, 104)``."""
        height, width, frames = self._size(height, width, frames)
        t = (frames - 1) // self.temporal_multiple + 1 if self.temporal_multiple else 1
        return (t, height // self.vae_scale, width // self.vae_scale)

    def token_grid(
        self, height: int | None = None, width: int | None = None, frames: int | None = None
    ) -> tuple[int, int, int]:
        """``(frames, rows, cols)`` of video/image tokens per attention call after VAE and patchify.

        Defaults to the spec's geometry. E.g. Wan 480x832x81 -> ``(21, 30, 52)``.
        """
        t, rows, cols = self.latent_grid(height, width, frames)
        return (t, rows // self.patch_size, cols // self.patch_size)

    def layout(self, height: int | None = None, width: int | None = None, frames: int | None = None):
        """The ``TokenLayout`` of the attention calls gen patches in a render at
        ``height x width`` pixels and ``frames`` frames (defaults: the spec's): the token
        grid plus the text where the family adapter puts it (Wan self-attention: none;
        HunyuanVideo: last; FLUX: first), ``text_tokens`` long. Equals the layout the
        geometry hook reads from such a render's transformer calls.

        Raises:
            ValueError: a size the model cannot take (as :func:`check_geometry`).
        """
        height, width, frames = self._size(height, width, frames)
        check_geometry(self, height, width, frames)
        return self.adapter.layout(self.token_grid(height, width, frames), self.text_tokens)


_WAN_REAL = dict(
    family="wan", frames=81, steps=50, guidance=5.0, guidance_embedded=False, fps=16,
    dtype="bfloat16", text_tokens=512,
)  # fmt: skip
_TINY = dict(steps=2, dtype="float32", repo_id=None)
# shapes-wan sampling defaults: what `gen eval-tiny` scores and README reports.
SHAPES_STEPS = 25
SHAPES_GUIDANCE = 5.0
_SHAPES = dict(
    family="wan", task="t2v", pipeline_class="WanPipeline", repo_id=None, height=128, width=128, frames=17,
    steps=SHAPES_STEPS, guidance=SHAPES_GUIDANCE, guidance_embedded=False, fps=8, dtype="float32",
    text_tokens=512, heads=4, head_dim=32, prompt="a red circle moving right on a blue background",
)  # fmt: skip

_SPECS: tuple[ModelSpec, ...] = (
    # -- tiny offline models (random weights; see gen.pipelines.tiny) ----------------------
    ModelSpec(
        name="tiny-wan", family="wan", task="t2v", pipeline_class="WanPipeline",
        height=128, width=128, frames=17, guidance=5.0, guidance_embedded=False, fps=8,
        text_tokens=512, **_TINY,
        description="Tiny random Wan 2.1 T2V (2 layers, 2 heads x 16): 5x8x8 = 320 video tokens",
    ),
    ModelSpec(
        name="tiny-wan-i2v", family="wan", task="i2v", pipeline_class="WanImageToVideoPipeline",
        height=128, width=128, frames=17, guidance=5.0, guidance_embedded=False, fps=8,
        text_tokens=512, **_TINY,
        description="Tiny random Wan 2.1 I2V with the image-context branch: 320 video tokens",
    ),
    ModelSpec(
        name="tiny-hunyuan", family="hunyuan", task="t2v", pipeline_class="HunyuanVideoPipeline",
        height=128, width=128, frames=17, guidance=6.0, guidance_embedded=True, fps=8,
        text_tokens=256, **_TINY,
        description="Tiny random HunyuanVideo (1 dual + 1 single block): 320 video + 256 text tokens",
    ),
    ModelSpec(
        name="tiny-flux", family="flux", task="t2i", pipeline_class="FluxPipeline",
        height=256, width=256, frames=1, guidance=3.5, guidance_embedded=True, fps=0,
        temporal_multiple=0, text_tokens=512, **_TINY,
        description="Tiny random FLUX.1 (1 dual + 1 single block): 512 text + 256 image tokens",
    ),
    # -- small trained models, weights shipped with gen (see gen.pipelines.shapes) --------
    ModelSpec(
        name="shapes-wan", bundled="shapes-wan", **_SHAPES,
        description="Wan 2.1 T2V trained by gen on procedural shape clips (4 layers, 4 heads x 32): 320 video tokens",
    ),
    ModelSpec(
        name="shapes-wan-causal", bundled="shapes-wan-causal", **_SHAPES,
        description="shapes-wan fine-tuned block-causal (3-frame chunks, noise per chunk) for gen long",
    ),
    # -- real checkpoints (diffusers format) ------------------------------------------------
    ModelSpec(
        name="wan2.1-t2v-1.3b", task="t2v", pipeline_class="WanPipeline",
        repo_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", height=480, width=832,
        fp32_components=("vae",), heads=12, head_dim=128, **_WAN_REAL,
        description="Wan 2.1 text-to-video 1.3B, 480p (12 heads x 128, 30 layers)",
    ),
    ModelSpec(
        name="wan2.1-t2v-14b", task="t2v", pipeline_class="WanPipeline",
        repo_id="Wan-AI/Wan2.1-T2V-14B-Diffusers", height=720, width=1280,
        fp32_components=("vae",), heads=40, head_dim=128, **_WAN_REAL,
        description="Wan 2.1 text-to-video 14B, 720p (40 heads x 128, 40 layers)",
    ),
    ModelSpec(
        name="wan2.1-i2v-14b-480p", task="i2v", pipeline_class="WanImageToVideoPipeline",
        repo_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", height=480, width=832,
        fp32_components=("vae", "image_encoder"), heads=40, head_dim=128, **_WAN_REAL,
        description="Wan 2.1 image-to-video 14B, 480p (CLIP image context + first-frame latent)",
    ),
    ModelSpec(
        name="wan2.1-i2v-14b-720p", task="i2v", pipeline_class="WanImageToVideoPipeline",
        repo_id="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", height=720, width=1280,
        fp32_components=("vae", "image_encoder"), heads=40, head_dim=128, **_WAN_REAL,
        description="Wan 2.1 image-to-video 14B, 720p (CLIP image context + first-frame latent)",
    ),
    ModelSpec(
        name="hunyuanvideo", family="hunyuan", task="t2v", pipeline_class="HunyuanVideoPipeline",
        repo_id="hunyuanvideo-community/HunyuanVideo", height=720, width=1280, frames=129,
        steps=50, guidance=6.0, guidance_embedded=True, fps=24, dtype="bfloat16", text_tokens=256, heads=24, head_dim=128,
        description="HunyuanVideo 13B text-to-video, 720p (24 heads x 128, 20 dual + 40 single blocks)",
    ),
    ModelSpec(
        name="flux.1-dev", family="flux", task="t2i", pipeline_class="FluxPipeline",
        repo_id="black-forest-labs/FLUX.1-dev", height=1024, width=1024, frames=1, steps=28,
        guidance=3.5, guidance_embedded=True, fps=0, dtype="bfloat16", temporal_multiple=0,
        text_tokens=512, heads=24, head_dim=128,
        description="FLUX.1 [dev] 12B text-to-image, guidance-distilled (gated repository)",
    ),
    ModelSpec(
        name="flux.1-schnell", family="flux", task="t2i", pipeline_class="FluxPipeline",
        repo_id="black-forest-labs/FLUX.1-schnell", height=1024, width=1024, frames=1, steps=4,
        guidance=0.0, guidance_embedded=False, fps=0, dtype="bfloat16", temporal_multiple=0,
        text_tokens=512, heads=24, head_dim=128,
        description="FLUX.1 [schnell] 12B text-to-image, 4-step timestep-distilled (no guidance)",
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
"""Every known model by name: the 4 tiny offline models first, then the real checkpoints."""

assert len(MODELS) == len(_SPECS), "duplicate model names"


# -- lookup and geometry --------------------------------------------------------------------


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """The ``ModelSpec`` called ``name`` (case-insensitive; a ``ModelSpec`` passes through).

    Raises:
        ValueError: unknown name; the message lists the valid names and the closest one.
    """
    if isinstance(name, ModelSpec):
        return name
    key = str(name).strip().lower()
    if key in MODELS:
        return MODELS[key]
    close = difflib.get_close_matches(key, list(MODELS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} Valid names: {', '.join(MODELS)}.")


def _neighbours(value: int, ok, low: int) -> tuple[int | None, int]:
    """Nearest valid values below (None if there is none >= low) and above ``value``."""
    below = next((v for v in range(value - 1, low - 1, -1) if ok(v)), None)
    above = next(v for v in range(max(value + 1, low), value + 10_000) if ok(v))
    return below, above


def _try(below: int | None, above: int) -> str:
    return f"try {below} or {above}" if below is not None else f"try {above}"


def check_geometry(spec: ModelSpec | str, height: int, width: int, frames: int) -> None:
    """Check that ``spec`` can take ``height x width`` pixels and ``frames`` frames.

    Raises:
        ValueError: one line per problem, each with the rule and the nearest valid values,
            e.g. ``"frames must be 4k+1 for Wan (got 10); try 9 or 13"``.
    """
    spec = get_spec(spec)
    label = spec.label
    problems: list[str] = []
    m = spec.spatial_multiple
    for axis, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{axis} must be an int number of pixels (got {value!r})")
        elif value % m != 0 or value < m:
            below, above = _neighbours(value, lambda v: v % m == 0, m)
            problems.append(
                f"{axis} must be a positive multiple of {m} pixels for {label} (got {value}); {_try(below, above)}"
            )
    if isinstance(frames, bool) or not isinstance(frames, int):
        problems.append(f"frames must be an int (got {frames!r})")
    elif not spec.is_video:
        if frames != 1:
            problems.append(f"{label} makes still images: frames must be 1 (got {frames})")
    else:
        step = spec.temporal_multiple
        if frames < 1 or (frames - 1) % step != 0:
            below, above = _neighbours(frames, lambda v: (v - 1) % step == 0, 1)
            problems.append(f"frames must be {step}k+1 for {label} (got {frames}); {_try(below, above)}")
    if problems:
        raise ValueError(f"{spec.name} cannot take {height}x{width}x{frames}: " + "; ".join(problems) + ".")


# -- dtypes ------------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or a name (``"bf16"``, ``"float32"``, ...); ``ValueError`` otherwise."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}.")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
    return _DTYPES[key]
