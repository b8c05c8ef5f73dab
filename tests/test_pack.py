"""int32 packing: round trips, and byte equality with compressed-tensors' own packer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.quant.pack import PACK_BITS, pack_int32, packed_length, unpack_int32

# Shapes whose packed dim is and is not a multiple of 32 / bits (and of 32).
SHAPES = [(1, 1), (3, 7), (5, 37), (8, 96), (17, 160), (33, 64), (2, 200)]


def _rand_ints(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g).to(torch.int8)


def _ct_packer():
    ct = pytest.importorskip("compressed_tensors")
    try:  # compressed-tensors >= 0.20
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:  # older releases
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (
            pack_to_int32,
            unpack_from_int32,
        )
    return ct, pack_to_int32, unpack_from_int32


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip(bits, shape, dim):
    x = _rand_ints(shape, bits, seed=bits * 100 + shape[0] * 7 + shape[1] + dim)
    p = pack_int32(x, bits, dim=dim)
    assert p.dtype == torch.int32
    n = shape[dim]
    expect = (packed_length(n, bits), shape[1]) if dim == 0 else (shape[0], packed_length(n, bits))
    assert tuple(p.shape) == expect
    assert torch.equal(unpack_int32(p, bits, shape, dim=dim), x)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(PACK_BITS),
    rows=st.integers(1, 12),
    cols=st.integers(1, 80),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_property(bits, rows, cols, dim, seed):
    x = _rand_ints((rows, cols), bits, seed)
    assert torch.equal(unpack_int32(pack_int32(x, bits, dim=dim), bits, (rows, cols), dim=dim), x)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_byte_fast_path_matches_general_path(bits):
    from quantkit.quant.pack import _pack_rows_bytes, _pack_rows_general, _unpack_rows_bytes, _unpack_rows_general

    for i, shape in enumerate(SHAPES):
        x = _rand_ints(shape, bits, seed=500 + i)
        p = _pack_rows_bytes(x, bits)
        assert torch.equal(p, _pack_rows_general(x, bits))
        assert torch.equal(_unpack_rows_general(p, bits, shape[1]), x)
        assert torch.equal(_unpack_rows_bytes(p, bits, shape[1]), x)


def test_extremes_and_known_words():
    # 4-bit: value v is stored as v + 8, element i at bits 4i..4i+3 (little end first).
    x = torch.tensor([[-8, 7, 0, -1, 1, 2, 3, 4]], dtype=torch.int8)
    # unsigned fields [0, 15, 8, 7, 9, 10, 11, 12] -> bytes F0 78 A9 CB
    assert pack_int32(x, 4).tolist() == [[int.from_bytes(bytes([0xF0, 0x78, 0xA9, 0xCB]), "little", signed=True)]]
    # 8-bit: -128 -> 0x00, 127 -> 0xFF
    x8 = torch.tensor([[-128, 127, 0, 1]], dtype=torch.int8)
    assert pack_int32(x8, 8).tolist() == [[int.from_bytes(bytes([0x00, 0xFF, 0x80, 0x81]), "little", signed=True)]]


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_int32(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="int8"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_int32(torch.zeros(2, 2, dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="does not match"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, (2, 8))


@pytest.mark.parametrize("bits", PACK_BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_bytes_equal_compressed_tensors(bits, dim):
    _, ct_pack, ct_unpack = _ct_packer()
    if 32 % bits and ct_pack(torch.zeros(1, 32, dtype=torch.int8), bits).shape[1] != bits:
        pytest.skip("this compressed-tensors predates dense packing (32 // bits values per word)")
    for i, shape in enumerate(SHAPES + [(64, 33), (7, 1000)]):
        x = _rand_ints(shape, bits, seed=1000 + 10 * bits + i)
        ours = pack_int32(x, bits, dim=dim)
        theirs = ct_pack(x, bits, packed_dim=dim)
        assert ours.shape == theirs.shape, (bits, shape, dim)
        assert ours.numpy().tobytes() == theirs.contiguous().numpy().tobytes(), (bits, shape, dim)
        assert torch.equal(ct_unpack(ours, bits, torch.Size(shape), packed_dim=dim), x)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_row_chunking_is_seamless(monkeypatch, bits, dim):
    import quantkit.quant.pack as pack

    x = _rand_ints((37, 45), bits, seed=7)
    whole = pack_int32(x, bits, dim=dim)
    monkeypatch.setattr(pack, "_CHUNK_ELEMS", 100)  # a few rows per chunk
    assert torch.equal(pack_int32(x, bits, dim=dim), whole)
    assert torch.equal(unpack_int32(whole, bits, x.shape, dim=dim), x)
