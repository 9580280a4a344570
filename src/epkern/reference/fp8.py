"""The per-token, per-128-channel FP8 (e4m3) cast, bit-exact (semantics.md, "FP8 cast").

Arithmetic, all IEEE float32 with round-to-nearest-even, per token and 128-channel group g:

1. ``amax = max(max_i |float32(x[i])|, float32(1e-4))`` (a maximum is exact, so its order is irrelevant);
2. ``scale_inv = amax / float32(448)`` (one correctly rounded float32 division, CUDA ``__fdiv_rn``);
   with ``round_scale`` it is then replaced by ``2^ceil(log2(scale_inv))``, computed exactly from the
   float32 value: ``m, e = frexp(scale_inv)`` (``scale_inv = m·2^e``, ``m`` in [0.5, 1)); the result is
   ``scale_inv`` itself when ``m == 0.5`` (already a power of two), else ``2^e``;
3. ``x_fp8 = e4m3(clip(float32(x) / scale_inv, -448, 448))``: one float32 division per element (not a
   multiplication by a reciprocal), then a round-to-nearest-even cast to e4m3 (CUDA
   ``__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3)`` gives the same bits after the clip).

Dequantisation is ``float32(x_fp8) · scale_inv`` (one float32 multiplication).

UE8M0 (``use_ue8m0``, needs ``round_scale``): the power of two ``scale_inv = 2^p`` is stored as the byte
``p + 127``; scale group g of a token goes into byte ``g % 4`` (least significant byte first) of int32 word
``g // 4``. The byte 0xFF means NaN (as in the OCP MX spec); it is produced only for non-finite scales.

Non-finite inputs are outside the exactness contract: the result is what the float32 arithmetic above
gives (NaN/inf propagate; numpy's NaN-propagating max is used).
"""

from __future__ import annotations

import numpy as np

from ..errors import ArgumentError
from ._checks import BF16, F32, FP8

FP8_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(1e-4)
GROUP = 128  # channels per scale
UE8M0_BIAS = 127

__all__ = [
    "AMAX_FLOOR",
    "BF16",
    "FP8",
    "FP8_MAX",
    "pack_ue8m0",
    "per_token_cast_back",
    "per_token_cast_to_fp8",
    "pow2_ceil",
    "unpack_ue8m0",
]


def pow2_ceil(v) -> np.ndarray:
    """``2^ceil(log2(v))`` for positive finite float32 ``v``, exactly (frexp; no rounded log2)."""
    v = np.asarray(v, dtype=np.float32)
    mant, exp = np.frexp(v)
    exp = np.where(mant == np.float32(0.5), exp - 1, exp)  # v is already 2^(exp-1)
    with np.errstate(over="ignore"):
        out = np.ldexp(np.float32(1.0), exp.astype(np.int32)).astype(np.float32)
    return np.where(np.isfinite(v), out, v).astype(np.float32)  # keep inf / NaN as they are


def pack_ue8m0(scales) -> np.ndarray:
    """float32 power-of-two scales [..., G] (G % 4 == 0) -> int32 [..., G/4] of UE8M0 bytes."""
    scales = np.asarray(scales)
    if scales.dtype != F32 or scales.ndim < 1 or scales.shape[-1] % 4:
        raise ArgumentError(
            f"scales: expected float32 [..., G] with G a multiple of 4, got {scales.dtype} {list(scales.shape)}"
        )
    mant, exp = np.frexp(scales)
    finite = np.isfinite(scales) & (scales > 0)
    if not np.all(mant[finite] == 0.5):
        raise ArgumentError("scales: expected powers of two (UE8M0 stores only an exponent)")
    biased = exp.astype(np.int64) - 1 + UE8M0_BIAS  # scales = 2^(exp - 1)
    if np.any(finite & ((biased < 0) | (biased > 254))):
        raise ArgumentError("scales: expected powers of two in [2^-127, 2^127]")
    b = np.where(finite, biased, 0xFF).astype(np.uint32)
    b = b.reshape(*b.shape[:-1], b.shape[-1] // 4, 4)
    packed = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return packed.astype(np.uint32).view(np.int32)


def unpack_ue8m0(packed) -> np.ndarray:
    """int32 [..., H/512] of UE8M0 bytes -> float32 scales [..., H/128]: byte b -> 2^(b - 127) (0xFF: NaN)."""
    packed = np.asarray(packed)
    if packed.dtype.kind not in "iu" or packed.dtype.itemsize != 4 or packed.ndim < 1:
        raise ArgumentError(f"packed: expected an int32 array [..., H/512], got {packed.dtype} {list(packed.shape)}")
    p = packed.view(np.uint32)
    b = np.stack([(p >> np.uint32(8 * i)) & np.uint32(0xFF) for i in range(4)], axis=-1)
    b = b.reshape(*p.shape[:-1], p.shape[-1] * 4).astype(np.int32)
    nan = b == 0xFF
    # 2^-127 (byte 0) is a float32 subnormal: exact
    out = np.ldexp(np.float32(1.0), np.where(nan, 0, b - UE8M0_BIAS)).astype(np.float32)
    return np.where(nan, np.float32(np.nan), out).astype(np.float32)


def per_token_cast_to_fp8(x, round_scale: bool = False, use_ue8m0: bool = False):
    """x [T, H] (BF16 or float32, H % 128 == 0) -> (x_fp8 e4m3 [T, H], scales).

    Scales: float32 ``scale_inv`` [T, H/128]; with ``use_ue8m0`` (requires ``round_scale=True`` and
    H % 512 == 0) int32 [T, H/512] packing four UE8M0 bytes. The arithmetic is the module docstring's.
    """
    x = np.asarray(x)
    if x.dtype not in (BF16, F32):
        raise ArgumentError(f"x: expected dtype bfloat16 or float32, got {x.dtype}")
    if x.ndim != 2:
        raise ArgumentError(f"x: expected shape [T, H], got {list(x.shape)}")
    t, h = x.shape
    if h % GROUP:
        raise ArgumentError(f"x: expected a hidden size that is a multiple of 128, got {h}")
    if use_ue8m0 and not round_scale:
        raise ArgumentError("use_ue8m0: requires round_scale=True (UE8M0 stores powers of two)")
    if use_ue8m0 and h % (4 * GROUP):
        raise ArgumentError(f"x: use_ue8m0 packs four scales per int32, so H must be a multiple of 512, got {h}")
    xf = x.astype(np.float32).reshape(t, h // GROUP, GROUP)
    amax = np.abs(xf).max(axis=2, initial=np.float32(0)).astype(np.float32)
    amax = np.maximum(amax, AMAX_FLOOR).astype(np.float32)
    scale_inv = (amax / FP8_MAX).astype(np.float32)
    if round_scale:
        scale_inv = pow2_ceil(scale_inv)
    with np.errstate(invalid="ignore", over="ignore"):
        q = np.clip((xf / scale_inv[:, :, None]).astype(np.float32), -FP8_MAX, FP8_MAX)
    x_fp8 = q.astype(FP8).reshape(t, h)
    if not use_ue8m0:
        return x_fp8, scale_inv
    return x_fp8, pack_ue8m0(scale_inv)


def per_token_cast_back(x_fp8, scales) -> np.ndarray:
    """Dequantise: float32 [T, H] = float32(x_fp8) · scale of its 128-channel group (one float32 product).

    ``scales``: float32 [T, H/128], or int32 [T, H/512] of UE8M0 bytes (unpacked with ``unpack_ue8m0``)."""
    x_fp8 = np.asarray(x_fp8)
    if x_fp8.dtype != FP8 or x_fp8.ndim != 2 or x_fp8.shape[1] % GROUP:
        raise ArgumentError(
            f"x_fp8: expected float8_e4m3fn [T, H] with H a multiple of 128, got {x_fp8.dtype} {list(x_fp8.shape)}"
        )
    t, h = x_fp8.shape
    scales = np.asarray(scales)
    if scales.dtype == np.int32:
        if scales.shape != (t, h // (4 * GROUP)) or h % (4 * GROUP):
            raise ArgumentError(f"scales: expected int32 UE8M0 [{t}, {h // 512}], got {list(scales.shape)}")
        scales = unpack_ue8m0(scales)
    elif scales.dtype != F32 or scales.shape != (t, h // GROUP):
        raise ArgumentError(
            f"scales: expected float32 [{t}, {h // GROUP}] (or int32 UE8M0), got {scales.dtype} {list(scales.shape)}"
        )
    xf = x_fp8.astype(np.float32).reshape(t, h // GROUP, GROUP)
    return (xf * scales[:, :, None]).astype(np.float32).reshape(t, h)
