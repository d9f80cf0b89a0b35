"""Tekken tokenizer files of the versions mistral-common knows but does not ship (v11, v13, v15),
made from the one it ships (tekken_240911.json) as Mistral's released files are laid out.

Released v11+ files list their special tokens themselves. Ranks 0-19 are the old fixed ones;
[ARGS] 32, [CALL_ID] 33, [THINK] 34, [/THINK] 35, [MODEL_SETTINGS] 36 and [/MODEL_SETTINGS] 37 are
the ranks mistral-common's own tests expect of the pinned Magistral-Small-2507 (v13) and
Mistral-Small-4-119B-2603 (v15) files; unused ranks carry mistral-common's <SPECIAL_i> filler.
The v15 file carries Mistral Small 4's reasoning_effort builder: values none / high, default none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

_FIXED = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)  # fmt: skip
_ADDED = {
    "v11": {32: "[ARGS]", 33: "[CALL_ID]"},
    "v13": {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"},
    "v15": {
        **{32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"},
        **{36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]"},
    },
}
SMALL_4_SETTINGS = {
    "reasoning_effort": {
        "type": "enum",
        "accepts_none": True,
        "default": "none",
        "values": ["none", "high"],
    }
}


def shipped(name: str) -> Path:
    """A tokenizer file mistral-common ships."""
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / name


# Mistral Small 3.x's image settings (patch 14, up to 1540 pixels, 2x2 merge)
SMALL_3_IMAGE = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}


def tekken_file(
    version: str, folder: Path, vocab_size: int | None = None, image: dict | None = None
) -> Path:
    """tekken.json of `version` ("v7", "v11", "v13", "v15") in folder; v7 is tekken_240911
    relabelled (Mistral Small 3's rules, its special tokens the old fixed list). vocab_size cuts
    the vocabulary (special tokens included) for scripted models that need only its start;
    image: the image settings of a vision model's tokenizer (None: text only)."""
    data = json.loads(shipped("tekken_240911.json").read_text(encoding="utf-8"))
    data["config"]["version"] = version
    if vocab_size is not None:
        data["config"]["default_vocab_size"] = vocab_size
    data.pop("image", None)  # text only: no image encoder to configure
    if image is not None:
        data["image"] = image
    if version in _ADDED:
        n = data["config"]["default_num_special_tokens"]
        names = dict(enumerate(_FIXED)) | _ADDED[version]
        data["special_tokens"] = [
            {"rank": i, "token_str": names.get(i, f"<SPECIAL_{i}>"), "is_control": True}
            for i in range(n)
        ]
    if version == "v15":
        data["model_settings_builder"] = SMALL_4_SETTINGS
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ("" if vocab_size is None else f"_{vocab_size}") + ("" if image is None else "_image")
    path = folder / f"tekken_{version}{suffix}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def checkpoint_with(tokenizer_file: Path, folder: Path, synth_tokenizer: str = "tekken") -> Path:
    """A tiny Mistral-native synth checkpoint whose tokenizer is `tokenizer_file` (same size)."""
    from localmix.build.synth import checkpoints as synth

    ckpt = synth.checkpoint(
        folder / "ckpt", size="tiny", tokenizer=synth_tokenizer, layout="mistral", seed=0
    )
    for old in [*ckpt.glob("tokenizer.model*"), *ckpt.glob("tekken*.json")]:
        old.unlink()
    suffix = tokenizer_file.suffix
    native = "tekken.json" if suffix == ".json" else "tokenizer.model" + suffix
    shutil.copyfile(tokenizer_file, ckpt / native)
    return ckpt


def tekken_gguf(version: str, folder: Path) -> tuple[Path, Path]:
    """(tokenizer file, tiny f16 GGUF converted from a checkpoint with it)."""
    from localmix.build.convert import convert

    tok = tekken_file(version, folder)
    ckpt = checkpoint_with(tok, folder)
    return tok, convert(ckpt, folder / "model.gguf", outtype="f16")


def random_model(folder: Path, tokenizer_file: Path, synth_tokenizer: str = "tekken") -> Path:
    """A tiny random-weight f16 GGUF converted from a checkpoint with `tokenizer_file` (its own
    LOCALMIX_HOME, kept apart from the test's)."""
    import pytest

    from localmix.build.convert import convert

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMIX_HOME", str(folder / "home"))
        ckpt = checkpoint_with(tokenizer_file, folder, synth_tokenizer=synth_tokenizer)
        return convert(ckpt, folder / "model.gguf", outtype="f16")
