"""uvicorn's HTTP/1.1 protocol (httptools) with a limit on the time a request's headers take.

uvicorn closes a kept-alive connection that stays idle (``--timeout-keep-alive``), but a
connection that opens and sends nothing, or sends part of a request's headers and stops,
is held for ever (and the first byte of a request cancels the keep-alive timer). Such
connections cost a socket and a little memory each; enough of them exhaust the process's
file descriptors. Here a timer runs from the connection's start, and again from the first
byte of each later request, until the request's headers are complete; if it fires, the
server closes the connection (with a 408 if a request had begun). Bodies have their own
limit, in the application (:mod:`api.gate`), which knows what a body may cost.

Used as ``uvicorn --http api.protocol:HttpToolsProtocol`` (``fedsrd up``, the tests and
docker-compose.yml do); the limit is ``FEDSRD_HEADER_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from uvicorn.protocols.http import httptools_impl

from api.settings import Settings

__all__ = ["HttpToolsProtocol"]

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 27\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"request headers timed out\r\n"
)


@functools.cache
def header_timeout() -> float:
    """``FEDSRD_HEADER_TIMEOUT_S``, read once per process (the application reads the same
    environment)."""
    return Settings().header_timeout_s


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_begun = False

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(header_timeout(), self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self.transport.write(_TIMEOUT_RESPONSE)
        # Else nothing was asked (an idle, perhaps preconnected, socket): closed silently,
        # as a client may retry a request that meets a 408 it did not send it for.
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        self._arm_header_timer()  # a later request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._request_begun = False
        super().on_headers_complete()
