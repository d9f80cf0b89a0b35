from __future__ import annotations

from pathlib import Path

import pytest

from localmix.errors import CatalogError, ModelNotFound
from localmix.models import catalog, tags


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


def test_the_catalog_is_one_file_and_the_wheel_ships_it() -> None:
    """models.toml lives once, beside catalog.py, and pyproject's package data names it, so an
    installed wheel reads the same catalog as a checkout."""
    root = Path(__file__).resolve().parent.parent
    found = sorted(
        p.relative_to(root).as_posix()
        for p in root.glob("**/models.toml")
        if ".venv" not in p.parts and "build" not in p.parts[:1]
    )
    assert found == ["localmix/models/models.toml"]
    assert '"models/models.toml"' in (root / "pyproject.toml").read_text()


def test_the_catalog_holds_the_mistral_family_of_today() -> None:
    cat = catalog.load()
    expected = {
        "mistral-small:3.2": ("mistral3", "v11", False),
        "ministral-3:3b": ("mistral3", "v13", False),
        "ministral-3:8b": ("mistral3", "v13", False),
        "ministral-3:14b": ("mistral3", "v13", False),
        "ministral-3:8b-reasoning": ("mistral3", "v13", True),
        "magistral:small": ("mistral3", "v13", True),
        "devstral-small:2": ("mistral3", "v13", False),
        "mistral-small:4": ("mistral4", "v15", True),
    }
    for name, (arch, fmt, thinks) in expected.items():
        spec = cat.get(name)
        assert (spec.architecture, spec.chat_format, spec.reasoning) == (arch, fmt, thinks), name
    assert cat.get("magistral").name == "magistral:small"
    assert cat.get("mistral-small").name == "mistral-small:4"
    assert cat.get("devstral").name == "devstral-small:2"


def test_every_downloadable_entry_says_its_size_purpose_and_license() -> None:
    for spec in catalog.load().models.values():
        if spec.synthetic:
            continue
        assert spec.size_q4_k_m > 0 and spec.purpose and spec.license, spec.name
        assert spec.gguf_repo and "{quant}" in spec.gguf_pattern, spec.name


def test_catalog_formats_are_the_ones_chat_encodes() -> None:
    from localmix.chat import template

    assert set(catalog.CHAT_FORMATS) == set(template.FORMATS)
    thinking = {name for name, fmt in template.FORMATS.items() if fmt.think}
    assert set(catalog.THINKING_FORMATS) == thinking


_ENTRY = (
    '[models."x"]\ndescription="d"\narchitecture="mistral3"\nparameters="1B"\nsource=""\n'
    'gguf_repo="o/r"\ngguf_pattern="r-{quant}.gguf"\nquants=["Q4_K_M", "Q6_K"]\n'
    'default_quant="Q4_K_M"\nchat_format="v13"\ncontext_length=1\ngated=false\n'
)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ('reasoning="yes"\n', "'reasoning': expected bool"),
        ("size_q4_k_m=true\n", "'size_q4_k_m': expected number"),
        ("size_q4_k_m=-1\n", "'size_q4_k_m': must be 0"),
        ('quant_files={ Q8_0 = "Q8" }\n', "'quant_files': 'Q8_0' is not in quants"),
        ("quant_files={ Q6_K = 6 }\n", "'quant_files': expected a table of strings"),
        ('purpose=["chat"]\n', "'purpose': expected str"),
    ],
)
def test_new_fields_are_validated(localmix_home: Path, extra: str, needle: str) -> None:
    localmix_home.mkdir(parents=True)
    (localmix_home / "models.toml").write_text(_ENTRY + extra)
    with pytest.raises(CatalogError) as info:
        catalog.load()
    assert needle in info.value.message


@pytest.mark.parametrize(
    ("replace", "needle"),
    [
        (('chat_format="v13"', 'chat_format="v7"\nreasoning=true'), "'reasoning'"),
        (('default_quant="Q4_K_M"', 'default_quant="Q8_0"'), "'default_quant'"),
        (('architecture="mistral3"', 'architecture="mistral5"'), "'architecture'"),
    ],
)
def test_field_combinations_are_validated(
    localmix_home: Path, replace: tuple[str, str], needle: str
) -> None:
    localmix_home.mkdir(parents=True)
    (localmix_home / "models.toml").write_text(_ENTRY.replace(*replace))
    with pytest.raises(CatalogError) as info:
        catalog.load()
    assert needle in info.value.message


def test_quant_files_name_the_tag_a_repo_uses(localmix_home: Path) -> None:
    localmix_home.mkdir(parents=True)
    (localmix_home / "models.toml").write_text(
        _ENTRY + 'quant_files={ Q6_K = "Q6" }\nsize_q4_k_m=1\nreasoning=true\n'
    )
    spec = catalog.load().get("x")
    assert (spec.gguf_file("Q6_K"), spec.gguf_file("Q4_K_M")) == ("r-Q6.gguf", "r-Q4_K_M.gguf")
    assert spec.size_q4_k_m == 1.0 and isinstance(spec.size_q4_k_m, float) and spec.reasoning


@pytest.mark.parametrize("columns", ["200", "100"])
def test_list_available_shows_every_entry_in_gib_with_whole_repo_ids(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    from localmix.cli import render
    from tests.cli_run import run_cli

    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr(render, "_consoles", {})  # consoles take the width when first made
    result = run_cli(capsys, "list", "--available")
    assert result.code == 0
    text = result.out
    specs = catalog.load().models.values()
    # folded on a narrow terminal, a repo id is still all there once the columns are joined up
    lines = text.splitlines()
    at = lines[0].index("FROM")
    cells = "".join(line[at:].strip() for line in lines[1:])
    for spec in specs:
        assert spec.name in text
        if not spec.synthetic:
            assert (spec.gguf_repo or spec.source) in (text if columns == "200" else cells)
    import re

    assert not re.search(r"\d\.\d GB", text) and "4.1 GiB" in text  # 7B's 4.37 GB file, in GiB
    assert "gated (accept its license on the Hub)" in " ".join(text.split())


def test_the_catalog_knows_which_models_call_tools() -> None:
    cat = catalog.load()
    tools = {name for name, spec in cat.models.items() if spec.calls_tools}
    assert "mistral:v0.3" in tools
    assert not {"mistral:v0.1", "mistral:v0.2"} & tools  # v1: no tool tokens
    assert all(cat.models[n].chat_format != "v1" for n in tools)
    assert any(cat.models[n].chat_format in ("v13", "v15") for n in tools)


# --- the models that need several machines (issue 24) --------------------------------------------

# name -> (architecture, chat format, context, license, gated, the Q4_K_M file's first part)
_BIG = {
    "mixtral:8x22b": (
        "mixtral", "v3", 65536, "apache-2.0", True,
        "Mixtral-8x22B-Instruct-v0.1.Q4_K_M-00001-of-00002.gguf",
    ),
    "mistral-large:2407": (
        "mistral", "v3", 131072, "mrl", True,
        "Mistral-Large-Instruct-2407-Q4_K_M/Mistral-Large-Instruct-2407-Q4_K_M-00001-of-00002.gguf",
    ),
    "mistral-large:2411": (
        "mistral", "v7", 131072, "mrl", True,
        "Mistral-Large-Instruct-2411-Q4_K_M/Mistral-Large-Instruct-2411-Q4_K_M-00001-of-00002.gguf",
    ),
    "devstral-2:123b": (
        "mistral", "v13", 262144, "modified-mit", False,
        "Q4_K_M/Devstral-2-123B-Instruct-2512-Q4_K_M-00001-of-00002.gguf",
    ),
    "mistral-large-3:675b": (
        "deepseek2", "v13", 262144, "apache-2.0", False,
        "UD-IQ1_S/Mistral-Large-3-675B-Instruct-2512-UD-IQ1_S-00001-of-00004.gguf",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_BIG))
def test_the_catalog_holds_the_models_bigger_than_one_machine(name: str) -> None:
    arch, fmt, context, license_, gated, _ = _BIG[name]
    spec = catalog.load().get(name)
    assert (spec.architecture, spec.chat_format, spec.context_length) == (arch, fmt, context)
    assert (spec.license, spec.gated) == (license_, gated)
    assert spec.calls_tools and not spec.reasoning  # all call tools; none thinks
    assert spec.default_quant == "Q4_K_M" and spec.size_q4_k_m > 60  # more than a 64 GB machine
    assert spec.source.startswith("mistralai/") and spec.gguf_repo.endswith("-GGUF")


def test_big_model_aliases_resolve() -> None:
    cat = catalog.load()
    assert cat.get("mistral-large").name == "mistral-large:2411"  # Large 2's current release
    assert cat.get("mistral-large-3").name == "mistral-large-3:675b"
    assert cat.get("devstral-2").name == "devstral-2:123b"
    assert cat.get("devstral").name == "devstral-small:2"  # the 24B stays the default Devstral
    ref = catalog.resolve("mistral-large:2407:q5_k_m")
    assert (ref.name, ref.quant) == ("mistral-large:2407", "Q5_K_M")


@pytest.mark.parametrize("name", sorted(_BIG))
def test_big_models_find_their_split_q4_k_m_in_the_layout_their_repos_use(name: str) -> None:
    """A real first part from each repo (for Large 3 only a UD-IQ1_S one was seen: the folder
    layout) is what the catalog's pattern picks, with every part and not another quant's."""
    from localmix.models import repofiles

    spec = catalog.load().get(name)
    first = _BIG[name][5]
    quant = tags.in_filename(first) or ""
    assert quant == spec.default_quant or name == "mistral-large-3:675b"
    n = int(first[-10:-5])
    parts = [first.replace("00001-of", f"{i:05d}-of") for i in range(1, n + 1)]
    others = [p.replace(quant, "Q8_0") for p in parts] + ["mmproj-F16.gguf", "README.md"]
    picked, files = repofiles.choose_gguf(others + parts, quant, preferred=spec.gguf_file(quant))
    assert (picked, files) == (quant, parts)


def test_big_model_sizes_are_their_tensor_tables() -> None:
    """The dense 123B models and Mixtral 8x22B at Q4_K_M: the catalog's GB, the sizes their repos
    publish (bartowski: 73.22GB; unsloth's Devstral 2: 74897662400 bytes, tensors plus metadata)
    and what tests/quant_tables.py (the offload planner's input) computes all agree."""
    from tests import quant_tables as qt

    models = catalog.load().models
    large2 = qt.q4_k_m_info(qt.MISTRAL_LARGE_2)
    devstral2 = qt.q4_k_m_info(qt.DEVSTRAL_2)
    mixtral = qt.q4_k_m_info(qt.MIXTRAL_8X22B)
    assert large2.file_size == pytest.approx(73.22e9, rel=0.0005)
    assert large2.n_params == pytest.approx(122.6e9, rel=0.001)
    assert devstral2.file_size == pytest.approx(74_897_662_400, rel=0.0005)
    assert devstral2.n_params == pytest.approx(125.03e9, rel=0.0005)  # llama-bench: 125.03 B
    assert mixtral.file_size / 2**30 == pytest.approx(79.71, abs=0.02)  # llama-bench: 79.71 GiB
    for name, info in (
        ("mistral-large:2407", large2),
        ("mistral-large:2411", large2),
        ("devstral-2:123b", devstral2),
        ("mixtral:8x22b", mixtral),
    ):
        assert models[name].size_q4_k_m == pytest.approx(info.file_size / 1e9, abs=0.05), name
    # Mistral Large 3: 379.0 GiB listed for unsloth's Q4_K_M
    assert models["mistral-large-3:675b"].size_q4_k_m == pytest.approx(379.0 * 2**30 / 1e9, abs=0.1)


def test_every_catalog_architecture_is_one_the_vendored_llama_cpp_loads() -> None:
    from localmix.llama.architectures import KNOWN

    assert set(catalog.GGUF_ARCHITECTURE) == set(catalog.ARCHITECTURES)
    assert set(catalog.GGUF_ARCHITECTURE.values()) <= KNOWN
    used = {spec.architecture for spec in catalog.load().models.values()}
    assert used == set(catalog.ARCHITECTURES)  # deepseek2 is Mistral Large 3's
