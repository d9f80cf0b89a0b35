"""A real Hugging Face Hub on 127.0.0.1, for tests: the part of the protocol huggingface_hub uses.

Two HTTP servers in threads: the Hub (`/api/models/...`, `/{repo}/resolve/{rev}/{file}`) and a
"CDN" on another port, where the Hub redirects LFS files as huggingface.co does (so the client
sees a cross-origin redirect, the X-Linked-Etag / X-Linked-Size headers, and Range requests).
Repos are served from directories. Faults can be injected per file name: drop the connection
after N bytes, flip one byte, answer slowly. Every request is logged with the bytes it sent.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socket import SO_LINGER, SOL_SOCKET
from urllib.parse import unquote, urlparse

# Files the Hub stores with git LFS in typical model repos (their .gitattributes).
_LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pth", ".model", ".v3", ".v7")
_LFS_MIN_BYTES = 1 << 20
_SLICE = 64 << 10


@dataclass
class HubFile:
    name: str
    path: Path
    size: int  # bytes actually served
    claimed_size: int  # what model info and the headers say (a test may claim more)
    sha256: str
    git_sha: str
    lfs: bool


@dataclass
class Revision:
    commit: str
    files: dict[str, HubFile]


@dataclass
class HubRepo:
    repo_id: str
    revisions: dict[str, Revision] = field(default_factory=dict)  # branch or tag -> revision
    gated: bool = False
    tokens: frozenset[str] = frozenset()  # tokens that passed the gate

    def find(self, rev: str) -> Revision | None:
        if rev in self.revisions:
            return self.revisions[rev]
        return next((r for r in self.revisions.values() if r.commit == rev), None)


@dataclass
class Fault:
    drop_after: int | None = None  # close the connection after this many body bytes
    reset: bool = False  # with drop_after: end it with a TCP reset instead of a clean close
    corrupt_at: int | None = None  # flip the byte at this offset of the file
    delay_s: float = 0.0  # wait before answering
    rate: float | None = None  # bytes per second while sending the body
    ignore_range: bool = False  # answer a Range request with the whole file (200), as some CDNs do
    times: int = 1  # how many responses this fault affects (then it is gone)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    status: int
    range_start: int = 0
    sent: int = 0  # body bytes written to the socket
    file: str | None = None


def _git_sha(data_size: int, path: Path) -> str:
    digest = hashlib.sha1(f"blob {data_size}\0".encode())
    digest.update(path.read_bytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class HubServer:
    """Start with `with HubServer() as hub:`; `hub.endpoint` is what HF_ENDPOINT gets."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[Request] = []
        self._faults: dict[str, list[Fault]] = {}
        self._by_sha: dict[str, HubFile] = {}
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> HubServer:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name=f"test-{role}", daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # --- content --------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        directory: Path,
        *,
        revision: str = "main",
        gated: bool = False,
        tokens: tuple[str, ...] = (),
        claimed_sizes: dict[str, int] | None = None,
    ) -> str:
        """Serve every file under `directory` as repo_id@revision; returns the commit sha."""
        files: dict[str, HubFile] = {}
        for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
            name = path.relative_to(directory).as_posix()
            size = path.stat().st_size
            lfs = name.endswith(_LFS_SUFFIXES) or size >= _LFS_MIN_BYTES
            claimed = (claimed_sizes or {}).get(name, size)
            files[name] = HubFile(
                name, path, size, claimed, _sha256(path), _git_sha(size, path), lfs
            )
        commit = hashlib.sha1(
            json.dumps([repo_id, revision, [(f.name, f.sha256) for f in files.values()]]).encode()
        ).hexdigest()
        repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
        repo.gated = repo.gated or gated
        repo.tokens = repo.tokens | frozenset(tokens)
        repo.revisions[revision] = Revision(commit, files)
        for hub_file in files.values():
            self._by_sha.setdefault(hub_file.sha256, hub_file)
        return commit

    def fault(self, name: str, **kwargs: object) -> None:
        """Inject a fault into the next response(s) carrying the file `name` (see Fault)."""
        with self._lock:
            self._faults.setdefault(name, []).append(Fault(**kwargs))  # type: ignore[arg-type]

    def take_fault(self, name: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(name) or []
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
            return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # --- observation ----------------------------------------------------------------------

    def log(self, request: Request) -> Request:
        with self._lock:
            self.requests.append(request)
        return request

    def bytes_served(self, name: str | None = None) -> int:
        """Body bytes of file content sent so far (all files, or one)."""
        with self._lock:
            return sum(r.sent for r in self.requests if r.file and (name is None or r.file == name))

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()


def _handler(hub: HubServer, role: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        # --- plumbing ---------------------------------------------------------------------

        def _route(self, head: bool) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            record = hub.log(Request(role, self.command, path, 0))
            try:
                if role == "cdn":
                    self._cdn(path, head, record)
                elif path.startswith("/api/models/"):
                    self._model_info(path.removeprefix("/api/models/"), url.query, record)
                elif "/resolve/" in path:
                    self._resolve(path, head, record)
                else:
                    self._error(record, 404, "RepoNotFound", "Not found")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _send(
            self, record: Request, status: int, headers: dict[str, str], body: bytes = b""
        ) -> None:
            record.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

        def _error(
            self, record: Request, status: int, code: str, message: str, **extra: str
        ) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"X-Error-Code": code, "X-Error-Message": message}
            headers["Content-Type"] = "application/json"
            headers.update(extra)
            self._send(record, status, headers, body)

        def _repo(self, record: Request, repo_id: str) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                # The real Hub answers 401 for a missing repo when no token is sent.
                self._error(record, 401, "RepoNotFound", "Repository not found")
            return repo

        # --- /api/models/{repo}[/revision/{rev}] ------------------------------------------

        def _model_info(self, rest: str, query: str, record: Request) -> None:
            repo_id, _, rev = rest.partition("/revision/")
            repo = self._repo(record, repo_id.strip("/"))
            if repo is None:
                return
            revision = repo.find(rev or "main")
            if revision is None:
                self._error(record, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            blobs = "blobs=true" in query.lower()
            siblings = []
            for f in revision.files.values():
                entry: dict[str, object] = {"rfilename": f.name}
                if blobs:
                    entry["size"] = f.claimed_size if f.lfs else f.size
                    entry["blobId"] = f.git_sha
                    if f.lfs:
                        entry["lfs"] = {
                            "size": f.claimed_size,
                            "sha256": f.sha256,
                            "pointerSize": 134,
                        }
                siblings.append(entry)
            info = {
                "_id": repo.repo_id,
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": revision.commit,
                "lastModified": "2024-05-22T00:00:00.000Z",
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": ["gguf"] if any(n.endswith(".gguf") for n in revision.files) else [],
                "siblings": siblings,
            }
            body = json.dumps(info).encode()
            self._send(record, 200, {"Content-Type": "application/json"}, body)

        # --- /{repo}/resolve/{rev}/{file} -------------------------------------------------

        def _resolve(self, path: str, head: bool, record: Request) -> None:
            repo_id, _, rest = path.strip("/").partition("/resolve/")
            rev, _, name = rest.partition("/")
            repo = self._repo(record, repo_id)
            if repo is None:
                return
            revision = repo.find(rev)
            if revision is None:
                self._error(record, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            if repo.gated:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ").strip()
                if token not in repo.tokens:
                    status = 403 if token else 401
                    self._error(
                        record,
                        status,
                        "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.",
                    )
                    return
            hub_file = revision.files.get(name)
            commit = {"X-Repo-Commit": revision.commit}
            if hub_file is None:
                self._error(record, 404, "EntryNotFound", "Entry not found", **commit)
                return
            if hub_file.lfs:
                # As huggingface.co: a redirect to the CDN, the file's metadata on the redirect.
                self._send(
                    record,
                    302,
                    {
                        **commit,
                        "Location": f"{hub.cdn}/blobs/{hub_file.sha256}",
                        "X-Linked-Etag": f'"{hub_file.sha256}"',
                        "X-Linked-Size": str(hub_file.claimed_size),
                        "ETag": f'"{hub_file.git_sha}"',
                    },
                )
                return
            self._content(hub_file, head, record, {**commit, "ETag": f'"{hub_file.git_sha}"'})

        # --- the CDN ----------------------------------------------------------------------

        def _cdn(self, path: str, head: bool, record: Request) -> None:
            sha = path.rsplit("/", 1)[-1]
            hub_file = hub._by_sha.get(sha)
            if hub_file is None:
                self._send(record, 404, {}, b"no such blob")
                return
            self._content(hub_file, head, record, {"ETag": f'"{sha}"'})

        def _content(
            self, hub_file: HubFile, head: bool, record: Request, headers: dict[str, str]
        ) -> None:
            record.file = hub_file.name
            fault = None if head else hub.take_fault(hub_file.name)
            if fault and fault.delay_s:
                time.sleep(fault.delay_s)
            size = hub_file.size
            start = 0
            status = 200
            wanted = "" if fault and fault.ignore_range else self.headers.get("Range", "")
            if wanted.startswith("bytes=") and not head:
                first = wanted.removeprefix("bytes=").split("-", 1)[0]
                start = int(first or 0)
                if start >= size:
                    self._send(record, 416, {"Content-Range": f"bytes */{size}"})
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
            record.range_start = start
            headers.update(
                {
                    "Content-Length": str(size - start),
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                }
            )
            self._send(record, status, headers)
            if head:
                return
            self._stream(hub_file, start, record, fault)

        def _stream(
            self, hub_file: HubFile, start: int, record: Request, fault: Fault | None
        ) -> None:
            began = time.monotonic()
            with open(hub_file.path, "rb") as handle:
                handle.seek(start)
                offset = start
                while block := handle.read(_SLICE):
                    if fault and fault.corrupt_at is not None:
                        at = fault.corrupt_at - offset
                        if 0 <= at < len(block):
                            block = block[:at] + bytes([block[at] ^ 0xFF]) + block[at + 1 :]
                    if fault and fault.drop_after is not None:
                        room = fault.drop_after - record.sent
                        if room <= 0:
                            if fault.reset:  # linger 0: closing the socket sends RST
                                linger = struct.pack("ii", 1, 0)
                                self.connection.setsockopt(SOL_SOCKET, SO_LINGER, linger)
                            self.close_connection = True
                            return
                        block = block[:room]
                    self.wfile.write(block)
                    self.wfile.flush()
                    record.sent += len(block)
                    offset += len(block)
                    if fault and fault.rate:
                        ahead = record.sent / fault.rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)

    return Handler
