"""The offload plan on the real tensor tables of Mistral 7B and Mixtral 8x7B at Q4_K_M, and the
tensor-override path through llama.cpp for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localmix import sizes
from localmix.errors import DoesNotFit, UsageError
from localmix.gguffile import GGUFInfo
from localmix.llama import offload
from localmix.llama.offload import GIB, Budget, Plan
from tests import quant_tables as qt

MISTRAL = qt.q4_k_m_info(qt.MISTRAL_7B)
MIXTRAL = qt.q4_k_m_info(qt.MIXTRAL_8X7B)
BUDGETS_GIB = (8, 12, 16, 24, 48)
RAM = 64 * GIB
EXPERT_KINDS = ("gate", "up", "down")


def discrete(gib: float, ram: int = RAM) -> Budget:
    return Budget(gpu_bytes=int(gib * GIB), ram_bytes=ram, gpu_name="CUDA0")


def groups_on(plan: Plan, device: str) -> set[str]:
    return {r.group for r in plan.rows if r.device == device and r.n_bytes}


def overridden(plan: Plan, names: list[str]) -> set[str]:
    """Tensor names the plan's overrides move, matched like llama.cpp (std::regex_search)."""
    return {n for n in names for pattern, _ in plan.tensor_overrides if re.search(pattern, n)}


@pytest.mark.parametrize("quant", [qt.MISTRAL_7B, qt.MIXTRAL_8X7B], ids=lambda a: a.name)
def test_q4_k_m_tables_match_llama_quantize(quant: qt.Arch, tmp_path: Path) -> None:
    """The per-tensor Q4_K_M rules the tables use are the ones llama.cpp applies (same structure,
    tiny dimensions)."""
    from localmix import gguffile
    from localmix.build import quantize

    arch = qt.tiny(quant)
    source = qt.write_f16_gguf(arch, tmp_path / "f16.gguf")
    out = quantize.quantize(source, tmp_path / "q4_k_m.gguf", "Q4_K_M", threads=2)
    got = {t.name: (t.type_name, t.n_bytes) for t in gguffile.inspect(out).tensors}
    want = {t.name: (t.type_name, t.n_bytes) for t in qt.q4_k_m_info(arch).tensors}
    assert got == want


def test_q4_k_m_tables_have_the_published_sizes() -> None:
    # mistral-7b-instruct-v0.2.Q4_K_M.gguf is 4,368,439,584 bytes, 0.7 MB of it the vocabulary.
    assert MISTRAL.file_size == pytest.approx(4.3684e9, rel=0.001)
    # Today's rules give the 8-expert model Q8_0 attn_k/attn_v, Q5_K attn_output and Q6_K
    # ffn_down_exps on half the layers: 28.4 GB (26.5 GiB).
    assert MIXTRAL.file_size == pytest.approx(28.45e9, rel=0.002)
    assert MIXTRAL.file_size / GIB == pytest.approx(26.5, abs=0.05)


@pytest.mark.parametrize("gib", BUDGETS_GIB)
def test_mistral_7b_at_4k_fits_every_gpu_whole(gib: int) -> None:
    plan = offload.plan(MISTRAL, budget=discrete(gib), n_ctx=4096)
    assert (plan.strategy, plan.n_gpu_layers, plan.tensor_overrides) == ("gpu", -1, ())
    assert plan.gpu_bytes <= gib * GIB
    assert groups_on(plan, "CPU") == {"token_embd", "compute buffer"}  # llama.cpp's input layer
    kv = next(r for r in plan.rows if r.group == "KV cache")
    assert kv.n_bytes == 32 * 4096 * 8 * 128 * 2 * 2  # layers x cells x kv heads x dim x K,V x f16


def test_mistral_7b_at_32k_on_8_gib_splits_layers() -> None:
    plan = offload.plan(MISTRAL, budget=discrete(8), n_ctx=32768)
    assert plan.strategy == "layers"
    assert 0 < plan.n_gpu_layers <= 32
    assert plan.gpu_bytes <= 8 * GIB
    more = offload.plan(MISTRAL, budget=discrete(8), n_ctx=32768, ngl=plan.n_gpu_layers + 1)
    assert not more.fits  # the largest number of layers that fits
    assert offload.plan(MISTRAL, budget=discrete(12), n_ctx=32768).strategy == "gpu"


@pytest.mark.parametrize("gib", BUDGETS_GIB)
def test_mixtral_keeps_attention_on_gpu_and_moves_the_fewest_experts(gib: int) -> None:
    plan = offload.plan(MIXTRAL, budget=discrete(gib), n_ctx=4096)
    assert plan.gpu_bytes <= gib * GIB
    if gib >= 48:
        assert plan.strategy == "gpu"
        return
    assert plan.strategy == "cpu-moe"
    assert plan.n_gpu_layers == -1
    assert {"attention", "norms", "router", "KV cache", "output"} <= groups_on(plan, "CUDA0")
    assert not {"attention", "norms", "router", "KV cache"} & groups_on(plan, "CPU")
    names = [t.name for t in MIXTRAL.tensors]
    moved = {f"blk.{i}.ffn_{k}_exps.weight" for i in range(plan.cpu_moe) for k in EXPERT_KINDS}
    assert overridden(plan, names) == moved
    fewer = offload.plan(MIXTRAL, budget=discrete(gib), n_ctx=4096, cpu_moe=plan.cpu_moe - 1)
    assert not fewer.fits  # the smallest N that fits


def test_mixtral_moves_fewer_experts_as_the_gpu_grows() -> None:
    counts = [offload.plan(MIXTRAL, budget=discrete(g), n_ctx=4096).cpu_moe for g in BUDGETS_GIB]
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] == 0 and counts[0] < 32
    on_24 = offload.plan(MIXTRAL, budget=discrete(24), n_ctx=4096).cpu_moe
    assert 1 <= on_24 <= 8  # a 4090 keeps most experts


def test_longer_context_moves_more_experts_and_q8_0_cache_fewer() -> None:
    short = offload.plan(MIXTRAL, budget=discrete(24), n_ctx=4096)
    long = offload.plan(MIXTRAL, budget=discrete(24), n_ctx=32768)
    q8 = offload.plan(MIXTRAL, budget=discrete(24), n_ctx=32768, type_k="q8_0", type_v="q8_0")
    assert short.cpu_moe < q8.cpu_moe < long.cpu_moe
    kv = {p.type_k: sum(r.n_bytes for r in p.rows if r.group == "KV cache") for p in (long, q8)}
    assert kv["q8_0"] * 32 == kv["f16"] * 17  # 34 bytes per 32 elements against 2 per element


@pytest.mark.parametrize(
    ("ram_gb", "model", "strategy"),
    [(16, MISTRAL, "gpu"), (32, MIXTRAL, "cpu-moe"), (64, MIXTRAL, "gpu")],
)
def test_apple_unified_memory_is_bounded_by_the_working_set(
    ram_gb: int, model: GGUFInfo, strategy: str
) -> None:
    budget = Budget.apple(ram_gb * GIB)
    assert budget.gpu_bytes == ram_gb * GIB * (3 if ram_gb > 36 else 2) // (4 if ram_gb > 36 else 3)
    plan = offload.plan(model, budget=budget, n_ctx=4096)
    assert plan.strategy == strategy
    assert plan.gpu_device == "Metal"
    assert plan.gpu_bytes <= budget.gpu_bytes
    assert plan.gpu_bytes + plan.total("CPU") <= budget.ram_bytes  # one pool of memory


def test_nothing_fits_explains_the_numbers_and_the_ways_out() -> None:
    with pytest.raises(DoesNotFit) as caught:
        offload.plan(MIXTRAL, budget=discrete(8, ram=12 * GIB), n_ctx=32768)
    message, hint = caught.value.message, caught.value.hint or ""
    assert "26.5 GiB" in message and "32768 tokens" in message and "KV cache 4.0 GiB" in message
    assert "smaller" in hint and "--ctx 4096" in hint and "q8_0" in hint


def test_cpu_only_runs_everything_on_the_cpu() -> None:
    plan = offload.plan(MISTRAL, budget=Budget(gpu_bytes=0, ram_bytes=16 * GIB), n_ctx=4096)
    assert (plan.strategy, plan.n_gpu_layers, plan.tensor_overrides) == ("cpu", 0, ())
    assert plan.totals.keys() == {"CPU"}


def test_manual_overrides_are_taken_as_given() -> None:
    plan = offload.plan(MIXTRAL, budget=discrete(48), n_ctx=4096, cpu_moe=3)
    assert plan.strategy == "manual" and plan.fits
    assert plan.tensor_overrides == offload.cpu_moe_overrides(3)
    layers = offload.plan(MIXTRAL, budget=discrete(8), n_ctx=4096, ngl=40)
    assert layers.n_gpu_layers == -1 and not layers.fits
    assert plan.engine_fields()["tensor_overrides"] == plan.tensor_overrides


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("24GiB", 24 * GIB),
        ("24G", 24 * GIB),
        ("24gb", 24 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5T", int(1.5 * 2**40)),
        ("1000", 1000),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert sizes.parse_size(text) == value


def test_parse_size_rejects_nonsense() -> None:
    with pytest.raises(UsageError):
        sizes.parse_size("lots")


def test_estimate_for_reads_only_the_header(tmp_path: Path) -> None:
    path = qt.write_f16_gguf(qt.tiny(qt.MIXTRAL_8X7B, n_layer=2), tmp_path / "tiny.gguf")
    plan = offload.estimate_for(path, n_ctx=512, vram_budget="24GiB")
    assert plan.budget.gpu_bytes == 24 * GIB
    assert plan.fits and plan.n_ctx == 512


def test_expert_overrides_reach_llama_cpp_and_keep_the_logits(
    tiny_mixtral_gguf_f32: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tensor_buft_overrides path through ctypes: llama.cpp logs each override (a verbose
    engine passes its log to stderr), and the model computes the same logits (on a CPU-only
    build both placements are the CPU)."""
    import numpy as np

    from localmix import gguffile
    from localmix.llama.engine import Engine, EngineConfig

    config = EngineConfig(tiny_mixtral_gguf_f32, n_ctx=256, n_threads=2)
    tokens = [1, 5, 9, 13, 42, 7]
    with Engine(config) as engine:
        plain = engine.logits(tokens)
    layers = gguffile.inspect(tiny_mixtral_gguf_f32).block_count
    forced = EngineConfig(
        tiny_mixtral_gguf_f32,
        n_ctx=256,
        n_threads=2,
        tensor_overrides=offload.cpu_moe_overrides(layers),
        verbose=True,
    )
    capsys.readouterr()
    with Engine(forced) as engine:
        moved = engine.logits(tokens)
    log = capsys.readouterr().err.splitlines()
    said = {line.split()[1] for line in log if "buffer type overridden to CPU" in line}
    assert said == {f"blk.{i}.ffn_{k}_exps.weight" for i in range(layers) for k in EXPERT_KINDS}
    np.testing.assert_array_equal(plain, moved)


def test_plan_table_shows_groups_devices_and_totals() -> None:
    from rich.console import Console

    from localmix.cli.plan import plan_table

    plan = offload.plan(MIXTRAL, budget=discrete(24), n_ctx=4096)
    console = Console(record=True, width=120)
    console.print(plan_table(plan))
    text = console.export_text()
    for needle in ("experts", "attention", "KV cache", "CUDA0", "CPU", "24.0 GiB", "exps"):
        assert needle in text
