"""pull / import: models from the Hub or from disk into the store, with rich progress on stderr."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from localmix.cli.options import ChatFormatOpt, ImatrixOpt, JsonOpt

if TYPE_CHECKING:
    from rich.progress import Progress

    from localmix.models.store import Manifest

NameArg = Annotated[
    str,
    typer.Argument(
        help="NAME[:QUANT]: a catalog name (mistral, mixtral:q5_k_m), hf.co/ORG/REPO[:QUANT] "
        "for a repo of GGUF files, or ORG/REPO for a checkpoint to convert and quantize.",
        metavar="NAME[:QUANT]",
    ),
]


class _PullView:
    """Renders a pull's progress events: byte bars for downloads and sha256 checks, step bars
    for convert and quantize; one rich display at a time, switched as the stages change."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._bar: Progress | None = None
        self._kind = ""
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> _PullView:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _display(self, kind: str) -> Progress:
        from localmix.cli import render

        if self._bar is None or self._kind != kind:
            self._stack.close()
            self._stack = contextlib.ExitStack()
            opener = render.progress if kind == "bytes" else render.steps
            self._bar = self._stack.enter_context(opener())
            self._kind = kind
            self._tasks.clear()
        return self._bar

    def _task(self, kind: str, key: str, description: str, total: float | None) -> Any:
        bar = self._display(kind)
        if key not in self._tasks:
            fields = {"detail": ""} if kind == "steps" else {}
            self._tasks[key] = bar.add_task(description, total=total, **fields)
        return self._tasks[key]

    def _close(self) -> None:
        """End the current display: its bars stay on screen as they finished."""
        self._stack.close()
        self._bar = None

    def _say(self, text: str) -> None:
        """A line above the live bars (or alone when none is shown)."""
        from localmix.cli.render import err_console

        (self._bar.console if self._bar else err_console()).print(text, highlight=False)

    def __call__(self, event: object) -> None:
        from rich.markup import escape

        from localmix.cli.render import human_size
        from localmix.models.pull import Stage
        from localmix.progress import Progress as Report

        if isinstance(event, Stage):
            if event.name in ("register", "done"):
                self._close()  # registering comes after the bars it follows, not above them
            if event.name in ("resolve", "register", "wait"):
                label = {"resolve": "resolving", "register": "registering"}.get(
                    event.name, "waiting:"
                )
                self._say(f"[dim]{label} {escape(event.detail)}[/]")
            return
        if not isinstance(event, Report) or event.stage not in ("download", "verify", "retry"):
            self._step(event)
        elif event.stage == "retry":
            at = human_size(event.done)
            self._say(
                f"[yellow]{escape(event.subject)}: {escape(event.detail)} at {at}; resuming[/]"
            )
        elif event.stage == "download":
            task = self._task("bytes", "get:" + event.subject, f"↓ {event.subject}", event.total)
            self._display("bytes").update(task, completed=event.done, total=event.total)
        else:  # verify
            task = self._task(
                "bytes", "sha:" + event.subject, f"sha256 {event.subject}", event.total
            )
            self._display("bytes").update(task, completed=event.done)

    def _step(self, event: object) -> None:
        """Convert and quantize events: (index, total, tensor name) by whatever names they use."""
        total = getattr(event, "total", None)
        index = next(
            (getattr(event, a) for a in ("index", "done", "current", "chunk") if hasattr(event, a)),
            None,
        )
        if total is None or index is None:
            return
        kind = type(event).__name__.lower()
        stage = next((s for s in ("quant", "imatrix") if kind.startswith(s)), "convert")
        label = {"quant": "quantizing", "imatrix": "calibrating", "convert": "converting"}[stage]
        task = self._task("steps", stage, label, total)
        names = [a for a in ("tensor", "tensor_name", "name") if hasattr(event, a)]
        detail = str(getattr(event, names[0])) if names else ""
        self._display("steps").update(task, completed=index, total=total, detail=detail)


def _done(manifest: Manifest, verb: str) -> None:
    from localmix.cli import render

    where = "" if manifest.owned else f" (in place: {manifest.path})"
    render.console().print(
        f"{verb} [bold]{manifest.ref}[/] — {render.human_size(manifest.size)}{where}",
        highlight=False,
    )
    render.err_console().print(f"[dim]try: localmix chat {manifest.name}[/]", highlight=False)


def pull_command(
    name: NameArg,
    quant: Annotated[
        Optional[str],  # noqa: UP045 - typer needs Optional at runtime on 3.10
        typer.Option("--quant", "-q", help="Quantization to fetch or make (default Q4_K_M)."),
    ] = None,
    revision: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--revision", help="Branch, tag or commit of the Hub repo (default main)."),
    ] = None,
    from_source: Annotated[
        bool,
        typer.Option(
            "--from-source", help="Convert the original checkpoint even where a GGUF exists."
        ),
    ] = False,
    keep_source: Annotated[
        bool,
        typer.Option(
            "--keep-source",
            help="Keep the downloaded checkpoint and the F16 GGUF (registered as NAME:F16).",
        ),
    ] = False,
    offline: Annotated[
        bool, typer.Option("--offline", help="Use only the local Hugging Face cache.")
    ] = False,
    imatrix: ImatrixOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a model from the Hugging Face Hub (resumable, sha256-verified) into the store."""
    from localmix.cli import render
    from localmix.models import pull

    with _PullView() as view:
        manifest = pull.pull(
            name,
            quant=quant,
            revision=revision,
            from_source=from_source,
            keep_source=keep_source,
            offline=offline,
            imatrix=imatrix,
            progress=view,
        )
    if json_out:
        render.print_json(manifest.to_json())
        return
    _done(manifest, "pulled")


def import_command(
    path: Annotated[Path, typer.Argument(help="A .gguf file (the first shard of a split one).")],
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--name", "-n", help="Store name (default: from the file name)."),
    ] = None,
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy the file into the store instead of referencing it.")
    ] = False,
    chat_format: ChatFormatOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a GGUF file already on disk (validated first); chats remember its --format."""
    from localmix.cli import render
    from localmix.models import pull

    manifest = pull.import_gguf(path, name=name, copy=copy, chat_format=chat_format)
    if json_out:
        render.print_json(manifest.to_json())
        return
    _done(manifest, "imported")


def register(app: typer.Typer) -> None:
    app.command("pull")(pull_command)
    app.command("import")(import_command)
