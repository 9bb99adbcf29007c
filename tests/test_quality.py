"""Quality gate: each kind of bad frame is rejected with the reason that names its cause.

The gate's inputs here are metrics; tests/test_live.py drives it with real simulated frames
(cloud, trailing) through star detection and registration.
"""

import pytest

from daemon.pipeline.live_settings import LiveSettings
from daemon.pipeline.quality import QualityHistory, QualitySettings, assess

GOOD = dict(n_stars=140, fwhm_px=3.0, eccentricity=0.3, background=100.0)
REF = dict(ref_stars=140, ref_noise=10.0)


def history():
    h = QualityHistory()
    for f, b in [(3.0, 100.0), (3.1, 102.0), (2.9, 98.0)]:
        h.accept(f, b, keep=10, elongation=1.05, n_stars=140)
    return h


def judge(**kw):
    args = {**GOOD, **REF, "history": history(), **kw}
    return assess(**args)


def test_good_frame_passes():
    v = judge()
    assert v.accepted and v.reason is None


def test_cloud_is_named_with_star_counts():
    v = judge(n_stars=30)
    assert not v.accepted and v.check == "clouds"
    assert v.reason == "clouds: 30 of 140 reference stars"


def test_trailing_fwhm_background_and_registration():
    v = judge(eccentricity=0.8)  # elongation 1.67 against a session of 1.05
    assert (v.accepted, v.check) == (False, "trailing") and "elongation 1.67 vs session 1.05" in v.reason
    v = judge(eccentricity=0.9, history=QualityHistory())  # the backstop, with no session yet
    assert (v.accepted, v.check) == (False, "trailing") and "eccentricity 0.90 > 0.85" in v.reason
    v = judge(fwhm_px=5.0)
    assert (v.accepted, v.check) == (False, "fwhm") and "session median 3.00" in v.reason
    v = assess(**{**GOOD, **REF, "history": history(), "fwhm_px": 3.2},
               settings=QualitySettings(max_fwhm_px=3.1))
    assert v.check == "fwhm" and "limit 3.10" in v.reason
    v = judge(background=400.0)
    assert (v.accepted, v.check) == (False, "background") and "recent 100.0" in v.reason
    v = judge(registration_ok=False, registration_reason="only 2 matches")
    assert v.check == "registration" and "only 2 matches" in v.reason


def test_slow_drift_is_not_a_jump_and_thresholds_switch_off():
    h = QualityHistory()
    bg = 100.0
    for _ in range(30):  # sky brightening 3 % per frame: accepted all along
        v = assess(**{**GOOD, **REF, "background": bg, "history": h})
        assert v.accepted, v.reason
        h.accept(3.0, bg, keep=10)
        bg *= 1.03
    off = QualitySettings(min_star_fraction=0, min_stars=0, fwhm_factor=0, max_eccentricity=0, elongation_excess=0,
                          background_jump=0)
    assert assess(**{**GOOD, **REF, "n_stars": 1, "eccentricity": 0.99, "fwhm_px": 50.0,
                     "background": 1e4, "history": history()}, settings=off).accepted


def test_a_lasting_change_needs_every_frame_of_the_run():
    """Nine sky levels 3x the session's seen in a row, then a tenth: the session moves to
    them (accepted); with one frame of the run at the old level, it does not (rejected).
    Rows of an older checkpoint (without the background column) count as not beyond."""
    s = QualitySettings(session_change=10)
    for gap in (None, 4):
        h = history()
        for i in range(9):
            bg = 100.0 if i == gap else 300.0
            h.observe(3.0, 1.05, 140, keep=20, background=bg)
        v = assess(**{**GOOD, **REF, "background": 300.0, "history": h}, settings=s)
        assert v.accepted == (gap is None), v.reason
    h = history()
    h.seen = [[3.0, 1.05, 140.0]] * 9  # as restored from a checkpoint written before the column
    v = assess(**{**GOOD, **REF, "background": 300.0, "history": h}, settings=s)
    assert v.check == "background", v.reason



def test_session_change_beyond_the_window_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"quality.session_change must be within 0..quality.history \(20\), got 30"):
        LiveSettings.from_config(quality={"session_change": 30})
    assert LiveSettings.from_config(quality={"session_change": 0}).quality_settings.session_change == 0
