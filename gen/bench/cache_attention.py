"""Cache attention of the long-video runner: the Triton kernel vs torch SDPA, at Wan's shapes.

``gen.kernels.cache_attention.cache_attention`` reads ``[sink | recent | own]`` frames
straight from the runner's frame-slotted KV buffer and applies the temporal RoPE to the
keys as it loads them (the runner stores keys with the spatial RoPE only). Each case
below is one ``attn1`` call of ``CausalWanRunner`` in steady state at Wan 2.1 1.3B 480p
(12 heads x 128, 1,560 tokens per latent frame, bf16 on CUDA):

* ``sink``: LongLive (``gen long --schedule sink``): a 3-frame chunk (4,680 queries)
  attends the 3-frame sink, 6 recent frames and itself: 12 frames = 18,720 keys, read
  out of order from a 12-slot cache (ring wrapped), absolute RoPE positions;
* ``rolling``: Rolling Forcing's window forward: 15 frames (5 chunks, 23,400 queries)
  attend the re-roped sink, 3 recent frames and the window: 21 frames = 32,760 keys from
  a 33-slot cache, relative positions.

Rows per case:

* ``triton``: the kernel (RoPE at read);
* ``sdpa-*``: each torch SDPA backend on keys gathered and roped beforehand, ``(B, H, S,
  D)`` contiguous (the gather is not timed: the best case for SDPA);
* ``torch gather+rope+sdpa``: what the runner would do without the kernel: gather the
  slots, rotate the keys, transpose, best SDPA backend, all timed.

``speedup``: best ``sdpa-*`` time / the row's time. ``rel_err``: ``||out - ref|| /
||ref||`` against ``gen.attention.cache_reference.cache_attention_reference`` in fp32 on
the same (bf16) inputs, computed in query chunks. On CUDA times are medians of
``triton.testing.do_bench``; on the CPU (``quick``: a tiny shape, the kernel through
Triton's interpreter) they only show the harness works.

Command line (JSON for ``gen check gpu``)::

    python -m gen.bench.cache_attention --json cache_attention.json
    python -m gen.bench.cache_attention --quick          # tiny, CPU
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ._setup import DTYPES, bench_device, bench_dtype
from .common import BenchResult, bench_meta, fmt

__all__ = ["CacheCase", "CASES", "QUICK_CASES", "CacheBenchRow", "run_cache_attention_bench"]


@dataclass(frozen=True)
class CacheCase:
    """One cache-attention call: ``query_frames`` frames attend ``len(read_slots)`` frames.

    ``read_slots`` are cache slots in read order (``[sink | recent | own]``), ``key_pos``
    their temporal RoPE rows; the queries are the last ``query_frames`` frames read.
    """

    name: str
    heads: int
    head_dim: int
    tokens_per_frame: int
    cache_slots: int
    read_slots: tuple[int, ...]
    key_pos: tuple[int, ...]
    query_frames: int
    rope_dims: int  # temporal RoPE dims (Wan: head_dim - 2 * 2 * (head_dim // 6))

    @property
    def q_len(self) -> int:
        return self.query_frames * self.tokens_per_frame

    @property
    def kv_len(self) -> int:
        return len(self.read_slots) * self.tokens_per_frame


def _wan_t_dim(d: int) -> int:
    return d - 2 * (2 * (d // 6))  # WanRotaryPosEmbed: h_dim = w_dim = 2 * (d // 6)


# LongLive steady state: sink frames 0-2 in slots 0-2, ring of 9 slots (frame f -> 3 + f % 9);
# chunk 27-29 attends sink, frames 21-26 and itself.
_SINK_FRAMES = (0, 1, 2, *range(21, 30))
# Rolling Forcing: sink 3, ring of 30 (frame f -> 3 + f % 30); window 43-57 attends sink,
# frames 40-42 and itself, positions 0..20 (relative).
_ROLL_FRAMES = (0, 1, 2, *range(40, 58))

CASES: tuple[CacheCase, ...] = (
    CacheCase("sink", 12, 128, 1560, 12, tuple(f if f < 3 else 3 + f % 9 for f in _SINK_FRAMES),
              _SINK_FRAMES, 3, _wan_t_dim(128)),
    CacheCase("rolling", 12, 128, 1560, 33, tuple(f if f < 3 else 3 + f % 30 for f in _ROLL_FRAMES),
              tuple(range(len(_ROLL_FRAMES))), 15, _wan_t_dim(128)),
)
QUICK_CASES: tuple[CacheCase, ...] = (
    CacheCase("sink-quick", 2, 64, 24, 6, (0, 4, 5, 1, 2, 3), (0, 4, 5, 6, 7, 8), 3, _wan_t_dim(64)),
)


@dataclass
class CacheBenchRow:
    """One timed implementation on one case (see the module docstring)."""

    case: str
    impl: str
    q_len: int
    kv_len: int
    time_ms: float | None
    tflops: float | None
    speedup: float | None = None
    rel_err: float | None = None
    note: str = ""


class CacheBenchResult(BenchResult):
    def to_markdown(self) -> str:
        lines = [self.header(), "",
                 "| case | impl | queries | keys | time (ms) | TFLOP/s | speedup vs best SDPA | rel. err vs fp32 | note |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.case} | {r.impl} | {r.q_len} | {r.kv_len} | {fmt(r.time_ms, '.3f')} | "
                         f"{fmt(r.tflops, '.1f')} | {fmt(r.speedup, '.2f')} | {fmt(r.rel_err, '.1e')} | {r.note} |")
        return "\n".join(lines)


def rope_tables(positions: int, head_dim: int, rope_dims: int, theta: float = 10000.0):
    """Wan-style temporal tables ``(positions, head_dim)`` fp32: interleaved pairs on the
    first ``rope_dims`` dims, identity (cos 1, sin 0) on the rest."""
    freqs = 1.0 / theta ** (torch.arange(0, rope_dims, 2, dtype=torch.float64) / rope_dims)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * freqs[None]
    cos = torch.ones(positions, head_dim, dtype=torch.float64)
    sin = torch.zeros(positions, head_dim, dtype=torch.float64)
    cos[:, :rope_dims] = ang.cos().repeat_interleave(2, -1)
    sin[:, :rope_dims] = ang.sin().repeat_interleave(2, -1)
    return cos.float(), sin.float()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def run_cache_attention_bench(
    cases: tuple[CacheCase, ...] | None = None,
    *,
    quick: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    reps: int = 3,
    seed: int = 0,
    command: str | None = None,
    progress=None,
) -> CacheBenchResult:
    """Time the cache-attention kernel against SDPA on ``cases`` (default :data:`CASES`;
    :data:`QUICK_CASES` with ``quick``). ``dtype``: bf16 on CUDA, fp32 on the CPU by default.
    The kernel on the CPU needs ``TRITON_INTERPRET=1`` set before triton is imported; without
    it its row says why it did not run. ``progress``: optional callable(str) told what runs
    next (``main`` prints it with the elapsed time, so a log shows where the time went)."""
    dev = bench_device(device, prefer_cuda=not quick)
    dtype = bench_dtype(dtype, dev)
    cases = cases or (QUICK_CASES if quick else CASES)
    result = CacheBenchResult(meta=bench_meta(dev, command, dtype=dtype, seed=seed,
                                              cases=[asdict(c) for c in cases],
                                              interpreter=os.environ.get("TRITON_INTERPRET", "")))
    g = torch.Generator().manual_seed(seed)
    say = progress or (lambda msg: None)
    for case in cases:
        result.rows.extend(_run_case(case, dev, DTYPES[dtype], reps, g, say))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _run_case(case: CacheCase, dev: torch.device, tdt: torch.dtype, reps: int, g: torch.Generator,
              say=lambda msg: None) -> list[CacheBenchRow]:
    """The rows of one case: the kernel, each SDPA backend, and gather + RoPE + SDPA."""
    from gen.attention.cache_reference import apply_interleaved_rope, cache_attention_reference
    from gen.kernels.cache_attention import cache_attention

    from .kernels import _sdpa_backends, _time_ms

    b, h, d, tpf = 1, case.heads, case.head_dim, case.tokens_per_frame
    q = torch.randn(b, case.q_len, h, d, generator=g).to(dev, tdt)
    k = torch.randn(b, case.cache_slots * tpf, h, d, generator=g).to(dev, tdt)
    v = torch.randn(b, case.cache_slots * tpf, h, d, generator=g).to(dev, tdt)
    slots = torch.tensor(case.read_slots, dtype=torch.int32, device=dev)
    pos = torch.tensor(case.key_pos, dtype=torch.int32, device=dev)
    cos, sin = rope_tables(max(case.key_pos) + 1, d, case.rope_dims)
    cos, sin = cos.to(dev), sin.to(dev)
    kw = dict(tokens_per_frame=tpf, key_pos=pos, rope_cos=cos, rope_sin=sin)
    flops = 4.0 * b * h * case.q_len * case.kv_len * d
    row_of = lambda impl, t, **extra: CacheBenchRow(
        case.name, impl, case.q_len, case.kv_len, t, None if t is None else flops / t / 1e9, **extra)

    # fp32 reference on the same inputs, in query chunks (the score matrix is Sq x Skv)
    say(f"{case.name}: fp32 reference")
    step = max(1, min(case.q_len, 2**30 // (h * case.kv_len)))
    kf, vf = k.float(), v.float()
    ref = torch.cat([cache_attention_reference(q[:, i:i + step].float(), kf, vf, slots, **kw)
                     for i in range(0, case.q_len, step)], dim=1)
    del kf, vf

    def gathered():
        rows = (slots.long()[:, None] * tpf + torch.arange(tpf, device=dev)).flatten()
        p = pos.long().repeat_interleave(tpf)
        kg = apply_interleaved_rope(k.index_select(1, rows), cos[p][None, :, None], sin[p][None, :, None])
        return kg.transpose(1, 2).contiguous(), v.index_select(1, rows).transpose(1, 2).contiguous()

    sdpa = torch.nn.functional.scaled_dot_product_attention
    qt = q.transpose(1, 2).contiguous()
    kt, vt = gathered()
    best, best_ctx = math.inf, None
    sdpa_rows = []
    for name, ctx in _sdpa_backends(dev):
        say(f"{case.name}: {name}")
        try:
            with ctx():
                out = sdpa(qt, kt, vt)
                t = _time_ms(lambda: sdpa(qt, kt, vt), dev, reps)
        except RuntimeError as err:
            sdpa_rows.append(row_of(name, None, note=f"unavailable: {str(err).splitlines()[0][:80]}"))
            continue
        if t < best:
            best, best_ctx = t, ctx
        sdpa_rows.append(row_of(name, t, rel_err=_rel_err(out.transpose(1, 2), ref),
                                note="keys gathered and roped beforehand (not timed)"))
    kt = vt = None  # free before the other timings

    def speed(t):
        return best / t if t and math.isfinite(best) else None

    interp = dev.type != "cuda"
    say(f"{case.name}: triton" + ("" if interp else " (the first call of a process autotunes)"))
    try:
        out = cache_attention(q, k, v, slots, **kw)
        t = _time_ms(lambda: cache_attention(q, k, v, slots, **kw), dev, 1 if interp else reps)
        note = "RoPE at read, slots read in place"
        if interp:
            note += "; Triton interpreter on the CPU: its time means nothing"
        rows = [row_of("triton", t, speedup=speed(t), rel_err=_rel_err(out, ref), note=note)]
    except ValueError as err:  # no CUDA and no interpreter
        rows = [row_of("triton", None, note=f"did not run: {str(err).splitlines()[0][:120]}")]
    for r in sdpa_rows:
        r.speedup = speed(r.time_ms)
    rows += sdpa_rows
    if best_ctx is not None:
        def full():
            kg, vg = gathered()
            with best_ctx():
                return sdpa(qt, kg, vg)

        say(f"{case.name}: gather + RoPE + SDPA")
        out = full()
        t = _time_ms(full, dev, reps)
        rows.append(row_of("torch gather+rope+sdpa", t, speedup=speed(t), rel_err=_rel_err(out.transpose(1, 2), ref),
                           note="gather, RoPE and transpose timed"))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m gen.bench.cache_attention``: print markdown, write JSON."""
    ap = argparse.ArgumentParser(prog="python -m gen.bench.cache_attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny case on the CPU (harness check)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on the CPU (CUDA: do_bench)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args(argv)
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (see gen.cli.main)
    command = "python -m gen.bench.cache_attention " + shlex.join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    say = lambda msg: print(f"{time.perf_counter() - t0:7.1f} s  {msg}", file=sys.stderr, flush=True)
    try:
        result = run_cache_attention_bench(quick=args.quick, device=args.device, dtype=args.dtype,
                                           reps=args.reps, seed=args.seed, command=command.strip(), progress=say)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .common import print_and_save

    return print_and_save(result, args.json_out)


if __name__ == "__main__":
    sys.exit(main())
