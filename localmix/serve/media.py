"""Images as the APIs send them: OpenAI's `image_url` parts (data URLs; an http(s) URL is never
fetched, or the server would reach any address a request names), the Responses API's
`input_image`, Ollama's `images` (base64). Each is decoded once (chat/images.py: formats and
limits) and becomes a Picture part of its message; errors are 400s naming the field.

A model that does not see images refuses them where the prompt is built (chat/template.py).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from localmix.chat import images
from localmix.errors import UsageError
from localmix.serve import app

_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)", re.DOTALL)


def from_url(url: Any, where: str) -> images.Image:
    """An OpenAI image_url: a data: URL with base64 content."""
    if not isinstance(url, str):
        raise app.BadField(where, f"{where}: an image URL is a string")
    if url.startswith(("http://", "https://")):
        raise app.BadField(
            where, f"{where}: image URLs are not fetched by localmix serve",
            hint="send the image inline, as a data: URL (data:image/png;base64,...)",
        )  # fmt: skip
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        raise app.BadField(
            where, f"{where}: not a base64 data: URL", hint="data:image/png;base64,..."
        )
    return from_base64(match.group(3), where)


def from_base64(text: Any, where: str) -> images.Image:
    """An image sent as base64 text (Ollama's images, the payload of a data: URL)."""
    if not isinstance(text, str):
        raise app.BadField(where, f"{where}: an image is base64 text")
    if len(text) > images.MAX_BYTES * 4 // 3 + 4:
        raise app.BadField(where, f"{where}: the image is over {images.MAX_BYTES // 2**20} MiB")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise app.BadField(where, f"{where}: not base64 text") from None
    try:
        return images.decode(data)
    except UsageError as error:
        raise app.BadField(where, f"{where}: {error.message}", error.hint) from None
