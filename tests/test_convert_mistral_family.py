"""Converting the newer Mistral releases, where it is sound: Ministral 3 (HF and Mistral-native)
and Mistral 3 multimodal checkpoints become "mistral3" with the same tensors and keys as
convert_hf_to_gguf.py writes (benchmarks/reference_tools.py --arch ministral3 compares them
byte for byte); Mistral Small 4 and FP8 releases are refused, before any weights are downloaded,
with the way to a ready GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localmix import gguffile
from localmix.build.convert import check_config, convert
from localmix.build.convert.checkpoint import open_checkpoint
from localmix.build.synth import checkpoints as synth
from localmix.errors import CheckpointError

TINY = synth.SIZES["tiny"]


@pytest.fixture(scope="module")
def ministral3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """layout -> an f32 GGUF converted from a tiny ministral3 checkpoint in that layout (v3)."""
    root = tmp_path_factory.mktemp("ministral3")
    out = {}
    for layout in ("hf", "mistral"):
        ckpt = synth.checkpoint(root / layout, arch="ministral3", layout=layout, tokenizer="v3")
        out[layout] = convert(ckpt, root / f"{layout}.gguf", outtype="f32")
    return out


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_ministral3_converts_to_mistral3_with_yarn_and_query_scaling(
    layout: str, ministral3: dict[str, Path]
) -> None:
    info = gguffile.inspect(ministral3[layout])
    assert info.architecture == "mistral3"
    want = {
        "rope.scaling.type": "yarn",
        "rope.scaling.factor": synth.YARN_FACTOR,
        "rope.scaling.original_context_length": TINY.context // 16,
        "rope.scaling.yarn_beta_fast": 32.0,
        "rope.scaling.yarn_beta_slow": 1.0,
        "rope.scaling.yarn_log_multiplier": 1.0,
        "attention.temperature_scale": pytest.approx(synth.LLAMA_4_SCALING_BETA),
        "context_length": TINY.context,
        "attention.key_length": TINY.dim // TINY.n_heads,
    }
    assert {k: info.key(k) for k in want} == want


def test_ministral3_leaves_the_image_encoder_out_and_layouts_agree(
    ministral3: dict[str, Path],
) -> None:
    import gguf
    import numpy as np

    hf, native = (gguf.GGUFReader(ministral3[k]) for k in ("hf", "mistral"))
    names = {t.name for t in hf.tensors}
    assert names == {t.name for t in native.tensors}
    assert len(names) == 3 + 9 * TINY.n_layers  # embeddings, norm, output + 9 per layer
    assert not any("vision" in n or "mm" in n or "patch" in n for n in names)
    by_name = {t.name: t for t in native.tensors}
    for t in hf.tensors:  # the HF q/k rows are un-permuted back to Meta's order
        np.testing.assert_array_equal(t.data, by_name[t.name].data, err_msg=t.name)


def _edit_config(ckpt: Path, edit) -> Path:
    path = ckpt / ("config.json" if (ckpt / "config.json").is_file() else "params.json")
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def test_mistral_small_3_multimodal_hf_converts_like_llama_cpp(tmp_path: Path) -> None:
    """Mistral Small 3.1 / 3.2 and Magistral 2509 on the Hub: Mistral3ForConditionalGeneration
    around a plain "mistral" text model, saved by older transformers (language_model.model.*):
    llama.cpp's converter makes it mistral3 without YaRN, and so does localmix."""
    from localmix.build.convert.checkpoint import read_header

    ckpt = synth.checkpoint(tmp_path / "small3", arch="ministral3", tokenizer="v3", seed=1)

    def plain_mistral(config: dict) -> None:
        text = config["text_config"]
        text["model_type"] = "mistral"
        text["rope_theta"] = text.pop("rope_parameters")["rope_theta"]

    _edit_config(ckpt, plain_mistral)
    weights = ckpt / "model.safetensors"
    entries = list(read_header(weights))
    renamed = {
        e.name: e.name.replace("model.language_model.", "language_model.model.").replace(
            "lm_head", "language_model.lm_head"
        )
        for e in entries
    }
    by_new = {renamed[e.name]: e for e in entries}
    old = weights.with_suffix(".old")
    weights.rename(old)
    by_new = {
        k: e.__class__(e.name, e.dtype, e.shape, old, e.offset, e.nbytes) for k, e in by_new.items()
    }
    synth.write_safetensors(
        weights, [(k, e.shape) for k, e in by_new.items()], "f32", lambda k: by_new[k].read()
    )
    old.unlink()
    info = gguffile.inspect(convert(ckpt, tmp_path / "small3.gguf", outtype="f16"))
    assert info.architecture == "mistral3"
    assert info.key("rope.scaling.type") is None and info.key("attention.temperature_scale") is None
    assert "output.weight" in {t.name for t in info.tensors}


@pytest.mark.parametrize(
    ("layout", "edit", "says"),
    [
        (
            "hf",
            lambda c: c["text_config"].update(model_type="mistral4", kv_lora_rank=256),
            "Mistral Small 4",
        ),
        (
            "mistral",
            lambda c: c.update(moe={"num_experts": 128}, q_lora_rank=1024, kv_lora_rank=256),
            "Mistral Small 4",
        ),
        (
            "hf",
            lambda c: c.update(quantization_config={"quant_method": "fp8"}),
            "quantized (fp8)",
        ),
        (
            "mistral",
            lambda c: c.update(quantization={"qformat_weight": "fp8_e4m3"}),
            "quantized (fp8_e4m3)",
        ),
    ],
    ids=["mistral4-hf", "mistral4-native", "fp8-hf", "fp8-native"],
)
def test_unconvertible_checkpoints_are_refused_with_the_way_to_a_gguf(
    layout: str, edit, says: str, tmp_path: Path
) -> None:
    ckpt = synth.checkpoint(tmp_path / "m", arch="ministral3", layout=layout)
    config = _edit_config(ckpt, edit)
    for attempt in (lambda: check_config(config), lambda: convert(ckpt, tmp_path / "o.gguf")):
        with pytest.raises(CheckpointError) as caught:
            attempt()
        assert says in caught.value.message
        assert "localmix pull hf.co/" in (caught.value.hint or "")
    assert not (tmp_path / "o.gguf").exists()


def test_fp8_weights_name_the_bf16_release(tmp_path: Path) -> None:
    ckpt = synth.checkpoint(tmp_path / "m", arch="ministral3")
    weights = ckpt / "model.safetensors"
    raw = weights.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].rstrip(b" ").replace(b'"F32"', b'"F8_E4M3"', 1)
    header += b" " * (-len(header) % 8)
    weights.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(ckpt)
    assert "F8_E4M3" in caught.value.message and "BF16" in (caught.value.hint or "")


def test_pull_refuses_mistral_small_4_before_downloading_weights(
    tmp_path: Path, localmix_home: Path
) -> None:
    """The config comes down first; the weights never do."""
    from tests.hub_server import HubServer
    from tests.test_pull import Env

    repo = synth.checkpoint(tmp_path / "repo", arch="ministral3")
    _edit_config(repo, lambda c: c["text_config"].update(model_type="mistral4"))
    with HubServer() as server:
        env = Env(server, tmp_path / "hf-home", localmix_home)
        server.add_repo("org/small-4", repo)
        result = env.cli("pull", "org/small-4")
        assert result.returncode == 5, result.stderr  # CheckpointError's exit code
        assert "Mistral Small 4" in result.stderr and "hint: pull a ready GGUF" in result.stderr
        assert server.bytes_served("config.json") > 0
        assert server.bytes_served("model.safetensors") == 0
        assert env.listed() == []
