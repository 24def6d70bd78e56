"""One settings object for the control plane and the workers (environment: ``FEDSRD_*``).

The embedded default needs no external server: SQLite and a local blob directory under
``data_dir``, and a broker-less Celery transport (the filesystem transport, one directory
under ``data_dir``) that the worker process started by ``fedsrd up`` consumes. Production
points ``database_url`` at PostgreSQL and ``broker_url`` at Redis.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PLACEHOLDERS = {"", "changeme", "change-me", "admin", "secret", "password"}


class Settings(BaseSettings):
    """Control-plane configuration; every field can be set as ``FEDSRD_<NAME>``."""

    # No NaN or Infinity from the environment either: every interval and limit is finite.
    model_config = SettingsConfigDict(env_prefix="FEDSRD_", extra="ignore", allow_inf_nan=False)

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("var")
    #: SQLAlchemy URL; empty means SQLite at ``data_dir/fedsrd.db``.
    database_url: str = ""
    #: PostgreSQL: seconds to wait for a new connection (libpq ``connect_timeout``): a
    #: database host that accepts and then hangs fails a request instead of holding a
    #: thread for ever. libpq treats values below 2 as 2.
    database_connect_timeout_s: int = Field(default=10, ge=1, le=3600)
    #: PostgreSQL: the server cancels a statement (lock waits included) that runs longer
    #: (seconds; 0: no limit). Far above any statement the API or a worker makes; what it
    #: catches is a statement stuck behind a lock someone forgot.
    database_statement_timeout_s: float = Field(default=60.0, ge=0.0, le=86400.0)
    #: Blob store URL: ``file:///path`` or a path (empty means ``data_dir/blobs``), or
    #: ``s3://bucket/optional/prefix`` for an S3-compatible bucket shared by API and workers
    #: on several machines (credentials: the standard AWS environment or credential chain).
    blob_url: str = ""
    #: S3-compatible server (MinIO, Ceph RGW, R2, ...); empty: AWS S3 itself.
    s3_endpoint_url: str = ""
    #: S3 region; empty: boto3's own (``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / config file).
    s3_region: str = ""
    #: Celery broker: ``redis://...`` in production; ``filesystem://`` (the default) keeps the
    #: queue in ``data_dir/queue`` so the embedded mode needs no broker server.
    broker_url: str = "filesystem://"
    #: ``celery``: tasks go to the broker; ``inline``: run in the API process after commit
    #: (single-process debugging and the API unit tests; no worker needed).
    task_mode: Literal["celery", "inline"] = "celery"
    admin_token: str = ""
    #: Where the project's tiny model is built and cached (``model: "tiny"`` in a run).
    model_cache: Path = Path("var/models")
    #: Longest a poll may be held open waiting for work (seconds).
    poll_max_wait: float = Field(default=30.0, ge=0.0, le=300.0)
    #: How often the API sweeps round deadlines and client liveness (seconds).
    sweep_interval: float = Field(default=1.0, gt=0.0)
    #: Redis visibility timeout: longer than the longest task (aggregation of a 70B layout,
    #: a slow local round), or Redis redelivers a task that is still running.
    task_visibility_timeout: int = Field(default=6 * 3600, ge=60)
    #: Snapshots kept per run: those of the newest N closed rounds (-1: all). An older
    #: round's state is rebuilt from the newest snapshot kept before it (or the initial
    #: state) and the global deltas, which are always kept. Aggregation reads the newest,
    #: so N >= 1.
    keep_snapshots: int = Field(default=2, ge=-1)
    #: Client updates kept per run: those of the newest N closed rounds (-1: all; 0: none,
    #: released as soon as their round is aggregated). A released update's row stays (size,
    #: samples, loss, its SHA-256); its blob goes to garbage collection. Individual updates
    #: can leak training data, so keeping none is the default.
    keep_uploads: int = Field(default=0, ge=-1)
    #: Garbage collection removes a blob no row names only if it was last stored longer ago
    #: than this (seconds): longer than any writer takes from storing a blob to committing
    #: the row that names it, or a blob just stored again by another run could go.
    blob_grace_s: float = Field(default=3600.0, ge=0.0)
    #: Collect garbage (unreferenced blobs, past the grace period) after every aggregation.
    gc_after_round: bool = True
    #: Fault injection for the crash tests: aggregation pauses this long after it has
    #: started, so a test can kill the worker mid-task. Always 0 in real deployments.
    fault_aggregate_delay_s: float = Field(default=0.0, ge=0.0, le=600.0)
    #: Lifetime of a dashboard sign-in (seconds). Sessions are signed with a key derived
    #: from the admin token: changing the token signs every browser out.
    session_ttl_s: int = Field(default=12 * 3600, ge=60, le=30 * 86400)
    #: Longest a connection may take to send a request's headers (seconds), counted from
    #: the connection's start or the request's first byte: a client that stops halfway is
    #: disconnected (uvicorn itself waits for ever). Needs the project's HTTP protocol
    #: (``uvicorn --http api.protocol:HttpToolsProtocol``, as ``fedsrd up`` and compose run).
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=600.0)
    #: Longest wait for the next bytes of a request body (seconds): a body that stalls this
    #: long is refused (408) and a stalled upload's temporary file removed.
    body_timeout_s: float = Field(default=30.0, gt=0.0, le=600.0)
    #: Largest body of any request but an update upload (bytes; 413 past it). Uploads have
    #: their run's own cap.
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    #: Update uploads one API process takes at once, over all clients (503 with
    #: ``Retry-After`` past it) and per client (429): a stalled body holds one of these
    #: until ``body_timeout_s``, never a thread that polls and health checks need.
    max_uploads: int = Field(default=16, ge=1, le=1024)
    max_uploads_per_client: int = Field(default=2, ge=1, le=64)

    @model_validator(mode="after")
    def _keep_a_snapshot(self) -> Settings:
        if self.keep_snapshots == 0:
            raise ValueError(
                "FEDSRD_KEEP_SNAPSHOTS must be at least 1 (aggregation reads the newest "
                "snapshot), or -1 to keep all"
            )
        return self

    @model_validator(mode="after")
    def _secrets_outside_development(self) -> Settings:
        if self.environment == "production":
            if self.admin_token.lower() in _PLACEHOLDERS or len(self.admin_token) < 16:
                raise ValueError(
                    "FEDSRD_ADMIN_TOKEN must be set to a real secret (16+ characters) in production"
                )
            if self.task_mode != "celery":
                raise ValueError("FEDSRD_TASK_MODE must be 'celery' in production")
        return self

    @cached_property
    def resolved_admin_token(self) -> str:
        """The admin token; in development, a random one is made and kept in ``data_dir``."""
        if self.admin_token:
            return self.admin_token
        path = self.data_dir / "admin_token"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)  # a crashed start's leftover: O_EXCL must create anew
        # Created 0600 (O_EXCL: never a file someone else made): the token is never readable
        # by others, not even between a write and a chmod.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        tmp.replace(path)
        return path.read_text().strip()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fedsrd.db').resolve()}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or str((self.data_dir / "blobs").resolve())

    @property
    def blob_spool_dir(self) -> Path:
        """Where an S3 store spools uploads while hashing them (local scratch)."""
        return (self.data_dir / "blob-spool").resolve()

    @property
    def queue_dir(self) -> Path:
        return (self.data_dir / "queue").resolve()
