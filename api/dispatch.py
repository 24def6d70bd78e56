"""Sending work to the workers: one interface, a Celery implementation and an inline one.

Jobs take IDs only. ``CeleryDispatcher`` sends task messages by name (the API never imports
the worker's task code or torch-heavy modules for that); ``InlineDispatcher`` runs the same
job functions in the calling process, in FIFO order, draining a queue so that a job that
enqueues more jobs (aggregation opens a round, which trains simulated clients) never
recurses. Inline mode is for single-process debugging and the API unit tests; the
end-to-end tests use Celery.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from api.settings import Settings

if TYPE_CHECKING:
    from api.runtime import Runtime

log = logging.getLogger(__name__)

AGGREGATE = "fedsrd.aggregate_round"
TRAIN = "fedsrd.train_client"
EVALUATE = "fedsrd.evaluate_round"
#: CPU queue for aggregation; GPU queue for local training and evaluation.
CPU_QUEUE = "fedsrd.cpu"
GPU_QUEUE = "fedsrd.gpu"
QUEUE_OF = {AGGREGATE: CPU_QUEUE, TRAIN: GPU_QUEUE, EVALUATE: GPU_QUEUE}


class Dispatcher(ABC):
    def bind(self, rt: Runtime) -> None:  # noqa: B027 - optional hook
        """Called once the runtime exists (inline mode runs jobs against it)."""

    @abstractmethod
    def send(self, task: str, *args: int) -> None:
        """Queue ``task`` with integer ID arguments."""

    def aggregate(self, round_id: int) -> None:
        self.send(AGGREGATE, round_id)

    def train(self, run_id: int, client_id: int, round_number: int) -> None:
        self.send(TRAIN, run_id, client_id, round_number)

    def evaluate(self, run_id: int, round_number: int) -> None:
        self.send(EVALUATE, run_id, round_number)

    def ping(self) -> None:  # noqa: B027 - a no-op where there is no broker
        """Raise if the broker is unreachable (``/readyz``)."""


class CeleryDispatcher(Dispatcher):
    def __init__(self, settings: Settings) -> None:
        from workers.celery_app import create_celery

        self.app = create_celery(settings)

    def send(self, task: str, *args: int) -> None:
        self.app.send_task(task, args=list(args), queue=QUEUE_OF[task])

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)


class InlineDispatcher(Dispatcher):
    def __init__(self) -> None:
        self._queue: deque[tuple[str, tuple[int, ...]]] = deque()
        self._lock = threading.Lock()
        self._draining = threading.local()
        self._rt: Runtime | None = None

    def bind(self, rt: Runtime) -> None:
        self._rt = rt

    def send(self, task: str, *args: int) -> None:
        with self._lock:
            self._queue.append((task, args))
        if getattr(self._draining, "on", False):
            return
        self._draining.on = True
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        break
                    name, a = self._queue.popleft()
                self._run(name, a)
        finally:
            self._draining.on = False

    def _run(self, name: str, args: tuple[int, ...]) -> None:
        import workers.jobs as jobs

        assert self._rt is not None, "InlineDispatcher used before bind()"
        table: dict[str, Callable[..., Any]] = {
            AGGREGATE: jobs.aggregate_round,
            TRAIN: jobs.train_client,
            EVALUATE: jobs.evaluate_round,
        }
        fn = table[name]
        try:
            fn(self._rt, *args)
        except Exception:
            log.exception("inline job %s%s failed", name, args)


def make_dispatcher(settings: Settings) -> Dispatcher:
    if settings.task_mode == "inline":
        return InlineDispatcher()
    return CeleryDispatcher(settings)
