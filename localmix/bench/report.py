"""Bench results as llama-bench prints them (md, csv, json, jsonl), as a rich table with a
roofline column, and as a plain-text bar chart of t/s over a swept setting."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.bench.result import BOOL_FIELDS, FIELDS, FLOAT_FIELDS, INT_FIELDS, BenchResult
from localmix.bench.roofline import Roofline

if TYPE_CHECKING:
    from rich.table import Table

    from localmix.bench.chat import ChatBenchResult
    from localmix.bench.history import Comparison
    from localmix.errors import EngineError

FORMATS = ("md", "csv", "json", "jsonl")


# --- llama-bench's printers -------------------------------------------------------------------


def _text_value(name: str, value: Any) -> str:
    """A field as llama-bench's get_values() spells it (std::to_string)."""
    if name in BOOL_FIELDS:
        return "1" if value else "0"
    if name in FLOAT_FIELDS:
        return f"{value:f}"
    return str(value)


def _json_value(name: str, value: Any) -> str:
    if name in BOOL_FIELDS:
        return "true" if value else "false"
    if name in INT_FIELDS or name in FLOAT_FIELDS:
        return _text_value(name, value)
    return '"' + _escape_json(_text_value(name, value)) + '"'


def _escape_json(text: str) -> str:
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) <= 0x1F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def _samples(result: BenchResult) -> tuple[str, str]:
    # std::ostream's default formatting of doubles: 6 significant digits.
    return (
        ", ".join(str(ns) for ns in result.samples_ns),
        ", ".join(f"{ts:g}" for ts in result.samples_ts),
    )


def to_csv(results: Sequence[BenchResult]) -> str:
    """llama-bench -o csv: a header of its field names, every value quoted."""
    lines = [",".join(FIELDS)]
    for result in results:
        values = result.fields()
        quoted = ('"' + _text_value(n, values[n]).replace('"', '""') + '"' for n in FIELDS)
        lines.append(",".join(quoted))
    return "\n".join(lines) + "\n"


def to_json(results: Sequence[BenchResult]) -> str:
    """llama-bench -o json: an array of objects, its fields then samples_ns and samples_ts."""
    objects = []
    for result in results:
        values = result.fields()
        ns, ts = _samples(result)
        body = "".join(f'    "{n}": {_json_value(n, values[n])},\n' for n in FIELDS)
        body += f'    "samples_ns": [ {ns} ],\n    "samples_ts": [ {ts} ]'
        body += _rpc_json(result, ",\n    ") + "\n"
        objects.append("  {\n" + body + "  }")
    return "[\n" + ",\n".join(objects) + "\n]\n"


def _rpc_json(result: BenchResult, separator: str) -> str:
    """The -rpc workers after llama-bench's own keys, only when there were some."""
    if not result.rpc_servers:
        return ""
    return f'{separator}"rpc_servers": "{_escape_json(result.rpc_servers)}"'


def to_jsonl(results: Sequence[BenchResult]) -> str:
    """llama-bench -o jsonl: one object per line."""
    lines = []
    for result in results:
        values = result.fields()
        ns, ts = _samples(result)
        body = "".join(f'"{n}": {_json_value(n, values[n])}, ' for n in FIELDS)
        rpc = _rpc_json(result, ", ")
        lines.append("{" + body + f'"samples_ns": [ {ns} ],"samples_ts": [ {ts} ]' + rpc + "}\n")
    return "".join(lines)


# Columns llama-bench's markdown printer shows when a setting is swept or not at its default.
_OPTIONAL = (
    ("n_gpu_layers", "ngl", 3, -1),
    ("n_threads", "threads", 7, None),
    ("n_batch", "n_batch", 7, 2048),
    ("n_ubatch", "n_ubatch", 8, 512),
    ("type_k", "type_k", 6, "f16"),
    ("type_v", "type_v", 6, "f16"),
    ("flash_attn", "fa", 3, "auto"),
    ("tensor_buft_overrides", "ot", -21, "none"),
    ("repack", "rpk", 3, True),
    ("rpc_servers", "rpc", -21, ""),  # the workers of -rpc (llama-bench shows only RPC)
)


def _columns(results: Sequence[BenchResult]) -> list[tuple[str, str, int]]:
    """(field, header, width) like llama-bench's markdown printer: negative width = left."""
    cpu = all(r.backends in ("CPU", "BLAS") or "CPU" in r.backends for r in results)
    columns = [("model", "model", -30), ("size", "size", 10), ("params", "params", 10)]
    columns.append(("backend", "backend", -10))
    for name, header, width, default in _OPTIONAL:
        values = {getattr(r, name) for r in results}
        shown = len(values) > 1 or (default is not None and values != {default})
        if name == "n_gpu_layers":
            shown = not cpu
        elif name == "n_threads":
            shown = cpu or len(values) > 1
        if shown:
            columns.append((name, header, width))
    columns += [("test", "test", 15), ("t/s", "t/s", 20)]
    return columns


def size_text(n_bytes: int) -> str:
    if n_bytes < 1024**3:
        return f"{n_bytes / 1024 / 1024:.2f} MiB"
    return f"{n_bytes / 1024**3:.2f} GiB"


def params_text(n_params: int) -> str:
    return f"{n_params / 1e6:.2f} M" if n_params < 1e9 else f"{n_params / 1e9:.2f} B"


def ts_text(avg: float, std: float) -> str:
    return f"{avg:.2f} ± {std:.2f}"


def result_ts_text(result: BenchResult) -> str:
    """t/s of a result, its error, or its t/s marked noisy when the repetitions spread wide."""
    if result.error:
        return "error"  # the reason is long: printed below the table
    return ts_text(result.avg_ts, result.stddev_ts) + (" noisy" if result.noisy else "")


def _cell(result: BenchResult, name: str) -> str:
    special: dict[str, Callable[[BenchResult], str]] = {
        "model": lambda r: r.model_type or Path(r.model_filename).name,
        "size": lambda r: size_text(r.model_size),
        "params": lambda r: params_text(r.model_n_params),
        "backend": lambda r: r.backends,
        "test": lambda r: r.test,
        "t/s": result_ts_text,
        "flash_attn": lambda r: str({"auto": -1, "off": 0, "on": 1}[r.flash_attn]),
    }
    if result.error and name in ("size", "params"):
        return "-"
    if name in special:
        return special[name](result)
    return _text_value(name, getattr(result, name))


def to_markdown(results: Sequence[BenchResult]) -> str:
    """llama-bench's default table: model, size, params, backend, [settings], test, t/s."""
    if not results:
        return ""
    columns = _columns(results)

    def row(cells: list[str]) -> str:
        parts = [
            f"{c:<{-w}}" if w < 0 else f"{c:>{w}}"
            for c, (_, _, w) in zip(cells, columns, strict=True)
        ]
        return "| " + " | ".join(parts) + " |"

    lines = [row([header for _, header, _ in columns])]
    lines.append(
        "| " + " | ".join("-" * (abs(w) - 1) + (":" if w > 0 else "-") for *_, w in columns) + " |"
    )
    lines += [row([_cell(r, name) for name, _, _ in columns]) for r in results]
    build = results[0]
    return "\n".join(lines) + f"\n\nbuild: {build.build_commit} ({build.build_number})\n"


def render(results: Sequence[BenchResult], output: str) -> str:
    """One of llama-bench's output formats, by name (md, csv, json, jsonl)."""
    printers = {"md": to_markdown, "csv": to_csv, "json": to_json, "jsonl": to_jsonl}
    # llama-bench has no error rows: its formats carry the measured ones (errors go to stderr)
    return printers[output](measured(results))


def measured(results: Sequence[BenchResult]) -> list[BenchResult]:
    """The results that have samples (not the combinations llama.cpp refused)."""
    return [r for r in results if not r.error]


def model_names(
    results: Sequence[BenchResult], names: Mapping[str, str] | None = None
) -> dict[str, str] | None:
    """A label per model file when more than one is measured (its store name, else its file
    name), so rows of different models tell apart; None when there is one."""
    files = list(dict.fromkeys(r.model_filename for r in results))
    if len(files) < 2:
        return None
    names = names or {}
    return {f: names.get(f) or Path(f).name for f in files}


# --- localmix's own views -----------------------------------------------------------------------


def table(
    results: Sequence[BenchResult],
    rooflines: Sequence[Roofline | None] | None = None,
    names: Mapping[str, str] | None = None,
) -> Table:
    """llama-bench's columns as a rich table, plus the roofline of each tg test; a name column
    (from `names`, model file -> store name) when more than one model file is measured."""
    from rich.table import Table

    columns = _columns(results) if results else []
    labels = model_names(results, names)
    grid = Table(box=None, header_style="bold", pad_edge=False)
    if labels:
        grid.add_column("name", justify="left", no_wrap=True)
    for name, header, width in columns:
        grid.add_column(header, justify="left" if width < 0 else "right", no_wrap=name != "model")
    show_roof = bool(rooflines) and any(rooflines or ())
    if show_roof:
        grid.add_column("roofline", justify="right")
    for index, result in enumerate(results):
        cells = [_cell(result, name) for name, _, _ in columns]
        if labels:
            cells.insert(0, labels[result.model_filename])
        if show_roof:
            roof = rooflines[index] if rooflines else None
            cells.append(f"{roof.share:.0%} of {roof.ceiling_ts:.1f} t/s" if roof else "")
        grid.add_row(*cells)
    return grid


def chat_table(results: Sequence[ChatBenchResult]) -> Table:
    """The chat benchmark: time to first token and generation t/s per model and setting."""
    from rich.table import Table

    grid = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("model", "threads", "ngl", "prompt", "gen", "TTFT ms", "prompt t/s", "t/s"):
        grid.add_column(header, justify="left" if header == "model" else "right")
    for r in results:
        grid.add_row(
            r.model_type,
            str(r.n_threads),
            str(r.n_gpu_layers),
            str(r.n_prompt),
            f"{sum(r.samples_n_gen) / max(1, len(r.samples_n_gen)):.0f}",
            f"{r.avg_ttft_s * 1e3:.1f} ± {r.stddev_ttft_s * 1e3:.1f}",
            f"{r.avg_prompt_ts:.2f}",
            ts_text(r.avg_ts, r.stddev_ts),
        )
    return grid


# Settings a plot can put on its axis, in the order it prefers them.
_AXES = (
    ("n_threads", "threads"),
    ("n_depth", "depth"),
    ("n_batch", "n_batch"),
    ("n_ubatch", "n_ubatch"),
    ("n_gpu_layers", "ngl"),
    ("type_k", "type_k"),
    ("type_v", "type_v"),
    ("flash_attn", "fa"),
    ("n_prompt", "n_prompt"),
    ("n_gen", "n_gen"),
)
_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(value: float, scale: float, width: int) -> str:
    """A horizontal bar of `value` on a `scale` that fills `width` cells, in eighth blocks."""
    cells = 0 if scale <= 0 else max(0.0, min(1.0, value / scale)) * width
    full, part = int(cells), int((cells - int(cells)) * 8)
    return ("█" * full + (_EIGHTHS[part] if part and full < width else "")).ljust(width)


def plot(
    results: Sequence[BenchResult], width: int = 40, names: Mapping[str, str] | None = None
) -> str:
    """t/s over the swept setting as plain-text bar charts, one per model and test; titles name
    the model (`names`: file -> store name) when more than one is measured."""
    results = measured(results)
    if not results:
        return ""
    labels = model_names(results, names) or {}
    axis = next((f for f, _ in _AXES if len({getattr(r, f) for r in results}) > 1), None)
    label = dict(_AXES).get(axis or "", "test")
    groups: dict[tuple[object, ...], list[BenchResult]] = {}
    for r in results:
        others = tuple(getattr(r, f) for f, _ in _AXES if f != axis)
        kind = (r.n_prompt > 0, r.n_gen > 0)
        key = (r.model_filename, r.model_type, kind, *others) if axis else (r.model_filename,)
        groups.setdefault(key, []).append(r)
    charts = []
    for members in groups.values():
        first = members[0]
        ticks = [f"{label}={getattr(r, axis)}" if axis else r.test for r in members]
        model = " · ".join(filter(None, (labels.get(first.model_filename), first.model_type)))
        title = model + (f" · {first.test} · t/s by {label}" if axis else " · t/s")
        if axis in ("n_prompt", "n_gen"):
            title = f"{model} · t/s by {label}"
            ticks = [r.test for r in members]
        scale = max(r.avg_ts for r in members)
        pad = max(len(n) for n in ticks)
        lines = [title]
        for name, r in zip(ticks, members, strict=True):
            value = result_ts_text(r)
            lines.append(f"  {name:>{pad}} │{bar(r.avg_ts, scale, width)}│ {value}")
        charts.append("\n".join(lines))
    return "\n\n".join(charts) + "\n"


def compare_table(
    comparisons: Sequence[Comparison], names: Mapping[str, str] | None = None
) -> Table:
    """Each result against its history: baseline t/s, delta %, the noise threshold, a verdict;
    the model's name (`names`: file -> store name) when more than one is measured."""
    from rich.table import Table

    labels = model_names([c.result for c in comparisons], names) or {}

    grid = Table(box=None, header_style="bold", pad_edge=False)
    for header in ("model", "threads", "test", "t/s", "before", "delta", "noise", "", "changed"):
        grid.add_column(header, justify="left" if header in ("model", "", "changed") else "right")
    for c in comparisons:
        r = c.result
        before = ts_text(c.baseline_ts, c.baseline_stddev_ts) if c.n_baseline else "-"
        delta = f"{c.delta_pct:+.1f}%" if c.n_baseline else "-"
        noise = f"±{c.threshold_pct:.1f}%" if c.n_baseline else "-"
        verdict = c.verdict.upper() if c.flagged else c.verdict
        grid.add_row(
            labels.get(r.model_filename, r.model_type), str(r.n_threads), r.test,
            result_ts_text(r),
            before, delta, noise, verdict, ", ".join(c.changed),
        )  # fmt: skip
    return grid


def refusals(results: Sequence[BenchResult]) -> list[str]:
    """One line per reason llama.cpp refused a combination, naming the settings it refused."""
    failed = [r for r in results if r.error]
    lines = []
    for reason in dict.fromkeys(r.error for r in failed):
        which = [r for r in failed if r.error == reason]
        settings = {f"fa={r.flash_attn} ctk={r.type_k} ctv={r.type_v}" for r in which}
        lines.append(f"{', '.join(sorted(settings))}: {reason}")
    return lines


def noisy_note(results: Sequence[BenchResult]) -> str | None:
    """A note when some results spread too widely between repetitions to trust."""
    from localmix.bench.result import NOISY_PCT

    noisy = sum(r.noisy for r in results)
    if not noisy:
        return None
    return (
        f"{noisy} result(s) vary by more than {NOISY_PCT:g}% between repetitions; "
        "more -r, fewer threads than cores or a quieter machine steadies them"
    )


def refused(results: Sequence[BenchResult]) -> EngineError | None:
    """The error the run ends with when llama.cpp refused some combination (None: it ran all)."""
    from localmix.errors import EngineError

    failed = [r for r in results if r.error]
    if not failed:
        return None
    v_quant = any(r.type_v not in ("f16", "f32", "bf16") and r.flash_attn != "on" for r in failed)
    return EngineError(
        f"llama.cpp refused {len(failed)} of {len(results)} tests; the others ran",
        hint="a quantized V cache (-ctv) needs flash attention (-fa on)"
        if v_quant
        else "the reason is printed above",
    )
