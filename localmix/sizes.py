"""Byte sizes as people write and read them, one rule for every room: `24GiB`, `16G`, `8000MB`
in, `1.5 GiB` out (binary units, as llama.cpp and every free-space tool report memory)."""

from __future__ import annotations

import re

from localmix.errors import UsageError

GIB = 1024**3
MIB = 1024**2
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)


def human_size(n_bytes: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
    value = float(n_bytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'24GiB' / '24G' / '24GB' / '512MiB' / '1.5T' / '1000' -> bytes (bare K/M/G/T are binary;
    KB/MB/GB/TB are decimal)."""
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"not a size: {text!r}", hint="write it like 24GiB, 16G or 8000MB")
    number, unit, binary, b = match.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    base = 1000 if (unit and b and not binary) else 1024
    return int(float(number) * base**power)
