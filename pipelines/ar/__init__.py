"""Long-horizon autoregressive video on a stock ``WanTransformer3DModel`` (``gen.pipelines.ar``).

See README.md beside this file: ``cache`` (KV slots with a pinned sink), ``runner``
(block-causal forward with per-frame timesteps and external caches), ``schedules``
(Self-Forcing chunk loop, LongLive sink + window with KV-recache), ``rolling`` (Rolling
Forcing), ``flex`` (FLEX horizon extension), ``checkpoints`` (public causal checkpoints ->
diffusers), ``stream`` (chunk-by-chunk VAE decode and mp4 append).
"""

from .cache import CacheContext, KVCache
from .checkpoints import convert_causal_checkpoint, load_causal_checkpoint
from .flex import AntiphaseNoiseSampler, FlexConfig, flex_chunk_config, flex_rope_tables
from .rolling import RollingConfig, RollingForcingAR
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
    "AntiphaseNoiseSampler", "FlexConfig", "RollingConfig", "RollingForcingAR", "convert_causal_checkpoint",
    "flex_chunk_config", "flex_rope_tables", "load_causal_checkpoint",
    "CacheContext", "CausalWanRunner", "ChunkAR", "ChunkConfig", "KVCache", "Mp4Stream", "NoiseSampler",
    "RunnerConfig", "SinkWindowAR", "SinkWindowConfig", "StreamingWanDecoder", "warped_timesteps",
]
