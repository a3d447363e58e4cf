"""The ``gen`` command line.

    gen render PROMPT [--model M] [--attention A] [--set k=v]   render a clip (mp4) or image (png)
    gen batch MANIFEST -o DIR      render every job of a manifest (resumable; torchrun splits the jobs)
    gen models                     models gen knows, and which have weights here
    gen methods                    attention methods, their parameters and presets (with densities)
    gen masks --method M           picture of a method's mask at a model's geometry
    gen calibrate sparse-vdit      offline per-head mode search, writes a plan file
    gen demo                       the Gradio app
    gen info                       versions, devices, the attention backend gen would pick, kernel status
    gen check kernels [--full]     compile every Triton kernel ahead of time for sm_80/sm_90 (no GPU needed)
    gen check gpu [--dry-run]      the prepared GPU check: correctness, kernel speed, long-video FPS, one report
    gen bench kernels [--quick]    block-sparse kernel vs dense SDPA (time, TFLOP/s, speedup)
    gen bench e2e [--quick]        whole denoising runs per method: latency, memory, attention share
    gen bench fidelity [--quick]   error vs dense: attention (rel. L2, cosine) and video (PSNR, SSIM)
    gen capture --model M ...      save q, k, v of chosen steps/layers of a run (safetensors)
    gen long PROMPT --schedule S   long video chunk by chunk with a KV cache, streamed to an mp4
    gen train-tiny [--causal]      train the built-in shapes-wan model (or its causal variant) from its seed
    gen eval-tiny                  render held-out seeds of shapes-wan and score them (colour, motion, ...)

The package: ``app`` (the typer app, ``main``), ``errors`` (the one error handler),
``options`` (the shared options, checked by ``gen.values``), ``common`` (consoles, logging,
written paths), then one module per command or group. A command module registers itself
on ``app`` when imported; the imports below fix the order of ``gen --help``. Every module
imports typer and rich only at the top, so help pages stay fast.
"""

from gen.cli.app import app, main

# isort: off
# registration order = the order `gen --help` lists them (the groups bench, check, calibrate last)
from gen.cli import info, render, batch, catalog, masks, capture, demo, long, tiny  # noqa: F401
from gen.cli import bench, check, calibrate  # noqa: F401
# isort: on
from gen.cli.bench import _method_plans  # tests time preset plans with it

__all__ = ["app", "main", "_method_plans"]
