"""worker: this machine's devices served to other localmix processes over llama.cpp's RPC."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from localmix.cli.options import ThreadsOpt

if TYPE_CHECKING:
    from localmix.llama.rpc import Serving

# llama/rpc.py's defaults, repeated so --help needs no import
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052

HostOpt = Annotated[
    str,
    typer.Option("--host", help="IPv4 address to listen on; anything but loopback lets anyone "
                 "who reaches it run code here (the protocol has no authentication)."),
]  # fmt: skip
PortOpt = Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="Port to listen on.")]
DeviceOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option(
        "--device", "-d", metavar="NAMES",
        help="Devices to serve, comma-separated, as `localmix doctor` names them (default: the "
        "GPUs, else the CPU).",
    ),
]  # fmt: skip
CacheOpt = Annotated[
    bool,
    typer.Option("--cache/--no-cache", help="Keep the tensors clients send (over 10 MiB each) "
                 "so their next load sends them no more."),
]  # fmt: skip


def worker_command(
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    cache: CacheOpt = True,
) -> None:
    """Serve this machine's devices to another localmix's --rpc, over llama.cpp's RPC protocol.

    One client at a time. Listens on 127.0.0.1 unless --host says otherwise: reach it from
    another machine through an SSH tunnel. Stop it with Ctrl-C."""
    from localmix import settings
    from localmix.cli.render import err_console
    from localmix.llama import rpc

    endpoint = rpc.parse_endpoint(f"{host}:{port}")
    out = err_console()
    if not _loopback(endpoint.host):
        out.print(
            f"warning: listening on {host}: llama.cpp's RPC protocol has no authentication and "
            "no encryption, and has had remote-code-execution bugs; anyone who reaches this "
            f"port can run code on this machine. Safer: keep --host {DEFAULT_HOST} and tunnel "
            f"from the client, `ssh -N -L {port}:127.0.0.1:{port} USER@THIS-HOST`, then "
            f"`--rpc 127.0.0.1:{port}` there.",
            style="yellow", markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    names = [n for n in (device or "").split(",") if n.strip()]
    cache_dir = settings.rpc_tensor_cache_dir() if cache else None
    # Ctrl-C: KeyboardInterrupt, which app.main turns into "interrupted" and exit status 130
    rpc.serve(endpoint, names, threads, cache_dir, on_ready=_ready)


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def _ready(serving: Serving) -> None:
    from localmix.cli.render import err_console, human_size

    out = err_console()
    say = {"markup": False, "highlight": False, "soft_wrap": True}
    out.print(
        f"localmix worker: serving at {serving.endpoint} (llama.cpp RPC protocol "
        f"{serving.protocol}, {serving.threads} CPU threads)",
        **say,
    )
    for d in serving.devices:
        memory = f"{human_size(d.free_bytes)} free of {human_size(d.total_bytes)}"
        out.print(f"  {d.name}: {d.description}, {memory}", **say)
    cache = str(serving.cache_dir) if serving.cache_dir else "off"
    out.print(f"  tensor cache: {cache}", **say)
    out.print(
        f"clients use it with --rpc {serving.endpoint}, one at a time; Ctrl-C stops it",
        style="dim", **say,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("worker")(worker_command)
