"""serve: the OpenAI- and Ollama-compatible HTTP API; ps: what a running server has loaded."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from localmix.cli.options import JsonOpt, RepackOpt, RpcOpt, ThreadsOpt, rpc_endpoints
from localmix.cli.plan import NglOpt

if TYPE_CHECKING:
    from localmix.serve.client import Running

# serve.server's defaults, repeated so --help needs no import
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434

ModelsArg = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Argument(
        help="Models to load at start (store names or .gguf paths); any store model loads on "
        "first use.",
        show_default=False,
    ),
]
HostOpt = Annotated[
    str,
    typer.Option("--host", help="Address to listen on; anything but loopback is reachable by "
                 "others, and needs an API key."),
]  # fmt: skip
Names = Optional[list[str]]  # noqa: UP045
ApiKeyOpt = Annotated[
    Names,
    typer.Option("--api-key", metavar="KEY", help="Accept this key (Authorization: Bearer KEY); "
                 "repeatable. Safer: LOCALMIX_API_KEY (comma list), unseen by other users."),
]  # fmt: skip
OriginOpt = Annotated[
    Names,
    typer.Option("--allow-origin", metavar="ORIGIN", help="Let web pages from this origin call "
                 "(http://host:port, or *); repeatable; also LOCALMIX_ORIGINS. Local pages may "
                 "by default."),
]  # fmt: skip
AllowHostOpt = Annotated[
    Names,
    typer.Option("--allow-host", metavar="NAME", help="Answer to this Host name too (*.example.com "
                 "for a domain); repeatable; also LOCALMIX_HOSTS."),
]  # fmt: skip
UnsafeOpt = Annotated[
    bool,
    typer.Option("--unsafe-no-auth", help="Serve beyond loopback without an API key: anyone who "
                 "reaches this machine can use the models."),
]  # fmt: skip
PortOpt = Annotated[
    int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on (0: any free).")
]
ParallelOpt = Annotated[
    int,
    typer.Option("--parallel", "-np", min=1, max=256, help="Requests decoded together, per model."),
]
QueueOpt = Annotated[
    int,
    typer.Option("--queue", min=0, help="Requests that may wait for a model; more get 503."),
]
KeepAliveOpt = Annotated[
    str,
    typer.Option(
        "--keep-alive",
        help="How long a model stays loaded after its last request (5m, 1h, 0; -1: forever).",
    ),
]
MaxModelsOpt = Annotated[
    int, typer.Option("--max-models", min=1, help="Most models loaded at once.")
]
MemoryOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--memory",
        metavar="SIZE",
        help="Memory the loaded models may hold, files and KV caches (default: 90% of RAM).",
    ),
]
CtxOpt = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--ctx", "-c", min=0,
        help="Context per request in tokens (0: the model's own; default: 4096 or less).",
    ),
]  # fmt: skip
UrlOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--url", help="The server's address (default: http://127.0.0.1:11434)."),
]


def serve_command(
    model: ModelsArg = None,
    host: HostOpt = DEFAULT_HOST,
    port: PortOpt = DEFAULT_PORT,
    parallel: ParallelOpt = 4,
    queue: QueueOpt = 64,
    keep_alive: KeepAliveOpt = "5m",
    max_models: MaxModelsOpt = 3,
    memory: MemoryOpt = None,
    ctx: CtxOpt = None,
    threads: ThreadsOpt = None,
    n_gpu_layers: NglOpt = None,
    repack: RepackOpt = None,
    rpc: RpcOpt = None,
    api_key: ApiKeyOpt = None,
    allow_origin: OriginOpt = None,
    allow_host: AllowHostOpt = None,
    unsafe_no_auth: UnsafeOpt = False,
) -> None:
    """Serve models over HTTP: OpenAI's API under /v1, Ollama's under /api.

    Listens on 127.0.0.1 unless --host says otherwise. Stop it with Ctrl-C."""
    from localmix import load
    from localmix.cli.render import err_console
    from localmix.serve import guard
    from localmix.serve.models import ServeOptions
    from localmix.serve.ollama import keep_alive_seconds
    from localmix.serve.server import Server, is_loopback

    workers = rpc_endpoints(rpc)
    out = err_console()
    if workers and max_models > 1:
        # a worker serves one client at a time, and each loaded model is a client of its own
        out.print(
            f"note: with --rpc one model is loaded at a time (not {max_models}): an RPC worker "
            "serves one client, and each model runs in its own process",
            style="dim", markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
        max_models = 1
    if workers:
        from localmix.llama import rpc as rpc_client

        for endpoint in workers:  # a bad one is an error now, not at the first request
            rpc_client.probe(endpoint)
    seconds = keep_alive_seconds(keep_alive)  # a number or None (forever): the text is given
    budget = None
    if memory is not None:
        from localmix.sizes import parse_size

        budget = parse_size(memory)
    options = ServeOptions(
        parallel=parallel, queue=queue, keep_alive=seconds,  # type: ignore[arg-type]
        max_models=max_models, memory_budget=budget,
    )  # fmt: skip
    settings = load.LoadSettings(
        ctx=ctx, threads=threads, n_gpu_layers=n_gpu_layers, repack=repack, rpc=workers
    )
    policy = guard.policy(
        loopback=is_loopback(host), api_keys=api_key or (), origins=allow_origin or (),
        hosts=allow_host or (), unsafe_no_auth=unsafe_no_auth,
    )  # fmt: skip
    named = [(name, load.locate(name)) for name in model or []]  # unknown names: said first
    if not is_loopback(host) and not policy.keys:
        out.print(
            f"warning: serving on {host} with no API key (--unsafe-no-auth): anyone who can "
            "reach this machine can use these models",
            style="yellow", markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
    server = Server(settings, options, named=named, host=host, port=port, policy=policy)

    def ready() -> None:
        loaded = f" ({', '.join(name for name, _ in named)} loaded)" if named else ""
        out.print(
            f"localmix serve: listening on {server.url}{loaded}; OpenAI API at {server.url}/v1, "
            f"Ollama API at {server.url}/api",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip

    with contextlib.suppress(KeyboardInterrupt):  # uvicorn stopped, then passed the signal on
        server.run(on_ready=ready)
    out.print("localmix serve: stopped", style="dim", markup=False, highlight=False)


def ps_command(url: UrlOpt = None, json_out: JsonOpt = False) -> None:
    """List the models a running `localmix serve` has loaded."""
    from localmix.cli import render
    from localmix.serve.client import running

    found = running(url or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    if json_out:
        render.print_json(found)
        return
    if not found:
        render.err_console().print("no models loaded", style="dim")
        return
    render.print_table(_ps_table(found))


def _ps_table(models: list[Running]) -> Any:
    from rich.table import Table

    from localmix.cli.render import human_size

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "SIZE", "PROCESSOR", "CONTEXT", "PARALLEL", "REQUESTS", "UNTIL"):
        table.add_column(column, justify="right" if column in ("SIZE", "CONTEXT") else "left")
    for m in models:
        gpu = round(100 * m.size_vram / m.size) if m.size else 0
        processor = "100% CPU" if gpu == 0 else "100% GPU" if gpu >= 100 else f"{gpu}% GPU"
        table.add_row(
            m.name, human_size(m.size), processor, str(m.context_length), str(m.parallel),
            str(m.requests), _until(m.expires_at),
        )  # fmt: skip
    return table


def _until(expires_at: str) -> str:
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    except ValueError:
        return expires_at
    left = (when - datetime.now(timezone.utc)).total_seconds()
    if left > 100 * 365 * 86400:
        return "forever"
    if left < 60:
        return f"{max(0, round(left))} seconds"
    minutes = round(left / 60)
    return f"{minutes} minute{'s' * (minutes != 1)}" if minutes < 120 else f"{minutes // 60} hours"


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("ps")(ps_command)
