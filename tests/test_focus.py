"""Autofocus arithmetic: curve fits against known curves, sweeps, backlash, refocus triggers."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.focus import RefocusTrigger, approach, fit_curve, next_sweep, sweep


def hyperbola(x, a=1.8, b=2500.0, c=36667.0):
    return a * np.sqrt(1 + ((np.asarray(x, float) - c) / b) ** 2)


@pytest.mark.parametrize("truth", [36667, 41000])
def test_hyperbola_minimum_found_from_noisy_samples(truth):
    rng = np.random.default_rng(3)
    x = np.arange(truth - 12000, truth + 12001, 3000) + 700
    y = hyperbola(x, c=truth) * (1 + rng.normal(0, 0.03, x.size))
    fit = fit_curve(x, y)
    assert fit.ok and abs(fit.best_position - truth) < 600
    assert fit.best_hfr_px == pytest.approx(1.8, rel=0.15)


def test_parabolic_curve_of_the_indi_simulator_is_fitted_too():
    # indi_simulator_focus: FWHM = 0.5625 t^2 + seeing, t = (x - best) / 5000
    x = np.arange(20000, 54000, 4000)
    y = (0.5625 * ((x - 36667) / 5000.0) ** 2 + 3.5) / 2.0
    fit = fit_curve(x, y)
    assert fit.ok and abs(fit.best_position - 36667) < 300


def test_a_sweep_on_one_side_of_focus_is_refused_and_moves_on():
    x = np.arange(50000, 74001, 3000)
    y = hyperbola(x)
    fit = fit_curve(x, y)
    assert not fit.ok and "below" in fit.reason
    nxt = next_sweep(x, y, 3000, 9)
    assert nxt[0] < 50000 and nxt[-1] - nxt[0] == 24000
    assert next_sweep(np.arange(24000, 48001, 3000), hyperbola(np.arange(24000, 48001, 3000)), 3000, 9) is None


def test_frames_without_stars_are_ignored_and_too_few_refused():
    x = [1, 2, 3, 4, 5, 6]
    assert "samples" in fit_curve(x, [None, 2.0, np.nan, 1.0, 2.0, None]).reason


def test_sweep_stays_within_the_focuser_range_and_backlash_approach():
    assert sweep(1000, 500, 5) == [0, 500, 1000, 1500, 2000]
    assert sweep(500, 500, 5) == [0, 500, 1000, 1500, 2000]
    assert sweep(99500, 500, 5, 0, 100000)[-1] == 100000
    assert approach(100, 500, 300) == [500]
    assert approach(900, 500, 300) == [200, 500]  # from above: overshoot, come back outward


def test_refocus_trigger_on_fwhm_rise_and_temperature_drop():
    t = RefocusTrigger(fwhm_factor=1.3, temp_drop_c=2.0, min_frames=3)
    assert [t.frame(f, 10.0) for f in (2.0, 2.1, 2.0, 2.2)] == [None] * 4
    reasons = [t.frame(f, 10.0) for f in (2.7, 2.8)]  # medians of the last 3: 2.2, then 2.7
    assert reasons[0] is None and "1.35x the night's best 2.00" in reasons[1]
    t.focused(10.0)
    assert t.frame(2.0, 9.0) is None and "below the last focus" in t.frame(2.0, 7.9)


def test_after_a_focus_run_worse_seeing_sets_the_baseline_not_a_refocus_loop():
    t = RefocusTrigger(fwhm_factor=1.3, temp_drop_c=2.0, min_frames=3)
    for f in (2.0, 2.0, 2.0, 2.7, 2.7):
        reason = t.frame(f)
    assert "the night's best 2.00" in reason
    t.focused(None)  # the run could not beat a seeing that is now 2.8 px
    assert [t.frame(f) for f in (2.8, 2.9, 2.8, 2.9, 2.8)] == [None] * 5  # 1.04x the new best
    late = [t.frame(f) for f in (3.7, 3.7)]
    assert late[0] is None and "x the best since the last focus 2.80" in late[1]  # 1.32x


def test_refocus_trigger_without_a_temperature_probe_and_bad_settings():
    t = RefocusTrigger(min_frames=1)
    assert t.frame(2.0, None) is None and t.frame(2.0, None) is None and t.focus_temp_c is None
    assert RefocusTrigger().frame(None, -1.0) is None  # the first reading is the baseline
    t2 = RefocusTrigger()
    assert t2.frame(None, 5.0) is None and t2.frame(None, 3.5) is None and "2.0 C below" in t2.frame(None, 3.0)
    for bad in ({"fwhm_factor": 1.0}, {"temp_drop_c": 0.0}, {"min_frames": 0}):
        with pytest.raises(ValueError, match="focus.refocus_"):
            RefocusTrigger(**bad)
