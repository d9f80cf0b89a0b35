"""The Hugging Face Hub: listing a repo, choosing files for a quant, downloading into the shared HF
cache with resume, sha256 verification, offline lookups, and purging cache entries.

Every call to huggingface_hub lives here, and so does the translation of its typed errors into
localmix's. Files land in the shared cache (HF_HOME) where every other HF tool finds them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix import settings
from localmix.errors import (
    ChecksumMismatch,
    GatedRepo,
    LocalmixError,
    ModelNotFound,
    NetworkError,
    OfflineMiss,
    UsageError,
)
from localmix.progress import OnProgress, Progress

if TYPE_CHECKING:
    from localmix.models.store import Manifest

# huggingface_hub's http_get gathers the body into chunks of this many bytes before writing;
# None writes every piece as it arrives, so a dropped connection loses nothing already received
# (a gathered chunk is lost with the connection, and fetched again).
_CHUNK_BYTES = None
# A dropped connection is resumed from the bytes on disk; give up after this many drops in a row
# that brought no new byte (http_get itself already retried connect errors and timeouts).
_STALLED_DROPS = 3
# model_info has no retry of its own: attempts and the first wait (doubling) for a flaky network.
_INFO_ATTEMPTS = 4
_INFO_FIRST_WAIT_S = 0.5
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit; sha256 is set for LFS files (the ones verified)."""

    name: str
    size: int  # bytes
    sha256: str | None = None
    blob_id: str | None = None  # the git blob id of a non-LFS file


@dataclass(frozen=True)
class Listing:
    """A repo's files at one commit, from the Hub or (offline) from the local cache."""

    repo: str
    revision: str  # as asked ("main", a tag, a commit)
    commit: str
    files: tuple[RemoteFile, ...]
    gated: bool = False
    cached: bool = False  # listed from the local cache, not the Hub

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.files]

    def file(self, name: str) -> RemoteFile:
        return next(f for f in self.files if f.name == name)


@dataclass(frozen=True)
class LocalFile:
    """A file in the HF cache: `path` is its snapshot entry (a symlink to the blob)."""

    name: str
    path: Path
    size: int
    sha256: str | None
    fetched: bool  # this call downloaded (part of) it


@dataclass(frozen=True)
class Download:
    repo: str
    commit: str
    snapshot: Path  # the snapshot folder: the repo's tree at `commit`
    files: tuple[LocalFile, ...]


def endpoint() -> str:
    return settings.hf_endpoint()


def cache_dir() -> Path:
    return settings.hf_cache_dir().resolve()


def shown_endpoint() -> str:
    """The endpoint as messages may print it: without a user or token in it."""
    return redact(endpoint())


def redact(text: str) -> str:
    """text with the user:password@ of every URL in it removed (HF_ENDPOINT may carry a token)."""
    return _USERINFO.sub(r"\1", text)


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")


def model_page(repo: str) -> str:
    """The web page of a repo, where a gated model's license is accepted."""
    return f"{shown_endpoint()}/{repo}"


# --- names from users and from the Hub become paths in the cache: check them first ---------------

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9._/-]{1,255}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _safe_parts(text: str) -> bool:
    return all(part not in ("", ".", "..") for part in text.split("/"))


def check_repo(repo: str) -> str:
    """repo, if it is an ORG/NAME the Hub could have; UsageError otherwise."""
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise UsageError(
            f"{repo[:100]!r} is not a Hugging Face repository id",
            hint="write it as ORG/NAME, e.g. hf.co/mistralai/Mistral-7B-Instruct-v0.3",
        )
    return repo


def check_revision(revision: str) -> str:
    """revision, if it is a branch, tag or commit name that cannot escape the cache."""
    if not _REVISION.fullmatch(revision) or not _safe_parts(revision):
        raise UsageError(
            f"{revision[:100]!r} is not a revision",
            hint="give a branch, tag or commit: letters, digits, . _ - and / between names",
        )
    return revision


def _safe_file_name(name: str) -> bool:
    return bool(name) and "\\" not in name and "\0" not in name and _safe_parts(name)


# --- errors -------------------------------------------------------------------------------------


def _network_error(exc: BaseException) -> NetworkError:
    import httpx2

    reason = redact(str(exc).splitlines()[0]) if str(exc) else type(exc).__name__
    resume = "run the pull again: it continues where it stopped"
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return NetworkError(
            f"the Hub at {shown_endpoint()} is too slow: no answer in time after retries ({reason})",
            hint=f"{resume}; HF_HUB_DOWNLOAD_TIMEOUT and HF_HUB_ETAG_TIMEOUT set the limits (s)",
        )
    return NetworkError(
        f"cannot reach the Hub at {shown_endpoint()}: {reason}",
        hint=f"check your connection (or HF_ENDPOINT), then {resume}; "
        "--offline uses only cached files",
    )


def _translate(exc: Exception, repo: str, revision: str | None) -> LocalmixError | None:
    """huggingface_hub's typed errors (and httpx's) -> ours; None for anything unexpected."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(exc, hf.GatedRepoError):
        return GatedRepo(
            f"{repo} is gated: its license must be accepted before download",
            hint=f"accept it at {model_page(repo)}, then log in with `hf auth login` "
            "or set HF_TOKEN to a token of that account",
        )
    if isinstance(exc, hf.RevisionNotFoundError):
        return ModelNotFound(
            f"{repo} has no revision {revision!r}", hint="give a branch, tag or commit that exists"
        )
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ModelNotFound(
            f"no repository {repo!r} on {shown_endpoint()}",
            hint="check the name (ORG/REPO); a private repo needs `hf auth login` or HF_TOKEN",
        )
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return ModelNotFound(f"{repo}: a listed file is missing on the Hub: {exc}".splitlines()[0])
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return OfflineMiss(
            f"{repo}: HF_HUB_OFFLINE is set and the files are not cached",
            hint="unset HF_HUB_OFFLINE to download",
        )
    if isinstance(exc, hf.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        if status == 401:
            return NetworkError(
                f"the Hub rejected the token for {repo}",
                hint="log in again with `hf auth login`, or fix HF_TOKEN",
            )
        return _network_error(exc)
    if isinstance(exc, hf.LocalEntryNotFoundError | httpx2.HTTPError | TimeoutError):
        return _network_error(exc)
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return _network_error(exc)  # the connection ended early; the partial file is kept
    return None


@contextlib.contextmanager
def _hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    try:
        yield
    except LocalmixError:
        raise
    except Exception as exc:
        ours = _translate(exc, repo, revision)
        if ours is None:
            raise
        raise ours from exc


# --- listing ------------------------------------------------------------------------------------


def _model_info(repo: str, revision: str | None) -> Any:
    """HfApi.model_info with files metadata, retried with backoff on network errors and 5xx."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint())
    wait = _INFO_FIRST_WAIT_S
    for attempt in range(1, _INFO_ATTEMPTS + 1):
        try:
            return api.model_info(
                repo, revision=revision, files_metadata=True, timeout=constants.HF_HUB_ETAG_TIMEOUT
            )
        except (httpx2.TransportError, HfHubHTTPError) as exc:
            transient = not isinstance(exc, HfHubHTTPError) or (
                exc.response is not None and exc.response.status_code >= 500
            )
            if not transient or attempt == _INFO_ATTEMPTS:
                raise
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def repo_files(repo: str, revision: str | None = None, *, offline: bool = False) -> Listing:
    """The files of a repo at a revision: from the Hub, or offline from the local cache only."""
    check_repo(repo)
    if revision is not None:
        check_revision(revision)
    if offline or settings.offline():
        return _cached_listing(repo, revision or "main")
    with _hub_errors(repo, revision):
        info = _model_info(repo, revision)
    if not _COMMIT.fullmatch(str(info.sha or "")):
        raise NetworkError(
            f"{shown_endpoint()} answered for {repo} with a commit id that is not one: "
            f"{str(info.sha)[:60]!r}",
            hint="check HF_ENDPOINT: it does not look like the Hugging Face Hub",
        )
    # a name with .. or a leading / would become a path outside the snapshot: never offered
    files = tuple(
        RemoteFile(
            name=s.rfilename,
            size=int(s.lfs.size if s.lfs else s.size or 0),
            sha256=s.lfs.sha256 if s.lfs else None,
            blob_id=s.blob_id,
        )
        for s in info.siblings or ()
        if _safe_file_name(s.rfilename)
    )
    return Listing(repo, revision or "main", info.sha, files, gated=bool(info.gated))


def _storage(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model")


def _cached_commit(repo: str, revision: str) -> str | None:
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = _storage(repo) / "refs" / revision
    with contextlib.suppress(OSError):
        return ref.read_text().strip()
    return None


def _cached_listing(repo: str, revision: str) -> Listing:
    """What the local cache holds of a repo at a revision; no network."""
    commit = _cached_commit(repo, revision)
    snapshot = _storage(repo) / "snapshots" / (commit or "-")
    if commit is None or not snapshot.is_dir():
        raise OfflineMiss(
            f"offline, and nothing of {repo}@{revision} is in the Hugging Face cache ({cache_dir()})",
            hint="run the pull once online (without --offline / HF_HUB_OFFLINE)",
        )
    files = []
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = path.resolve()
        name = path.relative_to(snapshot).as_posix()
        lfs_hash = blob.name if _SHA256_RE.match(blob.name) else None
        files.append(RemoteFile(name, blob.stat().st_size, sha256=lfs_hash))
    return Listing(repo, revision, commit, tuple(files), cached=True)


# --- download -----------------------------------------------------------------------------------


def _blob_for(listing: Listing, remote: RemoteFile) -> Path | None:
    """Where the cache keeps this file's blob (the Hub's etag names it), if known without HEAD."""
    etag = remote.sha256 or remote.blob_id
    return _storage(listing.repo) / "blobs" / etag if etag else None


def bytes_to_fetch(listing: Listing, names: Sequence[str]) -> int:
    """Bytes still to download for these files: cached blobs and partial downloads count off."""
    if listing.cached:
        return 0
    needed = 0
    for name in names:
        remote = listing.file(name)
        blob = _blob_for(listing, remote)
        if blob is None:
            needed += remote.size
        elif not blob.exists():
            partial = blob.with_name(blob.name + ".incomplete")
            have = partial.stat().st_size if partial.exists() else 0
            needed += max(remote.size - have, 0)
    return needed


class _Meter:
    """Stands in for tqdm inside huggingface_hub's http_get, turning byte counts into events."""

    def __init__(
        self, *, emit: OnProgress, file: str, total: int | None = None, initial: int = 0, **_: Any
    ) -> None:
        self.emit, self.file, self.total, self.n = emit, file, total, initial
        self.emit(Progress("download", subject=file, done=initial, total=total, unit="bytes"))

    def update(self, n: int = 1) -> None:
        self.n += n
        self.emit(
            Progress("download", subject=self.file, done=self.n, total=self.total, unit="bytes")
        )

    def close(self) -> None:
        pass

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def _small_chunks() -> Iterator[None]:
    from huggingface_hub import constants

    saved = constants.DOWNLOAD_CHUNK_SIZE
    constants.DOWNLOAD_CHUNK_SIZE = _CHUNK_BYTES  # type: ignore[assignment]
    try:
        yield
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = saved


def _sha256(path: Path, name: str, progress: OnProgress | None) -> str:
    from localmix.models.store import sha256_file

    total = path.stat().st_size
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(Progress("verify", subject=name, done=done, total=total, unit="bytes"))

    if progress:
        progress(Progress("verify", subject=name, total=total, unit="bytes"))
    return sha256_file(path, progress=step)


def _mismatch(name: str, expected: str, got: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{name}: sha256 {got[:12]}… does not match the Hub's {expected[:12]}…; "
        "the damaged file was deleted",
        hint="run the pull again to fetch it anew; if it fails again, the mirror "
        "(HF_ENDPOINT) or the network corrupts data",
    )


def _remove_cached(repo: str, blob: Path) -> None:
    """Delete a blob and every snapshot entry that links to it (huggingface_hub's cache API)."""
    from huggingface_hub import scan_cache_dir

    with contextlib.suppress(Exception):
        info = scan_cache_dir(cache_dir())
        entries = [
            f
            for r in info.repos
            if r.repo_id == repo
            for rev in r.revisions
            for f in rev.files
            if f.blob_path == blob
        ]
        if entries:
            info.delete_files(*entries).execute()
    blob.unlink(missing_ok=True)


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlparse

    parts = urlparse(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _fetch_blob(
    listing: Listing, remote: RemoteFile, blob: Path, meta: Any, progress: OnProgress | None
) -> None:
    """Download one file into `<blob>.incomplete`, resuming what is there, verify, move in place.

    huggingface_hub >= 1.x downloads to a per-process temporary file and deletes it on failure,
    so an interrupted pull would start from zero; we keep the cache's stable `<etag>.incomplete`
    and let its http_get continue from the bytes already on disk (Range request).
    """
    from huggingface_hub.utils import build_hf_headers

    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if meta.size is not None and have > meta.size:
        partial.unlink()  # not ours to resume: larger than the file
        have = 0
    headers = build_hf_headers()
    url = _url(listing, remote.name)
    if _origin(meta.location) != _origin(url):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the Hub
    emit = progress or (lambda _event: None)
    meter = functools.partial(_Meter, emit=emit, file=remote.name)
    retried = functools.partial(_retry_event, emit, remote.name, partial, meta.size)
    with _small_chunks(), _retries_reported(retried), open(partial, "ab") as handle:
        _get_resuming(
            retried,
            partial,
            handle,
            have,
            url=meta.location,
            headers=headers,
            expected_size=meta.size,
            displayed_filename=remote.name,
            tqdm_class=meter,
        )
    if remote.sha256:
        got = _sha256(partial, remote.name, progress)
        if got != remote.sha256:
            partial.unlink(missing_ok=True)
            raise _mismatch(remote.name, remote.sha256, got)
    os.replace(partial, blob)


def _retry_event(
    emit: OnProgress, file: str, partial: Path, total: int | None, reason: str
) -> None:
    done = partial.stat().st_size if partial.exists() else 0
    emit(Progress("retry", subject=file, done=done, total=total, unit="bytes", detail=reason))


def _short_reason(text: str) -> str:
    """One clause of an httpx error: 'peer closed connection without sending complete message
    body (received 2796266 bytes, expected 8388800)' -> its words before the parenthesis."""
    line = (text.strip().splitlines() or ["connection lost"])[0]
    return line.split(" (", 1)[0].rstrip(".: ") or "connection lost"


@contextlib.contextmanager
def _retries_reported(retried: Callable[[str], None]) -> Iterator[None]:
    """huggingface_hub's http_get logs a warning with the URL and the raw error each time it
    resumes a dropped download; printed to stderr, it tears through a progress display. While
    we download, each such warning becomes a retry Progress instead (and prints nothing)."""
    import logging

    hub_logger = logging.getLogger("huggingface_hub.file_download")

    class ToEvents(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not record.getMessage().startswith("Error while downloading from"):
                return True
            detail = str(record.args[1]) if isinstance(record.args, tuple) else ""
            retried(_short_reason(detail))
            return False  # reported as an event; not printed

    catcher = ToEvents()
    hub_logger.addFilter(catcher)
    try:
        yield
    finally:
        hub_logger.removeFilter(catcher)


def _get_resuming(
    retried: Callable[[str], None], partial: Path, handle: Any, have: int, **http_get_args: Any
) -> None:
    """huggingface_hub's http_get into `handle` from byte `have`, continued from the bytes on
    disk whenever the connection drops. http_get resumes by itself after a protocol error, a
    timeout or a refused connection, but a reset connection (ReadError) would end the pull; the
    partial file always stays for the next run."""
    import httpx2
    from huggingface_hub.file_download import http_get

    stalled = 0
    while True:
        try:
            http_get(temp_file=handle, resume_size=have, **http_get_args)
            return
        except httpx2.TransportError as exc:
            handle.flush()
            now = partial.stat().st_size
            stalled = 0 if now > have else stalled + 1
            # no new byte after http_get's own retries of these: the network is down
            given_up = isinstance(exc, httpx2.ConnectError | httpx2.TimeoutException)
            if stalled >= _STALLED_DROPS or (stalled and given_up):
                raise
            retried(_short_reason(str(exc) or type(exc).__name__))
            have = now


def _url(listing: Listing, name: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(listing.repo, name, revision=listing.commit, endpoint=endpoint())


def _download_one(listing: Listing, remote: RemoteFile, progress: OnProgress | None) -> LocalFile:
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download
    from huggingface_hub.utils import WeakFileLock

    storage = _storage(listing.repo)
    pointer = storage / "snapshots" / listing.commit / remote.name
    meta = get_hf_file_metadata(
        _url(listing, remote.name),
        timeout=constants.HF_HUB_ETAG_TIMEOUT,
        endpoint=endpoint(),
        retry_on_errors=True,
    )
    if not meta.etag:
        raise NetworkError(
            f"{shown_endpoint()} sent no ETag for {remote.name}: not a Hub endpoint?"
        )
    blob = storage / "blobs" / meta.etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_dir() / ".locks" / storage.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fetched = False
    with WeakFileLock(lock):  # the lock huggingface_hub takes for the same blob
        if not blob.exists():
            _fetch_blob(listing, remote, blob, meta, progress)
            fetched = True
        elif remote.sha256:  # cached earlier, maybe by another tool: verified all the same
            got = _sha256(blob, remote.name, progress)
            if got != remote.sha256:
                _remove_cached(listing.repo, blob)
                raise _mismatch(remote.name, remote.sha256, got)
    # The blob is in place: hf_hub_download only links the snapshot entry, it transfers nothing.
    hf_hub_download(
        listing.repo,
        remote.name,
        revision=listing.commit,
        cache_dir=cache_dir(),
        endpoint=endpoint(),
    )
    return LocalFile(remote.name, pointer, remote.size, remote.sha256, fetched)


def _record_ref(listing: Listing) -> None:
    """refs/<revision> -> commit, so an offline pull of `main` finds this snapshot."""
    if listing.revision == listing.commit or listing.cached:
        return
    ref = _storage(listing.repo) / "refs" / listing.revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if not ref.exists() or ref.read_text().strip() != listing.commit:
        ref.write_text(listing.commit)


def _cached_file(listing: Listing, remote: RemoteFile, progress: OnProgress | None) -> LocalFile:
    pointer = _storage(listing.repo) / "snapshots" / listing.commit / remote.name
    if remote.sha256:
        got = _sha256(pointer, remote.name, progress)
        if got != remote.sha256:
            _remove_cached(listing.repo, pointer.resolve())
            raise _mismatch(remote.name, remote.sha256, got)
    return LocalFile(remote.name, pointer, remote.size, remote.sha256, fetched=False)


def download(
    listing: Listing, names: Sequence[str], *, progress: OnProgress | None = None
) -> Download:
    """Bring files into the HF cache (resuming partial downloads) and verify every LFS file's
    sha256 against the Hub's; a listing from the cache (offline) is only verified."""
    files = []
    for name in names:
        remote = listing.file(name)
        if listing.cached:
            files.append(_cached_file(listing, remote, progress))
            continue
        with _hub_errors(listing.repo, listing.revision):
            files.append(_download_one(listing, remote, progress))
    _record_ref(listing)
    snapshot = _storage(listing.repo) / "snapshots" / listing.commit
    return Download(listing.repo, listing.commit, snapshot, tuple(files))


# --- removal ------------------------------------------------------------------------------------


def _delete_entries(paths: set[Path]) -> int:
    """Delete snapshot entries (and blobs no other entry uses) from the HF cache; bytes freed."""
    from huggingface_hub import scan_cache_dir

    root = cache_dir()
    if not paths or not root.is_dir():
        return 0
    info = scan_cache_dir(root)
    entries = [
        f
        for r in info.repos
        for rev in r.revisions
        for f in rev.files
        if f.file_path.absolute() in paths
    ]
    if not entries:
        return 0
    strategy = info.delete_files(*entries)
    strategy.execute()
    return strategy.expected_freed_size


def discard(download: Download) -> int:
    """Delete from the HF cache the files this download fetched (a source no longer needed)."""
    return _delete_entries({f.path.absolute() for f in download.files if f.fetched})


def purge(manifest: Manifest) -> int:
    """Delete a removed model's files from the HF cache unless another model still uses them."""
    from localmix.models import store

    wanted = {Path(p).absolute() for p in manifest.hub_files}
    in_use = {
        Path(p).absolute()
        for m in store.list_models()
        if m.ref != manifest.ref
        for p in m.hub_files
    }
    return _delete_entries(wanted - in_use)
