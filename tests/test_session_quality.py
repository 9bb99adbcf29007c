"""The quality gate judges each frame against its own night, and the reference is the best
early frame: synthetic sessions through the real pipeline (detection, registration, gate,
stack) with known truth from daemon.simulate."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.pipeline.live import LivePipeline, LiveSettings
from tests.test_live import SHAPE, dither, make_frame, run


@pytest.mark.parametrize("bayer", [None, "RGGB"])
@pytest.mark.parametrize("base", [1.2, 1.35])
def test_uniformly_elongated_night_stacks_and_a_trailed_frame_is_rejected(bayer, base):
    """Every frame elongated `base` (a/b; 1.2 is eccentricity ~0.55, 1.35 ~0.67, which the
    old fixed limit of 0.60 rejected in every frame): all are stacked, except frame 7,
    trailed 3x more (elongation 1 + 3 (base - 1)), rejected with a reason naming its
    elongation and the session's."""
    trailed = 1.0 + 3.0 * (base - 1.0)
    frames = [make_frame(i, bayer=bayer, elongation=trailed if i == 7 else base, elongation_angle_deg=30.0)
              for i in range(10)]
    pipe, results = run(frames)
    for i, r in enumerate(results):
        if i == 7:
            assert not r.accepted and r.reason.startswith("trailing: elongation "), r.reason
            value, session = _elongations(r.reason)
            assert value > session + 0.25 and "MAD)" in r.reason, r.reason
            assert session == pytest.approx(base, abs=0.06), r.reason
        else:
            assert r.accepted, (i, r.reason)
    assert pipe.n_stacked == 9
    # Control: the same night against a fixed eccentricity limit below its stars' shape
    # loses frames (what the session-relative gate is for).
    fixed = LiveSettings(max_eccentricity=0.5, elongation_excess=0)
    _, strict = run([make_frame(i, bayer=bayer, elongation=base, elongation_angle_deg=30.0) for i in range(4)], fixed)
    assert sum(not r.accepted for r in strict) >= 2


def _elongations(reason: str) -> tuple[float, float]:
    """(frame, session) elongation from 'trailing: elongation 1.58 vs session 1.20 (...)'."""
    value, rest = reason.split("elongation ")[1].split(" vs session ")
    return float(value), float(rest.split()[0])


def test_a_trailed_frame_during_the_warm_up_is_rejected_too():
    """Frame 2 of the night, before any MAD exists: judged against the median of the frames
    seen so far (the reason says so)."""
    frames = [make_frame(i, elongation=1.8 if i == 2 else 1.1) for i in range(5)]
    _, results = run(frames)
    assert [r.accepted for r in results] == [True, True, False, True, True], [r.reason for r in results]
    assert "warm-up, 2 frames" in results[2].reason


def test_a_blurred_frame_and_a_cloud_are_judged_against_the_session():
    frames = [make_frame(i, fwhm_px=4.0) for i in range(8)]
    blurred = make_frame(8, fwhm_px=6.0)
    cloud = make_frame(9, fwhm_px=4.0, transmission=0.15)
    _, results = run(frames + [blurred, cloud])
    assert all(r.accepted for r in results[:8]), [r.reason for r in results]
    assert results[8].reason.startswith("FWHM ") and "session median" in results[8].reason, results[8].reason
    assert results[9].reason.startswith("clouds: ") and "vs session" in results[9].reason, results[9].reason


def test_reference_is_the_best_early_frame_and_the_stack_stays_in_the_first_frames_grid():
    """Frame 0 in poor seeing, frame 1 the sharpest: frame 1 becomes the registration
    reference; every frame still lands where the truth says in the stack's grid (frame 0's)."""
    fwhm = [4.2, 2.6, 3.0, 3.1, 3.0, 2.9]
    frames = [make_frame(i, fwhm_px=f) for i, f in enumerate(fwhm)]
    pipe, results = run(frames)
    assert all(r.accepted for r in results), [r.reason for r in results]
    assert pipe.reference_path == "/sim/light_001.fits"
    c = np.array([(SHAPE[1] - 1) / 2, (SHAPE[0] - 1) / 2, 1.0])
    for i, r in enumerate(results):
        shift = np.linalg.inv(dither(i)) @ c - c
        assert r.dx == pytest.approx(shift[0], abs=0.2) and r.dy == pytest.approx(shift[1], abs=0.2)
    # The reference survives a checkpoint, and later frames are registered through it.
    resumed = LivePipeline.from_state(pipe.state(), LiveSettings())
    assert resumed.reference_path == "/sim/light_001.fits"
    r = resumed.process(make_frame(6))
    shift = np.linalg.inv(dither(6)) @ c - c
    assert r.accepted and r.dx == pytest.approx(shift[0], abs=0.2) and r.dy == pytest.approx(shift[1], abs=0.2)
    # reference_frames=1: the first frame, as before; set_reference: the observer's choice holds.
    first, _ = run(frames, LiveSettings(reference_frames=1))
    assert first.reference_path == "/sim/light_000.fits"
    chosen = LivePipeline(LiveSettings())
    chosen.set_reference(make_frame(3, fwhm_px=3.1))
    for f in [make_frame(i, fwhm_px=v) for i, v in enumerate(fwhm)]:
        chosen.process(f)
    assert chosen.reference_path == "/sim/light_003.fits"
