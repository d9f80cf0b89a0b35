"""Tiny random-weight pixtral mmproj GGUFs (the vision tower and projector of Pixtral 12B and
Mistral Small 3.x), written directly with gguf-py, for the differential tests of llama.cpp's
vision encoder against tests/pixtral_reference.py.

The keys and tensors are the ones llama.cpp 0.3.36's clip loader reads for PROJECTOR_TYPE_PIXTRAL
(tools/mtmd/clip.cpp load_hparams / load_tensors, names from clip-impl.h), written as
convert_hf_to_gguf.py --mmproj writes them (conversion/base.py MmprojModel, conversion/llava.py
LlavaVisionModel): clip.* hyper-parameters, mistral-common's CLIP mean and std, SiLU-gated
feed-forward blocks, and the [IMG_BREAK] row of the text checkpoint's embeddings as
v.token_embd.img_break. A spatial merge above 1 adds Small 3.1's mm.input_norm and
mm.patch_merger; merge 1 is Pixtral 12B's layout (no merger tensors, no merge key).

    write(Path("mmproj.gguf"), TINY_SMALL_3, img_break=img_break_row(checkpoint_dir))
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import gguf
    import numpy as np

ARCH = "clip"  # gguf's MODEL_ARCH.MMPROJ: the dummy architecture clip.cpp expects
IMG_BREAK = 12  # tekken's [IMG_BREAK] rank
# mistral-common's DATASET_MEAN / DATASET_STD (the CLIP ones), as the converter writes them
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Pixtral:
    """A pixtral vision tower + projector (Hugging Face PixtralVisionConfig names in comments)."""

    n_embd: int  # hidden_size
    n_layer: int  # num_hidden_layers
    n_head: int  # num_attention_heads (head_dim = n_embd / n_head, a multiple of 4 for 2D RoPE)
    n_ff: int  # intermediate_size
    patch_size: int  # 14 for Small 3.x, 16 for Pixtral 12B
    merge: int  # spatial_merge_size: 2 for Small 3.x, 1 for Pixtral 12B (no patch merger)
    n_embd_text: int  # projection_dim: the text model's embedding width
    image_size: int  # clip.vision.image_size (1540 for Small 3.x, 1024 for Pixtral 12B)
    proj_bias: bool  # multimodal_projector_bias: mm.1 / mm.2 carry biases
    activation: str = "silu"  # hidden_act of the feed-forward blocks: "silu" or "gelu"
    eps: float = 1e-5  # layer_norm_eps (hard-coded in transformers' modeling_pixtral)

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(GGUF name, shape in ggml order: fastest-varying dimension first) in file order."""
        d, p, text = self.n_embd, self.patch_size, self.n_embd_text
        yield "v.patch_embd.weight", (p, p, 3, d)  # Conv2d(3, d, p, stride p, bias=False)
        yield "v.pre_ln.weight", (d,)
        for i in range(self.n_layer):
            b = f"v.blk.{i}."
            yield b + "ln1.weight", (d,)  # attention_norm
            for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
                yield b + proj + ".weight", (d, d)
            yield b + "ln2.weight", (d,)  # ffn_norm
            yield b + "ffn_gate.weight", (d, self.n_ff)
            yield b + "ffn_up.weight", (d, self.n_ff)
            yield b + "ffn_down.weight", (self.n_ff, d)
        if self.merge > 1:
            yield "mm.input_norm.weight", (d,)  # Mistral3MultiModalProjector.norm
            yield "mm.patch_merger.weight", (d * self.merge**2, d)  # merging_layer
        yield "mm.1.weight", (d, text)  # linear_1
        if self.proj_bias:
            yield "mm.1.bias", (text,)
        yield "mm.2.weight", (text, text)  # linear_2
        if self.proj_bias:
            yield "mm.2.bias", (text,)
        yield "v.token_embd.img_break", (text,)

    def add_hparams(self, w: gguf.GGUFWriter) -> None:
        """Every key the pixtral loader reads (the required ones and the merge size)."""
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type("pixtral")
        w.add_vision_projection_dim(self.n_embd_text)
        w.add_vision_image_size(self.image_size)
        w.add_vision_patch_size(self.patch_size)
        w.add_vision_embedding_length(self.n_embd)
        w.add_vision_feed_forward_length(self.n_ff)
        w.add_vision_block_count(self.n_layer)
        w.add_vision_head_count(self.n_head)
        w.add_vision_attention_layernorm_eps(self.eps)
        w.add_vision_image_mean(list(IMAGE_MEAN))
        w.add_vision_image_std(list(IMAGE_STD))
        # without either key clip.cpp falls back to quick-GELU, which no pixtral uses
        if self.activation == "silu":
            w.add_vision_use_silu(True)
        else:
            w.add_vision_use_gelu(True)
        if self.merge > 1:  # Pixtral 12B's files carry no merge key: clip.cpp defaults it to 1
            w.add_vision_spatial_merge_size(self.merge)


# Mistral Small 3.x's layout (patch 14, 2x2 merge, SiLU, no projector bias) in 0.2 MB, for a
# text model 64 wide (tests/tekken_files.random_model's tiny Mistral).
TINY_SMALL_3 = Pixtral(
    n_embd=32, n_layer=2, n_head=2, n_ff=64, patch_size=14, merge=2, n_embd_text=64,
    image_size=1540, proj_bias=False,
)  # fmt: skip
# Pixtral 12B's layout: patch 16, no merge, projector biases.
TINY_PIXTRAL_12B = Pixtral(
    n_embd=32, n_layer=2, n_head=2, n_ff=64, patch_size=16, merge=1, n_embd_text=64,
    image_size=1024, proj_bias=True,
)  # fmt: skip


def write(
    path: Path,
    spec: Pixtral = TINY_SMALL_3,
    *,
    seed: int = 0,
    dtype: str = "f32",
    img_break: np.ndarray | None = None,
    name: str = "tiny-pixtral",
) -> Path:
    """Write a random-weight pixtral mmproj to `path`; return it.

    dtype "f32" stores every tensor in F32 (for tight comparisons); "f16" stores the matrices and
    the patch kernel in F16 and the vectors in F32, as the converter's --outtype f16 does.
    img_break: the text model's [IMG_BREAK] embedding row (default: a seeded random row).
    """
    import gguf

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype {dtype!r}: f32 or f16")
    w = gguf.GGUFWriter(Path(path), ARCH)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    w.add_file_type(ftype)
    spec.add_hparams(w)
    for tensor_name, shape in spec.tensors():
        data = _tensor(seed, tensor_name, shape)
        if tensor_name == "v.token_embd.img_break" and img_break is not None:
            data = _checked_row(img_break, shape[0])
        w.add_tensor(tensor_name, data if len(shape) == 1 or dtype == "f32" else data.astype("f2"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def img_break_row(ckpt: Path, token: int = IMG_BREAK) -> np.ndarray:
    """Row `token` of a checkpoint's token embeddings (Mistral-native or Hugging Face layout) as
    float32: what the converter copies into v.token_embd.img_break, so the mmproj pairs with the
    text model converted from that checkpoint."""
    from .reference_forward import read_safetensors

    names = ("tok_embeddings.weight", "model.embed_tokens.weight")
    for file in sorted(Path(ckpt).glob("*.safetensors")):
        tensors = read_safetensors(file)
        for name in names:
            if name in tensors:
                return tensors[name][token]
    raise FileNotFoundError(f"{ckpt}: no {' or '.join(names)}")


def _tensor(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded per tensor: norms near 1, biases small, weights of std 1/sqrt(fan_in)."""
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(tuple(reversed(shape)), dtype=np.float32)  # numpy order
    if name.endswith(".bias") or name == "v.token_embd.img_break":
        return x * np.float32(0.1)
    if len(shape) == 1:
        return x * np.float32(0.1) + np.float32(1.0)
    return x * np.float32(math.prod(shape[:-1]) ** -0.5)  # every ggml dim but the output one


def _checked_row(row: np.ndarray, width: int) -> np.ndarray:
    import numpy as np

    row = np.asarray(row, dtype=np.float32)
    if row.shape != (width,):
        raise ValueError(f"img_break row of shape {row.shape}: the projection is {width} wide")
    return row
