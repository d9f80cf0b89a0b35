"""The numpy reference forward pass checked piece by piece against brute-force loops, so the parity
tests that lean on it rest on something independently verified."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests import reference_forward as ref


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _brute_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None) -> np.ndarray:
    n, n_heads, d = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros((n, n_heads, d))
    for h in range(n_heads):
        kv = h // group
        for i in range(n):
            keys = [j for j in range(i + 1) if window is None or i - j < window]
            scores = [float(q[i, h] @ k[j, kv]) / math.sqrt(d) for j in keys]
            top = max(scores)
            probs = [math.exp(s - top) for s in scores]
            total = sum(probs)
            for j, p in zip(keys, probs, strict=True):
                out[i, h] += p / total * v[j, kv]
    return out.reshape(n, n_heads * d)


@pytest.mark.parametrize("window", [None, 1, 3, 7, 12, 100])
@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 2), (6, 1)])
def test_reference_attention_matches_brute_force_loop(
    window: int | None, n_heads: int, n_kv_heads: int
) -> None:
    rng = _rng(window or 0)
    n, d = 12, 8
    q = rng.standard_normal((n, n_heads, d)).astype(np.float32)
    k = rng.standard_normal((n, n_kv_heads, d)).astype(np.float32)
    v = rng.standard_normal((n, n_kv_heads, d)).astype(np.float32)
    got = ref.attention(q, k, v, window)
    np.testing.assert_allclose(got, _brute_attention(q, k, v, window), atol=1e-5)


def test_reference_sliding_window_counts_the_query_itself() -> None:
    mask = ref.attention_mask(6, 3)
    assert mask.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert ref.attention_mask(6, None).sum() == 21


def _brute_rope_interleaved(x: np.ndarray, positions: range, theta: float) -> np.ndarray:
    _, heads, d = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for t, pos in enumerate(positions):
        for h in range(heads):
            for i in range(d // 2):
                angle = pos * theta ** (-2 * i / d)
                z = complex(x[t, h, 2 * i], x[t, h, 2 * i + 1]) * complex(
                    math.cos(angle), math.sin(angle)
                )
                out[t, h, 2 * i], out[t, h, 2 * i + 1] = z.real, z.imag
    return out


def _hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta/Mistral q/k rows -> Hugging Face order (pairs (2i, 2i+1) become (i, i + d/2))."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def test_reference_rope_interleaved_is_complex_rotation() -> None:
    x = _rng(1).standard_normal((5, 2, 8)).astype(np.float32)
    got = ref.rope(x, range(5), 10000.0, "mistral")
    np.testing.assert_allclose(got, _brute_rope_interleaved(x, range(5), 10000.0), atol=1e-5)


@pytest.mark.parametrize("theta", [10000.0, 1000000.0])
def test_reference_rope_rotate_half_on_hf_weights_equals_interleaved_on_native(
    theta: float,
) -> None:
    rng = _rng(2)
    n_heads, d, dim, n = 3, 8, 16, 7
    w_native = rng.standard_normal((n_heads * d, dim)).astype(np.float32)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    native = ref.rope((x @ w_native.T).reshape(n, n_heads, d), range(n), theta, "mistral")
    hf = ref.rope(
        (x @ _hf_permute(w_native, n_heads).T).reshape(n, n_heads, d), range(n), theta, "hf"
    )
    # same rotation, rows in a different order inside each head
    back = hf.reshape(n, n_heads, 2, d // 2).swapaxes(2, 3).reshape(n, n_heads, d)
    np.testing.assert_allclose(back, native, atol=1e-5)


def test_reference_rope_scores_depend_only_on_relative_position() -> None:
    rng = _rng(3)
    q = rng.standard_normal((1, 1, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 16)).astype(np.float32)

    def score(m: int, n: int) -> float:
        return float(
            ref.rope(q, [m], 10000.0, "hf").ravel() @ ref.rope(k, [n], 10000.0, "hf").ravel()
        )

    assert score(9, 4) == pytest.approx(score(25, 20), abs=1e-4)
    assert score(9, 4) != pytest.approx(score(9, 5), abs=1e-4)


def test_reference_moe_matches_per_token_loop() -> None:
    rng = _rng(4)
    n, dim, ff, n_experts = 9, 8, 12, 8
    x = rng.standard_normal((n, dim)).astype(np.float32)
    router = rng.standard_normal((n_experts, dim)).astype(np.float32)
    experts = [
        tuple(rng.standard_normal(s).astype(np.float32) for s in ((ff, dim), (ff, dim), (dim, ff)))
        for _ in range(n_experts)
    ]
    expected = np.zeros_like(x)
    for t in range(n):
        logits = router @ x[t]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = sorted(range(n_experts), key=lambda e: -probs[e])[:2]
        total = sum(probs[e] for e in top)
        for e in top:
            gate, up, down = experts[e]
            hidden = (gate @ x[t]) / (1 + np.exp(-(gate @ x[t]))) * (up @ x[t])
            expected[t] += probs[e] / total * (down @ hidden)
    np.testing.assert_allclose(ref.moe(x, router, experts, 2), expected, rtol=1e-4, atol=1e-4)


def _tiny_weights(hp: ref.Hparams, seed: int) -> dict[str, np.ndarray]:
    rng = _rng(seed)
    ff = 24

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)

    w = {
        "model.embed_tokens.weight": rand(hp.vocab_size, hp.dim),
        "model.norm.weight": 1 + 0.1 * rand(hp.dim),
        "lm_head.weight": rand(hp.vocab_size, hp.dim),
    }
    for i in range(hp.n_layers):
        names = ref._names(hp, i)
        w[names["attn_norm"]] = 1 + 0.1 * rand(hp.dim)
        w[names["ffn_norm"]] = 1 + 0.1 * rand(hp.dim)
        w[names["q"]] = rand(hp.n_heads * hp.head_dim, hp.dim)
        w[names["k"]] = rand(hp.n_kv_heads * hp.head_dim, hp.dim)
        w[names["v"]] = rand(hp.n_kv_heads * hp.head_dim, hp.dim)
        w[names["o"]] = rand(hp.dim, hp.n_heads * hp.head_dim)
        if hp.n_experts:
            w[names["router"]] = rand(hp.n_experts, hp.dim)
            for e in range(hp.n_experts):
                for part, shape in (
                    ("w1", (ff, hp.dim)),
                    ("w3", (ff, hp.dim)),
                    ("w2", (hp.dim, ff)),
                ):
                    w[names["expert"].format(e=e, w=part)] = rand(*shape)
        else:
            w[names["gate"]] = rand(ff, hp.dim)
            w[names["up"]] = rand(ff, hp.dim)
            w[names["down"]] = rand(hp.dim, ff)
    return w


def _to_native(hp: ref.Hparams, w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    native_hp = replace(hp, layout="mistral")
    out = {
        "tok_embeddings.weight": w["model.embed_tokens.weight"],
        "norm.weight": w["model.norm.weight"],
        "output.weight": w["lm_head.weight"],
    }
    unpermute = {"q": hp.n_heads, "k": hp.n_kv_heads}
    for i in range(hp.n_layers):
        src, dst = ref._names(hp, i), ref._names(native_hp, i)
        for key, name in src.items():
            if key == "expert":
                for e in range(hp.n_experts):
                    for part in ("w1", "w2", "w3"):
                        out[dst[key].format(e=e, w=part)] = w[name.format(e=e, w=part)]
            elif name in w:
                # HF order -> native order: inverse of _hf_permute
                out[dst[key]] = (
                    _hf_unpermute(w[name], unpermute[key]) if key in unpermute else w[name]
                )
    return out


def _hf_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_experts", [0, 8])
def test_reference_forward_same_logits_for_hf_and_native_layouts(n_experts: int) -> None:
    hp = ref.Hparams(
        dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, vocab_size=50, norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=None, n_experts=n_experts,
        n_experts_used=2 if n_experts else 0, layout="hf",
    )  # fmt: skip
    w = _tiny_weights(hp, seed=5)
    tokens = list(_rng(6).integers(0, hp.vocab_size, size=20))
    hf = ref.forward(hp, w, tokens)
    native = ref.forward(replace(hp, layout="mistral"), _to_native(hp, w), tokens)
    assert hf.shape == (20, 50)
    np.testing.assert_allclose(hf, native, atol=1e-4)


def test_reference_forward_is_causal_and_window_limits_what_it_sees() -> None:
    hp = ref.Hparams(
        dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, vocab_size=50, norm_eps=1e-5,
        rope_theta=10000.0, sliding_window=None, n_experts=0, n_experts_used=0, layout="hf",
    )  # fmt: skip
    w = _tiny_weights(hp, seed=7)
    tokens = list(_rng(8).integers(0, hp.vocab_size, size=16))
    full = ref.forward(hp, w, tokens)
    np.testing.assert_allclose(ref.forward(hp, w, tokens[:9]), full[:9], atol=1e-5)
    # a window as long as the prompt changes nothing; a short one changes later positions only
    np.testing.assert_allclose(ref.forward(replace(hp, sliding_window=16), w, tokens), full)
    windowed = ref.forward(replace(hp, sliding_window=4), w, tokens)
    np.testing.assert_allclose(windowed[:4], full[:4], atol=1e-6)
    assert not np.allclose(windowed[4:], full[4:], atol=1e-3)


def test_reference_reads_safetensors_f32_f16_and_bf16(tmp_path: Path) -> None:
    values = np.array([[1.0, -2.5], [0.15625, 3.0e-3]], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact for these bits
    blobs = {"a": ("F32", values.tobytes()), "b": ("F16", values.astype(np.float16).tobytes())}
    blobs["c"] = ("BF16", bf16.tobytes())
    header, data = {}, b""
    for name, (dtype, raw) in blobs.items():
        header[name] = {
            "dtype": dtype,
            "shape": [2, 2],
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    got = ref.read_safetensors(path)
    np.testing.assert_array_equal(got["a"], values)
    np.testing.assert_array_equal(got["b"], values.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["c"], (bf16.astype(np.uint32) << 16).view(np.float32))
    assert got["c"][0, 0] == 1.0 and got["c"][0, 1] == -2.5
