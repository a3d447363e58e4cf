"""What the ahead-of-time compile check compiles: every Triton kernel, at real shapes.

The interpreter (``TRITON_INTERPRET=1``) proves a kernel's arithmetic, not that it
compiles: it reads Python globals the compiler refuses and ignores shared-memory limits.
So every kernel is also compiled for sm_80 and sm_90 on any machine (no GPU needed),
over every config its launcher's autotuner may choose there after pruning, for the
dtypes and head dims the launcher accepts, with arguments built by the launcher itself
(on ``meta`` tensors at Wan 2.1 1.3B 480p, Wan 2.1 14B 720p and HunyuanVideo 720p
sizes), so the signature compiled is the one a real call specialises. ``gen check
kernels`` runs it and ``gen.check.kernels`` reads the compiler's report.

**Adding a kernel**: add one entry to :data:`KERNELS` (its module, the kernel function's
name and a case generator). ``tests/test_aot_compile.py`` fails for any ``_*_kernel``
function in this folder that has no entry.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["AotCase", "KERNELS", "TARGETS", "cases", "int8_code_report", "signature_of"]

# compute capabilities checked: A100 (sm_80) and H100/H200 (sm_90)
TARGETS = (80, 90)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class AotCase:
    """One kernel specialisation and config to compile for one target.

    ``runtime`` holds the launch's non-constexpr values as the JIT sees them (tensor
    dtype strings for pointers, ints, floats); ``constexprs`` the meta-parameters,
    the config's tile included.
    """

    module: str  # importable module path, e.g. gen.kernels.block_sparse_attention
    kernel: str
    label: str
    arch: int
    dtype: str
    runtime: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 2
    smem_estimate: int | None = None  # what the launcher's pruning assumed, bytes
    # the kernel multiplies tiles (tl.dot): its bf16/fp16 code must use tensor cores
    tensor_cores: bool = True

    @property
    def tile(self) -> str:
        return "x".join(str(v) for k, v in self.constexprs.items() if k.startswith("BLOCK"))

    @property
    def half(self) -> bool:
        """bf16/fp16 inputs: the ones that must use tensor cores and never spill."""
        return self.dtype in ("bf16", "fp16")


def _runtime_values(args: tuple, arg_names: list[str], constexpr_names: set[str]) -> dict:
    """The launch's positional args as the JIT sees them: tensors become pointer types."""
    names = [n for n in arg_names if n not in constexpr_names]
    if len(names) != len(args):
        raise AssertionError(f"kernel takes {len(names)} runtime args, launcher passes {len(args)}")
    out = {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            out[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                               torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                               torch.int8: "i8"}[value.dtype]
        else:
            out[name] = value
    return out


def signature_of(fn, runtime: dict, constexprs: dict):
    """``(signature, constants, attrs)`` for ``triton.compiler.ASTSource``, specialised the
    way the JIT launcher specialises a call: an int equal to 1 becomes a constant, ints
    divisible by 16 and pointers (torch allocations are 16-byte aligned) get
    ``tt.divisibility = 16``."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        value = runtime[name]
        if isinstance(value, str):
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _module(name: str):
    # the package re-exports functions named like their modules, so import by full name
    return importlib.import_module(f"{__package__}.{name}")


def _params(fn) -> tuple[list[str], set[str]]:
    """A kernel function's argument names and its ``tl.constexpr`` ones (read from the
    plain function, so this works whether or not triton runs interpreted here)."""
    params = inspect.signature(fn).parameters
    names = list(params)
    consts = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    return names, consts


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _bshd(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    # diffusers processors hold (B, S, H, D); gen's kernels see it as (B, H, S, D)
    return torch.empty(b, s, h, d, dtype=dtype, device="meta").transpose(1, 2)


# (label, dtype, head_dim, heads, q_len, kv_len, plan_bm, plan_bn, flags) at model sizes:
# Wan 2.1 1.3B 480p: 12 heads x 32760 tokens; HunyuanVideo 720p: 24 heads, 119040 video
# tokens + 256 text (the text-query call: 256 rows against every key, padded text).
_BSA_MAIN = [
    ("wan480 video", "bf16", 128, 12, 32760, 32760, 128, 128, ("lse",)),
    ("wan480 video", "bf16", 128, 12, 32760, 32760, 128, 64, ("lse",)),
    ("hunyuan720 video", "bf16", 128, 24, 119040, 119040, 64, 64, ("lse",)),
]
_BSA_EXTRA = [
    ("wan480 video", "fp16", 128, 12, 32760, 32760, 128, 64, ("lse",)),
    ("wan480 video", "fp32", 128, 12, 32760, 32760, 128, 64, ("lse",)),
    ("wan480 video", "bf16", 64, 12, 32760, 32760, 128, 128, ("lse",)),
    ("wan480 padded order", "bf16", 128, 12, 32760, 32768, 128, 128, ("lse", "mask")),
    ("hunyuan720 text queries", "bf16", 128, 24, 256, 119296, 128, 128, ("valid", "split")),
    ("hunyuan720 video-text", "bf16", 128, 24, 119040, 256, 128, 128, ("lse", "valid")),
    ("wan480 video", "bf16", 256, 12, 32760, 32760, 128, 64, ("lse",)),
    ("wan480 video", "bf16", 128, 12, 32760, 32760, 128, 64, ("lse", "tma")),
    ("hunyuan720 video-text", "bf16", 128, 24, 119040, 256, 128, 128, ("lse", "valid", "tma")),
]


def _bsa_cases(arch: int, full: bool) -> list[AotCase]:
    from ._common import SMEM_LIMIT, estimate_shared_memory

    m = _module("block_sparse_attention")
    arg_names, const_names = _params(m._block_sparse_fwd_kernel)
    out = []
    for i, (label, dt, d, h, sq, skv, pbm, pbn, flags) in enumerate(_BSA_MAIN + _BSA_EXTRA):
        if "tma" in flags and arch < 90:
            continue  # tensor descriptors are a Hopper path; sm_80 keeps pointer loads
        dtype = _DTYPES[dt]
        q, k, v = _bshd(1, sq, h, d, dtype), _bshd(1, skv, h, d, dtype), _bshd(1, skv, h, d, dtype)
        nqb, nkb = math.ceil(sq / pbm), math.ceil(skv / pbn)
        idx = torch.empty(1, 1, nqb, nkb, dtype=torch.int32, device="meta")
        cnt = torch.empty(1, 1, nqb, dtype=torch.int32, device="meta")
        kv_valid = torch.empty(1, dtype=torch.int32, device="meta") if "valid" in flags else None
        kv_mask = torch.empty(skv, dtype=torch.bool, device="meta") if "mask" in flags else None
        splits = 3 if "split" in flags else 1
        spec = m.launch_spec(q, k, v, idx, cnt, kv_valid, kv_mask, pbm, pbn, 1 / math.sqrt(d),
                             "lse" in flags, splits, "tma" in flags)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        kept = [c for c in m.HOPPER_CONFIGS
                if m.keep_config(c, pbm, pbn, d, dtype.itemsize, SMEM_LIMIT[arch])] or [m.fallback_config(pbm, pbn)]
        if not full:
            if not _in_quick(i < len(_BSA_MAIN), dt, arch):
                continue
            kept = _quick_pick(kept, main=i < len(_BSA_MAIN))
        name = f"{label} {dt} D{d} plan{pbm}x{pbn} " + "+".join(flags)
        for c in kept:
            out.append(AotCase(m.__name__, "_block_sparse_fwd_kernel", name, arch, dt, runtime,
                               {**spec.meta, **c.kwargs}, c.num_warps, c.num_stages,
                               estimate_shared_memory(c, d, dtype.itemsize)))
    return out + _bsa_chunk_cases(arch, full)


def _in_quick(main: bool, dtype: str, arch: int) -> bool:
    # the fast subset: main cases on both targets; the others on sm_90, fp32 (slow to
    # compile, never on tensor cores) only in the full sweep
    return main or (arch == 90 and dtype != "fp32")


def _quick_pick(configs: list, main: bool) -> list:
    # the fast subset: the largest and the smallest kept tile for the main cases, one
    # (the largest) for the others
    ordered = sorted(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))
    picked = [ordered[-1], ordered[0]] if main and len(ordered) > 1 else [ordered[-1]]
    return picked


# (label, dtype, head_dim, rope): the long-video runner at Wan 2.1 1.3B 480p, a 3-frame
# chunk attending sink + window + chunk (9 frames) of a 12-slot cache, 1560 tokens a frame.
_CACHE_MAIN = [("wan480 AR chunk", "bf16", 128, True)]
_CACHE_EXTRA = [
    ("wan480 AR chunk", "bf16", 128, False),
    ("wan480 AR chunk", "fp16", 128, True),
    ("wan480 AR chunk", "fp32", 128, True),
    ("wan480 AR chunk", "bf16", 64, True),
]


def _cache_cases(arch: int, full: bool) -> list[AotCase]:
    from ._common import SMEM_LIMIT, estimate_shared_memory

    m = _module("cache_attention")
    arg_names, const_names = _params(m._cache_attn_fwd_kernel)
    tpf, chunk, frames, slots, h = 1560, 3, 9, 12, 12
    out = []
    for i, (label, dt, d, rope) in enumerate(_CACHE_MAIN + _CACHE_EXTRA):
        dtype = _DTYPES[dt]
        q = torch.empty(1, chunk * tpf, h, d, dtype=dtype, device="meta")
        kc = torch.empty(1, slots * tpf, h, d, dtype=dtype, device="meta")
        frame_slots = torch.empty(frames, dtype=torch.int32, device="meta")
        # without RoPE the launcher passes the slots as placeholders, as here
        cos = torch.empty(64, triton_pow2(d) // 2, dtype=torch.float32, device="meta") if rope else frame_slots
        pos = frame_slots
        spec = m.launch_spec(q, kc, kc, frame_slots, pos, cos, cos, tpf, 1 / math.sqrt(d), rope)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        kept = [c for c in m.HOPPER_CONFIGS if m.keep_config(c, d, dtype.itemsize, SMEM_LIMIT[arch])]
        if not full:
            if not _in_quick(i < len(_CACHE_MAIN), dt, arch):
                continue
            kept = _quick_pick(kept, main=i < len(_CACHE_MAIN))
        name = f"{label} {dt} D{d}" + (" rope" if rope else "")
        for c in kept:
            out.append(AotCase(m.__name__, "_cache_attn_fwd_kernel", name, arch, dt, runtime,
                               {**spec.meta, **c.kwargs}, c.num_warps, c.num_stages,
                               estimate_shared_memory(c, d, dtype.itemsize)))
    return out


# (label, dtype, heads, seq_len, head_dim, block, flags): block statistics of q/k as the
# dynamic methods pool them, read in place from diffusers' (B, S, H, D) layout. Wan 2.1 14B
# 720p: 40 heads x 75600 video tokens (591 blocks of 128, the last one short);
# HunyuanVideo 720p: 24 heads x 119040 (930 blocks). "valid": a padded token order
# (592 whole blocks, padding slots flagged); "nodev": means only.
_STATS_MAIN = [("wan14b720 q/k", "bf16", 40, 75600, 128, 128, ())]
_STATS_EXTRA = [
    ("hunyuan720 q/k", "bf16", 24, 119040, 128, 128, ()),
    ("wan14b720 padded order", "bf16", 40, 75776, 128, 128, ("valid",)),
    ("wan14b720 q/k", "bf16", 40, 75600, 128, 128, ("nodev",)),
    ("wan14b720 q/k", "fp16", 40, 75600, 128, 128, ()),
    ("wan14b720 q/k", "fp32", 40, 75600, 128, 128, ()),
    ("wan14b720 q/k", "bf16", 40, 75600, 64, 128, ()),
    ("wan14b720 q/k", "bf16", 40, 75600, 256, 128, ()),
    ("wan14b720 q/k blocks of 256", "bf16", 40, 75600, 128, 256, ("valid",)),
    ("wan14b720 q/k blocks of 64", "bf16", 40, 75600, 128, 64, ()),
]


def _stats_cases(arch: int, full: bool) -> list[AotCase]:
    m = _module("block_estimate")
    arg_names, const_names = _params(m._block_stats_kernel)
    out = []
    for i, (label, dt, h, s, d, block, flags) in enumerate(_STATS_MAIN + _STATS_EXTRA):
        if not full and not _in_quick(i < len(_STATS_MAIN), dt, arch):
            continue
        x = _bshd(1, s, h, d, _DTYPES[dt])
        valid = torch.empty(s, dtype=torch.bool, device="meta") if "valid" in flags else None
        spec = m.stats_launch_spec(x, block, valid, "nodev" not in flags)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        name = f"{label} {dt} D{d} block{block}" + "".join(f" {f}" for f in flags)
        out.append(AotCase(m.__name__, "_block_stats_kernel", name, arch, dt, runtime, spec.meta,
                           spec.num_warps, 1, m.stats_shared_memory(block, d, spec.num_warps), tensor_cores=False))
    return out


# (label, heads, query blocks, key blocks, text column): cumulative-mass selection on the
# pooled logits (fp32). Wan 2.1 14B 720p: 591 x 591 blocks, no text (cross-attention
# carries it); HunyuanVideo 720p: 930 x 930 with the text column; the longest row the
# kernel accepts (MAX_KEY_BLOCKS).
_SELECT_MAIN = [("wan14b720", 40, 591, 591, False)]
_SELECT_EXTRA = [
    ("hunyuan720", 24, 930, 930, True),
    ("longest row", 24, 64, 2048, True),
]


def _select_cases(arch: int, full: bool) -> list[AotCase]:
    m = _module("block_estimate")
    arg_names, const_names = _params(m._block_select_kernel)
    out = []
    for i, (label, h, nq, nk, text) in enumerate(_SELECT_MAIN + _SELECT_EXTRA):
        if not full and i >= len(_SELECT_MAIN):
            continue  # fp32 only: the extras are in the full sweep
        logits = torch.empty(1, h, nq, nk, dtype=torch.float32, device="meta")
        text_logit = torch.empty(1, h, nq, dtype=torch.float32, device="meta") if text else None
        rect = torch.empty(1, h, nq, nk, dtype=torch.bool, device="meta")
        forced = torch.empty(nq, nk, dtype=torch.bool, device="meta")
        spec = m.select_launch_spec(logits, text_logit, rect, forced, 0.9, 8)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        name = f"{label} {nq}x{nk} blocks" + (" +text" if text else "")
        out.append(AotCase(m.__name__, "_block_select_kernel", name, arch, "fp32", runtime, spec.meta,
                           spec.num_warps, 1, m.select_shared_memory(nk), tensor_cores=False))
    return out


# (label, dtype, head_dim, heads, seq_len, plan_bm, plan_bn, tile_n, max_level, flags): PSA's
# pyramid kernel on video self-attention. Wan 2.1 1.3B 480p psa_topk: 128x32 blocks, 1024
# key blocks (the packed case: 8 level-8 visits a tile); Wan 2.1 14B 720p psa_balanced:
# 128x128 blocks; the default 128x64; HunyuanVideo 720p with a 64-key tile.
_PYR_MAIN = [("wan480 psa_topk", "bf16", 128, 12, 32760, 128, 32, 32, 8, ("lse",))]
_PYR_EXTRA = [
    ("wan14b720 psa_balanced", "bf16", 128, 40, 75600, 128, 128, 32, 8, ("lse",)),
    ("wan480 default", "bf16", 128, 12, 32760, 128, 64, 32, 8, ("lse",)),
    ("hunyuan720 video", "bf16", 128, 24, 119040, 128, 128, 64, 8, ("lse",)),
    ("wan480 psa_topk", "fp16", 128, 12, 32760, 128, 32, 32, 8, ("lse",)),
    ("wan480 psa_topk", "fp32", 128, 12, 32760, 128, 32, 32, 8, ("lse",)),
    ("wan480 psa_topk", "bf16", 64, 12, 32760, 128, 32, 32, 8, ("lse",)),
    ("wan480 psa_topk video only", "bf16", 128, 12, 32760, 128, 32, 32, 8, ()),
    ("wan480 padded keys", "bf16", 128, 12, 32760, 128, 64, 32, 8, ("lse", "valid")),
]


def _pyramid_cases(arch: int, full: bool) -> list[AotCase]:
    import triton

    from ._common import SMEM_LIMIT, estimate_shared_memory

    m = _module("pyramid_attention")
    arg_names, const_names = _params(m._pyramid_fwd_kernel)
    out = []
    for i, (label, dt, d, h, s, pbm, pbn, tile, top, flags) in enumerate(_PYR_MAIN + _PYR_EXTRA):
        main = i < len(_PYR_MAIN)
        if not full and not _in_quick(main, dt, arch):
            continue
        dtype = _DTYPES[dt]
        q, k, v = (_bshd(1, s, h, d, dtype) for _ in range(3))
        n_levels = m.level_count(top)
        pooled = sum(-(-s // (1 << e)) for e in range(1, n_levels))
        kp = torch.empty(1, h, pooled, d, dtype=dtype, device="meta")
        nqb, nkb = math.ceil(s / pbm), math.ceil(s / pbn)
        idx = torch.empty(1, h, nqb, nkb, dtype=torch.int32, device="meta")
        seg = torch.empty(1, h, nqb, n_levels, dtype=torch.int32, device="meta")
        kv_valid = torch.empty(1, dtype=torch.int32, device="meta") if "valid" in flags else None
        spec = m.launch_spec(q, k, v, kp, kp, idx, seg, kv_valid, pbm, pbn, n_levels, tile, 1 / math.sqrt(d),
                             "lse" in flags)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        # the configs the autotuner may keep, sized with the (fixed) pooled-key tile
        kept = [triton.Config({"BLOCK_M": c.kwargs["BLOCK_M"], "BLOCK_N": tile}, num_warps=c.num_warps,
                              num_stages=c.num_stages)
                for c in m.HOPPER_CONFIGS if m.keep_config(c, pbm, tile, d, dtype.itemsize, SMEM_LIMIT[arch])]
        if not full:
            kept = _quick_pick(kept, main=main)
        name = f"{label} {dt} D{d} plan{pbm}x{pbn} tile{tile} L<={top} " + "+".join(flags)
        meta = {key: val for key, val in spec.meta.items() if key != "BLOCK_N"}
        for sized in kept:
            out.append(AotCase(m.__name__, "_pyramid_fwd_kernel", name.rstrip(), arch, dt, runtime,
                               {**meta, **sized.kwargs}, sized.num_warps, sized.num_stages,
                               estimate_shared_memory(sized, d, dtype.itemsize)))
    return out


# (label, dtype, head_dim, heads, seq_len, plan_bm, chunk tile, flags): the chunk variant of
# the block-sparse kernel (VMoBA) at Wan 2.1 1.3B 480p (21x30x52): 3-D chunks 4x4x13 (192
# chunks, ragged), 1-D chunks of 2 frames (11), 2-D 4x13 patches (32); HunyuanVideo 720p
# (33x45x80) 6x9x20 cubes (120).
_BSA_CHUNK_MAIN = [("wan480 vmoba 3d", "bf16", 128, 12, (21, 30, 52), 64, (4, 4, 13), ("lse",))]
_BSA_CHUNK_EXTRA = [
    ("wan480 vmoba 1d", "bf16", 128, 12, (21, 30, 52), 64, (2, 30, 52), ("lse",)),
    ("wan480 vmoba 2d video only", "bf16", 128, 12, (21, 30, 52), 64, (21, 4, 13), ()),
    ("hunyuan720 vmoba 3d", "bf16", 128, 24, (33, 45, 80), 128, (6, 9, 20), ("lse",)),
    ("wan480 vmoba 3d", "fp16", 128, 12, (21, 30, 52), 64, (4, 4, 13), ("lse",)),
    ("wan480 vmoba 3d", "fp32", 128, 12, (21, 30, 52), 64, (4, 4, 13), ("lse",)),
    ("wan480 vmoba 3d", "bf16", 64, 12, (21, 30, 52), 64, (4, 4, 13), ("lse",)),
    ("wan480 vmoba 3d split", "bf16", 128, 12, (21, 30, 52), 64, (4, 4, 13), ("lse", "split")),
]


def _chunk_count(grid, tile) -> int:
    return math.prod(-(-g // t) for g, t in zip(grid, tile))


def _bsa_chunk_cases(arch: int, full: bool) -> list[AotCase]:
    from ._common import SMEM_LIMIT, estimate_shared_memory

    m = _module("block_sparse_attention")
    arg_names, const_names = _params(m._block_sparse_fwd_kernel)
    out = []
    for i, (label, dt, d, h, grid, pbm, tile, flags) in enumerate(_BSA_CHUNK_MAIN + _BSA_CHUNK_EXTRA):
        main = i < len(_BSA_CHUNK_MAIN)
        if not full and not _in_quick(main, dt, arch):
            continue
        dtype = _DTYPES[dt]
        s, nc = math.prod(grid), _chunk_count(grid, tile)
        q, k, v = (_bshd(1, s, h, d, dtype) for _ in range(3))
        nqb = math.ceil(s / pbm)
        idx = torch.empty(1, h, nqb, nc, dtype=torch.int32, device="meta")
        cnt = torch.empty(1, h, nqb, dtype=torch.int32, device="meta")
        bounds = torch.empty(nc + 1, dtype=torch.int32, device="meta")
        bits = torch.empty(1, h, -(-nc // 32), s, dtype=torch.int32, device="meta")
        splits = 3 if "split" in flags else 1
        spec = m.launch_spec(q, k, v, idx, cnt, None, None, pbm, m.CHUNK_PLAN_BN, 1 / math.sqrt(d), "lse" in flags,
                             splits, False, chunk_bounds=bounds, row_bits=bits)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        kept = [c for c in m.HOPPER_CONFIGS
                if m.keep_config(c, pbm, m.CHUNK_PLAN_BN, d, dtype.itemsize, SMEM_LIMIT[arch])]
        if not full:
            kept = _quick_pick(kept, main=main)
        name = f"{label} {dt} D{d} {nc} chunks of <={math.prod(tile)}, plan rows {pbm} " + "+".join(flags)
        for c in kept:
            out.append(AotCase(m.__name__, "_block_sparse_fwd_kernel", name.rstrip(), arch, dt, runtime,
                               {**spec.meta, **c.kwargs}, c.num_warps, c.num_stages,
                               estimate_shared_memory(c, d, dtype.itemsize)))
    return out


# (label, dtype, heads, grid, head_dim, chunk tile): chunk key means (VMoBA), read in place
# from diffusers' (B, S, H, D) layout.
_CHUNK_MEAN_MAIN = [("wan480 3d chunks", "bf16", 12, (21, 30, 52), 128, (4, 4, 13))]
_CHUNK_MEAN_EXTRA = [
    ("wan480 1d chunks", "bf16", 12, (21, 30, 52), 128, (2, 30, 52)),
    ("hunyuan720 3d chunks", "bf16", 24, (33, 45, 80), 128, (6, 9, 20)),
    ("wan480 3d chunks", "fp16", 12, (21, 30, 52), 128, (4, 4, 13)),
    ("wan480 3d chunks", "fp32", 12, (21, 30, 52), 128, (4, 4, 13)),
    ("wan480 3d chunks", "bf16", 12, (21, 30, 52), 64, (4, 4, 13)),
]


def _chunk_mean_cases(arch: int, full: bool) -> list[AotCase]:
    m = _module("chunk_gate")
    arg_names, const_names = _params(m._chunk_mean_kernel)
    out = []
    for i, (label, dt, h, grid, d, tile) in enumerate(_CHUNK_MEAN_MAIN + _CHUNK_MEAN_EXTRA):
        if not full and not _in_quick(i < len(_CHUNK_MEAN_MAIN), dt, arch):
            continue
        x = _bshd(1, math.prod(grid), h, d, _DTYPES[dt])
        bounds = torch.empty(_chunk_count(grid, tile) + 1, dtype=torch.int32, device="meta")
        spec = m.mean_launch_spec(x, bounds)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        name = f"{label} {'x'.join(map(str, tile))} {dt} D{d}"
        out.append(AotCase(m.__name__, "_chunk_mean_kernel", name, arch, dt, runtime, spec.meta, spec.num_warps, 1,
                           m.mean_shared_memory(d, spec.num_warps), tensor_cores=False))
    return out


# (label, dtype, heads, grid, head_dim, chunk tile, topk): the per-token gate and selection
# (VMoBA), queries read in place; the most chunks the kernel takes (MAX_CHUNKS).
_CHUNK_GATE_MAIN = [("wan480 3d chunks", "bf16", 12, (21, 30, 52), 128, (4, 4, 13), False)]
_CHUNK_GATE_EXTRA = [
    ("wan480 3d chunks topk", "bf16", 12, (21, 30, 52), 128, (4, 4, 13), True),
    ("wan480 1d chunks", "bf16", 12, (21, 30, 52), 128, (2, 30, 52), False),
    ("wan480 2d chunks", "bf16", 12, (21, 30, 52), 128, (21, 4, 13), False),
    ("most chunks", "bf16", 12, (32, 32, 32), 128, (2, 4, 4), False),
    ("wan480 3d chunks", "fp16", 12, (21, 30, 52), 128, (4, 4, 13), False),
    ("wan480 3d chunks", "fp32", 12, (21, 30, 52), 128, (4, 4, 13), False),
    ("wan480 3d chunks", "bf16", 12, (21, 30, 52), 64, (4, 4, 13), False),
]


def _chunk_gate_cases(arch: int, full: bool) -> list[AotCase]:
    m = _module("chunk_gate")
    arg_names, const_names = _params(m._chunk_gate_kernel)
    out = []
    for i, (label, dt, h, grid, d, tile, topk) in enumerate(_CHUNK_GATE_MAIN + _CHUNK_GATE_EXTRA):
        if not full and not _in_quick(i < len(_CHUNK_GATE_MAIN), dt, arch):
            continue
        s, nc = math.prod(grid), _chunk_count(grid, tile)
        q = _bshd(1, s, h, d, _DTYPES[dt])
        means = torch.empty(1, h, d, nc, dtype=torch.float32, device="meta").transpose(2, 3)
        bounds = torch.empty(nc + 1, dtype=torch.int32, device="meta")
        spec = m.gate_launch_spec(q, means, bounds, topk=topk, tau=0.25, k_other=5, query_block=64)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        name = f"{label} {'x'.join(map(str, tile))} ({nc}) {dt} D{d}"
        out.append(AotCase(m.__name__, "_chunk_gate_kernel", name, arch, dt, runtime, spec.meta, spec.num_warps, 1,
                           m.gate_shared_memory(spec.meta["ROWS"], spec.meta["NC_P2"], spec.num_warps),
                           tensor_cores=False))
    return out


# (label, dtype, head_dim, heads, seq_len, plan_bm, plan_bn, quant, flags): PARO's INT8 kernel
# on video self-attention with its 64 x 64 blocks. Wan 2.1 14B 720p (40 heads x 75600
# tokens, the last block ragged) in both modes; Wan 2.1 1.3B 480p; padded keys.
_QUANT_MAIN = [
    ("wan14b720 paro", "bf16", 128, 40, 75600, 64, 64, "int8", ("lse",)),
    ("wan14b720 paro", "bf16", 128, 40, 75600, 64, 64, "int8-pv", ("lse",)),
]
_QUANT_EXTRA = [
    ("wan480 paro", "bf16", 128, 12, 32760, 64, 64, "int8", ()),
    ("wan480 paro", "fp16", 128, 12, 32760, 64, 64, "int8", ("lse",)),
    ("wan480 paro", "fp32", 128, 12, 32760, 64, 64, "int8", ("lse",)),
    ("wan480 paro", "bf16", 64, 12, 32760, 64, 64, "int8", ("lse",)),
    ("wan480 paro", "bf16", 64, 12, 32760, 64, 64, "int8-pv", ("lse",)),
    ("wan480 paro 128-row blocks", "bf16", 128, 12, 32760, 128, 64, "int8", ("lse",)),
    ("wan480 paro padded keys", "bf16", 128, 12, 32760, 64, 64, "int8", ("lse", "valid", "mask")),
    ("hunyuan720 text queries", "bf16", 128, 24, 256, 64, 64, "int8", ("valid", "split")),
]


def _quant_attn_cases(arch: int, full: bool) -> list[AotCase]:
    from ._common import SMEM_LIMIT

    m = _module("quant_attention")
    arg_names, const_names = _params(m._quant_block_sparse_fwd_kernel)
    out = []
    for i, (label, dt, d, h, s, pbm, pbn, quant, flags) in enumerate(_QUANT_MAIN + _QUANT_EXTRA):
        main = i < len(_QUANT_MAIN)
        if not full and not _in_quick(main, dt, arch):
            continue
        dtype = _DTYPES[dt]
        skv = 119296 if "split" in flags else s
        pv = quant == "int8-pv"
        qi = torch.empty(1, h, s, d, dtype=torch.int8, device="meta")
        ki = torch.empty(1, h, skv, d, dtype=torch.int8, device="meta")
        qs = torch.empty(1, h, -(-s // m.Q_GROUP), dtype=torch.float32, device="meta")
        ks = torch.empty(1, h, -(-skv // m.K_GROUP), dtype=torch.float32, device="meta")
        v = (torch.empty(1, h, skv, d, dtype=torch.int8, device="meta") if pv else _bshd(1, skv, h, d, dtype))
        vs = torch.empty(1, h, -(-skv // m.V_GROUP), d, dtype=torch.float32, device="meta")
        nqb, nkb = math.ceil(s / pbm), math.ceil(skv / pbn)
        idx = torch.empty(1, h, nqb, nkb, dtype=torch.int32, device="meta")
        cnt = torch.empty(1, h, nqb, dtype=torch.int32, device="meta")
        kv_valid = torch.empty(1, dtype=torch.int32, device="meta") if "valid" in flags else None
        kv_mask = torch.empty(skv, dtype=torch.bool, device="meta") if "mask" in flags else None
        splits = 3 if "split" in flags else 1
        spec = m.launch_spec(qi, qs, ki, ks, v, vs, idx, cnt, kv_valid, kv_mask, pbm, pbn, 1 / math.sqrt(d),
                             "lse" in flags, splits, dtype)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        v_bytes = 1 if pv else dtype.itemsize
        kept = [c for c in m.HOPPER_CONFIGS if m.keep_config(c, pbm, pbn, d, SMEM_LIMIT[arch], v_bytes)] \
            or [m.fallback_config(pbm, pbn)]
        if not full:
            kept = _quick_pick(kept, main=main)
        name = f"{label} {quant} {dt} D{d} plan{pbm}x{pbn} " + "+".join(flags)
        for c in kept:
            out.append(AotCase(m.__name__, "_quant_block_sparse_fwd_kernel", name.rstrip(), arch, dt, runtime,
                               {**spec.meta, **c.kwargs}, c.num_warps, c.num_stages,
                               m.quant_shared_memory(c, d, v_bytes)))
    return out


# (label, dtype, head_dim, heads, seq_len, with V, flags): the fused Q/K(/V) quantization
# before the INT8 kernel, read in place from diffusers' (B, S, H, D) layout.
_QUANTIZE_MAIN = [("wan14b720 q/k", "bf16", 128, 40, 75600, False, ())]
_QUANTIZE_EXTRA = [
    ("wan14b720 q/k/v", "bf16", 128, 40, 75600, True, ()),
    ("wan480 q/k", "fp16", 128, 12, 32760, False, ()),
    ("wan480 q/k", "fp32", 128, 12, 32760, False, ()),
    ("wan480 q/k/v", "bf16", 64, 12, 32760, True, ()),
    ("wan480 q/k/v padded keys", "bf16", 128, 12, 32760, True, ("valid", "mask")),
]


def _quantize_cases(arch: int, full: bool) -> list[AotCase]:
    m = _module("quant_attention")
    arg_names, const_names = _params(m._quantize_qkv_kernel)
    out = []
    for i, (label, dt, d, h, s, with_v, flags) in enumerate(_QUANTIZE_MAIN + _QUANTIZE_EXTRA):
        if not full and not _in_quick(i < len(_QUANTIZE_MAIN), dt, arch):
            continue
        q, k, v = (_bshd(1, s, h, d, _DTYPES[dt]) for _ in range(3))
        kv_valid = torch.empty(1, dtype=torch.int32, device="meta") if "valid" in flags else None
        kv_mask = torch.empty(s, dtype=torch.bool, device="meta") if "mask" in flags else None
        spec = m.quantize_launch_spec(q, k, v if with_v else None, kv_valid, kv_mask)
        runtime = _runtime_values(spec.args, arg_names, const_names)
        name = f"{label} {dt} D{d}" + "".join(f" {f}" for f in flags)
        out.append(AotCase(m.__name__, "_quantize_qkv_kernel", name, arch, dt, runtime, spec.meta, m.QUANT_WARPS, 1,
                           m.quantize_shared_memory(d, m.QUANT_WARPS), tensor_cores=False))
    return out



def int8_code_report(case: AotCase) -> dict:
    """Compile ``case`` for its target and count what the INT8 kernels must contain: MMA
    instructions on s8 operands (``mma.sync...s32.s8.s8.s32`` on sm_80,
    ``wgmma.mma_async...s32.s8.s8`` on sm_90) among all MMA instructions, and uses of the
    round-half-to-even constant 1.5·2^23 (``0f4B400000``; gone if the compiler folded
    ``(y + c) - c`` into ``y``). Run in a process with ``TRITON_INTERPRET=0`` (a worker of
    ``gen.check.kernels``)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget

    fn = triton.jit(getattr(_module(case.module.rsplit(".", 1)[-1]), case.kernel))
    sig, consts, attrs = signature_of(fn, case.runtime, case.constexprs)
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", case.arch, 32),
                              options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    ptx = compiled.asm["ptx"]
    mma = re.findall(r"^\s*(w?gmma\.mma_async\S*|mma\.sync\S*)", ptx, flags=re.M)
    return {"label": case.label, "arch": case.arch, "mma": len(mma), "s8_mma": sum(".s8.s8" in m for m in mma),
            "mma_kinds": sorted(set(mma)), "rint_constant": ptx.count("0f4B400000"),
            "shared": int(compiled.metadata.shared)}

# kernel function name -> (module in this folder, case generator(arch, full))
KERNELS: dict[str, tuple[str, Callable[[int, bool], list[AotCase]]]] = {
    "_block_sparse_fwd_kernel": ("block_sparse_attention", _bsa_cases),
    "_cache_attn_fwd_kernel": ("cache_attention", _cache_cases),
    "_block_stats_kernel": ("block_estimate", _stats_cases),
    "_block_select_kernel": ("block_estimate", _select_cases),
    "_chunk_mean_kernel": ("chunk_gate", _chunk_mean_cases),
    "_chunk_gate_kernel": ("chunk_gate", _chunk_gate_cases),
    "_pyramid_fwd_kernel": ("pyramid_attention", _pyramid_cases),
    "_quant_block_sparse_fwd_kernel": ("quant_attention", _quant_attn_cases),
    "_quantize_qkv_kernel": ("quant_attention", _quantize_cases),
}


def cases(full: bool = False, archs: tuple[int, ...] = TARGETS, kernels: tuple[str, ...] | None = None) -> list[AotCase]:
    """Every case to compile: all kept configs with ``full``, else a fast subset."""
    out = []
    for name, (_, make) in KERNELS.items():
        if kernels is None or name in kernels:
            for arch in archs:
                out.extend(make(arch, full))
    return out
