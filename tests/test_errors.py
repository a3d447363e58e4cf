"""Bad input raises ValueError that says what to fix, on both backends; never a crash
inside Triton or a silent wrong answer."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from gen.attention import BlockPlan, block_sparse_attention

BACKENDS = ["triton", "torch"]


def _qkv(b=1, h=2, s=100, d=64, dtype=torch.float32):
    return (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))


def _raises(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_dtype_device_errors(backend):
    q, k, v = _qkv()
    plan = BlockPlan.dense(100, block_m=64, block_n=64)
    _raises("expected 4 dims", q[0], k, v, plan, backend=backend)
    _raises("dtypes differ", q.half(), k, v, plan, backend=backend)
    _raises("not supported", q.int(), k.int(), v.int(), plan, backend=backend)
    _raises("head counts differ", q, k[:, :1], v[:, :1], plan, backend=backend)
    _raises("batch sizes differ", q, torch.cat([k, k]), torch.cat([v, v]), plan, backend=backend)
    _raises("k and v lengths differ", q, k, v[:, :, :50], plan, backend=backend)
    _raises("head dims differ", q, k[..., :32], v[..., :32], plan, backend=backend)
    _raises("different devices", q, k.to("meta"), v.to("meta"), plan, backend=backend)
    _raises("must be a torch.Tensor", q.numpy(), k, v, plan, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_errors(backend):
    q, k, v = _qkv()
    _raises("built for q_len=128", q, k, v, BlockPlan.dense(128, block_m=64, block_n=64), backend=backend)
    _raises("plan has no attribute", q, k, v, object(), backend=backend)
    meta_plan = BlockPlan.dense(100, block_m=64, block_n=64).to("meta")
    _raises(r"plan.to\(q.device\)", q, k, v, meta_plan, backend=backend)
    per_head = BlockPlan.random(100, 100, 0.5, heads=3, block_m=64, block_n=64)
    _raises("do not broadcast", q, k, v, per_head, backend=backend)


def _duck_plan(indices, counts, s=100, bm=64, bn=64):
    return SimpleNamespace(block_m=bm, block_n=bn, q_len=s, kv_len=s,
                           kv_indices=torch.tensor(indices, dtype=torch.int32).view(1, 1, 2, -1),
                           kv_counts=torch.tensor(counts, dtype=torch.int32).view(1, 1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_value_errors_on_duck_typed_plans(backend):
    """Plans not made by BlockPlan get their values checked on every call."""
    q, k, v = _qkv()
    _raises("outside", q, k, v, _duck_plan([[0, 2], [0, 1]], [2, 2]), backend=backend)
    _raises("outside", q, k, v, _duck_plan([[-1, 0], [0, 1]], [1, 2]), backend=backend)
    _raises("strictly ascending", q, k, v, _duck_plan([[1, 0], [0, 1]], [2, 2]), backend=backend)
    _raises("strictly ascending", q, k, v, _duck_plan([[1, 1], [0, 1]], [2, 2]), backend=backend)
    _raises(r"lie in \[0, 2\]", q, k, v, _duck_plan([[0, 1], [0, 1]], [3, 2]), backend=backend)
    good = _duck_plan([[0, 1], [1, 1]], [2, 1])  # padding past the count is never read
    out = block_sparse_attention(q, k, v, good, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_valid_and_scale_errors(backend):
    q, k, v = _qkv(b=2)
    plan = BlockPlan.dense(100, block_m=64, block_n=64)
    _raises(r"shape \(2,\)", q, k, v, plan, kv_valid=torch.tensor([5]), backend=backend)
    _raises(r"shape \(2,\)", q, k, v, plan, kv_valid=torch.tensor([5.0, 6.0]), backend=backend)
    _raises(r"lie in \[0, 100\]", q, k, v, plan, kv_valid=torch.tensor([5, 101]), backend=backend)
    _raises("kv_mask must be a bool", q, k, v, plan, kv_mask=torch.ones(100), backend=backend)
    _raises(r"kv_mask has shape \(3, 100\)", q, k, v, plan, kv_mask=torch.ones(3, 100, dtype=torch.bool),
            backend=backend)
    _raises("finite positive", q, k, v, plan, scale=float("nan"), backend=backend)
    _raises("finite positive", q, k, v, plan, scale=-1.0, backend=backend)


def test_triton_only_limits():
    q, k, v = _qkv(d=72)
    plan = BlockPlan.dense(100, block_m=64, block_n=64)
    _raises("head_dim=72 is not supported by the Triton kernel", q, k, v, plan, backend="triton")
    out = block_sparse_attention(q, k, v, plan, backend="torch")  # the reference takes any D
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    q, k, v = _qkv()
    _raises("block_m=48", q, k, v, BlockPlan.dense(100, block_m=48, block_n=64), backend="triton")
    _raises("block_n=8", q, k, v, BlockPlan.dense(100, block_m=64, block_n=8), backend="triton")


def test_unknown_backend():
    q, k, v = _qkv()
    _raises("unknown backend 'cuda'", q, k, v, BlockPlan.dense(100), backend="cuda")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_triton_on_cpu_without_interpreter_says_what_to_do():
    code = """
        import torch
        from gen.attention import BlockPlan, block_sparse_attention
        q = torch.randn(1, 1, 64, 64)
        try:
            block_sparse_attention(q, q, q, BlockPlan.dense(64), backend="triton")
        except ValueError as e:
            print("ValueError:", e)
    """
    res = _run_python(code, TRITON_INTERPRET="0")
    assert "ValueError: Triton kernels need a CUDA device" in res.stdout, res.stderr
    assert "TRITON_INTERPRET=1" in res.stdout


def test_interpreter_switched_on_too_late_says_so():
    code = """
        import os, torch
        from gen.attention import BlockPlan, block_sparse_attention
        os.environ["TRITON_INTERPRET"] = "1"
        q = torch.randn(1, 1, 64, 64)
        try:
            block_sparse_attention(q, q, q, BlockPlan.dense(64), backend="triton")
        except ValueError as e:
            print("ValueError:", e)
    """
    res = _run_python(code, TRITON_INTERPRET="0")
    assert "ValueError: TRITON_INTERPRET=1 was set after triton was imported" in res.stdout, res.stderr
