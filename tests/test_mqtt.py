"""MqttLink against a real mosquitto started on a free port (never the system broker).

"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import jinja2
import paho.mqtt.client as paho
from aiomqtt import MqttError
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from daemon import ha
from daemon.commands import validate_command
from daemon.config import MqttConfig
from daemon.mqtt import MqttLink, describe_failure
from drivers.indiserver import free_port
from tests.mqtt_broker import Broker, Subscriber


async def _until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


def test_link_publishes_retained_state_queues_while_broker_down_and_catches_up(broker):
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, rig="t1")

    async def scenario():
        link = MqttLink(cfg, reconnect_max_s=0.5)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        sub = Subscriber(broker.port, "t1")
        link.set_status({"state": "running", "n": 1})
        link.event("frame", {"i": 0})
        await asyncio.to_thread(sub.wait, lambda: sub.json("frame"), 10, "first frame event")
        assert sub.raw("availability")[-1] == b"online"

        broker.stop()
        await _until(lambda: not link.connected.is_set())
        await _until(lambda: link.state == "unreachable: connection refused")  # after "lost: ..."
        for i in range(1, 6):  # produced while the broker is down: must not block, must not be lost
            link.event("frame", {"i": i})
            link.set_status({"state": "running", "n": i + 1})
        assert link.backlog == 5
        broker.start()
        await asyncio.wait_for(link.connected.wait(), 15)
        assert link.state == "connected"
        await _until(lambda: link.backlog == 0)

        sub2 = Subscriber(broker.port, "t1")  # a fresh client sees the retained values
        await asyncio.to_thread(sub2.wait, lambda: sub2.json("status"), 10, "retained status")
        assert sub2.json("status")[-1] == {"state": "running", "n": 6}
        assert sub2.raw("availability") == [b"online"]
        await asyncio.to_thread(sub.wait, lambda: len(sub.json("frame")) >= 6, 10, "all frames")
        assert sorted(e["i"] for e in sub.json("frame")) == list(range(6))

        sub.send("cmd", b'{"id": 1, "action": "pause"}')
        raw = await asyncio.wait_for(link.commands.get(), 10)
        assert json.loads(raw) == {"id": 1, "action": "pause"}
        await link.close()
        task.cancel()
        sub.close()
        sub2.close()

    asyncio.run(scenario())


def test_bounded_buffer_drops_oldest_when_broker_never_comes():
    cfg = MqttConfig(host="127.0.0.1", port=free_port(), rig="t2", buffer=3)

    async def scenario():
        link = MqttLink(cfg, reconnect_max_s=0.2)
        task = asyncio.create_task(link.run())
        for i in range(10):
            link.event("frame", {"i": i})
        await asyncio.sleep(0.3)
        assert link.backlog == 3 and link.dropped == 7
        assert [json.loads(payload)["i"] for _, payload in link.queued()] == [7, 8, 9]
        task.cancel()

    asyncio.run(scenario())


def _discovery_messages(cfg: MqttConfig, port: int, page_url: str | None = None) -> dict[str, bytes]:
    """The retained homeassistant/# messages after one connection of a link with `cfg`."""
    got: dict[str, bytes] = {}
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("homeassistant/#")
    c.on_message = lambda cl, u, m: got.__setitem__(m.topic, m.payload)
    subscribed = threading.Event()
    c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert subscribed.wait(10)

    async def scenario():
        link = MqttLink(cfg, page_url=page_url)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        await link.close()
        task.cancel()

    try:
        asyncio.run(scenario())
        time.sleep(0.5)
    finally:
        c.loop_stop()
        c.disconnect()
    return got


def test_home_assistant_discovery(broker):
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, rig="ha", discovery=True)
    got = _discovery_messages(cfg, broker.port, "http://192.168.1.5:8080/")
    confs = {t: json.loads(p) for t, p in got.items() if p}
    stacked = confs["homeassistant/sensor/lightbucket_ha/stacked/config"]
    assert stacked["state_topic"] == "lightbucket/ha/status" and stacked["state_class"] == "total_increasing"
    device = stacked["device"]
    assert device["configuration_url"] == "http://192.168.1.5:8080/" and device["model"] == ha.MODEL
    assert device["sw_version"] == metadata.version("lightbucket")
    assert all(c["device"] == device for c in confs.values())  # one device
    image = confs["homeassistant/image/lightbucket_ha/preview/config"]
    assert image["image_topic"] == "lightbucket/ha/preview" and image["content_type"] == "image/jpeg"
    for action in ("pause", "resume", "stop", "restack"):
        button = confs[f"homeassistant/button/lightbucket_ha/{action}/config"]
        assert button["command_topic"] == "lightbucket/ha/cmd"
        assert validate_command(button["payload_press"].encode()) == {"id": f"ha-{action}", "action": action}
    # The templates, rendered as Home Assistant renders them, against a status of the daemon.
    status = {"state": "running", "target": "M27", "stack": "M27_L_300s_bin1", "stacked_current": 38,
              "frames": {"received": 42, "stacked": 38, "rejected": 3, "errors": 1}, "queue": 0,
              "total_exposure_s": 11400.4, "disk_free_bytes": 51234567168,
              "last_frame": {"fwhm_px": 3.14159}, "last_reject": {"reason": "clouds: 12 of 140 reference stars"},
              "plan": {"frame": 12, "count": 60, "eta_s": 14400.2, "temperature_c": -9.96}}
    env = jinja2.Environment()

    def render(obj, st):
        return env.from_string(confs[f"homeassistant/sensor/lightbucket_ha/{obj}/config"]["value_template"]
                               ).render(value_json=st).strip()
    expect = {"state": "running", "stacked": "38", "rejected": "3", "exposure": "11400.0", "fwhm": "3.14",
              "disk_free": "51.2", "camera_temperature": "-10.0", "plan_progress": "20.0", "plan_eta": "14400.0",
              "last_reject": "clouds: 12 of 140 reference stars", "stack": "M27_L_300s_bin1"}
    assert {k: render(k, status) for k in expect} == expect
    empty = {**status, "last_frame": None, "last_reject": None, "plan": None, "disk_free_bytes": None}
    for obj in ("fwhm", "camera_temperature", "plan_progress", "plan_eta", "last_reject", "disk_free"):
        assert render(obj, empty) == "None", obj  # unknown, not an error
    # Discovery switched off: every config is removed (empty retained payloads).
    off = _discovery_messages(MqttConfig(host="127.0.0.1", port=broker.port, rig="ha"), broker.port)
    assert set(confs) <= set(off) and all(off[t] == b"" for t in confs)
    # ... so a Home Assistant that connects now finds none of them retained
    assert _discovery_messages(MqttConfig(host="127.0.0.1", port=broker.port, rig="ha2"), broker.port).keys() \
        .isdisjoint(confs)


def test_refused_or_unreachable_broker_is_never_silent(tmp_path, caplog):
    """Wrong or missing credentials against a real mosquitto with a password file: the link's
    `state` says why, an error line names the broker and the user, repeated with back-off (not
    once per attempt), and the link connects once the broker accepts the password."""
    passwd = tmp_path / "passwd"

    def set_password(pw: str) -> None:
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if not passwd.exists() else []), str(passwd), "rig", pw],
                       check=True, capture_output=True)
        passwd.chmod(0o600)

    set_password("s3cret")
    b = Broker(tmp_path, f"allow_anonymous false\npassword_file {passwd}\n")
    b.start()
    nobody = free_port()
    try:
        async def scenario():
            changes: list[str] = []
            bad = MqttLink(MqttConfig(port=b.port, rig="auth", username="rig", password="wrong"),
                           reconnect_max_s=0.05, on_state=changes.append)
            anonymous = MqttLink(MqttConfig(port=b.port, rig="anon"), reconnect_max_s=0.05)
            away = MqttLink(MqttConfig(port=nobody, rig="away", username="rig"), reconnect_max_s=0.05)
            good = MqttLink(MqttConfig(port=b.port, rig="auth2", username="rig", password="s3cret"))
            links = (bad, anonymous, away, good)
            assert all(link.state == "connecting" for link in links)
            tasks = [asyncio.create_task(link.run()) for link in links]
            await asyncio.wait_for(good.connected.wait(), 10)
            await _until(lambda: bad.failures >= 20 and away.failures >= 20)
            assert good.state == "connected"
            assert bad.state == anonymous.state == "refused: not authorised"
            assert away.state == "unreachable: connection refused"
            assert not any(t.done() for t in tasks)  # still retrying
            assert changes == ["refused: not authorised"]  # a change, not every attempt

            lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            mine = [m for m in lines if f"MQTT broker 127.0.0.1:{b.port} (user rig): refused: not authorised" in m]
            attempts = [int(re.search(r"attempt (\d+)", m).group(1)) for m in mine]
            assert attempts[:5] == [1, 2, 4, 8, 16] and len(mine) < bad.failures / 3, (attempts, bad.failures)
            assert any(f"127.0.0.1:{b.port} (anonymous: no mqtt.username): refused" in m for m in lines)
            assert any(f"127.0.0.1:{nobody} (user rig): unreachable" in m for m in lines)

            # The broker's owner puts the rig's password right: the link connects by itself.
            set_password("wrong")
            await asyncio.to_thread(b.stop)
            await asyncio.to_thread(b.start)
            await asyncio.wait_for(bad.connected.wait(), 15)
            assert bad.state == "connected" and bad.failures == 0 and changes[-1] == "connected"
            assert any("MQTT connected to" in r.getMessage() and "after" in r.getMessage() for r in caplog.records)
            for t in tasks:
                t.cancel()

        with caplog.at_level(logging.INFO, logger="daemon.mqtt"):
            asyncio.run(scenario())
    finally:
        b.stop()


def test_failures_in_words():
    """What `MqttLink.state` says for each kind of failure (a control for the mapping)."""
    assert describe_failure(MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=134))) == \
        "refused: bad user name or password"
    assert describe_failure(MqttConnectError(5)) == "refused: not authorised"
    assert describe_failure(MqttError("[Errno -2] Name or service not known")) == \
        "unreachable: name or service not known"
    assert describe_failure(MqttError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
                            ).startswith("tls error: ")


def test_tls_with_private_ca(tmp_path):
    """mqtt.tls + mqtt.ca_file against a mosquitto TLS listener with a throw-away CA."""
    def ssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "srv.key", "-out", "srv.csr")
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "srv.crt")
    b = Broker(tmp_path, f"allow_anonymous true\ncafile {tmp_path}/ca.crt\ncertfile {tmp_path}/srv.crt\n"
                         f"keyfile {tmp_path}/srv.key\n")
    b.start()
    try:
        async def scenario():
            plain = MqttLink(MqttConfig(port=b.port, rig="plain"), reconnect_max_s=0.2)
            tls = MqttLink(MqttConfig(port=b.port, rig="tls", tls=True, ca_file=tmp_path / "ca.crt"))
            unknown_ca = MqttLink(MqttConfig(port=b.port, rig="ca", tls=True), reconnect_max_s=0.2)
            tasks = [asyncio.create_task(link.run()) for link in (plain, unknown_ca, tls)]
            await asyncio.wait_for(tls.connected.wait(), 10)
            await _until(lambda: plain.failures and unknown_ca.failures)
            assert not plain.connected.is_set() and not tasks[0].done()  # refused, still retrying
            assert plain.state.startswith("unreachable: ")  # a TLS port does not answer plain MQTT
            assert unknown_ca.state.startswith("tls error: ") and "certificate verify failed" in unknown_ca.state
            for t in tasks:
                t.cancel()

        asyncio.run(scenario())
    finally:
        b.stop()


def test_docs_acl_recipe_lets_only_the_rig_and_home_assistant_command(tmp_path):
    """The mosquitto ACL of docs/mqtt.md, in a real mosquitto: `viewer` reads but its commands
    never reach the daemon's subscription; Home Assistant's button presses do."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "mqtt.md").read_text()
    acl = re.search(r"```\n(# the daemon.*?)```", doc, re.S).group(1)
    assert "user rig" in acl
    (tmp_path / "acl").write_text(acl)
    passwd = tmp_path / "passwd"
    for i, user in enumerate(("rig", "homeassistant", "viewer")):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwd), user, f"{user}-pw"],
                       check=True, capture_output=True)
    passwd.chmod(0o600)
    b = Broker(tmp_path, f"allow_anonymous false\npassword_file {passwd}\nacl_file {tmp_path / 'acl'}\n")
    b.start()
    clients = []

    def client(user: str, topic: str | None = None) -> list:
        got: list = []
        ready = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"acl-{user}")
        c.username_pw_set(user, f"{user}-pw")
        c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
        c.on_subscribe = lambda cl, u, mid, rcs, p: ready.set()
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1) if topic else ready.set()
        c.connect("127.0.0.1", b.port)
        c.loop_start()
        assert ready.wait(10)
        clients.append(c)
        return got

    try:
        rig_got = client("rig", "lightbucket/obs/cmd")
        viewer_got = client("viewer", "lightbucket/obs/status")
        client("homeassistant")
        ha, viewer, rig = clients[2], clients[1], clients[0]
        viewer.publish("lightbucket/obs/cmd", b'{"id": "v", "action": "reset"}', qos=1).wait_for_publish(5)
        ha.publish("lightbucket/obs/cmd", b'{"id": "ha-pause", "action": "pause"}', qos=1).wait_for_publish(5)
        rig.publish("lightbucket/obs/status", b'{"state": "paused"}', qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (rig_got and viewer_got):
            time.sleep(0.05)
        time.sleep(0.3)
        assert [p for _, p in rig_got] == [b'{"id": "ha-pause", "action": "pause"}']  # not the viewer's reset
        assert [p for _, p in viewer_got] == [b'{"state": "paused"}']  # the viewer reads
    finally:
        for c in clients:
            c.loop_stop()
            c.disconnect()
        b.stop()


def test_cancel_is_not_lost_when_the_connection_drops_at_the_same_time(broker):
    """Stopping the daemon cancels the link; if the broker drops the connection in the same
    instant, Python 3.11's TaskGroup raises the drop and forgets the cancel. The link must
    still end (a daemon hung for 13 minutes after SIGTERM on exactly this)."""

    class Dropping(MqttLink):
        drop: asyncio.Event

        async def _receiver(self, client):
            await self.drop.wait()
            raise MqttError("Disconnected during message iteration")

    async def scenario():
        link = Dropping(MqttConfig(host="127.0.0.1", port=broker.port, rig="t4"), reconnect_max_s=0.1)
        link.drop = asyncio.Event()
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        link.drop.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done and task.cancelled(), link.state

    asyncio.run(scenario())


def test_two_daemons_with_the_same_rig_are_named_in_the_log(broker, caplog):
    """Two links with one mqtt.rig share a client id, and the broker keeps dropping the older
    one: the warning says what is most likely going on instead of only "connection lost"."""
    async def scenario():
        cfg = MqttConfig(host="127.0.0.1", port=broker.port, rig="twin")
        first, second = MqttLink(cfg, reconnect_max_s=0.2), MqttLink(cfg, reconnect_max_s=0.2)
        tasks = [asyncio.create_task(first.run())]
        await asyncio.wait_for(first.connected.wait(), 10)
        tasks.append(asyncio.create_task(second.run()))
        await _until(lambda: any("does another client use the id lightbucket-twin" in r.getMessage()
                                 for r in caplog.records))
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=5)
        assert all(t.done() for t in tasks)

    with caplog.at_level(logging.WARNING, logger="daemon.mqtt"):
        asyncio.run(scenario())
    assert any("a second daemon with mqtt.rig = 'twin'" in r.getMessage() for r in caplog.records)
