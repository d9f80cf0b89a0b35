"""The Hugging Face Hub: listing a repo, choosing files for a quant, downloading into the shared HF
cache with resume, sha256 verification, offline lookups, and purging cache entries.

Every call to huggingface_hub lives here (its public API: HfApi.model_info, get_hf_file_metadata,
hf_hub_download, try_to_load_from_cache, scan_cache_dir), and so does the translation of its typed
errors into localmix's. Files land in the shared cache (HF_HOME) where every other HF tool finds
them. The bytes of a file come through hubfetch, the one adapter, because hf_hub_download cannot
continue an interrupted download (see there); hf_hub_download then links them into the snapshot.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
from localmix.progress import OnProgress, Progress, ignore

if TYPE_CHECKING:
    from huggingface_hub import CachedRevisionInfo, HfFileMetadata

    from localmix.models.store import Manifest

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


def _cached_revision(repo: str, revision: str) -> CachedRevisionInfo | None:
    """The cache's snapshot of a repo at a revision (a branch or tag through its ref)."""
    from huggingface_hub import CacheNotFound, scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return None
    for cached in info.repos:
        if cached.repo_id == repo and cached.repo_type == "model":
            if _COMMIT.fullmatch(revision):
                return next((r for r in cached.revisions if r.commit_hash == revision), None)
            return cached.refs.get(revision)
    return None


def _cached_listing(repo: str, revision: str) -> Listing:
    """What the local cache holds of a repo at a revision; no network."""
    cached = _cached_revision(repo, revision)
    if cached is None or not cached.files:
        raise OfflineMiss(
            f"offline, and nothing of {repo}@{revision} is in the Hugging Face cache ({cache_dir()})",
            hint="run the pull once online (without --offline / HF_HUB_OFFLINE)",
        )
    files = []
    for entry in sorted(cached.files, key=lambda f: f.file_path):
        name = entry.file_path.relative_to(cached.snapshot_path).as_posix()
        # the cache names an LFS file's blob by its sha256 (its etag on the Hub)
        lfs_hash = entry.blob_path.name if _SHA256_RE.match(entry.blob_path.name) else None
        files.append(RemoteFile(name, entry.size_on_disk, sha256=lfs_hash))
    return Listing(repo, revision, cached.commit_hash, tuple(files), cached=True)


# --- download -----------------------------------------------------------------------------------


def bytes_to_fetch(listing: Listing, names: Sequence[str]) -> int:
    """Bytes still to download for these files: cached blobs and partial downloads count off."""
    from localmix.models import hubfetch

    if listing.cached:
        return 0
    needed = 0
    for name in names:
        remote = listing.file(name)
        etag = remote.sha256 or remote.blob_id  # what the Hub's ETag for the file will be
        if etag is None:
            needed += remote.size
        else:
            needed += hubfetch.missing_bytes(
                hubfetch.blob_path(cache_dir(), listing.repo, etag), remote.size
            )
    return needed


# Each progress record a download sends is made in one of these three.


def _downloaded(file: str, done: int, total: int | None) -> Progress:
    return Progress("download", subject=file, done=done, total=total, unit="bytes")


def _verified(file: str, done: int, total: int) -> Progress:
    return Progress("verify", subject=file, done=done, total=total, unit="bytes")


def _resumed(file: str, done: int, total: int | None, reason: str) -> Progress:
    return Progress("retry", subject=file, done=done, total=total, unit="bytes", detail=reason)


def _meter(emit: OnProgress, file: str) -> type:
    """A tqdm_class for hf_hub_download (the documented way to take over its progress bar): its
    byte counts become download records instead of a bar of its own on stderr. It sees bytes
    only if hf_hub_download has to transfer some, which hubfetch normally leaves it nothing of."""

    class Meter:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any) -> None:
            self.total, self.n = total, initial
            emit(_downloaded(file, initial, total))

        def update(self, n: int = 1) -> None:
            self.n += n
            emit(_downloaded(file, self.n, self.total))

        def close(self) -> None:
            pass

        def __enter__(self) -> Meter:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return Meter


def _sha256(path: Path, name: str, emit: OnProgress) -> str:
    from localmix.models.store import sha256_file

    total = path.stat().st_size
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        emit(_verified(name, done, total))

    emit(_verified(name, 0, total))
    return sha256_file(path, progress=step)


def _mismatch(name: str, expected: str, got: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{name}: sha256 {got[:12]}… does not match the Hub's {expected[:12]}…; "
        "the damaged file was deleted",
        hint="run the pull again to fetch it anew; if it fails again, the mirror "
        "(HF_ENDPOINT) or the network corrupts data",
    )


def _remove_cached(repo: str, path: Path) -> None:
    """Delete a snapshot entry and its blob, and every other entry that links to that blob."""
    from huggingface_hub import scan_cache_dir

    blob = path.resolve()
    with contextlib.suppress(Exception):
        info = scan_cache_dir(cache_dir())
        entries = [
            f
            for r in info.repos
            if r.repo_id == repo
            for rev in r.revisions
            for f in rev.files
            if f.blob_path.resolve() == blob
        ]
        if entries:
            info.delete_files(*entries).execute()


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlparse

    parts = urlparse(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _url(listing: Listing, name: str, revision: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(listing.repo, name, revision=revision, endpoint=endpoint())


def _headers(location: str, hub_url: str) -> dict[str, str]:
    """The token goes to the Hub only: a signed CDN URL (another origin) carries its own rights."""
    from huggingface_hub import constants, get_token

    # as huggingface_hub's own requests: no token unless asked for when implicit ones are off
    token = None if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN else get_token()
    if token and _origin(location) == _origin(hub_url):
        return {"authorization": f"Bearer {token}"}
    return {}


def _metadata(listing: Listing, remote: RemoteFile) -> HfFileMetadata:
    """The file's etag, size and download location at the listed revision, which must still be
    the listed commit (a branch that moved since would mix two versions of the repo)."""
    from huggingface_hub import constants, get_hf_file_metadata

    meta = get_hf_file_metadata(
        _url(listing, remote.name, listing.revision),
        timeout=constants.HF_HUB_ETAG_TIMEOUT,
        endpoint=endpoint(),
        retry_on_errors=True,
    )
    if not meta.etag:
        raise NetworkError(
            f"{shown_endpoint()} sent no ETag for {remote.name}: not a Hub endpoint?"
        )
    if meta.commit_hash and meta.commit_hash != listing.commit:
        raise _moved(listing)
    return meta


def _moved(listing: Listing) -> NetworkError:
    return NetworkError(
        f"{listing.repo}@{listing.revision} changed on the Hub during the pull",
        hint="run the pull again: it takes the new commit (files already fetched stay)",
    )


def _fetch(listing: Listing, remote: RemoteFile, emit: OnProgress) -> bool:
    """The file's blob into the cache through hubfetch (resuming a partial one), verified."""
    from localmix.models import hubfetch

    meta = _metadata(listing, remote)
    name = remote.name

    def accept(partial: Path) -> None:
        if remote.sha256 and (got := _sha256(partial, name, emit)) != remote.sha256:
            partial.unlink(missing_ok=True)
            raise _mismatch(name, remote.sha256, got)

    return hubfetch.fetch(
        hubfetch.blob_path(cache_dir(), listing.repo, meta.etag),
        meta.location,
        headers=_headers(meta.location, _url(listing, name, listing.revision)),
        size=meta.size,
        on_bytes=lambda done: emit(_downloaded(name, done, meta.size)),
        on_retry=lambda done, why: emit(_resumed(name, done, meta.size, why)),
        accept=accept,
    )


def _snapshot_of(path: Path, name: str) -> Path:
    """The snapshot folder of an entry: the entry's path less the file's own path in the repo."""
    return path.parents[len(PurePosixPath(name).parts) - 1]


def _download_one(listing: Listing, remote: RemoteFile, emit: OnProgress) -> LocalFile:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(
        listing.repo, remote.name, cache_dir=cache_dir(), revision=listing.commit
    )
    fetched = not isinstance(cached, str) and _fetch(listing, remote, emit)
    # With the blob in place, hf_hub_download transfers nothing: it links the snapshot entry,
    # and records the branch or tag asked for (refs/), which an offline pull later reads.
    entry = Path(
        hf_hub_download(
            listing.repo,
            remote.name,
            revision=listing.revision,
            cache_dir=cache_dir(),
            endpoint=endpoint(),
            tqdm_class=_meter(emit, remote.name),
        )
    )
    if _snapshot_of(entry, remote.name).name != listing.commit:
        raise _moved(listing)
    if not fetched:  # cached earlier, maybe by another tool: verified all the same
        _check_cached(listing, remote, entry, emit)
    return LocalFile(remote.name, entry, remote.size, remote.sha256, fetched)


def _check_cached(listing: Listing, remote: RemoteFile, entry: Path, emit: OnProgress) -> None:
    """An LFS file found in the cache matches the Hub's sha256, or is deleted from it."""
    if not remote.sha256:
        return
    got = _sha256(entry, remote.name, emit)
    if got != remote.sha256:
        _remove_cached(listing.repo, entry)
        raise _mismatch(remote.name, remote.sha256, got)


def _cached_file(listing: Listing, remote: RemoteFile, emit: OnProgress) -> LocalFile:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        listing.repo, remote.name, cache_dir=cache_dir(), revision=listing.commit
    )
    if not isinstance(found, str):
        raise OfflineMiss(
            f"offline, and {listing.repo}@{listing.commit[:12]} lacks {remote.name} in the "
            "Hugging Face cache",
            hint="run the pull once online (without --offline / HF_HUB_OFFLINE)",
        )
    entry = Path(found)
    _check_cached(listing, remote, entry, emit)
    return LocalFile(remote.name, entry, remote.size, remote.sha256, fetched=False)


def download(
    listing: Listing, names: Sequence[str], *, progress: OnProgress | None = None
) -> Download:
    """Bring files into the HF cache (resuming partial downloads) and verify every LFS file's
    sha256 against the Hub's; a listing from the cache (offline) is only verified."""
    emit = progress or ignore
    files = []
    for name in names:
        remote = listing.file(name)
        if listing.cached:
            files.append(_cached_file(listing, remote, emit))
            continue
        with _hub_errors(listing.repo, listing.revision):
            files.append(_download_one(listing, remote, emit))
    snapshot = _snapshot_of(files[0].path, files[0].name)
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
