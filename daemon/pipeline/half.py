"""float32 -> IEEE 754 half precision inside numba kernels (numba has no float16 type).

Why: the stack keeps its warm-up samples and the spool its frames as float16 bits (half the
memory and disk of float32, ~0.05 % precision, far below shot noise). `to_half` is LLVM's own
conversion where the CPU has one (x86 F16C, every AArch64): one instruction per 8-16 values
that vectorises; elsewhere the same result in integer arithmetic. Round to nearest even,
bit for bit numpy's `astype(np.float16)`, except that finite values beyond +-65504 saturate
there instead of becoming inf (a saturated star core after flat division must stay finite).
NaN stays NaN. Checked on AArch64 too (Debian 12 arm64 under qemu-user, numba 0.68.1): the
hardware path is taken, matches numpy, and a stack and a spooled frame come out bit-identical
to x86's.

bfloat16 (`to_bfloat16` / `from_bfloat16` in kernels, `bfloat16_bits` / `bfloat16_values` on
numpy arrays, bit for bit the same) is the top half of a float32: float32's range, 8
significant bits, so a rounding error <= 2^-8 (0.4 %) of the value, round to nearest even.
Integer arithmetic only: the same cost and result on every CPU. For finite values (what the
stack keeps in it: its warm-up m2, ADU^2 from 1e-8 to 1e10, where range matters more than
precision).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic


@intrinsic
def _fptrunc_half(typingctx, val):
    """float32 -> half bits (round to nearest even) as uint16: LLVM's fptrunc + bitcast."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _fpext_half(typingctx, bits):
    """half bits (uint16) -> float32: a bitcast to LLVM's half + fpext (exact)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float_bits(typingctx, val):
    """The bits of a float32 as uint32 (a register bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, val):
    """A uint32 as the float32 with those bits (a register bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def has_half_instructions() -> bool:
    """Whether LLVM converts float32 to half in hardware here. Without it LLVM calls a runtime
    helper that numba does not link (measured: a segfault), so those CPUs (x86 before 2012,
    and the Atom/Celeron lines without AVX that many observatory mini PCs use) take
    `to_half_portable`."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    # numba compiles for the host's features unless told otherwise (NUMBA_CPU_NAME=generic or
    # NUMBA_CPU_FEATURES, e.g. for portable caches): then only what it is told counts.
    features = numba.config.CPU_FEATURES
    if features is not None:
        return "+f16c" in features.split(",")
    try:
        import llvmlite.binding as llvm

        return bool(llvm.get_host_cpu_features().get("f16c"))
    except Exception:  # noqa: BLE001 - unknown: the portable path is always right
        return False


@numba.njit(inline="always")
def to_half_native(val):
    """float32 -> half bits with the CPU's conversion (see the module docstring)."""
    v = np.float32(val)
    clamped = min(max(v, np.float32(-65504.0)), np.float32(65504.0))
    return _fptrunc_half(v if v != v else clamped)  # NaN: not clamped, stays NaN


@numba.njit(inline="always")
def to_half_portable(val):
    """`to_half_native` in integer arithmetic, bit for bit on finite values (with branches:
    not vectorised)."""
    b = _float_bits(np.float32(val))
    sign = (b >> 16) & 0x8000
    e = (b >> 23) & 0xFF
    mant = b & 0x7FFFFF
    if e == 0xFF:
        return np.uint16(sign | 0x7C00 | (0x200 if mant else 0))
    e = e - 112  # rebias 127 -> 15
    if e >= 31:
        return np.uint16(sign | 0x7BFF)  # saturate at the largest finite half, never inf
    if e <= 0:  # subnormal half
        if e < -10:
            return np.uint16(sign)
        mant = mant | 0x800000
        shift = 14 - e
        h = mant >> shift
        rem = mant & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (h & 1)):
            h += 1
        return np.uint16(sign | h)
    h = (e << 10) | (mant >> 13)
    rem = mant & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1)):
        h += 1  # a carry into the exponent is still the right rounding
    return np.uint16(sign | min(h, 0x7BFF))


#: The conversion kernels call: `to_half_native` where the CPU has one, else the portable one.
to_half = to_half_native if has_half_instructions() else to_half_portable


@numba.njit(inline="always")
def from_half_native(bits):
    """half bits -> float32 with the CPU's conversion (exact; NaN stays NaN)."""
    return _fpext_half(np.uint16(bits))


#: Whether kernels may call `from_half_native` (else they look half values up in a table).
HALF_TO_FLOAT_NATIVE = has_half_instructions()


@numba.njit(inline="always")
def to_bfloat16(val):
    """float32 -> bfloat16 bits (uint16), round to nearest even (finite values)."""
    b = _float_bits(np.float32(val))
    return np.uint16((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@numba.njit(inline="always")
def from_bfloat16(bits):
    """bfloat16 bits -> float32 (exact)."""
    return _bits_float(np.uint32(bits) << np.uint32(16))


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """`to_bfloat16` of an array (finite values): uint16 bits."""
    b = np.ascontiguousarray(values, np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """`from_bfloat16` of an array of bfloat16 bits: float32 (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
