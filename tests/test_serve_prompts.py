"""serve builds chat prompts with localmix's Mistral formats: the prompt token ids a request
produced (OpenAI's chat route with return_token_ids; Ollama's generate, whose context starts with
them) equal mistral-common's encode_chat_completion for the same messages, on tiny GGUFs converted
from the real v1, v3 and tekken tokenizer files."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localmix.chat.template import Message
from localmix.serve.server import Server

from .served import serving
from .test_chat_template import conversations

pytestmark = pytest.mark.slow  # three tiny models converted from the real tokenizer files

# served name -> (synth tokenizer, mistral-common's tokenizer file)
TOKENIZERS = {
    "v1": ("v1", "tokenizer.model.v1"),
    "v3": ("v3", "mistral_instruct_tokenizer_240323.model.v3"),
    "tekken": ("tekken", "tekken_240718.json"),
}


def _data_file(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def _gguf(tmp: Path, tokenizer: str, tokenizer_file: Path) -> Path:
    """A tiny checkpoint whose only vocabulary source is tokenizer_file, converted."""
    from localmix.build.convert import convert
    from localmix.build.synth import checkpoints as synth

    ckpt = synth.checkpoint(tmp / "ckpt", size="tiny", tokenizer=tokenizer, layout="mistral")
    for old in [*ckpt.glob("tokenizer.model*"), *ckpt.glob("tekken*.json")]:
        old.unlink()
    suffix = tokenizer_file.suffix
    shutil.copyfile(
        tokenizer_file, ckpt / ("tekken.json" if suffix == ".json" else "tokenizer.model" + suffix)
    )
    return convert(ckpt, tmp / "model.gguf", outtype="f16")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with the three models, named at start by their paths."""
    named = {
        name: _gguf(tmp_path_factory.mktemp(f"prompt-{name}"), tok, _data_file(file))
        for name, (tok, file) in TOKENIZERS.items()
    }
    with serving(tmp_path_factory.mktemp("home"), ctx=1024, named=named, parallel=1) as started:
        yield started


@functools.cache
def _reference_tokenizer(name: str) -> Any:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(_data_file(TOKENIZERS[name][1])))


def reference(name: str, messages: list[Message]) -> list[int]:
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    tokenizer = _reference_tokenizer(name)
    request = ChatCompletionRequest(messages=[kinds[m.role](content=m.content) for m in messages])
    return tokenizer.encode_chat_completion(request).tokens


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_openai_chat_prompts_are_mistral_commons(server: Server, name: str) -> None:
    for messages in conversations(seed=3, n=12):
        body = {
            "model": name, "max_tokens": 1, "return_token_ids": True,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
        }  # fmt: skip
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["prompt_token_ids"] == reference(name, messages), messages


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_ollama_generate_prompts_are_mistral_commons(server: Server, name: str) -> None:
    for system in (None, "Be brief.\nVery brief."):
        messages = [Message("system", system)] if system else []
        messages.append(Message("user", "What is 2 + 2? Réponds 😀"))
        body = {
            "model": name, "prompt": messages[-1].content, "system": system, "stream": False,
            "options": {"num_predict": 1},
        }  # fmt: skip
        response = httpx.post(server.url + "/api/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        expected = reference(name, messages)
        assert response.json()["context"][: len(expected)] == expected
        assert response.json()["prompt_eval_count"] == len(expected)
