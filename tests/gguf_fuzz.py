"""Corrupted variants of a real GGUF, and a runner that puts each through `localmix show` and a
real load in a child process, classifying how it ended (clean error, signal, hang, traceback).

Shared by tests/test_gguf_fuzz.py (a seeded sample) and benchmarks/gguf_fuzz.py (the full run).
The children are forked from a parent that has already imported localmix and llama.cpp, so a
variant costs a fork and a load, not an interpreter start; a signal or a hang still only ends
that child.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
HUGE = (2**63 - 1, 2**64 - 1, 2**32, 2**31, 2**40 + 3, 1 << 62)
BAD_TYPES = (4, 5, 31, 32, 33, 36, 37, 38, 43, 44, 100, 2**31 - 1, 2**32 - 1)
CHILD_MEMORY = 8 * 2**30  # bytes of address space per child
ALIGNMENTS = (0, 1, 2, 3, 7, 8, 16, 24, 31, 33, 48, 64, 128, 4096, 2**31, 2**32 - 1)


@dataclass
class Field:
    """Where one length, count or id sits in the file: byte offset and struct format."""

    at: int
    fmt: str


@dataclass
class Layout:
    """The parts of a GGUF a mutation aims at (byte offsets into the original file)."""

    n_tensors: Field
    n_kv: Field
    kv_start: int
    kv_end: int
    table_end: int
    data_start: int
    lengths: list[Field] = field(default_factory=list)  # string lengths (keys, values, names)
    counts: list[Field] = field(default_factory=list)  # array counts
    value_types: list[Field] = field(default_factory=list)
    n_dims: list[Field] = field(default_factory=list)
    dims: list[Field] = field(default_factory=list)
    types: list[Field] = field(default_factory=list)
    offsets: list[Field] = field(default_factory=list)
    # for re-laying the file out: the KV bytes, and (name, dims, type, data) per tensor
    tensors: list[tuple[bytes, tuple[int, ...], int, bytes]] = field(default_factory=list)
    alignment: int = 32


def _u(data: bytes, at: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, data, at)[0]


def layout(data: bytes) -> Layout:
    """Parse a well-formed GGUF into a Layout."""
    pos = 8
    n_tensors, n_kv = _u(data, pos, "Q"), _u(data, pos + 8, "Q")
    out = Layout(Field(8, "Q"), Field(16, "Q"), 24, 0, 0, 0)
    pos = 24

    def string(pos: int) -> int:
        out.lengths.append(Field(pos, "Q"))
        return pos + 8 + _u(data, pos, "Q")

    def value(pos: int, kind: int) -> int:
        if kind == _STRING:
            return string(pos)
        if kind == _ARRAY:
            item, count = _u(data, pos, "I"), _u(data, pos + 4, "Q")
            out.counts.append(Field(pos + 4, "Q"))
            pos += 12
            if item == _STRING:
                for _ in range(count):
                    pos += 8 + _u(data, pos, "Q")
                return pos
            return pos + _SCALAR_SIZES[item] * count
        return pos + _SCALAR_SIZES[kind]

    for _ in range(n_kv):
        key_at = pos
        pos = string(pos)
        key = data[key_at + 8 : pos].decode()
        kind = _u(data, pos, "I")
        out.value_types.append(Field(pos, "I"))
        pos += 4
        if key == "general.alignment":
            out.alignment = _u(data, pos, "I")
        pos = value(pos, kind)
    out.kv_end = pos
    raw = []
    for _ in range(n_tensors):
        name_at = pos
        pos = string(pos)
        name = data[name_at + 8 : pos]
        out.n_dims.append(Field(pos, "I"))
        nd = _u(data, pos, "I")
        pos += 4
        dims = []
        for _ in range(nd):
            out.dims.append(Field(pos, "q"))
            dims.append(_u(data, pos, "q"))
            pos += 8
        out.types.append(Field(pos, "i"))
        out.offsets.append(Field(pos + 4, "Q"))
        raw.append((name, tuple(dims), _u(data, pos, "i"), _u(data, pos + 4, "Q")))
        pos += 12
    out.table_end = pos
    out.data_start = -(-pos // out.alignment) * out.alignment
    ends = [off for *_, off in raw[1:]] + [len(data) - out.data_start]
    for (name, dims, kind, off), end in zip(raw, ends, strict=True):
        out.tensors.append((name, dims, kind, data[out.data_start + off : out.data_start + end]))
    return out


def _set(data: bytearray, spot: Field, value: int) -> None:
    """Write value at spot, wrapped to the field's width (so -1 in a u64 is 2**64 - 1)."""
    bits = struct.calcsize("<" + spot.fmt) * 8
    value %= 2**bits
    if spot.fmt in "qi" and value >= 2 ** (bits - 1):
        value -= 2**bits
    struct.pack_into("<" + spot.fmt, data, spot.at, value)


def relaid(data: bytes, shape: Layout, alignment: int, *, kind: int = 4) -> bytes:
    """The same model written with general.alignment = alignment (of GGUF value type kind), its
    tensors packed at that alignment as a writer would (at 32 where it is not a power of two)."""
    # a power of two up to 64 KiB is honoured; past that the padding alone would be gigabytes
    # (2**31 per tensor), so the value is written but the tensors stay packed at 32
    honoured = 0 < alignment <= 65536 and alignment & (alignment - 1) == 0
    step = alignment if honoured else 32
    kv = bytearray(data[shape.kv_start : shape.kv_end])
    key = b"general.alignment"
    value = struct.pack("<I", alignment % 2**32) if kind == 4 else struct.pack("<Q", alignment)
    kv += struct.pack("<Q", len(key)) + key + struct.pack("<I", kind) + value
    head = bytearray(data[:24])
    struct.pack_into("<Q", head, 16, _u(data, 16, "Q") + 1)
    table, blobs, offset = bytearray(), bytearray(), 0
    for name, dims, type_id, blob in shape.tensors:
        table += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
        table += b"".join(struct.pack("<q", d) for d in dims)
        table += struct.pack("<iQ", type_id, offset)
        size = _nbytes(dims, type_id, len(blob))
        padded = -(-size // step) * step
        blobs += blob[:size].ljust(padded, b"\0")
        offset += padded
    body = bytes(head + kv + table)
    start = -(-len(body) // step) * step
    return body.ljust(start, b"\0") + bytes(blobs)


def _nbytes(dims: tuple[int, ...], type_id: int, available: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
    n = 1
    for d in dims:
        n *= d
    return min(n // block * size, available)


def variants(data: bytes, seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """count corrupted copies of data, (kind, bytes), the same for the same seed."""
    rng = random.Random(seed)
    shape = layout(data)
    kinds = [
        "flip-header", "flip-kv", "flip-table", "truncate", "count", "length", "array-count",
        "alignment", "offset", "type", "dims", "value-type",
    ]  # fmt: skip
    for i in range(count):
        kind = kinds[i % len(kinds)]
        yield kind, _mutate(kind, bytearray(data), shape, rng)


def _flip(buf: bytearray, start: int, end: int, rng: random.Random) -> bytes:
    for _ in range(rng.choice((1, 1, 2, 4))):
        at = rng.randrange(start, end)
        buf[at] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _mutate(kind: str, buf: bytearray, shape: Layout, rng: random.Random) -> bytes:
    if kind == "flip-header":
        return _flip(buf, 4, 24, rng)
    if kind == "flip-kv":
        return _flip(buf, shape.kv_start, shape.kv_end, rng)
    if kind == "flip-table":
        return _flip(buf, shape.kv_end, shape.table_end, rng)
    if kind == "truncate":
        end = rng.choice((shape.table_end, shape.data_start, len(buf)))
        return bytes(buf[: rng.randrange(0, end)])
    if kind == "alignment":
        value = rng.choice(ALIGNMENTS)
        return relaid(bytes(buf), shape, value, kind=rng.choice((4, 4, 4, 10)))
    spots, values = {
        "count": (
            [shape.n_tensors, shape.n_kv],
            [*HUGE, _u(buf, 8, "Q") + 1, _u(buf, 16, "Q") + 1, 0],
        ),
        "length": (shape.lengths, [*HUGE, 0, 63, 64, 1 << 20]),
        "array-count": (shape.counts, [*HUGE, 0, 1 << 30, (1 << 30) + 1]),
        "offset": (shape.offsets, [*HUGE, len(buf), len(buf) - shape.data_start, 1, 16, 32]),
        "type": (shape.types, [*BAD_TYPES, 0, 1, 8, 12, 14]),
        "dims": (shape.dims + shape.n_dims, [0, 1, 3, 5, 255, -1, 2**31, *HUGE[:3]]),
        "value-type": (shape.value_types, [9, 13, 255, 2**31, 7, 8, 10]),
    }[kind]
    spot = rng.choice(spots)
    _set(buf, spot, rng.choice(values))
    return bytes(buf)


# ---- running variants ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one command on one variant ended: exit code, or signal, or hang; what it printed."""

    code: int | None
    signal: int | None
    hung: bool
    output: str

    @property
    def label(self) -> str:
        if self.hung:
            return "hang"
        if self.signal is not None:
            return f"signal {signal.Signals(self.signal).name}"
        if "Traceback" in self.output:
            return "traceback"
        if "internal error" in self.output:
            return "internal error"
        return f"exit {self.code}"

    @property
    def bad(self) -> bool:
        return self.label in ("hang", "traceback", "internal error") or self.signal is not None


def prepare() -> None:
    """Import what every child needs once, in the parent (the children are forked)."""
    import importlib

    for module in ("localmix.cli.app", "localmix.llama.backend"):
        importlib.import_module(module)


def run(args: list[str], timeout_s: float, log: Path) -> Outcome:
    """`localmix ARGS` in a forked child; stdout and stderr go to log."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 97
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            # a variant that makes something allocate without bound fails in its child alone
            resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
            sys.stdin = open(os.devnull)  # noqa: SIM115 - the child exits without closing
            from localmix.cli.app import main

            try:
                main(args)
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 98
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return Outcome(None, None, True, log.read_text(errors="replace"))
        time.sleep(0.005)
    text = log.read_text(errors="replace")
    if os.WIFSIGNALED(status):
        return Outcome(None, os.WTERMSIG(status), False, text)
    return Outcome(os.WEXITSTATUS(status), None, False, text)


@dataclass
class Tally:
    """Counts over a run: outcome label per command, and examples of the bad ones."""

    show: Counter[str] = field(default_factory=Counter)
    load: Counter[str] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # passed validation, llama.cpp said no


def fuzz(source: Path, work: Path, *, seed: int, count: int, timeout_s: float = 60.0) -> Tally:
    """count variants of source, each through `show` and a one-token chat (a real load)."""
    prepare()
    data = source.read_bytes()
    tally = Tally()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "out.log"
    for index, (kind, blob) in enumerate(variants(data, seed, count)):
        path = work / f"variant-{index:05d}.gguf"
        path.write_bytes(blob)
        show = run(["show", str(path)], timeout_s, log)
        tally.show[show.label] += 1
        load = run(
            ["chat", str(path), "hi", "-n", "1", "--ctx", "256", "-t", "1", "--temp", "0"],
            timeout_s,
            log,
        )
        tally.load[load.label] += 1
        for what, outcome in (("show", show), ("load", load)):
            if outcome.bad:
                tally.bad.append(
                    f"#{index} {kind} {what}: {outcome.label}: {outcome.output[-300:]}"
                )
        if load.code == 13:  # EngineError: llama.cpp refused a file localmix let through
            tally.refused.append(f"#{index} {kind}: {load.output.strip().splitlines()[0]}")
        if not any(o.bad for o in (show, load)):
            path.unlink()
    return tally
