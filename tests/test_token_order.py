"""Token permutations: exact inverses on odd sizes, and the property each order promises."""

import itertools

import pytest
import torch

from gen.attention import TokenLayout, TokenPermutation, axis_order, hilbert_order, tile_order

ODD_GRIDS = [(3, 5, 7), (1, 9, 11), (5, 3, 1), (7, 13), (1, 1, 1)]


def _roundtrip(perm: TokenPermutation):
    x = torch.randn(2, perm.n_in, 3)
    y = perm.apply(x, dim=1)
    assert y.shape == (2, perm.n_out, 3)
    assert torch.equal(perm.invert(y, dim=1), x)
    assert (y[:, ~perm.valid] == 0).all()
    assert torch.equal(perm.index[perm.inverse], torch.arange(perm.n_in))


@pytest.mark.parametrize("grid", ODD_GRIDS)
def test_inverses_on_odd_sizes(grid):
    tile = tuple(min(g, 2) if i % 2 else min(g, 4) for i, g in enumerate(grid))
    _roundtrip(tile_order(grid, tile, pad=True))
    _roundtrip(tile_order(grid, tile, pad=False))
    _roundtrip(hilbert_order(grid))
    names = "thw" if len(grid) == 3 else "hw"
    for order in itertools.permutations(names):
        _roundtrip(axis_order(grid, "".join(order)))


def _coords(grid):
    axes = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    return torch.stack([a.flatten() for a in axes], 1)


@pytest.mark.parametrize("grid, tile", [((5, 7, 9), (2, 4, 4)), ((9, 10), (4, 4)), ((4, 8, 8), (2, 4, 4))])
def test_padded_tiles_are_whole_and_local(grid, tile):
    perm = tile_order(grid, tile, pad=True)
    vol = torch.tensor(tile).prod().item()
    assert perm.n_out % vol == 0
    coords = _coords(grid)
    for chunk in perm.index.view(-1, vol):
        real = chunk[chunk >= 0]
        if real.numel():
            span = coords[real].max(0).values - coords[real].min(0).values
            assert (span < torch.tensor(tile)).all()
    # the padding sits exactly where the grid does not divide
    pads = perm.n_out - perm.n_in
    padded = [-(-g // t) * t for g, t in zip(grid, tile)]
    assert pads == torch.tensor(padded).prod().item() - torch.tensor(grid).prod().item()


def test_unpadded_tiles_keep_the_token_count():
    perm = tile_order((5, 7, 9), (2, 4, 4), pad=False)
    assert perm.n_out == perm.n_in == 315 and perm.valid.all()


def test_axis_order_puts_named_axis_fastest():
    perm = axis_order((3, 4, 5), "hwt")
    c = _coords((3, 4, 5))[perm.index]
    assert c[:3, 0].tolist() == [0, 1, 2] and (c[:3, 1:] == 0).all()
    assert torch.equal(axis_order((3, 4, 5), "thw").index, torch.arange(60))


@pytest.mark.parametrize("grid", [(8, 8), (16, 16), (4, 4, 4), (8, 8, 8)])
def test_hilbert_steps_to_neighbours_on_power_of_two_cubes(grid):
    c = _coords(grid)[hilbert_order(grid).index]
    steps = (c[1:] - c[:-1]).abs().sum(1)
    assert (steps == 1).all()


@pytest.mark.parametrize("grid", [(5, 7, 9), (21, 30, 52), (13, 17)])
def test_hilbert_stays_local_on_other_sizes(grid):
    c = _coords(grid)[hilbert_order(grid).index]
    steps = (c[1:] - c[:-1]).abs().sum(1).double()
    raster = _coords(grid)
    raster_steps = (raster[1:] - raster[:-1]).abs().sum(1).double()
    assert steps.mean() < 1.1  # almost every step goes to a neighbour
    assert steps.mean() < raster_steps.mean()


def test_with_text_keeps_text_in_place():
    perm = hilbert_order((3, 4, 4))
    first = perm.with_text(TokenLayout(3, 4, 4, text_len=5, text_first=True))
    assert first.index[:5].tolist() == list(range(5)) and torch.equal(first.index[5:], perm.index + 5)
    last = perm.with_text(TokenLayout(3, 4, 4, text_len=5))
    assert torch.equal(last.index[:48], perm.index) and last.index[48:].tolist() == list(range(48, 53))
    _roundtrip(first)
    padded = tile_order((3, 5, 5), (2, 4, 4)).with_text(TokenLayout(3, 5, 5, text_len=7, text_first=True))
    _roundtrip(padded)


def test_errors():
    with pytest.raises(ValueError, match="permutation of 'thw'"):
        axis_order((2, 3, 4), "thh")
    with pytest.raises(ValueError, match="one size per grid axis"):
        tile_order((2, 3, 4), (2, 2))
    with pytest.raises(ValueError, match="positive ints"):
        hilbert_order((0, 3))
    with pytest.raises(ValueError, match="exactly once"):
        TokenPermutation(torch.tensor([0, 0, 1]), 3)
    with pytest.raises(ValueError, match="expects 6"):
        hilbert_order((2, 3)).apply(torch.randn(5, 2))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "other"])
def test_apply_and_invert_equal_index_select_for_every_memory_layout(seed, layout):
    # the fast row-gather paths (contiguous (B, H, S, D) and diffusers' transposed
    # (B, S, H, D)) must equal plain index_select; other strides take index_select itself
    from gen.attention.token_order import hilbert_order, tile_order

    for perm in (tile_order((3, 5, 7), (1, 4, 4)), hilbert_order((3, 5, 7))):
        n = perm.n_in
        x = {"contiguous": torch.randn(2, 4, n, 6), "transposed": torch.randn(2, n, 4, 6).transpose(1, 2),
             "other": torch.randn(2, 4, 6, n).transpose(2, 3)}[layout]
        keep = (perm.index >= 0).view(1, 1, -1, 1).to(x.dtype)
        assert torch.equal(perm.apply(x, dim=2), x.index_select(2, perm.index.clamp(min=0)) * keep)
        y = torch.randn(2, 4, perm.n_out, 6)
        y = {"contiguous": y, "transposed": y.transpose(1, 2).contiguous().transpose(1, 2), "other": y}[layout]
        assert torch.equal(perm.invert(y, dim=2), y.index_select(2, perm.inverse))
