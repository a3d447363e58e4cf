"""Sparse plans on the CPU through torch's fused attention, on gathered key blocks.

For a chunk of query blocks, the key/value blocks each one visits are gathered into one
``(visits x block_n)`` row (``index_select``-style, O(S · visits) memory like the
reference), padded visits and invalid keys get a ``-inf`` bias, and torch's fused CPU
attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``: blocked online
softmax, multi-threaded, the LSE beside the output) runs every query block of the chunk
as one batched call. The work is ``max_visits / n_kv_blocks`` of dense attention, plus
the gather (``1 / (4 · block_m)`` of the FLOPs in bytes moved).

Same contract as the reference; fp32, bf16 and fp16.
"""

from __future__ import annotations

import threading

import torch

from gen.kernels._checks import check_call

from ..token_order import run_in_slots
from .sdpa import FLASH_CPU, key_blocks, key_mask

__all__ = ["gathered_attention", "gathered_attention_in_order"]

# gathered key + value elements held at once per chunk (2**22 fp32 = 16 MiB). Chunks that
# small are still in cache when the attention reads them back: measured on a 2-core CPU at
# density 0.25 (S=4096 and 16384, D=64, fp32), 2**22 gave 2.85x over dense SDPA where one
# 2**24 chunk gave 2.41-2.48x; 2**18-2**20 gave 2.73-2.77x (more, smaller calls)
_GATHER_BUDGET = 1 << 22


_BUFFERS = threading.local()


def _buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused buffer per role and thread (the latest shape only; the gathered keys and
    values stay under the budget). Fresh multi-megabyte tensors per call cost page faults
    once glibc has returned the previous ones to the OS: at S=4096, 2 heads, D=64 on a
    2-core CPU the same call took 19 ms after a dense SDPA call and 10 ms in steady state.
    Not used when autograd records (a reused buffer would be overwritten under the graph)."""
    table = getattr(_BUFFERS, "table", None)
    if table is None:
        table = _BUFFERS.table = {}
    # tensors made under inference_mode cannot be written outside it (and the reverse is
    # wasteful): one buffer per mode
    role = (role, torch.is_inference_mode_enabled())
    buf = table.get(role)
    if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
        buf = table[role] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def _plan_rows(plan, bsz: int, heads: int):
    """``(kv_indices, kv_counts, rows, full_rows)`` for a call of ``bsz x heads``: the
    plan's indices and counts as long ``(B, H, nq, V)`` / ``(B, H, nq)``, the flat rows of
    the key-block table each visit reads (``(B*H*nq*V,)``, or ``(B, H, nq, V)`` to slice),
    and whether every row visits ``max_visits`` blocks. Kept on the plan (plans are reused
    call after call), so the per-call work is the gather itself."""
    memo = plan.__dict__.setdefault("_gather_rows", {})
    # per inference mode: tensors made under it cannot be saved for backward outside it
    mkey = (bsz, heads, torch.is_inference_mode_enabled())
    got = memo.get(mkey)
    if got is None:
        nq, nk, visits = plan.n_q_blocks, plan.n_kv_blocks, plan.max_visits
        idx = plan.kv_indices.long().expand(bsz, heads, nq, visits)
        cnt = plan.kv_counts.long().expand(bsz, heads, nq)
        base = (torch.arange(bsz * heads, device=idx.device) * nk).view(bsz, heads, 1, 1)
        rows = idx + base
        got = memo[mkey] = (idx, cnt, rows, bool((cnt == visits).all()))
    idx, cnt, rows, full = got
    return idx, cnt, rows, full


def _ragged_bias(nk: int, bn: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(nk, bn)`` additive key bias: 0 for keys, -inf for the slots past ``kv_len``."""
    table = getattr(_BUFFERS, "table", None)
    if table is None:
        table = _BUFFERS.table = {}
    key = ("bias", nk, bn, kv_len, dtype, device, torch.is_inference_mode_enabled())
    bias = table.get(key)
    if bias is None:
        bias = torch.zeros(nk * bn, dtype=dtype, device=device)
        bias[kv_len:] = float("-inf")
        bias = table[key] = bias.view(nk, bn)
    return bias


def gathered_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan,
    *,
    scale: float | None = None,
    kv_valid: torch.Tensor | None = None,
    kv_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    budget: int = _GATHER_BUDGET,
    prechecked: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention by gathering each query block's visited key blocks and
    running torch's fused CPU attention on them. Same arguments and result as
    ``gen.attention.reference.block_sparse_attention`` (``budget``: most gathered key +
    value elements held at once; ``prechecked``: the caller checked inputs and plan, as the
    dispatch does)."""
    bsz, heads, q_len, kv_len, head_dim, sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=kv_valid,
                                                               kv_mask=kv_mask, prechecked=prechecked)
    bm, bn = plan.block_m, plan.block_n
    nq, nk, visits = plan.n_q_blocks, plan.n_kv_blocks, plan.max_visits
    dev, dt = q.device, q.dtype

    reuse = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))

    def blocks(x: torch.Tensor, size: int, n: int, role: str) -> torch.Tensor:
        pad = n * size - x.shape[2]
        if not reuse:
            if pad:
                x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            return x.reshape(bsz, heads, n, size, head_dim)
        if pad or not x.is_contiguous():
            # a reused buffer with a zero tail (a fresh padded copy per call costs page faults)
            buf = _buffer(role, (bsz, heads, n * size, head_dim), dt, dev)
            buf[:, :, : x.shape[2]] = x
            buf[:, :, x.shape[2]:] = 0
            x = buf
        return x.view(bsz, heads, n, size, head_dim)

    qb = blocks(q, bm, nq, "q_in")
    # key/value blocks as rows of one 2-D table, gathered with index_select: a row copy.
    # Measured at S=4096, 2 heads, D=64 on a 2-core CPU: 0.42 ms per tensor, against
    # 3.8 ms for index_select on the 3-D view and more for advanced indexing over three
    # index tensors (which made the gather cost more than the attention)
    kb = blocks(k, bn, nk, "k_in").reshape(bsz * heads * nk, bn * head_dim)
    vb = blocks(v, bn, nk, "v_in").reshape(bsz * heads * nk, bn * head_dim)
    idx, cnt, rows_all, full_rows = _plan_rows(plan, bsz, heads)
    key_ok = key_mask(bsz, kv_len, kv_valid, kv_mask, dev)
    # every gathered key counts when no key is masked, the last key block is whole and
    # every row visits max_visits blocks: then no mask is built at all (the fused kernel
    # is faster without one)
    okb = key_bias = None
    if key_ok is None and kv_len % bn == 0 and full_rows:
        pass
    elif key_ok is None:
        # only the ragged end is masked: no row can end up empty, so the key bias comes
        # straight from a (n_kv_blocks, block_n) table of 0 / -inf, gathered like the keys
        key_bias = _ragged_bias(nk, bn, kv_len, dt, dev)
    else:
        okb = key_blocks(key_ok, kv_len, nk, bn, dev)  # (B|1, nk, bn)
        ok_base = (torch.arange(okb.shape[0], device=dev) * nk).view(-1, 1, 1, 1)
        okb = okb.reshape(-1, bn)

    chunk = max(1, budget // max(1, 2 * bsz * heads * max(visits, 1) * bn * head_dim))
    single = chunk >= nq
    if not single:
        out = torch.empty(bsz, heads, nq, bm, head_dim, dtype=dt, device=dev)
        lse = torch.empty(bsz, heads, nq, bm, dtype=torch.float32, device=dev)
    for start in range(0, nq, chunk):
        sl = slice(start, min(nq, start + chunk))
        c = sl.stop - sl.start
        ci = idx[:, :, sl]  # (B, H, c, V)
        rows = rows_all.reshape(-1) if single else rows_all[:, :, sl].reshape(-1)
        if reuse:
            kg = torch.index_select(kb, 0, rows, out=_buffer("k", (rows.numel(), bn * head_dim), dt, dev))
            vg = torch.index_select(vb, 0, rows, out=_buffer("v", (rows.numel(), bn * head_dim), dt, dev))
        else:
            kg, vg = kb.index_select(0, rows), vb.index_select(0, rows)
        kg = kg.view(bsz, heads * c, visits * bn, head_dim)
        vg = vg.view(bsz, heads * c, visits * bn, head_dim)
        qq = qb[:, :, sl].reshape(bsz, heads * c, bm, head_dim)
        bias = valid = None
        if key_bias is not None:
            bias = key_bias.index_select(0, ci.reshape(-1)).view(bsz, heads, c, visits, bn)
            if not full_rows:
                unused = torch.arange(visits, device=dev) >= cnt[:, :, sl, None]
                bias = bias.masked_fill(unused[..., None], float("-inf"))
            bias = bias.view(bsz, heads * c, 1, visits * bn)
            if not full_rows:
                valid = ~torch.isinf(bias)
        elif okb is not None:
            valid = okb.index_select(0, (ci + ok_base).reshape(-1)).view(bsz, heads, c, visits, bn)
            if not full_rows:
                valid = valid & (torch.arange(visits, device=dev) < cnt[:, :, sl, None])[..., None]
            valid = valid.reshape(bsz, heads * c, 1, visits * bn)
            if not bool(valid.all()):
                bias = torch.zeros(valid.shape, dtype=dt, device=dev).masked_fill_(~valid, float("-inf"))
        if visits == 0:
            o = torch.zeros_like(qq)
            lo = torch.full(qq.shape[:3], float("-inf"), device=dev)
        else:
            o, lo = FLASH_CPU(qq, kg, vg, attn_mask=bias, scale=sm_scale)
        if valid is not None:
            empty = ~valid.any(-1)  # (B, H*c, 1): rows of a query block that see nothing
            if bool(empty.any()):
                o = o.masked_fill(empty[..., None], 0.0)
                lo = lo.masked_fill(empty, float("-inf"))
        if single:  # one chunk: the kernel's output is the result, no copy into a buffer
            out, lse = o.view(bsz, heads, nq, bm, head_dim), lo.view(bsz, heads, nq, bm).float()
        else:
            out[:, :, sl] = o.view(bsz, heads, c, bm, head_dim)
            lse[:, :, sl] = lo.view(bsz, heads, c, bm).float()

    out = out.reshape(bsz, heads, nq * bm, head_dim)[:, :, :q_len]
    out = out if nq * bm == q_len else out.contiguous()
    if return_lse:
        lse = lse.reshape(bsz, heads, nq * bm)[:, :, :q_len]
        return out, (lse if nq * bm == q_len else lse.contiguous())
    return out


# most token rows the fused token-order path gathers per call (its row indices are kept on
# the plan: 8 bytes a row); larger calls permute first and gather key blocks instead
_FUSED_ROWS = 1 << 20


def _token_rows(x: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """``x (B, H, n, D)`` as a 2-D table of token rows ``(rows, D)`` and its layout name:
    ``"bhsd"`` (contiguous) or ``"bshd"`` (a transposed contiguous ``(B, n, H, D)``, what
    diffusers' processors hand over); None for other strides."""
    b, h, n, d = x.shape
    if x.is_contiguous():
        return x.view(b * h * n, d), "bhsd"
    if x.transpose(1, 2).is_contiguous():
        return x.transpose(1, 2).view(b * n * h, d), "bshd"
    return None


def _fused_index(plan, perm, bsz: int, heads: int, n: int, kind: str, device: torch.device):
    """Row indices of the fused path, kept on the plan per (order, batch, heads, layout):
    ``q_rows (B*H*nq*bm,)``, ``kv_rows (B*H*nq*V*bn,)``, ``bias`` (additive key bias of the
    gathered keys, ``(B, H*nq, 1, V*bn)``, or None when every gathered key counts),
    ``empty`` (bool ``(B, H*nq, 1)`` of query blocks with no key, or None), ``out_rows`` (the
    output and LSE back to token order, in the input's layout)."""
    memo = plan.__dict__.setdefault("_fused_rows", {})
    key = (id(perm), bsz, heads, n, kind, str(device), torch.is_inference_mode_enabled())
    got = memo.get(key)
    if got is not None and got[0] is perm:
        return got[1:]
    bm, bn, nq, nk, visits = plan.block_m, plan.block_n, plan.n_q_blocks, plan.n_kv_blocks, plan.max_visits
    src = perm.index.to(device)
    slots_q = torch.full((nq * bm,), -1, dtype=torch.long, device=device)
    slots_q[: src.numel()] = src
    slots_k = torch.full((nk * bn,), -1, dtype=torch.long, device=device)
    slots_k[: src.numel()] = src
    b = torch.arange(bsz, device=device).view(bsz, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1)

    def rows(tokens: torch.Tensor, bb: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
        tokens = tokens.clamp(min=0)  # padding slots read token 0; they are masked or dropped
        return (bb * heads + hh) * n + tokens if kind == "bhsd" else (bb * n + tokens) * heads + hh

    q_rows = rows(slots_q.view(1, 1, -1), b, h).reshape(-1)
    idx = plan.kv_indices.long().expand(bsz, heads, nq, visits)
    cnt = plan.kv_counts.long().expand(bsz, heads, nq)
    kv_slots = (idx.unsqueeze(-1) * bn + torch.arange(bn, device=device)).reshape(bsz, heads, -1)
    kv_rows = rows(slots_k[kv_slots], b, h).reshape(-1)
    ok = slots_k[kv_slots].view(bsz, heads, nq, visits, bn) >= 0
    ok = ok & (torch.arange(visits, device=device) < cnt.unsqueeze(-1)).unsqueeze(-1)
    bias = empty = None
    if not bool(ok.all()):
        bias = torch.zeros(ok.shape, device=device).masked_fill_(~ok, float("-inf"))
        bias = bias.view(bsz, heads * nq, 1, visits * bn)
        empty = ~ok.view(bsz, heads * nq, 1, visits * bn).any(-1)  # query blocks that see nothing
        empty = empty if bool(empty.any()) else None
    # output row (token s of (b, h)) = where the kernel wrote it: slot inverse[s] of (b, h)
    inv = perm.inverse.to(device)
    if kind == "bhsd":
        out_rows = ((b * heads + h) * (nq * bm) + inv.view(1, 1, -1)).reshape(-1)
    else:
        out_rows = ((b.view(bsz, 1, 1) * heads + h.view(1, 1, heads)) * (nq * bm) + inv.view(1, -1, 1)).reshape(-1)
    memo[key] = (perm, q_rows, kv_rows, bias, empty, out_rows)
    return q_rows, kv_rows, bias, empty, out_rows


def gathered_attention_in_order(q, k, v, plan, perm, *, scale=None, kv_valid=None, kv_mask=None,
                                return_lse=False):
    """:func:`gathered_attention` for inputs in the original token order with a plan over
    ``perm``'s slots (``gen.attention.TokenPermutation``; padding slots never attended):
    ``q, k, v (B, H, n_in, D)``, the result in the original order, ``(B, H, n_in, D)``.

    Small calls take one row gather per tensor straight from the input's memory (its
    permutation, blocking and head layout at once) and one back for the output, instead
    of permuting q, k and v, gathering key blocks and permuting the output: at 320 tokens
    that is 5 copies instead of 9 (the cost of such calls is the number of operations).
    Larger calls, key padding (``kv_valid``/``kv_mask``) and other strides permute first."""
    bsz, heads, n, head_dim = q.shape
    small = bsz * heads * plan.n_q_blocks * max(plan.max_visits, 1) * plan.block_n <= _FUSED_ROWS
    tables = [_token_rows(x) for x in (q, k, v)]
    same = all(t is not None for t in tables) and len({t[1] for t in tables}) == 1
    reuse = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    if not (small and same and reuse and kv_valid is None and kv_mask is None and FLASH_CPU is not None):
        return run_in_slots(gathered_attention, q, k, v, plan, perm, scale=scale, kv_valid=kv_valid,
                            kv_mask=kv_mask, return_lse=return_lse)
    kind = tables[0][1]
    sm_scale = check_call(q, k, v, plan, scale=scale, kv_valid=None, kv_mask=None, prechecked=True)[5]
    q_rows, kv_rows, bias, empty, out_rows = _fused_index(plan, perm, bsz, heads, n, kind, q.device)
    nq, bm = plan.n_q_blocks, plan.block_m
    vis = max(plan.max_visits, 1) * plan.block_n
    qq = torch.index_select(tables[0][0], 0, q_rows, out=_buffer("fq", (q_rows.numel(), head_dim), q.dtype, q.device))
    kg = torch.index_select(tables[1][0], 0, kv_rows, out=_buffer("fk", (kv_rows.numel(), head_dim), q.dtype, q.device))
    vg = torch.index_select(tables[2][0], 0, kv_rows, out=_buffer("fv", (kv_rows.numel(), head_dim), q.dtype, q.device))
    qq = qq.view(bsz, heads * nq, bm, head_dim)
    if plan.max_visits == 0:
        o = torch.zeros_like(qq)
        lo = torch.full(qq.shape[:3], float("-inf"), device=q.device)
    else:
        o, lo = FLASH_CPU(qq, kg.view(bsz, heads * nq, vis, head_dim), vg.view(bsz, heads * nq, vis, head_dim),
                          attn_mask=bias.to(q.dtype) if bias is not None else None, scale=sm_scale)
        if empty is not None:  # query blocks whose gathered keys are all masked (empty plan rows)
            o = o.masked_fill(empty[..., None], 0.0)
            lo = lo.masked_fill(empty, float("-inf"))
    out = o.reshape(-1, head_dim).index_select(0, out_rows)
    out = out.view(bsz, heads, n, head_dim) if kind == "bhsd" else out.view(bsz, n, heads, head_dim).transpose(1, 2)
    if not return_lse:
        return out
    lse = lo.float().reshape(-1).index_select(0, out_rows)
    lse = lse.view(bsz, heads, n) if kind == "bhsd" else lse.view(bsz, n, heads).transpose(1, 2)
    return out, lse
