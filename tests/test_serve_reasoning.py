"""serve and reasoning models: the thinking switch of a request (OpenAI's reasoning_effort,
Ollama's think) gives the prompt mistral-common gives (the v13 reasoning prompt, v15's
reasoning_effort), and the reply's [THINK]…[/THINK] comes back apart from the answer: OpenAI's
reasoning_content (streamed and not, counted as reasoning tokens), Ollama's thinking.

The model is test_reasoning's scripted tekken one: after [/INST] it greedily says
[THINK]Two plus two[/THINK]It is four.</s>."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from localmix.chat.reasoning import REASONING_PROMPT
from localmix.chat.template import Message
from localmix.serve.server import Server

from .scripted_gguf import write_scripted_gguf
from .served import serving
from .tekken_files import tekken_file
from .test_chat_template import reference_request
from .test_reasoning import ANSWER, SCRIPT, THOUGHT, THOUGHT_TOKENS, VOCAB

HI = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module", params=["v13", "v15"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, Server]]:
    folder = tmp_path_factory.mktemp(f"serve-think-{request.param}")
    tokenizer = tekken_file(request.param, folder, vocab_size=VOCAB)
    path = write_scripted_gguf(folder / "think.gguf", SCRIPT, tekken=tokenizer)
    with serving(folder / "home", named={"think": path}, parallel=2) as server:
        yield request.param, tokenizer, server


def expected_prompt(version: str, tokenizer: Path, think: bool) -> list[int]:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    messages = [Message("user", HI[0]["content"])]
    effort = None
    if version == "v15":
        effort = "high" if think else "none"
    elif think:
        messages.insert(0, Message("system", REASONING_PROMPT))
    request = reference_request(messages, effort)
    return MistralTokenizer.from_file(str(tokenizer)).encode_chat_completion(request).tokens


@pytest.mark.parametrize("effort", ["high", "none", None])
def test_openai_reasoning_effort_switches_thinking_as_mistral_common(
    served: tuple[str, Path, Server], effort: str | None
) -> None:
    version, tokenizer, server = served
    body: dict[str, Any] = {
        "model": "think", "messages": HI, "temperature": 0, "return_token_ids": True,
    }  # fmt: skip
    if effort is not None:
        body["reasoning_effort"] = effort
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert reply["prompt_token_ids"] == expected_prompt(version, tokenizer, effort == "high")
    message = reply["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == (ANSWER, THOUGHT)
    assert reply["usage"]["completion_tokens_details"]["reasoning_tokens"] == THOUGHT_TOKENS


def test_openai_streams_thinking_as_reasoning_content(served: tuple[str, Path, Server]) -> None:
    _, _, server = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="think", messages=HI, temperature=0, reasoning_effort="high", stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thought = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    answer = "".join(d.content or "" for d in deltas)
    assert (answer, thought) == (ANSWER, THOUGHT)


def test_ollama_think_puts_thinking_in_its_own_field(served: tuple[str, Path, Server]) -> None:
    _, _, server = served
    client = ollama.Client(host=server.url)
    reply = client.chat(model="think", messages=HI, think=True, options={"temperature": 0})
    assert (reply.message.content, reply.message.thinking) == (ANSWER, THOUGHT)
    parts = list(
        client.chat(model="think", messages=HI, think=True, options={"temperature": 0}, stream=True)
    )
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content for p in parts) == ANSWER
    generated = client.generate(model="think", prompt=HI[0]["content"], think=False)
    assert (
        generated.response == ANSWER and generated.thinking == THOUGHT
    )  # the script thinks anyway


def test_a_model_without_a_thinking_switch_refuses_one(
    tmp_path_factory: pytest.TempPathFactory, tiny_mistral_gguf_f16: Path
) -> None:
    with serving(
        tmp_path_factory.mktemp("plain"), named={"plain": tiny_mistral_gguf_f16}
    ) as server:
        body = {"model": "plain", "messages": HI, "reasoning_effort": "high", "max_tokens": 1}
        response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and "thinking switch" in response.text
        body["reasoning_effort"] = "none"  # off is what it does anyway
        assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30).is_success
