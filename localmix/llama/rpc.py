"""llama.cpp's RPC backend (ggml-rpc): other machines' devices joined to this process's as RPC0,
RPC1, ... (add_servers), and this machine's devices served to them (serve, `localmix worker`).

Client and workers run the same llama.cpp, so protocols match: the backend is the wheel's own
where llama-cpp-python was built with -DGGML_RPC=on, else a plug-in built from the pinned sdist's
vendored ggml-rpc (rpc_plugin.py).

llama.cpp 0.3.36 shapes three rules here:
- ggml-rpc aborts the process (SIGABRT) when a worker cannot be reached, speaks another protocol,
  is not a worker or dies mid-run, and hangs on one that never answers. So every endpoint is
  probed from Python (its HELLO, device count and memory) before llama.cpp connects to it; a worker
  that dies after that still aborts the client (the next phase runs RPC engines in a child).
- A worker serves one client at a time; a busy one leaves the next in its listen backlog, which
  a probe sees as silence, and each client process keeps its connection until it exits.
- Sockets are IPv4 (AF_INET, inet_addr, gethostbyname): no IPv6 endpoints.
Workers' CPUs never repack weights (their buffers are plain CPU ones), whatever the client's CPU
rule (load.weight_repack) does with the layers it keeps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmix.errors import EngineError, UsageError, WorkerError

PROTOCOL = (7, 0, 0)  # RPC_PROTO_{MAJOR,MINOR,PATCH}_VERSION of 0.3.36's ggml/include/ggml-rpc.h
DEFAULT_PORT = 50052  # llama.cpp's ggml-rpc-server's
PROBE_TIMEOUT = 5.0  # seconds for each step of a probe: connect, then each reply

# Commands (enum rpc_cmd) and sizes (packed structs) of protocol 7: a request is
# | cmd u8 | size u64 | data |, a reply | size u64 | data |; HELLO must come first.
_HELLO, _DEVICE_COUNT, _GET_DEVICE_MEMORY = 14, 15, 11
_CONN_CAPS = 24  # rpc_msg_hello_req.conn_caps: all zero asks for plain TCP
_HELLO_REPLY = 4 + _CONN_CAPS  # major, minor, patch, padding, conn_caps
_MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS

_TUNNEL = "ssh -N -L {port}:127.0.0.1:{port} USER@HOST"


# -- endpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A worker's address as given (a name or an IPv4 address) and its port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


def parse_endpoint(text: str) -> Endpoint:
    """HOST:PORT (a name or IPv4 address) as an Endpoint; UsageError for anything else, IPv6
    ([::1]:50052) included, which llama.cpp's RPC sockets cannot reach."""
    value = text.strip()
    if value.startswith("[") or value.count(":") > 1:
        raise UsageError(
            f"RPC endpoint {text!r} is IPv6: llama.cpp's RPC backend speaks IPv4 only",
            hint="give the worker's IPv4 address or a name with one, or tunnel its port: "
            + _TUNNEL.format(port=DEFAULT_PORT)
            + f", then use 127.0.0.1:{DEFAULT_PORT}",
        )
    host, colon, port = value.rpartition(":")
    if not colon or not host or not _HOST.fullmatch(host):
        raise UsageError(
            f"RPC endpoint {text!r} is not HOST:PORT",
            hint=f"e.g. 192.168.1.20:{DEFAULT_PORT}, as `localmix worker` prints it",
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(
            f"RPC endpoint {text!r}: the port must be a number from 1 to 65535",
            hint=f"`localmix worker` listens on {DEFAULT_PORT} unless told --port",
        )
    return Endpoint(host.lower(), int(port))


def parse_endpoints(values: str | Iterable[str]) -> tuple[Endpoint, ...]:
    """Endpoints from a comma-separated list (llama.cpp's --rpc) or several of them, in order,
    each once."""
    items = [values] if isinstance(values, str) else list(values)
    found = [parse_endpoint(part) for item in items for part in item.split(",") if part.strip()]
    if not found:
        raise UsageError("no RPC endpoint given", hint=f"e.g. --rpc 192.168.1.20:{DEFAULT_PORT}")
    unique = tuple(dict.fromkeys(found))
    if len(unique) > _MAX_SERVERS:
        raise UsageError(f"at most {_MAX_SERVERS} RPC workers, not {len(unique)}")
    return unique


def _ipv4(endpoint: Endpoint) -> str:
    """The worker's IPv4 address: what llama.cpp connects to (its gethostbyname)."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise WorkerError(
            f"cannot resolve {endpoint.host} (RPC worker {endpoint}) to an IPv4 address: {reason}",
            hint="check the name, or give the worker's IPv4 address",
        ) from None
    return str(infos[0][4][0])


# -- the probe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    """What a worker answered a probe: the address llama.cpp names its devices by (IPv4:PORT),
    its protocol version and each device's memory (bytes), in its order."""

    endpoint: str
    version: str
    free_bytes: tuple[int, ...]
    total_bytes: tuple[int, ...]


def probe(endpoint: Endpoint | str, timeout: float = PROBE_TIMEOUT) -> Worker:
    """Ask a worker, from Python, what llama.cpp would: its protocol (HELLO), its devices and
    their memory. WorkerError when it cannot be reached, is not a worker, speaks another protocol
    or does not answer within `timeout` seconds (busy with another client). A worker this
    process already uses is not asked again (its one connection is ours): its first answer."""
    where = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    address = f"{_ipv4(where)}:{where.port}"
    if address in _REGISTERED:
        return _REGISTERED[address][0]
    try:
        sock = socket.create_connection((address.rpartition(":")[0], where.port), timeout)
    except ConnectionRefusedError:
        raise WorkerError(
            f"nothing listens at {where} (connection refused)",
            hint=f"start `localmix worker --port {where.port}` on that machine (add --host for "
            "another address than 127.0.0.1), or check the address",
        ) from None
    except TimeoutError:
        raise WorkerError(
            f"no answer from {where} within {timeout:g} s",
            hint="is the machine up, and does its firewall let this port through?",
        ) from None
    except OSError as exc:
        raise WorkerError(
            f"cannot reach {where}: {exc.strerror or exc}", hint="check the address and network"
        ) from None
    with sock:
        sock.settimeout(timeout)
        try:
            return _ask(sock, where, address)
        except TimeoutError:
            raise WorkerError(
                f"{where} took the connection but did not answer llama.cpp's RPC handshake "
                f"within {timeout:g} s: a worker serves one client at a time, so it is busy "
                "with another (or it is not an RPC worker)",
                hint="wait for the other client to finish (it holds the worker until it "
                "exits), or start another worker",
            ) from None
        except OSError as exc:
            raise _not_a_worker(where, f"the connection broke ({exc.strerror or exc})") from None


def _ask(sock: socket.socket, where: Endpoint, address: str) -> Worker:
    sock.sendall(struct.pack("<BQ", _HELLO, _CONN_CAPS) + bytes(_CONN_CAPS))
    major, minor, patch = _reply(sock, where, _HELLO_REPLY)[:3]
    version = f"{major}.{minor}.{patch}"
    if major != PROTOCOL[0] or minor > PROTOCOL[1]:
        ours = ".".join(map(str, PROTOCOL))
        raise WorkerError(
            f"{where} speaks llama.cpp RPC protocol {version}, this llama.cpp {ours}",
            hint="run the same localmix and llama-cpp-python on every machine (a worker of "
            "another llama.cpp aborts its clients)",
        )
    (count,) = struct.unpack("<I", _call(sock, where, _DEVICE_COUNT, b"", 4))
    memory = [
        struct.unpack("<QQ", _call(sock, where, _GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
        for i in range(count)
    ]
    return Worker(
        endpoint=address,
        version=version,
        free_bytes=tuple(free for free, _ in memory),
        total_bytes=tuple(total for _, total in memory),
    )


def _call(sock: socket.socket, where: Endpoint, command: int, data: bytes, size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", command, len(data)) + data)
    return _reply(sock, where, size)


def _reply(sock: socket.socket, where: Endpoint, size: int) -> bytes:
    """A reply's payload of exactly `size` bytes; WorkerError for any other answer."""
    head = _read(sock, 8)
    if len(head) < 8:
        said = f"it closed the connection after {len(head)} bytes" if head else "it hung up"
        raise _not_a_worker(where, said)
    if head.startswith((b"HTTP/", b"SSH-")):
        kind = "a web server" if head.startswith(b"HTTP/") else "an SSH server"
        raise _not_a_worker(where, f"it answered like {kind}")
    (length,) = struct.unpack("<Q", head)
    if length != size:
        raise _not_a_worker(where, f"it answered {head!r}")
    body = _read(sock, size)
    if len(body) < size:
        raise _not_a_worker(where, "its answer stopped short")
    return body


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _not_a_worker(where: Endpoint, why: str) -> WorkerError:
    return WorkerError(
        f"{where} is not a llama.cpp RPC worker of protocol {PROTOCOL[0]}.{PROTOCOL[1]}: {why}",
        hint="check the port: `localmix worker` prints the endpoint it serves",
    )


# -- the backend library -----------------------------------------------------------------------


def _lib() -> Any:
    """libggml (the registry llama.cpp uses) with the functions this module calls declared."""
    from localmix.llama.lib import _declare, _ggml

    lib = _ggml()
    if not getattr(lib, "_localmix_rpc", False):
        p, c = ctypes.c_void_p, ctypes.c_char_p
        _declare(lib, "ggml_backend_load", p, c)
        _declare(lib, "ggml_backend_register", None, p)
        lib._localmix_rpc = True
    return lib


def load() -> None:
    """Make llama.cpp's RPC backend part of its registry (once per process)."""
    lib = _lib()
    if lib.ggml_backend_reg_by_name(b"RPC"):
        return
    from localmix.llama.backend import LOG, llama
    from localmix.llama.rpc_plugin import plugin, reinstall_hint

    path = plugin()
    LOG.install(llama())  # ggml's "load_backend: loaded RPC backend" is no news to a user
    if not lib.ggml_backend_load(str(path).encode()) or not lib.ggml_backend_reg_by_name(b"RPC"):
        raise EngineError(
            f"llama.cpp could not load its RPC backend {path}: {LOG.last_error('no reason given')}",
            hint=f"delete {path} to have it built again, or " + reinstall_hint(),
        )


def _proc(name: str, prototype: Any) -> Any:
    lib = _lib()
    address = lib.ggml_backend_reg_get_proc_address(
        lib.ggml_backend_reg_by_name(b"RPC"), name.encode()
    )
    if not address:
        raise EngineError(f"llama.cpp's RPC backend has no {name}")
    return prototype(address)


# -- the client --------------------------------------------------------------------------------

# IPv4:PORT -> (its probe, the names llama.cpp gave its devices): llama.cpp has no way to
# unregister a worker, so these last as long as the process.
_REGISTERED: dict[str, tuple[Worker, tuple[str, ...]]] = {}
_REGISTER_LOCK = threading.Lock()


def add_servers(
    endpoints: Sequence[Endpoint | str], timeout: float = PROBE_TIMEOUT
) -> tuple[str, ...]:
    """Join each worker's devices to llama.cpp's (each probed first; WorkerError instead of
    llama.cpp's abort); returns their names (RPC0, RPC1, ...) in endpoint order. A worker
    already joined is not joined again."""
    load()
    lib = _lib()
    add = _proc("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # an abort must not wait on gdb attaching
    names: list[str] = []
    with _REGISTER_LOCK:
        for given in endpoints:
            where = given if isinstance(given, Endpoint) else parse_endpoint(given)
            worker = probe(where, timeout)
            if worker.endpoint not in _REGISTERED:
                if not worker.total_bytes:
                    raise WorkerError(f"{where} serves no devices")
                before = lib.ggml_backend_dev_count()
                reg = add(worker.endpoint.encode())
                if not reg:
                    raise WorkerError(f"llama.cpp could not add the RPC worker {where}")
                lib.ggml_backend_register(reg)
                added = tuple(
                    lib.ggml_backend_dev_name(lib.ggml_backend_dev_get(i)).decode()
                    for i in range(before, lib.ggml_backend_dev_count())
                )
                _REGISTERED[worker.endpoint] = (worker, added)
            names.extend(_REGISTERED[worker.endpoint][1])
    return tuple(dict.fromkeys(names))


def registered() -> tuple[str, ...]:
    """The devices of every worker this process has joined (RPC0, ...), in order."""
    return tuple(name for _, names in _REGISTERED.values() for name in names)


# -- the worker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """What serve() serves: the endpoint clients give --rpc, the devices (lib.BackendDevice
    records), CPU threads and the tensor cache (None: off)."""

    endpoint: str
    devices: tuple[Any, ...]
    threads: int
    cache_dir: Path | None
    protocol: str = ".".join(map(str, PROTOCOL))


def serve(
    endpoint: Endpoint | str,
    devices: Sequence[str] = (),
    threads: int | None = None,
    cache_dir: Path | None = None,
    on_ready: Callable[[Serving], None] | None = None,
) -> None:
    """Serve this machine's devices (names as `localmix doctor` lists them; default: its GPUs,
    else its CPU) to RPC clients until interrupted (KeyboardInterrupt reaches the caller).
    cache_dir keeps tensors clients sent, by hash, so a client's next load sends them no more
    (llama.cpp's -c; tensors over 10 MiB). on_ready is called once it listens.
    UsageError for an address it cannot listen on, an unknown device, a port in use."""
    from localmix import disk, settings
    from localmix.llama import lib as ggml

    where = endpoint if isinstance(endpoint, Endpoint) else parse_endpoint(endpoint)
    try:
        address = _ipv4(where)
    except WorkerError as exc:
        raise UsageError(exc.message, hint="give --host an IPv4 address of this machine") from None
    chosen = _served_devices(ggml.devices(), devices)
    count = settings.check_threads(threads, "--threads") if threads else settings.default_threads()
    _check_free(address, where.port)
    load()
    from localmix.llama.backend import LOG

    LOG.verbose = True  # a worker's log is llama.cpp's server log: its errors, its cache saves
    if cache_dir is not None:
        disk.ensure_dir(cache_dir)
    lib = _lib()
    handles = (ctypes.c_void_p * len(chosen))(
        *(lib.ggml_backend_dev_by_name(d.name.encode()) for d in chosen)
    )
    start = _proc(
        "ggml_backend_rpc_start_server",
        ctypes.CFUNCTYPE(
            None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
        ),
    )  # fmt: skip
    listen = f"{address}:{where.port}"
    stopped = threading.Event()

    def run() -> None:
        try:  # blocks in accept() and each client (ctypes releases the GIL meanwhile)
            start(
                listen.encode(),
                str(cache_dir).encode() if cache_dir is not None else None,
                count, len(chosen), handles,
            )  # fmt: skip
        finally:
            stopped.set()

    # On a thread, so that Ctrl-C reaches Python: the C loop never returns to it. The thread is a
    # daemon: llama.cpp has no way to stop it, so it ends with the process.
    threading.Thread(target=run, name="llama.cpp RPC server", daemon=True).start()
    while not stopped.wait(0.05):
        if _listening(address, where.port):
            break
    if on_ready is not None and not stopped.is_set():
        on_ready(Serving(listen, chosen, count, cache_dir))
    try:
        while not stopped.wait(0.25):
            pass
    except KeyboardInterrupt:
        if cache_dir is not None:
            drop_unfinished(cache_dir)
        raise
    raise WorkerError(
        f"llama.cpp's RPC server stopped: it could not listen on {listen} (its message is above)"
    )


# A cache file still being written changes at every write; one last written this long ago is
# whole (llama.cpp writes a tensor in one go, at disk speed).
_SETTLED_S = 2.0


def drop_unfinished(cache_dir: Path, now: float | None = None) -> int:
    """Remove the tensor-cache files written in the last seconds, when the worker stops mid-load:
    llama.cpp writes them in place, names them by their content's hash and never checks it
    again, so a file cut short would be loaded as that tensor, silently wrong. Returns how many."""
    import time

    moment = time.time() if now is None else now
    removed = 0
    for path in cache_dir.iterdir() if cache_dir.is_dir() else ():
        with contextlib.suppress(OSError):
            if path.is_file() and moment - path.stat().st_mtime < _SETTLED_S:
                path.unlink()
                removed += 1
    return removed


def _listening(address: str, port: int) -> bool:
    """Whether something listens on the port now: the bind that llama.cpp's server does fails.
    (Connecting would take the server's one client slot.)"""
    try:
        _check_free(address, port)
    except UsageError:
        return True
    return False


def _check_free(address: str, port: int) -> None:
    """Refuse a port in use or an address not this machine's before llama.cpp's server tries
    (it only prints "Failed to create server socket")."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe_socket:
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as llama.cpp does
        try:
            probe_socket.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(
                    f"port {port} on {address} is in use (another worker, or another program)",
                    hint="stop it, or choose another --port",
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UsageError(
                    f"{address} is not an address of this machine",
                    hint="give --host one of its addresses (127.0.0.1 with a tunnel is safest)",
                ) from None
            raise UsageError(
                f"cannot listen on {address}:{port}: {exc.strerror or exc}",
                hint="ports below 1024 need privileges; choose another --port",
            ) from None


def _served_devices(available: Sequence[Any], names: Sequence[str]) -> tuple[Any, ...]:
    """The devices to serve: those named, else the GPUs, else the CPU (ggml-rpc-server's rule);
    never a remote (RPC) device."""
    local = [d for d in available if d.backend != "RPC"]
    if not names:
        gpus = [d for d in local if d.kind in ("gpu", "igpu")]
        return tuple(gpus or [d for d in local if d.kind == "cpu"][:1])
    by_name = {d.name.lower(): d for d in local}
    chosen = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):
        if name.lower() not in by_name:
            known = ", ".join(d.name for d in local)
            raise UsageError(f"no device {name!r} here to serve", hint=f"this machine has: {known}")
        chosen.append(by_name[name.lower()])
    if not chosen:
        raise UsageError("no device to serve", hint="name one with --device (e.g. CPU)")
    return tuple(chosen)
