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

import re
from collections.abc import Mapping

from fastapi.responses import FileResponse, Response, StreamingResponse

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
