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
                 overrides: dict | None = None, token_limit: int = 4096, capture=None) -> MaskPicture:
    """Draw ``method``'s mask for ``model`` at a geometry, layer, head and step.

    Writes ``out`` (block mask PNG) and, when the call has at most ``token_limit`` tokens,
    ``<out stem>-tokens.png`` (token mask). A dynamic method (its plan comes from each
    call's q and k, e.g. ``rectified``) draws the plan of a real call: the (step, layer)
    call of ``capture`` (a ``gen capture`` file, whose model and geometry then apply), or,
    without one, of a short dense run of ``model`` captured on the fly (models whose
    weights are on this machine, e.g. the built-in ``shapes-wan``). Raises ``ValueError``
    for unknown names, a geometry the model cannot take, or a head outside the model's heads.
    """
    from gen.attention import AttentionContext
    from gen.attention.methods import get_method
    from gen.pipelines import get_spec

    if capture is not None:
        from gen.capture import load_capture

        cap = load_capture(capture)
        model = cap.meta["model"]
    spec = get_spec(model)
    layout = layout_for_model(spec, height, width, frames)
    if not 0 <= head < spec.heads:
        raise ValueError(f"{spec.name} has {spec.heads} heads; choose --head in [0, {spec.heads - 1}].")
    m = get_method(method, model=spec.name, family=spec.family, **(overrides or {}))
    ctx = AttentionContext(step_index=step, layer_index=layer)
    token_mask = None
    plan_head = head
    if m.static:
        plan = m.plan(layout, spec.heads, ctx)
    else:
        if capture is None:
            cap = _capture_on_the_fly(spec, method, height, width, frames, step, layer, head)
        plan, layout, token_mask, plan_head = _plan_of_captured_call(m, cap, step, layer, head, ctx)
    out = Path(out)
    h_idx = plan_head if plan.kv_counts.shape[1] > 1 else 0
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

        mask = m.token_mask(layout, spec.heads, ctx) if token_mask is None else token_mask
        mask = mask[plan_head if mask.shape[0] > 1 else 0].to(torch.float32).numpy()
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


def _capture_on_the_fly(spec, method: str, height, width, frames, step: int, layer: int, head: int):
    """A dense run of ``spec`` recording the (step, layer) call, in a temporary file."""
    import tempfile

    from gen.capture import capture, load_capture

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "call.safetensors"
        try:
            capture(spec.name, spec.prompt, steps=[step], layers=[layer], heads=[head], out=path, height=height, width=width,
                    frames=frames)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{method!r} builds its plan from each call's q and k, so drawing it needs a real call: "
                f"running {spec.name} to record one failed ({err}). Record one with `gen capture` and "
                "pass it with --capture FILE."
            ) from None
        return load_capture(path)


def _plan_of_captured_call(m, cap, step: int, layer: int, head: int, ctx):
    """(plan, layout, token mask ``(H|1, S, S)`` or None, head index in the capture) of the
    captured (step, layer) call under the dynamic method ``m``."""
    calls = {(c.step, c.layer): c for c in cap.calls}
    call = calls.get((step, layer))
    if call is None:
        have = ", ".join(f"step {s} layer {la}" for s, la in sorted(calls))
        raise ValueError(f"the capture has no call at step {step}, layer {layer}; it has: {have}.")
    kept = cap.meta.get("heads")
    if kept is not None:
        if head not in kept:
            raise ValueError(f"the capture kept heads {kept}; choose --head among them.")
        head = kept.index(head)
    layout = call.layout
    vs = layout.video_slice
    q, k = call.q[:, :, vs].float(), call.k[:, :, vs].float()
    plan = m.plan(layout, q.shape[1], ctx, q=q, k=k)
    token_mask = None
    if layout.seq_len <= 4096:
        video = plan.to_token_mask()[0]
        perm = m._order(layout)
        if perm is not None:
            inv = perm.inverse
            video = video[:, inv][:, :, inv]
        token_mask = torch.ones(video.shape[0], layout.seq_len, layout.seq_len, dtype=torch.bool)
        token_mask[:, vs, vs] = video
    return plan, layout, token_mask, head
