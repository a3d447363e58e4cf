"""The steer start (``gen.pipelines.shapes.steer``): the caption's motion word wired to a
self-attention head that looks one token against the motion in the previous latent frame."""

import copy

import numpy as np
import pytest
import torch

from gen.pipelines.shapes.config import DitTrain
from gen.pipelines.shapes.probe import ProbeConfig, _cross_attention, _Model, bump_clips, run_probe
from gen.pipelines.shapes.steer import (
    AXES,
    MOTIONS,
    STEERED_HEAD,
    STEPS,
    WRITER_HEAD,
    WriterGuard,
    _block_inputs,
    _output_map,
    _probe_inputs,
    _run,
    _self_attention,
    _writer_slice,
    previous_frame_offsets,
    steer_start,
    writer_scores,
)
from gen.pipelines.shapes.train import _Ema

LOCAL = DitTrain(video_local_heads=1.0)


_BUILT: dict = {}


def _built(seed: int, steer: bool = True) -> tuple[ProbeConfig, _Model]:
    """The probe model of weight seed ``seed`` with (or without) the steer start, built once
    per module (a start takes 34 forwards of 24 clips); tests that change it take a copy."""
    if (seed, steer) not in _BUILT:
        cfg = ProbeConfig(steer_start=steer, seed=seed, dit=LOCAL)
        _BUILT[seed, steer] = (cfg, _Model(cfg))
    return _BUILT[seed, steer]


@pytest.fixture(scope="module", params=[0, 17])
def steered(request):
    # Fixed weight seeds: the start is built from step-0 activations and is not good on every
    # seed (seed 1 writes one caption in 24 of each motion on the wrong side; an earlier,
    # horizontal-only start built on one unrecorded seed of 0-999 read the motion word in 3
    # of 6 captions). The clips and captions the checks are measured on are fresh.
    return _built(request.param)


@pytest.mark.parametrize("axis,pos,neg", [("x", "right", "left"), ("y", "down", "up")])
def test_steered_heads_look_against_the_captions_motion_in_the_previous_frame(steered, axis, pos, neg):
    cfg, model = steered
    ahead = previous_frame_offsets(model, cfg, pos, axis=axis)
    back = previous_frame_offsets(model, cfg, neg, axis=axis)
    for r, lt in zip(ahead[1:], back[1:]):
        # moving right (down): the bump came from one token to the left (above), and vice versa
        assert r[-1] > 5 * r[1] and r[-1] > r[0]
        assert lt[1] > 5 * lt[-1] and lt[1] > lt[0]
    for other in ("still", "bouncing", *(m for m in ("right", "left", "down", "up") if m not in (pos, neg))):
        for r in previous_frame_offsets(model, cfg, other, axis=axis)[1:]:
            # still, and the other axis's words: no side of this axis preferred, straight back most
            # (measured 0.7-1.3; 0.2 and 16 for this axis's own words)
            assert 0.6 < r[-1] / r[1] < 1.6 and r[0] > max(r[-1], r[1]), other
    _, stock = _built(cfg.seed, steer=False)
    for r in previous_frame_offsets(stock, cfg, pos, axis=axis):
        assert 0.5 < r[-1] / r[1] < 2.0  # no side preferred without the start


def test_a_slower_start_looks_less_far(seed):
    # half a token a latent frame: the look leans the motion's way and stays mostly straight back
    cfg = ProbeConfig(steer_start=True, speed=1.0, seed=seed % 25, dit=LOCAL)
    model = _Model(cfg)
    for r in previous_frame_offsets(model, cfg, "right")[1:]:
        assert 2 * r[1] < r[-1] < r[0]


def test_the_output_map_is_least_squares_against_numpy(seed):
    g = torch.Generator().manual_seed(seed)
    outputs = torch.randn(40, 16, generator=g)
    steps = torch.tensor([STEPS[MOTIONS[i % len(MOTIONS)]] for i in range(40)])
    a, b = _output_map(outputs, steps, ridge=0.0)
    design = np.hstack([outputs.double().numpy(), np.ones((40, 1))])
    ref, *_ = np.linalg.lstsq(design, steps.double().numpy(), rcond=None)
    np.testing.assert_allclose(a.T.numpy(), ref[:16], atol=1e-4)
    np.testing.assert_allclose(b.numpy(), ref[16], atol=1e-4)


def test_the_writer_writes_each_fresh_captions_step(steered, seed):
    # block 1's self-attention input along the two written directions, in units of an axis's
    # half difference: fresh captions nearest their own step (measured on these weight seeds:
    # 24 of 24 per word over 8 draws; one "still" caption of 24 missed in one CI draw; seed 1,
    # not used here, misses one caption of 24 per word)
    cfg, model = steered
    axes = [_block_inputs(model, cfg, *pair)[1] for pair in AXES]
    cands = torch.tensor([STEPS[m] for m in ("left", "right", "up", "down", "still")])
    for motion in MOTIONS:
        x, texts, _ = _probe_inputs(model, cfg, motion, seed % 10**6)
        h = _run(model, x, texts, {("in", 1): model.transformer.blocks[1].attn1})[("in", 1)].mean(1)
        pos = torch.stack([(h @ e - mid) / half for e, half, mid in axes], 1)
        nearest = (pos[:, None] - cands[None]).norm(dim=2).argmin(1)
        assert int((cands[nearest] == torch.tensor(STEPS[motion])).all(1).sum()) >= 22, motion


def test_the_writer_head_reads_the_motion_word(steered, seed):
    cfg, model = steered
    clips, caps = bump_clips(np.random.default_rng(seed), 6, cfg)
    xt = 0.1 * clips + 0.9 * torch.randn(clips.shape)
    texts = [c.text() for c in caps]
    ids = model.tokenizer(texts).input_ids
    rows = [r.index(model.tokenizer.convert_tokens_to_ids(c.motion)) for r, c in zip(ids, caps)]
    weights = _cross_attention(model, xt, torch.full((6,), 0.9), texts)[0]["weights"]  # block 0
    on_word = torch.stack([weights[i, WRITER_HEAD, :, r].mean() for i, r in enumerate(rows)])
    # measured over 20 draws of 6 captions: mean 0.97-1.0 (weight seed 0), 0.67-1.0 (seed 17;
    # some captions give "moving" or "a" most of the head, which the writer's map allows for);
    # the stock head: ~0.03; the other heads at most 0.095
    assert float(on_word.mean()) > 0.5
    others = torch.stack([weights[i, h, :, r].mean() for i, r in enumerate(rows) for h in range(4) if h != WRITER_HEAD])
    assert float(others.max()) < 0.2


def test_self_attention_weights_rebuild_the_blocks_self_attention_output(steered):
    cfg, model = steered
    clips, caps = bump_clips(np.random.default_rng(), 2, cfg)
    xt = 0.1 * clips + 0.9 * torch.randn(clips.shape)
    texts = [c.text() for c in caps]
    got = {}
    hooks = []
    for i, b in enumerate(model.transformer.blocks):
        hooks += [b.attn1.to_v.register_forward_hook(lambda m, a, o, i=i: got.setdefault(("v", i), o.detach())),
                  b.attn1.register_forward_hook(lambda m, a, o, i=i: got.setdefault(("out", i), o.detach()))]
    try:
        weights = _self_attention(model, xt, texts)
    finally:
        for h in hooks:
            h.remove()
    for i, (w, b) in enumerate(zip(weights, model.transformer.blocks)):
        v = got[("v", i)].double().unflatten(-1, (4, -1)).transpose(1, 2)  # (B, heads, tokens, dim)
        mixed = (w @ v).transpose(1, 2).flatten(2)
        out = torch.nn.functional.linear(mixed, b.attn1.to_out[0].weight.double(), b.attn1.to_out[0].bias.double())
        torch.testing.assert_close(out, got[("out", i)].double(), rtol=1e-4, atol=1e-4)
    assert STEERED_HEAD < 4


def test_writer_scores_agree_with_the_cross_attention_weights(steered, seed):
    cfg, model = steered
    score, share = writer_scores(model, cfg, seed=1000 + seed % 10**6)
    assert 10.0 < score < 12.0  # built to score 11 on other clips of the same captions
    # the share recomputed from the scores and the padding count, against the processor's weights
    clips, caps = bump_clips(np.random.default_rng(seed), 4, cfg)
    xt = 0.1 * clips + 0.9 * torch.randn(clips.shape)
    texts = [c.text() for c in caps]
    ids = model.tokenizer(texts).input_ids
    rows = [r.index(model.tokenizer.convert_tokens_to_ids(c.motion)) for r, c in zip(ids, caps)]
    weights = _cross_attention(model, xt, torch.full((4,), 0.9), texts)[0]["weights"]
    assert 0.0 < share <= 1.0
    attn = model.transformer.blocks[0].attn2
    sl = _writer_slice(attn)
    hd = sl.stop - sl.start

    rec = _run(model, xt, texts, {"k": attn.norm_k, "q": attn.norm_q})
    for i, (r, j) in enumerate(zip(ids, rows)):
        s = (rec["q"][i, :, sl].double() @ rec["k"][i, : len(r), sl].double().T) / hd**0.5
        pad = torch.full((s.shape[0], 1), float(np.log(cfg.dit.text_len - len(r))), dtype=torch.float64)
        mine = (s[:, j] - torch.cat([s, pad], 1).logsumexp(1)).exp()
        torch.testing.assert_close(mine, weights[i, WRITER_HEAD, :, j].double(), atol=1e-4, rtol=1e-3)


def test_writer_guard_restores_the_writer_and_its_score(seed):
    cfg, model = _built(0)
    model = copy.deepcopy(model)
    attn = model.transformer.blocks[0].attn2
    guard = WriterGuard(model, cfg, every=1)
    ema = _Ema([model.transformer, model.text_encoder], 0.99)
    sl = guard.sl
    hd = sl.stop - sl.start
    before = {n: p.detach().clone() for n, p in attn.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # what training does to the writer: the other heads' keys grow (the shared key norm
        # then shrinks the writer's key: its score falls), and its own rows move
        attn.to_k.weight[: sl.start] *= 1.3
        fell, _ = writer_scores(model, cfg)
        assert fell < 0.95 * guard.target
        attn.to_q.bias[sl] += 0.1 * torch.randn(hd, generator=g)
        attn.to_out[0].weight[:, sl] += 0.1 * torch.randn(attn.to_out[0].weight.shape[0], hd, generator=g)
    guard(ema)
    after = dict(attn.named_parameters())
    for name in ("to_q.weight", "to_q.bias", "to_k.weight", "to_v.weight"):
        torch.testing.assert_close(after[name][sl], before[name][sl], atol=0, rtol=0)
    torch.testing.assert_close(after["to_out.0.weight"][:, sl], before["to_out.0.weight"][:, sl], atol=0, rtol=0)
    assert not torch.equal(after["to_k.weight"][: sl.start], before["to_k.weight"][: sl.start])  # others train
    score, _ = writer_scores(model, cfg)
    assert abs(score - guard.target) < 1e-3 * guard.target  # q . k is linear in each norm's weights
    assert guard.last_scale > 1.0
    shadow = {id(p): s for p, s in zip(ema.params, ema.shadow)}
    torch.testing.assert_close(shadow[id(attn.norm_k.weight)][sl], attn.norm_k.weight[sl].detach())
    torch.testing.assert_close(shadow[id(attn.to_out[0].weight)][:, sl], before["to_out.0.weight"][:, sl])


def test_writer_guard_takes_the_writer_out_of_the_gradient_not_the_forward(seed):
    cfg, model = _built(0)
    model = copy.deepcopy(model)
    attn = model.transformer.blocks[0].attn2
    clips, caps = bump_clips(np.random.default_rng(seed), 3, cfg)
    xt, texts = 0.1 * clips + 0.9 * torch.randn(clips.shape), [c.text() for c in caps]
    mods = {"q": attn.norm_q, "k": attn.norm_k, "v": attn.to_v}

    def forward():
        """The prediction, and each module's output as the next module receives it (a hook
        registered last sees what the guard's hooks hand on)."""
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, o)) for n, m in mods.items()]
        try:
            return model.predict(xt, torch.full((3,), 0.9), texts), seen
        finally:
            for h in hooks:
                h.remove()

    params = [p for m in (model.transformer, model.text_encoder) for p in m.parameters() if p.requires_grad]

    def reaches(out: torch.Tensor) -> bool:
        grads = torch.autograd.grad(out.sum(), params, allow_unused=True, retain_graph=True)
        return any(g is not None and bool(g.abs().sum() > 0) for g in grads)

    plain, seen = forward()
    guard = WriterGuard(model, cfg)
    sl = guard.sl
    assert all(reaches(out[..., sl]) for out in seen.values())
    guarded, seen = forward()
    torch.testing.assert_close(guarded, plain, atol=0, rtol=0)
    for name, out in seen.items():  # the writer's slice detached, the other heads' with gradients
        assert not reaches(out[..., sl]) and reaches(out[..., : sl.start]), name
    guard.remove()
    _, seen = forward()
    assert all(reaches(out[..., sl]) for out in seen.values())


def test_refused_where_it_cannot_be_built():
    with pytest.raises(ValueError, match="speed below 3.14"):
        ProbeConfig(speed=3.2, steer_start=True)
    with pytest.raises(ValueError, match="axis must be"):
        previous_frame_offsets(None, ProbeConfig(), "right", axis="z")
    with pytest.raises(ValueError, match="needs steer_start"):
        ProbeConfig(motions=("left", "right"), guard_writer=True)
    cfg, model = _built(0, steer=False)
    with pytest.raises(ValueError, match="step must be in"):
        steer_start(model, cfg, step=2.0)
    model = copy.deepcopy(model)
    model.transformer.blocks = model.transformer.blocks[:1]
    with pytest.raises(ValueError, match="at least 2 blocks"):
        steer_start(model, cfg)


def test_a_short_run_from_the_steer_start(seed):
    cfg = ProbeConfig(steps=1, batch=2, eval_every=1, eval_clips=2, eval_steps=2, levels=(0.7,),
                      motions=("left", "right"), steer_start=True, guard_writer=True, train_text=False,
                      seed=seed % 1000)
    log = run_probe(cfg, progress=False)
    assert log[-1]["step"] == 1 and np.isfinite(log[-1]["loss"])
    assert 0.0 < log[-1]["writer"]["share"] <= 1.0


def _all_motions_set(gen, rng, frames=5, side=8):
    from gen.pipelines.shapes.data import LatentSet
    from gen.pipelines.shapes.grammar import Caption, sample_caption

    caps = [sample_caption(rng) for _ in range(12)]
    caps = [Caption(c.shape, c.color, m, c.background) for c, m in zip(caps, [*MOTIONS, *MOTIONS])]
    return LatentSet(torch.randn(12, 16, frames, side, side, generator=gen), caps)


def test_train_tiny_builds_the_start_at_the_clip_phase_and_holds_the_writers_path(seed, monkeypatch):
    import gen.pipelines.shapes.steer as steer
    from gen.pipelines.shapes.config import TrainConfig
    from gen.pipelines.shapes.train import build_components, train_t2v

    cfg = TrainConfig(seed=seed % 1000, dit=DitTrain(clips=12, image_steps=3, image_batch=2, steps=3, batch=2,
                                                     warmup=1, text_len=32, video_local_heads=1.0, steer_start=0.5))
    parts = build_components(cfg.seed, cfg.dit)
    tr, te = parts["transformer"], parts["text_encoder"]
    built = {}
    real = steer.steer_start

    def recording(view, c, **kw):
        # the first-frame phase has trained the text encoder; the start is built on its EMA
        built["before"] = {k: v.clone() for k, v in tr.state_dict().items()}
        real(view, c, **kw)
        built["kw"] = kw
        built["start"] = {k: v.clone() for k, v in tr.state_dict().items()}
        built["text"] = {k: v.clone() for k, v in te.state_dict().items()}

    monkeypatch.setattr(steer, "steer_start", recording)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    train_t2v(tr, te, parts["tokenizer"], _all_motions_set(gen, rng), cfg, device=torch.device("cpu"), progress=False)
    assert built["kw"] == {"step": 0.5}
    start, after = built["start"], tr.state_dict()
    held = [k for k in after if k.startswith(("condition_embedder.text_embedder.", "blocks.0.attn2."))]
    assert held and all(torch.equal(after[k], start[k]) for k in held)
    assert all(torch.equal(v, built["text"][k]) for k, v in te.state_dict().items())
    # the start rebuilt the writer and the steered heads; the clip phase trained from there
    for k in ("blocks.0.attn2.to_out.0.weight", "blocks.1.attn1.to_q.weight"):
        assert not torch.equal(built["before"][k], start[k]), k
    for k in ("blocks.1.attn1.to_q.weight", "blocks.0.attn1.to_k.weight", "proj_out.weight"):
        assert not torch.equal(after[k], start[k]), k


def test_train_tiny_refuses_the_start_without_clips_of_every_motion(seed):
    from gen.pipelines.shapes.config import TrainConfig, override_config
    from gen.pipelines.shapes.data import LatentSet
    from gen.pipelines.shapes.grammar import Caption
    from gen.pipelines.shapes.train import build_components, train_t2v

    cfg = TrainConfig(dit=DitTrain(clips=4, image_steps=1, image_batch=2, steps=1, batch=2, text_len=32,
                                   steer_start=0.5))
    parts = build_components(0, cfg.dit)
    caps = [Caption("circle", "red", m, "blue") for m in ("left", "right", "up", "still")]
    data = LatentSet(torch.randn(4, 16, 5, 8, 8, generator=torch.Generator().manual_seed(seed)), caps)
    with pytest.raises(ValueError, match="none of down, bouncing"):
        train_t2v(parts["transformer"], parts["text_encoder"], parts["tokenizer"], data, cfg,
                  device=torch.device("cpu"), progress=False)
    with pytest.raises(ValueError, match="between 0 and 1.57"):
        override_config(TrainConfig(), ["dit.steer_start=2"])
    assert override_config(TrainConfig(), ["dit.steer_start=0.56"]).dit.steer_start == 0.56


def test_causal_training_holds_the_writers_path_when_asked(seed):
    from gen.pipelines.shapes.config import CausalTrain, TrainConfig
    from gen.pipelines.shapes.data import LatentSet
    from gen.pipelines.shapes.grammar import sample_caption
    from gen.pipelines.shapes.train import build_components, train_causal

    cfg = TrainConfig(dit=DitTrain(text_len=32),
                      causal=CausalTrain(window_frames=6, chunk_frames=3, rolling_chunks=2, steps=2, batch=2, warmup=1))
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    data = LatentSet(torch.randn(4, 16, 10, 4, 4, generator=gen), [sample_caption(rng) for _ in range(4)])
    for hold in (True, False):
        parts = build_components(seed % 1000, cfg.dit)
        tr = parts["transformer"]
        before = {k: v.clone() for k, v in tr.state_dict().items()}
        train_causal(tr, parts["text_encoder"], parts["tokenizer"], data, cfg, device=torch.device("cpu"),
                     progress=False, hold_writer=hold)
        after = tr.state_dict()
        for k in ("condition_embedder.text_embedder.linear_1.weight", "blocks.0.attn2.to_v.weight"):
            assert torch.equal(after[k], before[k]) == hold, k
        assert not torch.equal(after["blocks.1.attn2.to_v.weight"], before["blocks.1.attn2.to_v.weight"])


def test_the_steered_heads_stay_sharp_on_a_model_with_larger_rows(seed):
    # a trained model's other heads have larger query / key rows (2x in the shipped
    # shapes-wan); the across-heads norms would shrink the steered head's rows with them
    cfg, stock = _built(0, steer=False)
    model = copy.deepcopy(stock)
    hd = model.transformer.config.attention_head_dim
    others = torch.ones(model.transformer.blocks[0].attn1.to_q.weight.shape[0], dtype=torch.bool)
    others[STEERED_HEAD * hd:(STEERED_HEAD + 1) * hd] = False
    with torch.no_grad():
        for block in model.transformer.blocks:
            for lin in (block.attn1.to_q, block.attn1.to_k):
                lin.weight[others] *= 1.5 + float(torch.rand(()))
                lin.bias[others] *= 2.0
    steer_start(model, cfg)
    for r in previous_frame_offsets(model, cfg, "right")[1:]:
        assert r[-1] > 5 * r[1] and r[-1] > r[0]
