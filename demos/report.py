"""Markdown and JSON reports of runs, comparisons and masks (what the demo prints under
each result). Pure functions of the engine's results; no Gradio."""

from __future__ import annotations

import dataclasses
import math

from gen.pipelines import get_spec

from .engine import BASELINES, STOCK, CompareResult, MaskResult, RunResult
from .patterns import pattern_name

__all__ = ["config_text", "run_report", "compare_report", "compare_numbers", "mask_report", "mask_numbers"]


def config_text(config) -> str:
    """``pattern=frame window ±1, block_m=64, ...``: a method config (dataclass) for people
    (named patterns by name, ``None`` backend as auto)."""
    if config is None:
        return "stock"
    parts = []
    for f in dataclasses.fields(config):
        key, value = f.name, getattr(config, f.name)
        if callable(value):
            value = pattern_name(value) or getattr(value, "__name__", "custom function")
        elif hasattr(value, "shape"):  # a block-mask tensor
            value = f"tensor{tuple(value.shape)}"
        elif key == "backend" and value is None:
            value = "auto"
        elif isinstance(value, tuple):
            value = ",".join(map(str, value)) or "none"
        parts.append(f"{key}={value}")
    return ", ".join(parts) or "defaults"


def _geometry(result: RunResult) -> str:
    r = result.request
    spec = get_spec(r.model)
    size = f"{r.width}×{r.height}"
    return f"{r.frames} frames at {size}" if spec.is_video else f"image {size}"


def _densities(summary: dict) -> str:
    out = []
    for t in summary.get("transformers", []):
        for layout, value in t["density"].items():
            out.append(f"{value:.3f} at {layout}" if value is not None else f"n/a at {layout}")
    return "; ".join(out) or "n/a"


def _calls(summary: dict) -> tuple[str, str]:
    calls, dense = [], []
    for t in summary.get("transformers", []):
        calls.append(f"{t['sparse_calls']} through the method, {t['dense_calls']} dense over {t['layers']} layers")
        if t["dense_calls"]:
            layers = ", ".join(map(str, t["dense_layers"]))
            dense.append(f"{t['dense_calls']} calls (layers {layers}), as scheduled by dense_steps/dense_layers")
    return "; ".join(calls), "; ".join(dense) or "nothing: every call went through the method"


def _time(result: RunResult) -> str:
    text = f"{result.seconds:.2f} s"
    if result.load_seconds > 0.005:
        text += f" (+ {result.load_seconds:.2f} s loading the model, first use only)"
    return text


def run_report(result: RunResult) -> str:
    """Markdown under the Generate tab's output."""
    r = result.request
    head = (f"**{r.model}** · seed {r.seed} · {_geometry(result)} · {r.steps} steps · guidance {r.guidance:g}  \n"
            f"saved as `{result.path.name}`")
    rows = [("time", _time(result))]
    if result.label == STOCK:
        rows.append(("attention", "stock diffusers attention (gen not installed)"))
    else:
        calls, dense = _calls(result.attention)
        rows += [
            ("attention", f"`{r.method}`: {config_text(result.config)}"),
            ("density", _densities(result.attention)),
            ("attention calls", calls),
            ("ran dense", dense),
        ]
    table = "\n".join(["| run | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return f"{head}\n\n{table}"


def _notes(result: CompareResult, device: str) -> list[str]:
    notes = []
    if result.first_run:
        notes.append("First run of this model, method and size: the times include one-off costs "
                     "(kernel compilation, memory warm-up). Press Compare again for steady-state numbers.")
    if device == "cpu":
        notes.append("On the CPU gen's kernels run as the PyTorch reference, so speedups here say little; "
                     "the speed comparison is meant for a GPU.")
    return notes


def compare_report(result: CompareResult, device: str) -> str:
    """Markdown under the Compare tab's outputs."""
    b, m = result.baseline, result.method
    r = m.request
    base_name = BASELINES.get(b.label, b.label)
    head = f"**{r.model}** · seed {r.seed} · {_geometry(m)} · {r.steps} steps: `{b.label}` vs `{r.method}`"
    base_density = "1.000 (stock)" if b.label == STOCK else _densities(b.attention)
    rows = [
        ("", f"baseline: {base_name}", f"method: `{r.method}`"),
        ("---", "---", "---"),
        ("time", f"{b.seconds:.2f} s", f"{m.seconds:.2f} s"),
        ("density", base_density, _densities(m.attention)),
        ("settings", config_text(b.config), config_text(m.config)),
        ("file", f"`{b.path.name}`", f"`{m.path.name}`"),
    ]
    table = "\n".join(f"| {a} | {c} | {d} |" for a, c, d in rows)
    psnr = "∞ (identical frames)" if math.isinf(result.psnr) else f"{result.psnr:.2f} dB"
    line = (f"**Speedup {result.speedup:.2f}×** · PSNR {psnr} · SSIM {result.ssim:.4f}  \n"
            f"(method against baseline, same seed, on the raw frames before video encoding)")
    notes = "\n".join(f"> {n}" for n in _notes(result, device))
    return "\n\n".join(x for x in (head, table, line, notes) if x)


def compare_numbers(result: CompareResult, device: str) -> dict:
    """The comparison as plain numbers (JSON): seconds, speedup, PSNR in dB (``None`` when
    the frames are identical), SSIM."""
    identical = math.isinf(result.psnr)
    return {
        "model": result.method.request.model,
        "seed": result.method.request.seed,
        "baseline": result.baseline.label,
        "method": result.method.request.method,
        "baseline_seconds": round(result.baseline.seconds, 4),
        "method_seconds": round(result.method.seconds, 4),
        "speedup": round(result.speedup, 4),
        "psnr_db": None if identical else round(result.psnr, 3),
        "identical": identical,
        "ssim": round(result.ssim, 5),
        "first_run": result.first_run,
        "device": device,
    }


def mask_report(result: MaskResult, model: str, method: str, layer: int, head: int, step: int, steps: int) -> str:
    """Markdown under the Masks tab's picture."""
    lay, plan = result.layout, result.plan
    t, h, w = lay.grid
    text = f" + {lay.text_len} text tokens ({'before' if lay.text_first else 'after'} the video)" if lay.text_len else ""
    head_line = (f"**{model}** · `{method}` · {t}×{h}×{w} = {lay.video_len} video tokens{text} · "
                 f"{result.heads} heads · {result.layers} attention layers")
    where = f"layer {layer}, head {head}, step {step} of {steps}"
    if result.dense_reason:
        body = f"At {where} this call runs the stock dense attention: {result.dense_reason}."
    else:
        body = (f"At {where}: **video density {result.video_density:.3f}** for this head; "
                f"{result.call_density:.3f} over the whole call (mean over heads"
                + (", text always dense" if lay.text_len else "") + ").  \n"
                f"{plan.n_q_blocks}×{plan.n_kv_blocks} blocks of {plan.block_m}×{plan.block_n} tokens, "
                f"at most {plan.max_visits} key blocks per query block. Dark = computed.")
    return f"{head_line}\n\n{body}"


def mask_numbers(result: MaskResult) -> dict:
    """The mask as plain numbers (JSON)."""
    return {
        "layout": str(result.layout),
        "heads": result.heads,
        "layers": result.layers,
        "video_density": round(result.video_density, 5),
        "call_density": round(result.call_density, 5),
        "dense_reason": result.dense_reason,
        "blocks": [result.plan.n_q_blocks, result.plan.n_kv_blocks],
        "block_size": [result.plan.block_m, result.plan.block_n],
    }
