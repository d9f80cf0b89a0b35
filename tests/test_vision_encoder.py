"""llama.cpp's pixtral vision encoder (libmtmd, through llama-cpp-python's bindings) against the
numpy reference in tests/pixtral_reference.py, on tiny random-weight mmproj files
(tests/synth_mmproj.py) paired with a tiny tekken text model: the image chunk's size, the text mtmd
puts around it, and its output embeddings, for Small 3.x's layout (patch 14, 2x2 merge) and
Pixtral 12B's (patch 16, no merge).

mtmd runs on the CPU with flash attention off, so the whole graph is f32 (the f16 steps it keeps
are in the reference); the flash-attention and f16-weight runs get tolerances of their own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from . import pixtral_reference as ref
from . import synth_mmproj

PROMPT = (b"[INST]", b"What is this?[/INST]")  # the media marker goes between the two
BOS, INST, IMG_END = 1, 3, 13
# beyond the reference's slack; outputs are of magnitude ~3
TOL_F32 = 1e-5  # measured at most 5e-7 on 135 seeded images of 9 sizes
TOL_FLASH = 1e-2  # flash attention casts K and V to f16: measured 1.5e-3
TOL_F16 = 1e-2  # F16 weights round every product's activations to f16: measured 1.4e-3
_FLASH_OFF, _FLASH_AUTO = 0, -1  # enum llama_flash_attn_type


@dataclass(frozen=True)
class Chunk:
    kind: str  # "text" or "image"
    tokens: tuple[int, ...]  # a text chunk's tokens
    n_tokens: int
    n_pos: int


@functools.cache
def _mtmd() -> tuple[Any, Any, Any]:
    """(llama_cpp, its mtmd bindings, a log callback that drops everything), imported the way
    localmix imports llama_cpp."""
    from localmix.llama.backend import llama

    lib = llama()
    import llama_cpp.mtmd_cpp as mtmd

    return lib, mtmd, lib.llama_log_callback(lambda level, text, user: None)


class Mtmd:
    """An mtmd context on the CPU over a vocab-only text model, with the token limits given."""

    def __init__(self, text: Path, mmproj: Path, *, min_tokens: int = 1, max_tokens: int = 4096,
                 flash: int = _FLASH_OFF) -> None:  # fmt: skip
        lib, mtmd, quiet = _mtmd()
        lib.llama_log_set(quiet, None)
        mtmd.mtmd_log_set(quiet, None)
        params = lib.llama_model_default_params()
        params.vocab_only = True  # mtmd needs the vocabulary and n_embd, not the weights
        self._model = lib.llama_model_load_from_file(str(text).encode(), params)
        assert self._model, text
        ctx_params = mtmd.mtmd_context_params_default()
        ctx_params.use_gpu = False
        ctx_params.n_threads = 2
        ctx_params.warmup = False
        ctx_params.flash_attn_type = flash
        ctx_params.image_min_tokens = min_tokens  # -1: the mmproj's own (8 for pixtral)
        ctx_params.image_max_tokens = max_tokens  # -1: 1024 for pixtral
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self._model, ctx_params)
        assert self._ctx, mmproj
        self._chunks: Any = None

    def __enter__(self) -> Mtmd:
        return self

    def __exit__(self, *exc: object) -> None:
        lib, mtmd, _ = _mtmd()
        self._free_chunks()
        mtmd.mtmd_free(self._ctx)
        lib.llama_model_free(self._model)

    def tokenize(self, rgb: np.ndarray, add_special: bool = True) -> list[Chunk]:
        """PROMPT around one image (rgb: (H, W, 3) uint8), as mtmd_tokenize splits it."""
        _, mtmd, _ = _mtmd()
        self._free_chunks()
        self._chunks = mtmd.mtmd_input_chunks_init()
        text = PROMPT[0] + mtmd.mtmd_default_marker() + PROMPT[1]
        inp = mtmd.mtmd_input_text(text, len(text), add_special, True)
        pixels = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb).tobytes())
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], pixels)
        try:
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            assert mtmd.mtmd_tokenize(self._ctx, self._chunks, ctypes.byref(inp), bitmaps, 1) == 0
        finally:
            mtmd.mtmd_bitmap_free(bitmap)  # the chunks keep their own preprocessed copy
        return [self._chunk(i) for i in range(mtmd.mtmd_input_chunks_size(self._chunks))]

    def encode(self, index: int, n_embd: int) -> np.ndarray:
        """Chunk `index`'s embeddings after mtmd_encode_chunk: (n_tokens, n_embd) float32."""
        _, mtmd, _ = _mtmd()
        chunk = mtmd.mtmd_input_chunks_get(self._chunks, index)
        assert mtmd.mtmd_encode_chunk(self._ctx, chunk) == 0
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        out = mtmd.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(out, shape=(n_tokens, n_embd)).copy()

    def _chunk(self, index: int) -> Chunk:
        _, mtmd, _ = _mtmd()
        chunk = mtmd.mtmd_input_chunks_get(self._chunks, index)
        image = mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE
        tokens: tuple[int, ...] = ()
        if not image:
            n = ctypes.c_size_t()
            ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            tokens = tuple(ids[i] for i in range(n.value))
        return Chunk(
            "image" if image else "text",
            tokens,
            mtmd.mtmd_input_chunk_get_n_tokens(chunk),
            mtmd.mtmd_input_chunk_get_n_pos(chunk),
        )

    def _free_chunks(self) -> None:
        if self._chunks is not None:
            _mtmd()[1].mtmd_input_chunks_free(self._chunks)
            self._chunks = None


# ---- the files ----


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, its f16 GGUF): a tiny random-weight Mistral (llama architecture, 64 wide)
    with a tekken v7 vocabulary and Small 3.x's image settings: [IMG] 10, [IMG_BREAK] 12,
    [IMG_END] 13."""
    from .tekken_files import SMALL_3_IMAGE, random_model, tekken_file

    folder = tmp_path_factory.mktemp("vision-text")
    gguf = random_model(folder, tekken_file("v7", folder, image=SMALL_3_IMAGE))
    return folder / "ckpt", gguf  # random_model builds its checkpoint there


@pytest.fixture(scope="module")
def text_gguf(text_model: tuple[Path, Path]) -> Path:
    return text_model[1]


@pytest.fixture(scope="module")
def mmprojs(
    text_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The mmproj variants, each carrying the text checkpoint's [IMG_BREAK] row."""
    folder = tmp_path_factory.mktemp("mmproj")
    row = synth_mmproj.img_break_row(text_model[0])
    variants = {
        "small3": (synth_mmproj.TINY_SMALL_3, "f32"),
        "small3-f16": (synth_mmproj.TINY_SMALL_3, "f16"),
        "pixtral12b": (synth_mmproj.TINY_PIXTRAL_12B, "f32"),
    }
    return {
        name: synth_mmproj.write(folder / f"{name}.gguf", spec, dtype=dtype, img_break=row)
        for name, (spec, dtype) in variants.items()
    }


Contexts = Callable[..., Mtmd]


@pytest.fixture(scope="module")
def contexts(text_gguf: Path, mmprojs: dict[str, Path]) -> Iterator[Contexts]:
    """contexts(mmproj name, **Mtmd options): one context per combination, shared by the
    module's tests (each loads the 131k-token vocabulary) and freed at its end."""
    made: dict[tuple[str, tuple[tuple[str, int], ...]], Mtmd] = {}

    def get(name: str, **options: int) -> Mtmd:
        key = (name, tuple(sorted(options.items())))
        if key not in made:
            made[key] = Mtmd(text_gguf, mmprojs[name], **options)
        return made[key]

    yield get
    for ctx in made.values():
        ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def small3(contexts: Contexts) -> Mtmd:
    return contexts("small3")


def _image(width: int, height: int) -> np.ndarray:
    """Seeded noise: every pixel and channel matters to the comparison."""
    rng = np.random.default_rng([width, height])
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _grid(vision: ref.Vision, size: tuple[int, int]) -> tuple[int, int]:
    """(columns, rows) of merged tokens of an image of `size` pixels, already aligned."""
    return size[0] // vision.align, size[1] // vision.align


def _encode(ctx: Mtmd, rgb: np.ndarray, n_embd: int) -> tuple[list[Chunk], np.ndarray]:
    chunks = ctx.tokenize(rgb)
    (index,) = [i for i, c in enumerate(chunks) if c.kind == "image"]
    return chunks, ctx.encode(index, n_embd)


def _excess(got: np.ndarray, expected: ref.Encoded, cols: int) -> float:
    """The largest |got - expected| beyond the reference's slack, over the finite values of
    got, after checking that any value that is not finite sits in an [IMG_BREAK] row.
    pixtral.cpp builds those rows as an uninitialised tensor scaled by 0 plus img_break: garbage
    that happens to be NaN or Inf stays NaN (about 1 fresh context in 40 here), a llama.cpp bug
    the product must patch over."""
    assert got.shape == expected.embd.shape
    bad_rows = set(np.argwhere(~np.isfinite(got))[:, 0].tolist())
    assert all(r % (cols + 1) == cols for r in bad_rows), sorted(bad_rows)
    excess = np.abs(np.where(np.isfinite(got), got, np.nan) - expected.embd) - expected.slack
    return float(np.nanmax(excess))


# ---- the encoder's output ----


def _diff(
    ctx: Mtmd, vision: ref.Vision, size: tuple[int, int], target: tuple[int, int] | None = None
) -> float:
    """Encode seeded noise of `size` with mtmd; its largest difference from the reference beyond
    the slack, after checking the token count (an [IMG_BREAK] after each row but the last)."""
    rgb = _image(*size)
    cols, rows = _grid(vision, target or size)
    _, got = _encode(ctx, rgb, vision.tensors["mm.2.weight"].shape[0])
    assert got.shape[0] == cols * rows + rows - 1
    return _excess(got, ref.encode(vision, ref.preprocess(rgb, vision, target)), cols)


@pytest.mark.parametrize("size", [(56, 28), (112, 56), (28, 84), (84, 84)])
def test_small3_embeddings_equal_the_reference(
    small3: Mtmd, mmprojs: dict[str, Path], size: tuple[int, int]
) -> None:
    assert _diff(small3, ref.load(mmprojs["small3"]), size) < TOL_F32


@pytest.mark.parametrize("size", [(64, 32), (16, 48), (48, 48)])
def test_pixtral_12b_embeddings_equal_the_reference(
    contexts: Contexts, mmprojs: dict[str, Path], size: tuple[int, int]
) -> None:
    assert _diff(contexts("pixtral12b"), ref.load(mmprojs["pixtral12b"]), size) < TOL_F32


def test_an_unaligned_image_is_letterboxed(small3: Mtmd, mmprojs: dict[str, Path]) -> None:
    """70x45 is 2.5 x 1.6 tokens: mtmd rounds half away from zero (std::round) to 84x56, then
    fits the image in without stretching it (84x55, Pillow's bicubic) over black."""
    vision = ref.load(mmprojs["small3"])
    target = ref.target_size(70, 45, vision, min_tokens=1, max_tokens=4096)
    assert target == (84, 56)
    assert _diff(small3, vision, (70, 45), target) < TOL_F32


def test_flash_attention_stays_near_the_reference(
    contexts: Contexts, mmprojs: dict[str, Path]
) -> None:
    """mtmd's default (auto) turns flash attention on where the backend has it, the CPU's
    included; it rounds K and V to f16."""
    diff = _diff(contexts("small3", flash=_FLASH_AUTO), ref.load(mmprojs["small3"]), (112, 56))
    assert TOL_F32 < diff < TOL_FLASH  # on, and only f16-close


def test_f16_weights_stay_near_the_reference(contexts: Contexts, mmprojs: dict[str, Path]) -> None:
    vision = ref.load(mmprojs["small3-f16"])  # the reference reads the same f16 weights
    assert _diff(contexts("small3-f16"), vision, (112, 56)) < TOL_F16


# ---- the comparison can fail ----


def _wrong_weight(v: ref.Vision) -> ref.Vision:
    """One attention matrix 1% off."""
    name = "v.blk.1.attn_v.weight"
    return dataclasses.replace(v, tensors={**v.tensors, name: v.tensors[name] * 1.01})


def _wrong_merge_order(v: ref.Vision) -> ref.Vision:
    """The merger reading each 2x2 block column-major instead of row-major."""
    w = v.tensors["mm.patch_merger.weight"]
    s = v.merge
    swapped = w.reshape(w.shape[0], -1, s, s).transpose(0, 1, 3, 2).reshape(w.shape)
    return dataclasses.replace(v, tensors={**v.tensors, "mm.patch_merger.weight": swapped})


def _wrong_break_row(v: ref.Vision) -> ref.Vision:
    """[IMG_BREAK] taken from another row of the text embeddings (a token-id slip)."""
    row = v.tensors["v.token_embd.img_break"]
    return dataclasses.replace(v, tensors={**v.tensors, "v.token_embd.img_break": row[::-1]})


@pytest.mark.parametrize("wrong", [_wrong_weight, _wrong_merge_order, _wrong_break_row])
def test_a_wrong_reference_fails_the_comparison(
    small3: Mtmd, mmprojs: dict[str, Path], wrong: Any
) -> None:
    assert _diff(small3, wrong(ref.load(mmprojs["small3"])), (112, 56)) > TOL_F32


@pytest.mark.parametrize("step", ["rope axes", "exact gelu", "f32 patch conv"])
def test_a_wrong_step_fails_the_comparison(
    small3: Mtmd, mmprojs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Row and column swapped in RoPE, GELU without the CPU's f16 table, the patch convolution
    without its f16 rounding: each is caught, so the tolerance is tighter than each step."""
    if step == "rope axes":
        grid = ref._grid
        monkeypatch.setattr(ref, "_grid", lambda rows, cols: grid(rows, cols)[::-1])
    elif step == "exact gelu":
        monkeypatch.setattr(ref, "_gelu", _exact_gelu)
    else:
        monkeypatch.setattr(ref, "_patch_embed", _f32_patch_embed)
    assert _diff(small3, ref.load(mmprojs["small3"]), (112, 56)) > TOL_F32


def _exact_gelu(x: np.ndarray, x_nudge: float = 0.0, y_nudge: float = 0.0) -> np.ndarray:
    """GELU as other backends compute it (no table, so nothing to nudge)."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * x * (1 + 0.044715 * x * x)))


def _f32_patch_embed(pixels: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    n_embd, _, p, _ = kernel.shape
    c, height, width = pixels.shape
    patches = pixels.reshape(c, height // p, p, width // p, p).transpose(1, 3, 0, 2, 4)
    return patches.reshape(-1, c * p * p) @ kernel.reshape(n_embd, -1).T


# ---- the chunks around the image ----


def test_the_image_is_followed_by_img_end_text(small3: Mtmd) -> None:
    chunks = small3.tokenize(_image(112, 56))
    assert [c.kind for c in chunks] == ["text", "image", "text"]
    assert chunks[0].tokens == (BOS, INST)  # add_special: mtmd adds the vocabulary's BOS
    assert chunks[1].n_tokens == chunks[1].n_pos == 4 * 2 + 1  # one position per embedding
    assert chunks[2].tokens[0] == IMG_END  # the text "[IMG_END]", parsed as the special token


def test_without_add_special_there_is_no_bos(small3: Mtmd) -> None:
    assert small3.tokenize(_image(56, 28), add_special=False)[0].tokens == (INST,)


def test_pixtrals_own_limits_resize_small_and_large_images(contexts: Contexts) -> None:
    """With image_min_tokens / image_max_tokens left at -1, mtmd holds pixtral images to 8..1024
    merged tokens: 56x28 (2 tokens) is enlarged to 112x56, 924x924 (33x33) shrunk to 896x896."""
    ctx = contexts("small3", min_tokens=-1, max_tokens=-1)
    assert ctx.tokenize(_image(56, 28))[1].n_tokens == 4 * 2 + 1
    assert ctx.tokenize(_image(924, 924))[1].n_tokens == 32 * 32 + 31


@pytest.mark.parametrize(
    ("size", "limits"),
    [
        ((56, 28), (-1, -1)),  # 2 tokens: under pixtral's minimum of 8, scaled up
        ((1, 1), (-1, -1)),
        ((1, 1), (1, 4096)),
        ((13, 500), (1, 4096)),
        ((70, 45), (-1, -1)),
        ((924, 924), (-1, -1)),  # 33x33 tokens: over pixtral's 1024, scaled down
        ((1540, 1540), (1, 4096)),  # mistral-common's largest Small 3.x image: 55x55 tokens
        ((3000, 200), (-1, -1)),
    ],
)
def test_image_sizes_follow_mtmds_rounding_and_limits(
    contexts: Contexts, mmprojs: dict[str, Path], size: tuple[int, int], limits: tuple[int, int]
) -> None:
    vision = ref.load(mmprojs["small3"])
    cols, rows = _grid(vision, ref.target_size(*size, vision, *limits))
    ctx = contexts("small3", min_tokens=limits[0], max_tokens=limits[1])
    chunks = ctx.tokenize(_image(*size))
    assert chunks[1].n_tokens == cols * rows + rows - 1
