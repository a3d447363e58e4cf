"""Gradio app(s) (``gen.demos``). May import ``gen``.

Empty until the demo work lands; see README.md in this folder.
"""
