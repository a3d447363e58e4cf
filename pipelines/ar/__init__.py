"""Long-horizon autoregressive video on a stock ``WanTransformer3DModel`` (``gen.pipelines.ar``).

See README.md beside this file: ``cache`` (KV slots with a pinned sink), ``runner``
(block-causal forward with per-frame timesteps and external caches), ``schedules``
(Self-Forcing chunk loop, LongLive sink + window with KV-recache), ``stream``
(chunk-by-chunk VAE decode and mp4 append).
"""

from .cache import CacheContext, KVCache
from .runner import CausalWanRunner, RunnerConfig
from .schedules import (
    ChunkAR,
    ChunkConfig,
    NoiseSampler,
    SinkWindowAR,
    SinkWindowConfig,
    warped_timesteps,
)
from .stream import Mp4Stream, StreamingWanDecoder

__all__ = [
    "CacheContext", "CausalWanRunner", "ChunkAR", "ChunkConfig", "KVCache", "Mp4Stream", "NoiseSampler",
    "RunnerConfig", "SinkWindowAR", "SinkWindowConfig", "StreamingWanDecoder", "warped_timesteps",
]
