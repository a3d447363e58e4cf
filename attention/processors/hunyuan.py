"""The HunyuanVideo family (``HunyuanVideoTransformer3DModel``): gen's adapter.

Patched: the dual-stream (``transformer_blocks.*.attn``) and single-stream
(``single_transformer_blocks.*.attn``) joint attention with
:class:`~.hunyuan_processor.HunyuanVideoSparseAttnProcessor`. Stock: the token refiner.
Layout: the latent ``hidden_states`` ``(B, C, F, H, W)`` divided by ``patch_size_t`` and
``patch_size``; the text (``encoder_hidden_states``) joins last, its valid length per
sample read by the processor from the padding mask. Context parallelism: diffusers
0.42.1 has no ``_cp_plan`` for this model; gen supplies :func:`hunyuan_video_cp_plan`,
whose streams are split separately, so the order after the all-to-all is
``[vid₀, txt₀, vid₁, txt₁, …]``.
"""

from __future__ import annotations

import torch

from .adapter import CallGeometry, FamilyAdapter, FamilyProcessors, call_arg, dual_and_single_blocks

__all__ = ["ADAPTER", "hunyuan_video_cp_plan"]


def hunyuan_video_cp_plan(transformer: torch.nn.Module) -> dict:
    """A context-parallel plan for ``HunyuanVideoTransformer3DModel`` (diffusers 0.42 has
    none): the RoPE tables and, at the first block, the video and text streams are split
    along the sequence; ``proj_out`` is gathered. The text (refined by the token refiner
    on every rank) and the ``[B, 1, 1, N]`` padding mask stay whole: gen's processor reads
    the mask in gen's order after the all-to-all. Made for gen's processors: diffusers'
    stock HunyuanVideo processor would read that mask in the gathered order, right only
    for prompts that fill the text length. Refused for ``image_condition_type="token_replace"``
    (I2V), whose blocks treat the first frame's tokens by their local position."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    cfg = transformer.config
    if getattr(cfg, "image_condition_type", None) == "token_replace":
        raise ValueError("HunyuanVideo image-to-video with token_replace is not supported under context "
                         "parallelism (its blocks address the first frame by local token position).")
    first = "transformer_blocks.0" if len(transformer.transformer_blocks) else "single_transformer_blocks.0"
    return {
        "rope": {
            0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
            1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
        },
        first: {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
            "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict, _state) -> CallGeometry:
    _, _, f, h, w = call_arg(args, kwargs, "hidden_states", 0).shape
    cfg = transformer.config
    p, pt = cfg.patch_size, cfg.patch_size_t
    text_len = int(call_arg(args, kwargs, "encoder_hidden_states", 2).shape[1])
    return CallGeometry(ADAPTER.layout((f // pt, h // p, w // p), text_len), text_len=text_len)


def _example_inputs(cfg, latent_grid, _token_grid, text_len, guidance, draw, device, dtype):
    latents = draw(1, cfg.in_channels, *latent_grid)
    kwargs = {"encoder_hidden_states": draw(1, text_len, cfg.text_embed_dim),
              "encoder_attention_mask": torch.ones(1, text_len, dtype=torch.long, device=device),
              "pooled_projections": draw(1, cfg.pooled_projection_dim),
              # the pipeline passes guidance x 1000
              "guidance": torch.full((1,), guidance * 1000.0, device=device, dtype=dtype)}
    return "hidden_states", latents, kwargs


def _processors() -> FamilyProcessors:
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    from .hunyuan_processor import HunyuanVideoSparseAttnProcessor

    return FamilyProcessors(HunyuanVideoSparseAttnProcessor, (HunyuanVideoAttnProcessor2_0,))


ADAPTER = FamilyAdapter(
    name="hunyuan",
    label="HunyuanVideo",
    transformer_classes=("HunyuanVideoTransformer3DModel",),
    text="last",
    attention_modules=dual_and_single_blocks,
    stays_stock="the token refiner's attention",
    read_call=_read_call,
    timestep_arg=1,
    processors=_processors,
    cp_plan=hunyuan_video_cp_plan,
    example_inputs=_example_inputs,
)
