"""The memory roofline of token generation: bytes read per token ÷ memory bandwidth = a ceiling.

Generating one token reads every weight the token passes through once (for a mixture of experts,
only the experts it is routed to: n_expert_used of n_expert) plus the KV cache so far. On a CPU
that traffic, not arithmetic, bounds tg; the share of the ceiling a run reaches says how much
speed is left on the table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.bench.result import BenchResult
from localmix.errors import LocalmixError

if TYPE_CHECKING:
    from localmix.gguffile import GGUFInfo

# Bytes per element of the KV cache types (ggml block size / elements per block).
_KV_BYTES = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
    "q5_0": 22 / 32, "q5_1": 24 / 32, "iq4_nl": 18 / 32,
}  # fmt: skip


@dataclass(frozen=True)
class ModelTraffic:
    """Per-token memory traffic of a model, in bytes, and the parameters behind it."""

    weight_bytes: int  # weights one token reads (active experts only)
    kv_bytes_per_position: float  # K + V of one cached position, all layers, at f16
    active_params: int = 0  # weights one token multiplies: the routed share of the experts


@dataclass(frozen=True)
class Roofline:
    """A tg result against its ceiling: bytes per token, bandwidth (GB/s), ceiling t/s, share."""

    bytes_per_token: float
    bandwidth_gbs: float
    ceiling_ts: float
    share: float  # measured avg_ts / ceiling_ts (0..1, can exceed 1 when caches help)


def _active_share(name: str, n_expert: int, n_used: int) -> float:
    """The share of a tensor one token reads: n_used of n_expert for routed experts (ffn_*_exps;
    a shared expert, ffn_*_shexp, is read by every token)."""
    return n_used / n_expert if "_exps." in name and n_expert and n_used else 1.0


def active_parameters(info: GGUFInfo) -> int:
    """Parameters one generated token multiplies: every weight except the embedding lookup
    (unless it doubles as the output), the routed experts at n_expert_used / n_expert.
    Mistral Small 4 (128 experts, 4 routed + 1 shared): about 6.1B of its 119B."""
    names = {t.name for t in info.tensors}
    n_expert, n_used = info.expert_count, int(info.key("expert_used_count", 0) or 0)
    total = 0.0
    for tensor in info.tensors:
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += tensor.n_elements * _active_share(tensor.name, n_expert, n_used)
    return int(total)


@functools.lru_cache(maxsize=32)
def traffic(model: Path) -> ModelTraffic:
    """Read a GGUF's tensor table (no weights) and work out what one token reads."""
    from localmix.gguffile import inspect

    return traffic_of(inspect(model))


def traffic_of(info: GGUFInfo) -> ModelTraffic:
    """What one token reads from a model whose header is `info`."""
    from localmix.llama.offload import is_mla

    names = {t.name for t in info.tensors}
    n_expert = info.expert_count
    n_used = int(info.key("expert_used_count", 0) or 0)
    total = 0.0
    for tensor in info.tensors:
        # The embedding is a lookup (one row), unless it doubles as the output projection.
        if tensor.name == "token_embd.weight" and "output.weight" in names:
            continue
        total += tensor.n_bytes * _active_share(tensor.name, n_expert, n_used)
    n_embd = int(info.key("embedding_length", 0) or 0)
    n_head = int(info.key("attention.head_count", 0) or 0) or 1
    n_head_kv = int(info.key("attention.head_count_kv", 0) or 0) or n_head
    head_k = int(info.key("attention.key_length", 0) or 0) or n_embd // n_head
    head_v = int(info.key("attention.value_length", 0) or 0) or n_embd // n_head
    if is_mla(info):
        head_v = 0  # llama.cpp keeps no V cache for latent attention
    per_position = info.block_count * n_head_kv * (head_k + head_v) * _KV_BYTES["f16"]
    return ModelTraffic(int(total), per_position, active_parameters(info))


@functools.lru_cache(maxsize=1)
def bandwidth_gbs() -> float:
    """This machine's memory bandwidth in GB/s (a numpy copy; measured once per process)."""
    from localmix.llama import hardware

    return hardware.measure_bandwidth()


def bytes_per_token(result: BenchResult, model: ModelTraffic) -> float:
    """Average bytes read per generated token of a tg test (KV grows from depth to depth + n)."""
    kv_scale = (_KV_BYTES[result.type_k] + _KV_BYTES[result.type_v]) / (2 * _KV_BYTES["f16"])
    mean_positions = result.n_depth + result.n_prompt + (result.n_gen + 1) / 2
    return model.weight_bytes + model.kv_bytes_per_position * kv_scale * mean_positions


def roofline(result: BenchResult, bandwidth: float | None = None) -> Roofline | None:
    """The ceiling of a pure tg test that ran on the CPU; None for pp tests and GPU offload."""
    if result.n_gen == 0 or result.n_prompt > 0:
        return None
    if result.backends != "CPU" and result.n_gpu_layers != 0:
        return None  # the weights sit in GPU memory, whose bandwidth the probe does not measure
    try:
        model = traffic(Path(result.model_filename))
    except (LocalmixError, OSError):  # a moved or unreadable file only loses the column
        return None
    gbs = bandwidth if bandwidth is not None else bandwidth_gbs()
    per_token = bytes_per_token(result, model)
    if per_token <= 0 or gbs <= 0:
        return None
    ceiling = gbs * 1e9 / per_token
    return Roofline(per_token, gbs, ceiling, result.avg_ts / ceiling)
