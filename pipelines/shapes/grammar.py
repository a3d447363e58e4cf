"""The caption grammar of the ``shapes-wan`` models: a few shapes, colours and motions.

A caption names one foreground shape, its colour, its motion and the background colour::

    "a red circle moving right on a blue background"
    "a white triangle bouncing on a gray background"
    "a green square standing still on a black background"

``Caption`` holds the four attributes; ``Caption.text()`` writes the canonical sentence
(optionally without the motion or background clause, which training uses so that a user
may leave either out) and ``parse_caption`` reads one back, case- and
punctuation-insensitively, with a clear error naming the words it does not know.
``sample_caption`` draws attributes uniformly (foreground colour never equal to the
background colour). The vocabulary is closed: ``WORDS`` is every word a caption can use,
which is what the word-level tokenizer of the model holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "FOREGROUNDS",
    "MOTIONS",
    "MOTION_PHRASES",
    "SHAPES",
    "WORDS",
    "Caption",
    "CaptionError",
    "parse_caption",
    "sample_caption",
]

# Palette in sRGB 0-255, chosen far apart so a pixel's nearest palette colour is its colour
# name (the evaluation's colour classifier relies on that).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
FOREGROUNDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white", "blue", "green")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "bouncing")
# The phrase each motion is written with.
MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "still": "standing still",
    "bouncing": "bouncing",
}
_FILLER = ("a", "on", "background")
WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [*_FILLER, *SHAPES, *COLORS, *(w for p in MOTION_PHRASES.values() for w in p.split())]
    )
)
"""Every word of the grammar (the tokenizer's vocabulary besides its special tokens)."""


class CaptionError(ValueError):
    """A caption outside the grammar; the message names the unknown words and the vocabulary."""


@dataclass(frozen=True)
class Caption:
    """One caption's attributes.

    Attributes:
        shape: one of ``SHAPES``.
        color: foreground colour, one of ``FOREGROUNDS``.
        motion: one of ``MOTIONS``; None when the caption leaves it out.
        background: one of ``BACKGROUNDS``; None when the caption leaves it out.
    """

    shape: str
    color: str
    motion: str | None = "still"
    background: str | None = "black"

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise CaptionError(f"unknown shape {self.shape!r}; use one of {', '.join(SHAPES)}.")
        if self.color not in FOREGROUNDS:
            raise CaptionError(f"unknown colour {self.color!r}; use one of {', '.join(FOREGROUNDS)}.")
        if self.motion is not None and self.motion not in MOTIONS:
            raise CaptionError(f"unknown motion {self.motion!r}; use one of {', '.join(MOTIONS)}.")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise CaptionError(f"unknown background {self.background!r}; use one of {', '.join(BACKGROUNDS)}.")
        if self.background == self.color:
            raise CaptionError(f"the shape and the background are both {self.color}; pick two colours.")

    def text(self, *, motion: bool = True, background: bool = True) -> str:
        """The canonical sentence; ``motion``/``background`` False drop that clause."""
        words = ["a", self.color, self.shape]
        if motion and self.motion is not None:
            words.append(MOTION_PHRASES[self.motion])
        if background and self.background is not None:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)

    def __str__(self) -> str:
        return self.text()


def sample_caption(rng: np.random.Generator) -> Caption:
    """Uniform shape, colour and motion; a background colour different from the shape's."""
    color = str(rng.choice(FOREGROUNDS))
    background = str(rng.choice([b for b in BACKGROUNDS if b != color]))
    return Caption(str(rng.choice(SHAPES)), color, str(rng.choice(MOTIONS)), background)


def parse_caption(text: str) -> Caption:
    """Read a caption of the grammar back into a ``Caption``.

    Accepts any case and punctuation and the clauses in the canonical order, each optional
    except shape and colour: ``"A red circle, moving right, on a blue background."``.

    Raises:
        CaptionError: a word outside the vocabulary (named, with the vocabulary), or a
            sentence the grammar cannot read (with the expected form).
    """
    words = re.findall(r"[a-z]+", text.lower())
    unknown = [w for w in words if w not in WORDS]
    if unknown:
        raise CaptionError(
            f"words outside the shapes vocabulary: {', '.join(dict.fromkeys(unknown))}. "
            f"The model knows: {', '.join(WORDS)}."
        )
    joined = " ".join(words)
    motions = "|".join(re.escape(p) for p in MOTION_PHRASES.values())
    m = re.fullmatch(
        rf"(?:a )?(?P<color>\w+) (?P<shape>\w+)(?: (?P<motion>{motions}))?(?: on a (?P<bg>\w+) background)?",
        joined,
    )
    form = "'a <colour> <shape> [moving left|right|up|down | standing still | bouncing] [on a <colour> background]'"
    if m is None or m["color"] not in FOREGROUNDS or m["shape"] not in SHAPES:
        raise CaptionError(f"cannot read {text!r} as a shapes caption; write it as {form}.")
    motion = next((k for k, p in MOTION_PHRASES.items() if p == m["motion"]), None)
    return Caption(m["shape"], m["color"], motion, m["bg"])
