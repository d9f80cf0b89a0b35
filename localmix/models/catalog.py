"""The model catalog: models.toml (shipped, plus the user's own) read into frozen ModelSpec records,
and the resolution of what a user types (`mistral`, `mixtral:q5_k_m`, `hf.co/org/repo:Q4_K_M`,
`org/repo`, a path) into a ModelRef."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from localmix import settings
from localmix.errors import CatalogError, ModelNotFound
from localmix.models import tags

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# mistral3: Mistral Small 3.x, Magistral, Devstral Small 2, Ministral 3; mistral4: Small 4 (MoE);
# deepseek2: Mistral Large 3 (llama.cpp's converter, MistralMoeModel, writes that architecture)
ARCHITECTURES = ("mistral", "mixtral", "mistral3", "mistral4", "deepseek2")
# the general.architecture of the GGUF each one stands for (dense Mistral and Mixtral are llama)
GGUF_ARCHITECTURE = {
    "mistral": "llama",
    "mixtral": "llama",
    "mistral3": "mistral3",
    "mistral4": "mistral4",
    "deepseek2": "deepseek2",
}
CHAT_FORMATS = ("v1", "v2", "v3", "v3-tekken", "v7", "v11", "v13", "v15")  # chat/template.py's
THINKING_FORMATS = ("v13", "v15")  # the formats that encode [THINK]


@dataclass(frozen=True)
class ModelSpec:
    """One catalog entry."""

    name: str
    description: str
    architecture: str
    parameters: str
    source: str
    gguf_repo: str
    gguf_pattern: str
    quants: tuple[str, ...]
    default_quant: str
    chat_format: str
    context_length: int
    gated: bool
    aliases: tuple[str, ...] = ()
    synthetic: str = ""
    reasoning: bool = False  # thinks in [THINK]…[/THINK] before it answers
    size_q4_k_m: float = 0.0  # GB (10^9 bytes) of the Q4_K_M file(s); 0 for synthetic models
    purpose: str = ""  # what it is for, in a few words
    license: str = ""
    quant_files: dict[str, str] = field(default_factory=dict)  # quant -> the tag its files carry

    @property
    def calls_tools(self) -> bool:
        """Whether the model is trained to call tools: its format has tool tokens (v2 on)."""
        from localmix.chat.toolcalls import SYNTAX

        return self.chat_format in SYNTAX

    def file_quant(self, quant: str) -> str:
        """The quant tag the repo's file names carry for `quant` (MaziyarPanahi's 8x22B names
        its Q6_K files "Q6")."""
        return self.quant_files.get(quant, quant)

    def gguf_file(self, quant: str) -> str:
        """The GGUF file name for a quant in gguf_repo."""
        return self.gguf_pattern.replace("{quant}", self.file_quant(quant))


# field name -> (python type(s), required)
_FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "description": (str, True),
    "architecture": (str, True),
    "parameters": (str, True),
    "source": (str, True),
    "gguf_repo": (str, True),
    "gguf_pattern": (str, True),
    "quants": (list, True),
    "default_quant": (str, True),
    "chat_format": (str, True),
    "context_length": (int, True),
    "gated": (bool, True),
    "aliases": (list, False),
    "synthetic": (str, False),
    "reasoning": (bool, False),
    "size_q4_k_m": ((float, int), False),
    "purpose": (str, False),
    "license": (str, False),
    "quant_files": (dict, False),
}
assert set(_FIELDS) == {f.name for f in fields(ModelSpec)} - {"name"}


def _spec(path: Path, name: str, table: Any) -> ModelSpec:
    def fail(field_name: str, why: str) -> CatalogError:
        return CatalogError(
            f"{path}: model {name!r}, field {field_name!r}: {why}",
            hint="fix the entry, or remove it; `localmix list --available` shows the catalog",
        )

    if not isinstance(table, dict):
        raise fail("-", "expected a table")
    for key in table:
        if key not in _FIELDS:
            raise fail(key, f"unknown field (known: {', '.join(_FIELDS)})")
    values: dict[str, Any] = {}
    for key, (kind, required) in _FIELDS.items():
        if key not in table:
            if required:
                raise fail(key, "missing")
            continue
        value = table[key]
        # bool is an int in Python; a context length of `true` is still wrong.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        if kind is list:
            if not all(isinstance(item, str) for item in value):
                raise fail(key, "expected a list of strings")
            value = tuple(value)
        if kind is dict and not all(isinstance(v, str) for v in value.values()):
            raise fail(key, "expected a table of strings")
        values[key] = float(value) if key == "size_q4_k_m" else value
    _check_values(values, fail)
    return ModelSpec(name=name, **values)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return "number" if isinstance(kind, tuple) else kind.__name__


def _check_values(values: dict[str, Any], fail: Callable[[str, str], CatalogError]) -> None:
    """What the types alone do not say: known architectures and formats, sizes above 0, quants
    the entry lists."""
    if values["architecture"] not in ARCHITECTURES:
        raise fail("architecture", f"{values['architecture']!r} is not one of {ARCHITECTURES}")
    if values["chat_format"] not in CHAT_FORMATS:
        raise fail("chat_format", f"{values['chat_format']!r} is not one of {CHAT_FORMATS}")
    if values["context_length"] <= 0:
        raise fail("context_length", "must be positive")
    if values.get("reasoning") and values["chat_format"] not in THINKING_FORMATS:
        raise fail("reasoning", f"a reasoning model's chat format is one of {THINKING_FORMATS}")
    if values.get("size_q4_k_m", 0) < 0:
        raise fail("size_q4_k_m", "must be 0 (unknown) or more")
    quants = values["quants"]
    if quants and values["default_quant"] not in quants:
        raise fail("default_quant", f"{values['default_quant']!r} is not in quants")
    for quant in values.get("quant_files", {}):
        if quant not in quants:
            raise fail("quant_files", f"{quant!r} is not in quants")


def _read(path: Path, text: str) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}", hint="fix the file's syntax") from exc
    models = data.get("models", {})
    extra = set(data) - {"models"}
    if extra or not isinstance(models, dict):
        raise CatalogError(
            f"{path}: unexpected top-level key {sorted(extra)[0] if extra else 'models'!r}",
            hint='entries are tables named [models."NAME"]',
        )
    return {name: _spec(path, name, table) for name, table in models.items()}


@dataclass(frozen=True)
class Catalog:
    """All known models by name, with aliases."""

    models: dict[str, ModelSpec]
    aliases: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str) -> ModelSpec:
        """The spec for a name or alias; ModelNotFound with the nearest names otherwise."""
        key = name.lower()
        key = self.aliases.get(key, key)
        if key in self.models:
            return self.models[key]
        raise ModelNotFound(f"unknown model {name!r}", hint=self.suggest(name))

    def suggest(self, name: str) -> str:
        candidates = list(self.models) + list(self.aliases)
        near = difflib.get_close_matches(name.lower(), candidates, n=3, cutoff=0.5)
        if near:
            return "did you mean " + ", ".join(near) + "? `localmix list --available` shows all"
        return "`localmix list --available` shows the catalog; hf.co/ORG/REPO pulls any GGUF repo"


def load(user_path: Path | None = None) -> Catalog:
    """The shipped catalog plus the user's ($LOCALMIX_HOME/models.toml), which wins by name."""
    shipped = resources.files("localmix.models").joinpath("models.toml")
    models = _read(Path("localmix/models/models.toml"), shipped.read_text(encoding="utf-8"))
    user_path = user_path or settings.user_catalog_path()
    if user_path.is_file():
        try:
            text = user_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CatalogError(f"{user_path}: cannot read: {exc}") from exc
        models.update(_read(user_path, text))
    aliases: dict[str, str] = {}
    for spec in models.values():
        for alias in spec.aliases:
            aliases[alias.lower()] = spec.name
    return Catalog(models=models, aliases=aliases)


class RefKind(str, Enum):
    CATALOG = "catalog"  # a catalog entry
    HF_GGUF = "hf-gguf"  # hf.co/org/repo[:quant]: a repo of ready GGUF files
    HF_CHECKPOINT = "hf-checkpoint"  # org/repo: an original checkpoint to convert
    PATH = "path"  # a file or directory on disk


@dataclass(frozen=True)
class ModelRef:
    """What a user's model reference resolved to."""

    kind: RefKind
    name: str  # the store name this model gets
    quant: str | None = None
    spec: ModelSpec | None = None
    repo: str | None = None
    path: Path | None = None


def store_name(repo: str) -> str:
    """A store name for a Hub repo: `org/Repo-GGUF` -> `org--repo-gguf`... kept readable."""
    return repo.strip("/").replace("/", "--").lower()


def resolve(reference: str, catalog: Catalog | None = None) -> ModelRef:
    """Resolve what a user typed into a ModelRef (no network)."""
    text = reference.strip()
    if not text:
        raise ModelNotFound("empty model name", hint="try `localmix list --available`")
    if text.startswith(("hf.co/", "huggingface.co/", "https://huggingface.co/")):
        repo_part = text.split("co/", 1)[1]
        repo, quant = tags.split(repo_part)
        if repo.count("/") != 1:
            raise ModelNotFound(
                f"{reference!r} is not a Hub repo", hint="write hf.co/ORG/REPO[:QUANT]"
            )
        return ModelRef(RefKind.HF_GGUF, store_name(repo), quant=quant, repo=repo)
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) or path.suffix == ".gguf" or path.exists():
        return ModelRef(RefKind.PATH, path.stem, path=path)
    catalog = catalog or load()
    base, quant = tags.split(text)
    try:
        spec = catalog.get(base)
    except ModelNotFound:
        if base.count("/") == 1 and not base.startswith("/"):
            return ModelRef(RefKind.HF_CHECKPOINT, store_name(base), quant=quant, repo=base)
        # A catalog name with a tag that is not a quant, e.g. `mistral:v0.3`.
        spec = catalog.get(text)
        quant = None
    return ModelRef(RefKind.CATALOG, spec.name, quant=quant, spec=spec)
