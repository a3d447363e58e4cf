"""Causal (block-causal, chunk-by-chunk) forward of a stock ``WanTransformer3DModel``.

No new weights: the runner calls the model's own modules (patch embedding, time and text
embedders, each block's norms, ``attn1``/``attn2``, FFN, head) in the stock order and
math, with three changes that Self-Forcing/CausVid make to Wan for autoregressive use:

1. **Per-frame timesteps.** ``t (B, F)``: the time embedding and the six adaLN
   modulation vectors are computed once per *frame* ``(B, F, 6, dim)`` and broadcast over
   that frame's tokens through a view ``(B, F, T, dim)``; nothing per-token is built.
   (diffusers' Wan 2.2 path accepts a per-token ``(B, seq_len)`` timestep, but it runs
   the time MLP per token and materialises ``(B, seq_len, 6, dim)``, 170 MB per 3-frame
   chunk at 480p; the test reference uses that path to check this one.)
2. **RoPE at frame positions.** The queries are rotated at their frame's position and
   the keys at the positions the cache hands out (absolute frame index, or relative
   positions in the attended span), from the model's own ``rope`` tables; the stock
   ``rope`` module (which always starts at frame 0) is not called.
3. **KV caches outside the model.** ``attn1`` gets a processor that writes this call's
   keys/values in place into a ``KVCache`` slot and attends ``[sink | recent | own]``
   straight from it (``gen.attention.cache_reference.cache_attention``: the Triton kernel
   on CUDA); ``attn2`` gets one that computes the text K/V once per prompt. The stock
   processors are put back by ``restore()`` (or leaving the ``with`` block).

One call, ``forward(latents, t, frames, mode)``, covers the three uses of the notes:
``"denoise"`` (writes the frames' K/V transiently: the next step overwrites it),
``"commit"`` (the clean pass at t=0: the K/V become context for later frames) and
``"recache"`` (re-encode frames under a new prompt, optionally re-anchoring the sink).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from gen.attention.cache_reference import apply_interleaved_rope, cache_attention

from .cache import KVCache, Positions

__all__ = ["CausalWanRunner", "RunnerConfig"]

Mode = Literal["denoise", "commit", "recache"]


@dataclass(frozen=True)
class RunnerConfig:
    """How the causal runner attends.

    Attributes:
        cache_frames: KV slots per layer (sink included); the span attended is at most this.
            For a run without eviction use the video's latent frame count.
        sink_frames: pinned first frames (0: none; LongLive 3).
        span_frames: most frames one query attends, sink and own frames included
            (None: ``cache_frames``).
        positions: ``"absolute"`` (frame index; Self-Forcing, LongLive, capped by the RoPE
            table at 1024 latent frames) or ``"relative"`` (position in the attended span;
            unbounded length; Rolling Forcing's re-roped sink).
        backend: cache attention backend: ``"triton"``, ``"torch"`` or None (Triton on CUDA).
        cache_dtype: K/V buffer dtype; None = the transformer's dtype.
    """

    cache_frames: int = 21
    sink_frames: int = 0
    span_frames: int | None = None
    positions: Positions = "absolute"
    backend: str | None = None
    cache_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.cache_frames <= 0:
            raise ValueError(f"cache_frames must be positive, got {self.cache_frames}.")
        if not 0 <= self.sink_frames < self.cache_frames:
            raise ValueError(
                f"sink_frames={self.sink_frames} must be smaller than the window (cache_frames="
                f"{self.cache_frames}); use a larger window or a smaller sink."
            )
        if self.span_frames is not None and not self.sink_frames < self.span_frames <= self.cache_frames:
            raise ValueError(
                f"span_frames={self.span_frames} must lie in ({self.sink_frames}, {self.cache_frames}] "
                "(more than the sink, at most the cache)."
            )


class _Step:
    """Tensors of the forward in flight, shared by every layer's processors."""

    q_cos: torch.Tensor
    q_sin: torch.Tensor
    k_cos: torch.Tensor
    k_sin: torch.Tensor
    t_cos: torch.Tensor
    t_sin: torch.Tensor
    write_rows: torch.Tensor
    extra_rows: torch.Tensor | None
    extra_src: torch.Tensor | None
    read_slots: torch.Tensor
    key_pos: torch.Tensor


class _SelfAttnProcessor:
    """``attn1``: project, norm, RoPE, write K/V into the cache slots, attend from the cache."""

    def __init__(self, runner: CausalWanRunner, layer: int):
        self.runner, self.layer = runner, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        r = self.runner
        st, cache = r._step, r.cache
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = apply_interleaved_rope(query, st.q_cos, st.q_sin)
        key = apply_interleaved_rope(key, st.k_cos, st.k_sin)  # spatial part only; temporal at read
        k_buf, v_buf = cache.k[self.layer], cache.v[self.layer]  # views: writes land in the buffer
        k_buf.index_copy_(1, st.write_rows, key.to(k_buf.dtype))
        v_buf.index_copy_(1, st.write_rows, value.to(v_buf.dtype))
        if st.extra_rows is not None:
            k_buf.index_copy_(1, st.extra_rows, key.index_select(1, st.extra_src).to(k_buf.dtype))
            v_buf.index_copy_(1, st.extra_rows, value.index_select(1, st.extra_src).to(v_buf.dtype))
        out = cache_attention(
            query.to(k_buf.dtype), k_buf, v_buf, st.read_slots, tokens_per_frame=cache.tokens_per_frame,
            key_pos=st.key_pos, rope_cos=st.t_cos, rope_sin=st.t_sin, backend=r.config.backend,
        )
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class _CrossAttnProcessor:
    """``attn2``: text K/V computed once per prompt and kept (per-prompt cross-attention cache)."""

    def __init__(self, runner: CausalWanRunner, layer: int):
        self.runner, self.layer = runner, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        r = self.runner
        kv = r.cross_kv[self.layer]
        if kv is None:
            key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
            value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            kv = r.cross_kv[self.layer] = (key.transpose(1, 2), value.transpose(1, 2))
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, kv[0], kv[1])
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class CausalWanRunner:
    """Block-causal forward passes of a stock Wan transformer over an external KV cache.

    Use as a context manager (installs the processors, restores the stock ones)::

        with CausalWanRunner(transformer, RunnerConfig(cache_frames=12, sink_frames=3),
                             batch=1, height=60, width=104) as runner:
            runner.set_prompt(prompt_embeds)            # (B, 512, text_dim)
            flow = runner.forward(x, t, frames=[0, 1, 2], mode="denoise")

    Args:
        transformer: a ``WanTransformer3DModel`` (T2V; I2V's image branch is refused).
        config: ``RunnerConfig``.
        batch: batch size of every call.
        height, width: latent height/width (pixels / 8).
        rope_cos, rope_sin: optional temporal RoPE tables ``(P, t_dim)`` replacing the model's
            (FLEX's modulated frequencies, ``gen.pipelines.ar.flex``).
    """

    def __init__(self, transformer, config: RunnerConfig, *, batch: int, height: int, width: int,
                 rope_cos: torch.Tensor | None = None, rope_sin: torch.Tensor | None = None):
        cfg = transformer.config
        if cfg.added_kv_proj_dim is not None or cfg.image_dim is not None:
            raise ValueError("the causal runner takes text-to-video Wan transformers; this one has an image branch.")
        if any(getattr(b.attn1, "fused_projections", False) for b in transformer.blocks):
            raise ValueError("fused QKV projections are not supported; call transformer.unfuse_qkv_projections().")
        p_t, p_h, p_w = cfg.patch_size
        if p_t != 1 or height % p_h or width % p_w:
            raise ValueError(f"latent size {height}x{width} must be a multiple of the patch {p_h}x{p_w} (and patch_t 1).")
        self.transformer, self.config = transformer, config
        self.batch, self.height, self.width = batch, height, width
        self.hp, self.wp = height // p_h, width // p_w
        self.tokens_per_frame = self.hp * self.wp
        heads = cfg.num_attention_heads
        head_dim = cfg.attention_head_dim
        # the compute dtype: the first parameter may be one diffusers keeps in float32
        # (``scale_shift_table``, ``_keep_in_fp32_modules``) in a bf16/fp16 model
        param = transformer.patch_embedding.weight
        self.device, self.dtype = param.device, param.dtype
        self.cache = KVCache(
            num_layers=len(transformer.blocks), batch=batch, heads=heads, head_dim=head_dim,
            tokens_per_frame=self.tokens_per_frame, capacity_frames=config.cache_frames,
            sink_frames=config.sink_frames, dtype=config.cache_dtype or self.dtype, device=self.device,
        )
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(transformer.blocks)
        self._text: torch.Tensor | None = None
        self._tables(rope_cos, rope_sin)
        self._saved: list | None = None
        self._step = _Step()

    # -- RoPE tables ---------------------------------------------------------------------------

    def _tables(self, t_cos, t_sin) -> None:
        rope = self.transformer.rope
        t_dim, h_dim = rope.t_dim, rope.h_dim
        cos, sin = rope.freqs_cos.double(), rope.freqs_sin.double()  # (P, D): [t | h | w]
        d = cos.shape[1]
        if t_cos is None:
            t_cos, t_sin = cos[:, :t_dim], sin[:, :t_dim]
        if t_cos.shape[1] != t_dim:
            raise ValueError(f"temporal RoPE tables must have {t_dim} columns, got {tuple(t_cos.shape)}.")
        n_pos = t_cos.shape[0]
        # temporal tables over the full head dim: identity (cos 1, sin 0) on the h/w dims
        self.t_cos = torch.ones(n_pos, d, dtype=torch.float64)
        self.t_sin = torch.zeros(n_pos, d, dtype=torch.float64)
        self.t_cos[:, :t_dim], self.t_sin[:, :t_dim] = t_cos.double(), t_sin.double()
        # spatial tables of one frame (T, D): identity on the temporal dims
        hs, ws = slice(t_dim, t_dim + h_dim), slice(t_dim + h_dim, d)
        sc = torch.ones(self.hp, self.wp, d, dtype=torch.float64)
        ss = torch.zeros(self.hp, self.wp, d, dtype=torch.float64)
        sc[..., hs], ss[..., hs] = cos[: self.hp, None, hs], sin[: self.hp, None, hs]
        sc[..., ws], ss[..., ws] = cos[None, : self.wp, ws], sin[None, : self.wp, ws]
        self.s_cos, self.s_sin = sc.flatten(0, 1), ss.flatten(0, 1)
        dev = self.device
        self.t_cos, self.t_sin = self.t_cos.to(dev), self.t_sin.to(dev)
        self.s_cos, self.s_sin = self.s_cos.to(dev), self.s_sin.to(dev)
        self._t_cos32, self._t_sin32 = self.t_cos.float(), self.t_sin.float()

    # -- processors ------------------------------------------------------------------------------

    def install(self) -> CausalWanRunner:
        """Put the cache processors on every block's ``attn1``/``attn2`` (stock ones saved)."""
        if self._saved is not None:
            return self
        blocks = self.transformer.blocks
        self._saved = [(b.attn1.processor, b.attn2.processor) for b in blocks]
        for i, b in enumerate(blocks):
            b.attn1.set_processor(_SelfAttnProcessor(self, i))
            b.attn2.set_processor(_CrossAttnProcessor(self, i))
        return self

    def restore(self) -> None:
        """Give the blocks their saved processors back."""
        if self._saved is None:
            return
        for b, (p1, p2) in zip(self.transformer.blocks, self._saved):
            b.attn1.set_processor(p1)
            b.attn2.set_processor(p2)
        self._saved = None

    def __enter__(self) -> CausalWanRunner:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- prompt ------------------------------------------------------------------------------------

    def set_prompt(self, prompt_embeds: torch.Tensor) -> None:
        """Use ``prompt_embeds (B, L, text_dim)`` (the text encoder's output) from now on.

        The text projection runs once here; each layer's cross-attention K/V is computed on
        the next forward and kept until the next ``set_prompt`` (per-prompt cache).
        """
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != self.batch:
            raise ValueError(f"prompt_embeds must be ({self.batch}, tokens, text_dim), got {tuple(prompt_embeds.shape)}.")
        emb = self.transformer.condition_embedder.text_embedder
        with torch.no_grad():
            self._text = emb(prompt_embeds.to(self.device, self.dtype))
        self.cross_kv = [None] * len(self.cross_kv)

    # -- forward ------------------------------------------------------------------------------------

    def _time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame ``temb (B, F, dim)`` and ``proj (B, F, 6, dim)`` from ``t (B, F)``; same math as stock."""
        ce = self.transformer.condition_embedder
        b, f = t.shape
        proj_in = ce.timesteps_proj(t.flatten())
        te_dtype = next(iter(ce.time_embedder.parameters())).dtype
        if proj_in.dtype != te_dtype and te_dtype != torch.int8:
            proj_in = proj_in.to(te_dtype)
        temb = ce.time_embedder(proj_in).type_as(self._text)
        proj = ce.time_proj(ce.act_fn(temb))
        return temb.view(b, f, -1), proj.view(b, f, 6, -1)

    def _plan(self, frames: list[int], mode: Mode, keep_sink: bool) -> None:
        cfg = self.config
        span = cfg.span_frames or cfg.cache_frames
        ctx = self.cache.context(
            frames, span=span, use_sink=cfg.sink_frames > 0 and (mode != "recache" or keep_sink),
            positions=cfg.positions, anchor_sink=mode == "recache" and not keep_sink and cfg.sink_frames > 0,
        )
        dev, tpf, st = self.device, self.tokens_per_frame, self._step
        qpos = torch.as_tensor(ctx.query_pos, device=dev)
        if int(qpos.max()) >= self.t_cos.shape[0] or max(ctx.key_pos) >= self.t_cos.shape[0]:
            raise ValueError(
                f"frame position {max(max(ctx.key_pos), int(qpos.max()))} is past the RoPE table "
                f"({self.t_cos.shape[0]} positions); use positions='relative' for longer videos."
            )
        # query tables (Fq*T, D): temporal at the frame's position times spatial (disjoint dims)
        tq_c = self.t_cos[qpos].repeat_interleave(tpf, 0)
        tq_s = self.t_sin[qpos].repeat_interleave(tpf, 0)
        s_c, s_s = self.s_cos.repeat(len(frames), 1), self.s_sin.repeat(len(frames), 1)
        t_dim = self.transformer.rope.t_dim
        st.q_cos = torch.cat([tq_c[:, :t_dim], s_c[:, t_dim:]], 1)[None, :, None]
        st.q_sin = torch.cat([tq_s[:, :t_dim], s_s[:, t_dim:]], 1)[None, :, None]
        st.k_cos, st.k_sin = s_c[None, :, None], s_s[None, :, None]
        st.t_cos, st.t_sin = self._t_cos32, self._t_sin32
        st.write_rows = self.cache.rows(ctx.write_slots)
        if ctx.extra_writes:
            st.extra_rows = self.cache.rows([s for s, _ in ctx.extra_writes])
            src = torch.as_tensor([i for _, i in ctx.extra_writes], device=dev)
            st.extra_src = (src[:, None] * tpf + torch.arange(tpf, device=dev)).flatten()
        else:
            st.extra_rows = st.extra_src = None
        st.read_slots = torch.as_tensor(ctx.read_slots, dtype=torch.int32, device=dev)
        st.key_pos = torch.as_tensor(ctx.key_pos, dtype=torch.int32, device=dev)
        self.last_context = ctx

    @torch.no_grad()
    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float, frames: list[int] | range,
                mode: Mode = "denoise", *, keep_sink: bool = True) -> torch.Tensor:
        """One block-causal forward over consecutive latent frames.

        Args:
            latents: ``(B, C, F, H, W)`` latents of the frames ``frames``.
            timesteps: ``(B, F)`` or ``(F,)`` per-frame timesteps in [0, 1000], or one number.
            frames: absolute latent frame indices of the ``F`` frames (consecutive).
            mode: ``"denoise"`` (K/V written transiently), ``"commit"`` (clean K/V kept as
                context) or ``"recache"`` (like commit, under the current prompt; with
                ``keep_sink=False`` the first frames also become the new sink).
            keep_sink: recache only: keep and attend the old sink (LongLive ``global_sink``).

        Returns:
            The flow prediction ``(B, C, F, H, W)`` (v = noise - x0).
        """
        if self._saved is None:
            raise ValueError("the runner's processors are not installed; use `with runner:` or runner.install().")
        if self._text is None:
            raise ValueError("no prompt: call runner.set_prompt(prompt_embeds) first.")
        frames = list(frames)
        b, c, nf, h, w = latents.shape
        if (b, h, w) != (self.batch, self.height, self.width) or nf != len(frames):
            raise ValueError(
                f"latents {tuple(latents.shape)} do not match batch={self.batch}, {len(frames)} frames, "
                f"{self.height}x{self.width} latent pixels."
            )
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=self.device)
        t = t.expand(b, nf) if t.dim() < 2 else t
        if t.shape != (b, nf):
            raise ValueError(f"timesteps must be a number, ({nf},) or ({b}, {nf}); got {tuple(t.shape)}.")
        self._plan(frames, mode, keep_sink)
        model = self.transformer
        x = model.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2).contiguous()
        temb, proj = self._time(t)
        tpf = self.tokens_per_frame
        for block in model.blocks:
            x = _block(block, x, self._text, proj, nf, tpf)
        # head: per-frame shift/scale, as stock's per-sample one
        shift, scale = (model.scale_shift_table[None].to(temb.device) + temb[:, :, None]).chunk(2, dim=2)
        x = (model.norm_out(x.float()).view(b, nf, tpf, -1) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = model.proj_out(x)
        p_t, p_h, p_w = model.config.patch_size
        x = x.reshape(b, nf, self.hp, self.wp, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        self.cache.mark(self.last_context, frames, clean=mode != "denoise")
        return out


def _block(block, x: torch.Tensor, text: torch.Tensor, proj: torch.Tensor, nf: int, tpf: int) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with per-frame modulation ``proj (B, F, 6, dim)``."""
    b = x.shape[0]
    mod = (block.scale_shift_table[None] + proj.float()).unbind(2)  # 6 x (B, F, dim)
    shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, None] for m in mod)  # (B, F, 1, dim)

    def frames(t: torch.Tensor) -> torch.Tensor:  # (B, F*T, dim) -> (B, F, T, dim), a view
        return t.view(b, nf, tpf, -1)

    norm = (frames(block.norm1(x.float())) * (1 + scale) + shift).flatten(1, 2).type_as(x)
    attn = block.attn1(norm, None, None, None)
    x = (frames(x.float()) + frames(attn) * gate).flatten(1, 2).type_as(x)
    norm = block.norm2(x.float()).type_as(x)
    x = x + block.attn2(norm, text, None, None)
    norm = (frames(block.norm3(x.float())) * (1 + c_scale) + c_shift).flatten(1, 2).type_as(x)
    ff = block.ffn(norm)
    return (frames(x.float()) + frames(ff.float()) * c_gate).flatten(1, 2).type_as(x)
