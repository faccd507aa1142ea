"""NF4 / FP4 blockwise quantization, double quantization and the serialized quant state."""
import glob
import json
import os
from statistics import NormalDist

import pytest
from safetensors.numpy import load_file, save_file

from tinylora.backend import np, to_numpy, xp
from tinylora.quant import (DYNAMIC_MAP, FP4_LEVELS, NF4_LEVELS, QuantState, create_dynamic_map,
                            dequantize_4bit, double_quantize, int4_dequantize, int4_quantize,
                            nf4_dequantize, nf4_quantize, pack_4bit, quantization_error,
                            quantize_4bit, quantize_blockwise_8bit, torch_float32_sum,
                            unpack_4bit)
from tinylora.quant import nf4 as nf4_module

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nf4")
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _codes(packed, n):
    return to_numpy(unpack_4bit(packed, n))


def _midpoints(levels):
    ranked = np.sort(levels, kind="stable")
    return ((ranked[:-1] + ranked[1:]) / np.float32(2)).astype(np.float32)


def _block_max(a, blocksize):
    """max |a| over each block of the flattened array: (n_blocks,) float32."""
    return _scaled_blocks(np.abs(a), blocksize)[1]


def _scaled_blocks(w, blocksize):
    """The normalised values the quantizer sees: (n_blocks, blocksize) float32, zero padded."""
    flat = np.asarray(w, dtype=np.float32).reshape(-1)
    n_blocks = -(-flat.size // blocksize)
    blocks = np.zeros(n_blocks * blocksize, np.float32)
    blocks[:flat.size] = flat
    blocks = blocks.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    inv = np.float32(1) / np.maximum(absmax, np.float32(1e-38))
    return blocks * inv[:, None], absmax


# ----------------------------------------------------------------------------- level tables

def test_nf4_levels_table():
    expected = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0]
    assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS.shape == (16,)
    assert NF4_LEVELS.tolist() == np.array(expected, np.float32).tolist()
    assert np.all(np.diff(NF4_LEVELS) > 0)
    assert (NF4_LEVELS < 0).sum() == 7 and (NF4_LEVELS > 0).sum() == 8
    assert NF4_LEVELS[7] == 0.0 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[15] == 1.0


def test_nf4_levels_rederived_from_normal_quantiles():
    # 8 positive quantiles of 9 points from offset to 0.5, 7 negative of 8 points, plus 0,
    # divided by the largest; offset = 1 - (1/32 + 1/30)/2 keeps Q finite.
    q = NormalDist().inv_cdf
    offset = 1 - (1 / 32 + 1 / 30) / 2
    assert abs(offset - 0.9677083) < 1e-7
    positive = [q(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-q(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array(positive + negative + [0.0]))
    levels /= levels.max()
    np.testing.assert_allclose(levels, NF4_LEVELS, rtol=0, atol=1e-6)


def test_fp4_table_is_e2m1_in_bitsandbytes_order():
    magnitudes = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    np.testing.assert_array_equal(FP4_LEVELS[:8], magnitudes.astype(np.float32))
    np.testing.assert_array_equal(FP4_LEVELS[8:], -magnitudes.astype(np.float32))
    assert np.signbit(FP4_LEVELS[8]) and not np.signbit(FP4_LEVELS[0])
    assert len(set(FP4_LEVELS.tolist())) == 15                 # +0 and -0 are one value


def test_dynamic_map_properties():
    m = create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    assert m.dtype == np.float32 and m.shape == (256,)
    assert np.all(np.diff(m) > 0)                             # sorted and unique
    assert abs(float(m[0]) - (-0.99297)) < 1e-5 and m[-1] == 1.0
    assert (m == 0).sum() == 1
    np.testing.assert_array_equal(m, DYNAMIC_MAP)
    # exponent level i: 2^i midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), both signs
    for i in range(7):
        edges = np.linspace(0.1, 1.0, 2 ** i + 1)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        for v in np.concatenate([means, -means]):
            assert np.min(np.abs(m - v)) <= 5e-7 * abs(v)   # a few float32 roundings
    assert create_dynamic_map(signed=False).min() == 0.0       # unsigned: no negative half


# ----------------------------------------------------------------------------- packing, ties, zeros

def test_packing_order_on_known_codes():
    # absmax 1, so the scaled values are the levels themselves and code i is level i
    packed, state = quantize_4bit(NF4_LEVELS, double_quant=False)
    assert to_numpy(packed).tolist() == [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]
    packed, _ = quantize_4bit(NF4_LEVELS[::-1].copy(), double_quant=False)
    assert to_numpy(packed).tolist() == [0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10]
    # odd count: codes 15, 0, 7 and the pad nibble is the code of 0.0, i.e. 7
    packed, _ = quantize_4bit(np.array([1.0, -1.0, 0.0], np.float32), double_quant=False)
    assert to_numpy(packed).tolist() == [0xF0, 0x77]
    packed, _ = quantize_4bit(np.array([1.0, -1.0, 0.0], np.float32), double_quant=False,
                              quant_type="fp4")
    assert to_numpy(packed).tolist() == [0x3B, 0x00]          # FP4 pads with code 0 (+0.0)


def test_pack_unpack_roundtrip():
    codes = _rng(1).integers(0, 16, 101).astype(np.uint8)
    packed = to_numpy(pack_4bit(codes))
    assert packed.shape == (51,)
    assert packed[0] == (codes[0] << 4) | codes[1]
    np.testing.assert_array_equal(_codes(packed, 101), codes)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_ties_go_to_the_lower_code(quant_type):
    levels = LEVELS[quant_type]
    order = np.argsort(levels, kind="stable")
    mids = _midpoints(levels)
    w = np.concatenate([[1.0], mids]).astype(np.float32)      # absmax 1: scaling is exact
    packed, _ = quantize_4bit(w, double_quant=False, quant_type=quant_type)
    got = _codes(packed, w.size)[1:]
    np.testing.assert_array_equal(got, order[:15])           # the lower neighbour of each midpoint
    above = np.nextafter(mids, np.float32(2))                 # one ulp up: the upper neighbour
    packed, _ = quantize_4bit(np.concatenate([[1.0], above]).astype(np.float32),
                              double_quant=False, quant_type=quant_type)
    got = _codes(packed, w.size)[1:]
    np.testing.assert_array_equal(levels[got], levels[order[1:]])


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_block(double_quant):
    w = _rng(2).standard_normal((3, 64)).astype(np.float32)
    w[1] = 0.0
    packed, state = quantize_4bit(w, double_quant=double_quant)
    if not double_quant:   # (double quantized, its scale is only near 0; the codes make it moot)
        assert float(to_numpy(state.absmax)[1]) == 0.0
    assert to_numpy(packed)[32:64].tolist() == [0x77] * 32
    back = to_numpy(dequantize_4bit(packed, state))
    assert np.all(np.isfinite(back))
    assert np.all(back[1] == 0.0)
    # a tensor that is all zeros: offset 0, nested absmax 0, still no NaN
    packed, state = quantize_4bit(np.zeros(130, np.float32), double_quant=double_quant)
    assert to_numpy(packed).tolist() == [0x77] * 65
    back = to_numpy(dequantize_4bit(packed, state))
    assert np.all(back == 0.0)


@pytest.mark.parametrize("shape", [(1,), (3,), (63,), (65,), (7, 33), (2, 3, 5), (129,)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_odd_sizes_and_padding(shape, double_quant):
    w = _rng(3).standard_normal(shape).astype(np.float32)
    n = w.size
    packed, state = quantize_4bit(w, blocksize=64, double_quant=double_quant)
    assert packed.dtype == xp.uint8 and packed.shape == ((n + 1) // 2,)
    assert state.absmax.shape == (-(-n // 64),)
    if n % 2:
        assert int(to_numpy(packed)[-1]) & 0x0F == 7          # the pad nibble
    back = dequantize_4bit(packed, state)
    assert back.shape == shape and back.dtype == xp.float32
    # the partial last block is quantized exactly as that tail alone would be
    tail = n % 64
    if tail and n > 64:
        alone, _ = quantize_4bit(w.reshape(-1)[n - tail:], double_quant=False)
        np.testing.assert_array_equal(_codes(packed, n)[n - tail:], _codes(alone, tail))


# ----------------------------------------------------------------------------- nearest level, error

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_every_code_is_the_nearest_level(quant_type, blocksize):
    rng = _rng(4)
    w = rng.standard_normal(5000).astype(np.float32) * np.repeat(
        rng.uniform(1e-3, 10, 79).astype(np.float32), 64)[:5000]
    w[::97] *= 30                                             # outliers change the absmax
    levels = LEVELS[quant_type]
    packed, _ = quantize_4bit(w, blocksize=blocksize, double_quant=False, quant_type=quant_type)
    got = _codes(packed, w.size)
    s, _ = _scaled_blocks(w, blocksize)
    s = s.reshape(-1)[:w.size].astype(np.float64)
    dist = np.abs(s[:, None] - levels.astype(np.float64)[None, :])
    best = dist.min(axis=1)
    mine = dist[np.arange(w.size), got]
    # nearest, except within an ulp of a float32 midpoint where the float32 tie rule decides
    near_mid = np.min(np.abs(s[:, None] - _midpoints(levels)[None, :]), axis=1) <= \
        np.spacing(np.abs(s).astype(np.float32)).astype(np.float64)
    assert np.all((mine == best) | near_mid)
    assert (mine == best).mean() > 0.999


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_roundtrip_error_within_half_the_widest_gap(quant_type):
    w = (_rng(5).standard_normal((37, 211)) * 0.3).astype(np.float32)
    packed, state = quantize_4bit(w, double_quant=False, quant_type=quant_type)
    back = to_numpy(dequantize_4bit(packed, state))
    half_gap = np.diff(np.sort(LEVELS[quant_type])).max() / 2
    absmax = to_numpy(state.absmax)
    assert np.all(_block_max(w - back, 64) <= half_gap * absmax * (1 + 1e-6))


def test_mean_absolute_error_matches_the_published_figure():
    w = _rng(0).standard_normal((1024, 1024), dtype=np.float32)
    for double_quant in (False, True):
        packed, state = quantize_4bit(w, blocksize=64, double_quant=double_quant)
        err = float(np.mean(np.abs(to_numpy(dequantize_4bit(packed, state)) - w)))
        assert abs(err - 0.0728) < 1e-4, (double_quant, err)


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    w = _rng(6).standard_normal((256, 512), dtype=np.float32)
    errs = {q: quantization_error(w, q, 64) for q in ("nf4", "fp4", "int4")}
    assert errs["nf4"] < errs["int4"] < errs["fp4"], errs
    assert abs(errs["fp4"] - 0.0966) < 5e-4


def test_int4_absmax_roundtrip():
    w = _rng(7).standard_normal((5, 70)).astype(np.float32)
    codes, absmax = int4_quantize(w, 64)
    assert codes.dtype == xp.int8 and int(xp.max(xp.abs(codes))) == 7
    back = to_numpy(int4_dequantize(codes, absmax, w.shape))
    assert np.all(_block_max(w - back, 64) <= _block_max(w, 64) / 14 * (1 + 1e-6))


# ----------------------------------------------------------------------------- double quantization

def test_double_quant_keeps_codes_and_bounds_scale_error():
    w = (_rng(8).standard_normal((300, 257)) * np.linspace(0.01, 2, 257)).astype(np.float32)
    p_plain, s_plain = quantize_4bit(w, double_quant=False)
    p_dq, s_dq = quantize_4bit(w, double_quant=True)
    np.testing.assert_array_equal(to_numpy(p_plain), to_numpy(p_dq))
    assert s_dq.nested and s_dq.absmax.dtype == xp.uint8
    assert s_dq.nested_absmax.shape == (-(-s_plain.n_blocks // 256),)
    exact = to_numpy(s_plain.absmax).astype(np.float64)
    approx = to_numpy(s_dq.absmax_float()).astype(np.float64)
    codes = to_numpy(s_dq.absmax).astype(np.int64)
    gaps = np.diff(DYNAMIC_MAP.astype(np.float64))
    local = np.maximum(gaps[np.clip(codes - 1, 0, 254)], gaps[np.clip(codes, 0, 254)])
    nested = np.repeat(to_numpy(s_dq.nested_absmax), 256)[:codes.size].astype(np.float64)
    # the nearest level to the grid point g, |s - g| <= 1/65535: at most half a gap + 2/65535 off
    assert np.all(np.abs(approx - exact) <= (local / 2 + 2 / 65535) * nested * (1 + 1e-5) + 1e-6 * exact)
    assert abs(s_dq.offset - exact.mean()) < 1e-6 * exact.mean()


def _grid_lut(code):
    """bitsandbytes' CPU table, built as it is: walk the 65536 grid points -1 + 2i/65535
    upwards and advance the code while the next float32 midpoint is strictly below."""
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    lut, c = np.empty(65536, np.uint8), 0
    points = (np.float32(-1) + (np.float32(2) * np.arange(65536, dtype=np.float32))
              / np.float32(65535)).astype(np.float32)
    for i, g in enumerate(points):
        while c < 255 and mids[c] < g:
            c += 1
        lut[i] = c
    return lut


def test_blockwise_8bit_is_the_nearest_level_of_the_grid_point():
    rng = _rng(9)
    v = rng.standard_normal(3000).astype(np.float32) * np.float32(0.01)
    v[:3] = [0.0, 1e-9, -1e-9]
    codes, absmax = quantize_blockwise_8bit(v, DYNAMIC_MAP, 256)
    codes = to_numpy(codes)
    s = np.clip(v * np.repeat(np.float32(1) / to_numpy(absmax), 256)[:v.size], -1, 1).astype(np.float32)
    index = np.trunc((s + np.float32(1)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5))
    np.testing.assert_array_equal(codes, _grid_lut(DYNAMIC_MAP)[index.astype(np.int64)])
    # |s - g| <= 1/65535, so the level is at most 2/65535 farther from s than the nearest
    # (0 itself lies between two grid points and gets the level 2.1e-5, not 0)
    s64, levels = s.astype(np.float64), DYNAMIC_MAP.astype(np.float64)
    dist = np.abs(s64[:, None] - levels[None, :])
    assert np.all(dist[np.arange(v.size), codes] <= dist.min(axis=1) + 2 / 65535)
    assert DYNAMIC_MAP[codes[0]] == np.float32(2.1249998e-05)
    # a level maps to itself unless it lies closer to a neighbour than the grid resolves
    # (9 of the 15 levels within 1e-4 of 0); an all-zero block gets code 0
    codes, _ = quantize_blockwise_8bit(np.concatenate([[1.0], DYNAMIC_MAP]).astype(np.float32))
    coarse = np.abs(DYNAMIC_MAP) > 1e-4
    assert coarse.sum() == 241
    np.testing.assert_array_equal(to_numpy(codes)[1:][coarse], np.arange(256)[coarse])
    codes, nested = quantize_blockwise_8bit(np.zeros(300, np.float32))
    assert not to_numpy(codes).any() and not to_numpy(nested).any()


def test_double_quantize_offset_is_pytorchs_float32_mean():
    t = load_file(os.path.join(FIXTURES, "tables.safetensors"))
    for n, want in zip(t["sum.lengths"].tolist(), t["sum.values"]):
        x = np.random.default_rng(n).random(n, dtype=np.float32)
        assert torch_float32_sum(x).tobytes() == want.tobytes(), n
    # seed 5: here the float32 mean in PyTorch's order is not the correctly rounded mean
    a = _rng(5).uniform(0.5, 3.0, 4097).astype(np.float32)
    codes, nested, offset = double_quantize(a)
    assert offset == float(torch_float32_sum(a) / np.float32(a.size))
    assert abs(offset - a.astype(np.float64).mean()) < 1e-6 * offset
    assert to_numpy(codes).dtype == np.uint8 and to_numpy(nested).shape == (17,)


# ----------------------------------------------------------------------------- dtypes and inputs

def test_dtypes_and_layouts():
    w = _rng(11).standard_normal((33, 40))
    p16, s16 = quantize_4bit(w.astype(np.float16))
    assert s16.dtype == np.float16
    assert dequantize_4bit(p16, s16).dtype == xp.float16
    assert dequantize_4bit(p16, s16, dtype=np.float32).dtype == xp.float32
    p64, s64 = quantize_4bit(w)                               # float64 is rounded to float32 first
    p32, _ = quantize_4bit(w.astype(np.float32))
    np.testing.assert_array_equal(to_numpy(p64), to_numpy(p32))
    assert dequantize_4bit(p64, s64).dtype == xp.float64
    wt = w.astype(np.float32).T                               # non-contiguous input
    pt, _ = quantize_4bit(wt)
    pc, _ = quantize_4bit(np.ascontiguousarray(wt))
    np.testing.assert_array_equal(to_numpy(pt), to_numpy(pc))
    # bitsandbytes' (n/2, 1) layout dequantizes the same
    np.testing.assert_array_equal(to_numpy(dequantize_4bit(p32.reshape(-1, 1), s64)),
                                  to_numpy(dequantize_4bit(p32, s64)))
    assert nf4_quantize is quantize_4bit and nf4_dequantize is dequantize_4bit


def test_chunked_passes_match_one_pass(monkeypatch):
    w = _rng(12).standard_normal(64 * 37 + 11).astype(np.float32)
    ref_p, ref_s = quantize_4bit(w, quant_type="fp4")
    ref_back = to_numpy(dequantize_4bit(ref_p, ref_s, dtype=np.float16))
    monkeypatch.setattr(nf4_module, "_QUANT_CHUNK", 64 * 5)
    monkeypatch.setattr(nf4_module, "_DEQUANT_CHUNK", 64 * 3)
    p, s = quantize_4bit(w, quant_type="fp4")
    np.testing.assert_array_equal(to_numpy(p), to_numpy(ref_p))
    np.testing.assert_array_equal(to_numpy(s.absmax), to_numpy(ref_s.absmax))
    np.testing.assert_array_equal(to_numpy(dequantize_4bit(p, s, dtype=np.float16)), ref_back)


def test_invalid_inputs():
    w = np.ones((4, 64), np.float32)
    for bad in (0, 63, -64, 2.5):
        with pytest.raises(ValueError):
            quantize_4bit(w, blocksize=bad)
    with pytest.raises(ValueError):
        quantize_4bit(w, quant_type="int8")
    with pytest.raises(TypeError):
        quantize_4bit(np.ones(8, np.int32))
    with pytest.raises(ValueError):
        quantize_4bit(np.zeros(0, np.float32))
    for v in (np.inf, np.nan):
        bad = w.copy()
        bad[2, 3] = v
        with pytest.raises(ValueError):
            quantize_4bit(bad)
    packed, state = quantize_4bit(w)
    with pytest.raises(ValueError):
        dequantize_4bit(packed[:-1], state)


# ----------------------------------------------------------------------------- serialization

def test_state_dict_names_mirror_bitsandbytes():
    w = _rng(13).standard_normal((20, 70)).astype(np.float32)
    _, plain = quantize_4bit(w, double_quant=False)
    _, nested = quantize_4bit(w, double_quant=True, quant_type="fp4")
    assert set(plain.to_dict()) == {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
    assert set(nested.to_dict()) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                     "quant_state.bitsandbytes__fp4"}
    meta = json.loads(bytes(nested.to_dict()["quant_state.bitsandbytes__fp4"]).decode())
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape",
                          "nested_blocksize", "nested_dtype", "nested_offset"]
    assert meta["shape"] == [20, 70] and meta["dtype"] == "float32" and meta["blocksize"] == 64
    unpacked = nested.to_dict(packed=False)
    assert unpacked["nested_offset"] == nested.offset and unpacked["quant_type"] == "fp4"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("packed_meta", [False, True])
def test_state_roundtrip_through_safetensors(tmp_path, double_quant, packed_meta):
    w = _rng(14).standard_normal((50, 77)).astype(np.float16)
    packed, state = quantize_4bit(w, double_quant=double_quant)
    want = to_numpy(dequantize_4bit(packed, state))
    if packed_meta:
        tensors = {"layer.weight": to_numpy(packed).reshape(-1, 1)}
        tensors.update({"layer.weight." + k: v for k, v in state.to_dict().items()})
        save_file(tensors, str(tmp_path / "q.safetensors"))
        loaded = load_file(str(tmp_path / "q.safetensors"))
        parts = {k: v for k, v in loaded.items() if k.startswith("layer.weight.")}
        again = QuantState.from_dict(parts)
        got = to_numpy(dequantize_4bit(loaded["layer.weight"], again))
    else:
        again = QuantState.from_dict(state.to_dict(packed=False))
        got = to_numpy(dequantize_4bit(packed, again))
    assert again.shape == (50, 77) and again.dtype == np.float16 and again.nested == double_quant
    assert again.nbytes == state.nbytes
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_nbytes_and_overhead():
    w = _rng(15).standard_normal((64, 1024)).astype(np.float32)
    _, plain = quantize_4bit(w, double_quant=False)
    _, nested = quantize_4bit(w, double_quant=True)
    assert plain.nbytes == 1024 * 4 + 16 * 4
    assert nested.nbytes == 1024 + 4 * 4 + 16 * 4 + 256 * 4 + 4
    # per-parameter scale overhead: 32/64 bits without, 8/64 + 32/(64*256) with double quant
    assert (plain.nbytes - 64) * 8 / w.size == 0.5
    assert abs((nested.nbytes - 64 - 1024 - 4) * 8 / w.size - (8 / 64 + 32 / (64 * 256))) < 1e-12


def test_from_dict_rejects_inconsistent_state():
    _, state = quantize_4bit(np.ones((4, 64), np.float32), double_quant=False)
    d = state.to_dict(packed=False)
    with pytest.raises(ValueError):
        QuantState.from_dict({**d, "absmax": d["absmax"][:-1]})
    with pytest.raises(KeyError):
        QuantState.from_dict({k: v for k, v in d.items() if k != "quant_map"})


# ----------------------------------------------------------------------------- bitsandbytes fixtures

CASES = sorted(p for p in glob.glob(os.path.join(FIXTURES, "*.safetensors"))
               if not p.endswith("tables.safetensors"))


def _part(tensors, prefix):
    skip = ("packed", "dequant", "input", "pattern", "scales")
    return {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(skip)
            and not (prefix == "" and k.startswith("dq."))}


def _input(t):
    """A case's input; compact cases store one block's pattern times one scale per block."""
    if "input" in t:
        return t["input"]
    return (t["scales"][:, None] * t["pattern"][None, :]).reshape(-1)


def _same(a, b, quant_type):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    if quant_type == "nf4":
        assert a.tobytes() == b.tobytes()
    else:  # FP4 code 8: bitsandbytes' stored quant_map says +0.0 where its kernels give -0.0
        np.testing.assert_array_equal(a, b)


def test_fixtures_are_present():
    assert len(CASES) >= 9 and os.path.exists(os.path.join(FIXTURES, "tables.safetensors"))
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(FIXTURES, "*")))
    assert total < 240_000


def test_tables_match_bitsandbytes():
    t = load_file(os.path.join(FIXTURES, "tables.safetensors"))
    assert t["dynamic_map"].tobytes() == DYNAMIC_MAP.tobytes()
    assert t["nf4"].tobytes() == NF4_LEVELS.tobytes()
    np.testing.assert_array_equal(t["fp4"], FP4_LEVELS)


def test_blockwise_8bit_matches_bitsandbytes():
    t = load_file(os.path.join(FIXTURES, "tables.safetensors"))
    v = t["blockwise.input"]                                   # 3000 centred absmax values
    codes, absmax = quantize_blockwise_8bit(v, DYNAMIC_MAP, 256)
    assert to_numpy(absmax).tobytes() == t["blockwise.cpu_absmax"].tobytes()
    assert to_numpy(codes).tobytes() == t["blockwise.cpu_codes"].tobytes()
    # bitsandbytes' nearest-level (pure-PyTorch / CUDA) rule picks the other neighbour a few
    # times, always for a value within half a grid step (1/65535) of a midpoint
    differ = to_numpy(codes) != t["blockwise.nearest_codes"]
    assert 0 < differ.sum() < 30
    s = v.astype(np.float64) / np.repeat(to_numpy(absmax), 256)[:v.size]
    mids = _midpoints(DYNAMIC_MAP).astype(np.float64)
    assert np.all(np.abs(s[differ, None] - mids[None, :]).min(axis=1) < 1 / 65535)


@pytest.mark.parametrize("path", CASES, ids=[os.path.basename(p)[:-12] for p in CASES])
def test_bitsandbytes_fixture(path):
    t = load_file(path)
    quant_type = "fp4" if os.path.basename(path).startswith("fp4") else "nf4"
    key = "quant_state.bitsandbytes__" + quant_type
    blocksize = json.loads(bytes(t["dq." + key]).decode())["blocksize"]
    w = _input(t)
    n = w.size
    same = (lambda a, b: _same(a, b, "fp4" if quant_type == "fp4" else "nf4"))

    # double quantization: every byte of the state dict, offset and 8-bit codes included
    p_dq, s_dq = quantize_4bit(w, blocksize=blocksize, double_quant=True, quant_type=quant_type)
    assert t["dq.packed"].shape == ((n + 1) // 2, 1)
    assert to_numpy(p_dq).tobytes() == t["dq.packed"].tobytes()
    ours = s_dq.to_dict()
    theirs = _part(t, "dq.")
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        _same(ours[name], value, quant_type if name == "quant_map" else "nf4")
    assert bytes(ours[key]) == bytes(t["dq." + key])          # the JSON, offset included
    state = QuantState.from_dict(theirs)
    assert state.nested and state.shape == w.shape and state.dtype == w.dtype
    assert np.float32(state.offset) == np.float32(s_dq.offset)
    if "dequant" not in t:                                     # compact cases end here
        return
    # (bitsandbytes' CPU dequantize returns some 1-d tensors as (1, n): same values)
    same(to_numpy(dequantize_4bit(t["dq.packed"], state)), t["dq.dequant"].reshape(w.shape))
    same(to_numpy(dequantize_4bit(p_dq, s_dq)), t["dq.dequant"].reshape(w.shape))

    # plain: packed bytes, absmax, serialized state and dequantized values, byte for byte
    packed, state = quantize_4bit(w, blocksize=blocksize, double_quant=False, quant_type=quant_type)
    assert t["packed"].shape == ((n + 1) // 2, 1)
    assert to_numpy(packed).tobytes() == t["packed"].tobytes()
    ours = state.to_dict()
    for name, value in _part(t, "").items():
        _same(ours[name], value, quant_type if name == "quant_map" else "nf4")
    same(to_numpy(dequantize_4bit(packed, state)), t["dequant"].reshape(w.shape))
    theirs = QuantState.from_dict(_part(t, ""))                # their state, our dequantize
    same(to_numpy(dequantize_4bit(t["packed"], theirs)), t["dequant"].reshape(w.shape))
