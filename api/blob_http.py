"""One stored blob as an HTTP response, the same for every blob store.

A local store's file goes out as a file response (zero-copy where the server can); a remote
store's object (S3) is streamed through in chunks. Both answer with the same headers:
``Content-Length``, a strong ``ETag`` (the quoted SHA-256: a key names one content, so the
tag is the same on every API replica), ``Accept-Ranges: bytes``, and honour a single
``Range`` (206 with ``Content-Range``; 416 past the end), with ``If-Range``. A multi-range
request gets the local file's multipart answer or, from a remote store, the whole blob (a
server may always ignore ``Range``).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping

from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from api.blobstore import BlobStore

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class BlobFile(FileResponse):
    # Starlette reads files in 64 KiB chunks; blobs are tens to hundreds of MiB, and each
    # chunk is a trip through the event loop.
    chunk_size = 4 << 20


def etag_of(sha256: str) -> str:
    return f'"{sha256}"'


class RangeNotSatisfiable(Exception):  # noqa: N818 (the HTTP status's name)
    """The range starts at or past the end of the blob (HTTP 416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a single byte range of a ``size``-byte blob, clipped to it.

    None when the header is malformed or asks for several ranges: serve the whole blob
    (RFC 9110 lets a server ignore ``Range``). Raises :class:`RangeNotSatisfiable` for a
    range that starts past the end (or an empty suffix).
    """
    m = _RANGE.fullmatch(header.replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        n = int(last)  # a suffix: the last n bytes
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - n, 0), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, size if not last else min(int(last) + 1, size)


def blob_response(
    store: BlobStore,
    sha256: str,
    size: int,
    headers: Mapping[str, str],
    request_headers: Mapping[str, str],
) -> Response:
    """The blob ``sha256`` of ``size`` bytes, with ``headers`` added to the common ones."""
    out = {**headers, "ETag": etag_of(sha256), "Accept-Ranges": "bytes"}
    media = "application/octet-stream"
    path = store.local_path(sha256)
    if path is not None:  # Starlette handles Range and If-Range against this ETag
        return BlobFile(path, media_type=media, headers=out)
    byte_range = None
    header = request_headers.get("range")
    if_range = request_headers.get("if-range")
    if header is not None and (if_range is None or if_range == out["ETag"]):
        try:
            byte_range = parse_range(header, size)
        except RangeNotSatisfiable:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    if byte_range is None:
        out["Content-Length"] = str(size)
        return StreamingResponse(
            store.iter_chunks(sha256, BlobFile.chunk_size), media_type=media, headers=out
        )
    start, stop = byte_range
    out["Content-Length"] = str(stop - start)
    out["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return StreamingResponse(
        store.iter_chunks(sha256, BlobFile.chunk_size, start=start, stop=stop),
        status_code=206,
        media_type=media,
        headers=out,
    )


class CountedResponse(Response):
    """``inner`` sent as it is, then ``on_sent(n)`` (in the thread pool) with the body bytes
    ``n`` it sent: a range answer's bytes, not the blob's size (five one-byte ranges counted
    five blobs before), and a transfer cut off midway only as far as it went."""

    def __init__(self, inner: Response, on_sent: Callable[[int], None]) -> None:
        # Not Response.__init__: nothing of its own to render; FastAPI reads these.
        self.inner = inner
        self.on_sent = on_sent
        self.status_code = inner.status_code
        self.raw_headers = inner.raw_headers
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = 0

        async def counting(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.pathsend":  # a whole file, zero-copy
                sent += os.path.getsize(message["path"])
            await send(message)

        try:
            await self.inner(scope, receive, counting)
        finally:
            if sent:
                # Shielded: a client gone mid-transfer cancels the send, not the count.
                await asyncio.shield(run_in_threadpool(self.on_sent, sent))
        if self.background is not None:
            await self.background()
