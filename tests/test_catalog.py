from __future__ import annotations

from pathlib import Path

import pytest

from localmix import catalog
from localmix.errors import CatalogError, ModelNotFound


def test_shipped_catalog_has_the_mistral_family() -> None:
    cat = catalog.load()
    for name in ("mistral:v0.1", "mistral:v0.2", "mistral:v0.3", "mixtral:8x7b", "tiny-mistral"):
        assert name in cat.models
    assert cat.get("mistral").name == "mistral:v0.3"
    assert cat.get("mixtral").name == "mixtral:8x7b"
    assert cat.get("mixtral").chat_format == "v1"
    assert cat.get("tiny-mixtral").synthetic == "tiny"


@pytest.mark.parametrize(
    ("typed", "kind", "name", "quant"),
    [
        ("mistral", catalog.RefKind.CATALOG, "mistral:v0.3", None),
        ("mistral:v0.1", catalog.RefKind.CATALOG, "mistral:v0.1", None),
        ("mixtral:q5_k_m", catalog.RefKind.CATALOG, "mixtral:8x7b", "Q5_K_M"),
        ("hf.co/org/Some-GGUF:Q8_0", catalog.RefKind.HF_GGUF, "org--some-gguf", "Q8_0"),
        ("hf.co/org/Some-GGUF", catalog.RefKind.HF_GGUF, "org--some-gguf", None),
        (
            "mistralai/Mistral-7B-v0.1",
            catalog.RefKind.HF_CHECKPOINT,
            "mistralai--mistral-7b-v0.1",
            None,
        ),
        ("./model.gguf", catalog.RefKind.PATH, "model", None),
    ],
)
def test_resolve_references(
    typed: str, kind: catalog.RefKind, name: str, quant: str | None
) -> None:
    ref = catalog.resolve(typed)
    assert (ref.kind, ref.name, ref.quant) == (kind, name, quant)


def test_unknown_name_suggests_the_nearest() -> None:
    with pytest.raises(ModelNotFound) as info:
        catalog.resolve("mixtrl")
    assert "mixtral" in (info.value.hint or "")


def test_user_catalog_adds_and_overrides(localmix_home: Path) -> None:
    localmix_home.mkdir(parents=True)
    (localmix_home / "models.toml").write_text(
        """
[models."tiny-mistral"]
description = "mine"
architecture = "mistral"
parameters = "1M"
source = ""
gguf_repo = ""
gguf_pattern = ""
quants = []
default_quant = "Q8_0"
chat_format = "v1"
context_length = 512
gated = false
synthetic = "tiny"

[models."my-gguf"]
description = "a GGUF repo of mine"
architecture = "mistral"
parameters = "7B"
source = "me/model"
gguf_repo = "me/model-GGUF"
gguf_pattern = "model.{quant}.gguf"
quants = ["Q4_K_M"]
default_quant = "Q4_K_M"
chat_format = "v3"
context_length = 4096
gated = false
"""
    )
    cat = catalog.load()
    assert cat.get("tiny-mistral").description == "mine"
    assert cat.get("my-gguf").gguf_file("Q4_K_M") == "model.Q4_K_M.gguf"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[models.x\n", "not valid TOML"),
        ('[models."x"]\ndescription = "d"\n', "'architecture': missing"),
        (
            '[models."x"]\ndescription="d"\narchitecture="gpt2"\nparameters=""\nsource=""\n'
            'gguf_repo=""\ngguf_pattern=""\nquants=[]\ndefault_quant="Q4_K_M"\nchat_format="v1"\n'
            "context_length=1\ngated=false\n",
            "'architecture'",
        ),
        ('[models."x"]\ncolour = "red"\n', "'colour': unknown field"),
        ('[models."x"]\ndescription = 3\n', "'description': expected str"),
    ],
)
def test_broken_catalog_names_file_entry_and_field(
    localmix_home: Path, text: str, needle: str
) -> None:
    localmix_home.mkdir(parents=True)
    path = localmix_home / "models.toml"
    path.write_text(text)
    with pytest.raises(CatalogError) as info:
        catalog.load()
    assert str(path) in info.value.message
    assert needle in info.value.message
    if "unknown field" in needle or "missing" in needle:
        assert "'x'" in info.value.message


def test_the_repository_root_catalog_is_the_one_the_package_ships() -> None:
    """models.toml sits at the repository root, where people look for it (the design card lists
    it there); the wheel ships localmix/models.toml. Edit both, or this fails."""
    root = Path(__file__).resolve().parent.parent
    assert (root / "models.toml").read_bytes() == (root / "localmix" / "models.toml").read_bytes()
