"""``python -m gen.demos [--host H] [--port P] [--share] [--outputs DIR]``: the same as
``gen demo``, whose options are defined once, in ``gen.cli``."""

import os
import sys

import torch
import typer

from gen.cli import app

# as `gen` does: without CUDA, Triton kernels run through the interpreter, and Triton
# reads TRITON_INTERPRET when it is first imported (the demo imports it later)
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
typer.main.get_command(app).commands["demo"].main(args=sys.argv[1:], prog_name="python -m gen.demos")
