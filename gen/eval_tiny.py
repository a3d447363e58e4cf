"""``gen eval-tiny``: render held-out seeds of the shapes models and score them by eye-free vision.

For each caption of a fixed set (every motion, a spread of colours, shapes and
backgrounds) and each of ``seeds`` generator seeds (from ``EVAL_SEED`` on; training draws
no generator seeds, so none of these was seen), the model renders a clip through the
stock ``WanPipeline`` call, optionally with a sparse attention method installed by
``gen.sparsify``, and ``gen.pipelines.shapes.vision`` reads back the background colour,
the foreground colour, the shape and the motion. The result holds one row per clip and
the fraction right per attribute, overall and per motion.

    from gen.eval_tiny import eval_tiny
    res = eval_tiny("shapes-wan", seeds=2)
    print(res.markdown())
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gen.pipelines.shapes.vision import ATTRIBUTES

logger = logging.getLogger("gen.eval")

__all__ = ["EVAL_SEED", "EvalResult", "eval_captions", "eval_long", "eval_tiny"]

EVAL_SEED = 1_000_000
"""First generator seed of the evaluation."""



def eval_captions(per_motion: int = 4, seed: int = 0):
    """A fixed caption set: ``per_motion`` captions for each motion, colours and shapes spread
    round-robin, backgrounds drawn from ``seed`` (never equal to the shape's colour)."""
    from gen.pipelines.shapes.grammar import BACKGROUNDS, FOREGROUNDS, MOTIONS, SHAPES, Caption

    rng = np.random.default_rng(seed + 7)
    out, k = [], 0
    for motion in MOTIONS:
        for _ in range(per_motion):
            color = FOREGROUNDS[k % len(FOREGROUNDS)]
            shape = SHAPES[(k // len(FOREGROUNDS) + k) % len(SHAPES)]
            bg = str(rng.choice([b for b in BACKGROUNDS if b != color]))
            out.append(Caption(shape, color, motion, bg))
            k += 1
    return out


@dataclass
class EvalResult:
    """Scores of one evaluation.

    Attributes:
        rows: one dict per clip: ``caption``, ``seed``, the reading (``read_*``) and each
            attribute's verdict (True/False, None where the caption leaves it out).
        summary: fraction right per attribute over all clips.
        by_motion: the same per caption motion.
        meta: model, attention, steps, guidance, seeds, time, device.
    """

    rows: list[dict] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    by_motion: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def markdown(self) -> str:
        """The score table: one row per motion and one for all clips, a column per attribute."""
        head = "| motion | clips | " + " | ".join(a.replace("_", " ") for a in ATTRIBUTES) + " |"
        lines = [head, "|" + "---|" * (len(ATTRIBUTES) + 2)]

        def row(name, scores, n):
            return f"| {name} | {n} | " + " | ".join(f"{100 * scores[a]:.0f}%" for a in ATTRIBUTES) + " |"

        for motion, scores in self.by_motion.items():
            lines.append(row(motion, scores, sum(r["motion_of_caption"] == motion for r in self.rows)))
        lines.append(row("**all**", self.summary, len(self.rows)))
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "summary": self.summary, "by_motion": self.by_motion,
                           "rows": self.rows}, indent=1)


def _fractions(rows: list[dict]) -> dict[str, float]:
    out = {}
    for a in ATTRIBUTES:
        vals = [r[a] for r in rows if r[a] is not None]
        out[a] = float(np.mean(vals)) if vals else float("nan")
    return out


def eval_tiny(
    model: str = "shapes-wan",
    *,
    attention: str = "dense",
    overrides: dict | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seeds: int = 2,
    per_motion: int = 4,
    batch: int = 8,
    device: str | None = None,
    model_path: str | None = None,
    strip: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Render and score ``6 * per_motion * seeds`` clips of ``model``.

    Args:
        model: a shapes model (``shapes-wan``; ``shapes-wan-causal`` renders as a plain
            text-to-video model here).
        attention: attention method installed with ``gen.sparsify`` (``dense``: gen's dense kernels).
        overrides: the method's config fields.
        steps, guidance: default the model's (what the README's table reports).
        seeds: generator seeds per caption (``EVAL_SEED``, ``EVAL_SEED + 1``, ...).
        per_motion: captions per motion (``eval_captions``).
        batch: clips rendered per pipeline call.
        device: default CUDA when available.
        model_path: load the model from this folder instead (e.g. freshly trained weights).
        strip: if given, a PNG with 5 frames of each of the first 12 clips, caption per row.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from gen.pipelines import get_spec
    from gen.pipelines.shapes.vision import read_clip, score_reading
    from gen.session import RenderJob, Session

    spec = get_spec(model)
    if not spec.is_bundled:
        raise ValueError(f"eval-tiny scores the shapes models (shapes-wan, shapes-wan-causal), not {spec.name!r}.")
    session = Session(device=device, model_path=model_path, progress=False)
    base = RenderJob("", model=spec.name, attention=attention, overrides=dict(overrides or {}), steps=steps,
                     guidance=guidance, negative_prompt="")
    jobs = [(cap, dataclasses.replace(base, prompt=cap.text(), seed=EVAL_SEED + s))
            for cap in eval_captions(per_motion) for s in range(seeds)]
    steps, guidance = jobs[0][1].resolved().steps, jobs[0][1].resolved().guidance
    res = EvalResult()
    clips = []
    summary: dict = {}
    t0 = time.perf_counter()
    with tqdm(total=len(jobs), desc=f"eval {spec.name} / {attention}", unit="clip", disable=not progress) as bar:
        for i in range(0, len(jobs), batch):
            part = jobs[i : i + batch]
            outs = session.run_group([job for _, job in part])
            summary = _merge_summaries(summary, outs[0].attention)
            for (cap, job), out in zip(part, outs):
                frames = out.frames
                r = read_clip(frames)
                verdict = score_reading(r, cap)
                res.rows.append({"caption": cap.text(), "seed": job.seed, "motion_of_caption": cap.motion,
                                 "read_background": r.background, "read_color": r.color, "read_shape": r.shape,
                                 "read_motion": r.motion, "read_velocity": [round(v, 2) for v in r.velocity],
                                 "read_objects": r.objects, **verdict})
                if len(clips) < 12:
                    clips.append((cap.text(), frames))
            bar.update(len(part))
    dev = session.device
    res.summary = _fractions(res.rows)
    for motion in dict.fromkeys(r["motion_of_caption"] for r in res.rows):
        res.by_motion[motion] = _fractions([r for r in res.rows if r["motion_of_caption"] == motion])
    res.meta = {"model": spec.name, "attention": attention, "overrides": overrides or {}, "steps": steps,
                "guidance": guidance, "seeds": seeds, "captions": len(jobs) // seeds, "clips": len(jobs),
                "seconds": round(time.perf_counter() - t0, 1), "device": str(dev), "attention_summary": summary}
    if strip is not None:
        _write_strip(clips, strip)
    logger.info("eval %s/%s: colour %.0f%%, motion %.0f%%, colour and motion %.0f%% of %d clips", spec.name,
                attention, 100 * res.summary["color"], 100 * res.summary["motion"],
                100 * res.summary["color_and_motion"], len(jobs))
    return res


def _merge_summaries(total: dict, part: dict) -> dict:
    """Sum the call counts of per-group attention summaries (one sparsify per group)."""
    if not total:
        return part
    for t, p in zip(total.get("transformers", []), part.get("transformers", [])):
        t["sparse_calls"] += p["sparse_calls"]
        t["dense_calls"] += p["dense_calls"]
    return total


def _write_strip(clips: list[tuple[str, np.ndarray]], path: str | Path) -> Path:
    """PNG: per clip a row of 5 evenly spaced frames, its caption above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gen._io import atomic_path

    n = len(clips)
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 1.7 * n), squeeze=False)
    for ax, (text, frames) in zip(axes[:, 0], clips):
        idx = np.linspace(0, len(frames) - 1, 5).round().astype(int)
        ax.imshow(np.concatenate([frames[i] for i in idx], axis=1))
        ax.set_title(text, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return Path(path)


def eval_long(
    model: str = "shapes-wan-causal",
    *,
    schedules: tuple[str, ...] = ("chunk", "sink", "rolling"),
    seconds: float = 12.0,
    seeds: int = 1,
    per_motion: int = 2,
    device: str | None = None,
    model_path: str | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score long videos of the causal shapes model, per schedule of ``gen long``.

    Each caption of ``eval_captions(per_motion)`` is generated for ``seconds`` (at 8 fps:
    12 s = 96 frames = 24 latent frames = 8 chunks, past the 15-frame training window)
    with each schedule's preset, and the whole video is read by the vision with
    ``wrap=True`` (shapes that leave one edge come back at the other, as in training).
    A video scores ``motion`` only if the shape keeps its motion over the whole video.

    Returns ``{schedule: EvalResult}`` (``rows`` also hold ``late_color``: the colour read on
    the last third of the video alone, to catch drift).
    """
    from tqdm.auto import tqdm

    from gen.long import long_video_frames
    from gen.pipelines import get_spec
    from gen.pipelines.shapes.vision import read_clip, score_reading

    spec = get_spec(model)
    out: dict[str, EvalResult] = {}
    jobs = [(cap, EVAL_SEED + s) for cap in eval_captions(per_motion) for s in range(seeds)]
    for schedule in schedules:
        res = EvalResult()
        t0 = time.perf_counter()
        for cap, seed in tqdm(jobs, desc=f"long {schedule}", unit="video", disable=not progress):
            frames = np.concatenate(list(long_video_frames(
                cap.text(), model=spec.name, schedule=schedule, seconds=seconds, seed=seed, device=device,
                model_path=model_path)))
            r = read_clip(frames, wrap=True)
            verdict = score_reading(r, cap)
            late = read_clip(frames[-len(frames) // 3 :], wrap=True)
            res.rows.append({"caption": cap.text(), "seed": seed, "motion_of_caption": cap.motion,
                             "frames": len(frames), "read_color": r.color, "read_motion": r.motion,
                             "read_velocity": [round(v, 2) for v in r.velocity], "late_color": late.color,
                             "read_objects": r.objects, **verdict})
        res.summary = _fractions(res.rows)
        for motion in dict.fromkeys(r["motion_of_caption"] for r in res.rows):
            res.by_motion[motion] = _fractions([r for r in res.rows if r["motion_of_caption"] == motion])
        res.meta = {"model": spec.name, "schedule": schedule, "seconds": seconds, "clips": len(jobs),
                    "wall_seconds": round(time.perf_counter() - t0, 1)}
        out[schedule] = res
    return out
