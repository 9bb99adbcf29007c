"""Who may send commands over HTTP: the password, as a session cookie or a Bearer header.

Why this shape: the page is opened on a phone on the observatory's LAN, often over plain HTTP,
and a command can empty the night's stack. So:
- reading (status, frames, preview, tiles, live channel) is open, commands are not;
- API clients send `Authorization: Bearer <password>`;
- the page logs in once: `POST /api/login` sets an HttpOnly, SameSite=Strict session cookie
  and returns a CSRF token that the page sends back as `X-CSRF-Token` with every command. A
  cross-site form or script can neither send the cookie (SameSite) nor read the token; a
  request whose `Origin` is not this server's own is refused as well;
- failed logins (and wrong Bearer passwords) are rate-limited per client address, so the
  password cannot be guessed at LAN speed.
Sessions live in memory: a restart of the daemon logs the page out.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

COOKIE = "lb_session"
CSRF_HEADER = "X-CSRF-Token"


@dataclass
class Session:
    csrf: str
    expires: float  # time.monotonic() seconds


@dataclass
class RateLimiter:
    """At most `max_failures` failed attempts per client address within `window_s` seconds."""

    max_failures: int = 5
    window_s: float = 60.0
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def retry_after_s(self, client: str, now: float | None = None) -> float:
        """Seconds until `client` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        times = self._failures.get(client)
        if not times:
            return 0.0
        while times and now - times[0] > self.window_s:
            times.popleft()
        if len(times) < self.max_failures:
            return 0.0
        return max(self.window_s - (now - times[0]), 0.0)

    def failed(self, client: str, now: float | None = None) -> None:
        self._failures.setdefault(client, deque()).append(time.monotonic() if now is None else now)
        if len(self._failures) > 10_000:  # a flood of addresses must not grow memory without end
            self._failures.pop(next(iter(self._failures)))


class Auth:
    """The [web] password and the logged-in sessions.

    Parameters
    ----------
    password : str or None
        The [web] password; None: nobody may send commands (the page is view-only).
    session_s : float
        How long a page login lasts (s), default 7 days (a run of nights at the telescope).
    limiter : RateLimiter, optional
        Failed-attempt limit (default 5 per minute per address)."""

    def __init__(self, password: str | None, *, session_s: float = 7 * 86400.0,
                 limiter: RateLimiter | None = None):
        self.password = password
        self.session_s = session_s
        self.limiter = limiter or RateLimiter()
        self._sessions: dict[str, Session] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.password)

    def _matches(self, given: str) -> bool:
        return self.enabled and hmac.compare_digest(given.encode(), self.password.encode())

    def login(self, given: str, client: str) -> tuple[str, Session] | float | None:
        """A new session (cookie token, Session) for the right password; for a wrong one None;
        while `client` is rate-limited, the seconds to wait (float), without checking."""
        wait = self.limiter.retry_after_s(client)
        if wait > 0:
            return wait
        if not self._matches(given):
            self.limiter.failed(client)
            return None
        now = time.monotonic()
        self._sessions = {t: s for t, s in self._sessions.items() if s.expires > now}
        token = secrets.token_urlsafe(32)
        session = self._sessions[token] = Session(secrets.token_urlsafe(32), now + self.session_s)
        return token, session

    def logout(self, token: str | None) -> None:
        self._sessions.pop(token or "", None)

    def session(self, token: str | None) -> Session | None:
        """The live session of a cookie token, or None."""
        s = self._sessions.get(token or "")
        if s is None or s.expires <= time.monotonic():
            return None
        return s

    def check_bearer(self, header: str, client: str) -> bool | float:
        """True for `Bearer <password>`; False otherwise (counted as a failed attempt); the
        seconds to wait (float) while `client` is rate-limited."""
        wait = self.limiter.retry_after_s(client)
        if wait > 0:
            return wait
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and self._matches(given.strip()):
            return True
        self.limiter.failed(client)
        return False

    def check_session(self, token: str | None, csrf: str | None) -> bool:
        """True when the cookie's session is live and the request carries its CSRF token."""
        s = self.session(token)
        return s is not None and bool(csrf) and hmac.compare_digest(s.csrf.encode(), csrf.encode())
