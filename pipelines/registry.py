"""The model registry: what each model is, what it can take, and how to load it offline.

``MODELS`` maps a short name (``"wan2.1-t2v-1.3b"``, ``"tiny-wan"``, ...) to a frozen
``ModelSpec``: the diffusers pipeline class, the Hub repository of the diffusers-format
weights (``None`` for the tiny offline models), default geometry and sampling settings,
and the geometry rules. ``load(name)`` returns a ready pipeline:

- tiny models are built from ``gen.pipelines.tiny`` once, saved with
  ``save_pretrained`` into ``$GEN_CACHE_DIR/tiny/<name>-v1`` (default
  ``~/.cache/gen``), and loaded back with ``from_pretrained``, so they exercise the same
  loading path as real checkpoints;
- real models load from the local Hugging Face cache only (``local_files_only=True``:
  nothing is downloaded), or from ``model_path``; missing weights raise
  ``ModelNotAvailableError`` saying how to get them.

Sizes are pixels and frames; every listed model takes height and width in multiples of
16 (8x VAE times 2x2 patches) and video frames of the form 4k+1 (4x temporal VAE).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ._compat import realign_cpu_tensors
from .shapes.folder import check_folder, component_keys, read_manifest
from .tiny import TINY_CONFIGS, TINY_NAMES, build_tiny_pipeline
from .tokenizers import vocabulary

__all__ = [
    "MODELS",
    "ModelNotAvailableError",
    "ModelSpec",
    "check_geometry",
    "get_spec",
    "gen_cache_dir",
    "hf_cache_dir",
    "list_models",
    "load",
    "tiny_cache_folder",
    "bundled_folder",
]

Family = Literal["wan", "hunyuan", "flux"]
Task = Literal["t2v", "i2v", "t2i"]

_FAMILY_LABEL = {"wan": "Wan", "hunyuan": "HunyuanVideo", "flux": "FLUX"}
# Bump when the saved tiny folders change in a way the fingerprint cannot see
# (e.g. a different save format); old folders are then simply not used.
TINY_CACHE_VERSION = 1


class ModelNotAvailableError(ValueError):
    """The weights of a model are not on this machine (or ``model_path`` is not a pipeline)."""


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
        spatial_multiple: height and width must be multiples of this (pixels): VAE
            downsampling (8) times the transformer's patch size (2).
        temporal_multiple: frames must be ``temporal_multiple * k + 1`` (the VAE's
            temporal compression); 0 for image models, which take exactly 1 frame.
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
    spatial_multiple: int = 16
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
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return _parse_dtype(self.dtype)

    def token_grid(
        self, height: int | None = None, width: int | None = None, frames: int | None = None
    ) -> tuple[int, int, int]:
        """``(frames, rows, cols)`` of video/image tokens per attention call after VAE and patchify.

        Defaults to the spec's geometry. E.g. Wan 480x832x81 -> ``(21, 30, 52)``.
        """
        height = self.height if height is None else height
        width = self.width if width is None else width
        frames = self.frames if frames is None else frames
        t = (frames - 1) // self.temporal_multiple + 1 if self.temporal_multiple else 1
        return (t, height // self.spatial_multiple, width // self.spatial_multiple)


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
    label = _FAMILY_LABEL[spec.family]
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


# -- caches -----------------------------------------------------------------------------------


def gen_cache_dir() -> Path:
    """Root of gen's own cache: ``$GEN_CACHE_DIR``, else ``~/.cache/gen``."""
    return Path(os.environ.get("GEN_CACHE_DIR") or "~/.cache/gen").expanduser()


def tiny_cache_folder(name: str) -> Path:
    """Where ``load(name)`` keeps the saved tiny pipeline: ``<gen cache>/tiny/<name>-v1``."""
    return gen_cache_dir() / "tiny" / f"{name}-v{TINY_CACHE_VERSION}"


def bundled_folder(name: str | ModelSpec) -> Path:
    """Where a bundled model's pipeline folder lives: ``gen/pipelines/weights/<name>``."""
    spec = get_spec(name)
    if not spec.is_bundled:
        raise ValueError(f"{spec.name} has no bundled weights.")
    return Path(__file__).resolve().parent / "weights" / spec.bundled


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache, read from the environment now (not at import time).

    ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (``~/.cache/huggingface/hub``).
    """
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _tiny_fingerprint(name: str, seed: int) -> str:
    """Hash of everything the saved tiny folder depends on (configs, vocabulary, seed, versions)."""
    import diffusers
    import transformers

    payload = {
        "name": name,
        "seed": seed,
        "configs": TINY_CONFIGS[name],
        "vocab": vocabulary(),
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


_STAMP = "gen_tiny.json"


def _tiny_folder_is_current(folder: Path, fingerprint: str) -> bool:
    try:
        stamp = json.loads((folder / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model_index.json").is_file() and stamp.get("fingerprint") == fingerprint


def _ensure_tiny_folder(name: str, seed: int = 0) -> Path:
    """Build, save and atomically publish the tiny pipeline folder unless a current one exists."""
    folder = tiny_cache_folder(name)
    fingerprint = _tiny_fingerprint(name, seed)
    if _tiny_folder_is_current(folder, fingerprint):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Save into a sibling temp dir and rename: a reader never sees a half-written folder,
    # and a crash leaves only a temp dir behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        build_tiny_pipeline(name, seed=seed).save_pretrained(tmp, safe_serialization=True)
        (tmp / _STAMP).write_text(json.dumps({"name": name, "seed": seed, "fingerprint": fingerprint}))
        if _tiny_folder_is_current(folder, fingerprint):
            return folder  # another process published it while we were building
        if folder.exists():
            # Stale or broken: move it aside first, since os.replace cannot overwrite a
            # non-empty directory.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            try:
                os.replace(folder, old / "x")
            except OSError:
                pass  # another process moved it already
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process published the same folder between our check and now.
            if not _tiny_folder_is_current(folder, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


# -- loading ----------------------------------------------------------------------------------

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}.")
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16.")
    return _DTYPES[key]


def _dtype_kwargs(spec: ModelSpec, dtype: torch.dtype | str | None) -> dict[str, Any]:
    """``from_pretrained`` keyword for the dtype; a per-component dict when some stay fp32."""
    main = spec.torch_dtype if dtype is None else _parse_dtype(dtype)
    value: Any = main
    if spec.fp32_components and main != torch.float32:
        value = {"default": main, **dict.fromkeys(spec.fp32_components, torch.float32)}
    # diffusers renamed torch_dtype= to dtype= (0.42 warns on the old name).
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        return {"dtype": value}
    except ImportError:
        return {"torch_dtype": value}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _pipeline_class(spec: ModelSpec):
    import diffusers

    return getattr(diffusers, spec.pipeline_class)


def _component_problems(folder: Path) -> list[str]:
    """Files a pipeline folder lacks (cheap, offline): component folders and weight shards."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"model_index.json ({_first_line(exc)})"]
    missing: list[str] = []
    for key in component_keys(index):
        sub = folder / key
        if not sub.is_dir():
            missing.append(f"{key}/")
            continue
        for shard_index in sub.glob("*.index.json"):
            try:
                shards = set(json.loads(shard_index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError):
                missing.append(f"{key}/{shard_index.name} (unreadable)")
                continue
            missing.extend(f"{key}/{s}" for s in sorted(shards) if not (sub / s).is_file())
        is_model = (sub / "config.json").is_file()
        has_weights = any(sub.glob("*.safetensors")) or any(sub.glob("*.bin"))
        if is_model and not has_weights:
            missing.append(f"{key}/ weights")
    return missing


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` if its model_index.json is cached, else None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=str(hf_cache_dir()))
    except Exception:  # a malformed cache entry counts as absent
        return None
    return Path(path).parent if isinstance(path, str) else None


def _how_to_get(spec: ModelSpec) -> str:
    return (
        f"On a machine with network run `hf download {spec.repo_id}` (`huggingface-cli download "
        f"{spec.repo_id}` with huggingface_hub < 1.0) and copy the cache here or point HF_HOME / "
        f"HF_HUB_CACHE at it, or pass --model-path /path/to/folder (model_path=...) naming a "
        f"diffusers pipeline folder (one with model_index.json)."
    )


def _check_pipeline_folder(spec: ModelSpec, path: Path) -> None:
    if not path.is_dir():
        raise ModelNotAvailableError(
            f"--model-path {path} is not a folder. Pass the folder of a diffusers pipeline "
            f"(the one holding model_index.json), e.g. a local copy of {spec.repo_id or spec.name}."
        )
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelNotAvailableError(
            f"--model-path {path} is not a diffusers pipeline folder: it has no model_index.json. "
            f"Point it at the folder that holds model_index.json and the transformer/, vae/, ... "
            f"subfolders (for a Hub download: .../snapshots/<revision>/)."
        )
    try:
        found = json.loads(index_file.read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"{index_file} cannot be read ({_first_line(exc)}).") from None
    if found != spec.pipeline_class:
        raise ModelNotAvailableError(
            f"--model-path {path} holds a {found} but {spec.name} needs a {spec.pipeline_class}; "
            f"pick the model name whose pipeline class matches the folder."
        )


def _restore_hint(spec: ModelSpec) -> str:
    if spec.is_bundled:
        flag = " --causal" if spec.name.endswith("-causal") else ""
        return (f"Restore the shipped files (`git checkout -- pipelines/weights/{spec.bundled}` in a clone of gen, "
                f"or reinstall gen), or retrain them with `gen train-tiny{flag}`.")
    return "Delete the folder to rebuild it."


def _damaged(spec: ModelSpec, source: Path, what: str) -> None:
    """Raise ``ModelNotAvailableError`` naming every problem ``check_folder`` finds."""
    problems = check_folder(source)
    if problems:
        raise ModelNotAvailableError(
            f"{spec.name} at {what} {source} is incomplete or damaged: {'; '.join(problems)}. {_restore_hint(spec)}"
        )


def _from_pretrained(spec: ModelSpec, source: Path, dtype: torch.dtype | str | None, what: str):
    try:
        return _pipeline_class(spec).from_pretrained(
            str(source), local_files_only=True, **_dtype_kwargs(spec, dtype)
        )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        missing, problems = _component_problems(source), check_folder(source)
        detail = (f"; missing: {', '.join(missing)}" if missing else "") + (
            f"; problems: {'; '.join(problems)}" if problems else "")
        hint = _how_to_get(spec) if spec.repo_id else _restore_hint(spec)
        raise ModelNotAvailableError(
            f"Could not load {spec.name} from {what} {source} ({_first_line(exc)}){detail}. {hint}"
        ) from None


def load(
    name: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    model_path: str | os.PathLike | None = None,
):
    """Load model ``name`` as a diffusers pipeline, offline.

    Args:
        name: a key of ``MODELS`` (see ``list_models()``).
        device: where to move the pipeline, e.g. ``"cuda"``.
        dtype: parameter dtype (``torch.dtype`` or a name such as ``"bfloat16"``); default
            the spec's. Components in ``spec.fp32_components`` stay float32.
        model_path: a local diffusers pipeline folder (with model_index.json) to load
            instead of the Hub cache / tiny cache.

    Returns:
        The pipeline (of class ``spec.pipeline_class``) on ``device`` with its progress bar
        enabled. Tiny models are built and saved to ``tiny_cache_folder(name)`` on first
        use, then always loaded from there with ``from_pretrained``.

    Raises:
        ValueError: unknown name or dtype.
        ModelNotAvailableError: weights not in the local Hugging Face cache, a
            ``model_path`` that is not a matching pipeline folder, or a folder that fails
            to load (e.g. an interrupted download); the message says what to do.
    """
    spec = get_spec(name)
    if model_path is not None:
        source = Path(model_path).expanduser()
        _check_pipeline_folder(spec, source)
        if read_manifest(source) is not None:  # a gen-trained folder: its checksums are known
            _damaged(spec, source, "--model-path")
        pipe = _from_pretrained(spec, source, dtype, "--model-path")
    elif spec.is_bundled:
        source = bundled_folder(spec)
        _damaged(spec, source, "the bundled folder")
        pipe = _from_pretrained(spec, source, dtype, "the bundled folder")
    elif spec.is_tiny:
        source = _ensure_tiny_folder(spec.name)
        pipe = _from_pretrained(spec, source, dtype, "the tiny-model cache")
    else:
        snapshot = _cached_snapshot(spec.repo_id)
        if snapshot is None:
            raise ModelNotAvailableError(
                f"Weights for {spec.name} ({spec.repo_id}) were not found in the Hugging Face "
                f"cache at {hf_cache_dir()}, and gen never downloads them. {_how_to_get(spec)}"
            )
        missing = _component_problems(snapshot)
        if missing:
            raise ModelNotAvailableError(
                f"The cached copy of {spec.repo_id} at {snapshot} is incomplete (missing: "
                f"{', '.join(missing)}); the download was probably interrupted. {_how_to_get(spec)}"
            )
        pipe = _from_pretrained(spec, snapshot, dtype, "the Hugging Face cache")
    pipe.to(device)
    # remembered so gen.sparsify picks this model's method presets
    pipe.__dict__["_gen_model_name"] = spec.name
    realign_cpu_tensors(m for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    pipe.set_progress_bar_config(disable=False)
    return pipe


def list_models() -> list[tuple[ModelSpec, bool, str]]:
    """Every model with whether it can load offline here and from where.

    Returns:
        ``(spec, available, where)`` per model, in ``MODELS`` order. Tiny models are always
        available (``where`` is their cache folder, built on first use); real ones are
        available when the local Hugging Face cache holds a complete snapshot (checked
        from files only, no network).
    """
    rows: list[tuple[ModelSpec, bool, str]] = []
    for spec in MODELS.values():
        if spec.is_tiny:
            folder = tiny_cache_folder(spec.name)
            built = (folder / "model_index.json").is_file()
            rows.append((spec, True, str(folder) if built else f"built on first use into {folder}"))
            continue
        if spec.is_bundled:
            folder = bundled_folder(spec)
            problems = check_folder(folder)
            rows.append((spec, not problems, str(folder) if not problems else f"damaged at {folder} ({'; '.join(problems)})"))
            continue
        snapshot = _cached_snapshot(spec.repo_id)
        if snapshot is None:
            rows.append((spec, False, f"not in the Hugging Face cache ({hf_cache_dir()})"))
            continue
        missing = _component_problems(snapshot)
        if missing:
            rows.append((spec, False, f"incomplete at {snapshot} (missing {', '.join(missing)})"))
        else:
            rows.append((spec, True, str(snapshot)))
    return rows


assert set(TINY_NAMES) == {s.name for s in _SPECS if s.is_tiny}, "tiny specs and builders disagree"
