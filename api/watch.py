"""Long polls without a thread each: waiters of one process share one watcher that reads
the version of every watched run a few times a second (rounds open in worker processes, so
an in-process signal alone would miss them) and wakes the waiters of runs that changed."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.models import Run
from api.runtime import Runtime

log = logging.getLogger(__name__)


class RunWatcher:
    def __init__(self, rt: Runtime, interval: float = 0.1) -> None:
        self.rt = rt
        self.interval = interval
        self._events: dict[int, asyncio.Event] = {}
        self._versions: dict[int, int] = {}
        self._waiters: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait(self, run_id: int, seen_version: int, timeout: float) -> None:
        """Return when run ``run_id``'s version differs from ``seen_version``, or after
        ``timeout`` seconds."""
        known = self._versions.get(run_id)
        if known is not None and known > seen_version:
            return  # already changed since the caller looked
        if known is None or seen_version > known:
            # The caller saw a newer version than the watcher knows: adopt it, and wake the
            # waiters that saw the older one.
            self._versions[run_id] = seen_version
            if known is not None and run_id in self._events:
                self._events[run_id].set()
                self._events[run_id] = asyncio.Event()
        event = self._events.setdefault(run_id, asyncio.Event())
        self._waiters[run_id] = self._waiters.get(run_id, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            self._waiters[run_id] -= 1
            if self._waiters[run_id] == 0:
                del self._waiters[run_id]
                self._events.pop(run_id, None)
                self._versions.pop(run_id, None)

    def _read(self, ids: list[int]) -> dict[int, int]:
        with self.rt.sessions() as s:
            return {i: v for i, v in s.execute(select(Run.id, Run.version).where(Run.id.in_(ids)))}

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            ids = list(self._waiters)
            if not ids:
                continue
            try:
                current = await run_in_threadpool(self._read, ids)
            except Exception:
                log.exception("run watcher could not read run versions")
                continue
            for rid, version in current.items():
                if rid in self._versions and version > self._versions[rid]:
                    self._versions[rid] = version
                    event = self._events.get(rid)
                    if event is not None:
                        event.set()
                        self._events[rid] = asyncio.Event()
