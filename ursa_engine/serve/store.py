"""The bounded store of finished results (issues 20 item 2, 23): what ``GET /v1/videos/{id}/content`` serves.

An entry is added when its job is accepted (``pending``: metadata only, no payload) and becomes
*terminal* when its job ends: :meth:`ResultStore.finish` attaches the payload (tokens, encoded
files), :meth:`ResultStore.fail` attaches none. Terminal entries are bounded three ways, from the
server's :class:`~ursa_engine.serve.security.Limits`:

- **count** (``max_stored_results``) and **bytes** (``max_stored_bytes``, the payloads' sizes:
  ``bytes`` by length, tensors and arrays by their buffer): when a finish goes over either, the
  terminal entries that ended first are dropped first, until both hold again (the new one is never
  dropped for an older one; a payload over ``max_stored_bytes`` on its own is refused with
  :class:`TooLarge`);
- **age** (``result_ttl_s``): a terminal entry expires that many seconds after its job ended
  (``expires_at``); expired entries are removed at the next access.

Pending entries are not counted (the batcher's queue and the per-key limit bound them) and never
dropped. An entry is visible only in its owner's namespace (the API key's ``"k<i>"``, as the jobs):
another owner's lookup is the same :class:`KeyError` as an unknown key (a 404, never a 403). An entry
that expired or was dropped raises :class:`Gone` with the reason instead (a 404 with a clear
message) for as long as its tombstone is remembered (the last :data:`TOMBSTONES`). Every method
takes the store's lock: the HTTP handlers and the render threads share it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

TOMBSTONES = 4096  # expired / dropped keys remembered for their 404 message


class Gone(LookupError):
    """The entry existed but expired or was dropped to bound the store (its message says which)."""


class TooLarge(ValueError):
    """A payload over ``max_stored_bytes`` on its own."""


@dataclass(eq=False)
class Entry:
    """One stored result.

    ``meta`` is the route's own (the store never reads it); ``payload`` is None while pending or
    after a failure; times are the store clock's seconds (``time.time`` by default)."""

    owner: str
    key: str
    seq: int
    meta: object
    created: float
    payload: dict | None = None
    nbytes: int = 0
    finished: float | None = None
    expires: float | None = None

    @property
    def terminal(self) -> bool:
        return self.finished is not None


def payload_bytes(payload: dict) -> int:
    """Bytes of a payload: ``bytes`` / ``bytearray`` by length, tensors and arrays by their buffer."""
    total = 0
    for name, v in payload.items():
        if isinstance(v, (bytes, bytearray, memoryview)):
            total += len(v)
        elif hasattr(v, "element_size") and hasattr(v, "numel"):  # torch.Tensor
            total += int(v.numel()) * int(v.element_size())
        elif hasattr(v, "nbytes"):  # numpy
            total += int(v.nbytes)
        elif v is not None:
            raise ValueError(f"payload: {name!r} is a {type(v).__name__}; expected bytes, a tensor or an array")
    return total


class ResultStore:
    """Thread-safe store of results keyed by ``(owner, key)``, bounded by count, bytes and age.

    Parameters
    ----------
    max_results : terminal entries kept (>= 1)
    max_bytes : payload bytes kept (>= 1)
    ttl_s : seconds a terminal entry is kept after its job ended (> 0)
    clock : the time source (seconds; tests pass a fake one)
    """

    def __init__(self, max_results: int, max_bytes: int, ttl_s: float, *, clock: Callable[[], float] = time.time):
        for name, v in (("max_results", max_results), ("max_bytes", max_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
            raise ValueError(f"ttl_s: expected seconds > 0, got {ttl_s!r}")
        self.max_results, self.max_bytes, self.ttl_s, self.clock = max_results, max_bytes, float(ttl_s), clock
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], Entry] = {}
        self._terminal: OrderedDict[tuple[str, str], Entry] = OrderedDict()  # in the order their jobs ended
        self._gone: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._seq = itertools.count()
        self._bytes = 0

    @classmethod
    def from_limits(cls, limits, **kw) -> ResultStore:
        """The store of a server's :class:`~ursa_engine.serve.security.Limits`."""
        return cls(limits.max_stored_results, limits.max_stored_bytes, limits.result_ttl_s, **kw)

    # ------------------------------------------------------------------ writes
    def add(self, owner: str, key: str, meta: object = None) -> Entry:
        """A pending entry (ValueError naming ``key`` when the owner already has one of that key)."""
        with self._lock:
            self._purge()
            k = (owner, key)
            if k in self._entries:
                raise ValueError(f"key: {key!r} is already in use")
            self._gone.pop(k, None)
            entry = Entry(owner, key, next(self._seq), meta, self.clock())
            self._entries[k] = entry
            return entry

    def finish(self, owner: str, key: str, payload: dict) -> Entry | None:
        """Attach ``payload`` and make the entry terminal (expiring ``ttl_s`` from now); older terminal
        entries are dropped while the bounds do not hold. None when the entry is gone (deleted while
        its job ran). Raises :class:`TooLarge` for a payload over ``max_bytes`` on its own (the
        entry stays pending: the caller fails it)."""
        size = payload_bytes(payload)
        if size > self.max_bytes:
            raise TooLarge(f"result: {size} bytes, over this server's limit of {self.max_bytes} bytes for stored "
                           "results (max_stored_bytes)")
        with self._lock:
            self._purge()
            entry = self._entries.get((owner, key))
            if entry is None or entry.terminal:
                return None
            entry.payload, entry.nbytes = dict(payload), size
            self._end(entry)
            return entry

    def fail(self, owner: str, key: str) -> Entry | None:
        """Make the entry terminal without a payload (a failed job); None when it is gone."""
        with self._lock:
            self._purge()
            entry = self._entries.get((owner, key))
            if entry is None or entry.terminal:
                return None
            self._end(entry)
            return entry

    def pop(self, owner: str, key: str) -> Entry | None:
        """Remove an entry (DELETE): the owner's, pending or terminal; None when there is none."""
        with self._lock:
            self._purge()
            entry = self._entries.pop((owner, key), None)
            if entry is not None and self._terminal.pop((owner, key), None) is not None:
                self._bytes -= entry.nbytes
            return entry

    # ------------------------------------------------------------------ reads
    def get(self, owner: str, key: str) -> Entry:
        """The owner's entry; :class:`Gone` when it expired or was dropped, KeyError when it is unknown
        (or another owner's)."""
        with self._lock:
            self._purge()
            k = (owner, key)
            entry = self._entries.get(k)
            if entry is not None:
                return entry
            if k in self._gone:
                raise Gone(self._gone[k])
            raise KeyError(key)

    def entries(self, owner: str) -> list[Entry]:
        """The owner's live entries, oldest first (by creation)."""
        with self._lock:
            self._purge()
            return sorted((e for e in self._entries.values() if e.owner == owner), key=lambda e: e.seq)

    def stats(self) -> dict:
        """``{"entries", "terminal", "bytes"}`` now."""
        with self._lock:
            self._purge()
            return {"entries": len(self._entries), "terminal": len(self._terminal), "bytes": self._bytes}

    # ------------------------------------------------------------------ internals (under the lock)
    def _end(self, entry: Entry) -> None:
        now = self.clock()
        entry.finished, entry.expires = now, now + self.ttl_s
        k = (entry.owner, entry.key)
        self._terminal[k] = entry
        self._bytes += entry.nbytes
        while len(self._terminal) > self.max_results or self._bytes > self.max_bytes:
            old_key, old = next(iter(self._terminal.items()))
            if old is entry:  # cannot happen (checked sizes), but never drop the new one for the bounds
                break
            self._drop(old_key, old, f"{old.key!r} was dropped to keep this server's stored results within "
                                     f"{self.max_results} results / {self.max_bytes} bytes (max_stored_results / "
                                     "max_stored_bytes); results are kept oldest-out")

    def _purge(self) -> None:
        now = self.clock()
        while self._terminal:
            k, entry = next(iter(self._terminal.items()))
            if entry.expires > now:
                break
            self._drop(k, entry, f"{entry.key!r} expired: results are kept {self.ttl_s:g} s after they finish "
                                 "(result_ttl_s)")

    def _drop(self, k: tuple[str, str], entry: Entry, reason: str) -> None:
        del self._terminal[k]
        self._entries.pop(k, None)
        self._bytes -= entry.nbytes
        self._gone[k] = reason
        while len(self._gone) > TOMBSTONES:
            self._gone.popitem(last=False)


__all__ = ["Entry", "Gone", "ResultStore", "TOMBSTONES", "TooLarge", "payload_bytes"]
