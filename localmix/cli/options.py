"""Option and argument types declared once and shared by the commands."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer


def number_in(low: float, high: float | None = None) -> Callable[[float | None], float | None]:
    """An option callback: a finite number in [low, high]. Typer's own min/max let nan through
    (every comparison with nan is false) and then name the wrong bound."""

    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if math.isnan(value) or math.isinf(value):
            raise typer.BadParameter(f"{value} is not a number")
        if value < low or (high is not None and value > high):
            span = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
            raise typer.BadParameter(f"{value:g} is not {span}")
        return value

    return check


ModelArg = Annotated[
    str, typer.Argument(help="Model: a store name (mistral, tiny-mixtral:Q4_K_M) or a .gguf path.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ThreadsOpt = Annotated[
    Optional[int],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option("--threads", "-t", min=1, help="CPU threads (default: physical cores)."),
]
QuantOpt = Annotated[
    str,
    typer.Option("--type", "--quant", "-q", help="Quantization type, e.g. Q4_K_M, Q5_K_M, Q8_0."),
]
ImatrixOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional at runtime on 3.10
    typer.Option(
        "--imatrix",
        help="Importance matrix (llama-imatrix's GGUF or .dat) to quantize with; "
        "needed by IQ1/IQ2/IQ3_XXS/Q2_K_S.",
    ),
]
OutputOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option(
        "--output", "-o", help="Output file (default: next to the input or in the store)."
    ),
]
