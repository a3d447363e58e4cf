"""Public causal Wan checkpoints -> diffusers ``WanTransformer3DModel`` state dicts.

Self-Forcing, CausVid, LongLive and Rolling Forcing keep Wan2.1's parameter set (notes
section 7) in the original Wan module names, wrapped differently:

| checkpoint | layout recognised |
|---|---|
| Self-Forcing ``self_forcing_dmd.pt``, CausVid | ``{"generator_ema" or "generator": {"model.<wan key>": ...}}`` |
| Rolling Forcing ``rolling_forcing_dmd.pt`` | the same, keys also carrying ``_fsdp_wrapped_module.`` |
| LongLive ``longlive_base.pt`` + ``lora.pt`` | base as Self-Forcing; LoRA as PEFT keys ``<prefix><wan linear>.lora_A[.default].weight`` / ``lora_B`` (optionally under ``"generator_lora"``/``"lora"``), merged as ``W += scale * B @ A`` (``scale = alpha / r = 1``) |
| a bare state dict | original Wan keys (``head.modulation``, ``blocks.N.self_attn.q.weight``) or diffusers keys |

The LoRA file's exact key layout is not in the notes: the PEFT naming above is assumed
(LongLive trains with PEFT-style adapters on every ``nn.Linear`` of the attention blocks).
Original Wan names are mapped to diffusers names by diffusers' own
``convert_wan_transformer_to_diffusers`` (``loaders.single_file_utils``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["KNOWN_LAYOUTS", "convert_causal_checkpoint", "load_causal_checkpoint", "merge_lora"]

KNOWN_LAYOUTS = (
    "Self-Forcing / CausVid / LongLive base: {'generator_ema'|'generator': {'model.blocks.0.self_attn.q.weight', ...}}",
    "Rolling Forcing: the same with '_fsdp_wrapped_module.' in the keys",
    "LongLive LoRA: PEFT keys '...blocks.0.self_attn.q.lora_A.weight' / '.lora_B.weight'",
    "bare original-Wan state dict ('head.modulation', 'blocks.0.self_attn.q.weight', ...)",
    "bare diffusers state dict ('scale_shift_table', 'blocks.0.attn1.to_q.weight', ...)",
)
_WRAPPERS = ("generator_ema", "generator", "state_dict", "model")
_LORA_WRAPPERS = ("generator_lora", "lora", "state_dict")
_STRIP = ("_fsdp_wrapped_module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "model.", "module.")


def _unknown(what: str, keys) -> ValueError:
    sample = ", ".join(sorted(map(str, keys))[:6]) or "(no keys)"
    return ValueError(
        f"{what} is not a recognised causal Wan checkpoint (first keys: {sample}). Recognised layouts:\n  - "
        + "\n  - ".join(KNOWN_LAYOUTS)
    )


def _tensors(obj: Mapping, wrappers) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict inside a checkpoint and the wrapper key it came from ('' = top level)."""
    for w in wrappers:
        if isinstance(obj.get(w), Mapping):
            return dict(obj[w]), w
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, ""


def _clean_key(key: str) -> str:
    for s in _STRIP:
        key = key.replace(s, "")
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key


def _is_lora(keys) -> bool:
    return any(".lora_A." in k or ".lora_B." in k for k in keys)


def merge_lora(base: dict[str, torch.Tensor], lora: Mapping, scale: float = 1.0) -> list[str]:
    """Merge PEFT LoRA pairs into original-Wan weights in place: ``W += scale * B @ A``.

    Args:
        base: original-Wan state dict (keys already cleaned), ``W (out, in)``.
        lora: the LoRA checkpoint: ``A (r, in)`` and ``B (out, r)`` per adapted linear.
        scale: ``alpha / r`` (LongLive: 256 / 256 = 1).

    Returns:
        The merged weight keys.
    """
    flat, _ = _tensors(lora, _LORA_WRAPPERS)
    if not _is_lora(flat):
        raise _unknown("the LoRA file", flat)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in flat.items():
        k = _clean_key(k).replace(".default", "")
        for part in ("lora_A", "lora_B"):
            if f".{part}." in k:
                pairs.setdefault(k.split(f".{part}.")[0] + ".weight", {})[part] = v
    merged = []
    for target, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA for {target} has only {sorted(ab)}; both lora_A and lora_B are needed.")
        if target not in base:
            raise ValueError(f"LoRA adapts {target}, which the base checkpoint does not have.")
        w, a, b = base[target], ab["lora_A"], ab["lora_B"]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit {target} {tuple(w.shape)}.")
        base[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
        merged.append(target)
    return merged


def convert_causal_checkpoint(checkpoint: Mapping, lora: Mapping | None = None, *,
                              lora_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], str]:
    """Convert a loaded causal checkpoint (and an optional LoRA) to diffusers keys.

    Returns:
        ``(state_dict, layout)``: diffusers ``WanTransformer3DModel`` keys, and a short name
        of the layout recognised.

    Raises:
        ValueError: not one of ``KNOWN_LAYOUTS`` (the message lists them and the keys seen).
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"a checkpoint must be a dict of tensors, got {type(checkpoint).__name__}.")
    flat, wrapper = _tensors(checkpoint, _WRAPPERS)
    fsdp = any("_fsdp_wrapped_module." in k for k in flat)
    sd = {_clean_key(k): v for k, v in flat.items()}
    if _is_lora(sd):
        raise ValueError("this is a LoRA file; pass it as the LoRA next to its base checkpoint (LongLive).")
    if "head.modulation" in sd and "blocks.0.self_attn.q.weight" in sd:
        layout = "Rolling Forcing" if fsdp else (
            "Self-Forcing/CausVid/LongLive generator" if wrapper else "original Wan")
        if lora is not None:
            merge_lora(sd, lora, lora_scale)
            layout = "LongLive base + LoRA"
        return convert_wan_transformer_to_diffusers(sd), f"{layout} ({wrapper or 'top level'})"
    if "scale_shift_table" in sd and "blocks.0.attn1.to_q.weight" in sd:
        if lora is not None:
            raise ValueError("a LoRA can only be merged into an original-Wan layout checkpoint.")
        return sd, "diffusers"
    raise _unknown("the checkpoint", flat if flat else checkpoint.keys())


def check_checkpoint_files(*paths: str | Path) -> None:
    """Refuse, before any model is loaded, a checkpoint that does not exist or whose
    safetensors header cannot be read (the tensors themselves are read later)."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"checkpoint {path} does not exist.")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as err:  # SafetensorError and OS errors alike: say which file and why
                raise ValueError(f"cannot read checkpoint {path}: not a readable safetensors file ({err}).") from None


def _load_file(path: Path) -> Mapping:
    check_checkpoint_files(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors of every kind: say which file and why
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def load_causal_checkpoint(transformer, *paths: str | Path, lora_scale: float = 1.0) -> str:
    """Convert the checkpoint file(s) and load them into ``transformer`` (strict).

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` of the same size.
        paths: the checkpoint, and for LongLive its LoRA file (either order: the LoRA is
            recognised by its ``lora_A``/``lora_B`` keys).
        lora_scale: ``alpha / r`` for the LoRA merge (1).

    Returns:
        The layout recognised.

    Raises:
        ValueError: unreadable or unrecognised file, more than one base or LoRA, missing or
            unexpected keys, or shapes that do not match the model (the message lists them).
    """
    if not 1 <= len(paths) <= 2:
        raise ValueError(f"give one checkpoint, or a LongLive base and its LoRA; got {len(paths)} files.")
    loaded = [(Path(p), _load_file(Path(p))) for p in paths]
    loras = [(p, c) for p, c in loaded if isinstance(c, Mapping) and _is_lora(_tensors(c, _LORA_WRAPPERS)[0])]
    bases = [(p, c) for p, c in loaded if all(p is not q for q, _ in loras)]
    if len(bases) != 1 or len(loras) > 1:
        raise ValueError(f"need exactly one base checkpoint and at most one LoRA; got {[str(p) for p, _ in loaded]}.")
    sd, layout = convert_causal_checkpoint(bases[0][1], loras[0][1] if loras else None, lora_scale=lora_scale)
    own = transformer.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{bases[0][0]} ({layout}) does not fit this transformer: "
            f"{len(shapes)} shape mismatches {shapes[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "use the model the checkpoint was trained from (Wan2.1-T2V-1.3B for the public ones)."
        )
    transformer.load_state_dict(sd, strict=True)
    return layout
