"""The Wan 2.1 family (``WanTransformer3DModel``, T2V and I2V): gen's adapter.

Patched: each block's ``attn1`` (self-attention over the video tokens) with
:class:`~.wan_processor.WanSparseAttnProcessor`. Stock: ``attn2`` (cross-attention to the
text and, in I2V, the image context). Layout: the latent ``hidden_states``
``(B, C, F, H, W)`` divided by the config's ``patch_size`` ``(pt, ph, pw)``; no joint text.
Context parallelism: diffusers' own ``_cp_plan`` splits the video contiguously, so the
order after the Ulysses all-to-all is the model's.
"""

from __future__ import annotations

import torch

from .adapter import CallGeometry, FamilyAdapter, FamilyProcessors, call_arg

__all__ = ["ADAPTER"]


def _attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(f"blocks.{i}.attn1", b.attn1) for i, b in enumerate(transformer.blocks)]


def _read_call(transformer: torch.nn.Module, args: tuple, kwargs: dict, _state) -> CallGeometry:
    _, _, f, h, w = call_arg(args, kwargs, "hidden_states", 0).shape
    pt, ph, pw = transformer.config.patch_size
    return CallGeometry(ADAPTER.layout((f // pt, h // ph, w // pw)))


def _example_inputs(cfg, latent_grid, _token_grid, text_len, guidance, draw, device, dtype):
    latents = draw(1, cfg.in_channels, *latent_grid)
    return "hidden_states", latents, {"encoder_hidden_states": draw(1, text_len, cfg.text_dim)}


def _processors() -> FamilyProcessors:
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from .wan_processor import WanSparseAttnProcessor

    return FamilyProcessors(WanSparseAttnProcessor, (WanAttnProcessor,))


ADAPTER = FamilyAdapter(
    name="wan",
    label="Wan",
    transformer_classes=("WanTransformer3DModel",),
    text="none",
    attention_modules=_attention_modules,
    stays_stock="attn2 (cross-attention to the text and, in I2V, the image context)",
    read_call=_read_call,
    timestep_arg=1,
    processors=_processors,
    example_inputs=_example_inputs,
)
