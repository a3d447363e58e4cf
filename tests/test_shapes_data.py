"""shapes-wan data: grammar, procedural clips, tokenizer, vision scoring, training helpers."""

import numpy as np
import pytest
import torch

from gen.pipelines.shapes.clips import (
    ClipMotion,
    _sdf,
    render_clip,
    sample_clip,
    sample_motion,
    shape_extent,
)
from gen.pipelines.shapes.data import (
    clip_batch,
    encode_text,
    fast_vae_norms,
    latent_foreground,
    pixel_foreground,
)
from gen.pipelines.shapes.grammar import (
    MOTIONS,
    SHAPES,
    WORDS,
    Caption,
    CaptionError,
    parse_caption,
    sample_caption,
)
from gen.pipelines.shapes.tokenizer import build_shapes_tokenizer, shapes_vocabulary
from gen.pipelines.shapes.vision import read_clip, score_clip


def _u8(video):
    return (np.clip(video, 0, 1) * 255 + 0.5).astype(np.uint8)


def test_captions_round_trip_and_never_match_their_background(seed):
    rng = np.random.default_rng(seed)
    for _ in range(200):
        cap = sample_caption(rng)
        assert cap.color != cap.background
        assert parse_caption(cap.text()) == cap
        assert parse_caption(cap.text().upper() + ".") == cap
        short = parse_caption(cap.text(motion=False, background=False))
        assert (short.shape, short.color, short.motion, short.background) == (cap.shape, cap.color, None, None)


def test_caption_errors_name_the_problem():
    with pytest.raises(CaptionError, match="cat"):
        parse_caption("a red cat moving right")
    with pytest.raises(CaptionError, match="cannot read"):
        parse_caption("circle red a")
    with pytest.raises(CaptionError, match="both blue"):
        Caption("circle", "blue", "left", "blue")
    with pytest.raises(CaptionError, match="unknown shape"):
        Caption("hexagon", "red")


def test_clips_are_deterministic_and_stay_inside_the_frame(seed):
    rng = np.random.default_rng(seed)
    for motion in MOTIONS:
        cap = Caption(str(rng.choice(SHAPES)), "red", motion, "black")
        a = sample_clip(cap, seed, frames=17)
        assert np.array_equal(a, sample_clip(cap, seed, frames=17))
        assert a.shape == (17, 128, 128, 3) and a.dtype == np.float32
        m = sample_motion(cap, np.random.default_rng(seed), frames=17)
        xs, ys = m.centre(motion, np.arange(17))
        left, right, top, bottom = shape_extent(cap.shape, m.radius)
        assert (xs - left >= 0).all() and (xs + right <= 128).all()
        assert (ys - top >= 0).all() and (ys + bottom <= 128).all()
        # the background border is untouched: nothing was clipped at an edge
        for edge in (a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]):
            assert np.allclose(edge, a[0, 0, 0])


def test_shape_extent_is_the_drawn_shape():
    r = 20.0
    c = np.arange(-60, 60, 0.05) + 0.025
    px, py = np.meshgrid(c, c)
    for shape in SHAPES:
        inside = _sdf(shape, px, py, r) <= 0
        rows, cols = np.nonzero(inside.any(1))[0], np.nonzero(inside.any(0))[0]
        drawn = (-c[cols[0]], c[cols[-1]], -c[rows[0]], c[rows[-1]])  # left, right, top, bottom
        assert np.allclose(drawn, shape_extent(shape, r), atol=0.06), (shape, drawn)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_stays_whole_inside_the_frame_for_every_motion(shape):
    # the path of every motion keeps the shape's real extent inside the frame, over many
    # seeds and clip lengths (the speed of a long clip is reduced to fit)
    for motion in MOTIONS:
        cap = Caption(shape, "red", motion, "black")
        for frames, size in ((17, 128), (45, 128), (17, 64)):
            for seed in range(300):
                m = sample_motion(cap, np.random.default_rng(seed), frames=frames, size=size)
                xs, ys = m.centre(motion, np.arange(frames))
                left, right, top, bottom = shape_extent(shape, m.radius)
                assert (xs - left >= 1).all() and (xs + right <= size - 1).all(), (motion, frames, seed)
                assert (ys - top >= 1).all() and (ys + bottom <= size - 1).all(), (motion, frames, seed)
        # drawn: the border stays background and the shape keeps its area on every frame
        for seed in range(12):
            a = sample_clip(cap, seed, frames=17, size=64)
            for edge in (a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]):
                assert np.array_equal(edge, np.broadcast_to(a[0, 0, 0], edge.shape)), (motion, seed)
            area = a[..., 0].sum(axis=(1, 2))  # red channel: the shape's cover (black background)
            assert np.ptp(area) < 0.02 * area.mean(), (motion, seed)


def test_wrapping_clip_continues_across_calls_and_edges(seed):
    cap = Caption("square", "yellow", "right", "gray")
    m = sample_motion(cap, np.random.default_rng(seed), frames=93, wrap=True)
    whole = render_clip(cap, m, frames=93, wrap=True)
    tail = render_clip(cap, m, frames=13, wrap=True, start=80)
    assert np.array_equal(whole[80:], tail)
    # the same amount of yellow in every frame: the shape leaves one edge as it enters the other
    yellow = (whole[..., 2] < 0.3).sum(axis=(1, 2))
    assert yellow.min() > 0.95 * yellow.max()


def test_vision_reads_every_attribute_of_true_clips(seed):
    rng = np.random.default_rng(seed)
    for i in range(60):
        cap = sample_caption(rng)
        frames = _u8(sample_clip(cap, seed + i, frames=17))
        verdict = score_clip(frames, cap)
        assert all(v is True for v in verdict.values()), (cap, read_clip(frames))


def test_vision_says_no_to_the_wrong_caption(seed):
    rng = np.random.default_rng(seed)
    cap = Caption("circle", "red", "right", "blue")
    frames = _u8(sample_clip(cap, seed, frames=17))
    assert score_clip(frames, Caption("circle", "green", "right", "blue"))["color"] is False
    assert score_clip(frames, Caption("circle", "red", "left", "blue"))["motion"] is False
    assert score_clip(frames, Caption("circle", "red", "right", "gray"))["background"] is False
    assert score_clip(frames, Caption("square", "red", "right", "blue"))["shape"] is False
    noise = rng.integers(0, 256, size=frames.shape, dtype=np.uint8)
    assert score_clip(noise, cap)["color_and_motion"] is False
    with pytest.raises(ValueError, match="RGB"):
        read_clip(frames[..., :2])


def test_tokenizer_maps_the_grammar_and_nothing_else(tmp_path):
    tok = build_shapes_tokenizer()
    vocab = shapes_vocabulary()
    assert set(WORDS) | {"<pad>", "</s>", "<unk>"} == set(vocab)
    ids = tok("A Red circle, moving right!").input_ids
    assert ids == [vocab[w] for w in ("a", "red", "circle", "moving", "right")] + [vocab["</s>"]]
    assert tok("a purple dragon").input_ids == [vocab["a"], vocab["purple"], vocab["<unk>"], vocab["</s>"]]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "a white triangle bouncing on a green background"
    assert again(text).input_ids == tok(text).input_ids


def test_encode_text_is_the_pipelines_prompt_encoding(seed):
    from diffusers import WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from gen.pipelines.shapes.config import COMPONENTS

    enc = UMT5EncoderModel(UMT5Config(**COMPONENTS["text_encoder"])).eval()
    tok = build_shapes_tokenizer()
    pipe = WanPipeline(tokenizer=tok, text_encoder=enc, transformer=None, vae=None, scheduler=None)
    prompts = ["a red circle moving right on a blue background", "", "a green square"]
    ref = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)[0]
    with torch.no_grad():
        got = encode_text(tok, enc, prompts, text_len=512)
    assert got.shape == ref.shape == (3, 512, COMPONENTS["text_encoder"]["d_model"])
    # float32, the two encodings batch differently (summation order): up to 1.3e-6 apart
    # over 31 random encoders (values up to 3.4); a padding or mask mistake is O(1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_fast_vae_norms_compute_the_stock_function(seed):
    from diffusers import AutoencoderKLWan

    from gen.pipelines.shapes.config import COMPONENTS

    vae = AutoencoderKLWan(**COMPONENTS["vae"])
    x = clip_batch(seed, "test", range(2), frames=5, size=32).video
    with torch.no_grad():
        ref = vae.decode(vae.encode(x).latent_dist.mode()).sample
        with fast_vae_norms(vae):
            fast = vae.decode(vae.encode(x).latent_dist.mode()).sample
        again = vae.decode(vae.encode(x).latent_dist.mode()).sample  # restored
    assert torch.allclose(fast, ref, atol=1e-5)
    assert torch.equal(again, ref)
    # gradients too (the training path)
    x.requires_grad_(True)
    with fast_vae_norms(vae):
        g_fast = torch.autograd.grad(vae.encode(x).latent_dist.mean.square().sum(), x)[0]
    g_ref = torch.autograd.grad(vae.encode(x).latent_dist.mean.square().sum(), x)[0]
    # fp32 rounding of two summation orders: a per-element 1e-6 + 1e-4 |g| bound failed one
    # run, and came within 7e-9 of failing on one of 8 seeds (largest gradients 0.16-0.98)
    assert (g_fast - g_ref).abs().max() <= 1e-5 * g_ref.abs().max(), (g_fast - g_ref).abs().max()


def test_inflated_vae_init_is_a_per_frame_autoencoder(seed):
    from gen.pipelines.shapes.train import build_components

    vae = build_components(seed % 1000)["vae"].eval()
    video = clip_batch(seed, "test", range(1), frames=9, size=64).video
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
        last = vae.encode(video[:, :, 8:9]).latent_dist.mode()
        out = vae.decode(z).sample
    assert torch.allclose(z[:, :, 2], last[:, :, 0], atol=1e-5)  # a 4-frame latent codes its last frame
    assert torch.equal(out[:, :, 5:9], out[:, :, 8:9].expand_as(out[:, :, 5:9]))  # decoded into copies



def test_padded_text_attention_equals_the_stock_512_token_forward(seed):
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from gen.pipelines.shapes.config import COMPONENTS
    from gen.pipelines.shapes.data import PaddedTextAttention

    cfg = {**COMPONENTS["transformer"], "num_layers": 2}
    model = WanTransformer3DModel(**cfg).eval()
    enc = UMT5EncoderModel(UMT5Config(**COMPONENTS["text_encoder"])).eval()
    tok = build_shapes_tokenizer()
    prompts = ["a red circle moving right on a blue background", "", "a green square bouncing"]
    x, t = torch.randn(3, 16, 2, 8, 8), torch.rand(3) * 1000
    with torch.no_grad():
        ref = model(x, t, encode_text(tok, enc, prompts, text_len=512), return_dict=False)[0]
        short, lengths = encode_text(tok, enc, prompts, short=True)
        proc = PaddedTextAttention(512)
        proc.set_lengths(lengths, short.shape[1])
        saved = [b.attn2.processor for b in model.blocks]
        for b in model.blocks:
            b.attn2.set_processor(proc)
        got = model(x, t, short, return_dict=False)[0]
        for b, p in zip(model.blocks, saved):
            b.attn2.set_processor(p)
    assert short.shape[1] == int(lengths.max()) + 1 < 16
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (got - ref).abs().max()


def test_vision_reads_wrapping_long_clips(seed):
    rng = np.random.default_rng(seed)
    for i in range(20):
        cap = sample_caption(rng)
        frames = _u8(sample_clip(cap, seed + i, frames=45, wrap=True))
        verdict = score_clip(frames, cap, wrap=True)
        assert verdict["color"] and verdict["background"] and verdict["motion"], (cap, read_clip(frames, wrap=True))
        assert verdict["one_object"], (cap, read_clip(frames, wrap=True))


def test_vision_counts_the_objects_in_a_frame(seed):
    """Two copies of a clip side by side read as two objects; a shape cut in two by the
    frame edge is two regions of a plain frame but one object of a wrapping one; the
    speckle of a few pixels is not an object."""
    cap = Caption("circle", "red", "still", "blue")
    rng = np.random.default_rng(seed)
    motion = ClipMotion(x=float(rng.uniform(30, 34)), y=64.0, radius=20.0)
    one = render_clip(cap, motion, frames=5)
    two = np.concatenate([one[:, :, 32:96], one[:, :, 32:96]], axis=2)  # the circle twice, 64 px apart
    assert read_clip(_u8(one)).objects == 1 and read_clip(_u8(two)).objects == 2
    assert score_clip(_u8(two), cap)["one_object"] is False
    split = np.roll(_u8(one), 128 - int(motion.x), axis=2)  # centre moved to x = 0: half at each edge
    assert read_clip(split).objects == 2 and read_clip(split, wrap=True).objects == 1
    speck = _u8(one).copy()
    speck[:, 100:103, 100:103] = (220, 40, 40)  # 9 red pixels away from the circle
    assert read_clip(speck).objects == 1


def test_pixel_foreground_is_the_drawn_shape(seed):
    """The shape's pixels, found against the caption's background, centre on the motion's
    own centre (``ClipMotion.centre``) on every frame."""
    batch = clip_batch(seed, "train", range(6), frames=9, size=128)
    fg = pixel_foreground(batch.video, batch.captions)
    assert fg.shape == (6, 1, 9, 128, 128) and fg.dtype == torch.bool
    ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    for i, (cap, motion) in enumerate(zip(batch.captions, batch.motions)):
        if cap.shape != "circle":
            continue
        cx, cy = motion.centre(cap.motion or "still", np.arange(9))
        for t in range(9):
            m = fg[i, 0, t].float()
            assert abs(float((m * xs).sum() / m.sum()) - (cx[t] - 0.5)) < 0.75
            assert abs(float((m * ys).sum() / m.sum()) - (cy[t] - 0.5)) < 0.75


def test_latent_foreground_pools_time_like_the_vae_and_dilates(seed):
    """Against a loop: latent frame 0 codes video frame 0, latent frame k frames 4k-3..4k;
    a latent pixel is on when any of its 8x8 pixels is, then grown by one each way."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 1, 9, 32, 32, generator=g) > 0.995
    got = latent_foreground(pixels)
    assert got.shape == (2, 1, 3, 4, 4)
    want = torch.zeros(2, 1, 3, 4, 4, dtype=torch.bool)
    for b in range(2):
        for k, frames in enumerate([[0], [1, 2, 3, 4], [5, 6, 7, 8]]):
            for y in range(4):
                for x in range(4):
                    near = [(yy, xx) for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2)
                            if 0 <= yy < 4 and 0 <= xx < 4]
                    want[b, 0, k, y, x] = any(bool(pixels[b, 0, f, 8 * yy : 8 * yy + 8, 8 * xx : 8 * xx + 8].any())
                                              for f in frames for yy, xx in near)
    assert torch.equal(got, want)
    pooled = torch.stack([pixels[:, :, 0], pixels[:, :, 1:5].any(2), pixels[:, :, 5:9].any(2)], 2)
    undilated = pooled.reshape(2, 1, 3, 4, 8, 4, 8).any(-1).any(-2)
    assert torch.equal(latent_foreground(pixels, dilate=0), undilated)
    assert (want & ~undilated).any()  # the dilation added positions


def test_flow_loss_weighs_positions(seed):
    from gen.pipelines.shapes.train import flow_loss

    g = torch.Generator().manual_seed(seed)
    pred, noise, x0 = (torch.randn(2, 4, 3, 5, 5, generator=g) for _ in range(3))
    w = 1.0 + 4.0 * (torch.rand(2, 1, 3, 5, 5, generator=g) > 0.7).float()
    err = (pred - (noise - x0)).pow(2).double()
    want = (err * w).sum() / (w.expand_as(err)).sum()
    assert torch.allclose(flow_loss(pred, noise, x0, positions=w).double(), want, rtol=1e-5)
    assert torch.allclose(flow_loss(pred, noise, x0, positions=torch.ones(1)), flow_loss(pred, noise, x0))


def test_flow_loss_frame_difference_is_the_change_of_the_x0_error(seed):
    from gen.pipelines.shapes.train import flow_loss

    g = torch.Generator().manual_seed(seed)
    pred, noise, x0 = (torch.randn(3, 4, 5, 4, 4, generator=g) for _ in range(3))
    sigma = torch.rand(3, generator=g)
    # fp64, written from the definition: x0 estimate x_t - sigma v against the true x0
    p, n, x = pred.double(), noise.double(), x0.double()
    s = sigma.double().view(-1, 1, 1, 1, 1)
    xt = (1 - s) * x + s * n
    x0_err = (xt - s * p) - x
    want = (p - (n - x)).pow(2).mean() + 0.7 * (x0_err[:, :, 1:] - x0_err[:, :, :-1]).pow(2).mean()
    got = flow_loss(pred, noise, x0, frame_difference=0.7, sigmas=sigma)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    # one frame: nothing to difference; an error the same in every frame costs nothing extra
    one = [t[:, :, :1] for t in (pred, noise, x0)]
    assert torch.equal(flow_loss(*one, frame_difference=0.7, sigmas=sigma), flow_loss(*one))
    flat = (noise - x0) + torch.randn(3, 4, 1, 4, 4, generator=g)
    assert torch.allclose(flow_loss(flat, noise, x0, frame_difference=5.0, sigmas=sigma), flow_loss(flat, noise, x0))
    with pytest.raises(ValueError, match="sigmas"):
        flow_loss(pred, noise, x0, frame_difference=0.7)
