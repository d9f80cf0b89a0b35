"""The grammar of a model reference's quant tag, written once: `NAME[:QUANT]` for the store and
the catalog (`mistral:v0.3:Q5_K_M`, `hf.co/org/repo:iq3_xxs`), a quant tag inside a GGUF file
name (`x.Q4_K_M.gguf`), and what `--quant` may name for a Hub GGUF.

A tag is one of llama.cpp's file types (Q4_K_M, IQ3_XXS, TQ1_0, MXFP4_MOE, the float types) or
a tag Hub repos carry that llama-quantize does not make (Q4_0_4_4, Q6_K_L): any such tag has a
base type of 1 to 8 bits. Case does not matter; tags are returned upper-case.
"""

from __future__ import annotations

import re

_TAG = r"(?:I?Q[1-8](?:_[0-9A-Z]+)*|TQ[12]_0|MXFP4(?:_MOE)?|BF16|F16|F32)"
_WHOLE = re.compile(_TAG, re.IGNORECASE)
# Between separators in a file name: `model-Q4_K_M.gguf`, not the Q3 inside `Q3Max`.
_IN_NAME = re.compile(rf"(?<![A-Za-z0-9]){_TAG}(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)


def is_quant(tag: str) -> bool:
    """Whether `tag` reads as a quant type."""
    return _WHOLE.fullmatch(tag) is not None


def split(reference: str) -> tuple[str, str | None]:
    """`mistral:v0.3:Q5_K_M` -> ("mistral:v0.3", "Q5_K_M"); a last part that is no quant tag
    stays in the name (`mistral:v0.3` -> ("mistral:v0.3", None))."""
    if ":" in reference:
        base, tag = reference.rsplit(":", 1)
        if is_quant(tag):
            return base, tag.upper()
    return reference, None


def in_filename(filename: str) -> str | None:
    """The quant a GGUF file name carries (`x.Q4_K_M.gguf` -> Q4_K_M; the last one wins), or
    None. A split GGUF's `-00001-of-00003` suffix is not part of it."""
    base = _SPLIT_SUFFIX.sub(".gguf", filename.rsplit("/", 1)[-1])
    stem = base[: -len(".gguf")] if base.lower().endswith(".gguf") else base
    found = _IN_NAME.findall(stem)
    return found[-1].upper() if found else None
