"""Evaluations as tables and plain-text bar charts (bench.report's bars), for the CLI to print."""

from __future__ import annotations

from typing import TYPE_CHECKING

from localmix.bench.report import bar, size_text

if TYPE_CHECKING:
    from rich.table import Table

    from localmix.quality.evaluate import Evaluation
    from localmix.quality.quants import QuantRow, QuantTable
    from localmix.quality.stats import Scores


def heading(evaluation: Evaluation) -> str:
    """One line: what was compared with what, over which text and chunks."""
    return (
        f"{evaluation.model} against {evaluation.reference} · {evaluation.text}, "
        f"{evaluation.n_chunks} chunks of {evaluation.n_ctx} tokens, "
        f"{evaluation.scores.n_tokens} scored"
    )


def _pm(value: float, unc: float, digits: int) -> str:
    return f"{value:.{digits}f} ± {unc:.{digits}f}"


def _pct(value: float, unc: float | None = None, digits: int = 3) -> str:
    if unc is None:
        return f"{100 * value:.{digits}f} %"
    return f"{100 * value:.{digits}f} ± {100 * unc:.{digits}f} %"


def scores_rows(scores: Scores) -> list[tuple[str, str]]:
    """(what, value) lines in llama-perplexity's terms and precision."""
    s = scores
    return [
        ("PPL (model)", _pm(s.ppl, s.ppl_unc, 4)),
        ("PPL (reference)", _pm(s.ppl_ref, s.ppl_ref_unc, 4)),
        ("PPL ratio", _pm(s.ppl_ratio, s.ppl_ratio_unc, 6) + f"  ({s.ppl_ratio - 1:+.2%})"),
        ("mean KLD", _pm(s.kld_mean, s.kld_unc, 6)),
        ("median KLD", f"{s.kld_median:.6f}"),
        ("99% KLD", f"{s.kld_p99:.6f}"),
        ("99.9% KLD", f"{s.kld_p999:.6f}"),
        ("max KLD", f"{s.kld_max:.6f}"),
        ("same top token", _pct(s.same_top, s.same_top_unc)),
        ("RMS Δp", _pct(s.dp_rms, s.dp_rms_unc)),
    ]


def scores_table(evaluation: Evaluation) -> Table:
    """One evaluation: a row per number."""
    from rich.table import Table

    grid = Table(box=None, show_header=False, pad_edge=False)
    grid.add_column(style="bold")
    grid.add_column(justify="right")
    for what, value in scores_rows(evaluation.scores):
        grid.add_row(what, value)
    return grid


def table_heading(table: QuantTable) -> str:
    return (
        f"{table.model}: every quant against {table.reference} · {table.text}, "
        f"{table.n_chunks} chunks of {table.n_ctx} tokens, {table.n_tokens} scored"
    )


def _quant_cells(row: QuantRow) -> list[str]:
    s = row.scores
    speed = f"{row.gen_tps:.2f} ± {row.gen_tps_std:.2f}" if row.gen_tps else "-"
    common = [row.quant, size_text(row.size_bytes), f"{row.bits_per_weight:.2f}"]
    if s is None:
        return [*common, "reference", "", "", "", "", speed]
    return [
        *common,
        f"{s.ppl_ratio:.4f} ({s.ppl_ratio - 1:+.2%})",
        f"{s.kld_mean:.6f}",
        f"{s.kld_p99:.6f}",
        _pct(s.same_top, digits=2),
        _pct(s.dp_rms, digits=3),
        speed,
    ]


def quants_table(table: QuantTable) -> Table:
    """A row per file: size, bits per weight, PPL ratio, KLD mean and 99%, same top, RMS Δp,
    generation t/s; the quants made for this table are marked."""
    from rich.table import Table

    grid = Table(box=None, header_style="bold", pad_edge=False)
    headers = ("quant", "size", "bpw", "PPL ratio", "mean KLD", "99% KLD", "same top",
               "RMS Δp", "tg t/s", "")  # fmt: skip
    for header in headers:
        grid.add_column(header, justify="left" if header in ("quant", "") else "right")
    for row in table.rows:
        note = "made now" if row.made else ""
        grid.add_row(*_quant_cells(row), note)
    return grid


def plot(table: QuantTable, width: int = 40) -> str:
    """Plain-text bar charts over the quants: size, mean KLD, same top token and t/s."""
    charts = []
    rows = table.rows
    pad = max(len(r.quant) for r in rows)
    scored = [r for r in rows if r.scores is not None]
    series = [
        ("size", rows, lambda r: float(r.size_bytes), lambda r: size_text(r.size_bytes)),
        (
            "mean KLD (lower is better)",
            scored,
            lambda r: r.scores.kld_mean,
            lambda r: f"{r.scores.kld_mean:.6f}",
        ),
        (
            "same top token",
            scored,
            lambda r: r.scores.same_top,
            lambda r: _pct(r.scores.same_top, digits=2),
        ),
        (
            "tg t/s",
            [r for r in rows if r.gen_tps],
            lambda r: r.gen_tps,
            lambda r: f"{r.gen_tps:.2f}",
        ),
    ]
    for title, members, value, label in series:
        if not members:
            continue
        scale = max(value(r) for r in members)
        lines = [f"{table.model} · {title}"]
        for r in members:
            lines.append(f"  {r.quant:>{pad}} │{bar(value(r), scale, width)}│ {label(r)}")
        charts.append("\n".join(lines))
    return "\n\n".join(charts) + "\n"
