from __future__ import annotations

import time
from pathlib import Path

import pytest

from localmix import gguffile
from localmix.build import quantize
from localmix.errors import UsageError
from localmix.models import store
from localmix.progress import Progress


def test_quantize_q4_k_m_reports_every_tensor_and_leaves_no_partial(
    tiny_mistral_gguf_f16: Path, tmp_path: Path
) -> None:
    events: list[Progress] = []
    out = quantize.quantize(
        tiny_mistral_gguf_f16, tmp_path / "q.gguf", "q4_k_m", progress=events.append
    )
    info = gguffile.inspect(out)
    source = gguffile.inspect(tiny_mistral_gguf_f16)
    assert info.quant == "Q4_K_M"
    assert "Q4_K" in info.type_histogram()
    assert sorted(t.name for t in info.tensors) == sorted(t.name for t in source.tensors)
    assert events[0] == Progress("quantize", subject="Q4_K_M")  # the start, then each tensor
    tensors = events[1:]
    assert [e.done for e in tensors] == list(range(1, len(source.tensors) + 1))
    assert {(e.unit, e.total) for e in tensors} == {("tensors", len(source.tensors))}
    assert {e.subject for e in tensors} == {t.name for t in source.tensors}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


def test_gguf_header_reader_agrees_with_gguf_py(tiny_mistral_gguf_f16: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(tiny_mistral_gguf_f16)
    expected = [
        (t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), int(t.n_bytes))
        for t in reader.tensors
    ]
    info = gguffile.inspect(tiny_mistral_gguf_f16)
    assert [(t.name, t.type_name, t.shape, t.n_bytes) for t in info.tensors] == expected
    assert info.metadata["general.architecture"] == reader.fields["general.architecture"].contents()
    assert info.context_length == reader.fields["llama.context_length"].contents()


@pytest.mark.parametrize("name", ["Q4_K_M", "q8_0", "Q5_k_s", "f16", "IQ4_XS", "q3_k_l"])
def test_quant_type_names_are_case_insensitive(name: str) -> None:
    assert quantize.quant_type(name).name == name.upper()


def test_every_type_maps_to_a_llama_ftype() -> None:
    import llama_cpp

    for qtype in quantize.QUANT_TYPES.values():
        constant = (
            "LLAMA_FTYPE_ALL_F32" if qtype.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{qtype.name}"
        )
        assert getattr(llama_cpp, constant) == qtype.ftype, qtype.name


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(UsageError) as info:
        quantize.quant_type("Q9_X")
    assert "Q4_K_M" in (info.value.hint or "")


def test_quantize_a_store_model_to_another_type(
    tiny_mistral_gguf_f16: Path, tmp_path: Path
) -> None:
    src = tmp_path / "f16.gguf"
    src.write_bytes(tiny_mistral_gguf_f16.read_bytes())
    info = gguffile.inspect(src)
    store.add(
        store.Manifest(
            name="m",
            quant="F16",
            path=str(src),
            size=info.file_size,
            sha256=store.sha256_file(src),
            architecture="mistral",
            chat_format="v1",
            context_length=info.context_length,
            parameters=info.n_params,
            source="test",
            created=time.time(),
        ),
        src=src,
    )
    made = quantize.quantize_model("m", "Q8_0")
    assert made.ref == "m:Q8_0"
    assert gguffile.inspect(made.file).quant == "Q8_0"
    assert {m.quant for m in store.list_models()} == {"F16", "Q8_0"}
    store.remove("m:F16")
    assert quantize.quantize_model("m", "Q4_K_M").ref == "m:Q4_K_M"  # from Q8_0, the best left
    store.remove("m:Q8_0")
    with pytest.raises(UsageError):  # only a 4-bit file left: refuse to requantize silently
        quantize.quantize_model("m", "Q5_K_M")
    assert quantize.quantize_model("m", "Q5_K_M", allow_requantize=True).quant == "Q5_K_M"
