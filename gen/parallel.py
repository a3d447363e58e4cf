"""Several GPUs on one video: diffusers' context parallelism (Ulysses) with gen's attention.

Launch one process per GPU with torchrun; every rank loads the pipeline, runs the same
call with the same seed, and gets the whole output; rank 0 writes it::

    # torchrun --nproc_per_node 2 clip.py
    import torch, gen, gen.parallel
    from gen.pipelines import load
    rank, world, device = gen.parallel.init_distributed()
    pipe = load("wan2.1-t2v-1.3b", device=device)
    gen.parallel.enable_ulysses(pipe, world)     # before or after gen.sparsify
    gen.sparsify(pipe, "radial")
    frames = pipe(prompt, generator=torch.Generator("cpu").manual_seed(0)).frames[0]
    if rank == 0:
        ...  # write the file

The communication is diffusers' own (``enable_parallelism`` with
``ContextParallelConfig(ulysses_degree=N)``, its ``_cp_plan`` hooks and its Ulysses
all-to-all); gen supplies a plan where diffusers has none (HunyuanVideo) and runs its
methods inside the all-to-all on each rank's heads (``gen.attention.processors.parallel``).
``N`` must divide the head count (Wan 1.3B: 12, 14B: 40, HunyuanVideo and FLUX: 24) and
the token counts that are split. Ring attention is refused with a sparse method.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

__all__ = ["enable_ulysses", "init_distributed"]

logger = logging.getLogger("gen")


def init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    in the environment): nccl on CUDA with device ``cuda:LOCAL_RANK``, gloo on the CPU.
    Returns ``(rank, world_size, device)``; a no-op (apart from the device) when the
    group exists already.

    Args:
        device: ``"cuda"``/``"cpu"``; default CUDA when available.
    """
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("no process group to join: launch with `torchrun --nproc_per_node N ...` "
                             "(it sets RANK, WORLD_SIZE and LOCAL_RANK).")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


@contextlib.contextmanager
def _device_count_for_cpu():
    """diffusers 0.42 places a rank on ``rank % torch.accelerator.device_count()``, which
    divides by zero on a torch without accelerators; count the CPU as one device there."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_ulysses(target, degree: int) -> list[torch.nn.Module]:
    """Split each attention call of ``target``'s transformer(s) over ``degree`` ranks with
    diffusers' Ulysses context parallelism; works before or after ``gen.sparsify``.

    Args:
        target: a diffusers pipeline (its ``transformer`` and ``transformer_2``) or a
            transformer (Wan, HunyuanVideo, FLUX).
        degree: ranks per attention call; 1 does nothing. Must equal the process group's
            size and divide the head count.

    Returns:
        The transformers now parallel.

    Raises:
        ValueError: no process group, a degree that does not fit the group or the heads,
            or a transformer already parallel in another way.
    """
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from gen.api import _transformers
    from gen.attention.processors.parallel import context_parallel_config, cp_plan_for

    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
        raise ValueError(f"the Ulysses degree must be an int >= 1, got {degree!r}.")
    transformers = _transformers(target)
    if degree == 1:
        return []
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"Ulysses over {degree} ranks needs a process group: launch with `torchrun "
                         f"--nproc_per_node {degree} ...` and call gen.parallel.init_distributed() first.")
    world = dist.get_world_size()
    if world != degree:
        raise ValueError(f"Ulysses degree {degree} differs from the {world} processes launched; launch "
                         f"`torchrun --nproc_per_node {degree} ...` (one process per GPU).")
    done = []
    for t in transformers:
        heads = t.config.num_attention_heads
        if heads % degree:
            raise ValueError(f"{type(t).__name__} has {heads} attention heads, which {degree} ranks cannot share "
                             f"evenly; choose a degree that divides {heads}.")
        current = context_parallel_config(getattr(t, "_parallel_config", None))
        if current is not None:
            if current.ulysses_degree == degree and current.ring_degree == 1:
                continue  # already so
            raise ValueError(f"{type(t).__name__} is already parallel ({current}); diffusers cannot change it. "
                             "Load the model again.")
        with _device_count_for_cpu():
            t.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=cp_plan_for(t))
        done.append(t)
    logger.info("Ulysses context parallelism over %d ranks on %d transformer(s)", degree, len(done))
    return done
