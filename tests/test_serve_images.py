"""Images sent to `localmix serve`, through the real openai and ollama clients: OpenAI's
image_url parts (data URLs), the Responses API's input_image and Ollama's images are decoded
within limits; an http(s) URL is never fetched; what is not an image, is too large or goes to a
model that does not see images is a 400 naming the field. And the decoding itself: RGB as
mistral-common converts an image (transparency on white), GIF's first frame, a stable key."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from localmix.chat import images
from localmix.errors import UsageError
from localmix.serve.server import Server

from .scripted_gguf import write_scripted_gguf
from .served import make_store, serving, shared_home  # noqa: F401 (autouse fixture)
from .tekken_files import tekken_file


def png(width: int = 8, height: int = 6, mode: str = "RGB", color: Any = (200, 30, 40)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("images")
    text_model = write_scripted_gguf(tmp / "v13.gguf", {}, tekken=tekken_file("v13", tmp))
    return make_store(tmp_path_factory.mktemp("images-home"), {"text-v13": text_model},
                      {"text-v13": "v13"})  # fmt: skip


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with serving(home) as running:
        yield running


def openai_400(server: Server, content: list[Any]) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="text-v13", messages=[{"role": "user", "content": content}], max_tokens=2
        )
    return str(caught.value)


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_a_text_model_refuses_an_image_naming_the_message(server: Server) -> None:
    said = openai_400(
        server, [{"type": "text", "text": "What is it?"}, image_part(data_url(png()))]
    )
    assert "messages[0]" in said and "does not see images" in said


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com/cat.png", "not fetched"),
        ("http://127.0.0.1:1/x.png", "not fetched"),
        ("data:image/png;base64,@@@", "not base64"),
        ("file:///etc/passwd", "not a base64 data: URL"),
        (data_url(b"plain text, not an image"), "not an image"),
        (data_url(png(8000, 6000, mode="1", color=0)), "megapixels"),
    ],
)
def test_bad_images_are_400s_naming_the_part(server: Server, url: str, expected: str) -> None:
    said = openai_400(server, [{"type": "text", "text": "hi"}, image_part(url)])
    assert "messages[0].content[1].image_url" in said and expected in said


def test_ollama_images_and_the_responses_api(server: Server) -> None:
    client = ollama.Client(host=server.url)
    encoded = base64.b64encode(png()).decode()
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="text-v13", messages=[{"role": "user", "content": "hi",
                                                 "images": [encoded]}])  # fmt: skip
    assert caught.value.status_code == 400 and "does not see images" in str(caught.value)
    raw = httpx.post(server.url + "/api/generate", json={
        "model": "text-v13", "prompt": "x", "raw": True, "images": [encoded]}, timeout=10)  # fmt: skip
    assert raw.status_code == 400 and "raw prompt" in raw.text
    answer = httpx.post(server.url + "/v1/responses", json={
        "model": "text-v13", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "hi"},
            {"type": "input_image", "image_url": data_url(png())}]}]}, timeout=10)  # fmt: skip
    assert answer.status_code == 400 and "does not see images" in answer.text


def test_decoding_is_mistral_commons_rgb() -> None:
    from mistral_common.tokens.tokenizers.image import _convert_to_rgb
    from PIL import Image

    for mode, color in (("RGBA", (10, 200, 30, 100)), ("LA", (90, 40)), ("P", 3), ("L", 77),
                        ("RGB", (1, 2, 3))):  # fmt: skip
        picture = Image.new(mode, (5, 4), color)
        out = io.BytesIO()
        picture.save(out, format="PNG")
        decoded = images.decode(out.getvalue())
        reference = _convert_to_rgb(Image.open(io.BytesIO(out.getvalue()))).tobytes()
        assert (decoded.width, decoded.height, decoded.rgb) == (5, 4, reference), mode
    again = images.decode(png())
    assert again.key == images.decode(png()).key != images.decode(png(color=(0, 0, 0))).key
    assert again.picture().width == 8 and again.picture().key == again.key


def test_a_gif_gives_its_first_frame_and_limits_hold() -> None:
    from PIL import Image

    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    first = images.decode(out.getvalue())
    assert first.rgb[:3] == bytes((255, 0, 0))
    with pytest.raises(UsageError, match="MiB"):
        images.decode(b"\0" * (images.MAX_BYTES + 1))
    with pytest.raises(UsageError, match="not an image"):
        images.decode(b"GIF89a broken")
