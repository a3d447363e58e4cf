"""torch.compile(transformer, fullgraph=True) with gen's processors: no graph break, and
two denoising steps with one graph (no recompile). CPU inductor takes ~30 s here."""

import pytest

import gen

from tiny_transformers import tiny_wan, wan_inputs


def _compiled_two_steps(t, x) -> list:
    """Outputs of ``torch.compile(t, fullgraph=True)`` at two denoising steps (timesteps 900,
    600), failing on any recompile."""
    import torch._dynamo

    compiled = torch.compile(t, fullgraph=True)
    outs = []
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for step, ts in enumerate((900, 600)):
            with t.cache_context("cond", step_index=step, num_inference_steps=2):
                outs.append(compiled(**dict(x, timestep=torch.tensor([ts])))[0])
    return outs


@pytest.mark.slow
def test_compiled_wan_two_steps_without_recompiling():
    import torch._dynamo
    from torch._dynamo.utils import counters

    t = tiny_wan()
    x = wan_inputs()
    with torch.no_grad():
        stock = [t(**dict(x, timestep=torch.tensor([ts])))[0] for ts in (900, 600)]
    torch._dynamo.reset()
    counters.clear()
    pattern = lambda qt, qh, qw, kt, kh, kw: (qt - kt).abs() <= 1
    with gen.sparse(t, "mask", pattern=pattern, block_m=16, block_n=16) as handle:
        with torch.no_grad():
            eager = [t(**dict(x, timestep=torch.tensor([ts])))[0] for ts in (900, 600)]
        handle.patches[0].method._plans.clear()  # make the compiled call build its own plan
        outs = _compiled_two_steps(t, x)
    assert counters["stats"]["unique_graphs"] == 1
    for out, ref, st in zip(outs, eager, stock):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert (out - st).abs().max() > 1e-4  # the sparse pattern really ran
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_wan_with_a_dynamic_method_two_steps_without_recompiling():
    # rectified builds its plan from each call's q and k: estimation, plan and R/C trace
    # into the graph (no graph break), and a new step reuses the graph
    import torch._dynamo
    from torch._dynamo.utils import counters

    t = tiny_wan()
    x = wan_inputs()
    torch._dynamo.reset()
    counters.clear()
    with gen.sparse(t, "rectified", block_size=16, p=0.2, dense_steps=0, dense_layers=0) as handle:
        with torch.no_grad():
            eager = [t(**dict(x, timestep=torch.tensor([ts])))[0] for ts in (900, 600)]
        handle.patches[0].method._forced.clear()
        outs = _compiled_two_steps(t, x)
    assert counters["stats"]["unique_graphs"] == 1
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
