"""Image tokens as mistral-common lays them out: the grid for a table of image sizes (tiny, 1x1,
tall, wide, huge, exactly at and just past the limit, extreme aspect ratios) against
mistral-common's own ImageEncoder on real PIL images, for Pixtral-12B's tokenizer (patch 16, up to
1024 px, no merge) and Mistral Small 3.x's (patch 14, up to 1540 px, 2x2 merge); the pixel size
the vision tower gets; the tokenizer files' image settings; and the image-first placement rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# -- whole prompts with images ------------------------------------------------------------------


def _conversations() -> list[list[Any]]:
    from localmix.chat.template import Message, Picture

    cat, tall, dot = Picture(640, 480, "cat"), Picture(100, 3000, "tall"), Picture(1, 1, "dot")
    return [
        [Message("user", ("Describe this.", cat))],  # text then one image: the image goes first
        [Message("user", (tall, "What is this?"))],
        [Message("user", ("a", Picture(28, 28), "b", dot))],
        [Message("system", "Be brief."), Message("user", ("Look:", cat, "and", tall))],
        [Message("user", ("First", cat)), Message("assistant", "A cat."),
         Message("user", ("And this one?", dot))],
        [Message("user", ("One", cat)), Message("user", ("Two", tall))],  # merged as one turn
        [Message("user", (Picture(6000, 4000),))],
    ]  # fmt: skip


def _reference_content(content: Any) -> Any:
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from PIL import Image

    from localmix.chat.template import Picture

    if isinstance(content, str):
        return content
    return [
        ImageChunk(image=Image.new("RGB", (p.width, p.height))) if isinstance(p, Picture)
        else TextChunk(text=p)
        for p in content
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["v3-tekken", "v7", "v11", "v13"])
def vision_gguf(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path]:
    """(format, a vision tokenizer file, a tiny GGUF converted with it): Pixtral 12B's own file
    for v3-tekken, Small 3.x's image settings on the tekken v7+ ones."""
    from localmix.build.convert import convert

    from .tekken_files import SMALL_3_IMAGE, checkpoint_with, shipped, tekken_file

    fmt = request.param
    tmp = tmp_path_factory.mktemp(f"vision-{fmt}")
    if fmt == "v3-tekken":
        tok = tmp / "tekken.json"
        tok.write_bytes(shipped("tekken_240911.json").read_bytes())
    else:
        tok = tekken_file(fmt, tmp, image=SMALL_3_IMAGE)
    return fmt, tok, convert(checkpoint_with(tok, tmp), tmp / "model.gguf", outtype="f16")


def test_prompts_with_images_equal_mistral_commons(vision_gguf: tuple[str, Path, Path]) -> None:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from localmix.chat import template
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    fmt, tok, gguf = vision_gguf
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    reference = MistralTokenizer.from_file(str(tok))
    config = images.config_from_tekken(json.loads(tok.read_text()))
    with Engine(EngineConfig(gguf, n_ctx=256, n_threads=1, vocab_only=True)) as engine:
        for messages in _conversations():
            request = ChatCompletionRequest(
                messages=[kinds[m.role](content=_reference_content(m.content)) for m in messages]
            )
            expected = reference.encode_chat_completion(request).tokens
            got = template.encode(fmt, messages, engine.tokenize, images=config)
            assert got == expected, messages


def test_images_are_refused_where_mistral_common_has_none() -> None:
    from localmix.chat import template
    from localmix.chat.template import Message, Picture

    def tokenize(text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return [1]  # never reached: the checks come first

    picture = Picture(10, 10, "x")
    with pytest.raises(UsageError, match="does not see images"):
        template.encode("v11", [Message("user", ("hi", picture))], tokenize)
    with pytest.raises(UsageError, match="does not see images"):
        template.encode("v1", [Message("user", ("hi", picture))], tokenize, images=SMALL)
    with pytest.raises(UsageError, match="only user messages"):
        template.encode("v11", [Message("system", (picture,)), Message("user", "hi")], tokenize,
                        images=SMALL)  # fmt: skip


def test_a_picture_survives_json() -> None:
    from localmix.chat.template import Message, Picture

    message = Message("user", ("Look", Picture(640, 480, "sha256:abc")))
    assert Message.from_json(message.to_json()) == message
    with pytest.raises(ValueError, match="image"):
        Message.from_json({"role": "user", "content": [{"image": "x", "width": 0, "height": 1}]})


def test_a_session_with_a_text_model_refuses_images(tiny_mistral_gguf_f16: Path) -> None:
    import io as bytes_io

    from PIL import Image

    from localmix.chat.session import Session
    from localmix.llama.engine import Engine
    from localmix.llama.records import EngineConfig

    out = bytes_io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format="PNG")
    picture = images.decode(out.getvalue())
    with Engine(EngineConfig(tiny_mistral_gguf_f16, n_ctx=256, n_threads=1)) as engine:
        session = Session(engine, "v1", max_tokens=2)
        assert not session.profile.sees_images
        with pytest.raises(UsageError, match="does not see images"):
            session.send("What is this?", images=[picture])
        assert session.messages == []
