"""The one-line attention swap: ``gen.sparsify``, ``gen.restore`` and ``gen.sparse``.

    pipe = WanPipeline.from_pretrained(...)
    handle = gen.sparsify(pipe, "dense")          # or a config object, or "mask" + pattern=...
    video = pipe(prompt).frames[0]
    print(handle.summary())
    gen.restore(pipe)                             # the exact original processors and forward

    with gen.sparse(pipe, "mask", pattern=fn):   # restored on exit, even on error
        video = pipe(prompt).frames[0]

Only the DiT's self/joint attention changes (``transformer`` and, when a pipeline has
one, ``transformer_2``); VAEs, text encoders and cross-attention are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from gen.attention.methods import SparseMethod, get_method
from gen.attention.processors import TransformerPatch, family_of, install
from gen.attention.processors.install import note_undo_failure
from gen.attention.processors.runtime import detach_run_state, has_geometry_hook

__all__ = ["SparseHandle", "sparsify", "restore", "sparse"]

_HANDLE_ATTR = "_gen_sparse_handle"


class SparseHandle:
    """What ``gen.sparsify`` did; ``restore()`` undoes it, ``summary()`` says what ran.

    Attributes:
        method: the method instance (its ``config`` holds the resolved settings).
        patches: one ``TransformerPatch`` per sparsified transformer (empty once restored).
    """

    def __init__(self, target, method: SparseMethod, patches: list[TransformerPatch]) -> None:
        self.target = target
        self.method = method
        self.patches = patches
        self._restored: list[TransformerPatch] = []  # kept for summary() after restore

    def __repr__(self) -> str:
        layers = sum(p.num_layers for p in self.patches)
        return f"SparseHandle(method={self.method.name!r}, transformers={len(self.patches)}, layers={layers})"

    @property
    def active(self) -> bool:
        return bool(self.patches)

    def reset(self) -> None:
        """Start step counting and statistics afresh (e.g. before calling a transformer by hand)."""
        for p in self.patches:
            p.run.reset()

    def restore(self) -> None:
        """Put the original processors and forward back; idempotent. The run's
        statistics stay readable through :meth:`summary`."""
        patches, self.patches = self.patches, []
        if patches:
            self._restored = patches
        try:
            _remove_all(patches)
        finally:
            if self.target.__dict__.get(_HANDLE_ATTR) is self:
                del self.target.__dict__[_HANDLE_ATTR]

    def summary(self) -> dict:
        """Attention calls that ran sparse and dense (per schedule), calls that ran dense
        because their geometry could not be read (``fallback_calls``, e.g. FLUX ``img_ids``
        that are not a grid; why in ``fallback_reasons``), the layouts seen and the
        method's density at each layout (fraction of query-key pairs computed; FLUX
        reference-image tokens count as text there, see ``gen.attention.processors``).
        After ``restore()`` (or the end of a ``with gen.sparse(...)`` block) it still
        describes the run that took place while the method was installed."""
        out = {"method": self.method.name, "config": repr(self.method.config), "transformers": []}
        for p in self.patches or self._restored:
            stats = p.run.stats
            heads = p.transformer.config.num_attention_heads
            densities = {}
            for layout in sorted(stats.layouts, key=str):
                try:
                    densities[str(layout)] = self.method.density(layout, heads)
                except NotImplementedError:
                    densities[str(layout)] = None
            out["transformers"].append({
                "family": p.family,
                "layers": p.num_layers,
                "sparse_calls": sum(stats.sparse_calls.values()),
                "dense_calls": sum(stats.dense_calls.values()),
                "dense_layers": sorted(stats.dense_calls),
                "fallback_calls": sum(stats.fallback_calls.values()),
                "fallback_reasons": sorted(stats.fallback_reasons),
                "density": densities,
            })
        return out

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _remove_all(patches: list[TransformerPatch]) -> None:
    """``remove()`` every patch (last installed first), even if one fails; raises the
    first error after trying them all."""
    first: BaseException | None = None
    for p in reversed(patches):
        try:
            p.remove()
        except Exception as exc:  # noqa: BLE001 - keep restoring the others
            first = first or exc
    if first is not None:
        raise first


def _transformers(target) -> list[torch.nn.Module]:
    if isinstance(target, torch.nn.Module) and not hasattr(target, "components"):
        family_of(target)  # raises with the supported classes
        return [target]
    components = getattr(target, "components", None)
    if not isinstance(components, dict):
        raise ValueError(
            f"gen.sparsify takes a diffusers pipeline or transformer, got {type(target).__name__}."
        )
    found = []
    for name in ("transformer", "transformer_2"):
        t = components.get(name)
        if t is not None and all(t is not f for f in found):  # one module under two names: once
            found.append(t)
    if not found:
        raise ValueError(f"{type(target).__name__} has no `transformer`; gen sparsifies DiT pipelines "
                         "(Wan, HunyuanVideo, FLUX).")
    for t in found:
        family_of(t)
    return found


def sparsify(target, method="dense", *, model: str | None = None, **overrides) -> SparseHandle:
    """Swap the DiT attention of a pipeline (or one transformer) for a gen method.

    Args:
        target: a diffusers pipeline (``WanPipeline``, ``WanImageToVideoPipeline``,
            ``HunyuanVideoPipeline``, ``FluxPipeline``, …) or its transformer.
        method: a method name (``"dense"``, ``"mask"``, …; see ``gen methods``), a config
            object, or a method instance.
        model: registry model name whose preset to use (default: the name the pipeline
            was loaded under by ``gen.pipelines.load``, else the model family's preset).
        **overrides: config fields, e.g. ``dense_steps=2`` or ``pattern=fn``.

    Returns:
        A :class:`SparseHandle` (also a context manager that restores on exit).

    Raises:
        ValueError: unknown method or field, a method that does not support the model,
            an unsupported pipeline, or a target that is already sparsified.
    """
    if getattr(target, _HANDLE_ATTR, None) is not None:
        raise ValueError("this pipeline is already sparsified; call gen.restore(pipe) first.")
    transformers = _transformers(target)
    family = family_of(transformers[0])
    model = model or getattr(target, "_gen_model_name", None)
    method_obj = get_method(method, model=model, family=family, **overrides)
    # all or nothing: each install undoes itself if it fails; the ones before it are
    # removed here, so a failed call leaves the target exactly as it was
    patches: list[TransformerPatch] = []
    try:
        for t in transformers:
            patches.append(install(t, method_obj))
        handle = SparseHandle(target, method_obj, patches)
        target.__dict__[_HANDLE_ATTR] = handle
    except BaseException as exc:
        if target.__dict__.get(_HANDLE_ATTR) is not None:
            del target.__dict__[_HANDLE_ATTR]
        try:
            _remove_all(patches)
        except Exception as undo_exc:  # noqa: BLE001 - the install error is the one to raise
            note_undo_failure(exc, undo_exc)
        raise
    return handle


def restore(target):
    """Undo ``gen.sparsify`` on ``target`` (pipeline or transformer); returns ``target``.
    A target that was never sparsified is returned unchanged. Without a handle, each
    transformer's own patch is removed, and a geometry hook left without one is detached."""
    handle = getattr(target, _HANDLE_ATTR, None)
    if handle is not None:
        handle.restore()
    else:
        for t in _transformers(target):
            patch = getattr(t, "_gen_sparse_patch", None)
            if patch is not None:
                patch.remove()
            elif has_geometry_hook(t):
                detach_run_state(t)
    return target


@contextlib.contextmanager
def sparse(target, method="dense", *, model: str | None = None, **overrides) -> Iterator[SparseHandle]:
    """``with gen.sparse(pipe, method, **overrides) as handle: ...``: sparsified inside,
    restored on exit (also on error)."""
    handle = sparsify(target, method, model=model, **overrides)
    try:
        yield handle
    finally:
        handle.restore()
