"""A model's vision tower: libmtmd with the model's mmproj, turning one image into the
embeddings that stand in for its [IMG] and [IMG_BREAK] tokens in the prompt.

The prompt itself is localmix's (chat/template.py, token-exact with mistral-common); mtmd only
encodes. So the image is handed to it already at mistral-common's size (chat/images.py
ImageConfig.pixels), which mtmd keeps as it is (a multiple of patch x merge on each side), with
token limits wide enough for the largest grid; what comes back is one embedding per [IMG] and
[IMG_BREAK] of the layout, checked to be that many.

llama.cpp 0.3.36's pixtral graph builds each [IMG_BREAK] row as an uninitialised tensor times
zero plus the break embedding, so leftover NaN or Inf memory can poison that row; the rows are
written again here from the mmproj's own `v.token_embd.img_break`.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmix.chat.images import Image, ImageConfig
from localmix.errors import EngineError, InvalidGGUF

if TYPE_CHECKING:
    import numpy

MAX_TOKENS = 4096  # per image: above mistral-common's largest grid (55 x 55 + 54 breaks)
_FLASH_AUTO = -1  # llama_flash_attn_type: on where the backend has it (a full grid needs it)


def image_config(mmproj: Path) -> ImageConfig:
    """The image settings a pixtral mmproj was trained with (patch, largest side, merge)."""
    from localmix import gguffile

    meta = gguffile.inspect(mmproj).metadata  # InvalidGGUF for what is not a GGUF
    if "clip.projector_type" not in meta:
        raise InvalidGGUF(
            f"{mmproj}: not an mmproj (a vision tower GGUF)",
            hint="a vision model's mmproj is published beside its GGUF files",
        )
    if meta.get("clip.projector_type") != "pixtral":
        raise InvalidGGUF(
            f"{mmproj}: projector {meta.get('clip.projector_type')!r}, not pixtral",
            hint="Mistral's vision models use a pixtral mmproj",
        )
    return ImageConfig(
        int(meta["clip.vision.patch_size"]),
        int(meta["clip.vision.image_size"]),
        int(meta.get("clip.vision.spatial_merge_size", 1)),
    )


class Vision:
    """libmtmd over an Engine's model and an mmproj; encode() one image at a time."""

    def __init__(self, model: Any, n_embd: int, mmproj: Path, *, threads: int, gpu: bool) -> None:
        from localmix.llama.backend import mtmd as bindings

        mtmd = bindings()
        self.config = image_config(mmproj)
        self.n_embd = n_embd
        self._mtmd = mtmd
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        params.flash_attn_type = _FLASH_AUTO
        params.image_min_tokens = 1
        params.image_max_tokens = MAX_TOKENS
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model, params)
        if not self._ctx:
            raise InvalidGGUF(f"{mmproj}: llama.cpp cannot load this mmproj for this model")
        if not mtmd.mtmd_support_vision(self._ctx):
            self.close()
            raise InvalidGGUF(f"{mmproj}: the mmproj has no vision encoder")
        self._break = _img_break_row(mmproj, n_embd)

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def encode(self, image: Image) -> numpy.ndarray:
        """(rows*columns + rows - 1, n_embd) float32: the embeddings of the image's [IMG] and
        [IMG_BREAK] positions, row by row, at mistral-common's grid for its size."""
        import numpy as np

        if not self._ctx:
            raise EngineError("the vision tower is closed")
        columns, rows = self.config.grid(image.width, image.height)
        width, height = self.config.pixels(image.width, image.height)
        rgb = _resized(image, width, height)
        embeddings = self._encode(rgb, width, height)
        expected = columns * rows + rows - 1
        if embeddings.shape[0] != expected:
            raise EngineError(
                f"the vision tower gave {embeddings.shape[0]} embeddings for a {columns}x{rows} "
                f"grid, not {expected}"
            )
        breaks = np.arange(1, rows) * (columns + 1) - 1  # the row after each grid row but the last
        embeddings[breaks] = self._break
        return embeddings

    def _encode(self, rgb: bytes, width: int, height: int) -> numpy.ndarray:
        import numpy as np

        mtmd = self._mtmd
        pixels = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
        bitmap = mtmd.mtmd_bitmap_init(width, height, pixels)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text(marker, len(marker), False, False)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise EngineError("the vision tower could not take the image")
            chunk = _image_chunk(mtmd, chunks)
            if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise EngineError("the vision tower failed to encode the image")
            n = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            out = mtmd.mtmd_get_output_embd(self._ctx)
            return np.ctypeslib.as_array(out, shape=(n, self.n_embd)).copy()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)


def _image_chunk(mtmd: Any, chunks: Any) -> Any:
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return chunk
    raise EngineError("the vision tower made no image chunk")


def _resized(image: Image, width: int, height: int) -> bytes:
    """The image's RGB stretched to width x height (bicubic), as mistral-common stretches it."""
    if (image.width, image.height) == (width, height):
        return image.rgb
    from PIL import Image as PILImage

    picture = PILImage.frombytes("RGB", (image.width, image.height), image.rgb)
    return picture.resize((width, height), PILImage.Resampling.BICUBIC).tobytes()


def _img_break_row(mmproj: Path, n_embd: int) -> numpy.ndarray:
    """The mmproj's [IMG_BREAK] embedding (n_embd float32)."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(mmproj))
    for tensor in reader.tensors:
        if tensor.name == "v.token_embd.img_break":
            row = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
            if row.shape != (n_embd,):
                raise InvalidGGUF(f"{mmproj}: its [IMG_BREAK] row has {row.size} values")
            return row
    raise InvalidGGUF(
        f"{mmproj}: no v.token_embd.img_break tensor, so no [IMG_BREAK] row",
        hint="write the mmproj with llama.cpp's convert_hf_to_gguf.py --mmproj",
    )
