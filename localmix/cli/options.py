"""Option and argument types declared once and shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
