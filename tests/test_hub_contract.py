"""What localmix relies on in huggingface_hub beyond its documented calls, checked against the
installed huggingface_hub and the local Hub (tests/hub_server.py). hubfetch (the one adapter:
a resumable download of a blob) puts bytes where hf_hub_download then finds them; if a test here
fails after an upgrade of huggingface_hub, the adapter has to change with it, or go, if
hf_hub_download has learned to continue an interrupted download."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from localmix.models import hub as localmix_hub
from localmix.models import hubfetch
from localmix.progress import Progress
from tests.hub_server import HubServer
from tests.test_pull import MiB, gguf_repo

if TYPE_CHECKING:
    from huggingface_hub import HfFileMetadata

REPO = "org/c-GGUF"
NAME = "c.Q4_K_M.gguf"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(REPO, gguf_repo(tmp_path, "c", {NAME: 2 * MiB}))
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return (tmp_path / "hf-cache").resolve()


def _meta(hub: HubServer, name: str) -> HfFileMetadata:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(REPO, name, revision="main", endpoint=hub.endpoint)
    return get_hf_file_metadata(url, endpoint=hub.endpoint)


def _fetch(
    hub: HubServer,
    cache: Path,
    on_bytes: hubfetch.OnBytes = lambda done: None,
    on_retry: hubfetch.OnRetry = lambda done, why: None,
) -> tuple[Path, bool]:
    meta = _meta(hub, NAME)
    assert meta.etag is not None
    blob = hubfetch.blob_path(cache, REPO, meta.etag)
    fetched = hubfetch.fetch(
        blob,
        meta.location,
        headers={},
        size=meta.size,
        on_bytes=on_bytes,
        on_retry=on_retry,
        accept=lambda partial: None,
    )
    return blob, fetched


def test_hf_hub_download_keeps_each_blob_where_and_as_hubfetch_names_it(
    hub: HubServer, cache: Path
) -> None:
    """blobs/<etag> in models--ORG--NAME, the etag being the sha256 (LFS) or the git blob id that
    model_info lists: bytes_to_fetch finds cached and partial bytes by them, before any request;
    the entry is snapshots/<commit>/<name>, whose folder a Download reports."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi(endpoint=hub.endpoint).model_info(REPO, files_metadata=True)
    assert {s.rfilename for s in info.siblings} == {NAME, "README.md"}
    for sibling in info.siblings:
        meta = _meta(hub, sibling.rfilename)
        assert meta.etag == (sibling.lfs.sha256 if sibling.lfs else sibling.blob_id)
        entry = Path(
            hf_hub_download(REPO, sibling.rfilename, cache_dir=cache, endpoint=hub.endpoint)
        )
        assert entry.resolve() == hubfetch.blob_path(cache, REPO, meta.etag)
        snapshot = hubfetch.repo_folder(cache, REPO) / "snapshots" / info.sha
        assert entry == snapshot / sibling.rfilename
        assert localmix_hub._snapshot_of(entry, sibling.rfilename) == snapshot


def test_hf_hub_download_links_a_blob_in_place_without_fetching_it_and_records_the_ref(
    hub: HubServer, cache: Path
) -> None:
    from huggingface_hub import hf_hub_download, scan_cache_dir, try_to_load_from_cache

    blob, fetched = _fetch(hub, cache)
    assert fetched and blob.is_file()
    hub.reset_log()
    entry = hf_hub_download(REPO, NAME, revision="main", cache_dir=cache, endpoint=hub.endpoint)
    assert [r.method for r in hub.requests] == ["HEAD"] and hub.bytes_served() == 0
    assert Path(entry).resolve() == blob
    # what an offline pull reads afterwards: the ref main -> the commit, and the entry
    assert try_to_load_from_cache(REPO, NAME, cache_dir=cache, revision="main") == entry
    (cached,) = [r for r in scan_cache_dir(cache).repos if r.repo_id == REPO]
    assert cached.refs["main"].commit_hash == _meta(hub, NAME).commit_hash


def test_an_interrupted_fetch_is_the_caches_incomplete_download_and_resumes(
    hub: HubServer, cache: Path
) -> None:
    """A partial is `blobs/<etag>.incomplete`, what scan_cache_dir reports as an interrupted
    download (so `hf cache` tools count and clean it); the next fetch asks for the rest only."""
    from huggingface_hub import scan_cache_dir

    def killed(done: int) -> None:
        if done > MiB:
            raise KeyboardInterrupt  # as Ctrl-C in the middle of the body

    with pytest.raises(KeyboardInterrupt):
        _fetch(hub, cache, on_bytes=killed)
    (partial,) = scan_cache_dir(cache).incomplete_files
    blob = hubfetch.blob_path(cache, REPO, str(_meta(hub, NAME).etag))
    assert partial.file_path == hubfetch.partial_path(blob) and partial.size_on_disk > MiB
    hub.reset_log()
    assert _fetch(hub, cache) == (blob, True)
    (get,) = [r for r in hub.requests if r.method == "GET"]
    assert get.range_start == partial.size_on_disk
    assert partial.size_on_disk + hub.bytes_served(NAME) == blob.stat().st_size


def test_a_dropped_connection_through_get_session_is_resumed_and_reported(
    hub: HubServer, cache: Path
) -> None:
    """huggingface_hub's client raises an httpx2 TransportError when the body ends early: the
    error hubfetch resumes after, reporting the bytes on disk and the reason."""
    size = _meta(hub, NAME).size
    assert size is not None
    hub.fault(NAME, drop_after=size // 3)
    retries: list[tuple[int, str]] = []
    blob, fetched = _fetch(hub, cache, on_retry=lambda done, why: retries.append((done, why)))
    assert fetched and blob.stat().st_size == size
    assert retries == [(size // 3, "peer closed connection without sending complete message body")]
    gets = [r.range_start for r in hub.requests if r.method == "GET"]
    assert gets == [0, size // 3]


def test_hf_hub_download_reports_its_bytes_through_tqdm_class(hub: HubServer, cache: Path) -> None:
    """Should hf_hub_download transfer a file itself, its bytes reach localmix's progress records
    through the documented tqdm_class parameter (hub._meter), instead of a bar on stderr."""
    from huggingface_hub import hf_hub_download

    seen: list[Progress] = []
    hf_hub_download(
        REPO,
        NAME,
        cache_dir=cache,
        endpoint=hub.endpoint,
        tqdm_class=localmix_hub._meter(seen.append, NAME),
    )
    size = hub.bytes_served(NAME)
    assert seen[0] == Progress("download", NAME, 0, size, "bytes")
    assert seen[-1] == Progress("download", NAME, size, size, "bytes")


def test_a_server_that_ignores_the_range_sends_the_whole_file_again(
    hub: HubServer, cache: Path, tmp_path: Path
) -> None:
    """A resumed GET answered 200 (the whole file) starts the partial over instead of appending."""
    size = _meta(hub, NAME).size
    assert size is not None
    hub.fault(NAME, drop_after=size // 3)
    hub.fault(NAME, ignore_range=True)
    blob, fetched = _fetch(hub, cache)
    assert fetched and blob.read_bytes() == (tmp_path / "repos" / "c" / NAME).read_bytes()
    assert hub.bytes_served(NAME) == size // 3 + size
