"""Two tiny kernels for the ahead-of-time compile test: one reads a plain Python float
global (the compiler refuses it; the interpreter does not notice), one a tl.constexpr."""

import triton.language as tl

PLAIN_SCALE = 0.5
CONST_SCALE = tl.constexpr(0.5)


def _plain_global_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, x * PLAIN_SCALE, mask=offs < N)


def _constexpr_global_kernel(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, x * CONST_SCALE, mask=offs < N)
