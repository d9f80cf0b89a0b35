"""BenchResult: one test's measurement, with llama-bench's field names, types and statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from localmix.bench.params import test_name

# llama-bench's `test::get_fields()`, in its order; csv / json / jsonl rows carry exactly these,
# then samples_ns and samples_ts (json, jsonl).
FIELDS = (
    "build_commit", "build_number", "cpu_info", "gpu_info", "backends",
    "model_filename", "model_type", "model_size", "model_n_params", "n_batch",
    "n_ubatch", "n_threads", "cpu_mask", "cpu_strict", "poll",
    "type_k", "type_v", "n_gpu_layers", "n_cpu_moe", "split_mode",
    "main_gpu", "no_kv_offload", "flash_attn", "devices", "tensor_split",
    "tensor_buft_overrides", "load_mode", "lazy_mode",
    "embeddings",
    "no_op_offload", "no_host", "repack", "fit_target", "fit_min_ctx",
    "n_prompt", "n_gen", "n_depth",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
)  # fmt: skip
# llama-bench's `test::get_field_type()`: everything else is a string.
INT_FIELDS = frozenset(
    [
        "build_number",
        "n_batch",
        "n_ubatch",
        "n_threads",
        "poll",
        "model_size",
        "model_n_params",
        "n_gpu_layers",
        "main_gpu",
        "n_prompt",
        "n_gen",
        "n_depth",
        "avg_ns",
        "stddev_ns",
        "no_op_offload",
        "n_cpu_moe",
        "fit_target",
        "fit_min_ctx",
        "flash_attn",
    ]
)
BOOL_FIELDS = frozenset(["no_kv_offload", "cpu_strict", "embeddings", "no_host", "repack"])
FLOAT_FIELDS = frozenset(("avg_ts", "stddev_ts"))
# A result whose repetitions spread wider than this (std / mean, percent) is flagged as noisy.
NOISY_PCT = 10.0
# llama.cpp's llama_flash_attn_type values, as llama-bench writes them.
FLASH_ATTN_CODES = {"auto": -1, "off": 0, "on": 1}


def mean(values: list[float] | tuple[float, ...]) -> float:
    return sum(values) / len(values) if values else 0.0


def stdev(values: list[float] | tuple[float, ...]) -> float:
    """Sample standard deviation (n - 1), 0 for fewer than two values, as llama-bench."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class BenchResult:
    """One test (pp, tg or pp+tg at a depth) of one model under one set of settings."""

    model_filename: str
    model_type: str  # llama_model_desc, e.g. "llama 7B Q4_K - Medium"
    model_size: int  # bytes of weights
    model_n_params: int
    n_batch: int
    n_ubatch: int
    n_threads: int
    type_k: str
    type_v: str
    n_gpu_layers: int
    flash_attn: str  # "on" / "off" / "auto"
    n_prompt: int
    n_gen: int
    n_depth: int
    test_time: str  # RFC 3339, UTC
    samples_ns: tuple[int, ...]  # one per repetition
    backends: str = "CPU"
    cpu_info: str = ""
    gpu_info: str = ""
    build_commit: str = "unknown"
    build_number: int = 0
    tensor_buft_overrides: str = "none"
    # Settings llama-bench reports that localmix does not vary: the values it runs with.
    cpu_mask: str = "0x0"
    cpu_strict: bool = False
    poll: int = 50
    n_cpu_moe: int = 0
    split_mode: str = "layer"
    main_gpu: int = 0
    no_kv_offload: bool = False
    devices: str = "auto"
    tensor_split: str = "0.00"
    load_mode: str = "auto"
    lazy_mode: str = "auto"
    embeddings: bool = False
    no_op_offload: int = 0
    no_host: bool = False
    repack: bool = True
    fit_target: int = 0
    fit_min_ctx: int = 0
    # Why llama.cpp refused this combination (no samples then); not a llama-bench field.
    error: str = ""
    # The RPC workers (HOST:PORT,...) the test offloaded to: llama-bench's -rpc, which its
    # records show only as RPC among the backends; json / jsonl rows carry it when set.
    rpc_servers: str = ""

    @property
    def test(self) -> str:
        return test_name(self.n_prompt, self.n_gen, self.n_depth)

    @property
    def samples_ts(self) -> tuple[float, ...]:
        """Tokens per second of each repetition: (n_prompt + n_gen) / time."""
        n_tokens = self.n_prompt + self.n_gen
        return tuple(1e9 * n_tokens / ns for ns in self.samples_ns if ns > 0)

    @property
    def avg_ns(self) -> int:
        return int(mean(self.samples_ns))

    @property
    def stddev_ns(self) -> int:
        return int(stdev(self.samples_ns))

    @property
    def avg_ts(self) -> float:
        return mean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        return stdev(self.samples_ts)

    @property
    def noisy(self) -> bool:
        """Whether the repetitions spread wider than NOISY_PCT of their mean."""
        return self.avg_ts > 0 and self.stddev_ts > NOISY_PCT / 100 * self.avg_ts

    def fields(self) -> dict[str, Any]:
        """llama-bench's fields in its order, typed as its json printer types them."""
        values: dict[str, Any] = {}
        for name in FIELDS:
            value = getattr(self, name)
            if name == "flash_attn":
                value = FLASH_ATTN_CODES[value]
            values[name] = value
        return values

    def to_json(self) -> dict[str, Any]:
        """One llama-bench json / jsonl object: its fields, then samples_ns and samples_ts."""
        data = self.fields()
        data["samples_ns"] = list(self.samples_ns)
        data["samples_ts"] = list(self.samples_ts)
        if self.rpc_servers:
            data["rpc_servers"] = self.rpc_servers
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        """Read back a to_json() object (history, or llama-bench's own json / jsonl output)."""
        import dataclasses

        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["samples_ns"] = tuple(int(v) for v in data.get("samples_ns", ()))
        code = data.get("flash_attn", -1)
        if isinstance(code, (int, str)) and str(code).lstrip("-").isdigit():
            values["flash_attn"] = {v: k for k, v in FLASH_ATTN_CODES.items()}.get(
                int(code), "auto"
            )
        for name in BOOL_FIELDS & values.keys():
            values[name] = bool(values[name])
        return cls(**values)
