"""Image tokens as mistral-common lays them out: the grid for a table of image sizes (tiny, 1x1,
tall, wide, huge, exactly at and just past the limit, extreme aspect ratios) against
mistral-common's own ImageEncoder on real PIL images, for Pixtral-12B's tokenizer (patch 16, up to
1024 px, no merge) and Mistral Small 3.x's (patch 14, up to 1540 px, 2x2 merge); the pixel size
the vision tower gets; the tokenizer files' image settings; and the image-first placement rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localmix.chat import images
from localmix.chat.images import ImageConfig, ImageIds
from localmix.errors import UsageError

IDS = ImageIds(img=10, img_break=12, img_end=13)  # tekken's ranks for [IMG], [IMG_BREAK], [IMG_END]
PIXTRAL = ImageConfig(16, 1024)
SMALL = ImageConfig(14, 1540, 2)
SIZES = [
    (1, 1), (5, 3), (27, 27), (28, 28), (29, 29), (16, 16), (17, 1), (112, 56), (640, 480),
    (1023, 767), (1024, 1024), (1025, 1024), (1540, 1540), (1541, 1540), (1540, 1541),
    (100, 3000), (3000, 100), (4000, 50), (6000, 4000), (3081, 1), (1, 5000), (2047, 1537),
]  # fmt: skip


def reference(config: ImageConfig, width: int, height: int) -> tuple[list[int], tuple[int, ...]]:
    """mistral-common's tokens and processed image shape (C, H, W) for a blank image."""
    from mistral_common.protocol.instruct.chunk import ImageChunk
    from mistral_common.tokens.tokenizers.image import ImageConfig as MCConfig
    from mistral_common.tokens.tokenizers.image import ImageEncoder, SpecialImageIDs
    from PIL import Image

    encoder = ImageEncoder(
        MCConfig(config.patch_size, config.max_image_size, config.spatial_merge_size),
        SpecialImageIDs(img=IDS.img, img_break=IDS.img_break, img_end=IDS.img_end),
    )
    encoded = encoder(ImageChunk(image=Image.new("RGB", (width, height), (120, 60, 30))))
    return encoded.tokens, encoded.image.shape


@pytest.mark.parametrize("config", [PIXTRAL, SMALL], ids=["pixtral-12b", "small-3.x"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_tokens_equal_mistral_commons(config: ImageConfig, width: int, height: int) -> None:
    tokens, shape = reference(config, width, height)
    assert images.image_tokens(width, height, config, IDS) == tokens
    assert config.pixels(width, height) == (shape[2], shape[1])
    columns, rows = config.grid(width, height)
    assert images.embedding_count(columns, rows) == len(tokens) - 1  # all but [IMG_END]


def test_the_largest_grids() -> None:
    assert SMALL.grid(10_000, 10_000) == (55, 55)  # 1540 / 28: up to 3025 [IMG]
    assert PIXTRAL.grid(10_000, 10_000) == (64, 64)


def test_a_tokenizer_files_image_settings() -> None:
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    pixtral = json.loads((data / "tekken_240911.json").read_text())  # Pixtral 12B
    assert images.config_from_tekken(pixtral) == ImageConfig(16, 1024, 1)
    assert images.config_from_tekken(json.loads((data / "tekken_240718.json").read_text())) is None
    legacy = {"multimodal": {"image_patch_size": 14, "max_image_size": 1540,
                             "spatial_merge_size": 2}}  # fmt: skip
    assert images.config_from_tekken(legacy) == SMALL
    with pytest.raises(UsageError, match="image settings"):
        images.config_from_tekken({"image": {"image_patch_size": 14}})
    with pytest.raises(UsageError, match="no pixels"):
        SMALL.grid(0, 10)


@pytest.mark.parametrize(
    "parts",
    [["t1", "IMG"], ["t1", "t2", "IMG"], ["IMG", "t1"], ["t1", "IMG", "t2"], ["IMG"],
     ["t1", "IMG", "IMG"], ["IMG", "IMG"], ["t1"]],
)  # fmt: skip
def test_image_first_is_mistral_commons_rule(parts: list[str]) -> None:
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV3
    from PIL import Image

    picture = Image.new("RGB", (1, 1))
    chunks = [ImageChunk(image=picture) if p == "IMG" else TextChunk(text=p) for p in parts]
    moved = InstructTokenizerV3._maybe_put_image_first(chunks)
    expected = ["IMG" if isinstance(c, ImageChunk) else c.text for c in moved]
    assert images.image_first(parts, lambda p: p == "IMG", lambda p: p != "IMG") == expected
