"""Model registry and loading, offline tiny models, presets and the long-video runner
(``gen.pipelines``). May import ``gen.attention``, diffusers and transformers.

Empty until the diffusers-integration work lands; see README.md in this folder.
"""
