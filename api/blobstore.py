"""Content-addressed blob store: uploads, global deltas and state snapshots, keyed by SHA-256.

The control plane keeps its rows in SQL and its large payloads (sparse LoRA updates uploaded by
clients, global deltas, state snapshots; up to a few hundred MiB) here. One interface,
:class:`BlobStore`, with two implementations that pass the same contract tests
(``tests/test_blobstore.py``): a local directory, :class:`LocalBlobStore` (here), for one
machine or a shared filesystem, and an S3-compatible bucket, ``S3BlobStore``
(:mod:`api.blobstore_s3`), for API and workers on several machines. :func:`open_blob_store`
picks one from a URL. This module is stdlib only (boto3 is imported only for an ``s3://``
URL) and knows nothing of HTTP; its :class:`BlobError` subclasses carry messages meant to
reach the client as 4xx details.

Invariants every implementation keeps, and every caller relies on:

* **Content-addressed and immutable.** A blob's key is the lowercase hex SHA-256 of its bytes,
  computed by the store while the bytes stream in, never taken on trust from the client (a
  client's claimed hash is only *checked*: ``commit(expected_sha256=...)``). A key therefore
  names exactly one content, forever: storing the same bytes twice is a no-op that returns
  the same :class:`BlobRef`, and a stored blob is never rewritten in place.
* **Complete before referenced.** A blob becomes visible under its key only once it is
  complete and durable (locally: written to a temp file, fsynced, atomically renamed,
  directory fsynced; in S3: one PutObject or CompleteMultipartUpload, which S3 makes visible
  atomically). Callers must ``commit`` the blob *before* the database transaction that inserts
  the row naming it commits, so a row never points at a missing or partial blob. The reverse
  failure (blob committed, transaction rolled back) only leaves an orphan blob, which is
  harmless and removed by garbage collection.
* **Deletion is garbage collection.** :meth:`BlobStore.collect` removes a blob that no row
  references, safely against a writer storing the same content at that moment: a writer
  that finds its content already stored marks it stored again (a local store sets the
  file's modification time, S3 copies the object onto itself), a collector only removes
  blobs stored longer ago than a grace period (longer than any writer takes from storing a
  blob to committing the row that names it), and a writer that comes after its last check
  keeps its own copy (locally the blob was moved aside before that check; a versioned
  bucket deletes only the version the collector listed). :meth:`BlobStore.delete` is
  unconditional (for tests and operators; nothing in the service calls it).
* **Never unpickled.** Blobs are untrusted client bytes. They are decoded only by the wire
  codec or safetensors, never by ``pickle`` or ``torch.load`` without ``weights_only=True``.
* **Keys are validated.** Every method taking a key rejects anything but 64 lowercase hex
  characters with :class:`InvalidBlobKey`, which also rules out path traversal.
* **No debris.** A writer that is aborted, exceeds its size limit, fails its hash check or
  leaves its ``with`` block uncommitted (exception included) removes its temp data at once
  (an S3 store also aborts a multipart upload that failed). Only a crashed process leaves
  temp data behind (temp files; for S3, also unfinished multipart uploads);
  :meth:`BlobStore.cleanup_temp` sweeps them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import re
import threading
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, ClassVar, Protocol, Self
from urllib.parse import unquote, urlsplit

__all__ = [
    "BlobError",
    "BlobHashMismatch",
    "BlobNotFound",
    "BlobRef",
    "BlobStore",
    "BlobTooLarge",
    "BlobWriter",
    "BlobWriterBase",
    "BytesLike",
    "InvalidBlobKey",
    "LocalBlobStore",
    "LocalBlobWriter",
    "StoredBlob",
    "TempFileWriter",
    "is_sha256_hex",
    "map_file",
    "open_blob_store",
    "sweep_temp_dir",
]

DEFAULT_CHUNK_SIZE = 1 << 20
#: What a writer accepts as a chunk.
BytesLike = bytes | bytearray | memoryview
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class BlobError(Exception):
    """Base of the store's errors; their messages are fit to return to a client (4xx)."""


class BlobNotFound(BlobError):  # noqa: N818 (names of the API contract)
    """No blob is stored under ``sha``."""

    def __init__(self, sha: str) -> None:
        self.sha = sha
        super().__init__(f"blob {sha} not found")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.sha,))


class BlobTooLarge(BlobError):  # noqa: N818 (names of the API contract)
    """The blob being written exceeds the writer's ``max_bytes`` limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"blob exceeds the size limit of {limit} bytes")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.limit,))


class BlobHashMismatch(BlobError):  # noqa: N818 (names of the API contract)
    """The SHA-256 of the bytes received differs from the one the sender declared."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"blob SHA-256 mismatch: expected {expected}, received content hashes to {actual}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.expected, self.actual))


class InvalidBlobKey(BlobError):  # noqa: N818 (names of the API contract)
    """A key that is not a SHA-256 hex digest (64 lowercase hex characters)."""

    def __init__(self, key: object) -> None:
        self.key = key
        shown = repr(key)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"invalid blob key {shown}: expected a SHA-256 digest as 64 lowercase hex characters"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key,))


def is_sha256_hex(s: str) -> bool:
    """Whether ``s`` is exactly 64 lowercase hex characters (no whitespace, no newline)."""
    return isinstance(s, str) and _SHA256_HEX.fullmatch(s) is not None


def _check_key(key: str) -> str:
    if not is_sha256_hex(key):
        raise InvalidBlobKey(key)
    return key


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: its key (lowercase hex SHA-256 of the content) and its size in bytes."""

    sha256: str
    size: int


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBlob:
    """A blob as the store lists it: its key, size and when it was last stored (epoch
    seconds; storing the same content again renews it)."""

    sha256: str
    size: int
    stored_at: float
    #: The store's version of the blob that was listed (S3's version id), for :meth:`collect`.
    version: str | None = None


class BlobWriter(Protocol):
    """Streams one blob into a store; obtained from :meth:`BlobStore.writer`.

    Use it as a context manager::

        with store.writer(max_bytes=limit) as w:
            for chunk in body:
                w.write(chunk)            # may raise BlobTooLarge
            ref = w.commit(claimed_sha)   # may raise BlobHashMismatch

    Leaving the block without :meth:`commit` (an exception included) aborts: the temp data
    is removed and nothing is stored. After commit or abort, :meth:`write` raises
    ``ValueError``; :meth:`abort` after either is a no-op.
    """

    @property
    def size(self) -> int:
        """Bytes written so far."""
        ...

    @property
    def sha256(self) -> str:
        """Lowercase hex SHA-256 of the bytes written so far."""
        ...

    def write(self, chunk: BytesLike) -> None:
        """Append ``chunk``; raises :class:`BlobTooLarge` (and aborts) past ``max_bytes``."""
        ...

    def commit(self, expected_sha256: str | None = None) -> BlobRef:
        """Make the blob durable and visible under its SHA-256; see :class:`BlobWriterBase`."""
        ...

    def abort(self) -> None:
        """Discard what was written; idempotent, and a no-op after commit."""
        ...

    def spooled(self) -> AbstractContextManager[memoryview]:
        """A read-only view of what was written, before commit (for validation)."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class BlobWriterBase(ABC):
    """The writer state machine shared by all stores: hashing, size limit, commit/abort.

    Subclasses only move bytes: :meth:`_write_raw` appends, :meth:`_publish` makes the
    complete blob visible under its key (a no-op if it already exists), :meth:`_discard`
    removes the temp data (idempotently; it may already be gone).
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self._max_bytes = max_bytes
        self._hasher = hashlib.sha256()
        self._size = 0
        self._state = "open"  # "open" | "committed" | "aborted"

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256(self) -> str:
        return self._hasher.hexdigest()

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._state != "open"

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise ValueError(f"cannot {what}: blob writer is already {self._state}")

    def write(self, chunk: BytesLike) -> None:
        self._check_open("write")
        n = memoryview(chunk).nbytes
        if self._max_bytes is not None and self._size + n > self._max_bytes:
            self.abort()
            raise BlobTooLarge(self._max_bytes)
        if n == 0:
            return
        try:
            self._write_raw(chunk)
        except BaseException:
            self.abort()
            raise
        self._hasher.update(chunk)
        self._size += n

    def commit(self, expected_sha256: str | None = None) -> BlobRef:
        """Verify, then make the blob durable and visible under its SHA-256.

        Raises :class:`BlobHashMismatch` (or :class:`InvalidBlobKey` for a malformed
        ``expected_sha256``) and discards the data if the check fails. If a blob with this
        content already exists, the new copy is dropped and the existing one kept (blobs are
        immutable). Any failure aborts the writer.
        """
        self._check_open("commit")
        ref = BlobRef(self._hasher.hexdigest(), self._size)
        try:
            if expected_sha256 is not None:
                _check_key(expected_sha256)
                if expected_sha256 != ref.sha256:
                    raise BlobHashMismatch(expected_sha256, ref.sha256)
            self._publish(ref)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return ref

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._discard()

    @contextmanager
    def spooled(self) -> Iterator[memoryview]:
        """A read-only view of everything written so far, before commit: the control plane
        validates an upload here, so a bad one is never stored. Release the view (and
        anything made from it) before leaving the block."""
        self._check_open("read back")
        with self._read_back() as view:
            yield view

    def _read_back(self) -> AbstractContextManager[memoryview]:
        raise NotImplementedError(f"{type(self).__name__} cannot read back before commit")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    @abstractmethod
    def _write_raw(self, chunk: BytesLike) -> None: ...

    @abstractmethod
    def _publish(self, ref: BlobRef) -> None: ...

    @abstractmethod
    def _discard(self) -> None: ...


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class BlobStore(ABC):
    """A content-addressed, immutable store of binary blobs keyed by SHA-256 hex.

    See the module docstring for the invariants. Methods taking a key raise
    :class:`InvalidBlobKey` for a malformed one and :class:`BlobNotFound` for a missing blob
    (except :meth:`exists` and :meth:`delete`). Implementations must be safe for several
    processes (API replicas, workers) sharing the same store.
    """

    @abstractmethod
    def writer(self, max_bytes: int | None = None) -> BlobWriter:
        """A writer for one new blob; ``max_bytes`` caps its size (None: no cap)."""

    def put_bytes(self, data: BytesLike, expected_sha256: str | None = None) -> BlobRef:
        """Store ``data`` (verified against ``expected_sha256`` if given); idempotent."""
        return self.put_pieces((data,), expected_sha256)

    def put_pieces(
        self, pieces: Iterable[BytesLike], expected_sha256: str | None = None
    ) -> BlobRef:
        """Store the concatenation of ``pieces`` as one blob, written piece by piece, so the
        blob never has to exist whole in memory (``fedsrd_core.codec.encode_pieces``).
        Verified against ``expected_sha256`` if given; idempotent; nothing is stored if
        iterating ``pieces`` raises."""
        if expected_sha256 is not None:
            _check_key(expected_sha256)
        with self.writer() as w:
            for piece in pieces:
                w.write(piece)
            return w.commit(expected_sha256)

    @contextmanager
    def mapped(self, sha: str) -> Iterator[memoryview]:
        """The whole blob as a read-only view for the duration of the block (decode from it
        and copy out what you keep). This default reads it into memory; the local store maps
        its file, and the S3 store a spooled copy, so a large blob costs no private copy."""
        yield memoryview(self.read_bytes(sha))

    @abstractmethod
    def exists(self, sha: str) -> bool:
        """Whether a complete blob is stored under ``sha``."""

    @abstractmethod
    def size(self, sha: str) -> int:
        """The blob's size in bytes."""

    @abstractmethod
    def open(self, sha: str) -> BinaryIO:
        """The blob opened read-only for binary reading; the caller closes it."""

    def read_bytes(self, sha: str) -> bytes:
        """The whole blob in memory (mind the size; prefer :meth:`iter_chunks` for big ones)."""
        with self.open(sha) as fh:
            return fh.read()

    def iter_chunks(
        self,
        sha: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[bytes]:
        """The blob's bytes ``[start:stop]`` as chunks of ``chunk_size`` bytes (the last may be
        shorter). The range works like a slice clipped to the blob (``stop`` None: to the
        end); the web layer serves HTTP ``Range`` requests with it.

        Validation and the lookup happen at the call, not at the first ``next``: a missing
        blob raises :class:`BlobNotFound` here, before a streaming response has started.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if start < 0 or (stop is not None and stop < start):
            raise ValueError(f"invalid byte range: start={start}, stop={stop}")
        limit = None if stop is None else stop - start
        return _read_chunks(self._open_range(sha, start, stop), chunk_size, limit)

    def _open_range(self, sha: str, start: int, stop: int | None) -> IO[bytes]:
        """The blob opened and positioned at ``start`` (clipped); stores that can fetch a
        range (S3) override this. Reading past ``stop`` is the caller's business."""
        fh = self.open(sha)
        if start:
            fh.seek(start)
        return fh

    @abstractmethod
    def delete(self, sha: str) -> None:
        """Remove the blob; no error if it is missing. Unconditional: garbage collection uses
        :meth:`collect`, which is safe against concurrent writers."""

    def local_path(self, sha: str) -> Path | None:
        """The blob's file, where the store keeps blobs as local files; None otherwise.

        Lets the web layer answer with a zero-copy file response. Stores that return a path
        raise :class:`BlobNotFound` for a missing blob; remote stores return None without a
        lookup.
        """
        _check_key(sha)
        return None

    def can_collect(self) -> bool:
        """Whether this store can collect garbage safely (:meth:`list_blobs`,
        :meth:`collect`): a local directory can; an S3 bucket only with versioning on."""
        return False

    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every stored blob, in no particular order (garbage collection)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its blobs")

    def collect(
        self, sha: str, still_needed: Callable[[float], bool], *, version: str | None = None
    ) -> bool:
        """Remove blob ``sha`` unless ``still_needed(stored_at)`` says otherwise; True if
        it is gone (False when it was already gone, or a writer stored it anew meanwhile).

        ``still_needed`` gets the time the blob was last stored and should check it against
        the grace period and the database for rows naming the blob. A writer storing the
        same content before it is asked renewed ``stored_at``; one storing it later keeps its
        own copy: a local store asks with the blob moved aside (the writer finds it missing
        and puts its copy in place; if ``still_needed`` is true or raises, the blob is put
        back), a versioned S3 bucket removes only the ``version`` listed and older ones (a
        writer's renewal is a newer version).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot collect garbage")

    def renew(self, sha: str) -> None:
        """Mark blob ``sha`` stored now, as storing it again would (no error if it is
        missing): a row that stops naming it does this first, so that garbage collection
        leaves it for the grace period after that (backups, readers holding an older
        plan)."""
        _check_key(sha)

    def recover_collection(self) -> int:
        """Put back blobs that a collector interrupted (crashed) had taken out of place but
        not yet removed; how many. Run before collecting."""
        return 0

    @abstractmethod
    def cleanup_temp(self, older_than_seconds: float = 3600) -> int:
        """Remove temp data abandoned (by a crashed process) more than that long ago.

        Age is the time since the temp data was last written, so a live upload that keeps
        sending is never swept. Returns how many temp items were removed.
        """


def _read_chunks(fh: IO[bytes], chunk_size: int, limit: int | None = None) -> Iterator[bytes]:
    with fh:
        while limit is None or limit > 0:
            chunk = fh.read(chunk_size if limit is None else min(chunk_size, limit))
            if not chunk:
                return
            if limit is not None:
                limit -= len(chunk)
            yield chunk


# --------------------------------------------------------------------------------------------
# Local directory
# --------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (POSIX; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as entries:
        return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _discard_temp(fh: IO[bytes], path: str) -> None:
    """Close and remove a temp file; the finalizer of a writer dropped without commit/abort."""
    try:
        fh.close()
    finally:
        _remove_quietly(path)


class TempFileWriter(BlobWriterBase):
    """Writes into a unique temp file in ``tmp_dir``; subclasses publish it on commit.

    Shared by the local store (which renames the file into place) and the S3 store (which
    spools an upload here while hashing it, since the key is known only at the end, then
    uploads the file). The temp file is removed on abort, on a failed commit, and by a
    finalizer if the writer is dropped without either.
    """

    def __init__(self, tmp_dir: Path, max_bytes: int | None = None) -> None:
        super().__init__(max_bytes)
        self._tmp_path = str(tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        flags |= getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self._tmp_path, flags, 0o644)
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o644)  # readable by other processes whatever the umask
            self._fh: IO[bytes] = open(fd, "wb")  # noqa: SIM115 (closed by commit/abort)
        except BaseException:
            os.close(fd)
            _remove_quietly(self._tmp_path)
            raise
        # A writer dropped without commit or abort still removes its temp file.
        self._finalizer = weakref.finalize(self, _discard_temp, self._fh, self._tmp_path)
        self._unsynced = 0  # bytes written since the last background sync began
        self._syncer: threading.Thread | None = None

    #: Start an ``fdatasync`` of the temp file in a thread each time this many bytes have been
    #: written since the last one began (None: never). The disk then writes a large upload
    #: back while the rest streams in, and the commit's fsync, which the rename waits for,
    #: finds only the tail left. The background syncs only hasten write-back: durability
    #: still rests on the commit's own fsync.
    _sync_every: ClassVar[int | None] = None

    def _write_raw(self, chunk: BytesLike) -> None:
        self._fh.write(chunk)
        if self._sync_every is None:
            return
        self._unsynced += memoryview(chunk).nbytes
        if self._unsynced >= self._sync_every and (
            self._syncer is None or not self._syncer.is_alive()
        ):
            self._fh.flush()  # buffered bytes must reach the OS before a sync can see them
            self._unsynced = 0
            # The thread syncs (and closes) a descriptor of its own, so nobody waits for it:
            # the writer may close or discard the file meanwhile (an abort never blocks on
            # the disk), and the commit's own fsync covers everything.
            self._syncer = threading.Thread(
                target=_sync_and_close, args=(_open_for_sync(self._tmp_path), True), daemon=True
            )
            self._syncer.start()

    def _close_temp(self, fsync: bool) -> None:
        """Flush (and fsync) the temp file and close it; it stays on disk until discarded."""
        self._fh.flush()
        if fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()

    def _discard(self) -> None:
        self._finalizer.detach()
        _discard_temp(self._fh, self._tmp_path)

    #: Start the temp file's fsync when it is read back for validation, so the disk works
    #: while the caller decodes (the commit's own fsync then finds little left to write).
    _presync: ClassVar[bool] = False

    @contextmanager
    def _read_back(self) -> Iterator[memoryview]:
        self._fh.flush()
        if self._size == 0:
            yield memoryview(b"")
            return
        sync = None
        if self._presync:
            # os.fsync releases the GIL. On a descriptor of its own (see _sync_and_close), so
            # that a write-back error is still reported to the commit's fsync.
            sync = threading.Thread(
                target=_sync_and_close, args=(_open_for_sync(self._tmp_path), False)
            )
            sync.start()
        # A read-only map of the temp file: the page cache, not a second copy in the heap.
        try:
            with open(self._tmp_path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(m)
            try:
                yield view
            finally:
                view.release()
                # BufferError: a view made from it is still alive; the GC closes the map then.
                with contextlib.suppress(BufferError):
                    m.close()
        finally:
            if sync is not None:
                sync.join()  # the thread never outlives the read-back (as before)


def _open_for_sync(path: str) -> int:
    """A new descriptor (a new open file description, not a ``dup``) of the temp file, for
    a sync in a background thread."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def _sync_and_close(fd: int, data_only: bool) -> None:
    """Hasten the write-back of a file through ``fd`` (from :func:`_open_for_sync`), then
    close it. Errors are ignored here, and not lost: Linux reports a write-back error to
    every open file description of the file that predates it, so the writer's own
    descriptor still gets it from the commit's fsync (a ``dup`` shares one description, and
    a sync through it would consume the error)."""
    try:
        with contextlib.suppress(OSError):
            if data_only and hasattr(os, "fdatasync"):
                os.fdatasync(fd)
            else:
                os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def map_file(fh: BinaryIO) -> Iterator[memoryview]:
    """A read-only view of the whole open file ``fh`` (mapped; closed with the block)."""
    with fh:
        if os.fstat(fh.fileno()).st_size == 0:  # an empty file cannot be mapped
            yield memoryview(b"")
            return
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    view = memoryview(mm)
    try:
        yield view
    finally:
        # A slice or array still alive (an exception's traceback may hold one) keeps the map
        # open; it is unmapped when the last of them goes.
        with contextlib.suppress(BufferError):
            view.release()
            mm.close()


def sweep_temp_dir(directory: Path, older_than_seconds: float) -> int:
    """Remove the files in ``directory`` last written more than that long ago; how many."""
    if older_than_seconds < 0:
        raise ValueError(f"older_than_seconds must be >= 0, got {older_than_seconds}")
    cutoff = time.time() - older_than_seconds
    removed = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:  # committed, aborted or swept meanwhile
                continue
            removed += 1
    return removed


class LocalBlobWriter(TempFileWriter):
    """Writes into a unique temp file under ``root/tmp``, renamed into place on commit."""

    _presync = True
    _sync_every = 8 << 20

    def __init__(self, store: LocalBlobStore, max_bytes: int | None = None) -> None:
        super().__init__(store.tmp_dir, max_bytes)
        self._store = store

    def _publish(self, ref: BlobRef) -> None:
        dest = self._store._blob_path(ref.sha256)
        try:
            if dest.stat().st_size == ref.size:
                # Already stored: blobs are immutable, keep the existing one, but mark it
                # stored now, so a collector's grace period counts from here (a collector
                # that took it out of place meanwhile makes this raise: then ours goes in).
                os.utime(dest)
                self._discard()
                return
        except (FileNotFoundError, PermissionError):
            # Missing, or owned by another user (utime needs ownership): put ours in place,
            # which renews it too.
            pass
        self._close_temp(fsync=True)
        created = self._store._make_shard_dirs(dest.parent)
        os.replace(self._tmp_path, dest)
        self._finalizer.detach()
        _fsync_dir(dest.parent)
        for d in created:  # new shard dirs: make their entries in the parents durable too
            _fsync_dir(d.parent)


class LocalBlobStore(BlobStore):
    """Blobs as files under a local directory (shared by API replicas and workers).

    Layout: ``root/sha256/<sha[:2]>/<sha[2:4]>/<sha>`` for blobs, ``root/tmp/`` for uploads in
    progress (same filesystem, so the final ``os.replace`` is atomic). Files are mode 0o644.
    Writers of the same content in several processes all succeed: each writes its own temp
    file and the renames are atomic replacements of identical content. Shard directories are
    never removed, so a rename never races a directory removal.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.blob_dir = self.root / "sha256"
        # Blobs a collector has taken out of place for its last check (never swept by age:
        # recover_collection puts back what a crashed collector left here).
        self.gc_dir = self.root / "collecting"
        for d in (self.tmp_dir, self.blob_dir, self.gc_dir):
            d.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    def _blob_path(self, sha: str) -> Path:
        _check_key(sha)
        return self.blob_dir / sha[:2] / sha[2:4] / sha

    def _make_shard_dirs(self, directory: Path) -> list[Path]:
        """Create ``directory`` and its missing parents; return those this call created."""
        created: list[Path] = []
        d = directory
        while d != self.blob_dir and not d.is_dir():
            created.append(d)
            d = d.parent
        for d in reversed(created):
            with contextlib.suppress(FileExistsError):  # another writer made it first
                d.mkdir()
        return created

    def writer(self, max_bytes: int | None = None) -> LocalBlobWriter:
        return LocalBlobWriter(self, max_bytes)

    def exists(self, sha: str) -> bool:
        return self._blob_path(sha).is_file()

    def size(self, sha: str) -> int:
        path = self._blob_path(sha)
        try:
            return path.stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(sha) from None

    def open(self, sha: str) -> BinaryIO:
        path = self._blob_path(sha)
        try:
            return open(path, "rb")  # the caller closes it
        except FileNotFoundError:
            raise BlobNotFound(sha) from None

    def read_bytes(self, sha: str) -> bytes:
        path = self._blob_path(sha)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha) from None

    @contextmanager
    def mapped(self, sha: str) -> Iterator[memoryview]:
        # The file's pages are the page cache's: reading a snapshot to decode it adds no
        # private copy of the blob to the process (a 3B adapter's state is 371 MiB).
        with map_file(self.open(sha)) as view:
            yield view

    def delete(self, sha: str) -> None:
        _remove_quietly(str(self._blob_path(sha)))

    def can_collect(self) -> bool:
        return True

    def renew(self, sha: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._blob_path(sha))

    def list_blobs(self) -> Iterator[StoredBlob]:
        for shard in _subdirs(self.blob_dir):
            for sub in _subdirs(shard):
                with os.scandir(sub) as entries:
                    for e in entries:
                        if not is_sha256_hex(e.name):
                            continue
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:  # collected meanwhile
                            continue
                        yield StoredBlob(e.name, st.st_size, st.st_mtime)

    def collect(
        self, sha: str, still_needed: Callable[[float], bool], *, version: str | None = None
    ) -> bool:
        src = self._blob_path(sha)
        held = self.gc_dir / f"{sha}.{uuid.uuid4().hex}"
        try:
            # Atomic: from here a writer of this content finds it missing and renames its
            # own copy into place; before here, its utime reached this very file.
            os.rename(src, held)
        except FileNotFoundError:
            return False
        try:
            keep = still_needed(held.stat().st_mtime)
        except BaseException:
            self._put_back(held, src)
            raise
        if keep:
            self._put_back(held, src)
            return False
        try:
            held.unlink()
        except FileNotFoundError:  # another collector's recovery put it back: it stays
            return False
        # A writer that came meanwhile has stored the content anew: it is not gone.
        return not src.exists()

    @staticmethod
    def _put_back(held: Path, dest: Path) -> None:
        """Return a held blob to ``dest`` unless a writer has put its own copy there
        meanwhile: the writer's stays, as its modification time is the fresh one."""
        try:
            os.link(held, dest)  # never replaces: FileExistsError if a writer was first
        except FileExistsError:
            pass
        except FileNotFoundError:  # another collector's recovery already put it back
            return
        except OSError:  # no hard links on this filesystem: a rename (which would replace
            # a copy a writer put there between this check and the rename: same bytes)
            if not dest.exists():
                with contextlib.suppress(FileNotFoundError):
                    os.rename(held, dest)
                return
        with contextlib.suppress(FileNotFoundError):
            held.unlink()

    def recover_collection(self) -> int:
        restored = 0
        with os.scandir(self.gc_dir) as entries:
            for e in entries:
                sha = e.name.split(".", 1)[0]
                if not is_sha256_hex(sha):
                    continue
                dest = self._blob_path(sha)
                self._make_shard_dirs(dest.parent)
                self._put_back(Path(e.path), dest)
                restored += 1
        return restored

    def local_path(self, sha: str) -> Path:
        path = self._blob_path(sha)
        if not path.is_file():
            raise BlobNotFound(sha)
        return path

    def cleanup_temp(self, older_than_seconds: float = 3600) -> int:
        return sweep_temp_dir(self.tmp_dir, older_than_seconds)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def open_blob_store(
    url: str,
    *,
    spool_dir: str | Path | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
) -> BlobStore:
    """The store a URL names.

    * ``file:///abs/path`` or a plain path: :class:`LocalBlobStore` there.
    * ``s3://bucket`` or ``s3://bucket/prefix``: ``S3BlobStore`` (:mod:`api.blobstore_s3`),
      with ``s3_endpoint_url`` for an S3-compatible server (MinIO, Ceph, R2, ...) and
      ``s3_region``; credentials come from boto3's own chain (``AWS_ACCESS_KEY_ID`` /
      ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role), never from the URL.
      Uploads are spooled in ``spool_dir`` (default: the system's temp directory).

    Any other scheme raises ``ValueError`` (the message names the scheme, never the rest of
    the URL, which may hold credentials).
    """
    if not url:
        raise ValueError(
            "unsupported blob store URL '': expected file:///abs/path, a path or s3://bucket"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):  # plain path (or C:\...)
        return LocalBlobStore(Path(url).expanduser())
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(
                "unsupported blob store URL: file URLs must be file:///absolute/path "
                "(no host, absolute path)"
            )
        return LocalBlobStore(Path(unquote(parts.path)))
    if scheme == "s3":
        from api.blobstore_s3 import S3BlobStore  # boto3 only where S3 is used

        return S3BlobStore.from_url(
            url, endpoint_url=s3_endpoint_url, region=s3_region, spool_dir=spool_dir
        )
    raise ValueError(
        f"unsupported blob store URL scheme {scheme!r}: expected file:///abs/path, a path "
        "or s3://bucket/prefix"
    )
