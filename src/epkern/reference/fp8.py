"""The per-token, per-128-channel FP8 (e4m3) cast, bit-exact (semantics.md, "FP8 cast")."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..errors import ArgumentError

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(1e-4)


def _pow2_ceil(v: np.ndarray) -> np.ndarray:
    """2^ceil(log2(v)) for positive float32 v, exactly (frexp, no rounded log2)."""
    mant, exp = np.frexp(v.astype(np.float32))
    exp = np.where(mant == 0.5, exp - 1, exp)  # v already a power of two
    return np.ldexp(np.float32(1.0), exp).astype(np.float32)


def per_token_cast_to_fp8(x, round_scale: bool = False, use_ue8m0: bool = False):
    """x [T, H] (BF16 or float32, H % 128 == 0) -> (e4m3 [T, H], scales).

    Per 128-channel group: amax = max|x| in float32 floored at 1e-4; scale_inv = amax / 448 (float32;
    with round_scale 2^ceil(log2(amax/448))); x_fp8 = e4m3(clip(x / scale_inv, ±448)) with round-to-nearest-
    even. Scales are float32 [T, H/128], or with use_ue8m0 int32 [T, H/512] packing four biased exponent
    bytes (group g in byte g % 4 of word g // 4, little-endian).
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype not in (BF16, np.dtype(np.float32)):
        raise ArgumentError(f"x: expected a 2-D BF16 or float32 array, got {x.dtype} {x.shape}")
    t, h = x.shape
    if h % 128:
        raise ArgumentError(f"x: expected a hidden size that is a multiple of 128, got {h}")
    if use_ue8m0 and not round_scale:
        raise ArgumentError("use_ue8m0: requires round_scale=True")
    if use_ue8m0 and h % 512:
        raise ArgumentError(f"x: use_ue8m0 packs 4 scales per int32: hidden must be a multiple of 512, got {h}")
    xf = x.astype(np.float32).reshape(t, h // 128, 128)
    amax = np.maximum(np.abs(xf).max(axis=2, initial=np.float32(0)), AMAX_FLOOR).astype(np.float32)
    scale_inv = (amax / FP8_MAX).astype(np.float32)
    if round_scale:
        scale_inv = _pow2_ceil(scale_inv)
    q = np.clip((xf / scale_inv[:, :, None]).astype(np.float32), -FP8_MAX, FP8_MAX)
    x_fp8 = q.astype(FP8).reshape(t, h)
    if not use_ue8m0:
        return x_fp8, scale_inv
    _, exp = np.frexp(scale_inv)
    biased = (exp - 1 + 127).astype(np.uint32)  # scale_inv = 2^(exp-1)
    g = biased.reshape(t, h // 512, 4)
    packed = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16) | (g[..., 3] << 24)
    return x_fp8, packed.astype(np.uint32).view(np.int32)


def unpack_ue8m0(packed) -> np.ndarray:
    """int32 [..., H/512] of UE8M0 bytes -> float32 scales [..., H/128]."""
    p = np.asarray(packed).view(np.uint32)
    b = np.stack([(p >> (8 * i)) & 0xFF for i in range(4)], axis=-1).reshape(*p.shape[:-1], -1)
    return np.ldexp(np.float32(1.0), b.astype(np.int32) - 127).astype(np.float32)


def per_token_cast_back(x_fp8, scales) -> np.ndarray:
    """Dequantise: x_fp8 * scale per 128-channel group (float32 scales or UE8M0-packed int32)."""
    x_fp8 = np.asarray(x_fp8)
    scales = np.asarray(scales)
    if scales.dtype == np.int32:
        scales = unpack_ue8m0(scales)
    t, h = x_fp8.shape
    xf = x_fp8.astype(np.float32).reshape(t, h // 128, 128)
    return (xf * scales.astype(np.float32)[:, :, None]).reshape(t, h)
