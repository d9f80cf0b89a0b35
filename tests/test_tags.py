"""The quant-tag grammar is one rule: the store, the catalog, a Hub file name and `--quant` read a
tag the same way (they used to disagree on TQ1_0 and MXFP4_MOE)."""

from __future__ import annotations

import pytest

from localmix.build import quantize
from localmix.models import catalog, tags


@pytest.mark.parametrize("quant", sorted(quantize.QUANT_TYPES))
def test_every_type_llama_quantize_makes_is_a_tag_everywhere(quant: str) -> None:
    assert tags.split(f"m:{quant.lower()}") == ("m", quant)
    assert tags.in_filename(f"Model-7B-{quant}.gguf") == quant
    assert tags.in_filename(f"model.{quant.lower()}-00002-of-00003.gguf") == quant
    ref = catalog.resolve(f"hf.co/org/model-GGUF:{quant}")
    assert ref.quant == quant


@pytest.mark.parametrize("tag", ["Q4_0_4_4", "Q6_K_L", "IQ4_NL", "q8"])
def test_hub_only_tags_read_as_quants(tag: str) -> None:
    assert tags.is_quant(tag)
    assert tags.split(f"mistral:{tag}") == ("mistral", tag.upper())


@pytest.mark.parametrize("text", ["v0.3", "7b", "latest", "Q9_K", "Q3Max", "F8", "q", ""])
def test_other_last_parts_stay_in_the_name(text: str) -> None:
    assert not tags.is_quant(text)
    assert tags.split(f"mistral:{text}") == (f"mistral:{text}", None)


def test_a_file_name_tag_stands_between_separators() -> None:
    assert tags.in_filename("Qwen3Max-Q3_K_M.gguf") == "Q3_K_M"
    assert tags.in_filename("org/repo/model.gguf") is None
    assert tags.in_filename("mistral-7b.Q4_K_M.Q8_0.gguf") == "Q8_0"  # the last one names it
