"""The FLUX family (``FluxTransformer2DModel``): gen's adapter, and how a call's
``img_ids`` give its image grid.

Patched: the dual (``transformer_blocks.*.attn``) and single
(``single_transformer_blocks.*.attn``) joint attention with
:class:`~.flux_processor.FluxSparseAttnProcessor`; a dual block holding diffusers'
``FluxIPAdapterAttnProcessor`` gets :class:`~.flux_processor.FluxSparseIPAdapterAttnProcessor`
(the image-prompt branch stays stock). Layout: text first, then the image grid read from
``img_ids`` (:func:`read_flux_img_ids`). Context parallelism: diffusers' ``_cp_plan``
splits text and image separately, so the order after the all-to-all is
``[txt₀, img₀, txt₁, img₁, …]``.

Image tokens: the image grid comes from ``img_ids`` (rows ``ids[:, 1]``, columns
``ids[:, 2]``), one image per distinct first-axis value ``ids[:, 0]``. The image of the
first image token (FLUX Kontext: the target being denoised) is the method's grid; every
other image (Kontext's reference, first-axis 1) runs as extra dense tokens: the
processor moves them next to the text and the layout counts them as text, so they
attend and are attended densely, whatever their size. Ids that are not a grid (random
floats, duplicate positions, a grid with holes) make that call run stock dense
attention, with one warning per run. The ids are read on the host once per new
``img_ids`` tensor (:class:`FluxIdsReader`, one per run: cached by tensor identity and
version, so a pipeline's ids cost one read per pipeline call, none per step or layer).
Under ``torch.compile`` only shapes are read: a call uses what an eager call with ids of
the same shape found (else a square grid when the image tokens are a square number,
else dense).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from .adapter import CallGeometry, FamilyAdapter, FamilyProcessors, call_arg, dual_and_single_blocks

__all__ = ["ADAPTER", "FluxIdsReader", "FluxImageTokens", "read_flux_img_ids"]

_IDS_CACHE_SIZE = 8


@dataclass(frozen=True, eq=False)
class FluxImageTokens:
    """What a FLUX call's ``img_ids`` say about its image tokens.

    Args:
        n_image: image tokens of the call (rows of ``img_ids``).
        grid: ``(height, width)`` of the method's image (the one of the first image
            token), or None when the ids cannot be read as a grid (the call runs dense).
        n_extra: image tokens of the other images (references), run as dense tokens.
        order: long ``(n_image,)`` on the CPU: the image tokens in the order the method
            sees them, extra tokens first (in sequence order), then the grid row-major;
            None when that is the sequence order already (plain FLUX).
        reason: why the ids were not read as a grid (None when they were).
    """

    n_image: int
    grid: tuple[int, int] | None
    n_extra: int = 0
    order: torch.Tensor | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_orders", {})

    def layout(self, text_len: int) -> TokenLayout | None:
        """The method's layout for a call with ``text_len`` text tokens: the grid, text
        first, the extra tokens counted as text. None when the call runs dense."""
        if self.grid is None:
            return None
        return ADAPTER.layout((1, *self.grid), text_len + self.n_extra)

    def sequence_order(self, text_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(forward, inverse)``, long ``(text_len + n_image,)`` on ``device``: the joint
        sequence ``[text, image]`` reordered to ``[text, extra, grid]`` (``x[:, forward]``)
        and back (``y[:, inverse]``); None when no reordering is needed. Built once per
        ``(text_len, device)``."""
        if self.order is None:
            return None
        key = (text_len, str(device))
        found = self._orders.get(key)
        if found is None:
            # normal tensors even when first built under torch.inference_mode(), so that a
            # later call with autograd can save them for backward
            with torch.inference_mode(False):
                fwd = torch.cat([torch.arange(text_len), self.order + text_len])
                inv = torch.empty_like(fwd)
                inv[fwd] = torch.arange(fwd.numel())
                found = (fwd.to(device), inv.to(device))
            if not torch.compiler.is_compiling():
                self._orders[key] = found
        return found


def _unreadable(n: int, reason: str) -> FluxImageTokens:
    return FluxImageTokens(n, None, reason=reason)


def read_flux_img_ids(img_ids: torch.Tensor) -> FluxImageTokens:
    """Read FLUX ``img_ids`` (``(N, 3)``, or the deprecated ``(B, N, 3)``: sample 0) as
    image grids: one image per distinct ``ids[:, 0]``, rows ``ids[:, 1]``, columns
    ``ids[:, 2]`` (any offset, any token order inside an image). The image of the first
    token must be a full grid (each ``(row, col)`` of a ``height x width`` rectangle
    exactly once, integer positions); the other images' tokens become extra dense
    tokens. Otherwise the result has ``grid=None`` and says why. Copies the ids to the
    host (one device sync); call it once per ids tensor."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    n = int(ids.shape[0]) if ids.dim() >= 1 else 0
    if ids.dim() != 2 or ids.shape[1] < 3 or n == 0:
        return _unreadable(n, f"img_ids of shape {tuple(img_ids.shape)} are not (N, 3) positions")
    ids = ids.detach().to("cpu", torch.float64)[:, :3]
    if not bool(torch.isfinite(ids).all()):
        return _unreadable(n, "img_ids hold non-finite values")
    rounded = ids.round()
    if bool(((ids - rounded).abs() > 1e-3).any()):
        return _unreadable(n, "img_ids are not integer grid positions")
    pos = rounded.long()
    group = pos[:, 0]
    main = group == group[0]
    where = main.nonzero().squeeze(1)
    rows, cols = pos[where, 1], pos[where, 2]
    r0, c0 = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    lin = (rows - r0) * w + (cols - c0)
    if h * w != where.numel() or torch.unique(lin).numel() != where.numel():
        return _unreadable(
            n, f"the image with img_ids[:, 0] == {int(group[0])} is not a full grid ({where.numel()} tokens "
               f"spread over {h}x{w} positions)")
    grid_tokens = where[torch.argsort(lin)]
    extra = (~main).nonzero().squeeze(1)
    order = torch.cat([extra, grid_tokens])
    identity = extra.numel() == 0 and torch.equal(order, torch.arange(n))
    return FluxImageTokens(n, (h, w), int(extra.numel()), None if identity else order)


class FluxIdsReader:
    """Per-run cache of :func:`read_flux_img_ids`: by ids tensor (identity and version,
    eager calls) and by shape (for calls inside ``torch.compile``, which cannot read
    values)."""

    def __init__(self) -> None:
        # id -> (weakref, version, result)
        self._by_tensor: dict[int, tuple] = {}
        self._by_shape: dict[tuple, FluxImageTokens] = {}

    def image_tokens(self, img_ids: torch.Tensor | None, n_image: int) -> FluxImageTokens:
        """:func:`read_flux_img_ids` of this call's ids, cached by tensor identity and
        version (eager) or by shape (inside ``torch.compile``, from an eager call)."""
        shape_key = (n_image, None if img_ids is None else tuple(img_ids.shape))
        if torch.compiler.is_compiling():
            found = self._by_shape.get(shape_key)
            if found is not None:
                return found
            side = math.isqrt(n_image)
            if side * side == n_image:
                return FluxImageTokens(n_image, (side, side))
            return _unreadable(n_image, f"the FLUX image grid of {n_image} tokens cannot be read under "
                                        "torch.compile; run one step uncompiled first")
        if img_ids is None:
            side = math.isqrt(n_image)
            found = (FluxImageTokens(n_image, (side, side)) if side * side == n_image
                     else _unreadable(n_image, f"no img_ids and {n_image} image tokens are not a square grid"))
        else:
            entry = self._by_tensor.get(id(img_ids))
            version = _version(img_ids)
            if entry is not None and entry[0]() is img_ids and entry[1] == version:
                found = entry[2]
            else:
                found = read_flux_img_ids(img_ids)
                if found.n_image != n_image and found.grid is not None:
                    found = _unreadable(n_image, f"img_ids have {found.n_image} rows but the call has {n_image} "
                                                 "image tokens")
                if len(self._by_tensor) >= _IDS_CACHE_SIZE:
                    self._by_tensor = {k: e for k, e in self._by_tensor.items() if e[0]() is not None}
                    while len(self._by_tensor) >= _IDS_CACHE_SIZE:
                        self._by_tensor.pop(next(iter(self._by_tensor)))
                self._by_tensor[id(img_ids)] = (weakref.ref(img_ids), version, found)
        self._by_shape[shape_key] = found
        return found


def _version(t: torch.Tensor) -> int:
    """In-place modification counter of ``t`` (-1 for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict, reader: FluxIdsReader) -> CallGeometry:
    hidden = call_arg(args, kwargs, "hidden_states", 0)
    text_len = int(call_arg(args, kwargs, "encoder_hidden_states", 1).shape[1])
    tokens = reader.image_tokens(call_arg(args, kwargs, "img_ids", 4), hidden.shape[1])
    if tokens.grid is None:
        return CallGeometry(None, None, tokens.reason, text_len)
    return CallGeometry(tokens.layout(text_len), tokens.sequence_order(text_len, hidden.device), None, text_len)


def _example_inputs(cfg, latent_grid, token_grid, text_len, guidance, draw, device, dtype):
    _, rows, cols = token_grid  # the pipeline packs 2x2 latent patches into 64 channels
    latents = draw(1, rows * cols, cfg.in_channels)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    kwargs = {"encoder_hidden_states": draw(1, text_len, cfg.joint_attention_dim),
              "pooled_projections": draw(1, cfg.pooled_projection_dim),
              "img_ids": ids.reshape(-1, 3).to(device, dtype),
              "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype)}
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((1,), guidance, device=device, dtype=dtype)
    return "hidden_states", latents, kwargs


def _processors() -> FamilyProcessors:
    from diffusers.models.transformers.transformer_flux import (
        FluxAttnProcessor,
        FluxIPAdapterAttnProcessor,
    )

    from .flux_processor import FluxSparseAttnProcessor, FluxSparseIPAdapterAttnProcessor

    return FamilyProcessors(FluxSparseAttnProcessor, (FluxAttnProcessor, FluxIPAdapterAttnProcessor),
                            wrappers=((FluxIPAdapterAttnProcessor, FluxSparseIPAdapterAttnProcessor.wrap),))


ADAPTER = FamilyAdapter(
    name="flux",
    label="FLUX",
    transformer_classes=("FluxTransformer2DModel",),
    text="first",
    attention_modules=dual_and_single_blocks,
    stays_stock="none of the joint attention; an IP-Adapter's image-prompt branch runs its stock computation",
    read_call=_read_call,
    timestep_arg=3,
    processors=_processors,
    new_call_state=FluxIdsReader,
    example_inputs=_example_inputs,
    timestep_divisor=1000.0,
)
