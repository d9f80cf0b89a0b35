"""Which files of a Hub repo make a model: the GGUF for a quant (every part of a split GGUF), or
the safetensors checkpoint set to convert. Pure functions over file names; no network."""

from __future__ import annotations

import re
from collections.abc import Sequence

from localmix.errors import CheckpointError, ModelNotFound
from localmix.models import tags

_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q6_K", "Q8_0", "F16", "BF16", "F32")
_CHECKPOINT_TOKENIZER_RE = re.compile(
    r"^(tokenizer\.model(\.v\d+)?|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|tekken\.json|generation_config\.json)$"
)


def _gguf_groups(names: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """quant -> {model file stem -> its files (shards sorted)}; projector files left out."""
    groups: dict[str, dict[str, list[str]]] = {}
    for name in names:
        base = name.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base or "imatrix" in base:
            continue
        quant = tags.in_filename(name) or tags.in_filename(name.replace("/", "-"))
        if quant is None:
            continue
        stem = _SPLIT_RE.sub("", name)
        groups.setdefault(quant, {}).setdefault(stem, []).append(name)
    for by_stem in groups.values():
        for files in by_stem.values():
            files.sort()
    return groups


def gguf_quants(names: Sequence[str]) -> list[str]:
    """The quants a repo's GGUF files offer, sorted."""
    return sorted(_gguf_groups(names))


def choose_gguf(
    names: Sequence[str], quant: str | None, *, repo: str = "", preferred: str | None = None
) -> tuple[str, list[str]]:
    """The GGUF file(s) for a quant (all shards of a split GGUF), case-insensitively.

    With no quant, Q4_K_M or the nearest common choice. `preferred` (a catalog file name)
    breaks ties between several models in one repo. Returns (quant, files).
    """
    groups = _gguf_groups(names)
    where = f" in {repo}" if repo else ""
    if not groups:
        raise ModelNotFound(
            f"no GGUF files{where}",
            hint="for an original checkpoint write ORG/REPO without hf.co/, "
            "and localmix converts it",
        )
    if quant is None:
        quant = next((q for q in _DEFAULT_QUANTS if q in groups), None)
        if quant is None:
            if len(groups) > 1:
                raise ModelNotFound(
                    f"no default quant{where}; choose one",
                    hint="available: " + ", ".join(sorted(groups)) + " (use --quant or NAME:QUANT)",
                )
            quant = next(iter(groups))
    quant = quant.upper()
    if quant not in groups:
        raise ModelNotFound(
            f"no {quant} file{where}",
            hint="available: " + ", ".join(sorted(groups)) + " (use --quant or NAME:QUANT)",
        )
    by_stem = groups[quant]
    stems = sorted(by_stem)
    if preferred:
        # a stem is a file name without its split suffix and, when split, without ".gguf"
        def base(name: str) -> str:
            return _SPLIT_RE.sub("", name).rsplit("/", 1)[-1].lower().removesuffix(".gguf")

        stems.sort(key=lambda s: base(s) != base(preferred))
    files = by_stem[stems[0]]
    match = _SPLIT_RE.search(files[0])
    if match and len(files) != int(match.group(2)):
        raise ModelNotFound(
            f"{files[0]}{where}: split into {int(match.group(2))} parts but {len(files)} are listed",
            hint="the repo is incomplete; try another quant",
        )
    return quant, files


def checkpoint_files(names: Sequence[str]) -> list[str]:
    """The files a conversion needs: config, safetensors (+ index), tokenizer; one layout only.

    A repo with both layouts (HF `config.json` + `model-*.safetensors`, Mistral-native
    `params.json` + `consolidated.safetensors`) gets the HF one; .bin/.pth weights never.
    """
    top = [n for n in names if "/" not in n]
    tokenizer = [n for n in top if _CHECKPOINT_TOKENIZER_RE.match(n)]
    safetensors = [n for n in top if n.endswith(".safetensors")]
    hf_weights = [n for n in safetensors if not n.startswith("consolidated")]
    native_weights = [n for n in safetensors if n.startswith("consolidated")]
    if "config.json" in top and hf_weights:
        index = [n for n in top if n == "model.safetensors.index.json"]
        return sorted(["config.json", *index, *hf_weights, *tokenizer])
    if "params.json" in top and native_weights:
        return sorted(["params.json", *native_weights, *tokenizer])
    has_pickles = any(n.endswith((".bin", ".pth", ".pt")) for n in top)
    raise CheckpointError(
        "no safetensors checkpoint (config.json or params.json with *.safetensors) in the repo",
        hint="localmix does not load .bin/.pth pickles; pick a repo with safetensors"
        if has_pickles
        else "pull a GGUF repo with hf.co/ORG/REPO instead",
    )
