"""Pictures of what a method does at a model's geometry (``gen masks``; the demo reuses it).

    from gen.masks import mask_picture
    info = mask_picture("radial", "wan2.1-t2v-1.3b", out="radial.png")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["MaskPicture", "layout_for_model", "mask_picture"]


@dataclass
class MaskPicture:
    """What ``mask_picture`` drew.

    Attributes:
        block_png: the block-mask picture (query blocks x key blocks of the video tokens,
            in the method's token order).
        token_png: the token-mask picture over all tokens of the call (text included) in
            the original order, or None when the layout is too large for an S x S image.
        density: fraction of the call's query-key pairs computed (text included).
        video_density: fraction of video-video pairs the plan computes.
        layout: the layout (``str``).
    """

    block_png: Path
    token_png: Path | None
    density: float
    video_density: float
    layout: str


def layout_for_model(spec, height: int | None = None, width: int | None = None, frames: int | None = None):
    """The ``TokenLayout`` of one attention call of ``spec`` at a geometry (pixels, frames):
    Wan self-attention has no text, HunyuanVideo puts its text last, FLUX first."""
    from gen.attention import TokenLayout
    from gen.pipelines import check_geometry

    height, width, frames = height or spec.height, width or spec.width, frames or spec.frames
    check_geometry(spec, height, width, frames)
    t, h, w = spec.token_grid(height, width, frames)
    text = 0 if spec.family == "wan" else spec.text_tokens
    return TokenLayout(t, h, w, text_len=text, text_first=spec.family == "flux")


def mask_picture(method: str, model: str, *, out, height: int | None = None, width: int | None = None,
                 frames: int | None = None, layer: int = 0, head: int = 0, step: int = 0,
                 overrides: dict | None = None, token_limit: int = 4096) -> MaskPicture:
    """Draw ``method``'s mask for ``model`` at a geometry, layer, head and step.

    Writes ``out`` (block mask PNG) and, when the call has at most ``token_limit`` tokens,
    ``<out stem>-tokens.png`` (token mask). Raises ``ValueError`` for unknown names, a
    geometry the model cannot take, or a head outside the model's heads.
    """
    from gen.attention import AttentionContext
    from gen.attention.methods import get_method
    from gen.pipelines import get_spec

    spec = get_spec(model)
    layout = layout_for_model(spec, height, width, frames)
    if not 0 <= head < spec.heads:
        raise ValueError(f"{spec.name} has {spec.heads} heads; choose --head in [0, {spec.heads - 1}].")
    m = get_method(method, model=spec.name, family=spec.family, **(overrides or {}))
    ctx = AttentionContext(step_index=step, layer_index=layer)
    try:
        plan = m.plan(layout, spec.heads, ctx)
    except NotImplementedError:
        raise ValueError(f"method {method!r} has no static plan to draw (its pattern depends on the inputs).") from None
    out = Path(out)
    h_idx = head if plan.kv_counts.shape[1] > 1 else 0
    video_density = float(plan.density_per_head()[0, h_idx])
    title = f"{method} on {spec.name}: {layout}, layer {layer}, head {head}, step {step}: video density {video_density:.3f}"
    from gen._io import atomic_path

    with atomic_path(out) as tmp:
        plan.save_png(tmp, head=h_idx, title=title)
    token_png = None
    if layout.seq_len <= token_limit:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        mask = m.token_mask(layout, spec.heads, ctx)
        mask = mask[head if mask.shape[0] > 1 else 0].to(torch.float32).numpy()
        token_png = out.with_name(f"{out.stem}-tokens.png")
        fig, ax = plt.subplots(figsize=(6, 6), dpi=120)
        ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("key token")
        ax.set_ylabel("query token")
        ax.set_title(f"{method}: token mask ({layout})", fontsize=8)
        fig.tight_layout()
        with atomic_path(token_png) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    return MaskPicture(out, token_png, m.density(layout, spec.heads, ctx), video_density, str(layout))
