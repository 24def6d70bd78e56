"""Start and stop the system's processes: the API (uvicorn) and a Celery worker.

Used by ``fedsrd up`` / ``fedsrd demo``, the end-to-end tests and the API benchmark, so
they all run the same commands. Each process gets its own process group, so stopping it
also stops what it spawned.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from api.dispatch import CPU_QUEUE, GPU_QUEUE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process group: a crash, nothing gets to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def service_env(settings_env: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings_env)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def api_service(
    env: Mapping[str, str], port: int, log_dir: Path, host: str = "127.0.0.1"
) -> Service:
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", "api.main:app_from_env",
        "--host", host, "--port", str(port), "--log-level", "warning", "--no-access-log",
        # Longer than clients' keep-alive (httpx: 5 s), so the server never closes a
        # connection a client is about to reuse.
        "--timeout-keep-alive", "75",
        # uvicorn's protocol with a time limit on request headers (FEDSRD_HEADER_TIMEOUT_S).
        "--http", "api.protocol:HttpToolsProtocol",
    ]  # fmt: skip
    return Service("api", argv, service_env(env), log_dir / "api.log")


def worker_service(
    env: Mapping[str, str],
    log_dir: Path,
    *,
    queues: str = f"{CPU_QUEUE},{GPU_QUEUE}",
    name: str = "worker",
) -> Service:
    # solo pool: one task at a time in the worker process itself (one GPU task per
    # process; CUDA never crosses a fork).
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.worker", "worker",
        "-Q", queues, "--pool", "solo", "--loglevel", "INFO",
        "-n", f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h", "--without-gossip",
        "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    return Service(name, argv, service_env(env), log_dir / f"{name}.log")


def wait_ready(base_url: str, service: Service | None = None, timeout: float = 60.0) -> None:
    """Wait until ``/readyz`` answers 200 (raises with the service's log tail otherwise)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
        try:
            r = httpx.get(base_url + "/readyz", timeout=2.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.2)
    tail = service.tail() if service is not None else ""
    raise TimeoutError(f"{base_url} not ready after {timeout}s ({last})\n{tail}")


def wait_worker(service: Service, timeout: float = 60.0) -> None:
    """Wait until the Celery worker logs that it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited:\n{service.tail()}")
        if " ready." in service.tail(200):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{service.name} not ready after {timeout}s\n{service.tail()}")
