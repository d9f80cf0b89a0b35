"""A small numpy forward pass of Mistral / Mixtral, read straight from a checkpoint's safetensors.

This is the suite's own reference: it shares no code with localmix.build.convert or llama.cpp, so a
converted GGUF whose llama.cpp logits match these is converted correctly. Float32 math throughout.

Hugging Face layout (config.json + model*.safetensors) uses rotate-half RoPE on HF's permuted q/k
weights; Mistral-native layout (params.json + consolidated*.safetensors) keeps q/k in Meta's order
and rotates interleaved pairs. Both are implemented directly, not one through the other.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import numpy as np

# safetensors dtype names -> numpy dtype strings; BF16 is widened by hand (numpy has no bfloat16).
_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


@dataclass(frozen=True)
class Hparams:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    sliding_window: int | None  # a query sees keys at distance < sliding_window (itself included)
    n_experts: int  # 0 = dense MLP
    n_experts_used: int
    layout: str  # "hf" (rotate-half RoPE) or "mistral" (interleaved RoPE)
    tied_embeddings: bool = False


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as float32, parsed from the format itself."""
    import numpy as np

    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    base = 8 + header_len
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = np.frombuffer(raw[base + start : base + end], dtype=_DTYPES[info["dtype"]])
        if info["dtype"] == "BF16":
            data = (data.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = data.astype(np.float32).reshape(info["shape"])
    return tensors


def load(ckpt: Path) -> tuple[Hparams, dict[str, np.ndarray]]:
    """Hyper-parameters and float32 weights of a HF or Mistral-native checkpoint directory."""
    if (ckpt / "config.json").is_file():
        hp = _hf_hparams(json.loads((ckpt / "config.json").read_text()))
        files = sorted(ckpt.glob("*.safetensors"))
    elif (ckpt / "params.json").is_file():
        hp = _native_hparams(json.loads((ckpt / "params.json").read_text()))
        files = sorted(ckpt.glob("consolidated*.safetensors"))
    else:
        raise FileNotFoundError(f"{ckpt}: neither config.json nor params.json")
    weights: dict[str, np.ndarray] = {}
    for file in files:
        weights.update(read_safetensors(file))
    return hp, weights


def _hf_hparams(cfg: dict) -> Hparams:
    n_heads = cfg["num_attention_heads"]
    return Hparams(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg.get("rope_theta", 10000.0),
        sliding_window=cfg.get("sliding_window"),
        n_experts=cfg.get("num_local_experts", 0),
        n_experts_used=cfg.get("num_experts_per_tok", 0),
        layout="hf",
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _native_hparams(params: dict) -> Hparams:
    moe = params.get("moe") or {}
    return Hparams(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        head_dim=params.get("head_dim") or params["dim"] // params["n_heads"],
        vocab_size=params["vocab_size"],
        norm_eps=params["norm_eps"],
        rope_theta=params.get("rope_theta", 10000.0),
        sliding_window=params.get("sliding_window"),
        n_experts=moe.get("num_experts", 0),
        n_experts_used=moe.get("num_experts_per_tok", 0),
        layout="mistral",
    )


# ---- the pieces -------------------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    import numpy as np

    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x: np.ndarray) -> np.ndarray:
    import numpy as np

    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    import numpy as np

    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def rope_angles(positions: Sequence[int], head_dim: int, theta: float) -> np.ndarray:
    """(n, head_dim/2) rotation angles: position * theta^(-2i/head_dim)."""
    import numpy as np

    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return np.outer(np.asarray(positions, dtype=np.float64), inv_freq)


def rope(x: np.ndarray, positions: Sequence[int], theta: float, style: str) -> np.ndarray:
    """Rotate (n, heads, head_dim) by position: "hf" pairs (i, i+d/2), "mistral" pairs (2i, 2i+1)."""
    import numpy as np

    angles = rope_angles(positions, x.shape[-1], theta)
    cos = np.cos(angles)[:, None, :].astype(np.float32)
    sin = np.sin(angles)[:, None, :].astype(np.float32)
    if style == "hf":
        half = x.shape[-1] // 2
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = b * cos + a * sin
    return out


def attention_mask(n: int, sliding_window: int | None) -> np.ndarray:
    """(n, n) bool, True where query i may see key j: causal, and i - j < sliding_window if set."""
    import numpy as np

    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    allowed = j <= i
    if sliding_window:
        allowed &= (i - j) < sliding_window
    return allowed


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, sliding_window: int | None
) -> np.ndarray:
    """Grouped-query attention: q (n, H, D), k/v (n, KV, D) -> (n, H*D)."""
    import numpy as np

    n, n_heads, head_dim = q.shape
    group = n_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.float32(np.sqrt(head_dim))
    scores = np.where(attention_mask(n, sliding_window)[None], scores, -np.inf)
    out = np.einsum("hqk,khd->qhd", softmax(scores, axis=-1), v)
    return out.reshape(n, n_heads * head_dim)


def _ignore(role: str, rows: np.ndarray, expert: int | None) -> None:
    """A record() that keeps nothing. record(role, rows, expert) sees the input rows of one
    weight matrix ("ffn_up", "ffn_down_exps", ...; expert None for a dense weight)."""


def swiglu(
    x: np.ndarray,
    gate: np.ndarray,
    up: np.ndarray,
    down: np.ndarray,
    record: Callable[[str, np.ndarray, int | None], None] = _ignore,
    expert: int | None = None,
) -> np.ndarray:
    suffix = "_exps" if expert is not None else ""
    record("ffn_gate" + suffix, x, expert)
    record("ffn_up" + suffix, x, expert)
    hidden = silu(x @ gate.T) * (x @ up.T)
    record("ffn_down" + suffix, hidden, expert)
    return hidden @ down.T


def moe(
    x: np.ndarray,
    router: np.ndarray,
    experts: Sequence[tuple[np.ndarray, ...]],
    top_k: int,
    record: Callable[[str, np.ndarray, int | None], None] = _ignore,
) -> np.ndarray:
    """HF Mixtral routing: softmax over all experts, top-k, renormalize, weighted sum of expert MLPs."""
    import numpy as np

    record("ffn_gate_inp", x, None)
    probs = softmax(x @ router.T, axis=-1)  # (n, E)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    weights = weights / weights.sum(axis=-1, keepdims=True)
    out = np.zeros_like(x)
    for e, (gate, up, down) in enumerate(experts):
        rows, slot = np.nonzero(chosen == e)
        if rows.size:
            mlp = swiglu(x[rows], gate, up, down, record, e)
            out[rows] += weights[rows, slot][:, None] * mlp
    return out


def router_margin(x: np.ndarray, router: np.ndarray, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th expert probability: near 0 = a routing tie."""
    import numpy as np

    probs = np.sort(softmax(x @ router.T, axis=-1), axis=-1)[:, ::-1]
    return float(np.min(probs[:, top_k - 1] - probs[:, top_k]))


# ---- the model --------------------------------------------------------------------------------


def _names(hp: Hparams, layer: int) -> dict[str, str]:
    if hp.layout == "hf":
        p = f"model.layers.{layer}."
        return {
            "attn_norm": p + "input_layernorm.weight",
            "q": p + "self_attn.q_proj.weight",
            "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight",
            "o": p + "self_attn.o_proj.weight",
            "ffn_norm": p + "post_attention_layernorm.weight",
            "gate": p + "mlp.gate_proj.weight",
            "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight",
            "router": p + "block_sparse_moe.gate.weight",
            "expert": p + "block_sparse_moe.experts.{e}.{w}.weight",
        }
    p = f"layers.{layer}."
    return {
        "attn_norm": p + "attention_norm.weight",
        "q": p + "attention.wq.weight",
        "k": p + "attention.wk.weight",
        "v": p + "attention.wv.weight",
        "o": p + "attention.wo.weight",
        "ffn_norm": p + "ffn_norm.weight",
        "gate": p + "feed_forward.w1.weight",
        "up": p + "feed_forward.w3.weight",
        "down": p + "feed_forward.w2.weight",
        "router": p + "feed_forward.gate.weight",
        "expert": p + "feed_forward.experts.{e}.{w}.weight",
    }


def _experts(w: dict[str, np.ndarray], pattern: str, n: int) -> list[tuple[np.ndarray, ...]]:
    # w1 = gate, w3 = up, w2 = down, in both the HF Mixtral and the Mistral-native naming
    return [tuple(w[pattern.format(e=e, w=k)] for k in ("w1", "w3", "w2")) for e in range(n)]


def forward(
    hp: Hparams,
    w: dict[str, np.ndarray],
    tokens: Sequence[int],
    *,
    trace: dict | None = None,
    record: Callable[[str, np.ndarray, int | None], None] | None = None,
) -> np.ndarray:
    """Logits (n_tokens, vocab) float32 for every position of `tokens`, from position 0.

    `trace`, when given, collects "router_margin": the smallest top-k routing gap seen (MoE only).
    `record(weight, rows, expert)`, when given, sees the input rows of every block weight matrix,
    named as in a GGUF ("blk.0.attn_q.weight"; expert None for a dense weight).
    """
    import numpy as np

    hf = hp.layout == "hf"
    embed = w["model.embed_tokens.weight" if hf else "tok_embeddings.weight"]
    x = embed[np.asarray(tokens)].astype(np.float32)
    n = x.shape[0]
    positions = range(n)
    margin = np.inf
    for layer in range(hp.n_layers):
        names = _names(hp, layer)

        def note(role: str, rows: np.ndarray, expert: int | None, layer: int = layer) -> None:
            if record is not None:
                record(f"blk.{layer}.{role}.weight", rows, expert)

        h = rms_norm(x, w[names["attn_norm"]], hp.norm_eps)
        for role in ("attn_q", "attn_k", "attn_v"):
            note(role, h, None)
        q = (h @ w[names["q"]].T).reshape(n, hp.n_heads, hp.head_dim)
        k = (h @ w[names["k"]].T).reshape(n, hp.n_kv_heads, hp.head_dim)
        v = (h @ w[names["v"]].T).reshape(n, hp.n_kv_heads, hp.head_dim)
        q = rope(q, positions, hp.rope_theta, hp.layout)
        k = rope(k, positions, hp.rope_theta, hp.layout)
        mixed = attention(q, k, v, hp.sliding_window)
        note("attn_output", mixed, None)
        x = x + mixed @ w[names["o"]].T
        h = rms_norm(x, w[names["ffn_norm"]], hp.norm_eps)
        if hp.n_experts:
            router = w[names["router"]]
            experts = _experts(w, names["expert"], hp.n_experts)
            margin = min(margin, router_margin(h, router, hp.n_experts_used))
            x = x + moe(h, router, experts, hp.n_experts_used, note)
        else:
            x = x + swiglu(h, w[names["gate"]], w[names["up"]], w[names["down"]], note)
    x = rms_norm(x, w["model.norm.weight" if hf else "norm.weight"], hp.norm_eps)
    head_name = "lm_head.weight" if hf else "output.weight"
    head = embed if hp.tied_embeddings or head_name not in w else w[head_name]
    if trace is not None:
        trace["router_margin"] = float(margin)
    return (x @ head.T).astype(np.float32)


def logits(ckpt: Path, tokens: Sequence[int], *, sliding_window: int | None = -1) -> np.ndarray:
    """Reference logits for a checkpoint directory; sliding_window overrides the config's (-1 = keep)."""
    from dataclasses import replace

    hp, weights = load(ckpt)
    if sliding_window != -1:
        hp = replace(hp, sliding_window=sliding_window)
    return forward(hp, weights, tokens)
