"""shapes-wan training semantics: noise-level patterns, and the causal training forward
attends exactly what the long-video runner attends at inference."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from gen.pipelines.ar.runner import CausalWanRunner, RunnerConfig
from gen.pipelines.shapes.config import CausalTrain
from gen.pipelines.shapes.train import (
    _MaskedSelfAttn,
    block_causal_mask,
    chunk_levels,
    shifted_sigmas,
)

H = W = 8  # latent pixels: 16 tokens per frame
TPF = 16


def _transformer():
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    ).eval()


def _masked_forward(model, x, t_frames, text, block_of_frame):
    """The training forward: stock model, per-token timesteps, attention by block ids."""
    blk = block_of_frame.repeat_interleave(TPF)
    proc = _MaskedSelfAttn()
    proc.mask = (blk[None, :] <= blk[:, None])[None, None]
    saved = [b.attn1.processor for b in model.blocks]
    for b in model.blocks:
        b.attn1.set_processor(proc)
    try:
        with torch.no_grad():
            return model(x, t_frames.repeat_interleave(TPF)[None], text, return_dict=False)[0]
    finally:
        for b, p in zip(model.blocks, saved):
            b.attn1.set_processor(p)


def test_chunk_levels_follow_their_patterns(seed):
    gen = torch.Generator().manual_seed(seed)
    n, b = 5, 400
    for kind, mix in (("independent", (1, 0, 0)), ("clean", (0, 1, 0)), ("rolling", (0, 0, 1))):
        cfg = CausalTrain(mix=mix, rolling_chunks=3)
        sink = torch.rand(b, generator=gen) < 0.5
        sig, block = chunk_levels(n, b, cfg, gen, sink)
        assert sig.shape == block.shape == (b, n) and (sig >= 0).all() and (sig <= 1).all()
        assert (sig[sink, 0] == 0).all()  # a sink is clean context
        if kind == "independent":
            assert (sig[~sink] > 0).all() and torch.equal(block, torch.arange(n).expand(b, n))
        for row, blk in zip(sig, block):
            k = int((row == 0).sum())
            assert (row[:k] == 0).all()  # clean chunks come first
            if kind == "rolling":
                run = row[k : k + 3]
                assert torch.equal(run, run.sort().values)  # the oldest is the least noisy
                assert (blk[k : k + 3] == k).all() and torch.equal(blk[k + 3 :], torch.arange(k + 3, n))
    # the shifted levels are the scheduler's: s*u / (1 + (s-1) u)
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shifted_sigmas(u, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))


def test_block_causal_mask_matches_block_ids():
    m = block_causal_mask(6, 2, 3)[0, 0]
    blk = torch.tensor([0, 0, 0, 1, 1, 1]).repeat_interleave(2)
    assert torch.equal(m, blk[None, :] <= blk[:, None])


def test_training_forward_equals_the_runner_on_clean_context(seed):
    """A window [clean chunk | noisy chunk] under the training mask predicts, for the noisy
    chunk, what the runner predicts after committing the clean chunk (the chunk schedules)."""
    model = _transformer()
    text = torch.randn(1, 512, 32)
    x = torch.randn(1, 16, 6, H, W)
    t = 700.0
    ref = _masked_forward(model, x, torch.tensor([0.0] * 3 + [t] * 3), text, torch.arange(6) // 3)
    with CausalWanRunner(model, RunnerConfig(cache_frames=6), batch=1, height=H, width=W) as runner:
        runner.set_prompt(text)
        runner.forward(x[:, :, :3], 0.0, range(3), "commit")
        got = runner.forward(x[:, :, 3:], t, range(3, 6), "denoise")
    assert torch.allclose(got, ref[:, :, 3:], atol=1e-4, rtol=1e-4), (got - ref[:, :, 3:]).abs().max()


def test_training_forward_equals_the_runner_on_a_rolling_window(seed):
    """[clean chunk | two chunks at rising levels attending each other] under the training
    mask = the runner's one forward over a 2-chunk window after a commit (the rolling schedule)."""
    model = _transformer()
    text = torch.randn(1, 512, 32)
    x = torch.randn(1, 16, 9, H, W)
    t_frames = torch.tensor([0.0] * 3 + [400.0] * 3 + [900.0] * 3)
    ref = _masked_forward(model, x, t_frames, text, torch.tensor([0] * 3 + [1] * 6))
    with CausalWanRunner(model, RunnerConfig(cache_frames=9), batch=1, height=H, width=W) as runner:
        runner.set_prompt(text)
        runner.forward(x[:, :, :3], 0.0, range(3), "commit")
        got = runner.forward(x[:, :, 3:], t_frames[3:], range(3, 9), "denoise")
    assert torch.allclose(got, ref[:, :, 3:], atol=1e-4, rtol=1e-4), (got - ref[:, :, 3:]).abs().max()


def test_text_encoder_starts_reading_the_neighbouring_words(seed):
    """``DitTrain.text_local_heads``: at step 0, heads 0 / 1 / 2 of every layer look at the
    next / previous / same token (a colour word carries the word after it)."""
    from gen.pipelines.shapes.config import DitTrain
    from gen.pipelines.shapes.train import build_components

    parts = build_components(seed % 1000, DitTrain(text_local_heads=4.0))
    tok, te = parts["tokenizer"], parts["text_encoder"]
    enc = tok(["a white triangle on a green background"], return_tensors="pt")
    n = int(enc.attention_mask.sum())
    with torch.no_grad():
        out = te(enc.input_ids, enc.attention_mask, output_attentions=True)
    rows = torch.arange(1, n - 1)
    for layer in out.attentions:  # (1, heads, n, n)
        best = layer[0].argmax(-1)
        assert torch.equal(best[0, rows], rows + 1)
        assert torch.equal(best[1, rows], rows - 1)
        assert torch.equal(best[2, rows], rows)


def test_zero_text_rows_stay_zero_keys_through_training(seed):
    """``DitTrain.null_padding``: the pipeline's zero text rows are a zero key in every
    cross-attention at the start, after text-to-video training and after causal training
    (the biases that decide it are not trained); everything else trains."""
    import numpy as np

    from gen.pipelines.shapes.config import DitTrain, TrainConfig
    from gen.pipelines.shapes.data import LatentSet
    from gen.pipelines.shapes.grammar import sample_caption
    from gen.pipelines.shapes.train import (
        build_components,
        padding_parameters,
        train_causal,
        train_t2v,
    )

    def padding_keys(tr):
        zero = torch.zeros(1, 3, tr.config.text_dim)
        with torch.no_grad():
            rows = tr.condition_embedder.text_embedder(zero)
            return [b.attn2.norm_k(b.attn2.to_k(rows)) for b in tr.blocks]

    cfg = TrainConfig(dit=DitTrain(clips=4, image_steps=2, image_batch=2, steps=2, batch=2, warmup=1, text_len=32,
                                   null_padding=1.7),
                      causal=CausalTrain(window_frames=6, chunk_frames=3, rolling_chunks=2, steps=2, batch=2, warmup=1))
    parts = build_components(seed % 1000, cfg.dit)
    tr = parts["transformer"]
    assert all(bool((k == 0).all()) for k in padding_keys(tr))
    assert all(torch.allclose(b.attn2.norm_q.weight, torch.tensor(1.7)) for b in tr.blocks)
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    for frames, train in ((2, train_t2v), (10, train_causal)):
        data = LatentSet(torch.randn(4, 16, frames, 4, 4, generator=gen), [sample_caption(rng) for _ in range(4)])
        train(tr, parts["text_encoder"], parts["tokenizer"], data, cfg, device=torch.device("cpu"), progress=False)
        assert all(bool((p == 0).all()) for p in padding_parameters(tr))
        assert all(bool((k == 0).all()) for k in padding_keys(tr))
    after = tr.state_dict()
    assert not torch.equal(before["blocks.0.attn2.to_q.weight"], after["blocks.0.attn2.to_q.weight"])
    assert not torch.equal(before["condition_embedder.text_embedder.linear_1.weight"],
                           after["condition_embedder.text_embedder.linear_1.weight"])

    # the stock init keeps its random biases and trains them
    stock = build_components(seed % 1000, DitTrain(null_padding=None))["transformer"]
    assert not all(bool((k == 0).all()) for k in padding_keys(stock))


def _self_attention_weights(transformer, latents, timestep, text):
    """Block 0's self-attention weights ``(heads, tokens, tokens)`` for one clip, from the
    query and key the real forward computes (hooked after their RMSNorms), turned by the
    forward's own RoPE tables (diffusers' interleaved pairs)."""
    got = {}
    attn = transformer.blocks[0].attn1
    hooks = [attn.norm_q.register_forward_hook(lambda m, i, o: got.setdefault("q", o)),
             attn.norm_k.register_forward_hook(lambda m, i, o: got.setdefault("k", o)),
             transformer.rope.register_forward_hook(lambda m, i, o: got.setdefault("rope", o))]
    try:
        with torch.no_grad():
            transformer(latents, timestep, text, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    cos, sin = got["rope"]  # (1, tokens, 1, head_dim)

    def turn(x):
        x = x.unflatten(2, (attn.heads, -1)).double()
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2].double(), sin[..., 1::2].double()
        return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)

    q, k = turn(got["q"])[0], turn(got["k"])[0]  # (tokens, heads, head_dim)
    return torch.einsum("qhd,khd->hqk", q, k).div(q.shape[-1] ** 0.5).softmax(-1)


def test_video_local_heads_start_local_and_touch_nothing_else(seed):
    """``DitTrain.video_local_heads``: at step 0, head 0 of block 0 puts most of an inner
    token's weight on its 3x3x3 neighbourhood and head 1 on its 3x3 spatial neighbourhood
    in any frame, where the stock init spreads it near uniformly; only the chosen query/key
    rows differ from the stock init drawn from the same seed."""
    from gen.pipelines.shapes.config import DitTrain
    from gen.pipelines.shapes.train import build_components

    local = build_components(seed % 1000, DitTrain(video_local_heads=1.0))["transformer"]
    stock = build_components(seed % 1000, DitTrain(video_local_heads=None))["transformer"]
    gen = torch.Generator().manual_seed(seed)
    frames, side = 5, 8  # latent 5 x 16 x 16 -> 5 x 8 x 8 tokens, the shipped clip size
    latents = torch.randn(1, 16, frames, 2 * side, 2 * side, generator=gen)
    timestep = torch.rand(1, generator=gen) * 1000
    text = torch.randn(1, 12, local.config.text_dim, generator=gen)
    t, y, x = torch.meshgrid(torch.arange(frames), torch.arange(side), torch.arange(side), indexing="ij")
    t, y, x = t.flatten(), y.flatten(), x.flatten()
    inner = ((t > 0) & (t < frames - 1) & (y > 0) & (y < side - 1) & (x > 0) & (x < side - 1)).nonzero().flatten()
    near_space = ((y[:, None] - y[None]).abs() <= 1) & ((x[:, None] - x[None]).abs() <= 1)
    near_all = near_space & ((t[:, None] - t[None]).abs() <= 1)

    def shares(model):
        w = _self_attention_weights(model, latents, timestep, text)
        return ((w[0] * near_all).sum(-1)[inner].mean().item(), (w[1] * near_space).sum(-1)[inner].mean().item())

    local_all, local_space = shares(local)
    stock_all, stock_space = shares(stock)
    # uniform attention would give 27 / 320 = 8% and 45 / 320 = 14%
    assert local_all > 0.5 and local_space > 0.5, (local_all, local_space)
    assert stock_all < 0.25 and stock_space < 0.3, (stock_all, stock_space)

    changed = {name for name, p in local.state_dict().items() if not torch.equal(p, stock.state_dict()[name])}
    assert changed == {f"blocks.{i}.attn1.{m}.{p}" for i in range(len(local.blocks))
                       for m in ("to_q", "to_k", "norm_q", "norm_k") for p in ("weight", "bias")
                       if not (m.startswith("norm") and p == "bias")}
    rows = local.blocks[0].attn1.to_q.weight.ne(stock.blocks[0].attn1.to_q.weight).any(-1).nonzero().flatten()
    head_dim = local.config.attention_head_dim
    assert set((rows // head_dim).tolist()) == {0, 1} and len(rows) == 9


def test_video_local_heads_refuse_a_transformer_without_room():
    from gen.pipelines.shapes.train import _local_video_init

    small = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=8, freq_dim=8, ffn_dim=16, num_layers=1)
    with pytest.raises(ValueError, match="video_local_heads needs"):
        _local_video_init(small, 1.0)


def test_first_frame_context_gives_the_first_frame_clean(seed):
    """``DitTrain.first_frame_context``: the chosen share of a batch gets its first latent
    frame at level 0 (per-token timestep 0, loss weight 0), every other frame keeps the
    sample's level; the weighted loss is the plain error over the frames left noised; in
    ``train_t2v`` the clip phase (only) calls the transformer with those per-token levels."""
    import dataclasses

    import numpy as np

    from gen.pipelines.shapes.config import DitTrain, TrainConfig
    from gen.pipelines.shapes.data import LatentSet
    from gen.pipelines.shapes.grammar import sample_caption
    from gen.pipelines.shapes.train import (
        _first_frame_context,
        build_components,
        flow_loss,
        train_t2v,
    )

    gen = torch.Generator().manual_seed(seed)
    b, t, h, w = 200, 5, 8, 6
    sigma = torch.rand(b, generator=gen) * 0.98 + 0.01
    s, timestep, weight = _first_frame_context(sigma, torch.Size((b, 16, t, h, w)), 0.5, gen, (1, 2, 2))
    tokens = (h // 2) * (w // 2)
    assert s.shape == (b, 1, t, 1, 1) and timestep.shape == (b, t * tokens) and weight.shape == (b, t)
    given = s[:, 0, 0, 0, 0] == 0
    assert 40 < int(given.sum()) < 160  # a binomial(200, 0.5) draw: outside has probability < 1e-16
    levels = torch.where(given[:, None], torch.cat([torch.zeros(b, 1), sigma[:, None].repeat(1, t - 1)], 1),
                         sigma[:, None].repeat(1, t))
    assert torch.equal(s[:, 0, :, 0, 0], levels)
    assert torch.equal(timestep, (levels * 1000).repeat_interleave(tokens, 1))
    assert torch.equal(weight, (~given[:, None] | (torch.arange(t) > 0)[None]).float())
    none = _first_frame_context(sigma, torch.Size((b, 16, t, h, w)), 0.0, gen, (1, 2, 2))
    assert torch.equal(none[0][:, 0, :, 0, 0], sigma[:, None].repeat(1, t))

    pred, noise, x0 = (torch.randn(b, 16, t, h, w, generator=gen, dtype=torch.float64) for _ in range(3))
    err = (pred - (noise - x0)) ** 2
    keep = weight.bool()[:, None, :, None, None].expand_as(err)
    assert torch.allclose(flow_loss(pred, noise, x0, weight.double()), err[keep].mean())

    cfg = TrainConfig(dit=DitTrain(clips=4, image_steps=1, image_batch=2, steps=3, batch=2, warmup=1, text_len=32,
                                   first_frame_context=1.0))
    parts = build_components(seed % 1000, cfg.dit)
    tr = parts["transformer"]
    seen = []
    tr.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    rng = np.random.default_rng(seed)
    data = LatentSet(torch.randn(4, 16, 3, 4, 4, generator=gen), [sample_caption(rng) for _ in range(4)])
    train_t2v(tr, parts["text_encoder"], parts["tokenizer"], data, cfg, device=torch.device("cpu"), progress=False)
    assert seen[0].ndim == 1  # the first-frame phase: one level per sample
    for ts in seen[1:]:
        assert ts.shape == (2, 3 * 4) and bool((ts[:, :4] == 0).all()) and bool((ts[:, 4:] > 0).all())

    both = TrainConfig(dit=dataclasses.replace(cfg.dit, frame_difference=1.0))
    with pytest.raises(ValueError, match="cannot be combined"):
        train_t2v(tr, parts["text_encoder"], parts["tokenizer"], data, both, device=torch.device("cpu"), progress=False)
