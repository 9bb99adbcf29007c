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
