"""The blob store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, Cloudflare R2, ...).

API replicas and workers on several machines share blobs through one bucket. The store keeps
every invariant of :mod:`api.blobstore` and passes the same contract tests:

* **Key computed while streaming.** A writer spools the bytes to a local temp file while it
  hashes them (the key is known only at the end), in ``spool_dir``; the size cap is enforced
  there, before anything reaches S3, and ``spooled()`` reads the spool back for validation.
* **Visible only when complete.** On commit the spool is uploaded under its final key with one
  PutObject (up to ``part_size``) or a multipart upload of ``part_size`` parts read from the
  spool one at a time (memory stays bounded for blobs of hundreds of MiB). S3 makes the object
  visible only when the PutObject or the CompleteMultipartUpload succeeds, and atomically:
  readers never see a partial blob. Two writers of the same content both succeed; the bytes
  under the key are the same whichever lands last.
* **Immutable, duplicate puts upload nothing.** A commit whose key already exists with the
  same size copies the object onto itself instead (server side, new metadata): its
  modification time, and in a versioned bucket its version, is renewed, which garbage
  collection relies on (:meth:`S3BlobStore.collect` removes only the version it listed and
  older ones, so a renewal after the listing survives). Collection needs versioning on.
* **No debris.** A failed multipart upload is aborted; the spool file is removed on commit,
  abort and failure. :meth:`S3BlobStore.cleanup_temp` removes stale spool files and aborts
  multipart uploads under the prefix that have not received a part for that long (a crashed
  process); a bucket lifecycle rule ``AbortIncompleteMultipartUpload`` is a good second net.

Layout: ``<prefix>/sha256/<sha[:2]>/<sha[2:4]>/<sha>``, the local store's layout under its
root, so ``aws s3 sync <root>/sha256 s3://bucket/<prefix>/sha256`` migrates a local store.

Credentials come from boto3's chain (environment, shared config, instance or task role),
never from our settings or the URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from api.blobstore import (
    DEFAULT_CHUNK_SIZE,
    BlobNotFound,
    BlobRef,
    BlobStore,
    InvalidBlobKey,
    StoredBlob,
    TempFileWriter,
    _check_key,
    map_file,
    sweep_temp_dir,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

__all__ = ["MIN_PART_SIZE", "S3BlobStore", "S3BlobWriter"]

#: S3's smallest part (all but the last); also the largest blob sent in one PutObject here.
MIN_PART_SIZE = 5 << 20
#: The largest object one CopyObject copies.
MAX_COPY_SIZE = 5 << 30
#: 16 MiB parts: a 300 MiB upload is 19 requests; S3 allows 10,000 parts (160 GB here).
DEFAULT_PART_SIZE = 16 << 20
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
log = logging.getLogger(__name__)


_SESSION_LOCK = threading.Lock()
_SESSIONS: dict[int, boto3.session.Session] = {}


def _session() -> boto3.session.Session:
    """One boto3 session per process: it caches the service models that every new client
    would otherwise load again (a few hundred ms each)."""
    pid = os.getpid()
    if pid not in _SESSIONS:
        _SESSIONS.clear()  # a forked child never reuses its parent's
        _SESSIONS[pid] = boto3.session.Session()
    return _SESSIONS[pid]


def _is_not_found(e: ClientError) -> bool:
    return str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND


class S3BlobWriter(TempFileWriter):
    """Spools to a local temp file while hashing; commit uploads it under its SHA-256."""

    def __init__(self, store: S3BlobStore, max_bytes: int | None = None) -> None:
        super().__init__(store.spool_dir, max_bytes)
        self._store = store

    def _publish(self, ref: BlobRef) -> None:
        self._close_temp(fsync=False)  # S3 holds the durable copy; the spool is scratch
        # Already stored: renewed instead (a newer version that garbage collection leaves
        # alone); gone meanwhile, or too large to copy in one request: uploaded again.
        if not (self._store._has(ref) and self._store._renew(ref.sha256, ref.size)):
            self._store._upload(self._tmp_path, ref)
        self._discard()


class S3BlobStore(BlobStore):
    """Blobs as objects under ``s3://bucket/prefix``; see the module docstring."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        spool_dir: str | Path | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        client: S3Client | None = None,
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.part_size = part_size
        default_spool = Path(tempfile.gettempdir()) / "fedsrd-blob-spool"
        self.spool_dir = Path(spool_dir) if spool_dir is not None else default_spool
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._client = client
        self._client_pid = os.getpid() if client is not None else -1
        self._lock = threading.Lock()
        self._versioned: bool | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        spool_dir: str | Path | None = None,
    ) -> S3BlobStore:
        """``s3://bucket`` or ``s3://bucket/prefix/...``; credentials in it are refused."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise ValueError("an S3 blob store URL starts with s3://")
        if "@" in parts.netloc or ":" in parts.netloc:
            # Never echo the URL: it may hold a secret key.
            raise ValueError(
                "unsupported blob store URL: s3:// URLs name a bucket only; credentials come "
                "from the AWS environment (AWS_ACCESS_KEY_ID, ...), the endpoint from "
                "FEDSRD_S3_ENDPOINT_URL"
            )
        if parts.query or parts.fragment:
            raise ValueError("unsupported blob store URL: s3:// URLs take no query or fragment")
        return cls(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=endpoint_url,
            region=region,
            spool_dir=spool_dir,
        )

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"{type(self).__name__}('s3://{self.bucket}/{self.prefix}'{where})"

    @property
    def client(self) -> S3Client:
        """The boto3 client of this process (made on first use; again after a fork, since
        connection pools must not cross one)."""
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = self._make_client()
                self._client_pid = os.getpid()
            return self._client

    def _make_client(self) -> S3Client:
        config = Config(
            # A custom endpoint (MinIO, Ceph, moto) rarely has wildcard DNS for
            # virtual-hosted buckets; AWS itself takes either style.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
            retries={"max_attempts": 5, "mode": "standard"},
            max_pool_connections=32,  # the API serves downloads from its thread pool
        )
        with _SESSION_LOCK:  # a boto3 session is not thread-safe; its clients are
            return _session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config
            )

    def key(self, sha: str) -> str:
        """The object key of blob ``sha``."""
        _check_key(sha)
        return f"{self.prefix}sha256/{sha[:2]}/{sha[2:4]}/{sha}"

    # ----------------------------------------------------------------------------------------
    # Writing
    # ----------------------------------------------------------------------------------------

    def writer(self, max_bytes: int | None = None) -> S3BlobWriter:
        return S3BlobWriter(self, max_bytes)

    def _has(self, ref: BlobRef) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(ref.sha256))
        except ClientError as e:
            if _is_not_found(e):
                return False
            raise
        return head["ContentLength"] == ref.size

    def _upload(self, path: str, ref: BlobRef) -> None:
        key = self.key(ref.sha256)
        if ref.size <= self.part_size:
            with open(path, "rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentLength=ref.size,
                    ContentType="application/octet-stream",
                )
            return
        upload_id = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType="application/octet-stream"
        )["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            with open(path, "rb") as body:
                number = 0
                while data := body.read(self.part_size):  # one part in memory at a time
                    number += 1
                    answer = self.client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                    )
                    part: dict[str, Any] = {"PartNumber": number, "ETag": answer["ETag"]}
                    # Checksums boto3 added to the part (its default integrity protection)
                    # must be named again on completion.
                    part.update({k: v for k, v in answer.items() if k.startswith("Checksum")})
                    parts.append(cast("CompletedPartTypeDef", part))
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            with contextlib.suppress(Exception):  # cleanup_temp aborts it if this fails too
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    # ----------------------------------------------------------------------------------------
    # Reading
    # ----------------------------------------------------------------------------------------

    def exists(self, sha: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha))
        except ClientError as e:
            if _is_not_found(e):
                return False
            raise
        return True

    def size(self, sha: str) -> int:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha))
        except ClientError as e:
            if _is_not_found(e):
                raise BlobNotFound(sha) from None
            raise
        return int(head["ContentLength"])

    def open(self, sha: str) -> BinaryIO:
        """The object's body, streamed from S3 (read-only, not seekable); the caller closes
        it."""
        return self._get(sha, None)

    def _get(self, sha: str, byte_range: str | None) -> BinaryIO:
        key = self.key(sha)
        try:
            if byte_range is None:
                answer = self.client.get_object(Bucket=self.bucket, Key=key)
            else:
                answer = self.client.get_object(Bucket=self.bucket, Key=key, Range=byte_range)
        except ClientError as e:
            if _is_not_found(e):
                raise BlobNotFound(sha) from None
            raise
        # botocore's StreamingBody is an io.IOBase with read/close/context manager.
        return cast(BinaryIO, answer["Body"])

    def _open_range(self, sha: str, start: int, stop: int | None) -> IO[bytes]:
        if start == 0 and stop is None:
            return self._get(sha, None)
        if stop is not None and stop <= start:
            self.size(sha)  # an empty range of a missing blob is still missing
            return io.BytesIO()
        last = "" if stop is None else str(stop - 1)
        try:
            return self._get(sha, f"bytes={start}-{last}")
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) == "InvalidRange":
                return io.BytesIO()  # start at or past the end: an empty slice, like the others
            raise

    @contextmanager
    def mapped(self, sha: str) -> Iterator[memoryview]:
        """The object spooled to a local file and mapped: a snapshot of hundreds of MiB costs
        disk for the block's duration, not private memory. The file is removed after."""
        path = self.spool_dir / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            with self.open(sha) as body, open(path, "xb") as out:
                shutil.copyfileobj(body, out, DEFAULT_CHUNK_SIZE)
            with map_file(path.open("rb")) as view:
                yield view
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def delete(self, sha: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha))

    # ----------------------------------------------------------------------------------------
    # Garbage collection (versioned buckets)
    # ----------------------------------------------------------------------------------------

    def _renew(self, sha: str, size: int | None = None) -> bool:
        """Copy the object onto itself with fresh metadata: a new version (or, without
        versioning, the same key) last modified now. False if it is missing or larger than
        one CopyObject can copy (5 GiB)."""
        if size is not None and size > MAX_COPY_SIZE:
            return False
        key = self.key(sha)
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=key,
                CopySource={"Bucket": self.bucket, "Key": key},
                MetadataDirective="REPLACE",  # S3 refuses a copy onto itself that changes nothing
                Metadata={"stored-at": dt.datetime.now(dt.UTC).isoformat()},
                ContentType="application/octet-stream",
            )
        except ClientError as e:
            if _is_not_found(e) or str(e.response.get("Error", {}).get("Code")) == "InvalidRequest":
                return False
            raise
        return True

    def renew(self, sha: str) -> None:
        try:
            size = self.size(sha)
        except BlobNotFound:
            return
        if not self._renew(sha, size):
            log.warning("blob %s not renewed (missing or over 5 GiB)", sha)

    def can_collect(self) -> bool:
        """With versioning on, a collector removes only the version it listed, never the
        newer one a concurrent writer's renewal made; without it, there is no safe way."""
        if self._versioned is None:
            status = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
            self._versioned = status == "Enabled"
        return self._versioned

    def list_blobs(self) -> Iterator[StoredBlob]:
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"
        )
        for page in pages:
            for v in page.get("Versions", []):
                sha = v["Key"].rsplit("/", 1)[-1]
                if v.get("IsLatest") and v["Key"] == self._key_or_none(sha):
                    yield StoredBlob(
                        sha, int(v["Size"]), v["LastModified"].timestamp(), v["VersionId"]
                    )

    def _key_or_none(self, name: str) -> str | None:
        try:
            return self.key(name)
        except InvalidBlobKey:
            return None

    def collect(
        self, sha: str, still_needed: Callable[[float], bool], *, version: str | None = None
    ) -> bool:
        if version is None:
            raise ValueError("an S3 store collects a listed version (StoredBlob.version)")
        key = self.key(sha)
        pages = self.client.get_paginator("list_object_versions").paginate(
            Bucket=self.bucket, Prefix=key
        )
        # S3 lists a key's versions newest first (by its own order: LastModified has only
        # second precision). The listed version and every older one (the same bytes) go; a
        # newer one, a writer's since the listing, stays.
        entries = [e for page in pages for e in page.get("Versions", []) if e["Key"] == key]
        ids = [e["VersionId"] for e in entries]
        if version not in ids:
            return False
        listed = next(e for e in entries if e["VersionId"] == version)
        if still_needed(listed["LastModified"].timestamp()):
            return False
        doomed = ids[ids.index(version) :]
        for i in range(0, len(doomed), 1000):
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={
                    "Objects": [{"Key": key, "VersionId": v} for v in doomed[i : i + 1000]],
                    "Quiet": True,
                },
            )
        return not self.exists(sha)

    # ----------------------------------------------------------------------------------------
    # Temp data
    # ----------------------------------------------------------------------------------------

    def cleanup_temp(self, older_than_seconds: float = 3600) -> int:
        """Remove spool files and abort multipart uploads (under this prefix) last written
        more than ``older_than_seconds`` ago.

        An upload's age is that of its newest part (its start if it has none), so a live
        multipart upload that keeps sending is never aborted. Timestamps of uploads come from
        the S3 server: keep the threshold well above any clock skew (the default hour is).
        """
        removed = sweep_temp_dir(self.spool_dir, older_than_seconds)
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_seconds)
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                key, upload_id = upload["Key"], upload["UploadId"]
                if upload["Initiated"] > cutoff or self._last_part(key, upload_id) > cutoff:
                    continue
                try:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=key, UploadId=upload_id
                    )
                except ClientError as e:
                    if str(e.response.get("Error", {}).get("Code")) == "NoSuchUpload":
                        continue  # completed or aborted meanwhile
                    raise
                removed += 1
        return removed

    def _last_part(self, key: str, upload_id: str) -> dt.datetime:
        newest = dt.datetime.min.replace(tzinfo=dt.UTC)
        try:
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
            for page in pages:
                for part in page.get("Parts", []):
                    newest = max(newest, part["LastModified"])
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) != "NoSuchUpload":
                raise
        return newest

    def temp_items(self) -> list[str]:
        """Spool files and unfinished multipart uploads under the prefix (for tests and
        operators: a non-empty list with no upload running means a crash left debris)."""
        items = sorted(p.name for p in self.spool_dir.iterdir())
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}sha256/"
        )
        for page in pages:
            items += [f"multipart:{u['Key']}:{u['UploadId']}" for u in page.get("Uploads", [])]
        return items
