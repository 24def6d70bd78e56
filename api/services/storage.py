"""Garbage collection of the blob store: blobs that no row names, last stored longer ago than
the grace period (``FEDSRD_BLOB_GRACE_S``).

What becomes garbage: the snapshots of rounds older than the newest
``FEDSRD_KEEP_SNAPSHOTS`` (:func:`api.services.rounds.prunable_snapshots`), client updates
of rounds older than the newest ``FEDSRD_KEEP_UPLOADS`` (none kept by default:
:func:`api.services.updates.release_uploads`), an upload refused
after its blob was stored (its round closed while it streamed in, or another upload of its
client won), where the upload could not remove it itself, and the blobs of an
aggregation that crashed before its row was written. A blob is shared by every row naming
the same content (identical runs produce identical snapshots), so it goes only when no row
of any run names it.

Why the grace period and the store's two-step removal (:meth:`BlobStore.collect`): a writer
stores a blob *before* the transaction that names it commits, and a writer whose content is
already stored keeps the existing blob. Between those two moments no row names the blob. So
a writer marks a blob stored again when it finds it (a local store renews the file's
modification time; S3 copies the object onto itself, a new version), the collector passes
over blobs stored within the grace period, and its last database check comes when a writer
that comes later keeps its own copy: a local store has moved the blob aside (the writer
puts its copy in place), a versioned bucket deletes only the version listed (the writer's
renewal is newer). The grace period must exceed the longest time from
storing a blob to committing its row (milliseconds for an upload, seconds for an
aggregation); the default is an hour.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select, union
from sqlalchemy.orm import Session

from api.models import Round, Run, Update
from api.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Collection:
    """What one garbage collection did (or, with ``dry_run``, would do)."""

    #: False when the blob store cannot collect safely (S3 without versioning): nothing done.
    supported: bool
    dry_run: bool = False
    #: Blobs in the store.
    scanned: int = 0
    #: Of those, named by a row.
    named: int = 0
    #: Named by no row but stored within the grace period: kept for now.
    recent: int = 0
    #: Removed (dry run: would be removed), and their bytes.
    removed: int = 0
    removed_bytes: int = 0
    #: Blobs put back that an interrupted earlier collection had taken out of place.
    recovered: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _named_select() -> Any:
    return union(
        select(Run.initial_blob).where(Run.initial_blob.is_not(None)),
        select(Round.delta_blob).where(Round.delta_blob.is_not(None)),
        select(Round.snapshot_blob).where(Round.snapshot_blob.is_not(None)),
        select(Update.blob).where(Update.blob_released_at.is_(None)),
    )


def named_blobs(s: Session) -> set[str]:
    """The keys of every blob a row names (runs' initial states, rounds' deltas and kept
    snapshots, clients' updates not yet released), over all runs."""
    return {str(sha) for sha in s.scalars(_named_select())}


def is_named(s: Session, sha256: str) -> bool:
    """Whether any row names blob ``sha256``."""
    q = _named_select().subquery()
    return s.scalar(select(q.c[0]).where(q.c[0] == sha256).limit(1)) is not None


def collect_garbage(
    rt: Runtime, *, grace_s: float | None = None, dry_run: bool = False
) -> Collection:
    """Remove every blob that no row names and that was last stored more than ``grace_s``
    (default ``FEDSRD_BLOB_GRACE_S``) seconds ago. Safe to run at any time, in any process,
    alongside uploads, aggregations and other collections (see the module docstring)."""
    store = rt.blobs
    if not store.can_collect():
        return Collection(supported=False, dry_run=dry_run)
    grace = rt.settings.blob_grace_s if grace_s is None else grace_s
    if grace < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace}")
    recovered = 0 if dry_run else store.recover_collection()
    # Rows first, then the listing: a blob stored after this query is within the grace
    # period (or named by a row this query saw).
    with rt.sessions() as s:
        named = named_blobs(s)

    def still_needed(sha: str) -> Callable[[float], bool]:
        def check(stored_at: float) -> bool:
            if stored_at > time.time() - grace:
                return True
            with rt.sessions() as s:
                return is_named(s, sha)

        return check

    scanned = n_named = recent = removed = removed_bytes = 0
    for blob in store.list_blobs():
        scanned += 1
        if blob.sha256 in named:
            n_named += 1
            continue
        if blob.stored_at > time.time() - grace:
            recent += 1
            continue
        if dry_run or store.collect(blob.sha256, still_needed(blob.sha256), version=blob.version):
            removed += 1
            removed_bytes += blob.size
    result = Collection(
        supported=True,
        dry_run=dry_run,
        scanned=scanned,
        named=n_named,
        recent=recent,
        removed=removed,
        removed_bytes=removed_bytes,
        recovered=recovered,
    )
    if removed or recovered:
        log.info("blob garbage collection: %s", result.as_dict())
    return result
