"""The server: a socket bound first (so a busy port is said before any model loads), the models
named at start loaded, then uvicorn (with uvloop and httptools where installed) serving the app on
that socket, in this thread (the CLI) or in a background thread (tests: port 0 picks a free
port)."""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from localmix.errors import LocalmixError, UsageError

if TYPE_CHECKING:
    from localmix.load import LoadSettings
    from localmix.models.store import Located
    from localmix.serve.guard import Policy
    from localmix.serve.models import Registry, ServeOptions

DEFAULT_HOST = "127.0.0.1"
# Ollama's port: its clients (and tools built on them) find the server without being told.
DEFAULT_PORT = 11434
GRACE_S = 3  # seconds open streams get to finish when the server stops


def is_loopback(host: str) -> bool:
    """Whether host is this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port); a clear error when taken."""
    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} is not between 0 and 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise UsageError(
            f"cannot serve on {host!r}: {e.strerror}", hint="give an IP address"
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # from now on connections wait for uvicorn instead of being refused
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LocalmixError(
                f"{url_of(host, port)} is in use",
                hint="is Ollama or another localmix serve running? choose another --port",
            ) from None
        raise LocalmixError(f"cannot serve on {url_of(host, port)}: {e.strerror}") from None
    return sock


class Server:
    """One server: bound at construction, serving from run() (blocking) or start() (thread)."""

    def __init__(
        self,
        settings: LoadSettings,
        options: ServeOptions,
        *,
        named: Sequence[tuple[str, Located]] = (),
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        policy: Policy | None = None,
    ) -> None:
        from localmix.serve import guard
        from localmix.serve.models import Registry

        self.policy = policy or guard.policy(loopback=is_loopback(host))

        self.registry: Registry = Registry(settings, options, named)
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = url_of(host, self.port)
        self._uvicorn: object | None = None
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Load the named models, then serve in this thread until SIGINT/SIGTERM (or stop());
        the models are unloaded before it returns."""
        import uvicorn

        from localmix.serve.app import build_app

        try:
            self.registry.preload()
            config = uvicorn.Config(
                build_app(self.registry, self.policy), log_level="warning", access_log=False,
                lifespan="on", timeout_graceful_shutdown=GRACE_S, ws="none",
            )  # fmt: skip
            self._uvicorn = server = uvicorn.Server(config)
            if on_ready is not None:
                on_ready()  # the socket listens: a request now waits until uvicorn takes it
            server.run(sockets=[self.sock])
        finally:
            self.registry.close_now()
            self.sock.close()

    def start(self, timeout: float = 60.0) -> Server:
        """Serve from a background thread; returns once requests are answered."""

        def main() -> None:
            try:
                self.run()
            except BaseException as e:  # handed to start() or stop()
                self._failed = e

        self._thread = threading.Thread(target=main, name="localmix-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not getattr(self._uvicorn, "started", False):
            if self._failed is not None:
                raise self._failed
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise LocalmixError(f"the server did not start within {timeout:.0f} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop a start()ed server: open streams get GRACE_S seconds, models are unloaded."""
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
