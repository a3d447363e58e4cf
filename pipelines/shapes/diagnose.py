"""Where a ``shapes-wan`` folder loses its captions: the VAE alone, then the transformer by noise level.

Held-out true clips (the ``eval_captions`` set, each drawn with a motion from a clip seed
of the ``"diagnose"`` split, which training never uses) are read by
``gen.pipelines.shapes.vision`` three ways:

* ``truth``: the clips themselves (the reader's own accuracy, the ceiling);
* ``vae``: encoded (posterior mode) and decoded by the folder's VAE;
* teacher-forced reconstructions at noise level ``t``: the clip's normalised latent
  ``x0`` is noised to ``x_t = (1 - t) x0 + t eps`` and the folder's transformer brings it
  back, either in one step (``x0_hat = x_t - t v``, ``onestep@t``) or with the pipeline's
  own sampler from ``t`` on (``denoise@t``: the UniPC schedule of ``steps`` steps cut at
  the first level at or below ``t``, classifier-free guidance as ``WanPipeline`` does it,
  negative prompt ``""``), then decoded and read. ``denoise@1.0`` is a generation from
  pure noise, what ``gen eval-tiny`` scores.

``word_sensitivity`` (``--words``) measures how much the transformer's prediction
depends on the motion words against the colour words, and on the roles of two colour
words (which one is the shape's and which the background's); ``shift_sensitivity``
(``--shift``) how nearly it is translation-equivariant (Wan's transformer sees positions
only through RoPE, which is relative), and how a motion word weighs against where the
noise is.

Each row gives the fraction right per attribute (colour, background, shape, motion,
colour and motion), PSNR against the true clip, and the mean per-frame distance between
the foreground centroids of the reading and of the true clip (pixels at 128).

    python -m gen.pipelines.shapes.diagnose --clips 48 --out /tmp/diag.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .build import default_device
from .vision import ATTRIBUTES

logger = logging.getLogger("gen.pipelines.shapes")

__all__ = ["DiagnoseResult", "diagnose", "heldout_clips", "shift_sensitivity", "word_sensitivity"]

LEVELS = (0.2, 0.4, 0.6, 0.8, 1.0)


def heldout_clips(count: int, *, seed: int = 0, frames: int = 17, size: int = 128):
    """``count`` true clips that training never drew: the ``eval_captions`` set (every
    motion equally often), motions from clip seeds of the ``"diagnose"`` split.

    Returns ``(captions, video)`` with ``video`` ``(count, 3, frames, size, size)`` in [-1, 1].
    """
    from gen.eval_tiny import eval_captions

    from .clips import render_clip, sample_motion
    from .data import clip_seed
    from .grammar import MOTIONS

    per_motion = -(-count // len(MOTIONS))
    caps = eval_captions(per_motion, seed)
    # interleave the motions so that any prefix is balanced
    caps = [caps[m * per_motion + k] for k in range(per_motion) for m in range(len(MOTIONS))][:count]
    videos = []
    for i, cap in enumerate(caps):
        rng = np.random.default_rng(clip_seed(seed, "diagnose", i))
        m = sample_motion(cap, rng, frames=frames, size=size)
        videos.append(render_clip(cap, m, frames=frames, size=size))
    video = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3)
    return caps, video * 2.0 - 1.0


def _to_u8(video: torch.Tensor) -> np.ndarray:
    """``(B, 3, F, H, W)`` in [-1, 1] -> ``(B, F, H, W, 3)`` uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def _centroids(frames: np.ndarray) -> np.ndarray:
    """Per frame the foreground centroid ``(x, y)`` (NaN where nothing is read), as the vision finds it."""
    from .vision import _labels

    lab = _labels(frames)
    border = np.concatenate([lab[:, 0].ravel(), lab[:, -1].ravel(), lab[:, :, 0].ravel(), lab[:, :, -1].ravel()])
    mask = lab != np.bincount(border).argmax()
    yy, xx = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]]
    out = np.full((len(frames), 2), np.nan)
    for i, m in enumerate(mask):
        if m.sum() >= 20:
            out[i] = (xx * m).sum() / m.sum(), (yy * m).sum() / m.sum()
    return out


@dataclass
class DiagnoseResult:
    """Rows of ``diagnose``: ``rows[name]`` holds the fractions right per attribute, ``psnr``
    (dB, against the true clip; absent for ``truth``), ``centroid_px`` and, per motion,
    ``motion_by_caption``."""

    rows: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def markdown(self) -> str:
        cols = ["colour", "background", "shape", "motion", "colour and motion", "one object", "PSNR dB",
                "centroid error px"]
        lines = ["| reading | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, r in self.rows.items():
            vals = [f"{100 * r[a]:.0f}%" for a in ATTRIBUTES]
            vals.append("-" if r.get("psnr") is None else f"{r['psnr']:.1f}")
            vals.append("-" if r.get("centroid_px") is None else f"{r['centroid_px']:.1f}")
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        return "\n".join(lines)

    def motion_markdown(self) -> str:
        """Motion right per caption motion (one column per motion)."""
        motions = list(next(iter(self.rows.values()))["motion_by_caption"])
        lines = ["| reading | " + " | ".join(motions) + " |", "|---" * (len(motions) + 1) + "|"]
        for name, r in self.rows.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * r['motion_by_caption'][m]:.0f}%" for m in motions) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": self.rows}, indent=1)


def _score(name: str, frames: np.ndarray, caps, truth: np.ndarray, true_tracks: list[np.ndarray]) -> dict:
    from .vision import score_clip

    verdicts = [score_clip(f, c) for f, c in zip(frames, caps)]
    row: dict = {a: float(np.mean([v[a] for v in verdicts if v[a] is not None])) for a in ATTRIBUTES}
    row["motion_by_caption"] = {
        m: float(np.mean([bool(v["motion"]) for v, c in zip(verdicts, caps) if c.motion == m]))
        for m in dict.fromkeys(c.motion for c in caps)
    }
    if name != "truth":
        mse = ((frames.astype(np.float64) - truth.astype(np.float64)) / 255.0) ** 2
        row["psnr"] = float(np.mean([10 * np.log10(1 / max(e.mean(), 1e-10)) for e in mse]))
        # per frame where a foreground was read (a clip with none read counts nowhere)
        dists = np.concatenate([np.hypot(*(_centroids(f) - t).T) for f, t in zip(frames, true_tracks)])
        dists = dists[~np.isnan(dists)]
        row["centroid_px"] = float(dists.mean()) if dists.size else float("nan")
    row["verdicts"] = [{a: v[a] for a in ATTRIBUTES} for v in verdicts]
    return row


@torch.no_grad()
def diagnose(model_path: str | Path, *, clips: int = 48, levels: tuple[float, ...] = LEVELS,
             modes: tuple[str, ...] = ("onestep", "denoise"), steps: int = 25, guidance: float = 5.0,
             batch: int = 8, seed: int = 0, device: str | None = None, progress: bool = True) -> DiagnoseResult:
    """Score the VAE round trip and the transformer's teacher-forced reconstructions of
    ``clips`` held-out true clips at each noise level of ``levels`` (see the module docstring).

    Args:
        model_path: a ``shapes-wan`` pipeline folder.
        clips: held-out clips (``heldout_clips``).
        levels: noise levels ``t`` in (0, 1].
        modes: ``"onestep"`` and/or ``"denoise"``.
        steps, guidance: the sampler's steps and guidance scale (the model's defaults: 25, 5).
        batch: clips per forward.
        seed: data and noise seed.
        device: default CUDA when available.
        progress: show a progress bar.
    """
    from diffusers import WanPipeline
    from tqdm.auto import tqdm

    from .data import fast_vae_norms, normalize_latents

    dev = default_device(device)
    pipe = WanPipeline.from_pretrained(str(model_path), local_files_only=True).to(dev)
    vae, tr = pipe.vae, pipe.transformer
    mean = torch.tensor(vae.config.latents_mean, device=dev).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=dev).view(1, -1, 1, 1, 1)

    def decode(z_norm: torch.Tensor) -> np.ndarray:
        with fast_vae_norms(vae):
            return _to_u8(vae.decode(z_norm * std + mean).sample)

    caps, video = heldout_clips(clips, seed=seed)
    truth = _to_u8(video)
    true_tracks = [_centroids(f) for f in truth]
    names = ["truth", "vae"] + [f"{m}@{t:.1f}" for m in modes for t in levels]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    out["truth"] = [truth]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    n_batches = -(-clips // batch)
    with tqdm(total=n_batches * (len(names) - 1), desc="diagnose", unit="decode", disable=not progress) as bar:
        for b0 in range(0, clips, batch):
            part = caps[b0 : b0 + batch]
            x = video[b0 : b0 + batch].to(dev)
            with fast_vae_norms(vae):
                z = vae.encode(x).latent_dist.mode()
            x0 = normalize_latents(z, vae)
            out["vae"].append(decode(x0))
            bar.update(1)
            cond, uncond = pipe.encode_prompt([c.text() for c in part], [""] * len(part),
                                              do_classifier_free_guidance=guidance > 1.0, device=dev)
            noise = torch.randn(x0.shape, generator=gen).to(dev)

            def velocity(xt, t_scalar, cond=cond, uncond=uncond):
                ts = torch.full((xt.shape[0],), float(t_scalar), device=dev)
                v = tr(xt, ts, cond, return_dict=False)[0]
                if guidance > 1.0:
                    vu = tr(xt, ts, uncond, return_dict=False)[0]
                    v = vu + guidance * (v - vu)
                return v

            for t in levels:
                if "onestep" in modes:
                    xt = (1 - t) * x0 + t * noise
                    out[f"onestep@{t:.1f}"].append(decode(xt - t * velocity(xt, 1000 * t)))
                    bar.update(1)
            if "denoise" in modes:
                sched = pipe.scheduler
                for t in levels:
                    sched.set_timesteps(steps, device=dev)
                    sig = sched.sigmas[:-1].float().cpu()
                    k = int(torch.nonzero(sig <= t + 1e-6)[0]) if bool((sig <= t + 1e-6).any()) else len(sig) - 1
                    s0 = float(sig[k])
                    xt = ((1 - s0) * x0 + s0 * noise).float()
                    sched.set_timesteps(steps, device=dev)  # a fresh solver, started at step k
                    sched.set_begin_index(k)
                    for ts in sched.timesteps[k:]:
                        v = velocity(xt, ts)
                        xt = sched.step(v, ts, xt, return_dict=False)[0]
                    out[f"denoise@{t:.1f}"].append(decode(xt))
                    bar.update(1)
    res = DiagnoseResult()
    for n in names:
        frames = np.concatenate(out[n])
        res.rows[n] = _score(n, frames, caps, truth, true_tracks)
    res.meta = {"model_path": str(model_path), "clips": clips, "levels": list(levels), "steps": steps,
                "guidance": guidance, "seed": seed, "device": str(dev),
                "seconds": round(time.perf_counter() - t0, 1), "captions": [c.text() for c in caps]}
    return res


@torch.no_grad()
def word_sensitivity(model_path: str | Path, *, levels: tuple[float, ...] = (1.0, 0.9, 0.6), guidance: float = 5.0,
                     latents: int = 4, seed: int = 0, device: str | None = None) -> dict[str, dict[str, float]]:
    """How far the transformer's guided ``x0`` estimate moves when only the motion word of
    the caption changes, against when only the colour word does.

    For each level ``t``, ``latents`` noise latents ``x_t = t eps`` (a zero clean latent)
    are predicted under the 6 captions ``a red circle <motion> on a gray background`` and
    the 6 captions ``a <colour> circle moving left on a gray background``; the result is
    the mean pairwise ``|x0_a - x0_b| / |x0_a|`` per word set (``"t=1.0"`` keys), and
    ``"text"``: the same for the padded prompt embeddings themselves. ``"swap"`` is the
    same distance between ``a white triangle moving right on a green background`` and
    the caption with the two colours swapped: near 0 when the model reads the colours as
    a bag of words (the shape's colour and the background's undecided).
    """
    import itertools

    from diffusers import WanPipeline

    from .grammar import FOREGROUNDS, MOTIONS, Caption

    dev = default_device(device)
    pipe = WanPipeline.from_pretrained(str(model_path), local_files_only=True).to(dev)
    tr = pipe.transformer
    sets = {"motion": [Caption("circle", "red", m, "gray").text() for m in MOTIONS],
            "colour": [Caption("circle", c, "left", "gray").text() for c in FOREGROUNDS],
            "swap": [Caption("triangle", "white", "right", "green").text(),
                     Caption("triangle", "green", "right", "white").text()]}

    def spread(xs):
        d = [float((a - b).norm() / a.norm()) for a, b in itertools.combinations(xs, 2)]
        return sum(d) / len(d)

    noise = torch.randn(latents, tr.config.in_channels, 5, 16, 16, generator=torch.Generator().manual_seed(seed)).to(dev)
    uncond = pipe.encode_prompt([""], None, do_classifier_free_guidance=False, device=dev)[0]
    embeds = {k: pipe.encode_prompt(v, None, do_classifier_free_guidance=False, device=dev)[0] for k, v in sets.items()}
    out: dict[str, dict[str, float]] = {"text": {k: spread(list(e)) for k, e in embeds.items()}}
    for t in levels:
        xt, ts = t * noise, torch.full((latents,), 1000.0 * t, device=dev)
        vu = tr(xt, ts, uncond.expand(latents, -1, -1), return_dict=False)[0]
        row = {}
        for k, e in embeds.items():
            x0s = []
            for emb in e:
                v = tr(xt, ts, emb[None].expand(latents, -1, -1), return_dict=False)[0]
                x0s.append(xt - t * (vu + guidance * (v - vu)))
            row[k] = spread(x0s)
        out[f"t={t:.1f}"] = row
    return out


@torch.no_grad()
def shift_sensitivity(model_path: str | Path, *, levels: tuple[float, ...] = (1.0, 0.9, 0.6), latents: int = 4,
                      shift: int = 2, seed: int = 0, device: str | None = None) -> dict[str, dict[str, float]]:
    """Whether the transformer places things by where they are in its input or by the words.

    For each level ``t``, ``latents`` noise latents ``x_t = t eps`` are predicted under
    ``a red circle moving left on a gray background`` (unguided ``x0 = x_t - t v``), then
    again with ``x_t`` rolled ``shift`` latent pixels sideways (one token at patch 2), and
    with the caption's ``left`` changed to ``right``. Over the columns the roll does not
    wrap, with ``D = |x0(rolled) - x0|``:

    * ``"equivariance"``: ``|x0(rolled) - rolled x0| / D``; 0 for a model whose picture
      moves exactly with its input (no sense of absolute position), larger the more it
      keeps things at absolute places;
    * ``"motion_word"``: ``|x0(right) - x0(left)| / D``: how much the motion word moves the
      estimate against a one-token move of the noise.

    Returns ``{"t=1.0": {"equivariance": ..., "motion_word": ...}, ...}``.
    """
    from diffusers import WanPipeline

    dev = default_device(device)
    pipe = WanPipeline.from_pretrained(str(model_path), local_files_only=True).to(dev)
    tr = pipe.transformer
    texts = ["a red circle moving left on a gray background", "a red circle moving right on a gray background"]
    left, right = pipe.encode_prompt(texts, None, do_classifier_free_guidance=False, device=dev)[0]
    gen = torch.Generator().manual_seed(seed)
    w = 16
    inner = slice(2 * shift, w - 2 * shift)
    out: dict[str, dict[str, float]] = {}
    for t in levels:
        xt = t * torch.randn(latents, tr.config.in_channels, 5, w, w, generator=gen).to(dev)
        ts = torch.full((latents,), 1000.0 * t, device=dev)

        def x0(x, emb, t=t, ts=ts):
            return x - t * tr(x, ts, emb[None].expand(latents, -1, -1), return_dict=False)[0]

        base = x0(xt, left)
        rolled = x0(torch.roll(xt, shift, dims=4), left)
        other = x0(xt, right)
        moved = (rolled - base)[..., inner].norm()
        out[f"t={t:.1f}"] = {
            "equivariance": float((rolled - torch.roll(base, shift, dims=4))[..., inner].norm() / moved),
            "motion_word": float((other - base)[..., inner].norm() / moved),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gen.pipelines.shapes.diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="pipeline folder (default: the bundled shapes-wan)")
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--modes", nargs="+", default=["onestep", "denoise"], choices=["onestep", "denoise"])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=8, help="clips per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--words", action="store_true", help="only the motion-word / colour-word / colour-role sensitivity")
    p.add_argument("--shift", action="store_true", help="only the translation-equivariance probe")
    a = p.parse_args(argv)
    path = a.model_path or str(Path(__file__).resolve().parent.parent / "weights" / "shapes-wan")
    if a.words:
        sens = word_sensitivity(path, guidance=a.guidance, seed=a.seed, device=a.device)
        print("| | motion words | colour words | colours swapped |\n|---|---|---|---|")
        for k, r in sens.items():
            print(f"| {k} | {100 * r['motion']:.0f}% | {100 * r['colour']:.0f}% | {100 * r['swap']:.0f}% |")
        return
    if a.shift:
        sens = shift_sensitivity(path, seed=a.seed, device=a.device)
        print("| | equivariance residual | motion word / one-token shift |\n|---|---|---|")
        for k, r in sens.items():
            print(f"| {k} | {r['equivariance']:.2f} | {r['motion_word']:.3f} |")
        return
    res = diagnose(path, clips=a.clips, levels=tuple(a.levels), modes=tuple(a.modes), steps=a.steps,
                   guidance=a.guidance, batch=a.batch, seed=a.seed, device=a.device)
    print(res.markdown())
    print()
    print(res.motion_markdown())
    print(f"\n{res.meta['clips']} clips, {res.meta['seconds']} s on {res.meta['device']}")
    if a.out:
        Path(a.out).write_text(res.to_json())


if __name__ == "__main__":
    main()
