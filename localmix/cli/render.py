"""The one output layer: rich consoles, sizes, tables, progress and --json output."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.sizes import human_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

_consoles: dict[str, Console] = {}


def _make(stderr: bool) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def console() -> Console:
    """Results go to stdout."""
    if "out" not in _consoles:
        _consoles["out"] = _make(stderr=False)
    return _consoles["out"]


def err_console() -> Console:
    """Progress, notices and errors go to stderr, so stdout stays clean for pipes."""
    if "err" not in _consoles:
        _consoles["err"] = _make(stderr=True)
    return _consoles["err"]


def human_count(n: float) -> str:
    """7241732096 -> '7.24B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    return value


def print_json(value: Any) -> None:
    """Records, lists and dicts as JSON on stdout (no colors, so pipes get plain JSON)."""
    sys.stdout.write(json.dumps(_plain(value), indent=2, default=str) + "\n")
    sys.stdout.flush()


def _progress_options(transient: bool) -> dict[str, Any]:
    # Off a terminal (pipes, CI logs) a live bar only leaves residue: no bar, one line per task.
    return {
        "console": err_console(),
        "transient": transient,
        "disable": not err_console().is_terminal,
    }


def _progress_type() -> type[Progress]:
    from rich.progress import Progress

    class LoggedProgress(Progress):
        """A rich Progress that, when disabled off a terminal, still logs each task it starts."""

        def add_task(self, description: str, *args: Any, **kwargs: Any) -> Any:
            if self.disable:
                self.console.print(description, highlight=False, markup=False)
            return super().add_task(description, *args, **kwargs)

    return LoggedProgress


def _hidden_on_error(bar: Progress) -> Iterator[Progress]:
    """Yield the bar; on an error, hide it so the `error:` line stands alone."""
    try:
        yield bar
    except BaseException:
        bar.live.transient = True
        raise


def _speed_column() -> Any:
    """Transfer speed in binary units (rich's own column prints decimal MB/s)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class SpeedColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            # A finished task shows its average: rich's sampled speed drops the first sample, so
            # a file hashed in two 8 MiB blocks would read as the speed of the last block alone.
            elapsed = task.finished_time if task.finished else None
            speed = task.completed / elapsed if elapsed else task.speed
            text = f"{human_size(speed)}/s" if speed else "?"
            return Text(text, style="progress.data.speed")

    return SpeedColumn()


@contextmanager
def progress(transient: bool = False) -> Iterator[Progress]:
    """A rich progress display on stderr: description, bar, counts, speed, ETA."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),  # MiB / GiB, as every other size localmix prints
        _speed_column(),
        TimeRemainingColumn(),
    )
    with _progress_type()(*columns, **_progress_options(transient)) as bar:
        yield from _hidden_on_error(bar)


@contextmanager
def steps(transient: bool = False) -> Iterator[Progress]:
    """A rich progress display for counted steps (tensors, tests), not bytes."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}", style="dim"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with _progress_type()(*columns, **_progress_options(transient)) as bar:
        yield from _hidden_on_error(bar)


def models_table(models: list[Any]) -> Any:
    """The store as a table: name, quant, size, architecture, context, source, age."""
    import time

    from rich.table import Table

    table = Table(box=None, header_style="bold")
    widest = max((len(m.name) for m in models), default=4)
    for column in ("NAME", "QUANT", "SIZE", "ARCH", "PARAMS", "CONTEXT", "SOURCE", "CREATED"):
        table.add_column(
            column,
            justify="right" if column in ("SIZE", "PARAMS") else "left",
            no_wrap=column != "SOURCE",
            overflow="fold" if column == "SOURCE" else "ellipsis",
            # a name is what the user types next: never cut it
            min_width=widest if column == "NAME" else None,
        )
    for m in models:
        age = max(0.0, time.time() - m.created)
        when = (
            f"{int(age // 86400)}d ago"
            if age >= 86400
            else f"{int(age // 3600)}h ago"
            if age >= 3600
            else f"{int(age // 60)}m ago"
        )
        table.add_row(
            m.name,
            m.quant,
            human_size(m.size),
            m.architecture,
            human_count(m.parameters),
            str(m.context_length),
            _short_commit(m.source) + ("" if m.owned else " (ref)"),
            when,
        )
    return table


def print_table(table: Any) -> None:
    """A table on stdout; a pipe or a file gets whole rows at the table's natural width, not
    rows squeezed to 80 columns."""
    from rich.console import Console
    from rich.measure import Measurement

    out = console()
    if not out.is_terminal:
        wide = out.options.update_width(1000)
        width = max(out.width, Measurement.get(out, wide, table).maximum)
        out = Console(file=out.file, width=width, highlight=False, color_system=None)
    out.print(table)


def _short_commit(source: str) -> str:
    """`hf:org/repo@<40 hex>` -> `hf:org/repo@<12 hex>`, as git abbreviates (--json keeps all)."""
    import re

    return re.sub(r"@([0-9a-f]{12})[0-9a-f]{28}$", r"@\1", source)


def catalog_table(specs: list[Any]) -> Any:
    """`list --available`: each model's size at Q4_K_M, what it is for, its format and source."""
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    widest = max((len(s.name) for s in specs), default=4)
    table.add_column("NAME", no_wrap=True, min_width=widest)
    for column in ("PARAMS", "Q4_K_M", "CONTEXT"):
        table.add_column(column, no_wrap=True, justify="right", min_width=len(column))
    table.add_column("FORMAT", no_wrap=True, min_width=9)
    table.add_column("FOR", min_width=12, max_width=44)
    # A repo id is copied whole: FOR wraps at words first; FROM folds only on narrow terminals.
    table.add_column("FROM", overflow="fold", min_width=16)
    for s in sorted(specs, key=lambda s: s.name):
        # the catalog keeps published GB (10^9 bytes); shown in GiB like every size localmix prints
        size = human_size(s.size_q4_k_m * 1e9) if s.size_q4_k_m else "-"
        purpose = s.purpose or s.description
        skills = [word for word, has in (("thinks", s.reasoning), ("tools", s.calls_tools)) if has]
        if skills:
            purpose += f" ({', '.join(skills)})"
        if s.gated:
            purpose += " · gated (accept its license on the Hub)"
        table.add_row(
            s.name,
            s.parameters,
            size,
            f"{s.context_length // 1024}k",
            s.chat_format,
            purpose,
            "built here" if s.synthetic else s.gguf_repo or s.source,
        )
    return table


def show_panel(manifest: Any, info: Any) -> Any:
    """`localmix show`: the model's facts and its tensor-type histogram."""
    from rich.console import Group
    from rich.table import Table

    facts = Table(box=None, show_header=False)
    facts.add_column(style="bold")
    facts.add_column()
    rows = [
        ("name", manifest.ref),
        ("architecture", f"{info.architecture} ({manifest.architecture})"),
        ("parameters", f"{human_count(info.n_params)} ({info.n_params:,})"),
        ("layers", str(info.block_count)),
        ("experts", f"{info.expert_count} (top-{info.key('expert_used_count', 0)})")
        if info.expert_count
        else ("experts", "dense"),
        ("quant", info.quant),
        ("file size", f"{human_size(info.file_size)} ({info.file_size:,} bytes)"),
        ("context", f"{info.context_length} tokens"),
        ("chat format", manifest.chat_format or "from the GGUF's template"),
        ("vision", manifest.mmproj or "none (text only; add one with import --mmproj)"),
        ("source", manifest.source),
        ("file", manifest.path + ("" if manifest.owned else "  (not owned: rm keeps it)")),
        ("sha256", manifest.sha256),
    ]
    for key, value in rows:
        facts.add_row(key, value)
    histogram = Table(title="tensor types", box=None, header_style="bold", title_justify="left")
    histogram.add_column("TYPE")
    histogram.add_column("TENSORS", justify="right")
    histogram.add_column("BYTES", justify="right")
    per_type: dict[str, int] = {}
    for tensor in info.tensors:
        per_type[tensor.type_name] = per_type.get(tensor.type_name, 0) + tensor.n_bytes
    for type_name, count in info.type_histogram().items():
        histogram.add_row(type_name, str(count), human_size(per_type[type_name]))
    return Group(facts, "", histogram)


def usage_table(usage: Any) -> Any:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("MODEL")
    table.add_column("SIZE", justify="right")
    table.add_column("")
    for ref, size, owned in usage.models:
        table.add_row(ref, human_size(size), "" if owned else "referenced (HF cache or elsewhere)")
    table.add_section()
    table.add_row("owned by localmix", human_size(usage.owned_bytes), "")
    table.add_row("referenced", human_size(usage.referenced_bytes), "")
    table.add_row("leftovers in tmp/", human_size(usage.tmp_bytes), "")
    table.add_row("free on disk", human_size(usage.free_bytes), "")
    return table


def stats_line(stats: Any) -> str:
    """`31 tok prompt 412 t/s · 128 tok 187.3 t/s · first token 0.08 s` for a reply's Stats; a
    reply interrupted early shows only the numbers it has (no made-up 0 t/s)."""
    prompt = f"{stats.prompt_tokens} tok prompt"
    if stats.prompt_tps > 0:
        prompt += f" {stats.prompt_tps:.0f} t/s"
    if getattr(stats, "cached_tokens", 0):
        prompt += f" ({stats.cached_tokens} cached)"
    if getattr(stats, "image_s", 0):
        prompt += f" (images {stats.image_s:.2f} s)"
    if stats.generated_tokens == 0 and stats.finish_reason == "interrupted":
        return f"{prompt} in {stats.prompt_s:.2f} s · before the first token"
    reply = f"{stats.generated_tokens} tok"
    if stats.gen_tps > 0:
        reply += f" {stats.gen_tps:.1f} t/s"
    return " · ".join((prompt, reply, f"first token {stats.ttft_s:.2f} s"))


def waiting(name: str) -> Callable[[], None]:
    """What to say (on stderr) when a command has to wait for another one's lock on a model."""

    def say() -> None:
        err_console().print(
            f"waiting: another localmix process is working on {name}…", style="dim", highlight=False
        )

    return say
