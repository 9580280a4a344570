"""The reference FP8 cast (epkern.reference.fp8): golden values, an independent e4m3 rounding, error bounds,
power-of-two scales and UE8M0 packing."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epkern import reference as ref
from epkern.errors import ArgumentError

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn
f32 = np.float32


def _e4m3_table():
    """Value of every finite e4m3fn code, computed from the format (sign, 4-bit exponent bias 7, 3-bit
    mantissa; exponent 0 subnormal; S.1111.111 is NaN), independently of ml_dtypes."""
    codes, values = [], []
    for c in range(256):
        s, e, m = c >> 7, (c >> 3) & 0xF, c & 7
        if e == 0xF and m == 7:
            continue
        v = m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        codes.append(c)
        values.append(-v if s else v)
    return np.array(codes), np.array(values)


CODES, VALUES = _e4m3_table()


def e4m3_rne(y: float) -> int:
    """Bits of the e4m3 value nearest to y (|y| <= 448), ties to the even code (mantissa lsb 0)."""
    d = np.abs(VALUES - y)
    best = np.nonzero(d == d.min())[0]
    codes = {int(CODES[i]) for i in best}
    if len(codes) > 1:  # a tie (even mantissa wins), and/or the two zeros
        codes = {c for c in codes if c % 2 == 0} or codes
        if {0x00, 0x80} <= codes:  # +0 and -0 are the same value: the sign of y decides
            codes = {0x80 if np.signbit(y) else 0x00}
    (c,) = codes
    return c


def brute_cast(x, round_scale):
    """Scalar float32 re-implementation of the documented arithmetic."""
    t, h = x.shape
    q = np.zeros((t, h), np.uint8)
    s = np.zeros((t, h // 128), np.float32)
    for i in range(t):
        for g in range(h // 128):
            grp = [f32(v) for v in x[i, g * 128 : (g + 1) * 128].astype(np.float32)]
            amax = max(max(abs(v) for v in grp), f32(1e-4))
            sc = f32(amax / f32(448))
            if round_scale:
                p = f32(1)
                while p < sc:
                    p = f32(p * 2)
                while p / 2 >= sc:
                    p = f32(p / 2)
                sc = p
            s[i, g] = sc
            for j, v in enumerate(grp):
                y = min(max(f32(v / sc), f32(-448)), f32(448))
                q[i, g * 128 + j] = e4m3_rne(float(y))
    return q, s


# ---------------------------------------------------------------- golden values
def test_row_of_448_has_scale_one():
    for v in (448.0, -448.0):
        q, s = ref.per_token_cast_to_fp8(np.full((1, 256), v, np.float32))
        assert s.dtype == np.float32 and s.shape == (1, 2) and (s == 1).all()
        assert (q.view(np.uint8) == (0x7E if v > 0 else 0xFE)).all()


def test_zero_row_uses_the_amax_floor():
    q, s = ref.per_token_cast_to_fp8(np.zeros((2, 128), BF16))
    assert s[0, 0] == f32(f32(1e-4) / f32(448)) and (q.view(np.uint8) == 0).all()
    q, s = ref.per_token_cast_to_fp8(np.zeros((1, 512), np.float32), round_scale=True)
    assert (s == f32(2.0**-22)).all()  # 1e-4/448 = 2.23e-7, in (2^-23, 2^-22]
    _, p = ref.per_token_cast_to_fp8(np.zeros((1, 512), np.float32), round_scale=True, use_ue8m0=True)
    assert p.dtype == np.int32 and p.shape == (1, 1) and p.view(np.uint32)[0, 0] == 0x69696969  # 105 = 127-22


def test_round_to_nearest_even_ties():
    x = np.zeros((1, 128), np.float32)
    vals = {
        0: 448.0,  # amax: scale 1
        1: 1.0625,  # tie 1.0 / 1.125 -> 1.0 (even)
        2: 1.1875,  # tie 1.125 / 1.25 -> 1.25
        3: -1.0625,
        4: 17.0,  # tie 16 / 18 -> 16
        5: 19.0,  # tie 18 / 20 -> 20
        6: 2.0**-10,  # half the smallest subnormal: tie -> 0
        7: 3 * 2.0**-10,  # tie 2^-9 / 2^-8 -> 2^-8
        8: 0.3,  # nearest: 0.3125 (5/16)
        9: 432.0,  # tie 416 / 448 -> 448 (mantissa 1.110 is even, 1.101 odd)
    }
    want = {0: 448, 1: 1.0, 2: 1.25, 3: -1.0, 4: 16, 5: 20, 6: 0, 7: 2.0**-8, 8: 0.3125, 9: 448}
    for i, v in vals.items():
        x[0, i] = v
    q, s = ref.per_token_cast_to_fp8(x)
    assert s[0, 0] == 1
    got = q.astype(np.float32)[0]
    for i, w in want.items():
        assert got[i] == w, (i, vals[i], got[i], w)


def test_round_scale_goldens():
    def one(amax):
        x = np.zeros((1, 128), np.float32)
        x[0, 0] = amax
        return ref.per_token_cast_to_fp8(x, round_scale=True)

    q, s = one(448.0)  # 448/448 = 1 is a power of two already
    assert s[0, 0] == 1 and q.astype(np.float32)[0, 0] == 448
    q, s = one(449.0)  # 449/448 -> 2; 449/2 = 224.5 -> 224 (step 16 in [128, 256))
    assert s[0, 0] == 2 and q.astype(np.float32)[0, 0] == 224
    q, s = one(896.0)
    assert s[0, 0] == 2 and q.astype(np.float32)[0, 0] == 448
    q, s = one(897.0)
    assert s[0, 0] == 4
    q, s = one(0.25)  # 0.25/448 = 2^-10.8 -> 2^-10
    assert s[0, 0] == 2.0**-10 and q.astype(np.float32)[0, 0] == 256


def test_ue8m0_byte_placement():
    """Group g of a token goes into byte g % 4 (little end first) of word g // 4: biased exponent p + 127."""
    exps = np.array([0, 1, -1, 5, -20, 3, 2, -3])  # scale 2^p per group
    x = np.zeros((1, 1024), np.float32)
    for g, p in enumerate(exps):
        x[0, g * 128] = 448 * 2.0**p
    q, s = ref.per_token_cast_to_fp8(x, round_scale=True)
    assert np.array_equal(s[0], (2.0**exps).astype(np.float32))
    q2, p = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    b = (exps + 127).astype(np.uint32)
    want = [b[4 * w] | b[4 * w + 1] << 8 | b[4 * w + 2] << 16 | b[4 * w + 3] << 24 for w in range(2)]
    assert p.view(np.uint32)[0].tolist() == [int(v) for v in want]
    assert np.array_equal(q.view(np.uint8), q2.view(np.uint8))
    assert np.array_equal(ref.unpack_ue8m0(p), s)
    assert np.array_equal(ref.pack_ue8m0(s), p)


def test_unpack_extremes():
    p = np.array([[0x00FF7F80]], np.uint32).view(np.int32)  # bytes 0x80, 0x7F, 0xFF, 0x00
    u = ref.unpack_ue8m0(p)[0]
    assert u[0] == 2.0 and u[1] == 1.0 and np.isnan(u[2]) and u[3] == f32(2.0**-127)


# ---------------------------------------------------------------- against an independent implementation
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_matches_scalar_brute_force(seed, round_scale, bf16_in):
    rng = np.random.default_rng(seed)
    scale = 2.0 ** rng.uniform(-30, 30)
    x = (rng.standard_normal((2, 256)) * scale).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0
    if rng.random() < 0.3:
        x[0, :128] = 0  # an all-zero group: amax floor
    if bf16_in:
        x = x.astype(BF16)
    q, s = ref.per_token_cast_to_fp8(x, round_scale=round_scale)
    wq, ws = brute_cast(x, round_scale)
    assert np.array_equal(s, ws)
    assert np.array_equal(q.view(np.uint8), wq)


# ---------------------------------------------------------------- bounds
@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.floats(-40, 40), st.sampled_from([np.float32, BF16]))
def test_round_trip_error_bound(seed, round_scale, log2_scale, dtype):
    """y = x / s lies in [-448, 448]. e4m3 has 3 mantissa bits: for |y| >= 2^-6 (normal) the RNE error is at
    most half an ulp = 2^-4 relative; below that (subnormal, step 2^-9) at most 2^-10 absolute. Scaled back:
    |x - q·s| <= max(2^-4 |x|, 2^-10 s), up to float32 rounding of the division, the clip at 448 and the
    product (a few 2^-24 relative), covered by the 2^-20 |x| slack."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, 512)) * 2.0**log2_scale).astype(np.float32)
    x[:, rng.random(512) < 0.1] *= 2.0**-12  # some tiny values: subnormal codes
    x = x.astype(dtype)
    q, s = ref.per_token_cast_to_fp8(x, round_scale=round_scale)
    xf = x.astype(np.float32).reshape(3, 4, 128)
    amax = np.maximum(np.abs(xf).max(-1), f32(1e-4))
    exact = (amax / f32(448)).astype(np.float32)
    if round_scale:
        assert (np.frexp(s)[0] == 0.5).all(), "scales must be powers of two"
        assert (s >= exact).all() and (s / 2 < exact).all(), "smallest power of two >= amax / 448"
    else:
        assert np.array_equal(s, exact)
    back = ref.per_token_cast_back(q, s).reshape(3, 4, 128).astype(np.float64)
    err = np.abs(back - xf)
    bound = np.maximum(np.abs(xf) * 2.0**-4, 2.0**-10 * s[..., None].astype(np.float64)) + np.abs(xf) * 2.0**-20
    assert (err <= bound).all(), float((err - bound).max())
    assert (np.abs(q.astype(np.float32)) <= 448).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ue8m0_consistent_with_round_scale(seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((4, 1024)) * 2.0 ** rng.uniform(-20, 20, size=(4, 1))).astype(BF16)
    q1, s1 = ref.per_token_cast_to_fp8(x, round_scale=True)
    q2, p = ref.per_token_cast_to_fp8(x, round_scale=True, use_ue8m0=True)
    assert p.dtype == np.int32 and p.shape == (4, 2)
    assert np.array_equal(q1.view(np.uint8), q2.view(np.uint8))
    assert np.array_equal(ref.unpack_ue8m0(p), s1)
    assert np.array_equal(ref.per_token_cast_back(q2, p), ref.per_token_cast_back(q1, s1))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,x,match",
    [
        ({"use_ue8m0": True}, np.zeros((1, 512), np.float32), "round_scale"),
        ({}, np.zeros((1, 100), np.float32), "x"),
        ({"round_scale": True, "use_ue8m0": True}, np.zeros((1, 256), np.float32), "x"),
        ({}, np.zeros((1, 128), np.float64), "x"),
        ({}, np.zeros(128, np.float32), "x"),
    ],
)
def test_cast_validation(kwargs, x, match):
    with pytest.raises(ArgumentError, match=match):
        ref.per_token_cast_to_fp8(x, **kwargs)


def test_cast_back_validation():
    q, s = ref.per_token_cast_to_fp8(np.ones((2, 256), np.float32))
    with pytest.raises(ArgumentError, match="scales"):
        ref.per_token_cast_back(q, s[:, :1])
    with pytest.raises(ArgumentError, match="x_fp8"):
        ref.per_token_cast_back(q.astype(np.float32), s)
    with pytest.raises(ArgumentError, match="scales"):
        ref.pack_ue8m0(np.full((1, 4), 3.0, np.float32))
