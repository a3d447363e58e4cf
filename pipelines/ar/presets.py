"""Long-video settings per model, as data: what ``gen long`` uses for each schedule.

``AR_PRESETS[model][schedule]`` overrides fields of the schedule's config dataclass
(``ChunkConfig``, ``SinkWindowConfig``, ``RollingConfig``) and ``AR_PRESETS[model]["flex"]``
fields of ``FlexConfig``; a model without an entry gets the dataclasses' defaults, which
are the published settings of Self-Forcing, LongLive and Rolling Forcing for Wan 2.1-1.3B
(few-step distilled checkpoints). ``schedule_config(schedule, model)`` builds the config.

``shapes-wan-causal`` is trained on 15-latent-frame windows of 3-frame chunks with the
full flow-matching range (not distilled), so its presets keep every attended span within
15 frames and give each chunk more denoising steps (see ``gen.pipelines.shapes.config``):

* ``sink``: 3-frame sink + 12 recent frames, positions relative to the span (the sink sits
  right before the recent frames, as the sink windows of its training do);
* ``rolling``: a 3-chunk window (9 frames) at rising noise, sink 3, span 15;
* ``chunk``: the whole video in the cache, absolute positions: as trained only up to 15
  latent frames (about 7 s at 8 fps); longer videos attend farther than trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .flex import FlexConfig
from .rolling import RollingConfig
from .schedules import ChunkConfig, SinkWindowConfig

__all__ = ["AR_PRESETS", "flex_config", "schedule_config"]

_SHAPES_STEPS = (1000, 900, 800, 700, 600, 500, 400, 300, 200, 100)

AR_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "shapes-wan-causal": {
        "chunk": dict(chunk_frames=3, steps=_SHAPES_STEPS, shift=3.0, sampler="euler"),
        "sink": dict(chunk_frames=3, steps=_SHAPES_STEPS, shift=3.0, window_frames=15, sink_frames=3,
                     positions="relative", sampler="euler"),
        "rolling": dict(chunk_frames=3, steps=(1000, 667, 333), shift=3.0, sink_frames=3,
                        max_attention_frames=15, sampler="euler"),
        "flex": dict(train_frames=15),
    },
}
"""Per model, per schedule (and ``"flex"``): config fields that differ from the defaults."""

_CLASSES = {"chunk": ChunkConfig, "sink": SinkWindowConfig, "rolling": RollingConfig}


def schedule_config(schedule: str, model: str | None = None, **overrides: Any):
    """The config of ``schedule`` (``"chunk"``, ``"sink"``, ``"rolling"``) for ``model``.

    Fields come from the dataclass defaults, then ``AR_PRESETS[model][schedule]``, then
    ``overrides``. Raises ``ValueError`` for an unknown schedule or field.
    """
    if schedule not in _CLASSES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(_CLASSES)}.")
    cls = _CLASSES[schedule]
    fields = {**AR_PRESETS.get(model or "", {}).get(schedule, {}), **overrides}
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(fields) - known)
    if bad:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(bad)}; fields: {', '.join(sorted(known))}.")
    return cls(**fields)


def flex_config(model: str | None = None, **overrides: Any) -> FlexConfig:
    """``FlexConfig`` for ``model`` (its ``train_frames`` and the like from ``AR_PRESETS``)."""
    return FlexConfig(**{**AR_PRESETS.get(model or "", {}).get("flex", {}), **overrides})
