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


def test_kernels_compiled_for_a_cpu_without_f16c_take_the_portable_conversion(tmp_path):
    """Observatory mini PCs (Celeron/Atom without AVX) have no F16C: LLVM would call a helper
    numba does not link (a segfault). Compiled for such a CPU (NUMBA_CPU_NAME=generic, in a
    fresh interpreter and cache), the stack and the spool take the integer conversion and
    give the same bits as here."""
    import os
    import subprocess
    import sys

    from daemon.pipeline.stack import RunningStack
    from daemon.spool import encode

    img = np.random.default_rng(2).normal(900.0, 300.0, (32, 40)).astype(np.float32)
    img[0, :4] = [np.nan, 1e-7, 70000.0, -5.0]
    probe = (
        "import sys, numpy as np\n"
        "from daemon.pipeline import half\n"
        "from daemon.pipeline.stack import RunningStack\n"
        "from daemon.spool import encode\n"
        "img = np.load(sys.argv[1])\n"
        "s = RunningStack(img.shape); s.add(img)\n"
        "np.save(sys.argv[2], s.state()['top1']); np.save(sys.argv[3], encode(img).data)\n"
        "t = RunningStack(img.shape)\n"
        "for k in range(7): t.add(img * np.float32(1 + 0.01 * k) + np.float32(3 * k))\n"
        "np.save(sys.argv[4], t.mean)\n"
        "print(half.to_half is half.to_half_portable, half.HALF_TO_FLOAT_NATIVE)\n"
    )
    np.save(tmp_path / "img.npy", img)
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "img.npy"), str(tmp_path / "top.npy"),
                          str(tmp_path / "spool.npy"), str(tmp_path / "mean.npy")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True False"
    here = RunningStack(img.shape)
    here.add(img)
    np.testing.assert_array_equal(np.load(tmp_path / "top.npy"), here.state()["top1"])
    # Through the warm-up, its re-check (warm-up samples read back: a table there, the CPU's
    # conversion here) and beyond: the same stack.
    more = RunningStack(img.shape)
    for k in range(7):
        more.add(img * np.float32(1 + 0.01 * k) + np.float32(3 * k))
    np.testing.assert_array_equal(np.load(tmp_path / "mean.npy"), more.mean)
    np.testing.assert_array_equal(np.load(tmp_path / "spool.npy").view(np.uint16)[~np.isnan(img)],
                                  encode(img).data.view(np.uint16)[~np.isnan(img)])


def test_half_bits_read_back_as_numpy_reads_them():
    """`from_half_native` (the kernels' reading of warm-up samples where the CPU converts
    half floats) gives numpy's float32 for every one of the 65536 bit patterns."""
    if not half.HALF_TO_FLOAT_NATIVE:
        import pytest

        pytest.skip("this CPU has no half-float conversion: kernels read a table instead")

    @numba.njit
    def loop(bits, out):
        for k in range(bits.size):
            out[k] = half.from_half_native(bits[k])

    bits = np.arange(65536, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    loop(bits, out)
    np.testing.assert_array_equal(out, bits.view(np.float16).astype(np.float32))
