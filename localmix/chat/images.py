"""Images in a Mistral prompt, laid out as mistral-common lays them out (no llama.cpp here).

A vision model's tokenizer says how big its patches are, how many of them merge into one token
and how large an image may be (tekken.json's "image", older files' "multimodal"). An image is
scaled down, keeping its aspect, until its longer side fits `max_image_size`, then covered by a
grid of tokens, each side rounded up to whole tokens: `columns` [IMG] tokens and an [IMG_BREAK]
per row, the last [IMG_BREAK] replaced by [IMG_END]. The pixels the vision tower sees are the
image stretched to exactly that grid (columns x unit by rows x unit), so that llama.cpp's encoder,
which rounds each side to the nearest whole token, keeps the same grid.

mistral-common also moves the image of a user message made of text parts and one final image to
the front (`image_first`): prompts follow it to stay token-exact.

`decode` reads an image file's bytes (PNG, JPEG, WebP, GIF's first frame, BMP) within limits on
its bytes and pixels, into RGB as mistral-common converts it (transparency laid on white).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from localmix.errors import UsageError

if TYPE_CHECKING:
    from localmix.chat.template import Picture

Part = TypeVar("Part")
MAX_BYTES = 20 * 1024 * 1024  # one image's encoded bytes (OpenAI's limit is 20 MB too)
MAX_PIXELS = 40_000_000  # width x height: far above what any vision tower takes
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageConfig:
    """A vision tokenizer's image settings (mistral-common's ImageConfig)."""

    patch_size: int
    max_image_size: int
    spatial_merge_size: int = 1

    def __post_init__(self) -> None:
        for name in ("patch_size", "max_image_size", "spatial_merge_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UsageError(f"image config: {name} must be a whole number above 0")

    @property
    def unit(self) -> int:
        """Pixels per token along each side (a patch times the merge)."""
        return self.patch_size * self.spatial_merge_size

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of [IMG] tokens for an image of width x height pixels."""
        if width < 1 or height < 1:
            raise UsageError(f"an image of {width}x{height} pixels has no pixels")
        w: float = width
        h: float = height
        ratio = max(height / self.max_image_size, width / self.max_image_size)
        if ratio > 1:
            # Python's round (half to even), as mistral-common; never 0 pixels on a side
            w, h = max(round(width / ratio), 1), max(round(height / ratio), 1)
        return (int(w) - 1) // self.unit + 1, (int(h) - 1) // self.unit + 1

    def pixels(self, width: int, height: int) -> tuple[int, int]:
        """The size (width, height) the image is stretched to before the vision tower."""
        columns, rows = self.grid(width, height)
        return columns * self.unit, rows * self.unit


@dataclass(frozen=True)
class ImageIds:
    """The vocabulary's ids of [IMG], [IMG_BREAK] and [IMG_END]."""

    img: int
    img_break: int
    img_end: int


def layout(columns: int, rows: int, ids: ImageIds) -> list[int]:
    """An image's tokens: per row, `columns` [IMG] and an [IMG_BREAK]; the last one [IMG_END]."""
    tokens = ([ids.img] * columns + [ids.img_break]) * rows
    tokens[-1] = ids.img_end
    return tokens


def image_tokens(width: int, height: int, config: ImageConfig, ids: ImageIds) -> list[int]:
    """The prompt tokens of a width x height image."""
    return layout(*config.grid(width, height), ids)


def placed(
    prompt: Sequence[int], pictures: Sequence[Picture], config: ImageConfig, ids: ImageIds
) -> list[tuple[int, int]]:
    """(start, length) of each picture's grid in a prompt: its [IMG] and [IMG_BREAK] positions,
    which the vision tower's embeddings fill ([IMG_END] after them is a token). The pictures
    come in the conversation's order, which is the prompt's: mistral-common moves an image only
    ahead of text, never past another image."""
    starts = [
        i for i, token in enumerate(prompt)
        if token == ids.img and (i == 0 or prompt[i - 1] not in (ids.img, ids.img_break))
    ]  # fmt: skip
    if len(starts) != len(pictures):
        raise UsageError(f"the prompt holds {len(starts)} images, not {len(pictures)}")
    out = []
    for start, picture in zip(starts, pictures, strict=True):
        columns, rows = config.grid(picture.width, picture.height)
        length = embedding_count(columns, rows)
        if start + length >= len(prompt) or prompt[start + length] != ids.img_end:
            raise UsageError("an image's grid in the prompt is not the one its size makes")
        out.append((start, length))
    return out


def embedding_count(columns: int, rows: int) -> int:
    """How many embeddings the vision encoder gives for the grid: every [IMG] and [IMG_BREAK]
    of the layout ([IMG_END] is an ordinary token after them)."""
    return columns * rows + rows - 1


def config_from_tekken(data: Mapping[str, Any]) -> ImageConfig | None:
    """The image settings in a tekken.json (its "image" entry, or "multimodal" in older
    files), or None for a tokenizer without vision."""
    raw = data.get("image") or data.get("multimodal")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise UsageError("tekken.json: its image settings are not an object")
    try:
        return ImageConfig(
            int(raw["image_patch_size"]),
            int(raw["max_image_size"]),
            int(raw.get("spatial_merge_size", 1)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"tekken.json: image settings lack or mistype {error}") from None


def image_first(
    parts: Sequence[Part], is_image: Callable[[Part], bool], is_text: Callable[[Part], bool]
) -> list[Part]:
    """mistral-common's placement rule for a user message: text parts followed by one image
    become that image, then the text parts; any other order stays as given."""
    parts = list(parts)
    if len(parts) >= 2 and is_image(parts[-1]) and all(is_text(p) for p in parts[:-1]):
        return [parts[-1], *parts[:-1]]
    return parts


@dataclass(frozen=True)
class Image:
    """A decoded image: its RGB pixels (width x height x 3 bytes), size and content key."""

    width: int
    height: int
    rgb: bytes = field(repr=False)
    key: str

    def picture(self) -> Picture:
        """The image as a part of a message (its size, and its key for the pixels)."""
        from localmix.chat.template import Picture

        return Picture(self.width, self.height, self.key)


def decode(data: bytes) -> Image:
    """The image in `data` as RGB; UsageError for what is not an image localmix reads, or is
    over MAX_BYTES or MAX_PIXELS (checked before the pixels are decoded)."""
    import hashlib
    import io

    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    if len(data) > MAX_BYTES:
        raise UsageError(f"the image is over {MAX_BYTES // 2**20} MiB")
    try:
        with PILImage.open(io.BytesIO(data), formats=FORMATS) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise UsageError(
                    f"the image is {width}x{height} pixels; at most "
                    f"{MAX_PIXELS // 1_000_000} megapixels",
                    hint="scale it down first",
                )
            rgb = _rgb(opened)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UsageError(
            "not an image localmix reads", hint="send PNG, JPEG, WebP, GIF or BMP"
        ) from None
    key = "sha256:" + hashlib.sha256(f"{width}x{height}:".encode() + rgb).hexdigest()
    return Image(width, height, rgb, key)


def save_png(image: Image, folder: Path) -> Path:
    """Write the image as a lossless PNG named by its key in folder (once: the key names the
    pixels), atomically; returns the file."""
    import io

    from PIL import Image as PILImage

    from localmix import disk

    path = folder / (image.key.removeprefix("sha256:") + ".png")
    if not path.exists():
        out = io.BytesIO()
        PILImage.frombytes("RGB", (image.width, image.height), image.rgb).save(out, format="PNG")
        with disk.staged(path) as partial:
            partial.write_bytes(out.getvalue())
    return path


def _rgb(image: Any) -> bytes:
    """RGB bytes as mistral-common converts an image: any other mode through RGBA, pasted on
    white with its alpha as the mask."""
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image.tobytes()
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    white = PILImage.new("RGBA", rgba.size, "WHITE")
    white.paste(rgba, (0, 0), rgba)
    return white.convert("RGB").tobytes()
