"""Generation with a JSON schema against generation without one, through what users run: the
`localmix chat` command (`--schema FILE`) and `localmix serve` (`response_format` json_schema on
/v1/chat/completions), on a 32,000-token vocabulary (v1) and on a 131,072-token tekken one (the
vocabulary of Nemo, Small 3.x, Ministral 3, Devstral), where every mask covers four times the
tokens.

Each round runs the same request twice back to back, free and constrained, swapping which goes
first; the verdict is the median of the per-round ratios with a 95% bootstrap interval
(pairing.py). The models are the synthetic 125M Mistral at Q4_K_M (engine_vs_llama_bench.
make_model), with each vocabulary. Their random weights write text that never ends on its own;
the schema (an object with a story and tags, more properties allowed) keeps a constrained reply
going for all N tokens too, so both runs generate exactly N tokens, which is checked.

What is compared, per surface:
- chat: the CLI's --json stats.gen_tps (tokens after the first over the time from the first pick
  to the last), in a fresh process each run: the schema's compile is in its time to first token,
  not in this rate (ttft is reported beside).
- serve: tokens over the wall time between the first and the last streamed piece, read by an
  HTTP client, one request at a time against one server per model (compile again outside it).

    python benchmarks/schema_vs_free.py [--rounds 6] [--tokens 200] [--threads 1]

Target: constrained >= 0.95x free on every row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's localmix

from engine_vs_llama_bench import make_model
from llamacpp_tools import REPO
from pairing import paired
from serve_vs_llama_server import HOST, free_port, wait_ready

TARGET = 0.95
PROMPT = "Tell me a long story, as JSON."
SCHEMA = {
    "type": "object",
    "properties": {
        "story": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["story", "tags"],
}
VOCABS = {"32k v1": ("v1", "v1"), "131k tekken": ("tekken", "v3-tekken")}  # tokenizer, format
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}  # fmt: skip


def run_chat(model: Path, fmt: str, schema: Path | None, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    """One `localmix chat` process; its --json stats."""
    cmd = [
        sys.executable, "-m", "localmix", "chat", str(model), PROMPT, "--format", fmt, "--json",
        "-n", str(args.tokens), "-t", str(args.threads), "--seed", str(args.seed),
        *(("--schema", str(schema)) if schema else ()),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env=ENV, stdin=subprocess.DEVNULL
    )
    stats = json.loads(done.stdout)["stats"]
    if stats["generated_tokens"] != args.tokens:
        raise RuntimeError(f"chat generated {stats['generated_tokens']} of {args.tokens} tokens")
    return stats


async def run_serve(url: str, model: str, constrained: bool, args: argparse.Namespace) -> float:
    """One streamed chat completion: tokens per second between the first and last piece."""
    import httpx

    body: dict = {  # type: ignore[type-arg]
        "model": model, "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": args.tokens, "seed": args.seed, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    if constrained:
        body["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA},
        }  # fmt: skip
    else:
        body["ignore_eos"] = True
    first = last = None
    tokens = 0
    url += "/v1/chat/completions"
    async with (
        httpx.AsyncClient(timeout=300) as client,
        client.stream("POST", url, json=body) as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} {await response.aread()!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if any((c.get("delta") or {}).get("content") for c in data.get("choices") or ()):
                last = time.perf_counter()
                first = first or last
    if tokens != args.tokens or first is None or last is None or last == first:
        raise RuntimeError(f"serve generated {tokens} of {args.tokens} tokens")
    return (tokens - 1) / (last - first)


def measure_chat(model: Path, fmt: str, schema: Path, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    free: list[float] = []
    bound: list[float] = []
    ttft: dict[str, list[float]] = {"free": [], "schema": []}
    for r in range(args.rounds):
        order = [None, schema] if r % 2 == 0 else [schema, None]
        for which in order:
            stats = run_chat(model, fmt, which, args)
            (bound if which else free).append(stats["gen_tps"])
            ttft["schema" if which else "free"].append(stats["ttft_s"])
        print(f"chat {fmt} round {r + 1}: free {free[-1]:.1f} t/s, schema {bound[-1]:.1f} t/s")
    return {"free": free, "schema": bound, "ttft": ttft}


async def measure_serve(model: Path, args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    port = free_port()
    url = f"http://{HOST}:{port}"
    cmd = [
        sys.executable, "-m", "localmix", "serve", str(model), "--host", HOST, "--port", str(port),
        "-t", str(args.threads), "-c", str(max(256, args.tokens + 128)), "-np", "1",
    ]  # fmt: skip
    server = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    free: list[float] = []
    bound: list[float] = []
    try:
        await wait_ready(url, str(model), server)
        await run_serve(url, str(model), True, args)  # warm: the model loaded, one of each
        for r in range(args.rounds):
            for constrained in (False, True) if r % 2 == 0 else (True, False):
                rate = await run_serve(url, str(model), constrained, args)
                (bound if constrained else free).append(rate)
            print(f"serve {model.name} round {r + 1}: free {free[-1]:.1f}, schema {bound[-1]:.1f}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"free": free, "schema": bound}


def report(rows: list[tuple[str, str, dict]], args: argparse.Namespace) -> bool:  # type: ignore[type-arg]
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"JSON schema vs free generation ({args.tokens} tokens, {args.threads} thread(s))"
    )
    for column in ("surface", "vocabulary", "free t/s", "schema t/s", "ratio", "target"):
        table.add_column(column, justify="left" if column in ("surface", "vocabulary") else "right")
    ok = True
    for surface, vocab, runs in rows:
        ratio = paired(runs["schema"], runs["free"])
        met = ratio.median >= TARGET
        ok &= met
        table.add_row(
            surface, vocab, f"{statistics.median(runs['free']):.1f}",
            f"{statistics.median(runs['schema']):.1f}", str(ratio),
            f">={TARGET} {'ok' if met else 'below'}",
        )  # fmt: skip
    console = Console(width=140)
    console.print(table)
    for surface, vocab, runs in rows:
        if "ttft" in runs:
            free, bound = (statistics.median(runs["ttft"][k]) * 1000 for k in ("free", "schema"))
            console.print(f"{surface} {vocab}: time to first token {free:.0f} ms free, "
                          f"{bound:.0f} ms with the schema (its compile included)")  # fmt: skip
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        schema = Path(tmp) / "story.schema.json"
        schema.write_text(json.dumps(SCHEMA))
        for vocab, (tokenizer, fmt) in VOCABS.items():
            model = make_model("mistral", tokenizer)
            rows.append(("chat", vocab, measure_chat(model, fmt, schema, args)))
            rows.append(("serve", vocab, asyncio.run(measure_serve(model, args))))
    sys.exit(0 if report(rows, args) else 1)


if __name__ == "__main__":
    main()
