"""MqttLink against a real mosquitto started on a free port (never the system broker).

"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import paho.mqtt.client as paho

from daemon.config import MqttConfig
from daemon.mqtt import MqttLink
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
        for i in range(1, 6):  # produced while the broker is down: must not block, must not be lost
            link.event("frame", {"i": i})
            link.set_status({"state": "running", "n": i + 1})
        assert link.backlog == 5
        broker.start()
        await asyncio.wait_for(link.connected.wait(), 15)
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
        assert [json.loads(m.payload)["i"] for m in link._fifo] == [7, 8, 9]
        task.cancel()

    asyncio.run(scenario())


def test_home_assistant_discovery(broker):
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, rig="ha", discovery=True)
    got: list[tuple[str, bytes]] = []
    c = paho.Client(paho.CallbackAPIVersion.VERSION2)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("homeassistant/#")
    c.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
    c.connect("127.0.0.1", broker.port)
    c.loop_start()

    async def scenario():
        link = MqttLink(cfg)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.connected.wait(), 10)
        await _until(lambda: any("camera" in t for t, _ in got))
        task.cancel()

    try:
        asyncio.run(scenario())
    finally:
        c.loop_stop()
        c.disconnect()
    confs = {t: json.loads(p) for t, p in got}
    stacked = confs["homeassistant/sensor/lightbucket_ha/stacked/config"]
    assert stacked["state_topic"] == "lightbucket/ha/status"
    assert stacked["value_template"] == "{{ value_json.frames.stacked }}"
    assert confs["homeassistant/camera/lightbucket_ha/preview/config"]["topic"] == "lightbucket/ha/preview"


def test_username_password_wrong_ones_retry_without_crashing(tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "rig", "s3cret"], check=True,
                   capture_output=True)
    passwd.chmod(0o600)
    b = Broker(tmp_path, f"allow_anonymous false\npassword_file {passwd}\n")
    b.start()
    try:
        async def scenario():
            bad = MqttLink(MqttConfig(port=b.port, rig="auth", username="rig", password="wrong"), reconnect_max_s=0.2)
            good = MqttLink(MqttConfig(port=b.port, rig="auth2", username="rig", password="s3cret"))
            tasks = [asyncio.create_task(bad.run()), asyncio.create_task(good.run())]
            await asyncio.wait_for(good.connected.wait(), 10)
            await asyncio.sleep(1.0)  # several refused attempts
            assert not bad.connected.is_set() and not tasks[0].done()  # still retrying
            for t in tasks:
                t.cancel()

        asyncio.run(scenario())
    finally:
        b.stop()


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
            tasks = [asyncio.create_task(plain.run()), asyncio.create_task(tls.run())]
            await asyncio.wait_for(tls.connected.wait(), 10)
            await asyncio.sleep(0.5)
            assert not plain.connected.is_set() and not tasks[0].done()  # refused, still retrying
            for t in tasks:
                t.cancel()

        asyncio.run(scenario())
    finally:
        b.stop()
