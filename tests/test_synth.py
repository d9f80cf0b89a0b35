"""localmix.build.synth.checkpoints: seeded random-weight checkpoints with mistral-common's real tokenizers."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from localmix.build.synth import checkpoints as synth
from localmix.errors import UsageError
from tests import reference_forward as ref


def _weights(ckpt: Path) -> dict[str, np.ndarray]:
    return ref.load(ckpt)[1]


def test_synth_tiny_parameters_match_catalog() -> None:
    import gguf

    from localmix.models import catalog

    for name, arch in (("tiny-mistral", "mistral"), ("tiny-mixtral", "mixtral")):
        spec = catalog.load().get(name)
        count = synth.parameter_count(arch, spec.synthetic, "v1")
        assert spec.parameters == gguf.model_weight_count_rounded_notation(count, min_digits=2)


@pytest.mark.parametrize("arch", ["mistral", "mixtral"])
def test_synth_same_seed_gives_same_model_in_both_layouts(arch: str, tmp_path: Path) -> None:
    hf = _weights(synth.checkpoint(tmp_path / "hf", arch=arch, layout="hf", seed=3))
    native = _weights(synth.checkpoint(tmp_path / "native", arch=arch, layout="mistral", seed=3))
    assert len(hf) == len(native)
    heads, kv_heads = synth.SIZES["tiny"].n_heads, synth.SIZES["tiny"].n_kv_heads
    for name, value in native.items():
        hf_value = hf[synth._hf_name(name)]
        if name.endswith("attention.wq.weight"):
            value = synth.hf_permute(value, heads)
        elif name.endswith("attention.wk.weight"):
            value = synth.hf_permute(value, kv_heads)
        np.testing.assert_array_equal(hf_value, value, err_msg=name)


def test_synth_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = synth.checkpoint(tmp_path / "a", seed=1)
    b = synth.checkpoint(tmp_path / "b", seed=1)
    c = synth.checkpoint(tmp_path / "c", seed=2)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1]
    assert data[0] != data[2]


def test_synth_weights_are_sane(tmp_path: Path) -> None:
    w = _weights(synth.checkpoint(tmp_path / "m", arch="mixtral"))
    norm = w["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std() * np.sqrt(q.shape[1]) - 1) < 0.1  # std 1/sqrt(fan_in)
    assert w["model.layers.1.block_sparse_moe.gate.weight"].shape == (8, 64)
    assert w["model.layers.1.block_sparse_moe.experts.7.w2.weight"].shape == (64, 128)


def test_synth_config_describes_the_weights(tmp_path: Path) -> None:
    ckpt = synth.checkpoint(tmp_path / "m", arch="mixtral", sliding_window=4096)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)
    assert config["sliding_window"] == 4096
    hp, w = ref.load(ckpt)
    assert w["model.embed_tokens.weight"].shape == (hp.vocab_size, hp.dim) == (32000, 64)
    native = synth.checkpoint(tmp_path / "n", arch="mixtral", layout="mistral", tokenizer="v3")
    params = json.loads((native / "params.json").read_text())
    assert params["moe"] == {"num_experts": 8, "num_experts_per_tok": 2}
    assert params["vocab_size"] == 32768
    assert "sliding_window" not in params


@pytest.mark.parametrize(
    ("tokenizer", "layout", "files"),
    [
        ("v1", "hf", {"tokenizer.model", "tokenizer_config.json"}),
        ("v3", "hf", {"tokenizer.model", "tokenizer_config.json"}),
        ("tekken", "hf", {"tekken.json", "tokenizer_config.json"}),
        ("v1", "mistral", {"tokenizer.model.v1"}),
        ("v3", "mistral", {"tokenizer.model.v3"}),
        ("tekken", "mistral", {"tekken.json"}),
    ],
)
def test_synth_ships_the_real_tokenizer(
    tokenizer: str, layout: str, files: set[str], tmp_path: Path
) -> None:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    ckpt = synth.checkpoint(tmp_path / "m", tokenizer=tokenizer, layout=layout)
    present = {p.name for p in ckpt.iterdir()}
    assert files <= present
    tok_file = next(ckpt / f for f in files if not f.endswith("config.json"))
    if tok_file.name == "tokenizer.model":  # HF names it without the version suffix
        return
    n_words = MistralTokenizer.from_file(str(tok_file)).instruct_tokenizer.tokenizer.n_words
    assert n_words == synth.TOKENIZERS[tokenizer].vocab_size


def test_synth_tokenizer_config_lists_control_tokens(tmp_path: Path) -> None:
    ckpt = synth.checkpoint(tmp_path / "m", tokenizer="v3")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert decoder["1"]["content"] == "<s>" and decoder["2"]["content"] == "</s>"
    assert any(t["content"] == "[INST]" for t in decoder.values())
    assert config["add_bos_token"] is True and "[INST]" in config["chat_template"]


def test_synth_bf16_rounds_to_nearest_even(tmp_path: Path) -> None:
    f32 = _weights(synth.checkpoint(tmp_path / "f32", seed=4))
    bf16 = _weights(synth.checkpoint(tmp_path / "bf16", seed=4, dtype="bf16"))
    for name, value in f32.items():
        widened = bf16[name]
        # bfloat16 keeps 8 significant bits: round to nearest errs by at most 2^-8 relative
        assert np.all(np.abs(widened - value) <= np.abs(value) * 2.0**-8), name
    from localmix.build.convert.checkpoint import read_header

    entries = {e.name: e for e in read_header(tmp_path / "bf16" / "model.safetensors")}
    assert {e.dtype for e in entries.values()} == {"BF16"}


def test_synth_shards_with_index(tmp_path: Path) -> None:
    ckpt = synth.checkpoint(tmp_path / "m", arch="mixtral", max_shard_bytes=3_000_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in ckpt.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    whole = _weights(synth.checkpoint(tmp_path / "one", arch="mixtral", max_shard_bytes=0))
    assert set(index["weight_map"]) == set(whole)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in whole.values())


def test_synth_safetensors_layout_is_contiguous(tmp_path: Path) -> None:
    path = synth.checkpoint(tmp_path / "m") / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def test_synth_rerun_replaces_previous_files(tmp_path: Path) -> None:
    synth.checkpoint(tmp_path / "m", arch="mixtral", max_shard_bytes=3_000_000, tokenizer="tekken")
    ckpt = synth.checkpoint(tmp_path / "m", layout="mistral")
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "consolidated.safetensors",
        "params.json",
        "tokenizer.model.v1",
    ]


@pytest.mark.parametrize(
    "kwargs",
    [{"size": "huge"}, {"arch": "llama"}, {"tokenizer": "v9"}, {"layout": "gguf"}, {"dtype": "f8"}],
)
def test_synth_unknown_choice_is_usage_error(kwargs: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=str(next(iter(kwargs.values())))):
        synth.checkpoint(tmp_path / "m", **kwargs)
