"""The queue of plans (daemon.plan_queue): order, how entries end, resume after a restart."""

from __future__ import annotations

from daemon.plan_queue import PlanQueue
from daemon.settings import PlanSettings

M31 = PlanSettings(target="M 31", ra="00h42m44s", dec="+41d16m09s", count=30)
M42 = PlanSettings(target="M 42", ra="05h35m17s", dec="-05d23m28s", count=20, min_altitude_deg=30)
M1 = PlanSettings(target="M 1", ra="05h34m32s", dec="+22d00m52s", count=10)


def test_runs_in_order_and_moves_on_when_a_target_sets_or_is_refused():
    q = PlanQueue([M31, M42, M1])
    e = q.next()
    assert e.plan is M31 and e.state == "running" and q.current() is e
    q.frame("/c/a1.fits")
    q.finish({"state": "done", "paths": ["/c/a1.fits"], "ended": "target sets"})
    e = q.next()
    assert e.plan is M42
    q.finish({"state": "refused", "paths": [], "reason": "M 42 never rises above 30 deg ..."})
    assert q.next().plan is M1
    q.finish({"state": "done", "paths": ["/c/m1.fits"] * 10, "ended": "count"})
    assert q.next() is None
    assert [x["state"] for x in q.status()["entries"]] == ["done", "refused", "done"]
    assert q.status()["entries"][0]["frames"] == 1 and q.status()["entries"][1]["reason"].startswith("M 42")


def test_dawn_ends_the_night_a_failure_halts_and_stop_resumes():
    q = PlanQueue([M31, M42])
    q.next()
    q.finish({"state": "done", "paths": [], "ended": "dawn"})
    assert q.next() is None and q.status()["night_over"]
    q.new_night()
    assert q.next().plan is M42  # the next evening goes on with the rest
    q.fail("meridian flip failed: pier side did not change")
    assert q.halted and q.next() is None

    q = PlanQueue([M31, M42])
    q.next()
    q.frame("/c/1.fits")
    q.finish({"state": "stopped", "paths": ["/c/1.fits"]})
    again = q.next()
    assert again.plan is M31 and again.paths == ["/c/1.fits"]  # resumed with its frame


def test_restart_resumes_the_running_plan_with_its_frames(tmp_path):
    path = tmp_path / "queue.json"
    q = PlanQueue([M31, M42, M1])
    q.next()
    q.finish({"state": "done", "paths": ["/c/a.fits"], "ended": "count"})
    q.next()
    for i in range(7):
        q.frame(f"/c/b{i}.fits")
        q.save(path)
    # kill -9 here: the new process loads what was saved
    q2 = PlanQueue.load(path, [M31, M42, M1])
    e = q2.next()
    assert e.plan == M42 and len(e.paths) == 7 and q2.entries[0].state == "done"
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left
    # A changed config from the second plan on: that part starts afresh.
    changed = PlanSettings(**{**M42.__dict__, "count": 40})
    q3 = PlanQueue.load(path, [M31, changed, M1])
    assert q3.entries[0].state == "done" and q3.entries[1].state == "pending" and q3.entries[1].paths == []
    # A torn or foreign file: a fresh queue, not a crash.
    path.write_text('{"entries": [')
    assert [e.state for e in PlanQueue.load(path, [M31]).entries] == ["pending"]
    assert [e.state for e in PlanQueue.load(tmp_path / "none.json", [M31]).entries] == ["pending"]


def test_plans_added_by_the_queue_command_survive_a_restart(tmp_path):
    path = tmp_path / "queue.json"
    q = PlanQueue([M31])
    added = q.add(PlanSettings(target="NGC 7000", ra=314.7, dec=44.3, count=5, frame_type="light"))
    assert added.added
    q.next()
    q.frame("/c/a1.fits")
    q.save(path)
    back = PlanQueue.load(path, [M31])  # the config still has only M 31
    assert [e.plan.target for e in back.entries] == ["M 31", "NGC 7000"]
    assert back.entries[1].plan == added.plan and back.entries[1].added
    assert back.entries[0].paths == ["/c/a1.fits"] and back.entries[0].state == "running"
    # A saved plan this version cannot take any more is dropped, the rest kept.
    text = path.read_text().replace('"count": 5', '"count": -5')
    path.write_text(text)
    assert [e.plan.target for e in PlanQueue.load(path, [M31]).entries] == ["M 31"]


def test_queue_command_appends_to_the_night_and_runs_it(tmp_path, monkeypatch):
    """The `queue` command through the service's command table: the plan is checked like any
    [plan], appended to the night's queue (saved), and the queue runs; run_queue (INDI) is a
    fake that takes every entry as done."""
    import asyncio
    import json

    import daemon.night
    from daemon.config import config_from_dict
    from daemon.service import Service

    async def fake_run_queue(config, queue, events, stop, *, save_to=None, on_finished=None, **kw):
        done = []
        while (entry := queue.next()) is not None:
            queue.finish({"state": "done", "paths": [], "ended": "count"})
            done.append(entry.plan.target)
            if save_to:
                queue.save(save_to)
        return [{"state": "done", "frames": 0, "paths": [], "targets": done}]

    monkeypatch.setattr(daemon.night, "run_queue", fake_run_queue)
    cfg = config_from_dict({
        "capture": {"dir": str(tmp_path / "c")}, "state": {"dir": str(tmp_path / "s")},
        "indi": {"drivers": []},
        "plan": [{"target": "M 31", "ra": "00h42m44s", "dec": "+41d16m09s", "count": 3},
                 {"target": "M 1", "ra": 83.6, "dec": 22.0, "count": 2}]}, "night.toml")
    assert [p.target for p in cfg.queue] == ["M 31", "M 1"] and cfg.plan.target == "M 31"
    service = Service(cfg)

    async def scenario():
        bad = await service.handle_command(json.dumps(
            {"id": 1, "action": "queue", "target": "X", "ra": 1.0, "dec": 2.0, "exposure_s": -1}).encode())
        ok = await service.handle_command(json.dumps(
            {"id": 2, "action": "queue", "target": "NGC 7000", "ra": 314.7, "dec": 44.3, "count": 4}).encode())
        summary = await service.plans.wait()
        return bad, ok, summary

    bad, ok, summary = asyncio.run(scenario())
    assert not bad["ok"] and "[plan] exposure_s = -1.0" in bad["error"]
    assert ok["ok"] and [e["target"] for e in ok["queue"]["entries"]] == ["M 31", "M 1", "NGC 7000"]
    assert summary["targets"] == ["M 31", "M 1", "NGC 7000"]
    assert [e["state"] for e in service.status()["plan_queue"]["entries"]] == ["done"] * 3
    saved = json.loads((tmp_path / "s" / "queue.json").read_text())
    assert saved["entries"][2]["added"] and saved["entries"][2]["plan"]["target"] == "NGC 7000"
