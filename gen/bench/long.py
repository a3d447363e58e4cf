"""Long-video throughput: steady-state frames per second and peak memory of ``gen long``.

``run_long_bench`` drives the same schedule objects ``gen long`` uses
(``gen.long._schedule``: the model's preset from ``gen.pipelines.ar.presets``, the
published Self-Forcing / LongLive / Rolling Forcing defaults for the real Wan models) over
a transformer of the model's real architecture with **random weights**
(``gen.pipelines.architecture.build_random_transformer``: same shapes and FLOPs, no checkpoint needed),
so it runs on any machine. No text encoder: one random prompt embedding of the
pipeline's shape ``(1, text_tokens, text_dim)``, set once (``gen long`` encodes a prompt
once too). The VAE is the model's architecture with random weights as well (Wan 2.1:
diffusers' ``AutoencoderKLWan`` defaults; tiny models: their ``gen.pipelines.tiny``
config), in the dtype ``gen long`` loads it in (float32 for Wan 2.1, as released).

What is timed, per chunk the schedule yields (its clean latents, ``chunk_frames`` latent
frames):

* ``denoise``: wall time from the previous chunk's end to this chunk's clean latents,
  CUDA synchronised: every transformer forward the schedule makes for it (sink/chunk: the
  denoising steps and the commit pass; rolling: one window forward over every chunk in the
  window and the commit pass of the chunk leaving it), cache writes, noise and sampler
  updates;
* ``decode``: ``StreamingWanDecoder.decode`` of those latents (the Wan VAE's causal cache
  carried across chunks) and the copy to host ``uint8`` frames, as ``gen long`` yields
  them. mp4 encoding is not timed.

The first ``warmup_chunks`` chunks are generated (and decoded) but not counted: they hold
Triton's compile and autotune and the growth of the attended span until it reaches its
steady size (sink: until the window is full; rolling: until the window and the span
beyond it are full). Rolling is asked for ``levels - 1`` extra chunks and stopped early so
that no counted chunk comes from the window's drain at the end of a video (faster, not
steady state).

Frames counted: each latent frame after the first gives 4 video frames (the Wan VAE's
temporal factor; the very first gives 1). ``fps_denoise`` = counted video frames / summed
denoise time; ``fps`` = counted video frames / (denoise + decode): frames per second of
decoded video, what a viewer of the stream gets. ``peak_mem_mb``: on CUDA
``torch.cuda.max_memory_allocated`` over the generation (weights, KV cache and VAE
included); on the CPU the process's peak resident set (``ru_maxrss``).

Command line (JSON for ``gen check gpu``)::

    python -m gen.bench.long --model wan2.1-t2v-1.3b --schedule sink --json long_sink.json
    python -m gen.bench.long --model tiny-wan --schedule rolling --chunks 2 --warmup-chunks 1 --device cpu
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from ._setup import DTYPES, bench_device, bench_dtype
from .common import BenchResult, bench_meta, fmt

__all__ = ["LongBenchResult", "LongBenchRow", "build_random_vae", "default_warmup_chunks", "run_long_bench"]

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
#: video frames per latent frame after the first (Wan VAE temporal factor)
_TEMPORAL = 4


@dataclass
class LongBenchRow:
    """One schedule's run (see the module docstring). Times in seconds (``*_s``) or
    milliseconds (``*_ms``, per counted chunk), memory in MiB; ``None`` = not measured."""

    schedule: str
    chunk_frames: int
    warmup_chunks: int
    chunks: int
    latent_frames: int
    video_frames: int
    denoise_s: float
    decode_s: float | None
    fps_denoise: float | None
    fps: float | None
    chunk_ms: float | None
    peak_mem_mb: float | None
    weights_mb: float
    kv_cache_mb: float | None
    denoise_ms: list[float] = field(default_factory=list)
    decode_ms: list[float] = field(default_factory=list)
    config: str = ""
    note: str = ""


class LongBenchResult(BenchResult):
    """Result of :func:`run_long_bench`: ``meta`` and one :class:`LongBenchRow`."""

    def to_markdown(self) -> str:
        m = self.meta
        lines = [
            self.header(),
            "",
            f"{m['model']} at {m['width']}x{m['height']} (latent {m['latent_width']}x{m['latent_height']}, "
            f"{m['tokens_per_frame']} tokens per latent frame), transformer {m['dtype']}, VAE {m['vae_dtype']}, "
            f"random weights, seed {m['seed']}",
            "",
            "| schedule | chunks counted (warm-up) | latent frames | video frames | denoise (s) | decode (s) "
            "| FPS denoise only | FPS with decode | chunk (ms) | peak mem (MiB) | KV cache (MiB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.schedule} | {r.chunks} ({r.warmup_chunks}) | {r.latent_frames} | {r.video_frames} | "
                f"{r.denoise_s:.2f} | {fmt(r.decode_s, '.2f')} | {fmt(r.fps_denoise, '.1f')} | {fmt(r.fps, '.1f')} | "
                f"{fmt(r.chunk_ms, '.0f')} | {fmt(r.peak_mem_mb, '.0f')} | {fmt(r.kv_cache_mb, '.0f')} |"
            )
        return "\n".join(lines)


def default_warmup_chunks(schedule: str, config) -> int:
    """Chunks to leave uncounted until the attended span stops growing (at least 1)."""
    c = config.chunk_frames
    if schedule == "sink":  # [sink | recent | own] reaches window_frames
        return max(1, math.ceil(config.window_frames / c))
    if schedule == "rolling":  # the span beyond the window fills after this many chunks leave it
        return max(1, math.ceil((config.max_attention_frames - config.window_frames) / c) + 1)
    return 1  # chunk: the cache holds the whole video, the span grows with it (no steady state)


def build_random_vae(spec, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """``spec``'s Wan VAE architecture with random weights (see the module docstring)."""
    from diffusers import AutoencoderKLWan

    if spec.is_tiny:
        from gen.pipelines.tiny import TINY_CONFIGS

        cfg = dict(TINY_CONFIGS[spec.name]["vae"])
    elif spec.is_bundled:
        from gen.pipelines.shapes.config import COMPONENTS

        cfg = dict(COMPONENTS["vae"])
    else:
        cfg = {}  # diffusers' defaults are the Wan 2.1 VAE
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**cfg)
    vae = vae.to(device)
    if dtype != torch.float32:  # built in float32
        vae = vae.to(dtype)
    return vae.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def run_long_bench(
    model: str = "wan2.1-t2v-1.3b",
    schedule: str = "sink",
    *,
    height: int | None = None,
    width: int | None = None,
    chunks: int = 6,
    warmup_chunks: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    vae_dtype: str | None = None,
    decode: bool = True,
    backend: str | None = None,
    seed: int = 0,
    command: str | None = None,
    progress=None,
) -> LongBenchResult:
    """Time ``gen long``'s schedule ``schedule`` on a random-weight ``model`` (module docstring).

    Args:
        model: a Wan text-to-video registry name (``wan2.1-t2v-1.3b``, ``tiny-wan``, ...).
        schedule: ``"sink"``, ``"rolling"`` or ``"chunk"``.
        height, width: pixels (default: the model's).
        chunks: chunks counted after the warm-up.
        warmup_chunks: chunks generated first and not counted (default
            :func:`default_warmup_chunks`).
        device: ``"cuda"`` / ``"cpu"`` (default CUDA when available).
        dtype: transformer dtype ``"bf16"``/``"fp16"``/``"fp32"`` (default bf16 on CUDA, fp32 on CPU).
        vae_dtype: VAE dtype (default: float32 where ``gen long`` keeps the VAE in float32,
            else ``dtype``).
        decode: also decode each chunk (``fps``); False times denoising only.
        backend: cache attention backend (None: Triton on CUDA, PyTorch on the CPU).
        seed: weights, prompt embedding and noise seed.
        progress: optional ``callable(done, total, what)``.

    Raises:
        ValueError: not a Wan text-to-video model, unknown schedule, bad sizes or counts, or
            CUDA asked for without a CUDA device.
    """
    from gen.long import SCHEDULES, _schedule
    from gen.pipelines import check_geometry, get_spec
    from gen.pipelines.ar.schedules import NoiseSampler
    from gen.pipelines.ar.stream import StreamingWanDecoder, to_uint8
    from gen.pipelines.architecture import build_random_transformer

    from .e2e import _Memory

    spec = get_spec(model)
    if spec.family != "wan" or spec.task != "t2v":
        raise ValueError(f"long video needs a Wan text-to-video model, got {spec.name!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}.")
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}.")
    height, width = height or spec.height, width or spec.width
    check_geometry(spec, height, width, 1)
    dev = bench_device(device)
    dtype = bench_dtype(dtype, dev)
    vae_dtype = bench_dtype(vae_dtype or ("fp32" if "vae" in spec.fp32_components else dtype), dev, what="vae_dtype")
    say = progress or (lambda done, total, what: None)

    say(0, None, f"building {spec.name} (random weights)")
    transformer = build_random_transformer(spec, device=dev, dtype=DTYPES[dtype], seed=seed)
    sched = _schedule(schedule, transformer, backend, None, spec.name)
    cfg = sched.config
    cf = cfg.chunk_frames
    warm = default_warmup_chunks(schedule, cfg) if warmup_chunks is None else warmup_chunks
    if warm < 0:
        raise ValueError(f"warmup_chunks must be >= 0, got {warm}.")
    total = warm + chunks
    # rolling: extra chunks so that every counted one leaves a full window (no drain)
    latent = (total + (cfg.levels - 1 if schedule == "rolling" else 0)) * cf
    lat_h, lat_w = height // 8, width // 8
    p = transformer.config.patch_size
    tokens_per_frame = (lat_h // p[1]) * (lat_w // p[2])

    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, spec.text_tokens, transformer.config.text_dim, generator=g).to(dev, DTYPES[dtype])
    vae = build_random_vae(spec, device=dev, dtype=DTYPES[vae_dtype], seed=seed) if decode else None

    result = LongBenchResult(meta=bench_meta(
        dev, command, model=spec.name, schedule=schedule, height=height, width=width, latent_height=lat_h,
        latent_width=lat_w, tokens_per_frame=tokens_per_frame, dtype=dtype,
        vae_dtype=vae_dtype if decode else None, decode=decode, seed=seed, random_weights=True,
        backend=backend or ("triton" if dev.type == "cuda" else "torch"), latent_frames_generated_up_to=latent,
        timing=("per chunk, perf_counter between CUDA synchronisations" if dev.type == "cuda" else
                "per chunk, perf_counter"),
        memory="torch.cuda.max_memory_allocated" if dev.type == "cuda" else "ru_maxrss (process peak RSS)",
        frames_counted=f"{_TEMPORAL} video frames per latent frame (the first latent frame of a video gives 1)",
    ))

    mem = _Memory(dev)
    decoder = StreamingWanDecoder(vae) if decode else None
    denoise_ms: list[float] = []
    decode_ms: list[float] = []
    latent_frames = video_frames = 0
    frame_index = 0  # absolute latent frame of the next chunk
    stream = sched.generate(text, latent, height=lat_h, width=lat_w, noise=NoiseSampler(seed, dev))
    kv_mb = None
    try:
        mem.start()
        _sync(dev)
        t0 = time.perf_counter()
        for i in range(total):
            x0 = next(stream)
            _sync(dev)
            t1 = time.perf_counter()
            if kv_mb is None and sched.runner is not None:
                kv_mb = sched.runner.cache.nbytes / 2**20
            if decoder is not None:
                to_uint8(decoder.decode(x0)[0])  # host frames, as gen long yields them
                _sync(dev)
            t2 = time.perf_counter()
            f = x0.shape[2]
            if i >= warm:
                denoise_ms.append(1e3 * (t1 - t0))
                if decoder is not None:
                    decode_ms.append(1e3 * (t2 - t1))
                latent_frames += f
                video_frames += _TEMPORAL * f - (_TEMPORAL - 1 if frame_index == 0 else 0)
            frame_index += f
            say(i + 1, total, f"chunk {i + 1}/{total}" + (" (warm-up)" if i < warm else ""))
            t0 = time.perf_counter()
        peak, _ = mem.stop()
    finally:
        stream.close()  # leaves the runner's `with`: stock processors back
        if decoder is not None:
            decoder.close()

    den_s = sum(denoise_ms) / 1e3
    dec_s = sum(decode_ms) / 1e3 if decoder is not None else None
    wall = den_s + (dec_s or 0.0)
    result.rows.append(LongBenchRow(
        schedule=schedule, chunk_frames=cf, warmup_chunks=warm, chunks=chunks, latent_frames=latent_frames,
        video_frames=video_frames, denoise_s=den_s, decode_s=dec_s,
        fps_denoise=video_frames / den_s if den_s > 0 else None,
        fps=video_frames / wall if decoder is not None and wall > 0 else None,
        chunk_ms=statistics.median(a + b for a, b in zip(denoise_ms, decode_ms or [0.0] * len(denoise_ms))),
        peak_mem_mb=peak, weights_mb=_mib(transformer) + (_mib(vae) if vae is not None else 0.0), kv_cache_mb=kv_mb,
        denoise_ms=denoise_ms, decode_ms=decode_ms, config=repr(cfg),
        note="" if dev.type == "cuda" else "CPU run: shows the harness works; FPS goals are for a GPU",
    ))
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m gen.bench.long``: run :func:`run_long_bench`, print markdown, write JSON."""
    ap = argparse.ArgumentParser(prog="python -m gen.bench.long", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wan2.1-t2v-1.3b")
    ap.add_argument("--schedule", default="sink", help="sink | rolling | chunk")
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--chunks", type=int, default=6, help="chunks counted after the warm-up")
    ap.add_argument("--warmup-chunks", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32")
    ap.add_argument("--vae-dtype", default=None, help="bf16 | fp16 | fp32 (default: as gen long loads it)")
    ap.add_argument("--no-decode", action="store_true", help="time denoising only")
    ap.add_argument("--backend", default=None, help="cache attention backend: triton | torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see gen.cli.main)
    command = "python -m gen.bench.long " + shlex.join(sys.argv[1:] if argv is None else argv)

    def progress(done, total, what):
        print(f"[{done}/{total or '?'}] {what}", file=sys.stderr, flush=True)

    try:
        result = run_long_bench(
            args.model, args.schedule, height=args.height, width=args.width, chunks=args.chunks,
            warmup_chunks=args.warmup_chunks, device=args.device, dtype=args.dtype, vae_dtype=args.vae_dtype,
            decode=not args.no_decode, backend=args.backend, seed=args.seed, command=command, progress=progress,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .common import print_and_save

    return print_and_save(result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
