"""Checkpoint -> GGUF on gguf-py: detect the layout and architecture, pick the registered
converter, stream the tensors into a temporary file, and move it into place only when complete.

    convert(Path("Mistral-7B-Instruct-v0.3"), Path("mistral.f16.gguf"), outtype="f16")
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from localmix import disk, settings
from localmix.build.convert.output import OUTTYPES
from localmix.errors import CheckpointError, OutputError
from localmix.progress import OnProgress, Progress

if TYPE_CHECKING:
    from localmix.build.convert.checkpoint import Checkpoint

__all__ = [
    "OUTTYPES", "check_config", "convert", "converter_for", "register",
]  # fmt: skip

_CONVERTERS: dict[str, type] = {}
_C = TypeVar("_C", bound=type)
# modules that register converters, imported on first use so `import localmix.build.convert` stays light
_FAMILIES = ("localmix.build.convert.llama", "localmix.build.convert.mistral3")
GGUF_HINT = "pull a ready GGUF of it instead: localmix pull hf.co/ORG/REPO-GGUF:Q4_K_M"
# Why localmix leaves these to a ready GGUF (the README's architecture table says the same).
_NOT_CONVERTED = {
    "mistral4": (
        "Mistral Small 4 (mistral4: latent attention, 128 experts) is not converted by localmix: "
        "llama.cpp's own converter writes it as mistral4 from the Hugging Face files and as "
        "deepseek2 from Mistral's, and the release is FP8"
    ),
}


def register(*names: str) -> Callable[[_C], _C]:
    """Class decorator: the converter for these architecture names (HF `architectures[0]`, or
    "mistral" / "mixtral" for Mistral-native checkpoints)."""

    def add(cls: _C) -> _C:
        for name in names:
            _CONVERTERS[name] = cls
        return cls

    return add


def converter_for(ckpt: Checkpoint) -> Any:
    """An instance of the converter registered for the checkpoint's architecture."""
    return _converter_class(ckpt.layout, ckpt.config, ckpt.config_file)(ckpt)


def check_config(config_file: Path) -> None:
    """CheckpointError, with a hint, for a checkpoint localmix will not convert, told from its
    config.json or params.json alone (so `pull` can refuse before downloading the weights)."""
    from localmix.build.convert.checkpoint import _read_json

    layout = "mistral" if Path(config_file).name == "params.json" else "hf"
    _converter_class(layout, _read_json(Path(config_file)), Path(config_file))


def _converter_class(layout: str, config: dict[str, Any], config_file: Path) -> type:
    import importlib

    from localmix.build.convert.checkpoint import native_architecture
    from localmix.build.convert.llama import text_config

    for module in _FAMILIES:
        importlib.import_module(module)
    text = text_config(config)
    quantized = text.get("quantization_config") or text.get("quantization")
    if quantized:
        method = quantized.get("quant_method") or quantized.get("qformat_weight") or "quantized"
        raise CheckpointError(
            f"{config_file}: the weights are quantized ({method}); localmix converts 16- and "
            "32-bit checkpoints",
            hint=f"pull its BF16 release if there is one, or {GGUF_HINT}",
        )
    if layout == "mistral":
        arch = native_architecture(config)
    else:
        archs = config.get("architectures") or []
        if not archs or not isinstance(archs, list):
            raise CheckpointError(
                f"{config_file}: no 'architectures' entry",
                hint="a Hugging Face config.json names its model class there",
            )
        arch = str(archs[0])
        if text.get("model_type") in _NOT_CONVERTED:
            arch = str(text["model_type"])
    if arch in _NOT_CONVERTED:
        raise CheckpointError(f"{config_file}: {_NOT_CONVERTED[arch]}", hint=GGUF_HINT)
    cls = _CONVERTERS.get(arch)
    if cls is None:
        supported = ", ".join(sorted(n for n in _CONVERTERS if n[0].isupper()))
        raise CheckpointError(
            f"{config_file}: unsupported architecture {arch}",
            hint=f"localmix converts {supported} checkpoints",
        )
    return cls


def convert(
    src: Path,
    out: Path,
    *,
    outtype: str = "f16",
    progress: OnProgress | None = None,
) -> Path:
    """Convert a HF or Mistral-native checkpoint directory to one GGUF file at `out`; return `out`.

    outtype: f32, f16, bf16 or q8_0 (1-D tensors, norms and the MoE router stay F32). Peak memory
    follows one block of rows, not the model. Nothing appears at `out` unless the file is complete.
    progress hears the conversion start (subject: the output type) and then each tensor.
    """
    import gguf

    from localmix.build.convert.checkpoint import open_checkpoint
    from localmix.build.convert.output import check_outtype, file_type, stream
    from localmix.build.convert.vocab import add_vocab
    from localmix.models import store

    outtype = check_outtype(outtype)
    ckpt = open_checkpoint(Path(src))
    conv = converter_for(ckpt)
    tensors = conv.tensors(outtype)
    out = Path(out)
    _check_output(out)
    store.clean_tmp()  # leftovers of a convert (or pull) that was killed
    with disk.staged(out, directory=settings.tmp_dir()) as tmp:
        writer = gguf.GGUFWriter(None, conv.gguf_arch)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, _f32(), t.nbytes, raw_dtype=t.qtype)
        conv.add_metadata(writer, file_type(outtype))
        add_vocab(writer, ckpt, conv.hp.vocab_size)
        disk.check_space({tmp.parent: (sum(t.nbytes for t in tensors), "the GGUF")})
        if progress:
            progress(Progress("convert", subject=outtype.upper()))
        stream(writer, tmp, tensors, progress)
    return out


def _f32() -> Any:
    import numpy as np

    return np.dtype(np.float32)


def _check_output(out: Path) -> None:
    """Fail before any work if `out` cannot be written: its folder, made if need be, must be one."""
    if out.is_dir():
        raise OutputError(f"{out}: is a directory", hint="give a file name ending in .gguf")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot write {out}: {exc.strerror or exc}", hint="choose another output path"
        ) from None
    if not os.access(out.parent, os.W_OK):
        raise OutputError(
            f"cannot write {out}: permission denied", hint="choose another output path"
        )
