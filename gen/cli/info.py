"""``gen info``: versions, devices, the attention backend gen would pick, kernel status."""

from __future__ import annotations

import os
import sys

from rich.markup import escape
from rich.table import Table

from gen.cli.app import app
from gen.cli.common import console


@app.command()
def info() -> None:
    """Print versions, devices and the block-sparse attention backend that would be used."""
    import torch

    import gen

    table = Table(show_header=False)
    table.add_row("gen", gen.__version__)
    table.add_row("python", sys.version.split()[0])
    table.add_row("torch", torch.__version__)
    try:
        import triton

        table.add_row("triton", triton.__version__)
    except ImportError:
        table.add_row("triton", "not installed")
    cuda = torch.cuda.is_available()
    table.add_row("CUDA", torch.cuda.get_device_name(0) if cuda else "no CUDA device")
    dev = torch.device("cuda" if cuda else "cpu")
    from gen.attention.backends import choose
    from gen.attention.backends.registry import Call

    dt = torch.bfloat16 if cuda else torch.float32
    for what, full, dens in (("dense plan", True, 1.0), ("sparse plan", False, 0.25)):
        # a Wan 2.1 1.3B 480p-sized call; the choice is made per call by shape, plan and device
        call = Call(device=dev, dtype=dt, batch=1, heads=12, q_len=32760, kv_len=32760, head_dim=128,
                    full=full, density=dens, return_lse=True)
        got = choose("block_sparse", call)
        why_not = "; ".join(f"{n}: {w}" for n, w in got.skipped)
        table.add_row(f"attention backend ({what})",
                      escape(f"{got.name} on {dev.type}: {got.reason}" + (f" (skipped {why_not})" if why_not else "")))
    est = Call(device=dev, dtype=dt, batch=1, heads=12, q_len=256, kv_len=256, head_dim=128)
    got = choose("block_stats", est)
    table.add_row("block estimation (dynamic methods)", escape(f"{got.name} on {dev.type}: {got.reason}"))
    table.add_row("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset"))
    if cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        from gen.kernels.status import kernel_status

        for row in kernel_status(dev):
            if row["ok"]:
                text = f"compiled and ran; autotuned {row['config']}; bf16 error vs SDPA {row['error_vs_sdpa']:.1e}"
            else:
                text = "[red]failed: " + escape(row["error"])
            table.add_row(f"kernel {row['name']}", text)
    else:
        table.add_row("kernels", "no compiled run here (no CUDA device, or TRITON_INTERPRET set); "
                                 "`gen check kernels` compiles them for sm_80/sm_90 without a GPU")
    console.print(table)
