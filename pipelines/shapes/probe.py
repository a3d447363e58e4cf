"""The latent-space motion probe: can the shapes transformer learn a caption's direction at all?

``gen train-tiny`` takes hours on 2 CPU cores, and its clips mix the question "does the
transformer relate one latent frame to the next, as the caption says" with the VAE, the
shapes and the colours. This probe asks only that question, in minutes: a fresh text
encoder and transformer of the shipped architecture (``build_components``, so every
``DitTrain`` start option applies) are trained with the same flow-matching objective on
latents drawn directly, one Gaussian bump in channel 0 (the other 15 channels zero)
moving on a torus (no edge, so no absolute position is needed) by a fixed step per latent
frame in the caption's direction. The direction is read back from the bump's circular
centroid:

* ``teacher``: one ``x0`` estimate from a true probe clip noised to ``sigma``; does it keep
  the clip's direction (and, given the opposite caption, which one does it follow)?
* ``sampled``: clips generated from noise with the pipeline's scheduler and guidance;
  does their direction match the caption? Chance is one in the number of motions.

    python -m gen.pipelines.shapes.probe --steps 2000 --set dit.video_local_heads=1 --out probe.json
    python -m gen.pipelines.shapes.probe --device cuda --steps 40000 --motions left,right ...
    python -m gen.pipelines.shapes.probe --motions left,right --steer-start --set dit.video_local_heads=1

The runs so far are in this folder's README: "One clip under every motion, and a
latent-space test", "Frame to frame", "Where the motion word is lost" and "A path for the
signal".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .clips import DIRECTIONS as _CLIP_DIRECTIONS
from .config import COMPONENTS, DitTrain
from .grammar import Caption, sample_caption

logger = logging.getLogger("gen.pipelines.shapes")

__all__ = ["ProbeConfig", "bump_clips", "caption_reach", "read_directions", "run_probe", "sampled_accuracy",
           "teacher_accuracy"]

# Unit step of each motion word on the (x, y) latent grid: the clips' directions, and still.
DIRECTIONS = {**_CLIP_DIRECTIONS, "still": (0.0, 0.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "right"}


@dataclass(frozen=True)
class ProbeConfig:
    """One probe run.

    Attributes:
        steps: optimiser steps (0.6 s each on one CPU core at the defaults).
        batch: clips per step, each a fresh caption, start and noise.
        lr: peak AdamW learning rate (warm-up ``warmup`` steps, cosine to 10%).
        warmup: linear warm-up steps.
        ema: EMA decay of the weights that are scored.
        shift: shift of the training noise levels (the scheduler's 3).
        speed: the bump's step per latent frame, latent pixels (2 = one token).
        frames: latent frames (5: the shipped 17-frame clips).
        side: latent pixels per side (16: the shipped 128-pixel clips, 8 x 8 tokens).
        height: the bump's peak value in channel 0.
        width: the bump's Gaussian width, latent pixels.
        motions: the motion words drawn (each clip one, uniformly).
        eval_every: score every this many steps (and at the end).
        eval_clips: clips per score (sampled: an equal share per motion).
        eval_steps: scheduler steps of a sampled clip.
        guidance: classifier-free guidance of a sampled clip (negative prompt ``""``).
        levels: the teacher-forced noise levels.
        reach_level: the noise level of ``caption_reach`` (where the caption must decide).
        seed: the weights, the data and the noise.
        steer_start: build ``steer.steer_start`` into the fresh model: block 0's
            cross-attention writes the motion word along an x and a y direction that later
            blocks' head 2 turns into a look ``speed / 2`` tokens against the motion in the
            previous frame (speed below 3.14).
        guard_writer: with ``steer_start``, keep the writer as built while the rest trains
            (``steer.WriterGuard``: the writer head out of the gradient, its rows restored
            after every step, its score of the motion word held).
        train_text: train the text encoder with the transformer (False: frozen).
        frozen: transformer parameter name prefixes held at their start (e.g.
            ``"blocks.0.attn2"``: block 0's whole cross-attention, every head and norm).
    """

    steps: int = 2000
    batch: int = 12
    lr: float = 2e-3
    warmup: int = 50
    ema: float = 0.99
    shift: float = 3.0
    speed: float = 2.0
    frames: int = 5
    side: int = 16
    height: float = 3.0
    width: float = 1.5
    motions: tuple[str, ...] = ("left", "right", "up", "down", "still")
    eval_every: int = 500
    eval_clips: int = 40
    eval_steps: int = 20
    guidance: float = 5.0
    levels: tuple[float, ...] = (0.5, 0.7, 0.85)
    reach_level: float = 0.9
    seed: int = 0
    steer_start: bool = False
    guard_writer: bool = False
    train_text: bool = True
    frozen: tuple[str, ...] = ()
    dit: DitTrain = field(default_factory=DitTrain)

    def __post_init__(self):
        unknown = [m for m in self.motions if m not in DIRECTIONS]
        if unknown or not self.motions:
            raise ValueError(f"probe motions must be some of {', '.join(DIRECTIONS)}; got {list(self.motions)}.")
        for name in ("steps", "batch", "eval_every", "eval_clips", "eval_steps", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not self.speed > 0 or not self.width > 0:
            raise ValueError(f"speed and width must be positive, got {self.speed} and {self.width}.")
        if not 0.0 < self.reach_level <= 1.0:
            raise ValueError(f"reach_level must be in (0, 1], got {self.reach_level}.")
        if self.steer_start and not self.speed / 2 < math.pi / 2:
            raise ValueError(f"steer_start turns a RoPE phase by the speed in tokens (speed / 2), which must "
                             f"stay under 1.57: speed below 3.14, got {self.speed}.")
        if self.guard_writer and not self.steer_start:
            raise ValueError("guard_writer keeps steer_start's writer: it needs steer_start.")
        if self.side % 2 or self.side < 4:
            raise ValueError(f"side must be even and at least 4 (2 x 2 patches), got {self.side}.")


def bump_clips(rng: np.random.Generator, count: int, cfg: ProbeConfig,
               motions: list[str] | None = None) -> tuple[torch.Tensor, list[Caption]]:
    """``count`` probe clips: latents ``(count, 16, frames, side, side)`` and their captions
    (shape, colours and background random, the motion from ``motions`` or drawn from
    ``cfg.motions``); each bump starts at a uniform point of the torus."""
    s = cfg.side
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    latents = torch.zeros(count, COMPONENTS["transformer"]["in_channels"], cfg.frames, s, s)
    captions = []
    for i in range(count):
        cap = sample_caption(rng)
        motion = motions[i] if motions is not None else cfg.motions[int(rng.integers(len(cfg.motions)))]
        captions.append(Caption(cap.shape, cap.color, motion, cap.background))
        cx, cy = rng.uniform(0, s, 2)
        dx, dy = DIRECTIONS[motion]
        for f in range(cfg.frames):
            ox = (xx - cx - cfg.speed * dx * f + s / 2) % s - s / 2
            oy = (yy - cy - cfg.speed * dy * f + s / 2) % s - s / 2
            latents[i, 0, f] = cfg.height * torch.exp(-(ox**2 + oy**2) / (2 * cfg.width**2))
    return latents, captions


def read_directions(latents: torch.Tensor, speed: float) -> list[str]:
    """The motion word of each clip ``(B, C, F, H, W)``: the mean frame-to-frame step of
    channel 0's circular centroid (negative values clipped), ``still`` below 0.3 ``speed``,
    else the larger axis's sign."""
    w = latents[:, 0].float().clamp_min(0)  # (B, F, H, W)
    side = w.shape[-1]
    angle = 2 * math.pi * torch.arange(side) / side

    def centre(axis_shape):
        s = (w * torch.sin(angle).view(*axis_shape)).sum((-1, -2))
        c = (w * torch.cos(angle).view(*axis_shape)).sum((-1, -2))
        return torch.atan2(s, c)  # (B, F)

    def mean_step(p):
        d = torch.diff(p, dim=1)
        return (((d + math.pi) % (2 * math.pi) - math.pi).mean(1) * side / (2 * math.pi)).tolist()

    out = []
    for sx, sy in zip(mean_step(centre((1, side))), mean_step(centre((side, 1)))):
        if max(abs(sx), abs(sy)) < 0.3 * speed:
            out.append("still")
        elif abs(sx) >= abs(sy):
            out.append("right" if sx > 0 else "left")
        else:
            out.append("down" if sy > 0 else "up")
    return out


class _Model:
    """The probe's text encoder, transformer and tokenizer, predicting with padded text."""

    def __init__(self, cfg: ProbeConfig, device: torch.device = torch.device("cpu")):
        from .data import PaddedTextAttention
        from .train import _install, build_components

        parts = build_components(cfg.seed, cfg.dit)  # built on the CPU: the same start on any device
        self.device = device
        parts["transformer"].to(device)
        parts["text_encoder"].to(device)
        self.transformer, self.text_encoder, self.tokenizer = (parts["transformer"], parts["text_encoder"],
                                                               parts["tokenizer"])
        self.proc = PaddedTextAttention(cfg.dit.text_len)
        _install(self.transformer, "attn2", self.proc)
        if cfg.steer_start:
            from .steer import steer_start

            steer_start(self, cfg, step=cfg.speed / 2)  # 2 latent pixels a token

    def predict(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The flow prediction ``v`` (on the model's device) for latents ``x`` at noise
        levels ``sigma`` ``(B,)`` in [0, 1] (on any device)."""
        x, sigma = x.to(self.device), sigma.to(self.device)
        text = self.proc.encode(self.tokenizer, self.text_encoder, prompts)
        return self.transformer(x, sigma * 1000, text, return_dict=False)[0]


@torch.no_grad()
def teacher_accuracy(model: _Model, clips: torch.Tensor, captions: list[Caption], sigma: float, speed: float,
                     noise: torch.Tensor, *, opposite: bool = False) -> tuple[float, float]:
    """One ``x0`` estimate per clip from ``(1 - sigma) clip + sigma noise``, given each
    clip's caption (or, ``opposite``, the caption with the opposite motion). Returns the
    fractions whose estimate reads the clip's direction and the prompted direction."""
    prompted = [Caption(c.shape, c.color, OPPOSITE[c.motion], c.background) if opposite else c for c in captions]
    xt = (1 - sigma) * clips + sigma * noise
    v = model.predict(xt, torch.full((len(captions),), float(sigma)), [c.text() for c in prompted]).cpu()
    got = read_directions(xt - sigma * v, speed)
    return (float(np.mean([g == c.motion for g, c in zip(got, captions)])),
            float(np.mean([g == c.motion for g, c in zip(got, prompted)])))


def _keeper(record: dict, key: str, *, first_input: bool = False):
    """A forward hook (or, ``first_input``, pre-hook) that keeps a module's output (first
    input) under ``key``; returns None, so the forward is unchanged."""

    def hook(module, args, output=None):
        record.setdefault(key, args[0] if first_input else output)

    return hook


def _cross_attention(model: _Model, x: torch.Tensor, sigma: torch.Tensor, prompts: list[str]) -> list[dict]:
    """One forward; per block, the cross-attention's weights ``(B, heads, tokens, rows)`` over
    the short text rows (the padding's share on the kept zero rows, as ``PaddedTextAttention``
    counts it), its output and the hidden state entering the block ``(B, tokens, width)``,
    all on the CPU."""
    got = [{} for _ in model.transformer.blocks]
    hooks = []
    for block, rec in zip(model.transformer.blocks, got):
        attn = block.attn2
        hooks += [attn.norm_q.register_forward_hook(_keeper(rec, "q")),
                  attn.norm_k.register_forward_hook(_keeper(rec, "k")),
                  attn.register_forward_hook(_keeper(rec, "out")),
                  block.register_forward_pre_hook(_keeper(rec, "hidden", first_input=True))]
    try:
        model.predict(x, sigma, prompts)
    finally:
        for h in hooks:
            h.remove()
    bias = model.proc.bias.cpu().double()  # (B, 1, 1, rows)
    out = []
    for block, rec in zip(model.transformer.blocks, got):
        q = rec["q"].cpu().double().unflatten(2, (block.attn2.heads, -1))
        k = rec["k"].cpu().double().unflatten(2, (block.attn2.heads, -1))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5 + bias
        out.append({"weights": scores.softmax(-1), "out": rec["out"].cpu(), "hidden": rec["hidden"].cpu()})
    return out


@torch.no_grad()
def caption_reach(model: _Model, clips: torch.Tensor, captions: list[Caption], sigma: float,
                  noise: torch.Tensor) -> list[dict[str, float]]:
    """How far the motion word gets into the transformer, for ``clips`` noised to ``sigma``.

    Per block: ``motion_word``, the share of the cross-attention (mean over heads, video
    tokens and clips) on the motion word's text row; ``opposite_change``, how much the
    cross-attention's output moves when the caption's motion is swapped for the opposite one,
    ``|out - out_opposite| / |hidden|`` per clip (the hidden state entering the block), mean
    over clips. A caption that steers the motion needs both well above 0."""
    xt = (1 - sigma) * clips + sigma * noise
    sig = torch.full((len(captions),), float(sigma))
    opposite = [Caption(c.shape, c.color, OPPOSITE[c.motion], c.background) for c in captions]
    texts = [c.text() for c in captions]
    ids = model.tokenizer(texts).input_ids
    rows = [row.index(model.tokenizer.convert_tokens_to_ids(c.motion)) for row, c in zip(ids, captions)]
    true = _cross_attention(model, xt, sig, texts)
    flipped = _cross_attention(model, xt, sig, [c.text() for c in opposite])
    result = []
    for a, b in zip(true, flipped):
        on_word = torch.stack([a["weights"][i, :, :, r].mean() for i, r in enumerate(rows)])
        change = (a["out"] - b["out"]).flatten(1).norm(dim=1) / a["hidden"].flatten(1).norm(dim=1)
        result.append({"motion_word": float(on_word.mean()), "opposite_change": float(change.mean())})
    return result


@torch.no_grad()
def sampled_accuracy(model: _Model, cfg: ProbeConfig, seed: int, reads: dict | None = None) -> dict[str, float]:
    """Clips generated from noise for "a red circle moving <m> on a blue background", an
    equal share of ``cfg.eval_clips`` per motion: the fraction read as their caption's
    motion, per motion and ``"all"``. ``reads``, if given, gets per motion word how many
    of its clips were read as each direction (a model below chance moves the other way, or
    not at all: this tells which)."""
    from diffusers import UniPCMultistepScheduler

    per = max(1, cfg.eval_clips // len(cfg.motions))
    scheduler = UniPCMultistepScheduler(**COMPONENTS["scheduler"])
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for motion in cfg.motions:
        prompt = Caption("circle", "red", motion, "blue").text()
        x = torch.randn(per, COMPONENTS["transformer"]["in_channels"], cfg.frames, cfg.side, cfg.side,
                        generator=gen).to(model.device)
        scheduler.set_timesteps(cfg.eval_steps)
        for t in scheduler.timesteps:
            sigma = (t / 1000).expand(per).float()
            cond = model.predict(x, sigma, [prompt] * per)
            uncond = model.predict(x, sigma, [""] * per)
            x = scheduler.step(uncond + cfg.guidance * (cond - uncond), t, x).prev_sample
        got = read_directions(x.cpu(), cfg.speed)
        result[motion] = float(np.mean([g == motion for g in got]))
        if reads is not None:
            reads[motion] = {d: got.count(d) for d in sorted(set(got))}
    result["all"] = float(np.mean([result[m] for m in cfg.motions]))
    return result


def run_probe(cfg: ProbeConfig, *, device: str | torch.device = "cpu", progress: bool = True) -> list[dict]:
    """Train the probe for ``cfg.steps`` steps on ``device`` and score its EMA weights every
    ``cfg.eval_every`` steps and at the end. Clips, noise and noise levels are drawn on the
    CPU whatever the device, so a run differs between devices only by arithmetic.
    Returns the log: one dict per score with
    ``step``, ``loss`` (mean since the last score), ``seconds``, ``teacher`` (per level:
    clip's direction; and the opposite caption's share of the estimates at that level),
    ``sampled`` (per motion and ``"all"``) and ``reach`` (``caption_reach`` at
    ``cfg.reach_level``, one dict per block)."""
    from tqdm.auto import tqdm

    from .data import caption_texts
    from .train import _Ema, _schedule, _step, _trainable, flow_loss, shifted_sigmas

    model = _Model(cfg, torch.device(device))
    tr, te = model.transformer, model.text_encoder
    trained = [tr, te] if cfg.train_text else [tr]
    if not cfg.train_text:
        te.requires_grad_(False)
    for prefix in cfg.frozen:
        held = [p for name, p in tr.named_parameters() if name == prefix or name.startswith(prefix + ".")]
        if not held:
            raise ValueError(f"frozen: no transformer parameter is named {prefix!r} or under it "
                             f"(names look like 'blocks.0.attn2.to_q.weight').")
        for p in held:
            p.requires_grad_(False)
    params = _trainable(*trained)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.dit.weight_decay)
    ema = _Ema(trained, cfg.ema)
    guard = None
    if cfg.guard_writer:
        from .steer import WriterGuard

        guard = WriterGuard(model, cfg)
    rng, gen = np.random.default_rng(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    held, held_caps = bump_clips(np.random.default_rng(cfg.seed + 1), cfg.eval_clips, cfg)
    held_noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(cfg.seed + 2))
    log, losses, start = [], [], time.perf_counter()

    def score(step: int) -> dict:
        live = [p.detach().clone() for p in params]
        ema.copy_to_model()
        tr.eval(), te.eval()
        teacher = {}
        for level in cfg.levels:
            follows, _ = teacher_accuracy(model, held, held_caps, level, cfg.speed, held_noise)
            _, obeys = teacher_accuracy(model, held, held_caps, level, cfg.speed, held_noise, opposite=True)
            teacher[str(level)] = {"clip": follows, "opposite_caption": obeys}
        reach = caption_reach(model, held, held_caps, cfg.reach_level, held_noise)
        entry = {"step": step, "loss": float(np.mean(losses)) if losses else None,
                 "seconds": round(time.perf_counter() - start, 1), "teacher": teacher,
                 "sampled": sampled_accuracy(model, cfg, cfg.seed + 3, reads := {}), "sampled_reads": reads,
                 "reach": reach}
        if cfg.steer_start:
            from .steer import writer_scores

            entry["writer"] = dict(zip(("score", "share"), writer_scores(model, cfg)))
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)
        tr.train(), te.train()
        logger.info("probe step %d: loss %s, sampled %.0f%% right (read as: %s), teacher %s; motion word %s of "
                    "the cross-attention, its swap moves it by %s", step, entry["loss"], 100 * entry["sampled"]["all"],
                    "; ".join(f"{m}: {r}" for m, r in reads.items()),
                    ", ".join(f"{k}: {100 * v['clip']:.0f}%" for k, v in teacher.items()),
                    " / ".join(f"{100 * r['motion_word']:.1f}%" for r in reach),
                    " / ".join(f"{100 * r['opposite_change']:.2f}%" for r in reach))
        return entry

    tr.train(), te.train()
    for step in tqdm(range(cfg.steps), desc="probe", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * _schedule(step, cfg.steps, cfg.warmup)
        x0, caps = bump_clips(rng, cfg.batch, cfg)
        prompts = caption_texts(caps, rng, drop_caption=cfg.dit.drop_caption)
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(cfg.batch, generator=gen), cfg.shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model.predict((1 - s) * x0 + s * noise, sigma, prompts)
        losses.append(_step(opt, flow_loss(pred, noise.to(model.device), x0.to(model.device)), params, ema))
        if guard is not None:
            guard(ema)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            log.append(score(step + 1))
            losses = []
    if guard is not None:
        guard.remove()
    return log


def main(argv: list[str] | None = None) -> None:
    # gen.values is a leaf module (torch only), like the gen._io this folder already uses:
    # the probe refuses a device as the CLI does, with the same words.
    from gen.values import check_device

    from .config import TrainConfig, override_config

    p = argparse.ArgumentParser(prog="python -m gen.pipelines.shapes.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=ProbeConfig.steps)
    p.add_argument("--speed", type=float, default=ProbeConfig.speed, help="latent pixels per latent frame")
    p.add_argument("--motions", default=",".join(ProbeConfig.motions), help="comma-separated motion words")
    p.add_argument("--eval-every", type=int, default=ProbeConfig.eval_every)
    p.add_argument("--seed", type=int, default=ProbeConfig.seed)
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="dit.FIELD=VALUE",
                   help="a DitTrain start option, as gen train-tiny takes it (e.g. dit.video_local_heads=1)")
    p.add_argument("--steer-start", action="store_true",
                   help="start with the caption wired to a steered head (see steer.py)")
    p.add_argument("--guard-writer", action="store_true",
                   help="with --steer-start: keep the writer as built while the rest trains (steer.WriterGuard)")
    p.add_argument("--freeze-text", action="store_true", help="do not train the text encoder")
    p.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                   help="hold the transformer's parameters under this name at their start (e.g. blocks.0.attn2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N); the probe's 2000 steps take 20 min on one core")
    p.add_argument("--out", default=None, help="write the config and log as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    bad = [s for s in args.settings if not s.strip().startswith("dit.")]
    if bad:
        raise SystemExit(f"--set takes dit.* settings only here, got {bad}.")
    try:
        device = check_device(args.device)
        dit = override_config(TrainConfig(), args.settings).dit
        cfg = ProbeConfig(steps=args.steps, speed=args.speed, motions=tuple(args.motions.split(",")),
                          eval_every=args.eval_every, seed=args.seed, steer_start=args.steer_start,
                          guard_writer=args.guard_writer, train_text=not args.freeze_text, frozen=tuple(args.freeze), dit=dit)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    try:
        log = run_probe(cfg, device=device)
    except ValueError as err:  # settings only the built model can check (a --freeze name)
        raise SystemExit(str(err)) from None
    if args.out:
        from gen._io import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps({"config": asdict(cfg), "log": log}, indent=1))
    print(json.dumps(log[-1], indent=1))


if __name__ == "__main__":
    main()
