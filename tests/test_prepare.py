"""A stack made ahead of its frames (issue 19, the first frame): while a plan's first exposure
runs, the service makes the stack its frames will go to, its memory written once, so the first
frame does not pay for hundreds of MB of new pages. The stack must come out exactly as one
made by the first frame, and a stack made for frames that do not come must not stay in memory.
(Through the real INDI simulator: tests/test_indi_daemon.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon.pipeline.frame import Frame
from daemon.pipeline.live import LivePipeline
from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.stack import RunningStack, StackSettings
from daemon.routing import StackKey
from daemon.session import LivePipelineFactory, Session
from daemon.simulate import Exposure, Sensor, expose, fits_header, random_star_field, transform_matrix
from tests.test_live import SHAPE, make_frame

_RESIDENT = """
import json
from daemon.pipeline.stack import RunningStack

def resident():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096

out, kept = {}, []
for name, prefault in (("lazy", False), ("made", True)):
    before = resident()
    kept.append(RunningStack((2500, 2500, 3), prefault=prefault))
    out[name] = resident() - before
print(json.dumps(out))
"""


def test_a_prefaulted_stack_is_the_same_empty_stack_with_its_memory_written():
    # Resident memory in a fresh process (malloc as a new daemon finds it: each array well above
    # its mmap threshold, so fresh pages, resident once written).
    proc = subprocess.run([sys.executable, "-c", _RESIDENT], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = json.loads(proc.stdout)
    # Warm-up statistics: mean float32 and m2 bfloat16 per plane, the two brightest samples
    # (float16 per plane, a uint8 frame index each), wsum float32 and count uint16.
    total = 2500 * 2500 * (3 * 4 + 3 * 2 + 2 * (3 * 2 + 1) + 4 + 2)
    assert grown["made"] > 0.95 * total > 2 * grown["lazy"], (grown, total)  # lazy: the NaN mean only
    made, lazy = RunningStack((40, 50, 3), prefault=True).state(), RunningStack((40, 50, 3)).state()
    assert made.keys() == lazy.keys()
    for k, v in made.items():
        assert np.array_equal(v, lazy[k], equal_nan=True) if isinstance(v, np.ndarray) else v == lazy[k], k
    no_reject = RunningStack((50, 60), StackSettings(reject=False), prefault=True).state()
    assert not no_reject["m2"].any() and "top1" not in no_reject


@pytest.mark.parametrize("bayer, debayer", [(None, "bilinear"), ("RGGB", "bilinear"), ("RGGB", "superpixel")])
def test_the_first_frame_takes_the_stack_made_ahead_and_stacks_exactly_as_without(bayer, debayer):
    settings = LiveSettings(debayer=debayer)
    plain = LivePipeline(settings)
    for i in range(7):
        assert plain.process(make_frame(i, bayer=bayer)).accepted
    pipe = LivePipeline(settings)
    made = pipe.prepare(SHAPE, bayer)
    assert made.shape == plain.stack_image().shape
    for i in range(7):
        pipe.process(make_frame(i, bayer=bayer))
    assert np.shares_memory(pipe.stack_image(), made.image())  # the one made ahead took the frames
    np.testing.assert_array_equal(pipe.stack_image(), plain.stack_image())
    assert pipe.prepare(SHAPE, bayer) is None  # it has its stack


def test_a_frame_of_another_shape_gets_its_own_stack_and_reset_frees_the_one_made_ahead():
    pipe = LivePipeline()
    made = weakref.ref(pipe.prepare((SHAPE[0] + 2, SHAPE[1]), None))
    pipe.process(make_frame(0))
    assert made() is None and pipe.stack_image().shape == SHAPE
    other = LivePipeline()
    made = weakref.ref(other.prepare(SHAPE, "RGGB"))
    other.reset()
    assert made() is None


def _write(path, i: int, target: str, size: int = 160) -> None:
    field = random_star_field((size, size), 150, seed=3, margin=0.1)
    exp = Exposure(exposure_s=10.0, matrix=transform_matrix(0.7 * i, -0.4 * i, 0.3 * i), seed=i)
    fits.writeto(path, expose((size, size), field, exp, Sensor()),
                 fits.Header(fits_header(exposure_s=10.0, filter_name="L", target=target)))


def test_session_hands_the_stack_made_ahead_to_the_new_stack_and_frees_one_not_taken(tmp_path):
    capture = tmp_path / "capture"
    capture.mkdir()
    session = Session(tmp_path / "state", capture, tmp_path / "out", LivePipelineFactory(LiveSettings(), {}),
                      None, {})
    key = StackKey("R", "L", 10.0, 1)
    made = session.prepare((160, 160), None, key)
    assert made.shape == (160, 160)
    for i in range(2):
        _write(capture / f"r{i}.fits", i, "R")
        assert session.process(capture / f"r{i}.fits", False).outcome == "stacked"
    assert np.shares_memory(session.stacks[key.name].pipeline.stack_image(), made.image())
    # Its stack exists: nothing is made for more frames of it.
    assert session.prepare((160, 160), None, key) is None
    # Made for frames of a stack that exists (the plan said another name): freed by the next frame.
    made = weakref.ref(session.prepare((160, 160), None, StackKey("S", "L", 10.0, 1)))
    assert made() is not None
    _write(capture / "r2.fits", 2, "R")
    session.process(capture / "r2.fits", False)
    assert made() is None and set(session.stacks) == {key.name}
    # Made for another frame size: the new stack is made for its frames, the one made ahead freed.
    made = weakref.ref(session.prepare((150, 150), None, StackKey("T", "L", 10.0, 1)))
    _write(capture / "t0.fits", 0, "T")
    session.process(capture / "t0.fits", False)
    assert made() is None and session.stacks["T_L_10s_bin1"].pipeline.stack_image().shape == (160, 160)
    # The plan ended before its frames: freed at once.
    made = weakref.ref(session.prepare((160, 160), None, StackKey("U", "L", 10.0, 1)))
    session.prepare(None, None)
    assert made() is None
    session.close()


def test_a_file_seen_being_written_gets_its_stack_made_from_its_header(tmp_path):
    """Frames of another capture program: the watcher reports a file at its first event
    (`Session.prepare_for`), while only its header is written; the stack is made then, once,
    and the frame takes it when it is complete."""
    capture = tmp_path / "capture"
    capture.mkdir()
    session = Session(tmp_path / "state", capture, tmp_path / "out", LivePipelineFactory(LiveSettings(), {}),
                      None, {})
    _write(tmp_path / "whole.fits", 0, "R")
    path = capture / "r0.fits"
    path.write_bytes((tmp_path / "whole.fits").read_bytes()[:2880])  # the header, no data yet
    made = session.prepare_for(path)
    assert made is not None and made.shape == (160, 160)
    assert session.prepare_for(path) is None  # seen again: the same spare is kept, not made again
    path.write_bytes((tmp_path / "whole.fits").read_bytes())
    assert session.process(path, False).outcome == "stacked"
    assert np.shares_memory(session.stacks["R_L_10s_bin1"].pipeline.stack_image(), made.image())
    assert session.prepare_for(path) is None  # dealt with
    _write(capture / "r1.fits", 1, "R")
    assert session.prepare_for(capture / "r1.fits") is None  # its stack exists
    # A calibration frame, and a file whose header does not tell: nothing made.
    fits.writeto(capture / "d0.fits", np.zeros((160, 160), np.uint16),
                 fits.Header(fits_header(exposure_s=10.0, frame_type="Dark", target="S")))
    (capture / "x.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    assert session.prepare_for(capture / "d0.fits") is None and session.prepare_for(capture / "x.fits") is None
    assert session._spare is None  # noqa: SLF001 - nothing held for them
    session.close()


def test_no_frame_reaches_a_stack_made_ahead_twice():
    """The frame that takes the stack made ahead is its first: the image equals the frame's
    own (a stack of one), not the frame added to something left in it."""
    pipe = LivePipeline()
    pipe.prepare(SHAPE, None)
    frame = make_frame(0)
    data = frame.data.copy()
    pipe.process(Frame(frame.data, frame.meta))
    image = pipe.stack_image()
    ok = np.isfinite(image)
    assert ok.mean() > 0.99
    np.testing.assert_allclose(image[ok], data[ok], rtol=1e-6, atol=1e-3)


def test_session_short_of_memory_stacks_colour_at_superpixel_and_says_why(tmp_path, caplog):
    """The service's factory passes the machine's memory (`process_memory_bytes`): with too
    little for a full-resolution colour stack, the new stack is superpixel, the log says why
    and how to force full resolution, and the frame loader stops keeping the mosaics (they are
    freed once debayered)."""
    from daemon.io.load import FrameLoader
    from daemon.pipeline.stack import stack_bytes

    capture = tmp_path / "capture"
    capture.mkdir()
    size = 160
    short = 2 * stack_bytes((size, size, 3))  # under 3x: full resolution does not fit
    loader = FrameLoader()
    session = Session(tmp_path / "state", capture, tmp_path / "out", LivePipelineFactory(LiveSettings(), {}, short),
                      loader, {})
    field = random_star_field((size, size), 150, seed=3, margin=0.1)
    for i in range(3):
        exp = Exposure(exposure_s=10.0, matrix=transform_matrix(0.7 * i, -0.4 * i, 0.3 * i), seed=i)
        fits.writeto(capture / f"c{i}.fits", expose((size, size), field, exp, Sensor(bayer="RGGB")),
                     fits.Header(fits_header(exposure_s=10.0, bayer="RGGB", target="C")))
        with caplog.at_level("WARNING", logger="lightbucket"):
            assert session.process(capture / f"c{i}.fits", False).outcome == "stacked"
    (stack,) = session.stacks.values()
    assert stack.pipeline.stack_image().shape == (size // 2, size // 2, 3)
    warned = [r.getMessage() for r in caplog.records if "superpixel" in r.getMessage()]
    assert len(warned) == 1 and stack.key.name in warned[0] and "160x160" in warned[0]
    assert '[stack] debayer = "bilinear"' in warned[0]
    assert loader.keep_large is False
    # ... and `status` says it too, for the stack in hand.
    from daemon.events import status_document

    status = status_document(session.snapshot(), state="running", queue=0, pending=set())
    assert status["stack"] == stack.key.name and "superpixel" in status["resolution_note"]
    assert "160x160" in status["resolution_note"]
    session.close()
