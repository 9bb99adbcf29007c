"""sd_notify protocol against our own AF_UNIX datagram sockets (path and abstract names)."""

from __future__ import annotations

import os
import socket

from daemon.sdnotify import Notifier, watchdog_interval_s


def test_notify_to_path_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        n = Notifier(path)
        assert n.ready("running; 0 stacked") and n.watchdog() and n.stopping()
        got = [srv.recv(4096).decode() for _ in range(3)]
        n.close()
    assert got == ["READY=1\nSTATUS=running; 0 stacked", "WATCHDOG=1", "STOPPING=1"]


def test_notify_to_abstract_socket():
    name = f"lightbucket-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(b"\0" + name.encode())
        n = Notifier("@" + name)
        assert n.status("hello")
        assert srv.recv(4096) == b"STATUS=hello"
        n.close()


def test_no_socket_is_a_silent_noop(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled and Notifier().ready() is False
    assert Notifier(str(tmp_path / "nobody-listens")).watchdog() is False  # error swallowed


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert watchdog_interval_s() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval_s() is None


def test_a_receiver_that_does_not_read_never_blocks_the_sender(tmp_path):
    path = str(tmp_path / "full")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(path)
        n = Notifier(path)
        sent = [n.watchdog() for _ in range(500)]  # would block forever on a blocking socket
        n.close()
        assert sent[0] is True and sent[-1] is False  # the queue filled up; later pings dropped
        assert srv.recv(100) == b"WATCHDOG=1"
