"""What every calibration (``gen calibrate sparse-vdit``, ``gen calibrate paro``) does
before and around its passes: resolve the job once, load the model through the run core,
and read the transformer's shape.

A calibration runs the pipeline through the run core (:class:`gen.session.Session`) with
an observer method installed once; these two steps are the same for every method, so
they live here and the method's calibration keeps only its own checks and statistics.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gen.session import STOCK, RenderJob, Session, read_image


def resolve_calibration(method: str, families: Sequence[str], model: str, prompts: Sequence[str], *,
                        height: int | None, width: int | None, frames: int | None, steps: int | None,
                        guidance: float | None, seed: int, negative_prompt: str | None) -> tuple[list[str], RenderJob]:
    """The prompts as a list and the resolved job of the first one (the model's defaults
    filled in, every value checked) before anything loads.

    Raises:
        ValueError: no prompt, a bad value, or a model whose family ``method`` does not
            support (``families``).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("calibration needs at least one prompt.")
    base = RenderJob(prompts[0], model=model, attention=STOCK, height=height, width=width, frames=frames,
                     steps=steps, guidance=guidance, seed=seed, negative_prompt=negative_prompt).resolved()
    if base.spec.family not in families:
        raise ValueError(f"{method} supports {', '.join(families)} models; {base.spec.name} is {base.spec.family}.")
    return prompts, base


@dataclass
class CalibrationModel:
    """The loaded model of a calibration.

    Attributes:
        session: the run core's session holding the pipeline.
        transformer: the pipeline's transformer.
        layers, heads: attention layers gen replaces, heads per layer.
        image: the input image as a file the run core reads (image-to-video), or None.
    """

    session: Session
    transformer: object
    layers: int
    heads: int
    image: str | None = None
    _scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    def close(self) -> None:
        """Remove the scratch copy of an in-memory input image, if one was made."""
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def load_calibration_model(base: RenderJob, *, image=None, device: str | None = None, dtype: str | None = None,
                           model_path: str | os.PathLike | None = None, pipe=None,
                           progress: Callable | None = None) -> CalibrationModel:
    """Check the input image, then load ``base``'s model once (or adopt ``pipe``, an
    already loaded pipeline of it) and read its transformer's shape.

    ``image`` is a file path or a PIL image (written to a scratch file: the run core reads
    images from files; :meth:`CalibrationModel.close` removes it). A ``progress`` callback
    silences the session's own bars.
    """
    from gen.attention.processors import attention_modules

    image_path = scratch = None
    if image is not None:
        from PIL import Image

        if isinstance(image, Image.Image):
            scratch = tempfile.TemporaryDirectory(prefix="gen-calibrate-")
            image_path = str(Path(scratch.name) / "image.png")
            image.save(image_path)
        else:
            image_path = str(image)
            read_image(image_path, base.width, base.height)
    session = Session(device=device, dtype=dtype, model_path=model_path,
                      progress=False if progress is not None else None)
    if pipe is not None:
        session.adopt(base.spec.name, pipe)
    transformer = session.pipeline(base.spec.name)[0].transformer
    return CalibrationModel(session, transformer, len(attention_modules(transformer)),
                            transformer.config.num_attention_heads, image_path, scratch)
