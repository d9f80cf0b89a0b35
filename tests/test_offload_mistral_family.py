"""The offload plan and the roofline on the real tensor tables of the newer Mistral models at
Q4_K_M: Mistral Small 3.2 (llama, tekken), Ministral 3 3B / 8B / 14B (mistral3) and Mistral Small 4
(mistral4: latent attention, 128 routed experts and a shared one). The Q4_K_M rules are checked
against llama-quantize on tiny files of the same structure; the MLA KV cache against what
llama.cpp allocates for a tiny mistral4."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localmix.bench import roofline
from localmix.errors import DoesNotFit
from localmix.gguffile import GGUFInfo
from localmix.llama import offload
from localmix.llama.offload import GIB, Budget, Plan
from tests import quant_tables as qt

SMALL_3_2 = qt.q4_k_m_info(qt.MISTRAL_SMALL_3_2)
MINISTRAL = {
    a.name: qt.q4_k_m_info(a) for a in (qt.MINISTRAL_3_3B, qt.MINISTRAL_3_8B, qt.MINISTRAL_3_14B)
}
SMALL_4 = qt.mla_info(qt.SMALL_4, "Mistral Small 4 119B")
RAM = 64 * GIB
BUDGETS_GIB = (8, 12, 16, 24, 48, 80)


def discrete(gib: float, ram: int = RAM) -> Budget:
    return Budget(gpu_bytes=int(gib * GIB), ram_bytes=ram, gpu_name="CUDA0")


def groups_on(plan: Plan, device: str) -> set[str]:
    return {r.group for r in plan.rows if r.device == device and r.n_bytes}


def kv_bytes(plan: Plan) -> int:
    return sum(r.n_bytes for r in plan.rows if r.group == "KV cache")


@pytest.mark.parametrize(
    "arch",
    [
        qt.tiny(qt.MINISTRAL_3_3B),
        qt.tiny(qt.MINISTRAL_3_8B),
        qt.tiny(qt.MISTRAL_SMALL_3_2),
        qt.TINY_MLA,
    ],
    ids=["mistral3-tied", "mistral3", "llama-head128", "mistral4"],
)
def test_q4_k_m_tables_match_llama_quantize(arch: object, tmp_path: Path) -> None:
    """The rules the tables use are llama.cpp's: tied embeddings take the output's Q6_K; MLA's
    attn_k_b and narrow attn_output fall back to Q5_0; routed, shared and dense ffn_down all
    follow the layer rule."""
    from localmix import gguffile
    from localmix.build import quantize

    if isinstance(arch, qt.Mla):
        source = qt.write_f16_mla(arch, tmp_path / "f16.gguf")
        want_info = qt.mla_info(arch, "tiny")
    else:
        assert isinstance(arch, qt.Arch)
        source = qt.write_f16_gguf(arch, tmp_path / "f16.gguf")
        want_info = qt.q4_k_m_info(arch)
    out = quantize.quantize(source, tmp_path / "q4_k_m.gguf", "Q4_K_M", threads=2)
    got = {t.name: (t.type_name, t.n_bytes) for t in gguffile.inspect(out).tensors}
    want = {t.name: (t.type_name, t.n_bytes) for t in want_info.tensors}
    assert got == want


def test_tables_have_the_published_sizes() -> None:
    # Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf: 14.33 GB; 23.6B parameters
    assert SMALL_3_2.file_size == pytest.approx(14.33e9, rel=0.002)
    assert SMALL_3_2.n_params == pytest.approx(23.57e9, rel=0.001)
    # Ministral 3: 3.4B, 8.4B and 13.5B language models (Mistral's model cards)
    params = [m.n_params / 1e9 for m in MINISTRAL.values()]
    assert params == pytest.approx([3.43, 8.49, 13.51], abs=0.01)
    # Mistral Small 4: 119B parameters; its Q4_K_M GGUF is listed at 67.21 (GiB)
    assert SMALL_4.n_params == pytest.approx(119e9, rel=0.005)
    assert SMALL_4.file_size / GIB == pytest.approx(67.2, abs=0.05)


def test_the_catalog_sizes_agree_with_the_tables() -> None:
    # models.toml keeps GB (10^9 bytes), shown as GiB by `list --available`
    from localmix.models import catalog

    models = catalog.load().models
    assert models["mistral-small:3.2"].size_q4_k_m == pytest.approx(
        SMALL_3_2.file_size / 1e9, abs=0.05
    )
    assert models["mistral-small:4"].size_q4_k_m == pytest.approx(SMALL_4.file_size / 1e9, abs=0.05)
    for size, table in zip(("3b", "8b", "14b"), MINISTRAL.values(), strict=True):
        for name in (f"ministral-3:{size}", f"ministral-3:{size}-reasoning"):
            assert models[name].size_q4_k_m == pytest.approx(table.file_size / 1e9, abs=0.05)


@pytest.mark.parametrize("gib", BUDGETS_GIB)
def test_ministral_3_fits_whole_from_12_gib_at_4k(gib: int) -> None:
    for name, model in MINISTRAL.items():
        plan = offload.plan(model, budget=discrete(gib), n_ctx=4096)
        assert plan.gpu_bytes <= gib * GIB, name
        whole = gib >= 12 or name != "Ministral 3 14B"
        assert (plan.strategy == "gpu") == whole, (name, plan.summary)
        if not whole:  # 14B on 8 GiB: the most layers that fit
            assert plan.strategy == "layers" and 0 < plan.n_gpu_layers <= 40


def test_ministral_3_3b_ties_its_output_to_the_embeddings() -> None:
    plan = offload.plan(MINISTRAL["Ministral 3 3B"], budget=discrete(8), n_ctx=4096)
    embd = next(t for t in MINISTRAL["Ministral 3 3B"].tensors if t.name == "token_embd.weight")
    assert embd.type_name == "Q6_K"  # llama-quantize gives the shared tensor the output's type
    output = next(r for r in plan.rows if r.group == "output" and r.device == "CUDA0")
    assert output.n_bytes >= embd.n_bytes  # llama.cpp duplicates it onto the GPU


def test_mistral_small_3_2_kv_cache_uses_head_dim_128() -> None:
    """5120 / 32 heads would say 160: the config's head_dim (128) decides q, k, v and the cache."""
    plan = offload.plan(SMALL_3_2, budget=discrete(24), n_ctx=32768)
    assert kv_bytes(plan) == 40 * 32768 * 8 * 128 * 2 * 2  # layers x cells x kv heads x dim x K,V
    assert plan.strategy == "gpu"
    small = offload.plan(SMALL_3_2, budget=discrete(12), n_ctx=32768)
    assert small.strategy == "layers" and small.gpu_bytes <= 12 * GIB
    more = offload.plan(SMALL_3_2, budget=discrete(12), n_ctx=32768, ngl=small.n_gpu_layers + 1)
    assert not more.fits


def test_mistral_small_4_latent_attention_caches_one_compressed_row() -> None:
    """MLA: one KV head of kv_lora_rank + rope dims (256 + 64), and no V cache at all."""
    plan = offload.plan(SMALL_4, budget=discrete(80), n_ctx=32768)
    assert kv_bytes(plan) == 36 * 32768 * (256 + 64) * 2
    assert offload.is_mla(SMALL_4) and not offload.is_mla(SMALL_3_2)


@pytest.mark.parametrize("gib", BUDGETS_GIB)
def test_mistral_small_4_offloads_the_fewest_experts(gib: int) -> None:
    plan = offload.plan(SMALL_4, budget=discrete(gib), n_ctx=4096)
    assert plan.gpu_bytes <= gib * GIB and plan.total("CPU") <= RAM
    if gib >= 80:
        assert plan.strategy == "gpu"
        return
    assert plan.strategy == "cpu-moe" and plan.n_gpu_layers == -1
    on_gpu = {"attention", "norms", "router", "shared expert", "KV cache", "output"}
    assert on_gpu <= groups_on(plan, "CUDA0")
    assert not (on_gpu - {"output"}) & groups_on(plan, "CPU")
    names = [t.name for t in SMALL_4.tensors]
    moved = {n for n in names for p, _ in plan.tensor_overrides if re.search(p, n)}
    kinds = ("gate_up", "down")  # the Hugging Face checkpoint stacks gate and up in one tensor
    assert moved == {f"blk.{i}.ffn_{k}_exps.weight" for i in range(plan.cpu_moe) for k in kinds}
    fewer = offload.plan(SMALL_4, budget=discrete(gib), n_ctx=4096, cpu_moe=plan.cpu_moe - 1)
    assert not fewer.fits


def test_mistral_small_4_on_a_24_gib_gpu_with_64_gb_of_ram() -> None:
    plan = offload.plan(SMALL_4, budget=discrete(24), n_ctx=32768)
    assert plan.strategy == "cpu-moe" and 20 <= plan.cpu_moe <= 30
    assert plan.total("CPU") < 50 * GIB  # the experts of ~26 layers: the rest of 64 GB is free
    assert "experts of layers 0-" in plan.summary


@pytest.mark.parametrize(("ram_gb", "fits"), [(64, False), (96, True), (128, True)])
def test_mistral_small_4_on_a_mac(ram_gb: int, fits: bool) -> None:
    """67 GiB of weights: a 128 GB Mac holds it all in Metal's working set; a 64 GB one cannot."""
    budget = Budget.apple(ram_gb * GIB)
    if not fits:
        with pytest.raises(DoesNotFit) as caught:
            offload.plan(SMALL_4, budget=budget, n_ctx=4096)
        assert "67.2 GiB" in caught.value.message
        return
    plan = offload.plan(SMALL_4, budget=budget, n_ctx=4096)
    assert plan.strategy == "gpu" and plan.gpu_device == "Metal"
    assert plan.gpu_bytes + plan.total("CPU") <= budget.ram_bytes


def test_roofline_counts_the_active_parameters() -> None:
    """Small 4 is "119B parameters, 6.5B activated per token" (embeddings counted both ways);
    a token multiplies 6.1B of them: 4 of 128 routed experts, the shared one, attention and
    the output. Mixtral's 12.9B active is the same count with its embedding row."""
    active = roofline.active_parameters(SMALL_4)
    assert active == pytest.approx(6.10e9, rel=0.01)
    embd = next(t for t in SMALL_4.tensors if t.name == "token_embd.weight").n_elements
    assert active + embd == pytest.approx(6.5e9, rel=0.025)
    mixtral = qt.q4_k_m_info(qt.MIXTRAL_8X7B)
    embd = next(t for t in mixtral.tensors if t.name == "token_embd.weight").n_elements
    assert roofline.active_parameters(mixtral) + embd == pytest.approx(12.9e9, rel=0.01)


def test_roofline_reads_the_active_experts_and_no_v_cache() -> None:
    traffic = roofline.traffic_of(SMALL_4)
    assert traffic.kv_bytes_per_position == 36 * (256 + 64) * 2
    assert traffic.active_params == roofline.active_parameters(SMALL_4)
    experts = sum(t.n_bytes for t in SMALL_4.tensors if "_exps." in t.name)
    embd = next(t for t in SMALL_4.tensors if t.name == "token_embd.weight").n_bytes
    # everything but the embedding lookup, the shared expert whole, 4 / 128 of the routed ones
    rest = SMALL_4.file_size - embd - experts
    assert traffic.weight_bytes == pytest.approx(rest + experts * 4 / 128, abs=1)
    assert traffic.weight_bytes < 0.06 * SMALL_4.file_size  # 3.6 GiB of 67 GiB per token


def test_plan_kv_cache_is_what_llama_cpp_allocates_for_mla(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Differential: the tiny mistral4's K and V sizes from llama.cpp's own log line."""
    import dataclasses

    from localmix import gguffile
    from localmix.build.synth import ggufs as synthgguf
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    spec = dataclasses.replace(synthgguf.TINY_MISTRAL4, n_vocab=264)  # a small vocab: fast
    path = synthgguf.write(tmp_path / "tiny-mistral4.gguf", spec, vocab=qt.fake_vocab(264))
    info: GGUFInfo = gguffile.inspect(path)
    plan = offload.plan(info, budget=Budget(gpu_bytes=0, ram_bytes=8 * GIB), n_ctx=1024)
    capfd.readouterr()
    with Engine(EngineConfig(path, n_ctx=1024, n_threads=1, verbose=True)):
        pass
    log = capfd.readouterr().err
    line = next(x for x in log.splitlines() if "llama_kv_cache: size =" in x)
    k_mib, v_mib = (float(m) for m in re.findall(r"[KV] \(f16\):\s+([\d.]+) MiB", line))
    assert v_mib == 0.0
    assert kv_bytes(plan) == pytest.approx(k_mib * 2**20, abs=0.005 * 2**20)
    assert kv_bytes(plan) == 2 * 1024 * (32 + 16) * 2  # layers x cells x (kv_lora + rope) x f16
