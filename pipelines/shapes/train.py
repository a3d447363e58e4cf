"""Training the ``shapes-wan`` models from a seed: VAE, then text encoder + transformer,
then (``causal=True``) the block-causal transformer.

Stages (defaults in ``gen.pipelines.shapes.config.TrainConfig``):

1. **VAE** (``train_vae``): ``AutoencoderKLWan`` on random 64x64 crops of 9-frame clips,
   L1 + MSE in pixels plus a small KL term; then ``latents_mean``/``latents_std`` are
   measured on full clips and written into its config (the pipeline normalises with them).
2. **Text-to-video** (``train_t2v``): clips encoded once to latents; the UMT5 encoder and
   ``WanTransformer3DModel`` trained together with Wan's flow-matching objective
   (``x_t = (1 - s) x0 + s eps``, target ``eps - x0``, ``t = 1000 s``, ``s`` shifted as the
   scheduler's ``flow_shift``), captions dropped for guidance, EMA weights saved.
3. **Causal** (``train_causal``): the text-to-video transformer fine-tuned for chunk-by-chunk
   generation (diffusion forcing): block-causal attention over 3-frame chunks (a token sees
   every token up to the end of its chunk, as ``gen.pipelines.ar``'s runner attends), a noise
   level per chunk through the stock per-token timestep path, on 45-frame clips whose
   shapes wrap around the frame.

``train_shapes_wan(out, ...)`` runs stages 1-2 and saves a ``WanPipeline`` folder;
``train_shapes_wan_causal(out, base=...)`` runs stage 3 from a saved text-to-video folder.
Every random draw comes from the seed, so a run on the same machine and library versions
gives the same weights (float reductions may differ across CPUs and GPUs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .config import COMPONENTS, CausalTrain, DitTrain, TrainConfig, VaeTrain
from .data import (
    LatentSet,
    PaddedTextAttention,
    caption_texts,
    clip_batch,
    encode_clips,
    fast_vae_norms,
    latent_stats,
    pixel_foreground,
)
from .resume import StageCheckpoint, generator_state, set_generator_state

logger = logging.getLogger("gen.pipelines.shapes")

__all__ = [
    "block_causal_mask",
    "build_components",
    "chunk_levels",
    "flow_loss",
    "padding_parameters",
    "train_causal",
    "train_t2v",
    "train_vae",
]

Log = list[dict[str, Any]]


def _fork(seed: int, what: str) -> int:
    import zlib

    return (seed * 1_000_003 + zlib.crc32(what.encode())) % 2**63


def build_components(seed: int = 0, dit: DitTrain | None = None) -> dict[str, Any]:
    """Fresh components from ``COMPONENTS`` (weights drawn from ``seed``, per component).

    ``dit`` (default ``DitTrain()``) chooses how the text encoder and the transformer's
    cross- and self-attention start (``text_local_heads``, ``null_padding``,
    ``video_local_heads``).
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizer import build_shapes_tokenizer

    def seeded(name, make):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_fork(seed, f"init/{name}"))
            return make()

    def vae():
        model = AutoencoderKLWan(**COMPONENTS["vae"])
        _inflated_init(model)
        return model

    dit = DitTrain() if dit is None else dit
    text_encoder = seeded("text_encoder", lambda: UMT5EncoderModel(UMT5Config(**COMPONENTS["text_encoder"])))
    transformer = seeded("transformer", lambda: WanTransformer3DModel(**COMPONENTS["transformer"]))
    if dit.text_local_heads is not None:
        _local_text_init(text_encoder, dit.text_local_heads)
    if dit.null_padding is not None:
        _null_padding_init(transformer, dit.null_padding)
    if dit.video_local_heads is not None:
        _local_video_init(transformer, dit.video_local_heads)
    return {
        "tokenizer": build_shapes_tokenizer(),
        "text_encoder": text_encoder,
        "vae": seeded("vae", vae),
        "transformer": transformer,
        "scheduler": UniPCMultistepScheduler(**COMPONENTS["scheduler"]),
    }


def _local_text_init(text_encoder, strength: float) -> None:
    """Start the UMT5 encoder's heads 0 / 1 / 2 attending to the next / previous / same
    token (relative-position bias ``strength`` in every layer, other buckets 0).

    A colour word then carries the word after it from the first step ("white triangle"
    against "white background"), which cross-attention, blind to the order of its keys,
    needs to tell the shape's colour from the background's. ``strength`` 0 leaves the
    stock init.
    """
    if strength == 0:
        return
    with torch.no_grad():
        for block in text_encoder.encoder.block:
            attn = block.layer[0].SelfAttention
            buckets = attn._relative_position_bucket(torch.tensor([1, -1, 0])).tolist()
            table = attn.relative_attention_bias.weight  # (buckets, heads)
            table.zero_()
            for head, bucket in enumerate(buckets[: table.shape[1]]):
                table[bucket, head] = strength


def padding_parameters(transformer) -> list[torch.nn.Parameter]:
    """The biases that decide what the pipeline's zero text rows become in cross-attention:
    the text projection's two biases and every block's ``attn2.to_k`` bias. All zero
    (``DitTrain.null_padding``): a zero row's key is exactly zero."""
    proj = transformer.condition_embedder.text_embedder
    return [proj.linear_1.bias, proj.linear_2.bias, *(b.attn2.to_k.bias for b in transformer.blocks)]


def _null_padding_init(transformer, norm_weight: float) -> None:
    """Zero text rows -> zero keys (``padding_parameters`` zeroed; training keeps them so),
    and cross-attention query/key RMSNorm weights at ``norm_weight``.

    Why: ``WanPipeline`` pads every prompt with zero rows to 512. With the stock init those
    rows share one random key, so together they outscore a dozen prompt tokens by
    ``log(500)`` and took 97% of each cross-attention at step 0. A zero key scores exactly
    0; query/key norms of 1.7 spread the prompt tokens' scores (std about 1.7^2) so that
    the prompt gets most of the weight from the start and the words reach the picture.
    """
    with torch.no_grad():
        for p in padding_parameters(transformer):
            p.zero_()
        for block in transformer.blocks:
            block.attn2.norm_q.weight.fill_(norm_weight)
            block.attn2.norm_k.weight.fill_(norm_weight)


# Rows of a self-attention head's query/key that ``_local_video_init`` fixes: head ->
# (RoPE axis, frequency pair, gain). Head 0 is local in time and space, head 1 in space
# only (the same place in every frame). Pair 0 turns 1 rad per token: sharp, but it comes
# back to itself after 6 tokens, so each spatial axis (8 tokens here) adds pair 1
# (0.16 rad per token), whose larger gain keeps a token 6 away from scoring like itself.
_LOCAL_VIDEO_ROWS = {
    0: (("t", 0, 1.1), ("h", 0, 1.1), ("h", 1, 1.55), ("w", 0, 1.1), ("w", 1, 1.55)),
    1: (("h", 0, 1.1), ("h", 1, 1.55), ("w", 0, 1.1), ("w", 1, 1.55)),
}
_LOCAL_VIDEO_BIAS = 3.0


def _local_video_init(transformer, strength: float) -> None:
    """Start heads 0 and 1 of every block's self-attention local (``DitTrain.video_local_heads``).

    For each row in ``_LOCAL_VIDEO_ROWS`` (the first of a RoPE pair's two dimensions, in
    the query and the key): weight 0, bias 3, RMSNorm weight ``gain * strength``. The row
    is then the same constant in every token's query and key, and RoPE turns it into a
    score ``a * cos(w * offset)`` that falls off with the distance along that axis. At
    strength 1, on random latents of the shipped clip size (5 x 8 x 8 tokens), head 0 of
    block 0 puts 74% of an inner token's weight on its 3 x 3 x 3 neighbourhood (12% on
    itself) and head 1 78% on its 3 x 3 spatial neighbourhood in all five frames; the
    stock init 8% and 14%, what uniform attention gives. Everything else keeps the stock
    init, and all of it trains.

    Why: a transformer whose self-attention starts near uniform over 320 tokens learned to
    denoise each latent frame alone and placed a moving object independently in every
    frame (the shapes README's latent-space probes). Started local, the probe's object
    stays coherent from frame to frame: with one motion, 100% of the samples moved right
    after 1000 steps (stock start: 35%). Whether a caption then chooses the direction is
    a separate question (it did not, in 4000 steps with five motions).
    """
    heads, head_dim = transformer.config.num_attention_heads, transformer.config.attention_head_dim
    space = 2 * (head_dim // 6)  # diffusers' WanRotaryPosEmbed split: t gets the rest
    if heads < 2 or space < 4:
        raise ValueError(f"video_local_heads needs 2 heads with at least 2 RoPE pairs per spatial axis "
                         f"(head dim >= 12); this transformer has {heads} heads of {head_dim}.")
    start = {"t": 0, "h": head_dim - 2 * space, "w": head_dim - space}
    with torch.no_grad():
        for block in transformer.blocks:
            attn = block.attn1
            for linear, norm in ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k)):
                for head, rows in _LOCAL_VIDEO_ROWS.items():
                    for axis, pair, gain in rows:
                        row = head * head_dim + start[axis] + 2 * pair
                        linear.weight[row] = 0.0
                        linear.bias[row] = _LOCAL_VIDEO_BIAS
                        norm.weight[row] = gain * strength


def _trainable(transformer, *modules) -> list[torch.nn.Parameter]:
    """Parameters to train: all of ``transformer`` and ``modules``, except the padding
    biases when they are all zero (``DitTrain.null_padding``): frozen there, so a zero
    text row stays a zero key (a key that left zero would be scaled back up to full
    length by ``norm_k``)."""
    padding = padding_parameters(transformer)
    if all(bool((p == 0).all()) for p in padding):
        for p in padding:
            p.requires_grad_(False)
    return [p for m in (transformer, *modules) for p in m.parameters() if p.requires_grad]


def _inflated_init(vae) -> None:
    """Initialise the VAE as a per-frame image autoencoder that steps through time.

    * every causal 3x3x3 convolution: He-normal on its current-frame tap (fan-in of a 2-D
      3x3 convolution), zeros on the two past-frame taps, zero bias: a 2-D convolution per
      frame. With PyTorch's default init (uniform, gain 1/sqrt(3), random past taps) the
      VAE sat at 11 dB PSNR for its first 40 steps even on one fixed batch; He init reached
      20 dB there, and zero past taps let the still-frame phase carry over to clips (with
      random past taps the clip phase restarted from 16 dB).
    * the encoder's temporal downsamplers pick the last frame of their window and the
      decoder's temporal upsamplers copy a frame into both outputs: a 4-frame latent starts
      out as the code of the chunk's last frame, decoded into 4 copies.

    The clip phase of ``train_vae`` then learns the motion inside a chunk from there.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    time_convs = {id(m.time_conv) for m in vae.modules() if isinstance(m, WanResample) and hasattr(m, "time_conv")}
    with torch.no_grad():
        for m in vae.modules():
            if not isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                continue
            m.bias.zero_()
            if id(m) in time_convs:  # (C_out, C, 3, 1, 1): identity on the last tap
                m.weight.zero_()
                eye = torch.eye(m.in_channels)
                for k in range(m.out_channels // m.in_channels):  # 1 (down) or 2 (up: two frames)
                    m.weight[k * m.in_channels : (k + 1) * m.in_channels, :, -1, 0, 0] = eye
            elif isinstance(m, WanCausalConv3d) and m.kernel_size[0] > 1:
                m.weight.zero_()
                torch.nn.init.kaiming_normal_(m.weight[:, :, -1], nonlinearity="relu")
            else:
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


class _Ema:
    """Exponential moving average of parameters (decay ramped up over the first steps)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    def state(self) -> dict[str, Any]:
        return {"shadow": [t.clone() for t in self.shadow], "n": self.n}

    @torch.no_grad()
    def load_state(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("the checkpoint's EMA does not match these models.")
        for s, t in zip(self.shadow, state["shadow"]):
            s.copy_(t)
        self.n = state["n"]

    @torch.no_grad()
    def restart(self) -> None:
        """Shadows from the parameters' present values, the decay's ramp from its start."""
        for p, s in zip(self.params, self.shadow):
            s.copy_(p)
        self.n = 0

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, ema: _Ema) -> float:
    """One optimiser step of a transformer stage (gradients clipped to norm 1, EMA updated);
    returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update()
    return loss.item()


def _resume(checkpoint: StageCheckpoint | None, models: dict, opt: torch.optim.Optimizer, ema: _Ema,
            generators: dict) -> tuple[int, float, Log, list, dict | None]:
    """Put a transformer stage's saved state (if any) back into its models, optimiser, EMA and
    random generators; returns ``(steps done, seconds so far, log, losses since the last
    log entry, the whole state or None)``."""
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return 0, 0.0, [], [], None
    for name, model in models.items():
        model.load_state_dict(state[name])
    opt.load_state_dict(state["optimizer"])
    ema.load_state(state["ema"])
    for name, g in generators.items():
        set_generator_state(g, state[name])
    return state["step"], state["seconds"], state["log"], state["acc"], state


def _stage_state(step: int, seconds: float, log: Log, acc: list, models: dict, opt: torch.optim.Optimizer,
                 ema: _Ema, generators: dict, **extra: Any) -> dict[str, Any]:
    """What ``_resume`` reads back: the models, optimiser, EMA, generators and log after ``step`` steps."""
    return {"step": step, "seconds": seconds, "log": log, "acc": acc,
            **{name: model.state_dict() for name, model in models.items()}, "optimizer": opt.state_dict(),
            "ema": ema.state(), **{name: generator_state(g) for name, g in generators.items()}, **extra}


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)


# -- stage 1: VAE ------------------------------------------------------------------------------


def _crops(clips, crop: int, size: int, centred: float, fg_weight: float, rng: np.random.Generator):
    """8-aligned ``crop``-pixel crops of ``clips.video`` and per-pixel loss weights.

    A fraction ``centred`` of the crops holds the shape (centred on it at the clip's middle
    frame, jittered by up to a third of the crop); the rest are uniform. Weights are 1 on
    the background and ``fg_weight`` on pixels of the shape (its anti-aliased edge included):
    the shape is 1-5% of a frame and was the part the VAE learned last.
    """
    video = clips.video
    b, _, f = video.shape[:3]
    out, weights = [], []
    for i in range(b):
        if rng.random() < centred:
            mid = clips.first[i] + (f - 1) / 2
            cx, cy = clips.motions[i].centre(clips.captions[i].motion or "still", np.array([mid]))
            cx = float(cx[0] % size) + rng.uniform(-crop / 3, crop / 3)
            cy = float(cy[0] % size) + rng.uniform(-crop / 3, crop / 3)
            x = int(np.clip(round((cx - crop / 2) / 8), 0, (size - crop) // 8)) * 8
            y = int(np.clip(round((cy - crop / 2) / 8), 0, (size - crop) // 8)) * 8
        else:
            x, y = (int(v) * 8 for v in rng.integers(0, (size - crop) // 8 + 1, size=2))
        c = video[i, :, :, y : y + crop, x : x + crop]
        fg = pixel_foreground(c[None], [clips.captions[i]])[0].to(c.dtype)
        out.append(c)
        weights.append(1.0 + (fg_weight - 1.0) * fg)
    return torch.stack(out), torch.stack(weights)



def train_vae(vae, cfg: TrainConfig, *, device: torch.device, progress: bool = True,
              callback: Callable[[int, dict], None] | None = None) -> Log:
    """Train ``vae`` in place (stage 1), then measure and store its latent statistics.

    Returns the log: one dict per 25 steps (``step``, ``phase`` ``"frames"``/``"clips"``,
    ``loss``, ``psnr`` in dB on the batch's crops, ``kl``, ``seconds``), then a ``latents``
    entry with the measured mean/std.
    """
    v: VaeTrain = cfg.vae
    for crop in (v.crop, v.image_crop):
        if crop % 8 or crop > cfg.size:
            raise ValueError(f"VAE crops must be multiples of 8 within {cfg.size} pixels, got {crop}.")
    if (v.frames - 1) % 4:
        raise ValueError(f"VAE training clips must have 4k+1 frames, got {v.frames}.")
    vae.to(device).train()
    with torch.no_grad():  # small initial latent noise (see VaeTrain)
        vae.quant_conv.bias[vae.config.z_dim :] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=v.lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(_fork(cfg.seed, "vae/crops"))
    gen = torch.Generator(device="cpu").manual_seed(_fork(cfg.seed, "vae/noise"))
    total = v.image_steps + v.steps
    log: Log = []
    start, acc = time.perf_counter(), []
    with fast_vae_norms(vae), _bar(total, "training VAE", progress) as bar:
        for step in range(total):
            still = step < v.image_steps
            n, frames, crop = (v.image_batch, 1, v.image_crop) if still else (v.batch, v.frames, v.crop)
            for g in opt.param_groups:
                g["lr"] = v.lr * _schedule(step, total, 50)
            if still:  # one random frame of each of n clips
                clips = clip_batch(cfg.seed, "vae-frames", range(step * n, (step + 1) * n), frames=cfg.frames,
                                   size=cfg.size, pick=rng.integers(0, cfg.frames, size=n))
            else:
                clips = clip_batch(cfg.seed, "vae", range(step * n, (step + 1) * n), frames=frames, size=cfg.size)
            video, weight = _crops(clips, crop, cfg.size, v.centred, v.foreground_weight, rng)
            video, weight = video.to(device), weight.to(device)
            post = vae.encode(video).latent_dist
            eps = torch.randn(post.mean.shape, generator=gen).to(device)
            rec = vae.decode(post.mean + post.std * eps).sample
            err = rec - video
            pix = ((err.abs() + err.pow(2)) * weight).sum() / (weight.sum() * 3)
            kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
            loss = pix + v.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            mse = (rec.detach().clamp(-1, 1) - video).pow(2).mean().item() / 4  # in [0, 1] units
            acc.append((loss.item(), 10 * math.log10(1 / max(mse, 1e-10)), kl.item()))
            bar.update(1)
            if (step + 1) % 25 == 0 or step + 1 in (v.image_steps, total):
                a = np.mean(acc, axis=0)
                entry = dict(step=step + 1, phase="frames" if still else "clips", loss=float(a[0]), psnr=float(a[1]),
                             kl=float(a[2]), seconds=time.perf_counter() - start)
                log.append(entry)
                bar.set_postfix(loss=f"{a[0]:.4f}", psnr=f"{a[1]:.1f}")
                acc = []
                if callback is not None:
                    callback(step + 1, entry)
    vae.eval()
    raw = encode_clips(vae, cfg.seed, "vae-stats", v.stats_clips, frames=cfg.frames, size=cfg.size,
                       normalize=False, progress=progress).latents
    mean, std = latent_stats(raw)
    vae.register_to_config(latents_mean=[round(m, 5) for m in mean], latents_std=[round(s, 5) for s in std])
    log.append(dict(latents=dict(mean=mean, std=std)))
    return log


# -- shared by stages 2 and 3 ---------------------------------------------------------------------


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """``s*u / (1 + (s-1)*u)``: the scheduler's timestep shift applied to uniform ``u``."""
    return shift * u / (1 + (shift - 1) * u)


def flow_loss(pred: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor | None = None,
              *, positions: torch.Tensor | None = None, frame_difference: float | None = None,
              sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the flow prediction against ``noise - x0``, optionally
    weighted per frame (``weight (B, T)``) and per latent position (``positions``,
    broadcastable to ``(B, 1, T, h, w)``); a weighted mean.

    ``frame_difference`` adds that multiple of the mean squared change of the ``x0``
    estimate's error from one latent frame to the next (nothing when ``T`` is 1): the part
    of the error a wrong or missing motion makes. The ``x0`` error is ``sigma`` times the
    flow error (``x0 = x_t - sigma v``), so the term needs the noise levels ``sigmas (B,)``
    and weighs high noise, where the motion is decided, most.
    """
    diff = pred.float() - (noise - x0)
    err = diff.pow(2)
    if weight is None and positions is None:
        loss = err.mean()
    else:
        w = torch.ones_like(err)
        if weight is not None:
            w = w * weight[:, None, :, None, None]
        if positions is not None:
            w = w * positions
        loss = (err * w).sum() / w.sum().clamp_min(1.0)
    if frame_difference and diff.shape[2] > 1:
        if sigmas is None:
            raise ValueError("frame_difference needs the batch's noise levels: flow_loss(..., sigmas=sigma).")
        moved = (diff[:, :, 1:] - diff[:, :, :-1]) * sigmas.to(diff).view(-1, 1, 1, 1, 1)
        loss = loss + frame_difference * moved.pow(2).mean()
    return loss


class _Batches:
    """Shuffled epochs over a ``LatentSet`` from a seed."""

    def __init__(self, data: LatentSet, batch: int, seed: int):
        self.data, self.batch = data, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(data), generator=self.gen), 0

    def next(self) -> tuple[torch.Tensor, list, torch.Tensor | None]:
        """Latents, captions and foreground (None when the set has none) of the next batch."""
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = torch.randperm(len(self.data), generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        fg = None if self.data.foreground is None else self.data.foreground[idx]
        return self.data.latents[idx], [self.data.captions[int(i)] for i in idx], fg

    def state(self) -> dict[str, Any]:
        return {"gen": generator_state(self.gen), "order": self.order.clone(), "pos": self.pos}

    def load_state(self, state: dict[str, Any]) -> None:
        set_generator_state(self.gen, state["gen"])
        self.order, self.pos = state["order"], state["pos"]


# -- stage 2: text-to-video ---------------------------------------------------------------------


def _install(transformer, attr: str, proc) -> list:
    saved = [getattr(b, attr).processor for b in transformer.blocks]
    for b in transformer.blocks:
        getattr(b, attr).set_processor(proc)
    return saved


def _uninstall(transformer, attr: str, saved: list) -> None:
    for b, p in zip(transformer.blocks, saved):
        getattr(b, attr).set_processor(p)


def _begin_steering(view, cfg: TrainConfig, ema: _Ema, *, fresh: bool) -> bool:
    """At the clip phase's first step (``fresh``): build the steer start into the first-frame
    phase's EMA weights and restart the EMA from them (its shadows of the rebuilt heads
    would otherwise pull them back for thousands of steps). Fresh or resumed, hold the
    writer's path. Returns True."""
    from .steer import hold_writer_path, steer_start

    tr, te = view.transformer, view.text_encoder
    if fresh:
        ema.copy_to_model()
        with torch.no_grad():
            steer_start(view, cfg, step=cfg.dit.steer_start)
        ema.restart()
        logger.info("clip phase: steer start built (look %.2f tokens a latent frame); text encoder, text MLP "
                    "and block 0's cross-attention held", cfg.dit.steer_start)
    hold_writer_path(tr, te)
    return True


def _token_timesteps(levels: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Wan's per-token timesteps ``(B, T * tokens_per_frame)`` in the scheduler's units
    (level x 1000) from per-latent-frame levels ``(B, T)`` in [0, 1] (tokens frame-major,
    as the transformer flattens its patches)."""
    return (levels * 1000).repeat_interleave(tokens_per_frame, dim=1)


def _first_frame_context(sigma: torch.Tensor, shape: torch.Size, fraction: float, gen: torch.Generator,
                         patch: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-frame levels for ``DitTrain.first_frame_context``: a ``fraction`` of the batch gets
    its first latent frame clean (level 0, loss weight 0), the other frames at ``sigma``.

    Args:
        sigma: ``(B,)`` the batch's noise levels in [0, 1].
        shape: the latents' shape ``(B, C, T, H, W)``.
        fraction: the share of samples given their first frame.
        gen: the random generator (draws ``B`` numbers).
        patch: the transformer's ``patch_size`` ``(p_t, p_h, p_w)``.

    Returns:
        ``s (B, 1, T, 1, 1)`` the levels to noise with, ``timestep (B, T * tokens per frame)``
        in the scheduler's units (Wan's per-token timesteps) and the loss weight ``(B, T)``.
    """
    b, _, t, h, w = shape
    levels = sigma[:, None].repeat(1, t)
    given = torch.rand(b, generator=gen) < fraction
    levels[given, 0] = 0.0
    weight = torch.ones(b, t)
    weight[given, 0] = 0.0
    tokens = (h // patch[1]) * (w // patch[2])
    return levels[:, None, :, None, None], _token_timesteps(levels, tokens), weight


def train_t2v(transformer, text_encoder, tokenizer, data: LatentSet, cfg: TrainConfig, *, device: torch.device,
              progress: bool = True, callback: Callable[[int, dict], None] | None = None,
              checkpoint: StageCheckpoint | None = None) -> Log:
    """Train text encoder + transformer in place on ``data`` (stage 2); EMA weights are left in the models.

    First ``image_steps`` on the clips' first latent frames (the image the VAE codes alone:
    64 tokens, so many cheap steps learn shapes, colours and the text), then ``steps`` on
    whole clips (motion). Cross-attention runs through ``PaddedTextAttention``: the stock
    attention over text zero-padded to ``text_len`` rows, at the cost of the prompt's rows.

    With ``checkpoint``, the state is saved every ``checkpoint.every`` steps and a saved
    state is resumed: the result is the same as an uninterrupted run's.

    Returns the log: one dict per 25 steps (``step``, ``phase``, ``loss``, ``seconds``).
    """
    d: DitTrain = cfg.dit
    transformer.to(device).train()
    text_encoder.to(device).train()
    params = _trainable(transformer, text_encoder)
    opt = torch.optim.AdamW(params, lr=d.lr, betas=(0.9, 0.99), weight_decay=d.weight_decay)
    ema = _Ema([transformer, text_encoder], d.ema)
    fg_w = d.foreground_weight
    if fg_w is not None and data.foreground is None:
        raise ValueError("foreground_weight needs the clips' foreground: encode_clips(..., foreground=True).")
    if d.first_frame_context and d.frame_difference:
        raise ValueError("dit.first_frame_context and dit.frame_difference cannot be combined: the frame-difference "
                         "term would count the error on the given first frame. Set one of them to none.")
    images = LatentSet(data.latents[:, :, :1].contiguous(), data.captions,
                       None if data.foreground is None else data.foreground[:, :, :1].contiguous())
    sets = {"frames": _Batches(images, d.image_batch, _fork(cfg.seed, "t2v/order/frames")),
            "clips": _Batches(data, d.batch, _fork(cfg.seed, "t2v/order/clips"))}
    rng = np.random.default_rng(_fork(cfg.seed, "t2v/captions"))
    gen = torch.Generator().manual_seed(_fork(cfg.seed, "t2v/noise"))
    total = d.image_steps + d.steps
    proc = PaddedTextAttention(d.text_len)
    models, generators = {"transformer": transformer, "text_encoder": text_encoder}, {"rng": rng, "gen": gen}
    first, before, log, acc, state = _resume(checkpoint, models, opt, ema, generators)
    if state is not None:
        for name, b in sets.items():
            b.load_state(state["batches"][name])
        logger.info("resuming the transformer's training at step %d of %d (%s)", first, total, checkpoint.path)
    saved = _install(transformer, "attn2", proc)
    start = time.perf_counter() - before
    steering, held = d.steer_start is not None, False
    if steering:
        from .steer import TrainModel

        view = TrainModel(transformer, text_encoder, tokenizer, proc, data, device)  # checks the clips
    try:
        with _bar(total, "training transformer", progress) as bar:
            bar.update(first)
            for step in range(first, total):
                phase = "frames" if step < d.image_steps else "clips"
                if steering and phase == "clips" and not held:
                    held = _begin_steering(view, cfg, ema, fresh=step == d.image_steps)
                for g in opt.param_groups:
                    g["lr"] = d.lr * _schedule(step, total, d.warmup)
                x0, caps, fg = sets[phase].next()
                drop_motion = d.drop_motion
                if phase == "frames" and d.image_drop_motion is not None:
                    drop_motion = d.image_drop_motion
                prompts = caption_texts(caps, rng, drop_caption=d.drop_caption, drop_motion=drop_motion,
                                        drop_background=d.drop_background)
                noise = torch.randn(x0.shape, generator=gen)
                shift = d.shift if phase == "frames" or d.clip_shift is None else d.clip_shift
                sigma = shifted_sigmas(torch.rand(x0.shape[0], generator=gen), shift)
                s, timestep, weight = sigma.view(-1, 1, 1, 1, 1), sigma * 1000, None
                if phase == "clips" and d.first_frame_context:
                    s, timestep, weight = _first_frame_context(sigma, x0.shape, d.first_frame_context, gen,
                                                               transformer.config.patch_size)
                xt = ((1 - s) * x0 + s * noise).to(device)
                text = proc.encode(tokenizer, text_encoder, prompts)
                pred = transformer(xt, timestep.to(device), text, return_dict=False)[0]
                positions = None if fg_w is None else (1.0 + (fg_w - 1.0) * fg.float()).to(device)
                loss = flow_loss(pred, noise.to(device), x0.to(device), None if weight is None else weight.to(device),
                                 positions=positions, frame_difference=d.frame_difference, sigmas=sigma)
                acc.append(_step(opt, loss, params, ema))
                bar.update(1)
                done = step + 1
                if done % 25 == 0 or done in (d.image_steps, total):
                    entry = dict(step=done, phase=phase, loss=float(np.mean(acc)),
                                 seconds=time.perf_counter() - start)
                    log.append(entry)
                    bar.set_postfix(phase=phase, loss=f"{entry['loss']:.4f}")
                    acc = []
                    if callback is not None:
                        callback(done, entry)
                if checkpoint is not None and checkpoint.due(done, total):
                    checkpoint.save(_stage_state(done, time.perf_counter() - start, log, acc, models, opt, ema,
                                                 generators, batches={n: b.state() for n, b in sets.items()}))
    finally:
        _uninstall(transformer, "attn2", saved)
    ema.copy_to_model()
    transformer.eval()
    text_encoder.eval()
    return log


# -- stage 3: causal ------------------------------------------------------------------------------


def block_causal_mask(frames: int, tokens_per_frame: int, chunk_frames: int, device=None) -> torch.Tensor:
    """``(1, 1, S, S)`` bool, True where a query may attend a key: every token sees every
    token up to the end of its own chunk (chunks of ``chunk_frames`` latent frames)."""
    blk = torch.arange(frames, device=device).repeat_interleave(tokens_per_frame) // chunk_frames
    return (blk[None, :] <= blk[:, None])[None, None]


def chunk_levels(n_chunks: int, batch: int, c: CausalTrain, gen: torch.Generator,
                 sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels and attention blocks of a batch of windows (see ``CausalTrain``).

    Args:
        n_chunks: chunks per window.
        batch: windows.
        c: the causal training config (``mix``, ``rolling_chunks``, ``shift``).
        gen: the random generator.
        sink: ``(batch,)`` bool, windows whose first chunk is a sink (always clean).

    Returns:
        ``sigma (batch, n_chunks)`` in [0, 1] and ``block (batch, n_chunks)`` int: chunk ``i``
        attends chunk ``j`` when ``block[j] <= block[i]`` (a rolling run shares one block).
    """
    sig = shifted_sigmas(torch.rand(batch, n_chunks, generator=gen), c.shift)
    block = torch.arange(n_chunks).repeat(batch, 1)
    kind = torch.multinomial(torch.tensor(c.mix, dtype=torch.float64), batch, replacement=True, generator=gen)
    run = min(c.rolling_chunks, n_chunks)
    for b in range(batch):
        lo = 1 if sink is not None and bool(sink[b]) else 0
        if kind[b] == 1:
            k = int(torch.randint(lo, n_chunks, (1,), generator=gen))
            sig[b, :k] = 0.0
        elif kind[b] == 2:
            k = int(torch.randint(lo, n_chunks - run + 1, (1,), generator=gen)) if n_chunks - run + 1 > lo else lo
            sig[b, :k] = 0.0
            sig[b, k : k + run] = sig[b, k : k + run].sort().values  # oldest least noisy
            block[b, k : k + run] = k
        if lo:
            sig[b, 0] = 0.0
    return sig, block


class _Windows:
    """Training windows cut from long clips' latents (see ``CausalTrain``), from a seed."""

    def __init__(self, data: LatentSet, c: CausalTrain, seed: int):
        self.data, self.c = data, c
        self.gen = torch.Generator().manual_seed(seed)
        n = data.latents.shape[2]
        if n < c.window_frames + c.chunk_frames:
            raise ValueError(f"clips of {n} latent frames are too short for windows of {c.window_frames}.")

    def next(self) -> tuple[torch.Tensor, list, torch.Tensor]:
        c, lat = self.c, self.data.latents
        n = lat.shape[2]
        idx = torch.randint(0, len(self.data), (c.batch,), generator=self.gen)
        sink = torch.rand(c.batch, generator=self.gen) < c.sink_windows
        out = []
        for i, s in zip(idx.tolist(), sink.tolist()):
            if s:  # first chunk + consecutive frames from after it
                rest = c.window_frames - c.chunk_frames
                o = int(torch.randint(c.chunk_frames, n - rest + 1, (1,), generator=self.gen))
                frames = [*range(c.chunk_frames), *range(o, o + rest)]
            else:
                o = int(torch.randint(0, n - c.window_frames + 1, (1,), generator=self.gen))
                frames = list(range(o, o + c.window_frames))
            out.append(lat[i, :, frames])
        return torch.stack(out), [self.data.captions[i] for i in idx.tolist()], sink


class _MaskedSelfAttn:
    """Wan ``attn1`` with the stock math under a boolean mask set per batch (training only)."""

    def __init__(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.mask, self.stock = None, WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.stock(attn, hidden_states, None, self.mask, rotary_emb)


def train_causal(transformer, text_encoder, tokenizer, data: LatentSet, cfg: TrainConfig, *, device: torch.device,
                 progress: bool = True, callback: Callable[[int, dict], None] | None = None,
                 checkpoint: StageCheckpoint | None = None, hold_writer: bool = False) -> Log:
    """Fine-tune ``transformer`` in place for block-causal generation (stage 3); EMA weights kept.

    ``data`` holds long clips (``cfg.causal.frames`` frames); the text encoder is frozen.
    ``checkpoint``: as ``train_t2v``'s (saved every few steps, resumed when there).
    ``hold_writer``: also hold the steer start's writer path (``steer.hold_writer_path``), as
    the base's clip phase did (a base trained with ``DitTrain.steer_start``).
    Returns the log: one dict per 25 steps (``step``, ``loss``, ``seconds``).
    """
    c: CausalTrain = cfg.causal
    if c.window_frames % c.chunk_frames:
        raise ValueError(f"window_frames={c.window_frames} must be whole chunks of {c.chunk_frames}.")
    _, _, _, h, w = data.latents.shape
    p_t, p_h, p_w = transformer.config.patch_size
    tpf = (h // p_h) * (w // p_w)
    nf, n_chunks = c.window_frames, c.window_frames // c.chunk_frames
    frame_chunk = torch.arange(nf) // c.chunk_frames
    transformer.to(device).train()
    text_encoder.to(device).eval().requires_grad_(False)
    if hold_writer:
        from .steer import hold_writer_path

        hold_writer_path(transformer, text_encoder)
    proc = _MaskedSelfAttn()
    text_proc = PaddedTextAttention(cfg.dit.text_len)
    saved, saved_text = _install(transformer, "attn1", proc), _install(transformer, "attn2", text_proc)
    params = _trainable(transformer)
    opt = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.99), weight_decay=c.weight_decay)
    ema = _Ema([transformer], c.ema)
    windows = _Windows(data, c, _fork(cfg.seed, "causal/windows"))
    rng = np.random.default_rng(_fork(cfg.seed, "causal/captions"))
    gen = torch.Generator().manual_seed(_fork(cfg.seed, "causal/noise"))
    models, generators = {"transformer": transformer}, {"rng": rng, "gen": gen, "windows": windows.gen}
    first, before, log, acc, state = _resume(checkpoint, models, opt, ema, generators)
    if state is not None:
        logger.info("resuming the causal training at step %d of %d (%s)", first, c.steps, checkpoint.path)
    start = time.perf_counter() - before
    try:
        with _bar(c.steps, "training causal transformer", progress) as bar:
            bar.update(first)
            for step in range(first, c.steps):
                for g in opt.param_groups:
                    g["lr"] = c.lr * _schedule(step, c.steps, c.warmup)
                x0, caps, sink = windows.next()
                prompts = caption_texts(caps, rng, drop_caption=c.drop_caption)
                noise = torch.randn(x0.shape, generator=gen)
                sig, block = chunk_levels(n_chunks, x0.shape[0], c, gen, sink)
                sig_frames = sig[:, frame_chunk]  # (B, F)
                blk = block[:, frame_chunk].repeat_interleave(tpf, dim=1)  # (B, S)
                proc.mask = (blk[:, None, :] <= blk[:, :, None])[:, None].to(device)
                s = sig_frames[:, None, :, None, None]
                xt = ((1 - s) * x0 + s * noise).to(device)
                t_tok = _token_timesteps(sig_frames, tpf).to(device)  # (B, F*T)
                with torch.no_grad():
                    text = text_proc.encode(tokenizer, text_encoder, prompts)
                pred = transformer(xt, t_tok, text, return_dict=False)[0]
                # clean frames (t = 0) are context only: no loss on them
                loss = flow_loss(pred, noise.to(device), x0.to(device), weight=(sig_frames > 0).float().to(device))
                acc.append(_step(opt, loss, params, ema))
                bar.update(1)
                if (step + 1) % 25 == 0 or step + 1 == c.steps:
                    entry = dict(step=step + 1, loss=float(np.mean(acc)), seconds=time.perf_counter() - start)
                    log.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}")
                    acc = []
                    if callback is not None:
                        callback(step + 1, entry)
                if checkpoint is not None and checkpoint.due(step + 1, c.steps):
                    checkpoint.save(_stage_state(step + 1, time.perf_counter() - start, log, acc, models, opt, ema,
                                                 generators))
    finally:
        _uninstall(transformer, "attn1", saved)
        _uninstall(transformer, "attn2", saved_text)
        text_encoder.requires_grad_(True)
    ema.copy_to_model()
    transformer.eval()
    return log


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` and ``COMPONENTS`` as plain data (for the model folder's manifest)."""
    return {"train": asdict(cfg), "components": COMPONENTS}

