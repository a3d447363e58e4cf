"""Resumable training: the state of a training stage saved every few hundred steps, so a
run that is stopped (a closed laptop, a session that ends, a GPU lent for ten minutes at a
time) goes on from its last checkpoint and ends with the weights of an uninterrupted run.

``StageCheckpoint(path, every)`` is handed to ``train_t2v`` / ``train_causal``; it writes
``path`` atomically (``gen._io.atomic_path``: a stop mid-write leaves the previous
checkpoint) with the models, the optimiser, the EMA, every random generator and the log.
``build.py`` keeps one folder of checkpoints per run next to the output folder
(``<out>.partial/``), removed once the pipeline is published.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen._io import atomic_path, atomic_write_text

__all__ = ["PartialRun", "StageCheckpoint", "generator_state", "partial_folder", "set_generator_state"]


def partial_folder(out: str | os.PathLike) -> Path:
    """Where the unfinished run that writes the pipeline folder ``out`` keeps its state: ``<out>.partial/``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def generator_state(gen: np.random.Generator | torch.Generator) -> Any:
    """The state of a numpy or torch generator, as plain data / a tensor."""
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator.state
    return gen.get_state()


def set_generator_state(gen: np.random.Generator | torch.Generator, state: Any) -> None:
    """Put ``gen`` back in a state from :func:`generator_state`."""
    if isinstance(gen, np.random.Generator):
        gen.bit_generator.state = state
    else:
        gen.set_state(state)


class StageCheckpoint:
    """Where one training stage saves its state, and how often.

    Args:
        path: the checkpoint file (its folder is created).
        every: optimiser steps between saves (the last step always saves).
        stage: the stage's name, stored in the file; a file of another stage is refused.
    """

    def __init__(self, path: str | os.PathLike, *, every: int = 250, stage: str):
        if every < 1:
            raise ValueError(f"checkpoint every must be >= 1 step, got {every}.")
        self.path, self.every, self.stage = Path(path), every, stage

    def due(self, step: int, total: int) -> bool:
        """Whether to save after ``step`` steps of ``total``."""
        return step % self.every == 0 or step == total

    def load(self) -> dict[str, Any] | None:
        """The saved state (None when there is none yet)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file: say so rather than train from scratch silently
            raise ValueError(f"the training checkpoint {self.path} cannot be read (damaged, or not written by "
                             "gen train-tiny); delete it to start this stage over.") from None
        if state.get("stage") != self.stage:
            raise ValueError(f"{self.path} is a checkpoint of stage {state.get('stage')!r}, not {self.stage!r}.")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (the previous checkpoint stays until the new one is whole)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({**state, "stage": self.stage}, tmp)


class PartialRun:
    """The checkpoints of one unfinished ``gen train-tiny`` run: ``<out>.partial/`` beside
    the output folder, holding the run's settings, the trained VAE, the encoded latents
    and one :class:`StageCheckpoint` per transformer stage. A run started again with the
    same settings goes on from there; other settings are refused (``restart=True``
    discards the old run), unless the old run stopped before it saved anything.
    ``finish()`` removes the folder once the pipeline is published.

    Args:
        out: the pipeline folder the run writes.
        settings: what makes two runs the same run (plain JSON data: the training config,
            where the VAE or the base came from).
        restart: discard checkpoints of an earlier run instead of resuming or refusing it.
    """

    def __init__(self, out: str | os.PathLike, settings: dict[str, Any], *, restart: bool = False):
        self.folder = partial_folder(out)
        if restart and self.folder.exists():
            shutil.rmtree(self.folder)
        record = self.folder / "settings.json"
        settings = json.loads(json.dumps(settings))  # tuples -> lists, as they read back
        self.resumed = False
        if record.exists():
            try:
                saved = json.loads(record.read_text())
            except ValueError:
                saved = None
            started = any(p.name != "settings.json" for p in self.folder.iterdir())
            if saved != settings and started:
                raise ValueError(f"{self.folder} holds an unfinished run with other settings; run with the same "
                                 "settings to resume it, or pass --restart to discard it.")
            self.resumed = saved == settings and started
        if not self.resumed:  # a new run, or one that stopped before it saved anything
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record, json.dumps(settings, indent=1))

    def stage(self, name: str, every: int) -> StageCheckpoint:
        """The checkpoint file of transformer stage ``name``."""
        return StageCheckpoint(self.folder / f"{name}.pt", every=every, stage=name)

    def save_vae(self, vae, log: list) -> None:
        """Keep the trained VAE (stage 1) and its log."""
        target = self.folder / "vae"
        tmp = self.folder / f".vae.tmp-{os.getpid()}"
        vae.save_pretrained(tmp)
        (tmp / "log.json").write_text(json.dumps(log))
        os.replace(tmp, target)

    def load_vae(self):
        """``(vae, log)`` of a finished stage 1, or None."""
        from diffusers import AutoencoderKLWan

        target = self.folder / "vae"
        if not (target / "log.json").exists():
            return None
        return AutoencoderKLWan.from_pretrained(str(target)), json.loads((target / "log.json").read_text())

    def save_latents(self, name: str, data) -> None:
        """Keep encoded clips (a ``data.LatentSet``)."""
        from dataclasses import asdict

        with atomic_path(self.folder / f"{name}.latents.pt") as tmp:
            torch.save({"latents": data.latents, "foreground": data.foreground,
                        "captions": [asdict(c) for c in data.captions]}, tmp)

    def load_latents(self, name: str):
        """The ``LatentSet`` saved as ``name``, or None."""
        from .data import LatentSet
        from .grammar import Caption

        path = self.folder / f"{name}.latents.pt"
        if not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return LatentSet(saved["latents"], [Caption(**c) for c in saved["captions"]], saved["foreground"])

    def finish(self) -> None:
        """Remove the checkpoints (the run is published)."""
        shutil.rmtree(self.folder, ignore_errors=True)
