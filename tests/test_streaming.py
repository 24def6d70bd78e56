"""api.streaming.pump: a request body reaches a blocking writer in order, in full buffers,
from one thread; failures on either side stop it, and the writer never outlives the call."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator

import pytest

from api import streaming
from api.errors import TooLarge


async def _body(chunks: list[bytes], delay: float = 0.0) -> AsyncIterator[bytes]:
    for c in chunks:
        if delay:
            await asyncio.sleep(delay)
        yield c


class Recorder:
    """A writer that keeps copies of what it gets (the buffers are reused) and its thread."""

    def __init__(self, delay: float = 0.0, fail_at: int | None = None) -> None:
        self.pieces: list[bytes] = []
        self.threads: set[int] = set()
        self.delay = delay
        self.fail_at = fail_at
        self.running = False

    def __call__(self, view: memoryview) -> None:
        self.running = True
        try:
            self.threads.add(threading.get_ident())
            if self.delay:
                time.sleep(self.delay)
            if self.fail_at is not None and len(self.pieces) == self.fail_at:
                raise OSError("disk full")
            self.pieces.append(bytes(view))
        finally:
            self.running = False


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, at, i = [], 0, 0
    while at < len(data):
        n = sizes[i % len(sizes)]
        out.append(data[at : at + n])
        at += n
        i += 1
    return out


@pytest.mark.parametrize("sizes", [[1 << 16], [1], [3, 70_000, 1 << 20, 5], [(1 << 20) + 1]])
@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_body_arrives_whole_in_order_in_full_buffers(sizes: list[int], delay: float) -> None:
    data = os.urandom(3 * streaming.BATCH + 12345)
    if sizes == [1]:
        data = data[: streaming.BATCH + 17]  # a byte at a time: keep it short
    w = Recorder(delay=delay)
    got = asyncio.run(
        streaming.pump(_body(_chunks(data, sizes)), w, max_bytes=len(data), too_large="x")
    )
    assert got == len(data)
    assert b"".join(w.pieces) == data
    assert all(len(p) == streaming.BATCH for p in w.pieces[:-1])
    assert len(w.threads) == 1 and threading.get_ident() not in w.threads


def test_empty_body() -> None:
    w = Recorder()
    assert asyncio.run(streaming.pump(_body([]), w, max_bytes=0, too_large="x")) == 0
    assert w.pieces == []


def test_over_the_cap_is_too_large_and_the_writer_has_stopped() -> None:
    data = os.urandom(4 * streaming.BATCH)
    w = Recorder(delay=0.01)
    with pytest.raises(TooLarge, match="over the cap"):
        asyncio.run(
            streaming.pump(
                _body(_chunks(data, [1 << 16])),
                w,
                max_bytes=len(data) - 1,
                too_large="over the cap",
            )
        )
    assert not w.running
    # The cap is checked as bytes arrive: the writer never saw anything past it.
    assert sum(map(len, w.pieces)) < len(data)


def test_a_writer_error_is_raised_and_nothing_more_is_written() -> None:
    data = os.urandom(6 * streaming.BATCH)
    w = Recorder(fail_at=1)
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(
            streaming.pump(_body(_chunks(data, [1 << 16])), w, max_bytes=len(data), too_large="x")
        )
    assert len(w.pieces) == 1 and not w.running


def test_a_body_error_stops_the_writer_before_it_propagates() -> None:
    class DisconnectError(Exception):
        pass

    async def body() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield os.urandom(streaming.BATCH)
        raise DisconnectError

    w = Recorder(delay=0.05)  # slow: buffers are still queued when the body fails
    with pytest.raises(DisconnectError):
        asyncio.run(streaming.pump(body(), w, max_bytes=1 << 30, too_large="x"))
    assert not w.running
    assert len(w.pieces) < 3  # what was still queued was dropped


def test_memory_is_bounded_by_the_buffers_in_flight() -> None:
    """A slow writer makes the loop wait for a free buffer: at most IN_FLIGHT + 1 exist."""
    seen: set[int] = set()

    def slow(view: memoryview) -> None:
        seen.add(id(view.obj))
        time.sleep(0.005)

    data = os.urandom(12 * streaming.BATCH)
    asyncio.run(
        streaming.pump(_body(_chunks(data, [1 << 16])), slow, max_bytes=len(data), too_large="x")
    )
    assert len(seen) <= streaming.IN_FLIGHT + 1
