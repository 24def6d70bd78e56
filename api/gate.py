"""What every request passes before the application reads its body: authentication, a size
limit, a read timeout, and a bound on concurrent uploads.

A pure ASGI middleware, because FastAPI reads a declared body (``RunCreate``,
``HeartbeatIn``) *before* it runs any dependency, the one that checks the token included:
without this, a 200 MiB body sent with no token was read into memory before its 401.
Here, a request that may carry a body (any method but GET, HEAD, OPTIONS) under
``/api/v1/`` is authenticated from its headers first (a client token for the agent
endpoints, the admin token or a dashboard session for the rest) and refused before a byte
of its body is read. What authenticated it is left in the scope, where the dependencies
find it instead of asking the database again.

Then every body but an update upload's is read here, whole, up to ``max_body_bytes``
(413 past it, at once when ``Content-Length`` says so) and handed on; an upload streams
through (its run has its own cap), once it is admitted: at most ``max_uploads`` at once in
this process and ``max_uploads_per_client`` per client (503 and 429, with
``Retry-After``). Every wait for body bytes ends after ``body_timeout_s`` (408), so a
client that stops sending mid-body releases what it holds; an upload's temporary file goes
with it (:class:`~api.services.updates.UploadSink`).

A refusal sent before the body was read closes the connection (``Connection: close``):
otherwise the server would have to read and discard the rest of it to reach the next
request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, RequestTimeout, TooLarge, TooManyRequests, Unavailable
from api.runtime import Runtime
from api.schemas import MAX_INT

__all__ = ["ADMIN_KEY", "AGENT_KEY", "RequestGate", "UploadSlots"]

log = logging.getLogger(__name__)

#: Scope keys where the gate leaves who a request authenticated as.
AGENT_KEY = "fedsrd.agent"
ADMIN_KEY = "fedsrd.admin"

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_AGENT_RUN = re.compile(r"/api/v1/agent/runs/(\d{1,19})(?:/.*)?")
_UPLOAD = re.compile(r"/api/v1/agent/runs/\d{1,19}/rounds/\d{1,19}/update")
#: Seconds a refused upload is told to wait: about the time an upload slot takes to free up
#: (an upload is seconds; a stalled one is cut at ``body_timeout_s``).
UPLOAD_RETRY_AFTER = 5


_CLOSE = {"Connection": "close"}


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            v = value.strip()
            return int(v) if v.isdigit() else None
    return None


async def _respond(send: Send, exc: ApiError, close: bool) -> None:
    body = json.dumps({"error": exc.code, "detail": exc.detail}).encode()
    headers = {**(exc.headers or {}), **(_CLOSE if close else {})}
    await send(
        {
            "type": "http.response.start",
            "status": exc.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _TimedReceive:
    """``receive`` with a limit on each wait for body bytes. Once the body is complete the
    waits are not timed: a response that streams listens on ``receive`` for the client's
    disconnect for as long as it sends."""

    def __init__(self, receive: Receive, timeout: float) -> None:
        self._receive = receive
        self._timeout = timeout
        self._done = False

    async def __call__(self) -> Message:
        if self._done:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), self._timeout)
        except TimeoutError:
            self._done = True  # the body will not be read further: the connection closes
            raise RequestTimeout(
                f"no body bytes for {self._timeout:g} s; request abandoned", headers=_CLOSE
            ) from None
        if message["type"] != "http.request" or not message.get("more_body", False):
            self._done = True
        return message


class UploadSlots:
    """Update uploads in progress in this process, in all and per client."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._by_client: Counter[int] = Counter()
        self._count = 0

    @property
    def in_progress(self) -> int:
        return self._count

    @contextmanager
    def hold(self, client_id: int) -> Iterator[None]:
        """One slot for ``client_id`` while the block runs; raises when none is free.
        Event-loop only (no lock: nothing else touches the counts)."""
        retry = {"Retry-After": str(UPLOAD_RETRY_AFTER), **_CLOSE}
        if self._by_client[client_id] >= self.per_client:
            raise TooManyRequests(
                f"this client already has {self._by_client[client_id]} uploads in progress "
                f"(at most {self.per_client}); retry when one has ended",
                headers=retry,
            )
        if self._count >= self.total:
            raise Unavailable(
                f"the server takes at most {self.total} uploads at once; retry shortly",
                headers=retry,
            )
        self._by_client[client_id] += 1
        self._count += 1
        try:
            yield
        finally:
            self._count -= 1
            self._by_client[client_id] -= 1
            if not self._by_client[client_id]:
                del self._by_client[client_id]


class RequestGate:
    """The middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.rt = runtime
        settings = runtime.settings
        self.uploads = UploadSlots(settings.max_uploads, settings.max_uploads_per_client)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.rt.settings
        timed = _TimedReceive(receive, settings.body_timeout_s)
        method: str = scope["method"]
        if method in _SAFE_METHODS:
            # Such bodies are never read; the timeout still guards a handler that would.
            await self.app(scope, timed, send)
            return
        path: str = scope["path"]
        has_body = _has_body(scope)
        try:
            if path.startswith("/api/v1/"):
                await self._authenticate(scope, path)
            if _UPLOAD.fullmatch(path) and AGENT_KEY in scope:
                with self.uploads.hold(scope[AGENT_KEY].client_id):
                    await self.app(scope, timed, send)
                return
            body = await self._read_body(scope, timed) if has_body else None
        except ApiError as e:
            await _respond(send, e, close=has_body)
            return
        except DBAPIError as e:
            if not (e.connection_invalidated or isinstance(e, OperationalError)):
                raise
            log.warning("database unavailable on %s: %s", path, e.orig)
            unavailable = Unavailable("database unavailable; retry", headers={"Retry-After": "2"})
            await _respond(send, unavailable, close=has_body)
            return
        await self.app(scope, receive if body is None else _replay(body, receive), send)

    async def _authenticate(self, scope: Scope, path: str) -> None:
        """Who the request is, from its headers alone; raises the refusal. Paths that name
        no known kind of caller (or no valid run id) are left to the application."""
        # Imported here: api.deps imports this module.
        from api.deps import bearer, require_admin
        from api.services.agent import authenticate

        request = Request(scope)
        if path.startswith("/api/v1/agent/"):
            m = _AGENT_RUN.fullmatch(path)
            if m is None or not 1 <= int(m.group(1)) <= MAX_INT:
                return
            scope[AGENT_KEY] = await run_in_threadpool(
                authenticate, self.rt, bearer(request), int(m.group(1))
            )
        else:
            scope[ADMIN_KEY] = await run_in_threadpool(require_admin, request, self.rt)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.rt.settings.max_body_bytes
        too_large = f"request body over this server's limit of {limit} bytes"
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            raise TooLarge(too_large)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break  # the application sees an empty body and answers a client now gone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise TooLarge(too_large)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then what the server sends (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
