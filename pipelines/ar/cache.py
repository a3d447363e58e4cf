"""Per-layer self-attention KV cache: frame slots, pinned sink frames, a ring of recent frames.

Layout: ``k``/``v`` are one buffer each, ``(num_layers, B, capacity_frames * T, H, D)``
(``T`` tokens per latent frame), allocated once and written in place
(``index_copy_``): never cloned or concatenated per call, so its size is fixed by the
configuration and does not grow with the video.

Slots ``[0, sink_frames)`` hold the sink (the first frames generated, or the frames a
recache re-anchored it to). Every other frame ``f`` lives in ring slot
``sink_frames + f % ring`` with ``ring = capacity_frames - sink_frames``: writing frame
``f`` evicts frame ``f - ring``, the oldest non-sink frame, which is exactly the one
that just left the attention span (the span is at most the capacity).

Keys are stored with the *spatial* (h, w) RoPE applied and the *temporal* one not
(rotations of disjoint pair dims commute): the temporal rotation is applied as keys are
read, by each frame's position in the current call (see ``context``). That one storage
serves absolute positions (Self-Forcing, LongLive), a sink re-roped right before the
window (Rolling Forcing, StreamingLLM) and FLEX-modulated frequencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["CacheContext", "KVCache"]

Positions = Literal["absolute", "relative"]


@dataclass(frozen=True)
class CacheContext:
    """What one forward over query frames reads and writes.

    Attributes:
        write_slots: cache slot of each query frame, in order (``(Fq,)`` list).
        extra_writes: ``(slot, query frame index)`` pairs also written (sink re-anchoring).
        read_slots: slots attended, in order ``[sink | recent | own frames]``.
        read_frames: absolute frame index held by each attended slot.
        key_pos: temporal RoPE position of each attended frame.
        query_pos: temporal RoPE position of each query frame.
    """

    write_slots: tuple[int, ...]
    extra_writes: tuple[tuple[int, int], ...]
    read_slots: tuple[int, ...]
    read_frames: tuple[int, ...]
    key_pos: tuple[int, ...]
    query_pos: tuple[int, ...]


class KVCache:
    """Self-attention K/V of every layer in fixed frame slots (see the module docstring).

    Args:
        num_layers: transformer blocks.
        batch, heads, head_dim: attention shape.
        tokens_per_frame: tokens of one latent frame after patchify (1,560 for Wan at 480x832).
        capacity_frames: slots in all, sink included (LongLive: 12; Self-Forcing: 21).
        sink_frames: pinned slots (0 = no sink; LongLive: 3).
        dtype, device: of the buffers.

    Raises:
        ValueError: a sink that leaves no ring (``sink_frames >= capacity_frames``) or
            non-positive sizes.
    """

    def __init__(self, *, num_layers: int, batch: int, heads: int, head_dim: int, tokens_per_frame: int,
                 capacity_frames: int, sink_frames: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("heads", heads),
                            ("head_dim", head_dim), ("tokens_per_frame", tokens_per_frame),
                            ("capacity_frames", capacity_frames)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if not 0 <= sink_frames < capacity_frames:
            raise ValueError(
                f"sink_frames={sink_frames} must lie in [0, capacity_frames={capacity_frames}): the sink "
                "must leave room for recent frames; make the window larger or the sink smaller."
            )
        self.tokens_per_frame = tokens_per_frame
        self.capacity_frames = capacity_frames
        self.sink_frames = sink_frames
        shape = (num_layers, batch, capacity_frames * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.reset()

    @property
    def ring_frames(self) -> int:
        """Non-sink slots."""
        return self.capacity_frames - self.sink_frames

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V buffers (fixed at construction)."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def reset(self) -> None:
        """Forget every frame (the buffers are kept; nothing is reallocated)."""
        self.slot_frame: list[int] = [-1] * self.capacity_frames  # absolute frame per slot, -1 empty
        self.slot_clean: list[bool] = [False] * self.capacity_frames  # committed (clean) K/V?

    # -- addressing ------------------------------------------------------------------------

    def slot_of(self, frame: int) -> int:
        """The slot frame ``frame`` is written to: the sink while it fills, else the ring."""
        if frame < 0:
            raise ValueError(f"frame indices start at 0, got {frame}.")
        if frame < self.sink_frames and self.slot_frame[frame] in (-1, frame):
            return frame
        return self.sink_frames + frame % self.ring_frames

    def sink_slots(self) -> list[int]:
        """Sink slots that hold a committed frame."""
        return [s for s in range(self.sink_frames) if self.slot_frame[s] >= 0 and self.slot_clean[s]]

    def clean_frames(self) -> dict[int, int]:
        """Committed frames in the ring: ``{absolute frame: slot}``."""
        return {f: s for s, f in enumerate(self.slot_frame)
                if s >= self.sink_frames and f >= 0 and self.slot_clean[s]}

    def context(self, frames: list[int], *, span: int | None = None, use_sink: bool = True,
                positions: Positions = "absolute", anchor_sink: bool = False) -> CacheContext:
        """Plan one forward whose queries are the consecutive ``frames``.

        The queries attend the committed sink frames (``use_sink``), then the most recent
        committed frames before ``frames[0]`` that fit the span, then themselves (in full).

        Args:
            frames: absolute indices of the query frames (consecutive, ascending).
            span: most frames attended, sink and own frames included; None = all that are
                in the cache.
            use_sink: attend the sink slots (False: plain sliding window).
            positions: ``"absolute"``: every frame at its own index (RoPE table caps the
                video at its length, 1024 frames for Wan); ``"relative"``: the attended
                frames are numbered 0, 1, ... in order, queries last (StreamingLLM's "position
                in the cache"; Rolling Forcing's sink re-roped right before the window).
            anchor_sink: also write the first ``sink_frames`` query frames into the sink
                slots (recache without keeping the old sink).
        """
        if any(b - a != 1 for a, b in zip(frames, frames[1:])):
            raise ValueError(f"query frames must be consecutive, got {frames}.")
        first, n_q = frames[0], len(frames)
        write = [self.slot_of(f) for f in frames]
        if len(set(write)) != n_q:
            raise ValueError(
                f"{n_q} query frames do not fit the cache's ring of {self.ring_frames} frames; "
                "raise capacity_frames (the window) or use smaller chunks."
            )
        extra: list[tuple[int, int]] = []
        sink: list[tuple[int, int]] = []
        if anchor_sink:
            extra = [(s, i) for s, i in zip(range(self.sink_frames), range(n_q))]
        elif use_sink:
            sink = [(s, self.slot_frame[s]) for s in self.sink_slots() if self.slot_frame[s] < first]
        sink_ids = {f for _, f in sink}
        budget = None if span is None else span - len(sink) - n_q
        if budget is not None and budget < 0:
            raise ValueError(f"span={span} frames cannot hold {len(sink)} sink + {n_q} query frames.")
        recent = sorted((f, s) for f, s in self.clean_frames().items() if f < first and f not in sink_ids)
        if budget is not None:
            recent = recent[len(recent) - budget:] if budget else []
        read = [(s, f) for s, f in sink] + [(s, f) for f, s in recent] + list(zip(write, frames))
        read_slots = tuple(s for s, _ in read)
        read_frames = tuple(f for _, f in read)
        if positions == "absolute":
            key_pos, query_pos = read_frames, tuple(frames)
        elif positions == "relative":
            key_pos = tuple(range(len(read)))
            query_pos = key_pos[len(read) - n_q:]
        else:
            raise ValueError(f"positions must be 'absolute' or 'relative', got {positions!r}.")
        return CacheContext(tuple(write), tuple(extra), read_slots, read_frames, key_pos, query_pos)

    # -- writes ------------------------------------------------------------------------------

    def rows(self, slots, device=None) -> torch.Tensor:
        """Token rows of ``slots`` in the buffers (int64, for ``index_copy_``)."""
        t = self.tokens_per_frame
        s = torch.as_tensor(list(slots), dtype=torch.long, device=device or self.k.device)
        return (s[:, None] * t + torch.arange(t, device=s.device)).flatten()

    def mark(self, ctx: CacheContext, frames: list[int], *, clean: bool) -> None:
        """Record which frames the slots of ``ctx`` now hold (after the forward wrote them)."""
        for s, f in zip(ctx.write_slots, frames):
            self.slot_frame[s], self.slot_clean[s] = f, clean
        for s, i in ctx.extra_writes:
            self.slot_frame[s], self.slot_clean[s] = frames[i], clean
