"""Bit packing (LSB first along the last dimension) and Elias–Fano positions: layout and round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from weightx.formats.packing import ef_decode, ef_encode, ef_low_bits, ef_nbytes, pack_bits, packed_len, unpack_bits


def _pack_reference(bits: np.ndarray) -> np.ndarray:
    """Independent bit layout: byte i of a row = Σ_j bit[8i + j]·2^j, zero-padded."""
    n = bits.shape[-1]
    out = np.zeros(bits.shape[:-1] + (math.ceil(n / 8),), dtype=np.uint8)
    for idx in np.ndindex(*bits.shape[:-1]):
        for e in range(n):
            if bits[idx + (e,)]:
                out[idx + (e // 8,)] |= 1 << (e % 8)
    return out


def test_bit_layout_lsb_first_along_last_dim():
    bits = torch.zeros(2, 16, dtype=torch.bool)
    bits[0, 0] = True  # element 0 -> bit 0 of byte 0
    bits[0, 7] = True  # element 7 -> bit 7 of byte 0
    bits[1, 9] = True  # element 9 -> bit 1 of byte 1
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert packed.tolist() == [[0b1000_0001, 0], [0, 0b10]]
    assert pack_bits(torch.ones(8, dtype=torch.bool)).tolist() == [255]


def test_matches_bitdelta_reference_int32_words():
    """METHODS §8 BitDelta 3: the reference packs (Δ ≥ 0)ᵀ along `in` into int32, row 32r+j in bit j.

    Four of our bytes read little-endian are that word: all ones -> -1, only row 0 -> 1, only row
    31 -> -2147483648.
    """
    out_features, in_features = 3, 64
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[0, :32] = True  # a column of 32 ones in the reference's transposed (in, out) layout
    mask[1, 0] = True
    mask[2, 31] = True
    words = pack_bits(mask).numpy().view("<i4")  # (out, in/32)
    assert words.shape == (3, 2)
    assert words[0, 0] == -1 and words[1, 0] == 1 and words[2, 0] == -2147483648
    assert (words[:, 1] == 0).all()


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (4, 64), (2, 3, 17), (0,), (5, 0)])
def test_round_trip_and_reference_layout(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    bits = torch.rand(shape, generator=gen) > 0.5
    packed = pack_bits(bits)
    assert packed.shape == (*shape[:-1], packed_len(shape[-1]))
    assert np.array_equal(packed.numpy(), _pack_reference(bits.numpy()))
    assert torch.equal(unpack_bits(packed, shape[-1]), bits)


@pytest.mark.parametrize("shape", [(5, 37), (3, 8), (2, 2, 9), (1,)])
def test_torch_path_equals_numpy_path(shape):
    """Non-CPU devices use torch bit ops; they must give the numpy path's bytes exactly."""
    from weightx.formats.packing import _pack_torch, _unpack_torch

    bits = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.3
    packed = pack_bits(bits)
    assert torch.equal(_pack_torch(bits), packed)
    assert torch.equal(_unpack_torch(packed, shape[-1]), bits)


def test_padding_bits_are_zero_and_wrong_length_is_refused():
    assert pack_bits(torch.ones(3, dtype=torch.bool)).tolist() == [0b111]
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)
    with pytest.raises(TypeError):
        pack_bits(torch.ones(3))


# ---- Elias–Fano ----------------------------------------------------------------------------


def _ef_bits_reference(n: int, k: int) -> int:
    low = 0 if k == 0 or n <= k else int(math.floor(math.log2(n / k)))
    high = 0 if k == 0 else k + ((n - 1) >> low)
    return math.ceil(high / 8) + math.ceil(k * low / 8)


@pytest.mark.parametrize("n,k", [(5, 2), (100, 20), (1000, 1), (1000, 999), (64, 64), (4096 * 3, 2457), (10, 0)])
def test_elias_fano_round_trip_and_size(n, k):
    gen = torch.Generator().manual_seed(n * 7 + k)
    pos = torch.sort(torch.randperm(n, generator=gen)[:k]).values
    data = ef_encode(pos, n)
    assert data.dtype == torch.uint8 and data.numel() == ef_nbytes(n, k) == _ef_bits_reference(n, k)
    assert torch.equal(ef_decode(data, n, k), pos)


def test_elias_fano_repeated_positions_and_extremes():
    pos = torch.tensor([0, 0, 3, 3, 9, 9])
    assert torch.equal(ef_decode(ef_encode(pos, 10), 10, 6), pos)
    last = torch.tensor([999])
    assert torch.equal(ef_decode(ef_encode(last, 1000), 1000, 1), last)


def test_elias_fano_is_near_optimal_at_density_0_2():
    n = 1 << 20
    k = n // 5
    bits_per_weight = 8 * ef_nbytes(n, k) / n
    entropy = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / n
    assert ef_low_bits(n, k) == 2
    assert bits_per_weight == pytest.approx(0.85, abs=1e-3)  # 3k + n/4 bits
    assert entropy < bits_per_weight < entropy + 0.2 * 1.5  # within 1.5 bits per kept entry of log2 C(n, k)


def test_elias_fano_refuses_corrupt_input():
    data = ef_encode(torch.tensor([1, 5, 7]), 16)
    with pytest.raises(ValueError, match="not an Elias"):
        ef_decode(data[:-1], 16, 3)
    bad = data.clone()
    bad[0] = 0
    with pytest.raises(ValueError, match="corrupt"):
        ef_decode(bad, 16, 3)


def test_elias_fano_chunked_encoding_equals_the_plain_layout():
    """Over a million positions the encoder works in chunks; its bytes equal a plain numpy encoding of
    the same layout (unary high part, then each position's low bits, LSB first)."""
    import math

    import numpy as np

    from weightx.formats.packing import EF_CHUNK, ef_encode

    rng = np.random.default_rng(0)
    n, k = 40_000_000, EF_CHUNK + 12_345
    pos = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    low = int(math.floor(math.log2(n / k)))
    high = np.zeros(k + ((n - 1) >> low), dtype=bool)
    high[(pos >> low) + np.arange(k)] = True
    lows = ((pos[:, None] >> np.arange(low)) & 1).astype(bool).reshape(-1)
    want = np.concatenate([np.packbits(high, bitorder="little"), np.packbits(lows, bitorder="little")])
    for dtype in (torch.int64, torch.int32):
        got = ef_encode(torch.from_numpy(pos).to(dtype), n)
        assert np.array_equal(got.numpy(), want)


def test_positions_from_a_bitmap_encode_like_the_positions():
    """The sparse writer keeps changed positions as a bitmap and encodes from it in chunks: the same bytes
    as encoding the positions themselves, across chunk and slice boundaries."""
    import numpy as np

    from weightx.formats.packing import EF_CHUNK, ef_encode, pack_bits
    from weightx.formats.sparse import mask_positions, mask_to_index

    rng = np.random.default_rng(1)
    n = 9_000_003
    bits = torch.from_numpy(rng.random(n) < 0.3)  # ~2.7M positions: several chunks
    mask = pack_bits(bits)
    pos = torch.nonzero(bits).reshape(-1)
    chunks = list(mask_positions(mask, n))
    assert all(c.numel() == EF_CHUNK for c in chunks[:-1]) and torch.equal(torch.cat(chunks), pos)
    assert torch.equal(mask_to_index(mask, n, pos.numel()), ef_encode(pos, n))
