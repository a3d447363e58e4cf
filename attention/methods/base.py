"""What every sparse-attention method shares: the schedule and the joint text rule.

A method turns ``q, k, v (B, H, S, D)`` of one attention call into its output. It is
built from a frozen config dataclass (a subclass of :class:`MethodConfig`) and plugs
into every processor through :meth:`SparseMethod.attention`.

Joint text rule (DESIGN.md): video queries attend their sparse video keys plus all
valid text keys; text queries attend all valid keys. Text is never approximated. A
method only decides :meth:`SparseMethod.video_attention` (video queries against video
keys); the text parts run dense and are merged by log-sum-exp (``gen.attention.merge``).

Schedule: ``dense_steps`` (the first N denoising steps) and ``dense_layers`` run the
stock dense attention of the model instead of the method.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..context import AttentionContext
from ..dispatch import block_sparse_attention
from ..layout import TokenLayout
from ..merge import merge_attention
from ..plan import BlockPlan
from ..plan_cache import PlanCache
from ..processors.adapter import FAMILY_MODULES
from ..token_order import TokenPermutation

__all__ = ["MethodConfig", "SparseMethod"]

#: every model family gen has an adapter for (``gen.attention.processors.adapter``): the
#: default of ``SparseMethod.families``, so a new family reaches every method that does
#: not restrict itself
FAMILIES = tuple(FAMILY_MODULES)


def is_int(value, low: int = 0) -> bool:
    """``value`` is an ``int`` (not a ``bool``) ``>= low``: the check of method parameters
    that count tokens, blocks or heads."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_block_size(b) -> None:
    """Refuse a plan block size the kernels do not take: a power of two in [16, 256] tokens."""
    if not is_int(b, 16) or b > 256 or b & (b - 1):
        raise ValueError(f"block_size must be a power of two in [16, 256] (tokens), got {b!r}.")


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method config has.

    Args:
        dense_steps: the first ``dense_steps`` denoising steps run the model's stock
            dense attention (0 = none). Needs a step index (set by the pipeline's
            ``cache_context`` or inferred from the timestep).
        dense_layers: attention layers that run stock dense attention: an int ``N`` means
            the first ``N`` layers, a tuple lists layer indices (0-based, in forward order:
            Wan blocks; HunyuanVideo/FLUX dual blocks, then single blocks).
        backend: kernel backend, ``None`` (Triton on CUDA, PyTorch on CPU), ``"triton"``
            or ``"torch"``.
    """

    dense_steps: int = 0
    dense_layers: int | tuple[int, ...] = 0
    backend: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}.")
        dl = self.dense_layers
        if isinstance(dl, list):
            object.__setattr__(self, "dense_layers", tuple(dl))
            dl = self.dense_layers
        ok = (isinstance(dl, int) and not isinstance(dl, bool) and dl >= 0) or (
            isinstance(dl, tuple) and all(isinstance(i, int) and i >= 0 for i in dl)
        )
        if not ok:
            raise ValueError(f"dense_layers must be an int >= 0 or a tuple of layer indices, got {dl!r}.")
        if self.backend not in (None, "triton", "torch"):
            raise ValueError(f"backend must be None, 'triton' or 'torch', got {self.backend!r}.")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class SparseMethod:
    """Base class of the methods. Subclasses set ``name``, ``config_cls``, and either
    implement :meth:`plan` (block-plan methods) or override :meth:`video_attention`.

    Shapes: ``q, k, v`` are ``(B, H, S, D)`` over all tokens of the call in the
    original order (``S = layout.seq_len``).
    """

    name: ClassVar[str] = "base"
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    #: model families the method supports ("wan", "hunyuan", "flux")
    families: ClassVar[tuple[str, ...]] = FAMILIES
    #: True when the pattern depends only on the layout (then token_mask is exact)
    static: ClassVar[bool] = True
    #: one-line description for `gen methods`
    summary: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None, *, model: str | None = None) -> None:
        config = self.config_cls() if config is None else config
        #: registry name of the model the method was built for (None when unknown); methods
        #: whose data belong to one model (calibrated plans) check it
        self.model = model
        if not isinstance(config, self.config_cls):
            raise ValueError(f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}.")
        self.config = config
        # plans per (layout, heads, device) key; see plan_key / build_plan
        self._plans = PlanCache(self.build_plan)
        # text parts are dense: 128x128 blocks let the kernel take 128-row tiles (the text
        # queries of a joint call are few rows against every key; the kernel splits keys
        # when such a call launches fewer programs than the GPU has multiprocessors)
        self._dense_plans = PlanCache(lambda key: BlockPlan.dense(key[0], key[1], 128, 128, device=key[2]))
        self._orders: dict[TokenLayout, TokenPermutation | None] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # -- schedule --------------------------------------------------------------------
    @property
    def needs_step(self) -> bool:
        """Whether the method reads the step index (processors only fetch it then, so a
        compiled model is not specialised on the step when nothing needs it)."""
        return self.config.dense_steps > 0

    @property
    def calibrated_steps(self) -> int | None:
        """The denoising step count a calibrated plan was made for (the run must use it),
        or None for methods without one."""
        return None

    def is_dense_layer(self, layer_index: int | None) -> bool:
        dl = self.config.dense_layers
        if layer_index is None:
            return False
        return layer_index < dl if isinstance(dl, int) else layer_index in dl

    def is_dense(self, ctx: AttentionContext) -> bool:
        """True when this call runs the stock dense attention (schedule)."""
        if self.is_dense_layer(ctx.layer_index):
            return True
        steps = self.config.dense_steps
        return bool(steps) and ctx.step_index is not None and ctx.step_index < steps

    # -- attention ---------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                  ctx: AttentionContext) -> torch.Tensor:
        """Attention of one call in the original token order, ``(B, H, S, D)``, with the
        joint text rule. ``ctx.kv_valid`` (optional int ``(B,)``) is the number of valid
        keys per sample; padding is at the end of the sequence (HunyuanVideo's text)."""
        if q.shape[2] != layout.seq_len:
            raise ValueError(
                f"q has {q.shape[2]} tokens but the layout {layout} has {layout.seq_len}; the "
                "layout was inferred for another input."
            )
        kv_valid = ctx.kv_valid
        if layout.text_len == 0:
            # nothing to merge: the video part's LSE is not needed (CPU backends that
            # return none, compiled flex_attention, may then run)
            video_ctx = AttentionContext(ctx.step_index, ctx.num_steps, ctx.layer_index, ctx.branch, ctx.kv_valid,
                                         False, ctx.extras, ctx.head_offset, ctx.num_heads)  # replace() costs 3x more
            out, _ = self.video_attention(q, k, v, layout, video_ctx)
            return out
        if kv_valid is not None and layout.text_first:
            raise ValueError("per-sample key padding is only supported with text after the video.")
        vs, ts = layout.video_slice, layout.text_slice
        backend = self.config.backend
        text_valid = None if kv_valid is None else (kv_valid - layout.video_len).clamp(min=0)
        out_v = self.joint_video_attention(q[:, :, vs], k[:, :, vs], v[:, :, vs], k[:, :, ts], v[:, :, ts],
                                           text_valid, layout, ctx)
        # text queries: dense over all valid keys
        out_t = block_sparse_attention(
            q[:, :, ts], k, v, self._dense_plan(layout.text_len, layout.seq_len, q.device),
            kv_valid=kv_valid, backend=backend,
        )
        parts = [out_t, out_v] if layout.text_first else [out_v, out_t]
        return torch.cat(parts, dim=2)

    def joint_video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_text: torch.Tensor,
                              v_text: torch.Tensor, text_valid: torch.Tensor | None, layout: TokenLayout,
                              ctx: AttentionContext) -> torch.Tensor:
        """Video queries of a call with text: sparse over the video keys
        (:meth:`video_attention`), dense over the valid text keys, merged by log-sum-exp.
        ``q, k, v (B, H, Sv, D)``, ``k_text, v_text (B, H, St, D)``, ``text_valid`` int
        ``(B,)`` or None; returns ``(B, H, Sv, D)``. Methods that post-process the merged
        output (Rectified SpaAttn's ``R·O + C``) override this."""
        out_vv, lse_vv = self.video_attention(q, k, v, layout, ctx)
        out_vt, lse_vt = block_sparse_attention(
            q, k_text, v_text, self._dense_plan(layout.video_len, layout.text_len, q.device),
            kv_valid=text_valid, return_lse=True, backend=self.config.backend,
        )
        out_v, _ = merge_attention(out_vv, lse_vv, out_vt, lse_vt)
        return out_v

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout,
                        ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Video queries against video keys, ``(B, H, Sv, D)`` each, in frame-major order.
        Returns ``(out, lse)`` (``lse`` may be None when ``ctx.need_lse`` is False); the
        default walks :meth:`plan` with the block-sparse kernel,
        in the method's :meth:`token_order` when it has one (padding slots of a padded
        order are masked out as keys and dropped from the output)."""
        perm = self._order(layout)
        # q and k in the plan's order, for methods whose plan depends on them
        plan = self.plan(layout, q.shape[1], ctx, **self._plan_inputs(q, k, perm))
        # the dispatch permutes (or, on the CPU, gathers in order) and returns the result in
        # the original order; padding slots of a padded order are never attended
        if not ctx.need_lse:
            out = block_sparse_attention(q, k, v, plan, backend=self.config.backend, token_order=perm)
            return out, None
        return block_sparse_attention(q, k, v, plan, return_lse=True, backend=self.config.backend,
                                      token_order=perm)

    def _plan_inputs(self, q: torch.Tensor, k: torch.Tensor, perm: TokenPermutation | None) -> dict:
        """``q=``/``k=`` for :meth:`plan`: static methods read only their device (nothing is
        permuted for them); dynamic ones get the inputs in the plan's token order."""
        if self.static or perm is None:
            return {"q": q, "k": k}
        return {"q": perm.apply(q, dim=2), "k": perm.apply(k, dim=2)}

    def _order(self, layout: TokenLayout) -> TokenPermutation | None:
        # cached in eager mode; inside a compiled graph the (data-independent) index is traced
        if torch.compiler.is_compiling():
            return self.token_order(layout)
        if layout not in self._orders:
            self._orders[layout] = self.token_order(layout)
        return self._orders[layout]

    def token_order(self, layout: TokenLayout) -> TokenPermutation | None:
        """Permutation of the video tokens the plan is expressed in (None: frame-major).
        It may pad (``n_out > n_in``, e.g. tiles that do not divide the grid): the plan
        then covers ``n_out`` slots and padding slots are never attended to."""
        return None

    def plan(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None, *,
             q: torch.Tensor | None = None, k: torch.Tensor | None = None) -> BlockPlan:
        """Block plan over the video tokens (in :meth:`token_order`). Static methods get it
        from their cache (built once per layout, heads and device by :meth:`build_plan`);
        dynamic methods override this and use ``q``/``k``."""
        device = q.device if q is not None else torch.device("cpu")
        return self._plans.get(self.plan_key(layout, num_heads, device))

    @staticmethod
    def plan_key(layout: TokenLayout, num_heads: int, device: torch.device) -> tuple:
        """Cache key of a static plan: plain Python values (constants under torch.compile)."""
        return (layout.frames, layout.height, layout.width, layout.text_len, layout.text_first,
                num_heads, str(device))

    @staticmethod
    def key_layout(key: tuple) -> tuple[TokenLayout, int, torch.device]:
        """Inverse of :meth:`plan_key`."""
        f, h, w, text_len, text_first, heads, device = key
        return TokenLayout(f, h, w, text_len, text_first), heads, torch.device(device)

    def build_plan(self, key: tuple) -> BlockPlan:
        """Build the static plan for a :meth:`plan_key` (called once per key)."""
        raise NotImplementedError(f"{type(self).__name__} has no block plan")

    def _dense_plan(self, q_len: int, kv_len: int, device: torch.device) -> BlockPlan:
        return self._dense_plans.get((q_len, kv_len, str(device)))

    # -- for tests and pictures ----------------------------------------------------------
    def video_token_mask(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> torch.Tensor:
        """Bool ``(H|1, Sv, Sv)``: which video keys each video query sees, frame-major order."""
        plan = self.plan(layout, num_heads, ctx or AttentionContext())
        mask = plan.to_token_mask()[0]
        perm = self._order(layout)
        if perm is not None:
            inv = perm.inverse.to(mask.device)
            mask = mask[:, inv][:, :, inv]
        return mask

    def token_mask(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> torch.Tensor:
        """The exact effective mask over all ``S`` tokens of the call (text included) in
        the original order: bool ``(H|1, S, S)``. O(S²) memory: small layouts only."""
        video = self.video_token_mask(layout, num_heads, ctx)
        if layout.text_len == 0:
            return video
        s = layout.seq_len
        mask = torch.ones(video.shape[0], s, s, dtype=torch.bool, device=video.device)
        vs = layout.video_slice
        mask[:, vs, vs] = video
        return mask

    def density(self, layout: TokenLayout, num_heads: int, ctx: AttentionContext | None = None) -> float:
        """Query-key pairs the method computes for one call, as a fraction of dense
        attention's (text included; padding slots of a padded order count)."""
        plan = self.plan(layout, num_heads, ctx or AttentionContext())
        # computed pairs: padding slots of a padded token order cost like tokens
        video_pairs = plan.density() * plan.q_len * plan.kv_len
        dense_pairs = layout.seq_len**2 - layout.video_len**2
        return (video_pairs + dense_pairs) / layout.seq_len**2
