"""``radial``: Radial Attention, a static O(n log n) spatio-temporal mask.

Attention energy in video DiTs decays with temporal distance, so Radial Attention lets
the spatial reach of a frame pair shrink as the frames get further apart, and drops far
frame pairs except at regular strides. One static mask per layout, shared by all
layers, heads and steps, built once and cached.

Semantics (those of the reference implementation, for a frame size ``s`` tokens in
raster order, block size ``b`` and decay ``γ``), for frames ``i`` (queries) and ``j``
(keys) at distance ``d = |i − j|``:

* ``d ≤ 1``: the pair is fully on. With ``sink`` (Wan), ``j = 0`` is fully on too.
* otherwise with ``L0 = 2^bitlen(s) / 2^bitlen(d)``: when ``L0 < b`` the pair is kept only
  if ``d`` is a multiple of ``b / L0`` (frame decimation); a kept pair is a band
  ``|k − l| ≤ w`` on intra-frame flat indices ``k, l`` with ``w = max(L0·γ, b)``.
* blocks: each pair is laid on the global ``b``-aligned grid; a ``b x b`` block is on
  when more than 60 % of its non-empty key columns (of frame ``j``) have a density above
  1/3 (on entries in that column / rows of the block), decided per frame pair and OR-ed
  over pairs. The block mask *is* the effective mask (tokens of an on block all attend).

Unlike the reference, any token count works: frames need not be multiples of ``b`` and
the last block may be ragged (its density is taken over the rows it has); wherever the
reference runs (multiples of ``b``) the result is the same. Column counts are computed in
closed form (a band intersected with a block's row range), so building the plan costs
O(frames² · s · blocks per frame) scalar work, not O(S²): under a second at Wan 720p.

Text (HunyuanVideo) follows the joint rule of ``SparseMethod``; FLUX (one frame) would be
dense, so the method supports Wan and HunyuanVideo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..plan import BlockPlan
from .base import MethodConfig, SparseMethod

__all__ = ["RadialConfig", "RadialAttention", "radial_block_mask"]


@dataclass(frozen=True)
class RadialConfig(MethodConfig):
    """Config of ``radial``.

    Args:
        decay: γ, how fast the spatial band narrows with temporal distance (reference:
            0.2 for Wan, 0.95 for HunyuanVideo); larger is denser.
        block_size: b, block edge in tokens, for both the mask rule and the kernel (128
            in the reference; any power of two in [16, 256]).
        sink: every frame attends fully to latent frame 0 (on for Wan, off for
            HunyuanVideo, as in the reference).
    """

    decay: float = 0.2
    block_size: int = 128
    sink: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.decay, (int, float)) or not self.decay > 0:
            raise ValueError(f"decay must be a positive number, got {self.decay!r}.")
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b > 256 or b & (b - 1):
            raise ValueError(f"block_size must be a power of two in [16, 256], got {b!r}.")


def _pair_rule(s: int, d: int, j: int, cfg: RadialConfig) -> int | None:
    """Band half-width (intra-frame tokens) of a frame pair, ``s`` for a full pair,
    ``None`` when the pair is dropped."""
    if d <= 1 or (cfg.sink and j == 0):
        return s
    l0 = (1 << s.bit_length()) / (1 << d.bit_length())
    b = cfg.block_size
    if l0 < b and d % int(b / l0) != 0:
        return None
    return int(max(l0 * cfg.decay, b))  # |k - l| <= w with integer offsets


def radial_block_mask(frames: int, frame_len: int, cfg: RadialConfig) -> torch.Tensor:
    """Bool ``[n_blocks, n_blocks]`` block mask over ``frames * frame_len`` video tokens
    (``n_blocks = ceil(S / block_size)``), per the module docstring."""
    s, b = frame_len, cfg.block_size
    n = frames * s
    nb = -(-n // b)
    mask = torch.zeros(nb, nb, dtype=torch.bool)
    rows_in_block = torch.full((nb,), b, dtype=torch.int64)
    rows_in_block[-1] = n - b * (nb - 1)
    lcol = torch.arange(s)  # intra-frame key index l
    for i in range(frames):
        r0, r1 = (i * s) // b, (i * s + s - 1) // b  # block rows holding frame i
        blk = torch.arange(r0, r1 + 1)
        # intra-frame row range [a, e) of frame i inside each of those block rows
        a = (blk * b).clamp(min=i * s) - i * s
        e = ((blk + 1) * b).clamp(max=(i + 1) * s) - i * s
        rows = rows_in_block[blk].unsqueeze(1).double()
        for j in range(frames):
            w = _pair_rule(s, abs(i - j), j, cfg)
            if w is None:
                continue
            # on entries of key column l within rows [a, e): |[max(a, l-w), min(e-1, l+w)]|
            lo = torch.maximum(a.unsqueeze(1), (lcol - w).unsqueeze(0))
            hi = torch.minimum((e - 1).unsqueeze(1), (lcol + w).unsqueeze(0))
            count = (hi - lo + 1).clamp(min=0)  # (block rows, s)
            bcol = (j * s + lcol) // b  # global block column of each key column
            c0 = int(bcol[0])
            nonempty = torch.zeros(len(blk), nb, dtype=torch.int64)
            high = torch.zeros(len(blk), nb, dtype=torch.int64)
            nonempty.index_add_(1, bcol, (count > 0).long())
            high.index_add_(1, bcol, (count.double() / rows > 1 / 3).long())
            cols = slice(c0, int(bcol[-1]) + 1)
            ne, hi_ = nonempty[:, cols], high[:, cols]
            on = (ne > 0) & (hi_.double() > 0.6 * ne.double())
            mask[r0 : r1 + 1, cols] |= on
    return mask


class RadialAttention(SparseMethod):
    name = "radial"
    config_cls = RadialConfig
    families = ("wan", "hunyuan")
    summary = "Radial Attention: static O(n log n) mask, band shrinking with temporal distance"

    def build_plan(self, key: tuple) -> BlockPlan:
        layout, _, device = self.key_layout(key)
        b = self.config.block_size
        mask = radial_block_mask(layout.frames, layout.frame_len, self.config)
        n = layout.video_len
        return BlockPlan.from_block_mask(mask, b, b, n, n).to(device)

    def describe(self, layout: TokenLayout) -> str:
        return f"radial γ={self.config.decay} b={self.config.block_size} sink={self.config.sink} on {layout}"
