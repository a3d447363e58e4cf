"""``gen train-tiny``: train the ``shapes-wan`` models from their seed and save them.

``train_shapes_wan(out)`` trains the VAE, then the text encoder and transformer, and
publishes a ``WanPipeline`` folder at ``out`` (atomically; the previous folder stays until
the new one is complete). ``train_shapes_wan_causal(out, base=...)`` fine-tunes the
transformer of a saved ``shapes-wan`` folder for chunk-by-chunk generation and publishes
a second folder with the same VAE, text encoder and tokenizer. Each folder's
``gen_model.json`` records the training config, the log, the wall time, the device and
the library versions, and the SHA-256 of every file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import encode_clips
from .folder import publish_folder
from .resume import PartialRun, StageCheckpoint, partial_folder
from .train import build_components, config_record, train_causal, train_t2v, train_vae

logger = logging.getLogger("gen.pipelines.shapes")

CHECKPOINT_EVERY = 250
"""Transformer steps between checkpoints: about 100 s of training on 2 CPU cores, against
about 0.1 s to write the 20 MB of models, optimiser and EMA."""

__all__ = ["default_device", "train_shapes_wan", "train_shapes_wan_causal"]


def default_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA where there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _manifest(name: str, cfg: TrainConfig, dev: torch.device, seconds: float, logs: dict[str, Any],
              **extra: Any) -> dict[str, Any]:
    threads = torch.get_num_threads() if dev.type == "cpu" else None
    return {
        "name": name, "format": 1, **config_record(cfg), "logs": logs, "train_seconds": round(seconds, 1),
        "device": str(dev) + (f" ({threads} threads)" if threads else ""), "versions": _versions(), **extra,
    }


def _trained_vae(folder: str | os.PathLike):
    """The VAE of a saved ``shapes-wan`` folder (``train_shapes_wan(vae=...)``), refused
    with a reason when the folder is damaged or its VAE is not ``COMPONENTS["vae"]``."""
    from diffusers import AutoencoderKLWan

    from .config import COMPONENTS
    from .folder import check_folder

    if not Path(folder).is_dir():
        raise ValueError(f"--vae: {folder} does not exist; give a shapes-wan folder (gen train-tiny --out writes one).")
    problems = check_folder(folder)
    if problems:
        raise ValueError(f"--vae: {folder} is not a complete shapes-wan folder: {'; '.join(problems)}.")
    config = json.loads((Path(folder) / "vae" / "config.json").read_text())

    def same(a, b):
        return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)

    differ = [k for k, v in COMPONENTS["vae"].items() if not same(config.get(k), v)]
    if differ:
        raise ValueError(f"--vae: the VAE in {folder} is not the shapes-wan VAE (its {', '.join(differ)} differ).")
    return AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", local_files_only=True)


def train_shapes_wan(out: str | os.PathLike, *, config: TrainConfig | None = None,
                     device: str | torch.device | None = None, progress: bool = True,
                     vae: str | os.PathLike | None = None, restart: bool = False,
                     checkpoint_every: int = CHECKPOINT_EVERY) -> Path:
    """Train ``shapes-wan`` (VAE, then text encoder + transformer) and save it at ``out``.

    Args:
        out: the pipeline folder to (re)write.
        config: training settings (default ``TrainConfig()``, what the shipped weights used).
        device: ``"cuda"``/``"cpu"`` (default CUDA when available).
        progress: show progress bars.
        vae: a saved ``shapes-wan`` folder whose VAE to keep instead of training one (stage
            1, about 10 minutes on 2 CPU cores, is skipped; ``config.vae`` is unused). The
            VAE is the only thing that depends on it: the transformer starts from the seed.
        restart: discard the checkpoints of an unfinished run at ``out`` instead of
            resuming it (``resume.PartialRun``: the trained VAE, the encoded clips and the
            transformer's state every ``checkpoint_every`` steps are kept in
            ``<out>.partial/`` until the folder is published; a run started again with the
            same settings goes on from there and ends with the same weights).
        checkpoint_every: transformer steps between checkpoints.

    Returns:
        ``out``. About an hour on a 2-core CPU with the defaults.
    """
    from diffusers import WanPipeline

    cfg = config or TrainConfig()
    dev = default_device(device)
    t0 = time.perf_counter()
    given_vae = None if vae is None else _trained_vae(vae)  # refused before anything is built
    extra: dict[str, Any] = {}
    if given_vae is not None:
        from .folder import read_manifest

        files = (read_manifest(Path(vae)) or {}).get("files", {})
        extra["vae_from"] = {"folder": str(vae), "files": {k: v for k, v in files.items() if k.startswith("vae/")}}
    run = PartialRun(out, {**config_record(cfg), **extra}, restart=restart)
    if run.resumed:
        logger.info("shapes-wan: resuming the unfinished run in %s", run.folder)
    torch.manual_seed(cfg.seed)
    parts = build_components(cfg.seed, cfg.dit)
    kept = run.load_vae() if given_vae is None else None
    if given_vae is not None:
        parts["vae"], vae_log = given_vae.to(dev), []
        logger.info("shapes-wan: keeping the VAE of %s (no VAE training)", vae)
    elif kept is not None:
        parts["vae"], vae_log = kept[0].to(dev), kept[1]
        logger.info("shapes-wan: the VAE was trained before this resume (%s)", run.folder / "vae")
    else:
        logger.info("shapes-wan: training the VAE on %s (%d still-frame + %d clip steps)", dev,
                    cfg.vae.image_steps, cfg.vae.steps)
        vae_log = train_vae(parts["vae"], cfg, device=dev, progress=progress)
        run.save_vae(parts["vae"], vae_log)
    data = run.load_latents("train")
    if data is None:
        logger.info("shapes-wan: encoding %d training clips", cfg.dit.clips)
        data = encode_clips(parts["vae"], cfg.seed, "train", cfg.dit.clips, frames=cfg.frames, size=cfg.size,
                            progress=progress, foreground=cfg.dit.foreground_weight is not None)
        run.save_latents("train", data)
    logger.info("shapes-wan: training text encoder + transformer (%d steps of %d clips)", cfg.dit.steps, cfg.dit.batch)
    dit_log = train_t2v(parts["transformer"], parts["text_encoder"], parts["tokenizer"], data, cfg, device=dev,
                        progress=progress, checkpoint=run.stage("t2v", checkpoint_every))
    pipe = WanPipeline(**{k: parts[k] for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")})
    pipe.to("cpu")
    seconds = time.perf_counter() - t0
    # train_seconds counts this process only; the log's seconds run on across a resume
    manifest = _manifest("shapes-wan", cfg, dev, seconds, {"vae": vae_log, "transformer": dit_log},
                         resumed=run.resumed, **extra)
    path = publish_folder(pipe, out, manifest)
    run.finish()
    logger.info("shapes-wan: saved to %s after %.0f s", path, seconds)
    return path


def snapshot_shapes_wan(out: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Save the unfinished ``train_shapes_wan`` run at ``out`` as it stands: the EMA
    weights of its last transformer checkpoint (``<out>.partial/t2v.pt``) with its VAE,
    as a pipeline folder at ``dest`` that ``gen eval-tiny --model-path`` scores. The run
    is only read; it resumes as before.

    Raises:
        ValueError: no unfinished run at ``out``, or none that has saved a transformer
            checkpoint yet (the first comes after 250 steps).
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    from .train import _trainable

    folder = partial_folder(out)
    record, ckpt = folder / "settings.json", folder / "t2v.pt"
    if not record.exists():
        raise ValueError(f"no unfinished gen train-tiny run at {out} ({folder} does not exist).")
    if not ckpt.exists():
        raise ValueError(f"the run in {folder} has not saved a transformer checkpoint yet (the first comes after "
                         f"{CHECKPOINT_EVERY} steps); try again later.")
    settings = json.loads(record.read_text())
    if (folder / "vae" / "log.json").exists():
        vae = AutoencoderKLWan.from_pretrained(str(folder / "vae"))
    elif "vae_from" in settings:  # --vae: the kept VAE is in that pipeline folder (checked as --vae checks it)
        vae = _trained_vae(settings["vae_from"]["folder"])
    else:
        raise ValueError(f"the run in {folder} has no trained VAE yet.")
    state = StageCheckpoint(ckpt, stage="t2v").load()
    parts = build_components(int(settings["train"]["seed"]))
    tr, te = parts["transformer"], parts["text_encoder"]
    tr.load_state_dict(state["transformer"])
    te.load_state_dict(state["text_encoder"])
    params = _trainable(tr, te)  # the order the EMA keeps (frozen padding biases left out)
    shadow = state["ema"]["shadow"]
    if len(shadow) != len(params):
        raise ValueError(f"{ckpt} does not match this version's models ({len(shadow)} averaged tensors, "
                         f"{len(params)} parameters).")
    with torch.no_grad():
        for p, v in zip(params, shadow):
            p.copy_(v)
    parts["vae"] = vae
    pipe = WanPipeline(**{k: parts[k] for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")})
    manifest = {"name": "shapes-wan", "format": 1, **{k: settings[k] for k in ("train", "components")},
                "snapshot_of": str(folder), "step": int(state["step"]), "logs": {"transformer": state["log"]},
                "versions": _versions()}
    path = publish_folder(pipe, dest, manifest)
    logger.info("shapes-wan: step %d of the run in %s saved to %s", state["step"], folder, path)
    return path


def train_shapes_wan_causal(out: str | os.PathLike, *, base: str | os.PathLike, config: TrainConfig | None = None,
                            device: str | torch.device | None = None, progress: bool = True, restart: bool = False,
                            checkpoint_every: int = CHECKPOINT_EVERY) -> Path:
    """Fine-tune the transformer of the ``shapes-wan`` folder ``base`` for block-causal
    generation and save ``shapes-wan-causal`` at ``out`` (same VAE, text encoder, tokenizer).

    Args:
        out: the pipeline folder to (re)write.
        base: a ``shapes-wan`` pipeline folder (e.g. the bundled one).
        config: training settings (default ``TrainConfig()``; ``config.causal`` is used).
        device: ``"cuda"``/``"cpu"`` (default CUDA when available).
        progress: show progress bars.
    """
    from diffusers import WanPipeline

    from .folder import check_folder, read_manifest

    cfg = config or TrainConfig()
    c = cfg.causal
    problems = check_folder(base)
    if problems:
        raise ValueError(f"the base folder {base} is not a complete shapes-wan folder: {'; '.join(problems)}.")
    dev = default_device(device)
    t0 = time.perf_counter()
    base_manifest = read_manifest(Path(base)) or {}
    origin = {"name": base_manifest.get("name"), "files": base_manifest.get("files")}
    run = PartialRun(out, {**config_record(cfg), "base": origin}, restart=restart)
    if run.resumed:
        logger.info("shapes-wan-causal: resuming the unfinished run in %s", run.folder)
    torch.manual_seed(cfg.seed)
    pipe = WanPipeline.from_pretrained(str(base), local_files_only=True)
    data = run.load_latents("causal")
    if data is None:
        logger.info("shapes-wan-causal: encoding %d clips of %d frames", c.clips, c.frames)
        data = encode_clips(pipe.vae.to(dev), cfg.seed, "causal", c.clips, frames=c.frames, size=cfg.size,
                            wrap=True, batch=4, progress=progress)
        run.save_latents("causal", data)
    logger.info("shapes-wan-causal: training (%d steps of %d windows of %d latent frames)", c.steps, c.batch,
                c.window_frames)
    # a base whose clip phase held the steer start's writer path: hold it here too
    hold = (base_manifest.get("train") or {}).get("dit", {}).get("steer_start") is not None
    if hold:
        logger.info("shapes-wan-causal: the base was trained from the steer start; its writer path stays held")
    log = train_causal(pipe.transformer, pipe.text_encoder, pipe.tokenizer, data, cfg, device=dev, progress=progress,
                       checkpoint=run.stage("causal", checkpoint_every), hold_writer=hold)
    pipe.to("cpu")
    seconds = time.perf_counter() - t0
    manifest = _manifest("shapes-wan-causal", cfg, dev, seconds, {"causal": log}, base=origin,
                         resumed=run.resumed)
    path = publish_folder(pipe, out, manifest)
    run.finish()
    logger.info("shapes-wan-causal: saved to %s after %.0f s", path, seconds)
    return path


