"""Moving a request body from the event loop to blocking code (disk, hashing, decoding)
without either side waiting for the other while it has work.

The event loop copies the body's chunks into fixed 1 MiB buffers and queues each full one;
a single thread (one per body, from the thread pool) hands them, in order, to a blocking
``write`` callable. Up to :data:`IN_FLIGHT` buffers may be queued or in that thread, so the
loop keeps reading from the socket while the thread works, and the thread finds the next
buffer ready when it is done; the loop waits only when all of them are taken. On a 2-core
host the loop, the thread and the sender then share both cores instead of taking turns.

Why fixed, reused buffers of 1 MiB: a batch that grows by appending is reallocated (and
copied) again and again, and batches of varying size keep asking the allocator for fresh
memory, whose first touch is slow on a VM that hands freed memory back to its host; and a
buffer larger than a core's cache is read back from memory by every later step (writing,
hashing, checking). Either costs a 64 MiB upload a third more CPU or worse (measured).
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.to_thread
from starlette.concurrency import run_in_threadpool

from api.errors import TooLarge

__all__ = ["BATCH", "IN_FLIGHT", "pump"]

#: Bytes per buffer handed from the event loop to the writing thread.
BATCH = 1 << 20
#: Buffers that may be queued for, or in, the writing thread while the loop fills the next
#: one (memory per body: at most ``IN_FLIGHT + 1`` buffers). Measured on 64 MiB uploads
#: (2 cores): 0 (the loop waits for each write) took about 20% longer; 3 gained nothing
#: over 2. Larger buffers no longer stay in a core's cache (2 MiB: twice the CPU).
IN_FLIGHT = 2


async def pump(
    body: AsyncIterator[bytes],
    write: Callable[[memoryview], None],
    *,
    max_bytes: int,
    too_large: str,
    limiter: anyio.CapacityLimiter | None = None,
) -> int:
    """Feed ``body`` to ``write`` in order, from one thread-pool thread, in buffers of
    :data:`BATCH` bytes (the last may be shorter); return the bytes received.

    ``write`` gets a view of a buffer that is reused once it returns: it must copy what it
    keeps. Past ``max_bytes`` received, :class:`~api.errors.TooLarge` (413) is raised with
    the message ``too_large``. The first exception ``write`` raises is raised here, once the
    loop next hands over a buffer or at the end; no further buffer is passed to ``write``
    after it. Whatever happens, ``write`` is no longer running when this returns or raises,
    so the caller may discard what it was writing to.

    The thread is held for as long as the body takes to arrive, so it comes from
    ``limiter`` when one is given (uploads: a limiter of their own, so that bodies that
    arrive slowly, or stall until their timeout, never take the thread-pool tokens that
    polls and health checks need); otherwise from the shared pool.
    """
    loop = asyncio.get_running_loop()
    work: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
    free: asyncio.Queue[bytearray] = asyncio.Queue()
    failure: list[BaseException] = []  # the writer's error; or the loop's, to stop writing

    def consume() -> None:
        while (item := work.get()) is not None:
            buf, n = item
            try:
                if not failure:
                    write(memoryview(buf)[:n])
            except BaseException as e:  # handed to the event loop
                failure.append(e)
            finally:
                loop.call_soon_threadsafe(free.put_nowait, buf)

    consumer = asyncio.ensure_future(
        run_in_threadpool(consume)
        if limiter is None
        else anyio.to_thread.run_sync(consume, limiter=limiter)
    )
    buffers = 1
    buf = bytearray(BATCH)
    filled = 0
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(too_large)
            view = memoryview(chunk)
            while view:
                k = min(BATCH - filled, len(view))
                buf[filled : filled + k] = view[:k]
                filled += k
                view = view[k:]
                if filled < BATCH:
                    continue
                if failure:
                    raise failure[0]
                work.put((buf, filled))
                filled = 0
                if free.empty() and buffers <= IN_FLIGHT:
                    buf = bytearray(BATCH)
                    buffers += 1
                else:
                    buf = await free.get()
        if filled:
            work.put((buf, filled))
    except BaseException as e:
        if not failure:
            failure.append(e)  # the thread skips what is still queued
        raise
    finally:
        work.put(None)
        # The thread must be done before the caller may discard what it writes to; the
        # wait is short (at most IN_FLIGHT buffers were queued, and after a failure they
        # are skipped). Shielded: a cancellation ends the wait, not the thread.
        await asyncio.shield(consumer)
    if failure:
        raise failure[0]
    return received
