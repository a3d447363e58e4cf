"""Tiny random transformers of the three supported families, and inputs for one call.

Built offline from fixed seeds (configs after diffusers' own tiny test models), fp32.
"""

import torch
from diffusers import FluxTransformer2DModel, HunyuanVideoTransformer3DModel, WanTransformer3DModel


def tiny_wan(seed=0, image_dim=None, added_kv_proj_dim=None):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        added_kv_proj_dim=added_kv_proj_dim,
    ).eval()


def wan_inputs(batch=1, frames=3, size=16, text=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
                timestep=torch.full((batch,), 500), encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                return_dict=False)


def tiny_hunyuan(seed=0):
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
    ).eval()


def hunyuan_inputs(batch=2, frames=3, size=8, text=9, valid=(9, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, text, dtype=torch.long)
    for i, n in enumerate(valid[:batch]):
        mask[i, :n] = 1
    return dict(hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
                timestep=torch.full((batch,), 500), encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(batch, 8, generator=g),
                guidance=torch.full((batch,), 6000.0), return_dict=False)


def tiny_flux(seed=0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ).eval()


def flux_inputs(batch=1, h=6, w=10, text=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g), timestep=torch.full((batch,), 0.5),
                img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


FAMILIES = {
    "wan": (tiny_wan, wan_inputs),
    "hunyuan": (tiny_hunyuan, hunyuan_inputs),
    "flux": (tiny_flux, flux_inputs),
}
