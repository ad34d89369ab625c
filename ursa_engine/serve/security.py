"""What makes ``ursa-engine serve`` safe to expose (issue 20 item 2): keys, request-id namespaces, limits.

- **API keys** (``--api-key``, repeatable, or ``URSA_API_KEY``, comma-separated): every route but
  ``/health`` needs ``Authorization: Bearer KEY`` (``/metrics`` too unless ``metrics_public``). The
  presented key is compared with *every* configured key by :func:`hmac.compare_digest` (no early
  exit), and a refusal is one 401 without detail (missing, malformed and wrong keys read the same).
- **Request ids** are namespaced per key: the batcher's id of a job is ``"<owner>:<id>"`` where
  ``owner`` is the key's index (``"k0"``, ``"k1"``, ...; ``"anon"`` without keys) and ``id`` is either
  the client's ``request_id`` or, when it gives none, :func:`secrets.token_urlsafe` of 16 bytes (128
  random bits, 22 characters ``[A-Za-z0-9_-]``). Clients only ever see ``id``. A lookup is made in the
  caller's namespace, so a job is visible and cancellable only with the key that made it: another
  key gets 404 (never 403: the ids of others do not leak), and a client-chosen id (guessable) can
  collide only with the same key's own jobs (409).
- **Limits**, checked before the expensive part: body bytes (:class:`Guard`, before parsing: the
  ``Content-Length`` header, then the bytes actually received), prompt characters (before
  tokenizing), ``n``, jobs in flight per key (429 + ``Retry-After``); rows in flight across all
  latent shapes are the batcher's ``max_rows`` (:meth:`Batcher._admit`).

- **Uploads** (issue 23's multipart routes, :data:`UPLOAD_PATHS`): their bodies may be up to
  ``max_upload_bytes`` (other bodies ``max_body_bytes``); an uploaded image is refused before its
  pixels are decoded when its header announces more than ``max_image_pixels`` (decompression
  bombs), an uploaded video past ``max_video_frames``.
- **Stored results** (videos, ``GET /v1/videos/{id}/content``): at most ``max_stored_results`` jobs
  and ``max_stored_bytes`` bytes, each kept ``result_ttl_s`` seconds, visible only to their key.

- **Bodies in flight**: the guard buffers a body before its route parses it; the bytes so held by all
  requests together stay under ``max_body_bytes_in_flight`` (429 + ``Retry-After`` beyond), and a
  draining server refuses a job-starting POST (:data:`JOB_PATHS`) with 503 before reading its body.

The guard wraps the whole app, so every route added later is covered.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
import threading
from dataclasses import dataclass, field

OPEN_PATHS = ("/health",)
UPLOAD_PATHS = ("/v1/images/edits", "/v1/videos", "/v1/videos/extensions")  # multipart bodies with files
JOB_PATHS = ("/v1/images/generations", *UPLOAD_PATHS)  # POSTs that start a job (refused unread while draining)
ANON = "anon"


@dataclass
class Limits:
    """The server's security settings and request limits.

    Parameters
    ----------
    api_keys : accepted bearer keys (empty: no authentication, every caller is ``"anon"``)
    metrics_public : ``/metrics`` without a key
    max_body_bytes : request body bytes (413 over it, before parsing)
    max_prompt_chars : characters of ``prompt`` and of ``negative_prompt`` (400 before tokenizing)
    max_n : samples of one request (400 naming ``n``)
    max_concurrent_per_key : queued + running jobs of one key (429 + ``Retry-After``); None: no limit
    cors_origins : origins allowed by CORS (empty: no CORS headers at all)
    retry_after_s : the ``Retry-After`` of a 429
    max_upload_bytes : body bytes of the upload routes (:data:`UPLOAD_PATHS`; 413 over it, before parsing)
    max_image_pixels : width x height of an uploaded image or video frame, checked from its header
        before decoding (400 naming the field)
    max_video_frames : frames of an uploaded video (400 naming the field)
    max_stored_results, max_stored_bytes, result_ttl_s : the bounded store of finished jobs' files
    max_body_bytes_in_flight : request body bytes buffered at once across all requests (429 +
        ``Retry-After`` over it: many concurrent uploads cannot hold unbounded memory)
    """

    api_keys: tuple = ()
    metrics_public: bool = False
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 4096
    max_n: int = 16
    max_concurrent_per_key: int | None = None
    cors_origins: tuple = ()
    retry_after_s: int = 1
    max_upload_bytes: int = 32 << 20
    max_image_pixels: int = 4096 * 4096
    max_video_frames: int = 257
    max_stored_results: int = 256
    max_stored_bytes: int = 2 << 30
    result_ttl_s: int = 3600
    max_body_bytes_in_flight: int = 256 << 20
    _keys: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self.api_keys = tuple(check_keys(self.api_keys))
        self.cors_origins = tuple(self.cors_origins)
        for name in ("max_body_bytes", "max_prompt_chars", "max_n", "retry_after_s", "max_upload_bytes",
                     "max_image_pixels", "max_video_frames", "max_stored_results", "max_stored_bytes", "result_ttl_s",
                     "max_body_bytes_in_flight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        v = self.max_concurrent_per_key
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"max_concurrent_per_key: expected an int >= 1 or None, got {v!r}")
        self._keys = [k.encode("ascii") for k in self.api_keys]

    def owner(self, authorization: bytes | None) -> str | None:
        """The namespace of a request's ``Authorization`` header value: ``"k<i>"`` for the i-th key,
        ``"anon"`` when the server has no keys, None when refused. Every key is compared (constant time)."""
        if not self._keys:
            return ANON
        scheme, _, presented = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            presented = b""
        presented = presented.strip()
        found = -1
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(presented, key) and found < 0:  # no early exit: every key is compared
                found = i
        return f"k{found}" if found >= 0 else None


def check_keys(keys) -> list[str]:
    """API keys as given (flags, ``URSA_API_KEY``): printable ASCII without spaces or commas, unique."""
    out = []
    for k in keys:
        if not isinstance(k, str) or not k or not all(33 <= ord(c) < 127 and c != "," for c in k):
            raise ValueError("api_key: expected printable ASCII without spaces or commas (a key is not echoed)")
        if k not in out:
            out.append(k)
    return out


def keys_from_env(value: str | None) -> list[str]:
    """``URSA_API_KEY``: one key or several, comma-separated (blanks ignored)."""
    return [k.strip() for k in (value or "").split(",") if k.strip()]


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_warning(host: str, limits: Limits) -> str | None:
    """The warning line for a server that binds off loopback without an API key (else None)."""
    if is_loopback(host) or limits.api_keys:
        return None
    return (f"WARNING: serving on {host} without an API key: anyone who can reach this address can generate, read "
            "and cancel requests; pass --api-key (or URSA_API_KEY), or bind 127.0.0.1")


def new_id() -> str:
    """A server-made request id: 128 random bits, 22 characters of ``[A-Za-z0-9_-]``."""
    return secrets.token_urlsafe(16)


def internal_id(owner: str, request_id: str) -> str:
    return f"{owner}:{request_id}"


def external_id(job_id: str) -> str:
    return job_id.split(":", 1)[1] if ":" in job_id else job_id


class InFlight:
    """Jobs of each owner that are queued or running (released when their future resolves)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def reserve(self, owner: str, limit: int | None) -> bool:
        with self._lock:
            c = self._count.get(owner, 0)
            if limit is not None and c >= limit:
                return False
            self._count[owner] = c + 1
            return True

    def release(self, owner: str) -> None:
        with self._lock:
            c = self._count.get(owner, 0) - 1
            if c > 0:
                self._count[owner] = c
            else:
                self._count.pop(owner, None)

    def count(self, owner: str) -> int:
        with self._lock:
            return self._count.get(owner, 0)


def _error_body(message: str, kind: str, param: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param}}).encode()


class Guard:
    """ASGI middleware in front of every route: the bearer key (401), then the body size (413).

    The owner of an authenticated request goes to ``scope["state"]["owner"]`` (``request.state.owner``).
    The body is read here, up to ``max_body_bytes``, before any route parses it: a ``Content-Length``
    over the limit is refused unread, a body that turns out longer than announced (or chunked and too
    long) is refused at the first byte past the limit; the route gets the bytes replayed.
    """

    def __init__(self, app, limits: Limits, draining=None):
        self.app, self.limits, self.draining = app, limits, draining
        self.held = 0  # body bytes buffered by requests in flight (one event loop: no lock needed)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or ())
        public = path in OPEN_PATHS or (path == "/metrics" and self.limits.metrics_public)
        owner = self.limits.owner(headers.get(b"authorization")) if not public else ANON
        if owner is None:
            return await _send(send, 401, _error_body("unauthorized", "authentication_error", None),
                               [(b"www-authenticate", b"Bearer")])
        scope.setdefault("state", {})["owner"] = owner
        upload = path in UPLOAD_PATHS
        limit = self.limits.max_upload_bytes if upload else self.limits.max_body_bytes
        length = headers.get(b"content-length")
        announced = 0
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                return await _send(send, 400, _error_body("body: a bad Content-Length", "invalid_request_error",
                                                          "body"))
            if announced > limit:
                return await _send(send, 413, _too_big(limit, upload), [(b"connection", b"close")])
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        wait = self.draining() if self.draining is not None and path in JOB_PATHS else None
        if wait is not None:  # a draining server takes no new job: refused before its body is read
            return await _send(send, 503, _error_body(f"the server is shutting down: it takes no new request; retry in "
                                                      f"{wait} s (on a restarted server)", "server_shutting_down",
                                                      None), [(b"retry-after", str(wait).encode())])
        budget, held = self.limits.max_body_bytes_in_flight, 0
        retry = [(b"retry-after", str(self.limits.retry_after_s).encode())]
        try:
            if announced and self.held + announced > budget:
                return await _send(send, 429, _busy(budget), retry)
            held = announced
            self.held += held
            chunks, size = [], 0
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await _send(send, 413, _too_big(limit, upload), [(b"connection", b"close")])
                if size > held:  # more than announced (or chunked): the budget follows the bytes received
                    if self.held + size - held > budget:
                        return await _send(send, 429, _busy(budget), retry)
                    self.held += size - held
                    held = size
                chunks.append(chunk)
                if not msg.get("more_body", False):
                    break
            body, replayed = b"".join(chunks), False
            del chunks

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # later: the client's disconnect, as before

            return await self.app(scope, replay, send)
        finally:
            self.held -= held


def _busy(budget: int) -> bytes:
    return _error_body(f"max_body_bytes_in_flight: the server holds {budget} bytes of request bodies in flight (its "
                       "limit); retry shortly", "rate_limit_error", "max_body_bytes_in_flight")


def _too_big(limit: int, upload: bool = False) -> bytes:
    name = "max_upload_bytes" if upload else "max_body_bytes"
    return _error_body(f"body: the request body is over this server's limit of {limit} bytes ({name})",
                       "invalid_request_error", "body")


async def _send(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
