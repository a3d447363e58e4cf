"""Whether each Triton kernel compiles and runs on this machine's GPU, and which config
its autotuner chose (``gen info``).

Each kernel is launched once on a small input at the device's real dtype (bf16); the
autotuner then holds its choice for that key. The result is a list of plain dicts so
the caller can print it however it likes.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from ._common import interpreting

__all__ = ["kernel_status"]


def _config_text(module) -> str:
    if interpreting():
        return "interpreter (fixed tile)"
    autotuner = module._kernel(False)
    chosen = list(getattr(autotuner, "cache", {}).values())
    if not chosen:
        return "not tuned"
    c = chosen[-1]
    tile = "x".join(str(v) for k, v in c.kwargs.items() if k.startswith("BLOCK"))
    return f"{tile}, {c.num_warps} warps, {c.num_stages} stages"


def _try_block_sparse(device: torch.device) -> dict:
    m = importlib.import_module(f"{__package__}.block_sparse_attention")
    b, h, s, d = 1, 2, 300, 64  # ragged last block on purpose
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    nb = -(-s // 128)
    plan = SimpleNamespace(
        block_m=128, block_n=128, q_len=s, kv_len=s, is_validated=True,
        kv_indices=torch.arange(nb, dtype=torch.int32, device=device).expand(1, 1, nb, nb).contiguous(),
        kv_counts=torch.full((1, 1, nb), nb, dtype=torch.int32, device=device),
    )
    out = m.block_sparse_attention(q, k, v, plan)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    err = float((out.float() - ref).norm() / ref.norm())
    return {"error_vs_sdpa": err, "config": _config_text(m)}


def _try_cache(device: torch.device) -> dict:
    m = importlib.import_module(f"{__package__}.cache_attention")
    tpf, slots, d = 40, 3, 64
    q = torch.randn(1, 50, 2, d, device=device, dtype=torch.bfloat16)
    kc, vc = (torch.randn(1, slots * tpf, 2, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    frame_slots = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
    out = m.cache_attention(q, kc, vc, frame_slots, tokens_per_frame=tpf)
    rows = torch.cat([torch.arange(s * tpf, (s + 1) * tpf, device=device) for s in (2, 0, 1)])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), kc[:, rows].float().transpose(1, 2), vc[:, rows].float().transpose(1, 2)
    ).transpose(1, 2)
    err = float((out.float() - ref).norm() / ref.norm())
    return {"error_vs_sdpa": err, "config": _config_text(m)}


_TRIALS = {"block_sparse_attention": _try_block_sparse, "cache_attention": _try_cache}


def kernel_status(device: torch.device) -> list[dict]:
    """One dict per kernel family: ``name``, ``ok``, ``config`` (the autotuner's choice),
    ``error_vs_sdpa`` (relative, bf16) or ``error`` (why it failed). CUDA, or the CPU
    under ``TRITON_INTERPRET=1`` (which tests this function)."""
    if device.type != "cuda" and not interpreting():
        raise ValueError("kernel_status needs a CUDA device; `gen check kernels` compiles them without one.")
    rows = []
    for name, trial in _TRIALS.items():
        try:
            rows.append({"name": name, "ok": True, **trial(device)})
        except Exception as exc:  # noqa: BLE001 - report, do not crash `gen info`
            rows.append({"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows
