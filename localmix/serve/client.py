"""What `localmix ps` asks a running server: its loaded models (GET /api/ps)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from localmix.errors import LocalmixError, UsageError


@dataclass(frozen=True)
class Running:
    """A model a server has loaded: bytes it holds (and of those, on the GPU), context per
    sequence (tokens), when it unloads (ISO time), sequences and requests now."""

    name: str
    size: int
    size_vram: int
    context_length: int
    expires_at: str
    parallel: int
    requests: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Running:
        return cls(
            name=str(data.get("name", "")),
            size=int(data.get("size", 0)),
            size_vram=int(data.get("size_vram", 0)),
            context_length=int(data.get("context_length", 0)),
            expires_at=str(data.get("expires_at", "")),
            parallel=int(data.get("parallel", 1)),
            requests=int(data.get("requests", 0)),
        )


def running(url: str, timeout: float = 5.0) -> list[Running]:
    """The models loaded by the server at url (http://host:port)."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise UsageError(
            f"{url!r} is not an http address", hint="write it like http://127.0.0.1:11434"
        )
    address = url.rstrip("/") + "/api/ps"
    try:
        with urllib.request.urlopen(address, timeout=timeout) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise LocalmixError(
            f"{url} answered {e.code} to /api/ps", hint="is it a localmix or Ollama server?"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise LocalmixError(
            f"no server answers at {url} ({reason})",
            hint="start one with `localmix serve`, or point --url at it",
        ) from None
    except ValueError:
        raise LocalmixError(f"{url} did not answer /api/ps with JSON") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise LocalmixError(f"{url} answered /api/ps without a model list")
    return [Running.from_json(m) for m in models if isinstance(m, dict)]
