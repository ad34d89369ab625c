"""Per-key request counters for ``/metrics`` (issue 23 item 1: ``user`` / ``safety_identifier`` are recorded).

Labels carry only the key's index (``"k0"``, ``"k1"``, ...; ``"anon"`` without keys), never a string
a client chose: an end user's id is counted (requests that carried one; distinct ids, up to
:data:`MAX_USERS_PER_KEY` per key, kept as salted hashes) and written to the request log line, and
that is all.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading

MAX_USERS_PER_KEY = 10_000
# under uvicorn's server logger: the request lines appear where ``ursa-engine serve`` prints its own (INFO)
log = logging.getLogger("uvicorn.error.ursa")


class KeyMetrics:
    """Requests per key, requests with an end-user id per key, distinct end-user ids per key."""

    def __init__(self):
        self._lock = threading.Lock()
        self._salt = secrets.token_bytes(16)
        self.requests: dict[str, int] = {}
        self.identified: dict[str, int] = {}
        self.users: dict[str, set] = {}

    def record(self, owner: str, user: str | None = None) -> None:
        """Count one request of key ``owner`` (and its end user's id, when it gave one)."""
        with self._lock:
            self.requests[owner] = self.requests.get(owner, 0) + 1
            if user:
                self.identified[owner] = self.identified.get(owner, 0) + 1
                seen = self.users.setdefault(owner, set())
                if len(seen) < MAX_USERS_PER_KEY:
                    seen.add(hashlib.blake2b(user.encode(), key=self._salt, digest_size=8).digest())

    def prometheus(self) -> str:
        """The counters in the Prometheus text format (one series per key index)."""
        with self._lock:
            rows = [("ursa_key_requests_total", "counter", "requests per API key (index)", self.requests),
                    ("ursa_key_identified_requests_total", "counter",
                     "requests per API key that named an end user (user / safety_identifier)", self.identified),
                    ("ursa_key_end_users", "gauge", f"distinct end-user ids per API key (counted up to "
                     f"{MAX_USERS_PER_KEY})", {k: len(v) for k, v in self.users.items()})]
            out = []
            for name, kind, help_, values in rows:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                out += [f'{name}{{key="{k}"}} {v}' for k, v in sorted(values.items())]
            return "\n".join(out) + "\n"


def log_request(route: str, request_id: str, owner: str, user: str | None, **info) -> None:
    """The request log line (logger ``uvicorn.error.ursa``, INFO): route, id, key index, end user, details."""
    details = " ".join(f"{k}={v}" for k, v in info.items())
    log.info("%s id=%s key=%s user=%s %s", route, request_id, owner, repr(user[:256]) if user else "-", details)
