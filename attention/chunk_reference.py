"""Pure-PyTorch chunk gating and chunk-sparse attention (VMoBA): the oracle of the chunk
kernels and their CPU backend.

VMoBA cuts the video tokens into *chunks* (whole frames, spatial tiles across all frames,
or spatio-temporal cubes), put in chunk order so each chunk is a contiguous run of
tokens; chunk ``c`` is tokens ``bounds[c] .. bounds[c + 1]`` (chunks of a 2-D/3-D
partition are ragged at the grid's edges, so lengths differ). Each query token then
chooses the chunks it attends:

* :func:`chunk_means`: ``mean(K_c)`` over the chunk's tokens, fp32.
* :func:`select_chunks`: the selection rule on a gate tensor ``g[.., s, c] = q_s ·
  mean(K_c)`` (the unit the authors' test vectors are written in).
* :func:`chunk_gate`: gates and selection of every query token, packed as a bitmask per
  row (:func:`pack_row_bits`), with the union over each ``query_block`` rows and the keys
  each row attends; :func:`chunk_gate_global` is the per-head (``global``) scope.
* :func:`chunk_sparse_attention`: attention of each row over the keys of the chunks its
  bits select (block-gather over the plan's visited chunks, fp32 math).

Selection (``query_head`` scope, per query token and head):

* the own chunk (the one holding the query) is always attended;
* ``topk``: the ``topk − 1`` other chunks with the largest gates;
* ``threshold``: gates min-max normalised over the row's chunks (``n_c = (g_c − min) /
  (max − min)``; every ``n_c = 1`` when all gates are equal); the own chunk's ``n``
  counts first, then other chunks in descending order are added while the cumulative
  share *before* them is below ``tau`` (``Σ_before < tau · Σ_all``), so the chunk that
  reaches ``tau`` is included, and at least one other chunk is taken when there are two
  chunks or more. ``tau >= 1`` selects every chunk: the authors' code, when ``tau``
  cannot be reached, ends up taking only the top two other chunks (a boolean filled with
  ``n − 1`` reads as 1); gen takes all chunks instead.
* Other chunks equal to the last one taken are taken too (ties are not broken by index),
  in both rules.

Everything is vectorised (no Python loop over chunks or tokens, no ``.item()``), so the
gating traces into a compiled graph.
"""

from __future__ import annotations

import torch

__all__ = [
    "chunk_gate",
    "chunk_gate_global",
    "chunk_means",
    "chunk_of_token",
    "chunk_sparse_attention",
    "pack_row_bits",
    "select_chunks",
    "select_chunks_global",
    "unpack_row_bits",
]

_SCORE_BUDGET = 1 << 26


def chunk_of_token(bounds: torch.Tensor, seq: int) -> torch.Tensor:
    """Long ``(seq,)``: the chunk holding each token for chunk bounds ``(n_chunks + 1,)``."""
    pos = torch.arange(seq, device=bounds.device)
    return torch.searchsorted(bounds[1:].long(), pos, right=True)


def chunk_means(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Mean of each chunk's tokens.

    Args:
        x: ``(B, H, S, D)``, any float dtype.
        bounds: int ``(n_chunks + 1,)`` rising from 0 to ``S``.

    Returns:
        fp32 ``(B, H, n_chunks, D)`` (fp64 for fp64 ``x``).
    """
    bsz, heads, seq, d = x.shape
    nc = bounds.numel() - 1
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.zeros(bsz, heads, nc, d, dtype=dt, device=x.device)
    sums.index_add_(2, chunk_of_token(bounds, seq), x.to(dt))
    sizes = (bounds[1:] - bounds[:-1]).to(dt).clamp(min=1)
    return sums / sizes.view(1, 1, nc, 1)


def _own_mask(own: torch.Tensor, nc: int) -> torch.Tensor:
    return own.view(-1, 1) == torch.arange(nc, device=own.device).view(1, -1)


def _take_count(values: torch.Tensor, other: torch.Tensor, kcnt: torch.Tensor, sorted_vals: torch.Tensor
                ) -> torch.Tensor:
    """``other & (values >= kcnt-th largest)``; nothing when ``kcnt`` is 0."""
    at = (kcnt - 1).clamp(min=0).unsqueeze(-1)
    thresh = sorted_vals.gather(-1, at)
    thresh = torch.where(kcnt.unsqueeze(-1) > 0, thresh, torch.full_like(thresh, float("inf")))
    return other & (values >= thresh)


def select_chunks(gates: torch.Tensor, own: torch.Tensor, *, select: str = "threshold", tau: float = 0.25,
                  topk: int = 3) -> torch.Tensor:
    """The chunks each query attends, per query token (``query_head`` scope).

    Args:
        gates: float ``(..., S, n_chunks)``: ``g[s, c] = q_s · mean(K_c)``.
        own: long ``(S,)``: the chunk holding each query.
        select: ``"threshold"`` or ``"topk"`` (see the module docstring).
        tau: threshold (> 0; ``>= 1`` selects every chunk).
        topk: chunks per query including its own (>= 1).

    Returns:
        bool ``(..., S, n_chunks)``.
    """
    nc = gates.shape[-1]
    other = ~_own_mask(own.to(gates.device), nc)
    return _select_last(gates, other, nc - 1, select=select, tau=tau, topk_other=max(topk - 1, 0))


def select_chunks_global(gates: torch.Tensor, own: torch.Tensor, *, select: str = "threshold", tau: float = 0.25,
                         topk: int = 3) -> torch.Tensor:
    """The chunks each query attends, decided per head over all (query, chunk) pairs
    (``global`` scope: the paper's global block selection).

    ``threshold``: gates min-max normalised over the whole head; the own chunks of all
    queries count first, then other (query, chunk) pairs in descending order while the
    share before them is below ``tau`` (the first always taken); ``tau >= 1`` selects
    everything. ``topk``: the ``(topk − 1) · S`` largest other pairs of the head. Ties
    with the last pair taken are taken too. A query may get no other chunk.

    Args:
        gates: float ``(B, H, S, n_chunks)``. own: long ``(S,)``.

    Returns:
        bool ``(B, H, S, n_chunks)``.
    """
    bsz, heads, seq, nc = gates.shape
    other = ~_own_mask(own.to(gates.device), nc).expand(bsz, heads, seq, nc)
    sel = _select_last(gates.reshape(bsz, heads, seq * nc), other.reshape(bsz, heads, seq * nc), seq * (nc - 1),
                       select=select, tau=tau, topk_other=max(topk - 1, 0) * seq)
    return sel.view(bsz, heads, seq, nc)


def _select_last(gates: torch.Tensor, other: torch.Tensor, n_other: int, *, select: str, tau: float,
                 topk_other: int) -> torch.Tensor:
    """The selection rule over the last axis, shared by the per-query and the per-head scope.

    ``gates`` float ``(..., N)``; ``other`` bool, broadcastable to it: the candidates that
    are not a query's own chunk (own ones are always kept and, for ``threshold``, count
    first); ``n_other``: the number of candidates per row (the same for every row);
    ``topk_other``: how many candidates ``topk`` keeps. Returns bool ``(..., N)``.
    """
    pos = torch.arange(gates.shape[-1], device=gates.device)
    if select == "topk":
        vals = gates
        srt = torch.where(other, gates, float("-inf")).sort(-1, descending=True).values
        kcnt = torch.full(gates.shape[:-1], min(topk_other, n_other), dtype=torch.long, device=gates.device)
    elif select == "threshold":
        gmax = gates.amax(-1, keepdim=True)
        gmin = gates.amin(-1, keepdim=True)
        rng = gmax - gmin
        vals = torch.where(rng > 0, (gates - gmin) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                           torch.ones_like(gates))
        total = vals.sum(-1, keepdim=True)
        own_share = torch.where(other, 0.0, vals).sum(-1, keepdim=True)
        srt = torch.where(other, vals, -1.0).sort(-1, descending=True).values
        srt0 = srt.clamp(min=0)
        before = own_share + srt0.cumsum(-1) - srt0
        limit = float("inf") if tau >= 1 else float(tau)
        keep = (before < limit * total) & (pos < n_other)
        kcnt = keep.sum(-1).clamp(min=min(1, n_other))
    else:
        raise ValueError(f"select must be 'threshold' or 'topk', got {select!r}.")
    return _take_count(vals, other, kcnt, srt) | ~other


def pack_row_bits(sel: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, H, S, n_chunks)`` → int32 ``(B, H, ceil(n_chunks / 32), S)``: bit ``c % 32``
    of word ``c // 32`` of row ``s`` set when ``sel[.., s, c]``."""
    bsz, heads, seq, nc = sel.shape
    words = -(-nc // 32)
    padded = torch.nn.functional.pad(sel, (0, words * 32 - nc)).view(bsz, heads, seq, words, 32)
    weights = torch.ones(32, dtype=torch.long, device=sel.device) << torch.arange(32, device=sel.device)
    value = (padded.long() * weights).sum(-1)  # in [0, 2**32)
    value = torch.where(value >= 2**31, value - 2**32, value)
    return value.to(torch.int32).transpose(2, 3).contiguous()


def unpack_row_bits(bits: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Inverse of :func:`pack_row_bits`: int32 ``(B|1, H|1, words, S)`` → bool ``(B|1, H|1,
    S, n_chunks)``."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    flags = (bits.unsqueeze(-1) >> shifts) & 1  # (B, H, W, S, 32)
    b, h, w, s, _ = flags.shape
    return flags.permute(0, 1, 3, 2, 4).reshape(b, h, s, w * 32)[..., :n_chunks].bool()


def _union_keys(sel: torch.Tensor, bounds: torch.Tensor, query_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, heads, seq, nc = sel.shape
    nqb = -(-seq // query_block)
    padded = torch.nn.functional.pad(sel, (0, 0, 0, nqb * query_block - seq))
    union = padded.view(bsz, heads, nqb, query_block, nc).any(3).to(torch.uint8)
    sizes = (bounds[1:] - bounds[:-1]).to(torch.int32)
    keys = (sel.to(torch.int32) * sizes).sum(-1, dtype=torch.int32)
    return union, keys


def chunk_gate(q: torch.Tensor, means: torch.Tensor, bounds: torch.Tensor, *, select: str = "threshold",
               tau: float = 0.25, topk: int = 3, query_block: int = 64
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-token chunk selection (``query_head`` scope).

    Args:
        q: ``(B, H, S, D)`` queries in chunk order.
        means: ``(B, H, n_chunks, D)`` chunk key means (:func:`chunk_means`).
        bounds: int ``(n_chunks + 1,)`` rising from 0 to ``S``.
        select, tau, topk: the rule (:func:`select_chunks`).
        query_block: rows per plan row the union is taken over.

    Returns:
        ``bits`` int32 ``(B, H, ceil(n_chunks / 32), S)`` (:func:`pack_row_bits`);
        ``union`` uint8 ``(B, H, ceil(S / query_block), n_chunks)``: 1 where a query of the
        plan row attends the chunk; ``keys`` int32 ``(B, H, S)``: keys each query attends.
    """
    gates = q.float() @ means.float().transpose(-1, -2)  # (B, H, S, nc), fp32, unscaled
    own = chunk_of_token(bounds, q.shape[2])
    sel = select_chunks(gates, own, select=select, tau=tau, topk=topk)
    union, keys = _union_keys(sel, bounds, query_block)
    return pack_row_bits(sel), union, keys


def chunk_gate_global(q: torch.Tensor, means: torch.Tensor, bounds: torch.Tensor, *, select: str = "threshold",
                      tau: float = 0.25, topk: int = 3, query_block: int = 64
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`chunk_gate` with the per-head (``global``) scope of
    :func:`select_chunks_global`; fused torch ops on any device (a sort over ``S x
    n_chunks`` gates per head)."""
    gates = q.float() @ means.float().transpose(-1, -2)
    own = chunk_of_token(bounds, q.shape[2])
    sel = select_chunks_global(gates, own, select=select, tau=tau, topk=topk)
    union, keys = _union_keys(sel, bounds, query_block)
    return pack_row_bits(sel), union, keys


def chunk_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, *, scale: float | None = None,
                           return_lse: bool = False, score_budget: int = _SCORE_BUDGET):
    """Chunk-sparse attention in PyTorch: row ``s`` attends the keys of the chunks its
    row bits select (``gen.kernels.block_sparse_attention.chunk_sparse_attention``'s
    contract).

    Per group of plan rows the visited chunks are gathered, padded to the longest chunk
    (``plan.max_chunk``), scored and masked by the rows' bits: memory stays
    O(rows · visits · max_chunk) per group, never ``S x S``. Math in fp32 (fp64 for fp64).

    Args:
        q: ``(B, H, Sq, D)``; fp16, bf16, fp32 or fp64.
        k, v: ``(B, H, Skv, D)``, same dtype and device.
        plan: a ``gen.attention.ChunkPlan`` for ``Sq``, ``Skv``.
        scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp, fp32 ``(B, H, Sq)``.
        score_budget: most score + gathered k/v elements held at once.

    Returns:
        ``out (B, H, Sq, D)`` in ``q.dtype`` and optionally ``lse``; rows that attend
        nothing give zeros and ``lse = -inf``.
    """
    from gen.kernels._checks import check_qkv, check_scale
    from gen.kernels.block_sparse_attention import check_chunk_plan

    bsz, heads, q_len, kv_len, head_dim = check_qkv(
        q, k, v, allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    check_chunk_plan(plan, q, k)
    sm_scale = check_scale(scale, head_dim)
    bm, cmax = plan.block_m, plan.max_chunk
    nc = plan.chunk_bounds.numel() - 1
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    bounds = plan.chunk_bounds.long()
    sizes = bounds[1:] - bounds[:-1]
    offs = torch.arange(cmax, device=dev)
    slot_ok = offs.view(1, -1) < sizes.view(-1, 1)  # (nc, cmax)
    tok = torch.where(slot_ok, bounds[:-1].view(-1, 1) + offs.view(1, -1), 0).flatten()
    kc = k.to(cdtype).index_select(2, tok).view(bsz, heads, nc, cmax, head_dim)
    vc = v.to(cdtype).index_select(2, tok).view(bsz, heads, nc, cmax, head_dim)

    nq = plan.kv_counts.shape[2]
    pad = nq * bm - q_len
    qb = torch.nn.functional.pad(q.to(cdtype), (0, 0, 0, pad)).view(bsz, heads, nq, bm, head_dim)
    sel = unpack_row_bits(plan.row_bits, nc).expand(bsz, heads, q_len, nc)
    sel = torch.nn.functional.pad(sel, (0, 0, 0, pad)).view(bsz, heads, nq, bm, nc)
    idx = plan.kv_indices.long().expand(bsz, heads, nq, -1)
    cnt = plan.kv_counts.long().expand(bsz, heads, nq)
    visits = idx.shape[-1]
    bi = torch.arange(bsz, device=dev).view(bsz, 1, 1, 1)
    hi = torch.arange(heads, device=dev).view(1, heads, 1, 1)

    out = torch.empty(bsz, heads, nq, bm, head_dim, dtype=cdtype, device=dev)
    lse = torch.empty(bsz, heads, nq, bm, dtype=cdtype, device=dev)
    per_block = bsz * heads * max(visits, 1) * cmax * (bm + 2 * head_dim)
    group = max(1, score_budget // per_block)
    for start in range(0, nq, group):
        sl = slice(start, min(nq, start + group))
        ci = idx[:, :, sl]  # (B, H, g, V)
        kg, vg = kc[bi, hi, ci], vc[bi, hi, ci]  # (B, H, g, V, cmax, D)
        used = torch.arange(visits, device=dev) < cnt[:, :, sl, None]  # (B, H, g, V)
        rows = sel[:, :, sl].gather(-1, ci.unsqueeze(3).expand(-1, -1, -1, bm, -1))  # (B, H, g, bm, V)
        ok = (rows & used.unsqueeze(3)).unsqueeze(-1) & slot_ok[ci].unsqueeze(3)  # (B, H, g, bm, V, cmax)
        s = torch.einsum("bhgmd,bhgvnd->bhgmvn", qb[:, :, sl], kg) * sm_scale
        s = s.masked_fill(~ok, float("-inf")).flatten(-2)
        row_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
        out[:, :, sl] = torch.einsum("bhgmk,bhgkd->bhgmd", p, vg.flatten(3, 4))
        lse[:, :, sl] = row_lse
    out = out.reshape(bsz, heads, nq * bm, head_dim)[:, :, :q_len].to(q.dtype).contiguous()
    if return_lse:
        return out, lse.reshape(bsz, heads, nq * bm)[:, :, :q_len].float().contiguous()
    return out
