"""``python -m gen.cli``, the same as ``gen`` and ``python -m gen``."""

from gen.cli import main

main()
