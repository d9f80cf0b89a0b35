"""A greedy run through the load door, as a child process: RPC workers joined in a process stay
joined until it exits (llama.cpp cannot forget them) and a worker that dies aborts it, so tests
run every RPC client here rather than in the pytest process.

    python -m tests.rpc_client MODEL '{"rpc": ["127.0.0.1:50052"], "n_gpu_layers": 2}' [TOKENS]

prints one JSON line per generated token ({"token": id}, flushed, for tests that act mid-run),
then {"tokens": [...], "logits": sha256 of the float32 logits of prompt + tokens, "devices":
[...]}; a LocalmixError prints {"error": message, "hint": hint} and exits 3.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def greedy(model: Path, settings: dict[str, Any], n_tokens: int = 16) -> dict[str, Any]:
    """Greedy tokens after PROMPT, and a digest of every position's logits (bit-exact check)."""
    from localmix import load
    from localmix.llama import lib
    from localmix.llama.engine import Sampling

    base = {"ctx": 256, "threads": 1, "repack": False, "n_batch": 64, "n_ubatch": 64}
    fields = {**base, **settings}
    for name in ("rpc", "devices", "tensor_split"):
        if name in fields:
            fields[name] = tuple(fields[name])
    with load.open_model(model, load.LoadSettings(**fields)) as loaded:
        engine = loaded.engine
        prompt = engine.tokenize(PROMPT, add_bos=True)
        tokens = []
        for item in engine.stream(
            prompt, sampling=Sampling.greedy(), max_tokens=n_tokens, ignore_eos=True
        ):
            token = getattr(item, "token", -1)
            if token >= 0:
                tokens.append(token)
                print(json.dumps({"token": token}), flush=True)
        rows = engine.logits(prompt + tokens)
        digest = hashlib.sha256(rows.tobytes()).hexdigest()
        return {"tokens": tokens, "logits": digest, "devices": [d.name for d in lib.devices()]}


def main() -> int:
    from localmix.errors import LocalmixError

    model, settings = Path(sys.argv[1]), json.loads(sys.argv[2])
    n_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 16
    try:
        result = greedy(model, settings, n_tokens)
    except LocalmixError as exc:
        print(json.dumps({"error": exc.message, "hint": exc.hint}), flush=True)
        return 3
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
