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
        layout: the call's ``TokenLayout``.
        heads, layers: of the model's transformer (attention layers gen replaces).
        dense_reason: why this (layer, step) runs the stock dense attention under the
            method's schedule (``""`` when it does not); the picture is then dense.
        plan: the ``BlockPlan`` drawn.
        heads_png: for methods with a token order per head (paro), every head's block
            mask in its own order, titled with the order; else None.
    """

    block_png: Path
    token_png: Path | None
    density: float
    video_density: float
    layout: object
    heads: int = 0
    layers: int = 0
    dense_reason: str = ""
    plan: object | None = None
    heads_png: Path | None = None


def layout_for_model(spec, height: int | None = None, width: int | None = None, frames: int | None = None):
    """The ``TokenLayout`` of one attention call of ``spec`` at a geometry (pixels, frames;
    None or 0 takes the spec's): ``spec.layout`` (``ValueError`` for a size the model
    cannot take)."""
    return spec.layout(height or spec.height, width or spec.width, frames or spec.frames)


def model_shape(spec, pipe=None) -> tuple[int, int]:
    """``(heads, attention layers gen replaces)`` of ``spec``'s transformer without loading
    it: a loaded ``pipe``'s config when given, else the architecture gen ships for the
    model (``gen.pipelines.architecture``)."""
    from gen.pipelines.architecture import transformer_shape

    if pipe is not None and getattr(pipe, "transformer", None) is not None:
        return transformer_shape(pipe.transformer.config)
    return transformer_shape(spec)


def mask_picture(method: str, model: str, *, out, height: int | None = None, width: int | None = None,
                 frames: int | None = None, layer: int | None = None, head: int = 0, step: int | None = None,
                 overrides: dict | None = None, token_limit: int = 4096, capture=None,
                 steps: int | None = None, pipe=None) -> MaskPicture:
    """Draw ``method``'s mask for ``model`` at a geometry, layer, head and step.

    Writes ``out`` (block mask PNG) and, when the call has at most ``token_limit`` tokens,
    ``<out stem>-tokens.png`` (token mask). A dynamic method (its plan comes from each
    call's q and k, e.g. ``rectified``, ``psa``: a level map) draws the plan of a real call: the (step, layer)
    call of ``capture`` (a ``gen capture`` file, whose model and geometry then apply), or,
    without one, of a short dense run of ``model`` captured on the fly (models whose
    weights are on this machine, e.g. the built-in ``shapes-wan``). A (layer, step) that
    the method's schedule runs dense (``dense_layers``, ``dense_steps``) is drawn dense,
    with the reason; ``layer``/``step`` None take the first layer and step where the method
    runs sparse. ``steps`` is the run's length (default the model's); ``pipe`` a
    loaded pipeline whose transformer gives heads and layers. Raises ``ValueError`` for
    unknown names, a geometry the model cannot take, or a layer, head or step outside the
    model or the run.
    """
    from gen.attention import AttentionContext, BlockPlan
    from gen.attention.methods import get_method
    from gen.pipelines import get_spec

    if capture is not None:
        from gen.capture import load_capture

        cap = load_capture(capture)
        model = cap.meta["model"]
    spec = get_spec(model)
    layout = layout_for_model(spec, height, width, frames)
    try:
        heads, layers = model_shape(spec, pipe)
    except ValueError:  # a real model without a shipped config: only the spec's heads are known
        heads, layers = spec.heads, None
    m = get_method(method, model=spec.name, family=spec.family, **(overrides or {}))
    # a calibrated plan (sparse-vdit, paro) is made for one step count: draw at it
    steps = steps or (cap.meta["num_steps"] if capture is not None else m.calibrated_steps or spec.steps)
    if step is None:
        step = min(m.config.dense_steps, steps - 1)
    if layer is None:
        layer = next((i for i in range(layers or 1000) if not m.is_dense_layer(i)), 0)
    for what, value, count in (("layer", layer, layers), ("head", head, heads), ("step", step, steps)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be a whole number, got {value!r}.")
        if count is not None and not 0 <= value < count:
            where = "in this run" if what == "step" else f"in {spec.name}"
            raise ValueError(f"{what} must be between 0 and {count - 1} ({count} {what}s {where}), got {value}; "
                             f"choose --{what} in [0, {count - 1}].")
    ctx = AttentionContext(step_index=step, num_steps=steps, layer_index=layer)
    token_mask = None
    plan_head = head
    dense_reason = ""
    if m.is_dense_layer(layer):
        dense_reason = f"layer {layer} is in dense_layers={m.config.dense_layers!r}"
    elif m.is_dense(ctx):
        dense_reason = f"step {step} < dense_steps={m.config.dense_steps}"
    if dense_reason:
        plan = BlockPlan.dense(layout.video_len, layout.video_len, 64, 64)
    elif m.static:
        plan = m.plan(layout, heads, ctx)
    else:
        if capture is None:
            cap = _capture_on_the_fly(spec, method, height, width, frames, step, layer, head, steps)
        plan, layout, token_mask, plan_head = _plan_of_captured_call(m, cap, step, layer, head, ctx)
    out = Path(out)
    h_idx = plan_head if plan.kv_counts.shape[1] > 1 else 0
    if "level" in plan.visit_data:  # pyramid levels (psa): a level-L visit counts 1/L; drawn as a level map
        from gen.attention.pyramid import level_density_per_head

        video_density = float(level_density_per_head(plan)[0, h_idx])
    else:
        video_density = float(plan.density_per_head()[0, h_idx])
    title = (f"{method} on {spec.name}: {layout}, layer {layer}, head {head}, step {step}: "
             + (f"dense ({dense_reason})" if dense_reason else f"video density {video_density:.3f}"))
    from gen._io import atomic_path

    heads_png = None
    # methods with a token order per head (paro) draw every head in its order too
    if getattr(m, "save_plan_picture", None) is not None and not dense_reason:
        info = m.head_orders(layout, heads, ctx)[head]
        title += f", order {info['order']}" + (" (empty head)" if info["empty"] else "")
        heads_png = out.with_name(f"{out.stem}-heads.png")
        m.save_plan_picture(heads_png, layout, heads, ctx, title=f"{method} on {spec.name}: {layout}, "
                            f"layer {layer}, step {step}: every head in its order")
    with atomic_path(out) as tmp:
        plan.save_png(tmp, head=h_idx, title=title)
    token_png = None
    if layout.seq_len <= token_limit:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        if dense_reason:
            mask = torch.ones(1, layout.seq_len, layout.seq_len, dtype=torch.bool)
        else:
            mask = m.token_mask(layout, heads, ctx) if token_mask is None else token_mask
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
    density = 1.0 if dense_reason else m.density(layout, heads, ctx)
    return MaskPicture(out, token_png, density, video_density, layout, heads, layers or 0, dense_reason, plan,
                       heads_png)


def _capture_on_the_fly(spec, method: str, height, width, frames, step: int, layer: int, head: int,
                        steps: int | None = None):
    """A dense run of ``spec`` recording the (step, layer) call, in a temporary file."""
    import tempfile

    from gen.capture import capture, load_capture

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "call.safetensors"
        try:
            capture(spec.name, spec.prompt, steps=[step], layers=[layer], heads=[head], out=path, height=height,
                    width=width, frames=frames, num_steps=steps)
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
        exact = getattr(m, "video_token_mask_of_call", None)
        if exact is not None:
            # a method whose selection is finer than its plan's blocks (vmoba: per query token)
            video = exact(layout, q, k, ctx)
        else:
            video = plan.to_token_mask()[0]
            perm = m._order(layout)
            if perm is not None:
                inv = perm.inverse
                video = video[:, inv][:, :, inv]
        token_mask = torch.ones(video.shape[0], layout.seq_len, layout.seq_len, dtype=torch.bool)
        token_mask[:, vs, vs] = video
    return plan, layout, token_mask, head
