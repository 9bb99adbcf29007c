"""Start and stop our own indiserver (for demos, tests and configs that list [indi] drivers).

PATH gets drivers/simulators in front so the CCD simulator finds our deterministic `gsc`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

SIMULATORS_DIR = Path(__file__).resolve().parent / "simulators"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class IndiServer:
    """An indiserver child process running `drivers` on `port`."""

    def __init__(self, drivers: list[str], port: int = 7624, log_path: str | Path | None = None,
                 env: dict[str, str] | None = None):
        """env: extra environment for the drivers (the simulators' `gsc`: LIGHTBUCKET_GSC_SKY=real)."""
        if not drivers:
            raise ValueError("[indi] drivers: empty list, nothing to start")
        self.drivers, self.port = list(drivers), int(port)
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout: float = 10.0) -> None:
        """Start it and return once the port accepts connections (raises RuntimeError if not)."""
        exe = shutil.which("indiserver")
        if exe is None:
            raise RuntimeError("indiserver not found on PATH (Debian: apt install indi-bin)")
        missing = [d for d in self.drivers if shutil.which(d) is None]
        if missing:
            raise RuntimeError(f"[indi] drivers not installed: {missing}")
        env = {**os.environ, **self.extra_env}
        env["PATH"] = f"{SIMULATORS_DIR}{os.pathsep}{env.get('PATH', '')}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # Own process group, so stop() takes the drivers (its children) down with it.
        # -u: indiserver also binds an abstract local socket, /tmp/indiserver by default; a
        # per-port name lets several servers (tests, a user's own) run side by side.
        local = f"/tmp/indiserver-lightbucket-{self.port}"
        self.proc = subprocess.Popen([exe, "-p", str(self.port), "-u", local, *self.drivers], env=env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if out is not subprocess.DEVNULL:
            out.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if not self.running:
                raise RuntimeError(f"indiserver exited with {self.proc.returncode} on port {self.port}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)  # the port is not yet bound: poll the socket briefly
        await self.stop()
        raise RuntimeError(f"indiserver did not listen on port {self.port} within {timeout:g} s")

    def kill(self) -> None:
        """SIGKILL the whole process group (server and drivers): a crash, for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the group, SIGKILL after `timeout` s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
        except TimeoutError:
            self.kill()
