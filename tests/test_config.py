"""Config: TOML -> validated dataclasses; errors name the file and the key; --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config, parse_override
from daemon.settings import parse_dec, parse_ra

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lb.toml"
    p.write_text(text)
    return p


def test_example_watch_config_loads_and_builds_live_settings():
    cfg = load_config(ROOT / "config" / "watch.toml")
    assert cfg.capture.dir == Path("/srv/lightbucket/capture") and cfg.capture.recursive is False
    assert "*.fits" in cfg.capture.patterns and cfg.mqtt.port == 1883 and cfg.mqtt.rig == "default"
    assert cfg.indi is None and cfg.plan is None
    assert cfg.output_dir == Path("/var/lib/lightbucket/output")
    from daemon.pipeline.live_settings import LiveSettings

    assert LiveSettings.from_config(cfg.stack, cfg.quality).max_eccentricity == 0.85


def test_overrides_are_typed_and_create_sections(tmp_path):
    p = write(tmp_path, '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n')
    cfg = load_config(p, ["mqtt.port=1999", "mqtt.rig=pier 2", "capture.recursive=true",
                          "capture.patterns=['*.fits']", "stack.kappa=2.5", "state.dir=/other"])
    assert cfg.mqtt.port == 1999 and cfg.mqtt.rig == "pier 2" and cfg.mqtt.host == "127.0.0.1"
    assert cfg.capture.recursive is True and cfg.capture.patterns == ("*.fits",)
    assert cfg.stack == {"kappa": 2.5} and cfg.state.dir == Path("/other")
    assert load_config(p).mqtt is None  # no [mqtt]: logs only


@pytest.mark.parametrize("text, overrides, message", [
    ('[capture]\ndir = "/c"\n[state]\ndir = "/s"\n[mqtt]\nprot = 1\n', [], r"\[mqtt\] prot: unknown key"),
    ('[capture]\ndir = "/c"\n[state]\ndir = "/s"\n', ["mqtt.port=abc"], r"\[mqtt\] port: expected an integer"),
    ('[capture]\ndir = "/c"\n[state]\ndir = "/s"\n', ["capture.recursive=1"], r"\[capture\] recursive: expected true"),
    ('[capture]\ndir = "/c"\n', [], r"\[state\] section missing"),
    ('[capture]\nrecursive = true\n[state]\ndir = "/s"\n', [], r"\[capture\] dir: required key missing"),
    ('[capture]\ndir = "/c"\n[state]\ndir = "/s"\n[camra]\n', [], r"\[camra\]: unknown section"),
    ('[capture\n', [], "not valid TOML"),
    ('[capture]\ndir = "/c"\n[state]\ndir = "/s"\n', ["mqttport=1"], "expected section.key=value"),
])
def test_errors_name_file_and_key(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(p, overrides)
    if "section.key" not in message:
        assert str(p) in str(err.value)


def test_plan_coordinates_sexagesimal_or_degrees(tmp_path):
    p = write(tmp_path, '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n'
                        '[plan]\ntarget = "M27"\nra = "19h59m36s"\ndec = "+22d43m16s"\nexposure_s = 30\n')
    plan = load_config(p).plan
    assert parse_ra(plan.ra) == pytest.approx(299.9, abs=1e-6)
    assert parse_dec(plan.dec) == pytest.approx(22 + 43 / 60 + 16 / 3600, abs=1e-6)
    assert plan.exposure_s == 30.0
    p2 = write(tmp_path, '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n[plan]\ntarget = "X"\nra = 10.5\n')
    assert parse_ra(load_config(p2).plan.ra) == 10.5
    # A coordinate that is no angle stops the daemon at start, naming the file and the key.
    p3 = write(tmp_path, '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n[plan]\ntarget = "X"\ndec = "+95d"\n')
    with pytest.raises(ConfigError, match=r"lb.toml: \[plan\] dec = '\+95d': outside -90..\+90"):
        load_config(p3)


def test_state_and_output_inside_the_watched_folder_are_refused(tmp_path):
    """The daemon's own files (preview.jpg every frame) would be answered as new files."""
    base = '[capture]\ndir = "/c"\n[state]\n'
    with pytest.raises(ConfigError, match=r"\[state\] output_dir = '/c': inside the watched capture.dir"):
        load_config(write(tmp_path, base + 'dir = "/s"\noutput_dir = "/c"\n'))
    with pytest.raises(ConfigError, match=r"\[state\] dir = '/c': inside"):
        load_config(write(tmp_path, base + 'dir = "/c"\n'))
    # A sub-folder is watched only when recursive.
    assert load_config(write(tmp_path, base + 'dir = "/c/state"\n')).state.dir == Path("/c/state")
    with pytest.raises(ConfigError, match=r"\[state\] dir = '/c/state': inside"):
        load_config(write(tmp_path, '[capture]\ndir = "/c"\nrecursive = true\n[state]\ndir = "/c/state"\n'))


def test_plan_entries_are_the_nights_queue_and_errors_name_the_entry(tmp_path):
    base = '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n'
    night = (base + '[[plan]]\ntarget = "M 31"\nra = 10.68\ndec = 41.27\ncount = 30\n'
             '[[plan]]\ntarget = "M 1"\nra = 83.6\ndec = 22.0\ncount = 20\n')
    cfg = load_config(write(tmp_path, night), ["plan.exposure_s=60"])  # --set holds for every plan
    assert [(p.target, p.count, p.exposure_s) for p in cfg.queue] == [("M 31", 30, 60.0), ("M 1", 20, 60.0)]
    assert cfg.plan == cfg.queue[0]
    with pytest.raises(ConfigError, match=r"lb.toml: \[plan 2\] count = -1: must be >= 0"):
        load_config(write(tmp_path, night.replace("count = 20", "count = -1")))
    with pytest.raises(ConfigError, match=r"\[plan 1\] exposure: unknown key"):
        load_config(write(tmp_path, night.replace("count = 30", "exposure = 30")))
    one = load_config(write(tmp_path, base + '[plan]\ntarget = "M 31"\n'))
    assert one.queue == (one.plan,)


def test_parse_override_keeps_strings():
    assert parse_override("mqtt.host=broker.local") == ("mqtt", "host", "broker.local")
    assert parse_override("mqtt.port = 1884") == ("mqtt", "port", 1884)


def test_unknown_stack_key_is_refused_at_start(tmp_path):
    from daemon.session import live_settings

    p = write(tmp_path, '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n[stack]\nkapa = 3\n')
    with pytest.raises(ValueError, match=r"lb.toml.*stack.kapa"):
        live_settings(load_config(p))


def test_focus_section_and_the_plans_focus_and_pointing_keys(tmp_path):
    base = '[capture]\ndir = "/c"\n[state]\ndir = "/s"\n'
    cfg = load_config(write(tmp_path, base + '[focus]\nstep = 2000\npoints = 9\nrefocus_temp_drop_c = 1.5\n'
                                             '[plan]\ntarget = "X"\nautofocus = true\npointing_check_s = 300\n'))
    f = cfg.focus
    assert (f.step, f.points, f.refocus_temp_drop_c, f.exposure_s) == (2000, 9, 1.5, 1.0)
    plan = cfg.plan
    assert plan.autofocus and plan.pointing_check_s == 300.0 and plan.pointing_far_arcsec == 120.0
    assert not plan.pointing_recenter
    assert not load_config(write(tmp_path, base + '[plan]\ntarget = "X"\n')).plan.autofocus
    for text, message in (('[focus]\npoints = 3\n', r"lb.toml: \[focus\] points = 3: must be >= 5"),
                          ('[focus]\nstep = 2.5\n', r"lb.toml: \[focus\] step: expected an integer"),
                          ('[focus]\nrefocus_fwhm_factor = 0.9\n', r"\[focus\] refocus_fwhm_factor = 0.9: must be > 1"),
                          ('[focus]\nbacklash = 10\n', r"\[focus\] backlash: unknown key"),
                          ('[plan]\ntarget = "X"\npointing_check_s = -1\n', r"\[plan\] pointing_check_s = -1.0"),
                          ('[plan]\ntarget = "X"\npointing_far_arcsec = 0\n', r"\[plan\] pointing_far_arcsec = 0.0")):
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, base + text))
