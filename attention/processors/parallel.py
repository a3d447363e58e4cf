"""gen's processors under diffusers' context parallelism (Ulysses).

diffusers (>= 0.36; checked on 0.42.1) splits a transformer's sequence across ranks with
its ``_cp_plan`` hooks and, in attention, runs ``TemplatedUlyssesAttention``
(``diffusers.models.attention_dispatch``, a private API): an all-to-all turns each
rank's ``(B, S/N, H, D)`` into ``(B, S, H/N, D)``, i.e. rank ``r`` holds heads
``[r·H/N, (r+1)·H/N)`` over the whole sequence; the op runs; a second all-to-all brings
the output back. gen adds no communication of its own: its processors hand their method
to that same all-to-all as the op (:func:`ulysses_attention`), so a method runs
unchanged on the rank's heads. Per-head data (Sparse-vDiT's modes, a per-head block
mask) is sliced by ``AttentionContext.head_offset`` / ``num_heads``.

Token order after the all-to-all is the ranks' shards one after the other. Wan's
plan splits the video contiguously, so that is the original order. A joint sequence is
split per stream: FLUX gathers ``[txt₀, img₀, txt₁, img₁, …]`` and HunyuanVideo (with
gen's plan, ``hunyuan.hunyuan_video_cp_plan``) ``[vid₀, txt₀, vid₁, txt₁, …]``;
:func:`gathered_order` maps that back to gen's layout (a permutation before the method,
its inverse after) from where the family adapter puts the text.
The token layout itself comes from the geometry hook on the transformer, which reads
the whole inputs: it runs before diffusers' split hook (``gen.sparsify`` after
``enable_parallelism`` registers it outside; :func:`wrap_enable_parallelism` moves it
outside when parallelism comes second).

Calls the schedule keeps dense run inside the same all-to-all with the stock
dispatcher (HunyuanVideo's padding mask, whole-sequence and in gen's order, applied
after the permutation).

Supported: ``ContextParallelConfig(ulysses_degree=N)`` with ``N`` dividing the head
count and every split length (diffusers' equipartition). Refused with a message: ring
attention (``ring_degree > 1``; a sparse plan would have to be cut per ring step with a
log-sum-exp merge) and ``ulysses_anything``. Inference only (no backward). Needs
diffusers >= 0.36 (context parallelism); the private pieces used here
(``TemplatedUlyssesAttention``'s op signature, ``ContextParallelConfig._ulysses_local_rank``,
the ``cp_input---`` hook names) are those of 0.42.1, imported only when parallelism is on.
"""

from __future__ import annotations

import functools
import logging

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .adapter import FamilyAdapter, adapter_of, get_adapter
from .hunyuan import hunyuan_video_cp_plan  # noqa: F401 - kept importable from here
from .runtime import GEOMETRY_HOOK

__all__ = [
    "check_parallel_config",
    "context_parallel_config",
    "cp_plan_for",
    "gathered_order",
    "hunyuan_video_cp_plan",
    "move_geometry_hook_outside",
    "ulysses_attention",
    "unwrap_enable_parallelism",
    "wrap_enable_parallelism",
]

logger = logging.getLogger("gen.attention")

_USE_ULYSSES = "use ContextParallelConfig(ulysses_degree=N) (Ulysses), e.g. gen.parallel.enable_ulysses(pipe, N)"


def context_parallel_config(config):
    """The ``ContextParallelConfig`` inside a processor's or model's ``_parallel_config``
    (a ``ParallelConfig``), or None."""
    return None if config is None else getattr(config, "context_parallel_config", None)


def check_parallel_config(config) -> None:
    """Refuse a parallel config gen's methods cannot run under (``ValueError``). Takes a
    ``ParallelConfig``, a ``ContextParallelConfig`` or a ``TensorParallelConfig``."""
    cp = config if hasattr(config, "ulysses_degree") else context_parallel_config(config)
    if cp is None:
        return
    if (cp.ring_degree or 1) > 1:
        raise ValueError(
            f"gen's attention methods do not run under ring attention (ring_degree={cp.ring_degree}): a sparse plan "
            f"would have to be cut per ring step. Each rank needs the whole sequence of its heads: {_USE_ULYSSES}."
        )
    if cp.ulysses_anything:
        raise ValueError("gen's attention methods do not run with ulysses_anything=True (uneven heads or sequence "
                         f"shards); {_USE_ULYSSES} with N dividing the head count and the token counts.")


def cp_plan_for(transformer: torch.nn.Module) -> dict | None:
    """The plan to enable context parallelism with: the model's own ``_cp_plan``, or the
    one its family adapter supplies (HunyuanVideo); None for a model without one."""
    plan = getattr(transformer, "_cp_plan", None)
    if plan is not None:
        return plan
    try:
        adapter = adapter_of(transformer)
    except ValueError:  # not a family gen patches: diffusers decides
        return None
    return None if adapter.cp_plan is None else adapter.cp_plan(transformer)


# -- token order after the all-to-all --------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _gathered_order(text_first: bool, seq_len: int, text_len: int, world: int,
                    device: str) -> tuple[torch.Tensor, torch.Tensor]:
    video_len = seq_len - text_len
    tl, vl = text_len // world, video_len // world
    chunk = tl + vl
    with torch.inference_mode(False):  # normal tensors, also when first built under inference_mode
        t, v = torch.arange(text_len), torch.arange(video_len)
        if text_first:  # rank r holds [txt_r, img_r]
            text_pos, video_pos = (t // tl) * chunk + t % tl, (v // vl) * chunk + tl + v % vl
            forward = torch.cat([text_pos, video_pos])
        else:  # rank r holds [vid_r, txt_r]
            video_pos, text_pos = (v // vl) * chunk + v % vl, (t // tl) * chunk + vl + t % tl
            forward = torch.cat([video_pos, text_pos])
        inverse = torch.empty_like(forward)
        inverse[forward] = torch.arange(seq_len)
        return forward.to(device), inverse.to(device)


def gathered_order(family: str | FamilyAdapter, seq_len: int, text_len: int, world: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(forward, inverse)``, long ``(seq_len,)``: the sequence after the Ulysses
    all-to-all (each rank's ``[text, image]`` or ``[video, text]`` shard in turn, as the
    family adapter's ``text`` says) to the model's joint order (``x[:, forward]``) and
    back (``y[:, inverse]``); None when the orders agree (no joint text, one rank)."""
    adapter = get_adapter(family)
    if not adapter.joint_text or text_len == 0 or world == 1:
        return None
    if text_len % world or (seq_len - text_len) % world:
        raise ValueError(f"context parallelism over {world} ranks splits the text ({text_len} tokens) and the image/"
                         f"video ({seq_len - text_len} tokens) into equal shards: both must be multiples of {world}.")
    return _gathered_order(adapter.text == "first", seq_len, text_len, world, str(device))


def _compose(outer: tuple[torch.Tensor, torch.Tensor] | None,
             inner: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x[:, outer_fwd][:, inner_fwd]`` as one index, and its inverse."""
    if outer is None or inner is None:
        return outer if inner is None else inner
    return outer[0].index_select(0, inner[0]), inner[1].index_select(0, outer[1])


# -- the attention op ---------------------------------------------------------------------


def _no_backward(*args, **kwargs):
    raise NotImplementedError("gen's attention under context parallelism runs inference only (no backward).")


def ulysses_attention(processor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None, kv_valid: torch.Tensor | None, ctx, dense: bool) -> torch.Tensor:
    """One attention call of a bound gen processor under Ulysses, on diffusers' local
    ``(B, S/N, H, D)`` shards; returns the local ``(B, S/N, H, D)`` output.

    ``attn_mask`` (HunyuanVideo's ``[B, 1, 1, S]``) and ``kv_valid`` are whole-sequence,
    in the model's joint order. ``dense``: the schedule (or an unreadable geometry) keeps
    this call on the stock dispatcher."""
    # private diffusers API (checked on 0.42.1): forward(ctx, q, k, v, attn_mask, dropout_p, is_causal,
    # scale, enable_gqa, return_lse, forward_op, backward_op, _parallel_config)
    from diffusers.models.attention_dispatch import TemplatedUlyssesAttention

    config = processor._parallel_config
    cp = context_parallel_config(config)
    check_parallel_config(cp)
    world = cp.ulysses_degree
    batch, s_local, heads, _ = query.shape
    if heads % world:
        raise ValueError(f"Ulysses over {world} ranks needs a head count divisible by {world}; this attention has "
                         f"{heads} heads.")
    run = processor.run
    seq_len, h_local = s_local * world, heads // world
    head_offset = cp._ulysses_local_rank * h_local
    to_model = gathered_order(run.adapter, seq_len, run.text_len, world, query.device)

    def forward_op(op_ctx, q, k, v, _mask, _dropout_p, _is_causal, _scale, _enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        # q, k, v: (B, S, H/N, D), the ranks' shards one after the other
        if return_lse:
            raise NotImplementedError("gen's Ulysses op returns no log-sum-exp.")
        if dense:
            if attn_mask is None:  # no mask: attention does not depend on the token order
                return dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                             backend=processor._attention_backend, parallel_config=None)
            if to_model is not None:
                q, k, v = (x.index_select(1, to_model[0]) for x in (q, k, v))
            out = dispatch_attention_fn(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False,
                                        backend=processor._attention_backend, parallel_config=None)
            return out if to_model is None else out.index_select(1, to_model[1])
        layout = run.layout
        if layout is None or layout.seq_len != seq_len:
            raise ValueError(
                f"gen's layout {layout} does not cover the {seq_len} tokens this call gathers over {world} ranks: "
                "the geometry was read from one rank's shard. Enable Ulysses with gen.parallel.enable_ulysses.")
        ctx.head_offset, ctx.num_heads = head_offset, heads
        return processor._method_attention(q, k, v, layout, ctx, kv_valid, _compose(to_model, run.order))

    return TemplatedUlyssesAttention.apply(query, key, value, None, 0.0, False, None, False, False,
                                           forward_op, _no_backward, config)


# -- enable_parallelism on a sparsified transformer ------------------------------------------

_WRAPPED = "_gen_wraps_enable_parallelism"


def move_geometry_hook_outside(transformer: torch.nn.Module) -> None:
    """Re-register gen's geometry hook as the transformer's outermost hook, so that it
    reads the whole inputs before diffusers' context-parallel split hook runs."""
    registry = transformer.__dict__.get("_diffusers_hook")
    if registry is None or registry.get_hook(GEOMETRY_HOOK) is None or registry._hook_order[-1] == GEOMETRY_HOOK:
        return
    hook = registry.get_hook(GEOMETRY_HOOK)
    registry.remove_hook(GEOMETRY_HOOK, recurse=False)
    registry.register_hook(hook, GEOMETRY_HOOK)


def wrap_enable_parallelism(transformer: torch.nn.Module) -> None:
    """Give a sparsified transformer an ``enable_parallelism`` that refuses what gen's
    methods cannot run under (ring attention) before anything changes, supplies gen's
    plan where diffusers has none (HunyuanVideo), runs diffusers' own, and then moves
    gen's geometry hook outside the split hooks. Undone by :func:`unwrap_enable_parallelism`."""
    original = type(transformer).enable_parallelism

    @functools.wraps(original)
    def enable_parallelism(*, config, cp_plan=None):
        check_parallel_config(config)
        if cp_plan is None:
            cp_plan = cp_plan_for(transformer)
        result = original(transformer, config=config, cp_plan=cp_plan)
        move_geometry_hook_outside(transformer)
        return result

    setattr(enable_parallelism, _WRAPPED, True)
    transformer.__dict__["enable_parallelism"] = enable_parallelism


def unwrap_enable_parallelism(transformer: torch.nn.Module) -> None:
    fn = transformer.__dict__.get("enable_parallelism")
    if fn is not None and getattr(fn, _WRAPPED, False):
        del transformer.__dict__["enable_parallelism"]
