"""The agent's HTTP client: one method per agent endpoint, retries for transient failures.

Network errors, timeouts, 5xx, 408 and 429 answers are retried with jittered exponential
backoff, never sooner than a ``Retry-After`` asks (a restarting or busy server is waited
for); other 4xx answers raise :class:`ServerError` at once with the server's message,
because repeating a refused request cannot succeed. A blob download cut
off midway resumes where it stopped (``Range`` from the bytes already received, ``If-Range``
on the blob's ETag) instead of starting over: a snapshot is hundreds of MiB, and a site's
network may drop a connection more often than it can carry one that long.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from fedsrd_core.finite import finite_or_none, json_finite

log = logging.getLogger(__name__)


class ServerError(Exception):
    """The server refused a request (4xx): ``status``, ``code`` and its ``detail``."""

    def __init__(self, status: int, code: str, detail: Any) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class RetryBudgetExceededError(Exception):
    """Transient failures lasted longer than the client's ``retry_for`` seconds."""


class _RetryableAnswerError(Exception):
    """An answer to a download that carries none of the blob: a 5xx, or an answer to a
    request for a range that does not continue the transfer."""


#: 4xx answers that say "not now" rather than "never": the body arrived too slowly (408),
#: or the server takes no more uploads from this client at the moment (429).
_RETRYABLE_4XX = frozenset({408, 429})


def _raise_refusal(r: httpx.Response) -> None:
    """Raise the server's refusal (a 4xx answer, already read) as :class:`ServerError`."""
    if not 400 <= r.status_code < 500 or r.status_code in _RETRYABLE_4XX:
        return
    try:
        body = r.json()
    except ValueError:
        raise ServerError(r.status_code, "http_error", r.text[:500]) from None
    raise ServerError(r.status_code, body.get("error", ""), body.get("detail"))


def _resumes_at(r: httpx.Response, offset: int) -> bool:
    """Whether answer ``r`` carries the blob from byte ``offset`` on: a 206 whose
    ``Content-Range`` starts there (anything else is the whole blob, or unusable)."""
    if offset == 0 or r.status_code != 206:
        return False
    unit, _, spec = r.headers.get("content-range", "").partition(" ")
    first = spec.partition("-")[0]
    return unit == "bytes" and first.isdigit() and int(first) == offset


def _retry_after(r: httpx.Response) -> float:
    """The answer's ``Retry-After`` in seconds (0 if absent or a date), at most a minute."""
    value = r.headers.get("retry-after", "")
    return min(float(value), 60.0) if value.isdigit() else 0.0


def _blob_size(r: httpx.Response) -> int | None:
    """The whole blob's size from a 200's ``Content-Length`` or a 206's ``Content-Range``."""
    value = (
        r.headers.get("content-length")
        if r.status_code == 200
        else (r.headers.get("content-range", "").rpartition("/")[2])
    )
    return int(value) if value and value.isdigit() else None


def _size_mismatch(sha256: str, size: int, what: str) -> ServerError:
    return ServerError(
        0, "size_mismatch", f"blob {sha256}: the sync plan announced {size} bytes, {what}"
    )


class AgentClient:
    """Authenticated calls of one client of one run.

    Args:
        http: an ``httpx.Client`` whose ``base_url`` is the server (tests pass FastAPI's
            TestClient, which is one).
        token: the client token; run_id: its run.
        retry_for: give up on transient failures after this many seconds (None: never).
        sleep: injectable for tests.
    """

    def __init__(
        self,
        http: httpx.Client,
        token: str,
        run_id: int,
        *,
        retry_for: float | None = None,
        base_delay: float = 0.5,
        max_delay: float = 15.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.http = http
        self.run_id = run_id
        self.headers = {"Authorization": f"Bearer {token}"}
        self.retry_for = retry_for
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._rng = random.Random()

    @property
    def prefix(self) -> str:
        return f"/api/v1/agent/runs/{self.run_id}"

    def whoami(self) -> dict[str, Any]:
        """``{client_id, run_id, name}`` of this token (sets ``run_id``)."""
        result: dict[str, Any] = self._request("GET", "/api/v1/agent/me").json()
        self.run_id = int(result["run_id"])
        return result

    def _url(self, path: str) -> str:
        return path if path.startswith("/api/") else self.prefix + path

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        start = time.monotonic()
        attempt = 0
        while True:
            at_least = 0.0
            try:
                r = self.http.request(method, self._url(path), headers=headers, **kwargs)
            except httpx.TransportError as e:
                failure: str = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    return r
                _raise_refusal(r)
                failure = f"HTTP {r.status_code}"
                at_least = _retry_after(r)
            self._back_off(start, attempt, f"{method} {path}", failure, at_least)
            attempt += 1

    def _back_off(
        self, start: float, attempt: int, what: str, failure: str, at_least: float = 0.0
    ) -> None:
        """Sleep before retry ``attempt + 1`` (``at_least`` seconds: the server's
        ``Retry-After``), or give up once ``retry_for`` has passed."""
        if self.retry_for is not None and time.monotonic() - start >= self.retry_for:
            raise RetryBudgetExceededError(f"{what}: still failing ({failure})")
        # Full jitter: agents that lost the server together do not return together.
        cap = min(self.max_delay, self.base_delay * 2**attempt)
        self._sleep(max(at_least, self._rng.uniform(cap / 2, cap)))

    def run_info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", "").json()
        return result

    def poll(self, have_round: int | None, wait: float = 0.0) -> dict[str, Any]:
        params: dict[str, Any] = {"wait": wait}
        if have_round is not None:
            params["have_round"] = have_round
        timeout = 30.0 + wait  # a number: httpx and the test client (httpx2) both take it
        result: dict[str, Any] = self._request(
            "GET", "/poll", params=params, timeout=timeout
        ).json()
        return result

    def sync(self, have_round: int | None) -> dict[str, Any]:
        params = {} if have_round is None else {"have_round": have_round}
        result: dict[str, Any] = self._request("GET", "/sync", params=params).json()
        return result

    def download(self, sha256: str, size: int | None = None) -> bytearray:
        """The blob ``sha256``, checked against its name (in the buffer it was received into:
        a snapshot is hundreds of MiB, and a copy would double the peak).

        ``size``: the blob's size as the sync plan announced it. An answer that announces a
        different size, or sends a byte more, is refused at once (:class:`ServerError`,
        ``size_mismatch``) and what arrived is dropped: a server (or something in between)
        must not make the agent hold more memory than the plan said.

        A transfer that fails midway (a dropped connection, a timeout, a 5xx) is retried
        like any request, but asks only for the rest: ``Range: bytes=<received>-`` with
        ``If-Range`` set to the ETag of the first answer, so a server that no longer has
        those bytes as they were (or ignores ranges) sends the whole blob again, and that
        is what is kept. A blob that arrives whole but does not hash to its name is fetched
        once more from the start before :class:`ServerError` (``corrupt_download``) is
        raised.
        """
        path = f"/blobs/{sha256}"
        received = bytearray()
        etag: str | None = None
        whole_answers = 0
        total: int | None = None  # the blob's size, from the last answer's headers
        start = time.monotonic()
        attempt = 0
        while True:
            headers = dict(self.headers)
            if received and etag is not None:
                headers["Range"] = f"bytes={len(received)}-"
                headers["If-Range"] = etag
            try:
                with self.http.stream("GET", self._url(path), headers=headers) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_refusal(r)
                        raise _RetryableAnswerError(f"HTTP {r.status_code}")
                    if r.status_code not in (200, 206):  # say, a redirect: not followed
                        raise ServerError(r.status_code, "http_error", "not a blob download")
                    if r.status_code == 200:
                        received.clear()  # the whole blob, from the start
                        whole_answers += 1
                    elif not _resumes_at(r, len(received)):
                        # A range that is not the one asked for: start over.
                        received.clear()
                        etag = None
                        raise _RetryableAnswerError(f"HTTP {r.status_code} to a range request")
                    etag = r.headers.get("etag") or etag
                    total = _blob_size(r)
                    if size is not None and total is not None and total != size:
                        raise _size_mismatch(sha256, size, f"the server announces {total}")
                    for chunk in r.iter_bytes():
                        if size is not None and len(received) + len(chunk) > size:
                            received.clear()
                            raise _size_mismatch(sha256, size, "more arrived")
                        received += chunk
            except (httpx.TransportError, _RetryableAnswerError) as e:
                failure = f"{type(e).__name__}: {e} after {len(received)} bytes"
                # Cut off just as it ended: nothing is missing (hashed only then).
                if len(received) == total and hashlib.sha256(received).hexdigest() == sha256:
                    return received
            else:
                got = hashlib.sha256(received).hexdigest()
                if got == sha256:
                    return received
                if whole_answers >= 2:
                    raise ServerError(0, "corrupt_download", f"blob {sha256} arrived as {got}")
                failure = f"blob arrived as {got}"
                received.clear()
                etag = None
            self._back_off(start, attempt, f"GET {path}", failure)
            attempt += 1

    def upload(
        self,
        round_number: int,
        base_round: int,
        blob: bytes,
        *,
        num_samples: int,
        train_loss: float | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"base_round": base_round, "num_samples": num_samples}
        # A loss that is not finite is missing (the server refuses NaN: the upload would
        # be a 422, and retried after a restart, for ever).
        if finite_or_none(train_loss) is not None:
            params["train_loss"] = train_loss
        result: dict[str, Any] = self._request(
            "PUT",
            f"/rounds/{round_number}/update",
            params=params,
            content=blob,
            headers={
                "X-Content-SHA256": hashlib.sha256(blob).hexdigest(),
                "Content-Type": "application/octet-stream",
            },
        ).json()
        return result

    def heartbeat(self, round_number: int, step: int, **extra: Any) -> bool:
        """Report progress (retried like any request while the server is away). A heartbeat
        only says the client is alive, so it never ends the agent: a number that is not
        finite is left out (httpx cannot even encode one), and a refusal is logged and
        ignored (a revoked client learns it from its next poll or upload). Returns whether
        the server took it."""
        try:
            self._request("POST", "/heartbeat", json=_progress_body(round_number, step, extra))
        except ServerError as e:
            log.warning("heartbeat for round %d refused: %s", round_number, e)
            return False
        return True

    def report_progress(self, round_number: int, step: int, **extra: Any) -> bool:
        """A heartbeat sent once, without retries and with a short timeout: progress during
        local training is best effort and must never hold the training up. Returns whether
        the server took it."""
        try:
            r = self.http.request(
                "POST",
                self.prefix + "/heartbeat",
                headers=self.headers,
                json=_progress_body(round_number, step, extra),
                timeout=5.0,
            )
        except httpx.TransportError:
            return False
        return r.status_code < 400


def _progress_body(round_number: int, step: int, extra: dict[str, Any]) -> dict[str, Any]:
    """A heartbeat's JSON body: ``extra`` without its missing or non-finite values."""
    kept = {k: v for k, v in json_finite(extra).items() if v is not None}
    return {"round": round_number, "step": step, **kept}
