"""A small numpy reference of the pixtral vision encoder as llama.cpp 0.3.36 runs it, read from an
mmproj GGUF's own tensors (gguf's GGUFReader). It shares no code with llama.cpp or localmix, so
embeddings from mtmd that match these mean mtmd encoded the image the way the graph below says.

The computation (tools/mtmd/models/pixtral.cpp and clip.cpp's build_vit / build_rope_2d / build_ffn
/ build_attn; preprocessing in mtmd-image.cpp):
1. pixels: RGB bytes / 255, minus mean, over std per channel (clip_image_f32::normalize); an
   image whose sides are not already mtmd's target (multiples of patch*merge) is letterboxed
   into it first (aspect ratio kept, black bars), not stretched;
2. patch embedding: a patch x patch convolution with stride patch, no bias, pixels and kernel
   rounded to f16 (ggml_conv_2d's im2col is F16); patches row-major;
3. v.pre_ln RMSNorm; then per block: RMSNorm ln1, q/k/v (no bias), 2D RoPE on q and k, softmax
   attention over every patch (no mask), attn_out, residual; RMSNorm ln2, SiLU- (or GELU-) gated
   feed-forward, residual; no final norm;
4. Small 3.1's merger (when mm.patch_merger.weight exists): RMSNorm mm.input_norm, each merge x
   merge block of patches concatenated channel-major (torch unfold's order), mm.patch_merger;
5. projector: mm.1 (+bias), GELU (tanh form), mm.2 (+bias);
6. the v.token_embd.img_break row after every row of tokens but the last.
Math in float64, except where llama.cpp itself rounds: the patch convolution's f16 inputs
(every backend) and GELU's f16 table (the CPU backend, see _gelu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

ROPE_THETA = 10000.0  # clip.cpp hard-codes it for pixtral; no key is read
PIXTRAL_TOKENS = (8, 1024)  # clip.cpp's set_limit_image_tokens(8, 1024) for pixtral


@dataclass(frozen=True)
class Vision:
    """An mmproj's pixtral hyper-parameters and its tensors (float64, numpy order)."""

    n_embd: int
    n_head: int
    n_layer: int
    patch_size: int
    merge: int
    eps: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    silu: bool  # clip.use_silu; else clip.use_gelu
    tensors: dict[str, np.ndarray]

    @property
    def align(self) -> int:
        """An image side must be a multiple of this (one merged token's width in pixels)."""
        return self.patch_size * self.merge


def load(mmproj: Path) -> Vision:
    """The pixtral encoder stored in an mmproj GGUF."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(mmproj)

    def field(key: str, default: object = None) -> object:
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    if field("clip.projector_type") != "pixtral":
        raise ValueError(f"{mmproj}: not a pixtral mmproj")
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    return Vision(
        n_embd=int(field("clip.vision.embedding_length")),
        n_head=int(field("clip.vision.attention.head_count")),
        n_layer=int(field("clip.vision.block_count")),
        patch_size=int(field("clip.vision.patch_size")),
        merge=int(field("clip.vision.spatial_merge_size", 1)),
        eps=float(field("clip.vision.attention.layer_norm_epsilon")),
        mean=tuple(field("clip.vision.image_mean")),
        std=tuple(field("clip.vision.image_std")),
        silu=bool(field("clip.use_silu", False)),
        tensors={k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()},
    )


# ---- preprocessing (mtmd_image_preprocessor_dyn_size) ----


def target_size(
    width: int, height: int, vision: Vision, min_tokens: int = -1, max_tokens: int = -1
) -> tuple[int, int]:
    """The size mtmd resizes an image to (img_tool::calc_size_preserved_ratio): each side rounded
    half away from zero to a multiple of patch*merge, then scaled down (floored) or up (ceiled)
    to fit the token limits; -1 keeps pixtral's own limit (8 and 1024 tokens)."""
    align = vision.align
    low = (min_tokens if min_tokens > 0 else PIXTRAL_TOKENS[0]) * align * align
    high = (max_tokens if max_tokens > 0 else PIXTRAL_TOKENS[1]) * align * align
    w = max(align, _round_half_up(width / align) * align)
    h = max(align, _round_half_up(height / align) * align)
    if w * h > high:
        beta = math.sqrt(height * width / high)
        w, h = (max(align, math.floor(side / beta / align) * align) for side in (width, height))
    elif w * h < low:
        beta = math.sqrt(low / (height * width))
        w, h = (math.ceil(side * beta / align) * align for side in (width, height))
    return w, h


def preprocess(rgb: np.ndarray, vision: Vision, size: tuple[int, int] | None = None) -> np.ndarray:
    """(3, H, W) float pixels as mtmd hands them to the encoder. rgb: (H, W, 3) uint8; size:
    the target (width, height), default the image's own: an image already at its target is
    used as it is, any other is letterboxed into it (_letterbox)."""
    import numpy as np

    if size is not None and size != (rgb.shape[1], rgb.shape[0]):
        rgb = _letterbox(rgb, size)
    # float32 as clip_image_f32::from_u8 / normalize compute it
    x = rgb.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(vision.mean)) / np.float32(vision.std)
    return x.transpose(2, 0, 1).astype(np.float64)


def _letterbox(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """img_tool::resize with pixtral's PAD_CEIL (clip_hparams' default, which pixtral keeps): the
    image keeps its aspect ratio, scaled (float32 math, sides ceiled) to fit `size`, resampled
    with Pillow's bicubic (mtmd's resize_pillow reimplements it), centred on black."""
    import numpy as np
    from PIL import Image

    (height, width), (tw, th) = rgb.shape[:2], size
    scale = min(np.float32(tw) / np.float32(width), np.float32(th) / np.float32(height))
    new_w = min(math.ceil(np.float32(width) * scale), tw)
    new_h = min(math.ceil(np.float32(height) * scale), th)
    resized = Image.fromarray(rgb, "RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
    out = np.zeros((th, tw, 3), dtype=np.uint8)
    x0, y0 = (tw - new_w) // 2, (th - new_h) // 2
    out[y0 : y0 + new_h, x0 : x0 + new_w] = np.asarray(resized)
    return out


# ---- the encoder ----


@dataclass(frozen=True)
class Encoded:
    """The reference's embeddings, and how far llama.cpp may honestly differ beyond f32 noise."""

    embd: np.ndarray  # (n_tokens, n_embd_text), [IMG_BREAK] rows included
    slack: np.ndarray  # same shape: the GELU table's rounding ambiguity (_gelu_slack)


def encode(vision: Vision, pixels: np.ndarray) -> Encoded:
    """The embeddings mtmd should output for a preprocessed (3, H, W) image."""
    import numpy as np

    t = vision.tensors
    rows, cols = pixels.shape[1] // vision.patch_size, pixels.shape[2] // vision.patch_size
    x = _rms_norm(_patch_embed(pixels, t["v.patch_embd.weight"]), t["v.pre_ln.weight"], vision)
    for i in range(vision.n_layer):
        x = _block(x, vision, f"v.blk.{i}.", rows, cols)
    if "mm.patch_merger.weight" in t:
        x = _rms_norm(x, t["mm.input_norm.weight"], vision)
        x = _linear(_unfold(x, rows, cols, vision.merge), t, "mm.patch_merger")
    hidden = _linear(x, t, "mm.1")
    embd = _linear(_gelu(hidden), t, "mm.2")
    slack = _gelu_slack(hidden) @ np.abs(t["mm.2.weight"]).T  # mm.2 is linear in GELU's output
    img_break = t["v.token_embd.img_break"]
    return Encoded(
        _with_breaks(embd, rows // vision.merge, img_break),
        _with_breaks(slack, rows // vision.merge, np.zeros_like(img_break)),
    )


def _patch_embed(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """ggml_conv_2d with stride = kernel size: (rows*cols, n_embd), row-major patches. Its
    im2col is F16 whatever the kernel's type (ggml.c), so the pixels are rounded to f16, and the
    product with that F16 matrix rounds the kernel to f16 too (F16's vec_dot_type)."""
    import numpy as np

    n_embd, _, p, _ = kernel.shape  # numpy order of ggml's [p, p, 3, n_embd]
    c, height, width = pixels.shape
    patches = pixels.reshape(c, height // p, p, width // p, p).transpose(1, 3, 0, 2, 4)
    patches, kernel = (z.astype(np.float16).astype(np.float64) for z in (patches, kernel))
    return patches.reshape(-1, c * p * p) @ kernel.reshape(n_embd, -1).T


def _block(x: np.ndarray, vision: Vision, b: str, rows: int, cols: int) -> np.ndarray:
    import numpy as np

    t = vision.tensors
    h = _rms_norm(x, t[b + "ln1.weight"], vision)
    q, k, v = (_heads(h @ t[f"{b}attn_{n}.weight"].T, vision.n_head) for n in "qkv")
    pos_h, pos_w = _grid(rows, cols)
    q, k = (_rope_2d(z, pos_h, pos_w) for z in (q, k))
    x = x + _attention(q, k, v) @ t[b + "attn_out.weight"].T
    h = _rms_norm(x, t[b + "ln2.weight"], vision)
    gate, up = h @ t[b + "ffn_gate.weight"].T, h @ t[b + "ffn_up.weight"].T
    act = gate / (1.0 + np.exp(-gate)) if vision.silu else _gelu(gate)
    return x + (act * up) @ t[b + "ffn_down.weight"].T


def _rms_norm(x: np.ndarray, weight: np.ndarray, vision: Vision) -> np.ndarray:
    import numpy as np

    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + vision.eps) * weight


def _heads(x: np.ndarray, n_head: int) -> np.ndarray:
    """(n_pos, n_head, d_head): head h is columns h*d_head ... (h+1)*d_head - 1."""
    return x.reshape(x.shape[0], n_head, -1)


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's row and column (clip.cpp's pos_h = i / cols, pos_w = i % cols)."""
    import numpy as np

    i = np.arange(rows * cols)
    return i // cols, i % cols


def _rope_2d(x: np.ndarray, pos_h: np.ndarray, pos_w: np.ndarray) -> np.ndarray:
    """build_rope_2d: two plain (adjacent-pair) RoPEs over half the head each. Dims [0, d/2)
    turn by row * theta^(-4j/d), dims [d/2, d) by column * theta^(-(4j+2)/d), j = pair index:
    the even and odd frequencies of one d-wide RoPE, as Pixtral's 2D rotary embedding has it."""
    import numpy as np

    d = x.shape[-1]
    j = np.arange(d // 4)
    first = _rotate_pairs(x[..., : d // 2], pos_h[:, None] * ROPE_THETA ** (-4.0 * j / d))
    second = _rotate_pairs(x[..., d // 2 :], pos_w[:, None] * ROPE_THETA ** (-(4.0 * j + 2) / d))
    return np.concatenate([first, second], axis=-1)


def _rotate_pairs(x: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rotate (x[2j], x[2j+1]) by angle[pos, j] in every head (GGML_ROPE_TYPE_NORMAL)."""
    import numpy as np

    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Softmax attention of every patch over every patch, scaled by 1/sqrt(d_head)."""
    import numpy as np

    scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = scores / scores.sum(axis=-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", weights, v)
    return out.reshape(out.shape[0], -1)


def _unfold(x: np.ndarray, rows: int, cols: int, s: int) -> np.ndarray:
    """Each s x s block of patches as one row of s*s*n_embd, ordered channel, then block row,
    then block column (torch unfold; ggml_im2col in pixtral.cpp); blocks row-major."""
    d = x.shape[-1]
    blocks = x.reshape(rows // s, s, cols // s, s, d).transpose(0, 2, 4, 1, 3)
    return blocks.reshape(-1, d * s * s)


def _linear(x: np.ndarray, t: dict[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y


def _gelu(x: np.ndarray, x_nudge: float = 0.0, y_nudge: float = 0.0) -> np.ndarray:
    """ggml_gelu on the CPU backend: the tanh form looked up in a table indexed by x rounded to
    f16, the entries f16 too (ggml-cpu vec.h, GGML_GELU_FP16), identity above 10, 0 below -10.
    Other backends compute it in f32; the table costs ~5e-4 relative, far above f32 noise.
    The nudges (relative) move x before its rounding and an entry before its own, for
    _gelu_slack."""
    import numpy as np

    x16 = (x + x_nudge * (np.abs(x) + 1.0)).astype(np.float16).astype(np.float64)
    entry = 0.5 * x16 * (1 + np.tanh(math.sqrt(2 / math.pi) * x16 * (1 + 0.044715 * x16 * x16)))
    y = (entry * (1 + y_nudge)).astype(np.float16).astype(np.float64)
    return np.where(x >= 10.0, x, np.where(x <= -10.0, 0.0, y))


def _gelu_slack(x: np.ndarray) -> np.ndarray:
    """How far llama.cpp's GELU output may honestly be from _gelu's, elementwise: its x (f32,
    summed in another order) within noise of a midpoint between two f16 values may round to
    the other one, and its f32 table entries (tanhf, maybe fused multiply-adds) may round to the
    neighbouring f16 where the exact value lies near a midpoint. 0 almost everywhere."""
    import numpy as np

    # both ten times the ~1e-7 relative differences measured in practice
    tries = [_gelu(x, dx, dy) for dx in (-1e-6, 1e-6) for dy in (-1e-6, 1e-6)]
    return np.max(tries, axis=0) - np.min(tries, axis=0)


def _with_breaks(x: np.ndarray, rows: int, img_break: np.ndarray) -> np.ndarray:
    """The [IMG_BREAK] embedding after each row of tokens but the last."""
    import numpy as np

    grid = x.reshape(rows, -1, x.shape[-1])
    breaks = np.broadcast_to(img_break, (rows, 1, x.shape[-1]))
    return np.concatenate([grid, breaks], axis=1).reshape(-1, x.shape[-1])[:-1]


def _round_half_up(x: float) -> int:
    """std::round for the positive ratios mtmd rounds (Python's round() rounds half to even)."""
    return math.floor(x + 0.5)
