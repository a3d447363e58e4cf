"""Tiny offline diffusers pipelines with random weights: real pipeline classes, toy sizes.

``build_tiny_pipeline(name)`` returns a genuine ``WanPipeline``,
``WanImageToVideoPipeline``, ``HunyuanVideoPipeline`` or ``FluxPipeline`` whose every
component (transformer, VAE, text/image encoders, tokenizers, scheduler) is built
from the literal configs in ``TINY_CONFIGS`` with random weights from fixed seeds, so
no file is downloaded and two builds with the same seed are identical. They run the
real denoising loop, attention processors and VAE on the CPU in about a second, which
is what the sparse-attention and CLI tests need; the outputs are noise-like pictures.

The layouts are those of the real models, only smaller: Wan and HunyuanVideo keep the
VAE's 4x temporal / 8x spatial compression and the (1, 2, 2) patchify, FLUX keeps the
8x VAE and 2x2 packing, the text lengths are the pipelines' defaults (Wan 512 tokens,
HunyuanVideo 256 after the template crop, FLUX 512) and the Wan I2V transformer has the
image-context branch (``added_kv_proj_dim``) of Wan2.1-I2V-14B. The default geometries
(``MODELS`` in ``gen.pipelines.registry``: 128x128 pixels x 17 frames for video, 256x256
for FLUX) give 5 x 8 x 8 = 320 video tokens (64 per latent frame) or 16 x 16 = 256 image
tokens per attention call.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .tokenizers import VOCAB_SIZE, build_tokenizer, special_token_ids

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = ["TINY_CONFIGS", "TINY_NAMES", "build_tiny_pipeline"]

TINY_NAMES: tuple[str, ...] = ("tiny-wan", "tiny-wan-i2v", "tiny-hunyuan", "tiny-flux")

_IDS = special_token_ids()
# Every tiny text encoder has room for the whole shared tokenizer vocabulary.
_ENC_VOCAB = 1024
assert VOCAB_SIZE <= _ENC_VOCAB, "grow _ENC_VOCAB with the tokenizer vocabulary"

# -- text and image encoders (transformers), widths 32 -----------------------------------
_UMT5 = dict(  # Wan's text encoder (UMT5-XXL in the real model; 4096 wide)
    vocab_size=_ENC_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
    pad_token_id=_IDS["<pad>"], eos_token_id=_IDS["</s>"], decoder_start_token_id=_IDS["<pad>"],
)  # fmt: skip
_T5 = dict(  # FLUX's T5-XXL stand-in
    vocab_size=_ENC_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=32,
    feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
    pad_token_id=_IDS["<pad>"], eos_token_id=_IDS["</s>"],
)  # fmt: skip
_CLIP_TEXT = dict(  # CLIP-L text tower stand-in (FLUX and HunyuanVideo pooled embedding)
    vocab_size=_ENC_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=77, projection_dim=32, hidden_act="quick_gelu",
    bos_token_id=_IDS["<|startoftext|>"], eos_token_id=_IDS["<|endoftext|>"],
    pad_token_id=_IDS["<|endoftext|>"],
)  # fmt: skip
# 3 layers: HunyuanVideo takes hidden_states[-3], i.e. the output of layer 1 here
# (layer 30 of 32 in the real Llava-Llama-3-8B).
_LLAMA = dict(
    vocab_size=_ENC_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    bos_token_id=_IDS["<|begin_of_text|>"], eos_token_id=_IDS["<|end_of_text|>"],
    pad_token_id=_IDS["<|end_of_text|>"],
)  # fmt: skip
# 32x32 pictures in 8x8 patches: 16 + 1 tokens (257 for the real ViT-H/14 at 224).
_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    image_size=32, patch_size=8, projection_dim=32, hidden_act="gelu",
)  # fmt: skip
_CLIP_IMAGE_PROCESSOR = dict(
    do_resize=True, size={"shortest_edge": 32}, do_center_crop=True,
    crop_size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
    do_normalize=True, do_convert_rgb=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
)  # fmt: skip

# -- Wan 2.1 ------------------------------------------------------------------------------
_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
    out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024,  # the real model's: no practical limit on frames or size
)  # fmt: skip
# I2V: the latent input is noise (16) + first-frame mask (4) + encoded condition video (16);
# the image tokens (CLIP penultimate layer, 32 wide) go through image_embedder to the
# model width (32), which is what add_k_proj / add_v_proj then read.
_WAN_I2V_TRANSFORMER = {**_WAN_TRANSFORMER, "in_channels": 2 * 16 + 4, "image_dim": 32, "added_kv_proj_dim": 32}
_WAN_VAE = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], scale_factor_temporal=4, scale_factor_spatial=8,
)  # fmt: skip
# The scheduler the Wan 2.1 repositories ship (flow-matching UniPC, shift 3).
_WAN_SCHEDULER = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
    flow_shift=3.0, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
    final_sigmas_type="zero",
)  # fmt: skip

# -- HunyuanVideo -------------------------------------------------------------------------
_HUNYUAN_TRANSFORMER = dict(
    in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
    num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32,
    rope_theta=256.0, rope_axes_dim=(4, 6, 6),
)  # fmt: skip
_HUNYUAN_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
    layers_per_block=1, norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
    temporal_compression_ratio=4, mid_block_add_attention=True,
)  # fmt: skip
_HUNYUAN_SCHEDULER = dict(num_train_timesteps=1000, shift=7.0)

# -- FLUX.1 -------------------------------------------------------------------------------
# in_channels 64 = 16 latent channels x 2x2 packing, as in FLUX.1.
_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)  # fmt: skip
# Four levels = 8x downsampling, 16 latent channels; FLUX.1's shift/scale.
_FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
    latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611,
    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
_FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip

TINY_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny-wan": {
        "transformer": _WAN_TRANSFORMER, "vae": _WAN_VAE, "text_encoder": _UMT5,
        "scheduler": _WAN_SCHEDULER,
    },
    "tiny-wan-i2v": {
        "transformer": _WAN_I2V_TRANSFORMER, "vae": _WAN_VAE, "text_encoder": _UMT5,
        "image_encoder": _CLIP_VISION, "image_processor": _CLIP_IMAGE_PROCESSOR,
        "scheduler": _WAN_SCHEDULER,
    },
    "tiny-hunyuan": {
        "transformer": _HUNYUAN_TRANSFORMER, "vae": _HUNYUAN_VAE, "text_encoder": _LLAMA,
        "text_encoder_2": _CLIP_TEXT, "scheduler": _HUNYUAN_SCHEDULER,
    },
    "tiny-flux": {
        "transformer": _FLUX_TRANSFORMER, "vae": _FLUX_VAE, "text_encoder": _CLIP_TEXT,
        "text_encoder_2": _T5, "scheduler": _FLUX_SCHEDULER,
    },
}  # fmt: skip
"""Per tiny model, per pipeline component: the literal constructor arguments."""


def _seeded(seed: int, name: str, component: str, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build one component under its own seed, leaving the global RNG untouched.

    Each component gets ``seed`` mixed with a stable hash of ``name/component`` (crc32,
    not ``hash()``, which is salted per process), so adding or resizing one component
    never changes another's weights.
    """
    component_seed = (seed * 1_000_003 + zlib.crc32(f"{name}/{component}".encode())) % 2**63
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed)
        module = make()
    return module.eval()


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters to ``dtype`` the way ``from_pretrained(dtype=...)`` does.

    diffusers models keep the submodules named in ``_keep_in_fp32_modules`` (Wan: rope,
    time embedder, norms, scale-shift table) in float32 at any dtype; transformers models
    keep theirs only for float16 (T5's ``wo``), plus ``_keep_in_fp32_modules_strict``
    for float16 and bfloat16. Buffers stay as built (Wan's RoPE tables). A plain
    ``.to(dtype)`` would cast all of it (and diffusers warns about that).
    """
    from diffusers import ModelMixin

    keep: set[str] = set()
    if isinstance(module, ModelMixin) or dtype == torch.float16:
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    for pname, param in module.named_parameters():
        if param.is_floating_point() and not keep.intersection(pname.split(".")):
            param.data = param.data.to(dtype)


def _clip_image_processor():
    # transformers 5 without torchvision maps CLIPImageProcessor to the PIL backend with a
    # warning on every construction; name the PIL class directly when it exists.
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**_CLIP_IMAGE_PROCESSOR)


def _build_wan(name: str, seed: int) -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    cfg = TINY_CONFIGS[name]
    i2v = name == "tiny-wan-i2v"
    parts: dict[str, Any] = {
        "transformer": _seeded(seed, name, "transformer", lambda: WanTransformer3DModel(**cfg["transformer"])),
        "vae": _seeded(seed, name, "vae", lambda: AutoencoderKLWan(**cfg["vae"])),
        "text_encoder": _seeded(
            seed, name, "text_encoder", lambda: UMT5EncoderModel(UMT5Config(**cfg["text_encoder"]))
        ),
        "tokenizer": build_tokenizer("t5", model_max_length=512),
        "scheduler": UniPCMultistepScheduler(**cfg["scheduler"]),
    }
    if not i2v:
        return WanPipeline(**parts)
    parts["image_encoder"] = _seeded(
        seed, name, "image_encoder", lambda: CLIPVisionModel(CLIPVisionConfig(**cfg["image_encoder"]))
    )
    parts["image_processor"] = _clip_image_processor()
    return WanImageToVideoPipeline(**parts)


def _build_hunyuan(name: str, seed: int) -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    cfg = TINY_CONFIGS[name]
    return HunyuanVideoPipeline(
        transformer=_seeded(
            seed, name, "transformer", lambda: HunyuanVideoTransformer3DModel(**cfg["transformer"])
        ),
        vae=_seeded(seed, name, "vae", lambda: AutoencoderKLHunyuanVideo(**cfg["vae"])),
        text_encoder=_seeded(seed, name, "text_encoder", lambda: LlamaModel(LlamaConfig(**cfg["text_encoder"]))),
        tokenizer=build_tokenizer("llama"),
        text_encoder_2=_seeded(
            seed, name, "text_encoder_2", lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder_2"]))
        ),
        tokenizer_2=build_tokenizer("clip"),
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
    )


def _build_flux(name: str, seed: int) -> DiffusionPipeline:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = TINY_CONFIGS[name]
    return FluxPipeline(
        transformer=_seeded(seed, name, "transformer", lambda: FluxTransformer2DModel(**cfg["transformer"])),
        vae=_seeded(seed, name, "vae", lambda: AutoencoderKL(**cfg["vae"])),
        text_encoder=_seeded(
            seed, name, "text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        ),
        tokenizer=build_tokenizer("clip"),
        text_encoder_2=_seeded(
            seed, name, "text_encoder_2", lambda: T5EncoderModel(T5Config(**cfg["text_encoder_2"]))
        ),
        tokenizer_2=build_tokenizer("t5", model_max_length=512),
        scheduler=FlowMatchEulerDiscreteScheduler(**cfg["scheduler"]),
    )


_BUILDERS: dict[str, Callable[[str, int], DiffusionPipeline]] = {
    "tiny-wan": _build_wan,
    "tiny-wan-i2v": _build_wan,
    "tiny-hunyuan": _build_hunyuan,
    "tiny-flux": _build_flux,
}


def build_tiny_pipeline(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """A real diffusers pipeline with tiny random-weight components, built in memory.

    Args:
        name: one of ``TINY_NAMES`` (``"tiny-wan"``, ``"tiny-wan-i2v"``, ``"tiny-hunyuan"``,
            ``"tiny-flux"``).
        seed: weight seed; the same seed gives bit-identical weights on every call.
        dtype: parameter dtype of the model components (float32 by default; the CPU runs
            them fastest in float32). Submodules a diffusers model keeps in float32
            (``_keep_in_fp32_modules``) stay float32, as with ``from_pretrained``.

    Returns:
        The pipeline on the CPU, models in eval mode, progress bar enabled. Call it with
        the geometry of its ``ModelSpec`` (the pipelines' own defaults are the real
        models' 480p/720p/1024² sizes), e.g.
        ``pipe(prompt="a red ball", height=128, width=128, num_frames=17, num_inference_steps=2)``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown tiny model {name!r}; choose one of {', '.join(TINY_NAMES)}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}.")
    pipe = _BUILDERS[name](name, seed)
    if dtype != torch.float32:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                _cast(module, dtype)
    pipe.set_progress_bar_config(disable=False)
    return pipe
