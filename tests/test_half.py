"""daemon.pipeline.half: float32 -> float16 bits inside numba kernels, against numpy."""

import numba
import numpy as np

from daemon.pipeline import half


def test_both_half_conversions_match_numpy_on_every_kind_of_float():
    """The hardware conversion (F16C, AArch64) and the integer one for CPUs without it agree
    with numpy's round-to-nearest-even on random float32 bit patterns (normal, subnormal,
    overflowing) and on exact ties, saturating at 65504."""
    rng = np.random.default_rng(11)
    vals = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ties = (np.arange(1, 2048, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24)  # subnormal ties
    ties = np.concatenate([ties, ties * np.float32(2.0 ** 14), [65519.996, 65520.0, -0.0, 0.0]]).astype(np.float32)
    vals = np.concatenate([vals[np.isfinite(vals)], ties, -ties]).astype(np.float32)
    expect = vals.clip(-65504, 65504).astype(np.float16).view(np.uint16)

    def run(convert, v):
        @numba.njit
        def loop(v, out):
            for k in range(v.size):
                out[k] = convert(v[k])

        out = np.empty(v.size, np.uint16)
        loop(v, out)
        return out

    nan = np.array([np.nan, -np.nan], np.float32)
    for convert in (half.to_half_portable,) + ((half.to_half_native,) if half.has_half_instructions() else ()):
        np.testing.assert_array_equal(run(convert, vals), expect)
        assert np.isnan(run(convert, nan).view(np.float16)).all()  # no data stays no data
