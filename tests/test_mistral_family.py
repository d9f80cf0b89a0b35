"""The newer Mistral architectures for real: tiny GGUFs of llama with tekken (Mistral Small 3.2,
Devstral, Magistral), mistral3 (Ministral 3) and mistral4 (Mistral Small 4), each with
mistral-common's tekken vocabulary, load in llama.cpp and answer a chat turn; the first two are
converted from synthetic checkpoints, mistral4 is written directly (localmix does not convert it:
see test_convert_mistral_family.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from localmix import gguffile
from localmix.build.synth import checkpoints as synth
from localmix.build.synth import ggufs as synthgguf
from localmix.llama.architectures import KNOWN, MISTRAL_FAMILY
from localmix.llama.offload import GIB, Budget


def _converted(root: Path, arch: str) -> Path:
    import os

    from localmix.build.convert import convert

    ckpt = synth.checkpoint(root / "ckpt", arch=arch, tokenizer="tekken")
    previous = os.environ.get("LOCALMIX_HOME")
    os.environ["LOCALMIX_HOME"] = str(root / "home")  # convert stages under LOCALMIX_HOME/tmp
    try:
        return convert(ckpt, root / f"{arch}.Q8_0.gguf", outtype="q8_0")
    finally:
        if previous is None:
            del os.environ["LOCALMIX_HOME"]
        else:
            os.environ["LOCALMIX_HOME"] = previous


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """general.architecture -> a tiny GGUF of it (built once for the module)."""
    return {
        "llama": _converted(tmp_path_factory.mktemp("llama-tekken"), "mistral"),
        "mistral3": _converted(tmp_path_factory.mktemp("mistral3"), "ministral3"),
        "mistral4": synthgguf.write(tmp_path_factory.mktemp("mistral4") / "mistral4.gguf"),
    }


ARCHS = ("llama", "mistral3", "mistral4")


def test_the_family_is_what_llama_cpp_loads() -> None:
    assert set(MISTRAL_FAMILY) == set(ARCHS)
    assert set(MISTRAL_FAMILY) <= KNOWN


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_carries_the_keys_llama_cpp_reads(arch: str, tiny: dict[str, Path]) -> None:
    info = gguffile.inspect(tiny[arch])
    assert info.architecture == arch
    assert info.metadata["tokenizer.ggml.pre"] == "tekken"
    assert info.metadata["tokenizer.ggml.tokens"] == "[131072 items]"
    family = MISTRAL_FAMILY[arch]
    missing = [k for k in family.keys if info.key(k) is None]
    assert not missing
    names = {t.name for t in info.tensors}
    assert {f"blk.0.{t}.weight" for t in family.layer_tensors} <= names
    assert info.file_size < 30 * 2**20  # tekken's 131k embedding rows dominate


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_answers_a_chat_turn(arch: str, tiny: dict[str, Path]) -> None:
    """Loaded through the one door with a plan, v7 on tekken, greedy: a reply, deterministic."""
    from localmix import load
    from localmix.chat.session import Session
    from localmix.llama.records import Chunk, Sampling, Stats

    def turn() -> tuple[list[int], Stats]:
        settings = load.LoadSettings(ctx=512, threads=1, vram_budget="1GiB")
        with load.open_model(str(tiny[arch]), settings) as opened:
            assert opened.plan is not None and opened.plan.fits
            session = Session(opened.engine, "v7", sampling=Sampling.greedy(), max_tokens=6)
            items = list(session.send("Say hello."))
        stats = items[-1]
        assert isinstance(stats, Stats)
        return [i.token for i in items if isinstance(i, Chunk)], stats

    tokens, stats = turn()
    assert stats.prompt_tokens > 5 and stats.generated_tokens == len(tokens) > 0
    assert stats.finish_reason in ("length", "stop")
    assert turn()[0] == tokens


def test_tiny_mistral4_plan_keeps_attention_and_moves_experts(tiny: dict[str, Path]) -> None:
    """The plan on the real file: forcing all experts to the CPU leaves the attention, router,
    shared expert and the cache on the GPU."""
    from localmix.llama import offload

    info = gguffile.inspect(tiny["mistral4"])
    budget = Budget(gpu_bytes=1 * GIB, ram_bytes=4 * GIB, gpu_name="CUDA0")
    plan = offload.plan(info, budget=budget, n_ctx=512, cpu_moe=info.block_count)
    on_gpu = {r.group for r in plan.rows if r.device == "CUDA0"}
    assert {"attention", "router", "shared expert", "KV cache"} <= on_gpu
    assert {r.group for r in plan.rows if r.device == "CPU"} >= {"experts", "token_embd"}
