"""What gen knows about each model's transformer without its weights: the constructor
arguments (tiny and bundled models from their code, real checkpoints from the configs
shipped in ``pipelines/configs/<model>/transformer.json``), the heads and attention
layers gen replaces, a random-weight build of the real architecture and random inputs
shaped as its pipeline makes them (benchmarks of checkpoints that are not on the
machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["CONFIG_DIR", "build_random_transformer", "random_transformer_inputs", "transformer_config",
           "transformer_shape"]

#: shipped transformer configs of the real models, ``<model>/transformer.json``
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def transformer_config(spec) -> dict:
    """Constructor arguments of ``spec``'s transformer (a ``ModelSpec``).

    Raises:
        ValueError: no config shipped for the model (the message lists those that are).
    """
    if spec.is_tiny:
        from gen.pipelines.tiny import TINY_CONFIGS

        return dict(TINY_CONFIGS[spec.name]["transformer"])
    if spec.is_bundled:
        from gen.pipelines.shapes.config import COMPONENTS

        return dict(COMPONENTS["transformer"])
    path = CONFIG_DIR / spec.name / "transformer.json"
    if not path.is_file():
        have = sorted(p.parent.name for p in CONFIG_DIR.glob("*/transformer.json"))
        raise ValueError(f"no transformer config shipped for {spec.name!r} (random weights need one); "
                         f"models with one: {', '.join(have)}.")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_random_transformer(spec, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """``spec``'s transformer with random weights, built directly on ``device`` in
    ``dtype`` (parameters the model keeps in float32, ``_keep_in_fp32_modules``, stay
    float32, as ``from_pretrained`` does)."""
    import diffusers

    cls = getattr(diffusers, spec.adapter.transformer_classes[0])
    cfg = transformer_config(spec)
    before = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        try:
            # built in the target dtype on the device: a 14B model never exists in fp32
            torch.set_default_dtype(dtype)
            with torch.device(device):
                model = cls.from_config(cfg)
        finally:
            torch.set_default_dtype(before)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if param.is_floating_point() and keep.intersection(name.split(".")):
            param.data = param.data.float()
    return model.eval()


def random_transformer_inputs(spec, model: torch.nn.Module, *, height: int, width: int, frames: int,
                              guidance: float, device: torch.device, dtype: torch.dtype,
                              seed: int) -> tuple[str, torch.Tensor, dict]:
    """``(latent argument name, latents, other constant kwargs)`` for one call of
    ``model`` (``spec``'s transformer) at ``height x width`` pixels and ``frames`` frames,
    shaped as the pipeline makes them (text ``spec.text_tokens`` long; the family adapter's
    ``example_inputs``); drawn on the CPU from ``seed`` (repeatable), then moved to
    ``device`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    adapter = spec.adapter
    if adapter.example_inputs is None:
        raise ValueError(f"the {adapter.label} adapter has no example inputs; random-weight runs need them.")
    return adapter.example_inputs(model.config, spec.latent_grid(height, width, frames),
                                  spec.token_grid(height, width, frames), spec.text_tokens, guidance, draw,
                                  device, dtype)


def transformer_shape(config) -> tuple[int, int]:
    """``(heads, attention layers gen replaces)`` of a transformer config (a dict, a
    diffusers ``FrozenDict`` or a ``ModelSpec``): Wan blocks, or HunyuanVideo/FLUX dual
    plus single blocks."""
    if hasattr(config, "family") and hasattr(config, "token_grid"):  # a ModelSpec
        config = transformer_config(config)
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    return int(get("num_attention_heads")), int(get("num_layers", 0) or 0) + int(get("num_single_layers", 0) or 0)
