"""The one place localmix goes past huggingface_hub's download API: a resumable fetch of one blob.

Why: hf_hub_download (huggingface_hub 2.x) writes into a temporary file unique to the process and
deletes it when the transfer fails, so a killed pull, or a connection dropped for good, starts
from zero the next time; its own retries within one call show only as log lines, and it keeps up
to 10 MiB in memory before writing, so a drop loses them. localmix promises that a pull continues
from the bytes on disk and says when a connection dropped.

What: one file is downloaded into the name the cache documents for an interrupted download,
`<cache>/models--ORG--NAME/blobs/<etag>.incomplete` (scan_cache_dir lists such files as
`incomplete_files`), continued with HTTP Range requests after a drop or a kill, and renamed to
`blobs/<etag>` once complete and accepted (sha256). The caller then calls hf_hub_download, which
finds the blob and only links the snapshot entry and records the ref: snapshots, refs and
huggingface_hub's locks stay its own (its downloads write files of their own, never this one;
localmix processes take turns through store.lock). The bytes come through huggingface_hub's
shared HTTP client (get_session), so its client settings hold, and its errors are httpx2's.

Relied on, and pinned by tests/test_hub_contract.py: the blob's place and name (the etag
get_hf_file_metadata reports: the sha256 of an LFS file, the git blob id of others), and
hf_hub_download linking a blob already in place without transferring it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# Attempts in a row that bring no new byte before the fetch gives up (a drop after new bytes
# resumes at once, however often), and the wait before each such attempt.
_STALLED_TRIES = 5
_STALL_WAIT_S = 1.0
# Answers worth asking again (as huggingface_hub's own backoff does): busy or failing for a while.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

OnBytes = Callable[[int], None]  # bytes on disk so far
OnRetry = Callable[[int, str], None]  # bytes on disk, one-line reason


def repo_folder(cache: Path, repo: str) -> Path:
    """A model repo's folder in the HF cache (the documented `models--ORG--NAME`)."""
    return cache / ("models--" + repo.replace("/", "--"))


def blob_path(cache: Path, repo: str, etag: str) -> Path:
    return repo_folder(cache, repo) / "blobs" / etag


def partial_path(blob: Path) -> Path:
    return blob.with_name(blob.name + ".incomplete")


def missing_bytes(blob: Path, size: int) -> int:
    """Bytes still to fetch for a blob of `size` bytes: none when it is in place, fewer when part
    of it is on disk from an interrupted pull."""
    if blob.exists():
        return 0
    partial = partial_path(blob)
    have = partial.stat().st_size if partial.exists() else 0
    return max(size - have, 0)


def fetch(
    blob: Path,
    url: str,
    *,
    headers: dict[str, str],
    size: int | None,
    on_bytes: OnBytes,
    on_retry: OnRetry,
    accept: Callable[[Path], None],
) -> bool:
    """Download `url` into `blob`, continuing what an earlier try left on disk. `accept` checks
    the complete file before it is moved in place (it raises, and deletes it, when it is bad).
    False when the blob was already there (nothing fetched)."""
    from localmix.models import store

    if blob.exists():
        return False
    # Two localmix processes appending to one partial file would interleave their bytes: one
    # fetches a repo's blobs at a time (huggingface_hub's own downloads use files of their own).
    with store.lock("hf-" + blob.parent.parent.name):
        if blob.exists():
            return False  # another process finished it while this one waited
        blob.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(blob)
        with open(partial, "ab") as handle:
            _transfer(handle, url, headers, size, on_bytes, on_retry)
        accept(partial)
        os.replace(partial, blob)
    return True


# --- the transfer ------------------------------------------------------------------------------


def _on_disk(handle: BinaryIO) -> int:
    handle.flush()
    return os.fstat(handle.fileno()).st_size


def _transfer(
    handle: BinaryIO,
    url: str,
    headers: dict[str, str],
    size: int | None,
    on_bytes: OnBytes,
    on_retry: OnRetry,
) -> None:
    """GET until the file is complete: after a drop, from the bytes on disk (Range)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    stalled = 0
    while True:
        have = _on_disk(handle)
        if have == size:
            return
        failure: Exception | None = None
        try:
            _get(handle, url, headers, have, on_bytes)
        except (httpx2.TransportError, HfHubHTTPError) as exc:
            status = (
                getattr(exc.response, "status_code", None)
                if isinstance(exc, HfHubHTTPError)
                else None
            )
            if status is not None and status not in _TRANSIENT_STATUS:
                raise
            failure = exc
        now = _on_disk(handle)
        if size is not None and now > size:
            handle.truncate(0)  # not this file: the next pull starts it anew
            raise _broken(f"sent {now} bytes of a file the Hub says has {size}")
        if failure is None and (size is None or now == size):
            return
        stalled = 0 if now > have else stalled + 1
        if stalled >= _STALLED_TRIES:
            if failure is not None:
                raise failure
            raise _broken(f"keeps ending the file early, at {now} of {size} bytes")
        on_retry(now, _short_reason(failure) if failure else "the connection ended early")
        if stalled:
            time.sleep(_STALL_WAIT_S)


def _broken(what: str) -> Exception:
    from localmix.errors import NetworkError

    return NetworkError(
        f"the download server {what}",
        hint="run the pull again; if it fails again, the mirror (HF_ENDPOINT) or a proxy is at fault",
    )


def _get(handle: BinaryIO, url: str, headers: dict[str, str], have: int, on_bytes: OnBytes) -> None:
    """One GET of the file from byte `have`, every piece written as it arrives (a dropped
    connection loses nothing already received)."""
    from huggingface_hub import constants, get_session, hf_raise_for_status

    wanted = {**headers, "Accept-Encoding": "identity"}  # byte offsets are the file's
    if have:
        wanted["Range"] = f"bytes={have}-"
    with get_session().stream(
        "GET", url, headers=wanted, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True
    ) as response:
        hf_raise_for_status(response)
        if have and response.status_code != 206:
            handle.truncate(0)  # the whole file came, not the rest: start again with it
            have = 0
        elif have and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise _broken("answered a resumed download with other bytes than asked for")
        on_bytes(have)
        for piece in response.iter_bytes():
            handle.write(piece)
            have += len(piece)
            on_bytes(have)


def _short_reason(exc: BaseException) -> str:
    """One clause of an error: 'peer closed connection without sending complete message body
    (received 2796266 bytes, expected 8388800)' -> its words before the parenthesis."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line.split(" (", 1)[0].rstrip(".: ") or type(exc).__name__
