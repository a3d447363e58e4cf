"""gen's processors under diffusers' Ulysses context parallelism, 2 processes on the CPU.

One ``torch.multiprocessing.spawn`` of 2 ranks (gloo) runs every case and writes its
outputs to files; this process computes the single-process outputs of the same cases
and compares (fp32, atol 1e-5). Cases: the tiny Wan, HunyuanVideo and FLUX transformers
(``tiny_transformers.py``) under every registered method that supports the family
(``list_methods()``; the others are recorded as skipped with the method's reason), with
per-head data where a method has it (a per-head block mask, a Sparse-vDiT plan whose
heads differ), a dense-scheduled layer (HunyuanVideo's padding mask on the stock path),
FLUX's interleaved ``[txt₀, img₀, txt₁, img₁]`` order, parallelism enabled before and
after ``gen.sparsify``, and the stock processors back after ``gen.restore``.

diffusers 0.42's ``enable_parallelism`` places rank r on ``r % torch.accelerator.device_count()``,
which is 0 on a CPU-only torch: the workers patch ``torch.accelerator.device_count`` to
return 1 (``gen.parallel.enable_ulysses`` does the same for its own call). The CLI test
runs ``torchrun --nproc_per_node 2 -m gen render ... --ulysses 2``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gen
import gen.parallel
from gen.attention.methods import list_methods, method_class

from tiny_transformers import FAMILIES, flux_inputs, hunyuan_inputs, wan_inputs

WORLD = 2
BLOCK = 32
# inputs whose split lengths are multiples of the 2 ranks (diffusers' equipartition)
INPUTS = {
    "wan": lambda: wan_inputs(batch=1, frames=3, size=16),  # 3 x 8 x 8 video tokens
    "hunyuan": lambda: hunyuan_inputs(batch=2, frames=3, size=8, text=10, valid=(10, 3)),
    "flux": lambda: flux_inputs(batch=1, h=6, w=10, text=6),  # 6 text + 60 image tokens
}
VIDEO_TOKENS = {"wan": 192, "hunyuan": 192, "flux": 60}
GRID = {"wan": (3, 8, 8), "hunyuan": (3, 8, 8), "flux": (1, 6, 10)}
TEXT = {"wan": 0, "hunyuan": 10, "flux": 6}
LAYERS, HEADS = 2, 2  # every tiny transformer: 2 sparsified attention layers, 2 heads


def _overrides(family: str, name: str) -> dict:
    """Method settings for the case: per-head data where the method has some; no dense
    steps (a transformer called by hand is at step 0)."""
    # radial: layer 0 on the stock path inside the all-to-all (HunyuanVideo: with its padding mask)
    return dict(dense_steps=0, dense_layers=(0,) if name == "radial" else 0, **_settings(family, name))


def _settings(family: str, name: str) -> dict:
    if name == "mask":
        nb = -(-VIDEO_TOKENS[family] // BLOCK)
        eye = torch.eye(nb, dtype=torch.bool)
        lower = torch.ones(nb, nb, dtype=torch.bool).tril()
        return dict(pattern=torch.stack([eye, lower]), block_m=BLOCK, block_n=BLOCK)  # head 0 and 1 differ
    if name == "sparse-vdit":
        from gen.attention import TokenLayout
        from gen.attention.methods.sparse_vdit import SparseVDiTPlan

        layout = TokenLayout(*GRID[family], text_len=TEXT[family])
        modes = [[["window", "stripe"], ["diagonal", "skip"]]]  # [steps, layers, heads]: every head its own
        plan = SparseVDiTPlan.from_modes(modes, layout, family=family, block_size=16, n_stripes=2)
        return dict(plan=plan)
    if name == "paro":
        from gen.attention import TokenLayout
        from gen.attention.methods.paro import ParoPlan

        layout = TokenLayout(*GRID[family], text_len=TEXT[family], text_first=family == "flux")
        nb = -(-VIDEO_TOKENS[family] // 16)
        masks = torch.rand(1, LAYERS, HEADS, nb, nb, generator=torch.Generator().manual_seed(0)) < 0.4
        orders = torch.tensor([[1, 2], [4, 5]])  # [layers, heads]: every head its own axis order and mask
        return dict(plan=ParoPlan.from_masks(orders, masks, layout, block_size=16, steps=1))
    return {}


def cases() -> tuple[list[tuple[str, str]], dict[tuple[str, str], str]]:
    """``(family, method)`` pairs to run, and the skipped ones with the reason."""
    run, skipped = [], {}
    for family in FAMILIES:
        for name in list_methods():
            families = method_class(name).families
            if families and family not in families:
                skipped[(family, name)] = f"{name} supports {', '.join(families)} only"
            else:
                run.append((family, name))
    return run, skipped


def _call(t, family):
    with torch.no_grad():
        out = t(**INPUTS[family]())[0]
    # Under parallelism diffusers gathers FLUX's output with a functional collective: the
    # result is an AsyncCollectiveTensor whose buffer is filled once the collective is
    # waited on. Any torch op waits; torch.save does not, and saved a buffer still being
    # filled (values of 2**127, one CI run in many). clone() waits and gives a plain tensor.
    return out.clone()


def _single_process(family: str, name: str) -> torch.Tensor:
    t = FAMILIES[family][0]()
    with gen.sparse(t, name, **_overrides(family, name)):
        return _call(t, family)


# -- the ranks ---------------------------------------------------------------------------


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.accelerator.device_count = lambda: 1  # diffusers divides by it (see the module docstring)
    results = {}
    try:
        run, _ = cases()
        for family in FAMILIES:
            # parallelism first, then each method sparsified and restored on it (as gen.session does)
            t = FAMILIES[family][0]()
            gen.parallel.enable_ulysses(t, WORLD)
            for fam, name in run:
                if fam == family:
                    with gen.sparse(t, name, **_overrides(family, name)) as handle:
                        results[(family, name)] = _call(t, family)
                    results[(family, name, "sparse calls")] = handle.summary()["transformers"][0]["sparse_calls"]
            results[(family, "stock after restore")] = _call(t, family)
            # gen.sparsify first, then diffusers' own enable_parallelism on the sparsified model
            name = "sparse-vdit" if family != "flux" else "mask"
            t = FAMILIES[family][0]()
            gen.sparsify(t, name, **_overrides(family, name))
            t.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
            results[(family, name, "sparsify first")] = _call(t, family)
        # ring attention is refused, before and after sparsify
        errors = []
        t = FAMILIES["wan"][0]()
        gen.sparsify(t, "dense")
        try:
            t.enable_parallelism(config=ContextParallelConfig(ring_degree=WORLD))
        except ValueError as err:
            errors.append(str(err))
        results["ring refused"] = errors
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ulysses_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ulysses")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


RUN, SKIPPED = cases()


@pytest.mark.parametrize("family,name", RUN)
def test_ulysses_equals_single_process(ulysses_results, family, name):
    """Each rank's output under Ulysses 2 equals the single-process output of the method."""
    ref = _single_process(family, name)
    for results in ulysses_results:
        torch.testing.assert_close(results[(family, name)], ref, atol=1e-5, rtol=0)
        assert results[(family, name, "sparse calls")] > 0  # the method ran, not only the stock path


@pytest.mark.parametrize("family,name", sorted(SKIPPED))
def test_methods_that_refuse_the_family_are_skipped(family, name):
    pytest.skip(SKIPPED[(family, name)])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallelism_enabled_after_sparsify(ulysses_results, family):
    """``transformer.enable_parallelism`` on a sparsified transformer: gen keeps its hook
    outside the split (FLUX's plan splits the transformer's own inputs) and, for
    HunyuanVideo, supplies the plan diffusers lacks."""
    name = "sparse-vdit" if family != "flux" else "mask"
    ref = _single_process(family, name)
    for results in ulysses_results:
        torch.testing.assert_close(results[(family, name, "sparsify first")], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_restore_gives_stock_processors_the_parallel_config(ulysses_results, family):
    t = FAMILIES[family][0]()
    ref = _call(t, family)
    for results in ulysses_results:
        torch.testing.assert_close(results[(family, "stock after restore")], ref, atol=1e-5, rtol=0)


def test_ring_attention_is_refused(ulysses_results):
    for results in ulysses_results:
        (message,) = results["ring refused"]
        assert "ring attention" in message and "ulysses_degree=N" in message


def test_gathered_order_maps_interleaved_shards_back():
    """FLUX ranks hold [txt_r, img_r], HunyuanVideo [vid_r, txt_r]; the gathered sequence
    maps back to the model's joint order and the inverse undoes it."""
    from gen.attention.processors.parallel import gathered_order

    text, image = torch.arange(4), torch.arange(100, 106)
    gathered = torch.cat([text[:2], image[:3], text[2:], image[3:]])  # 2 ranks
    fwd, inv = gathered_order("flux", 10, 4, 2, torch.device("cpu"))
    assert torch.equal(gathered[fwd], torch.cat([text, image]))
    assert torch.equal(gathered[fwd][inv], gathered)
    gathered = torch.cat([image[:3], text[:2], image[3:], text[2:]])
    fwd, inv = gathered_order("hunyuan", 10, 4, 2, torch.device("cpu"))
    assert torch.equal(gathered[fwd], torch.cat([image, text]))
    assert gathered_order("wan", 10, 0, 2, torch.device("cpu")) is None


def test_head_offset_slices_per_head_data():
    """A call that holds heads [1, 2) of 2 runs head 1's Sparse-vDiT mode and mask rows."""
    from gen.attention import AttentionContext, TokenLayout, get_method

    for family in ("wan", "hunyuan"):
        method = get_method("sparse-vdit", **_overrides(family, "sparse-vdit"))
        layout = TokenLayout(*GRID[family], text_len=TEXT[family])
        q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
        for layer in range(LAYERS):
            whole = method.attention(q, k, v, layout, AttentionContext(step_index=0, layer_index=layer))
            for h in range(HEADS):
                ctx = AttentionContext(step_index=0, layer_index=layer, head_offset=h, num_heads=HEADS)
                part = method.attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], layout, ctx)
                torch.testing.assert_close(part, whole[:, h:h + 1], atol=1e-6, rtol=0)
    method = get_method("mask", **_overrides("wan", "mask"))
    layout = TokenLayout(*GRID["wan"])
    q, k, v = (torch.randn(1, 2, layout.seq_len, 16) for _ in range(3))
    whole = method.attention(q, k, v, layout, AttentionContext())
    part = method.attention(q[:, 1:], k[:, 1:], v[:, 1:], layout, AttentionContext(head_offset=1, num_heads=2))
    torch.testing.assert_close(part, whole[:, 1:], atol=1e-6, rtol=0)


def test_ring_refused_at_sparsify_and_degree_checked():
    """Without a process group: the checks that need none."""
    from diffusers import ContextParallelConfig

    from gen.attention.processors.parallel import check_parallel_config

    with pytest.raises(ValueError, match="ring attention.*ulysses_degree=N"):
        check_parallel_config(ContextParallelConfig(ring_degree=2))
    with pytest.raises(ValueError, match="ulysses_anything"):
        check_parallel_config(ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
    check_parallel_config(ContextParallelConfig(ulysses_degree=2))
    t = FAMILIES["wan"][0]()
    with pytest.raises(ValueError, match="needs a process group"):
        gen.parallel.enable_ulysses(t, 2)
    assert gen.parallel.enable_ulysses(t, 1) == []


# -- the command line ----------------------------------------------------------------------


def _frames(path: Path):
    import imageio.v3 as iio

    return iio.imread(path)


def test_cli_render_ulysses_equals_single_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m gen render ... --ulysses 2`` writes (on rank 0 only)
    the frames a single-process render writes."""
    from gen.render import render

    prompt = "a red circle moving right on a blue background"
    args = ["render", prompt, "--steps", "2", "--seed", "0", "--height", "64", "--width", "64", "--frames", "5",
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single, parallel = tmp_path / "single.mp4", tmp_path / "x.mp4"
    # the single-process render, in this process (what `gen render` without --ulysses runs)
    render(prompt, steps=2, seed=0, height=64, width=64, frames=5, device="cpu", out=single)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gen", *args, "--ulysses", "2", "--out", str(parallel)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single.mp4", "x.mp4"]
    a, b = _frames(single), _frames(parallel)
    assert a.shape == b.shape == (5, 64, 64, 3)
    assert np.array_equal(a, b)


def _torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "gen", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_batch_ulysses_equals_single_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m gen batch ... --ulysses 2``: both processes render
    each job together; rank 0 alone writes the files (equal to a single-process batch),
    one sidecar per job recording the degree, and the index; the summary is printed once."""
    import json

    from gen.batches import batch

    manifest = tmp_path / "jobs.txt"
    manifest.write_text("a red circle moving right on a blue background\na green square moving up\n")
    defaults = dict(steps=2, height=64, width=64, frames=5, seed=3)
    single = batch(manifest, tmp_path / "single", defaults=defaults, device="cpu")
    assert single.exit_code == 0 and len(single.rendered) == 2
    done = _torchrun(["batch", str(manifest), "--out-dir", str(tmp_path / "par"), "--steps", "2", "--height", "64",
                      "--width", "64", "--frames", "5", "--seed", "3", "--device", "cpu", "--ulysses", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rendered 2, skipped 0") == 1, done.stdout
    names = sorted(p.name for p in (tmp_path / "par").glob("*.mp4"))
    assert names == sorted(p.name for p in (tmp_path / "single").glob("*.mp4")) and len(names) == 2
    for name in names:
        assert np.array_equal(_frames(tmp_path / "single" / name), _frames(tmp_path / "par" / name))
        record = json.loads((tmp_path / "par" / name).with_suffix(".json").read_text())
        assert record["status"] == "done" and record["ulysses"] == 2 and record["processes"] == 2
    assert (tmp_path / "par" / "index.html").is_file()
    # a rerun resumes: both ranks see the jobs done
    again = _torchrun(["batch", str(manifest), "--out-dir", str(tmp_path / "par"), "--steps", "2", "--height", "64",
                       "--width", "64", "--frames", "5", "--seed", "3", "--device", "cpu", "--ulysses", "2"])
    assert again.returncode == 0 and again.stdout.count("rendered 0, skipped 2") == 1, again.stdout + again.stderr


def test_batch_ulysses_refuses_a_launch_of_another_size(tmp_path):
    from typer.testing import CliRunner

    from gen.cli import app

    manifest = tmp_path / "jobs.txt"
    manifest.write_text("a red circle\n")
    res = CliRunner().invoke(app, ["batch", str(manifest), "--out-dir", str(tmp_path / "o"), "--ulysses", "2"])
    assert res.exit_code == 2
    assert "--ulysses 2 needs 2 processes" in res.output and "torchrun --nproc_per_node 2" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_bench_e2e_ulysses(tmp_path):
    """``gen bench e2e --quick --ulysses 2`` under torchrun: both ranks time every method
    over the shared attention; rank 0 alone prints the table and writes the JSON."""
    import json

    out = tmp_path / "e2e.json"
    done = _torchrun(["bench", "e2e", "--quick", "--random-weights", "--attention", "dense,radial", "--ulysses", "2",
                      "--device", "cpu", "--json", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["meta"]["ulysses"] == 2
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "radial"} and all(r["denoise_s"] > 0 for r in rows.values())
    assert rows["radial"]["run_density"] < 1.0 and rows["dense"]["run_density"] == 1.0
    assert done.stdout.count("tiny-wan 128x128x17") == 1, done.stdout  # one table, from rank 0
