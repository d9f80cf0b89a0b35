"""Seeded random-weight Mistral / Mixtral / Ministral 3 checkpoints with the real tokenizers that
mistral-common ships, in Hugging Face or Mistral-native layout, for the demo, the tests and the
benchmarks.

"ministral3" is laid out like Mistral's Ministral 3 releases: a multimodal Hugging Face checkpoint
(Mistral3ForConditionalGeneration, the language model under model.language_model.*, YaRN and
llama_4_scaling_beta in text_config.rope_parameters) or params.json with yarn and llama_4_scaling,
each with a stub image encoder that a text conversion leaves out.

The same seed gives the same model in both layouts: weights are drawn per tensor in Meta's
(Mistral-native) order, and the Hugging Face layout stores q/k permuted the way HF's own
conversion script does. Tensors are generated and written one at a time, so even the "1b" size
needs well under 1 GB of memory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localmix.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

ARCHS = ("mistral", "mixtral", "ministral3")
LAYOUTS = ("hf", "mistral")
DTYPES = {"f32": ("F32", 4), "bf16": ("BF16", 2)}


@dataclass(frozen=True)
class Size:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int  # dense MLP width; each Mixtral expert is half as wide
    context: int
    shard_bytes: int  # HF layout: split into model-0000i-of-0000n files above this (0 = one file)


SIZES = {
    "tiny": Size(64, 2, 4, 2, 256, 2048, 0),
    "small": Size(256, 6, 8, 4, 1024, 4096, 0),
    "125m": Size(768, 12, 12, 4, 2048, 8192, 200 * 2**20),
    "1b": Size(2048, 18, 16, 8, 5632, 8192, 1 * 2**30),
}


@dataclass(frozen=True)
class Tokenizer:
    file: str  # in mistral_common/data
    vocab_size: int
    hf_name: str  # file name in a Hugging Face layout directory
    native_name: str  # file name in a Mistral-native directory
    rope_theta: float
    template: str  # a jinja chat template for tokenizer_config.json


_V1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
_V3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

TOKENIZERS = {
    "v1": Tokenizer(
        "tokenizer.model.v1", 32000, "tokenizer.model", "tokenizer.model.v1", 1e4, _V1_TEMPLATE
    ),
    "v3": Tokenizer(
        "mistral_instruct_tokenizer_240323.model.v3",
        32768,
        "tokenizer.model",
        "tokenizer.model.v3",
        1e6,
        _V3_TEMPLATE,
    ),
    "tekken": Tokenizer(
        "tekken_240718.json", 131072, "tekken.json", "tekken.json", 1e6, _V3_TEMPLATE
    ),
}

N_EXPERTS = 8
N_EXPERTS_USED = 2
NORM_EPS = 1e-5
# Ministral 3's long-context settings: YaRN x16 over the pre-training context, query scaling
YARN_FACTOR = 16.0
LLAMA_4_SCALING_BETA = 0.1


@dataclass(frozen=True)
class Spec:
    """Everything that shapes a synthetic model."""

    arch: str
    size: Size
    tokenizer: Tokenizer
    sliding_window: int | None

    @property
    def head_dim(self) -> int:
        return self.size.dim // self.size.n_heads

    @property
    def n_experts(self) -> int:
        return N_EXPERTS if self.arch == "mixtral" else 0

    @property
    def ffn(self) -> int:
        return self.size.ffn // 2 if self.n_experts else self.size.ffn

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(Mistral-native name, shape) of every tensor, in file order."""
        s, d, hd, f = self.size, self.size.dim, self.head_dim, self.ffn
        vocab = self.tokenizer.vocab_size
        yield "tok_embeddings.weight", (vocab, d)
        for i in range(s.n_layers):
            p = f"layers.{i}."
            yield p + "attention_norm.weight", (d,)
            yield p + "attention.wq.weight", (s.n_heads * hd, d)
            yield p + "attention.wk.weight", (s.n_kv_heads * hd, d)
            yield p + "attention.wv.weight", (s.n_kv_heads * hd, d)
            yield p + "attention.wo.weight", (d, s.n_heads * hd)
            yield p + "ffn_norm.weight", (d,)
            mlps = [p + f"feed_forward.experts.{e}." for e in range(self.n_experts)]
            if self.n_experts:
                yield p + "feed_forward.gate.weight", (self.n_experts, d)
            for m in mlps or [p + "feed_forward."]:
                yield m + "w1.weight", (f, d)
                yield m + "w2.weight", (d, f)
                yield m + "w3.weight", (f, d)
        yield "norm.weight", (d,)
        yield "output.weight", (vocab, d)

    def image_stub(self) -> list[tuple[str, tuple[int, ...]]]:
        """A few tensors standing for a multimodal release's image encoder (native names)."""
        if self.arch != "ministral3":
            return []
        return [
            ("vision_encoder.patch_conv.weight", (8, 3, 2, 2)),
            ("vision_language_adapter.w_in.weight", (self.size.dim, 8)),
        ]

    @property
    def yarn_orig_context(self) -> int:
        return self.size.context // int(YARN_FACTOR)


def spec(arch: str, size: str, tokenizer: str, sliding_window: int | None = None) -> Spec:
    """The Spec for names as a user types them; UsageError for unknown ones."""
    _check("arch", arch, ARCHS)
    _check("size", size, tuple(SIZES))
    _check("tokenizer", tokenizer, tuple(TOKENIZERS))
    return Spec(arch, SIZES[size], TOKENIZERS[tokenizer], sliding_window)


def parameter_count(arch: str = "mistral", size: str = "tiny", tokenizer: str = "v1") -> int:
    """Total parameters of a synthetic model."""
    total = 0
    for _, shape in spec(arch, size, tokenizer).tensors():
        n = 1
        for dim in shape:
            n *= dim
        total += n
    return total


def checkpoint(
    out_dir: Path,
    *,
    arch: str = "mistral",
    size: str = "tiny",
    tokenizer: str = "v1",
    layout: str = "hf",
    seed: int = 0,
    sliding_window: int | None = None,
    dtype: str = "f32",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random-weight checkpoint (config, safetensors, tokenizer) into out_dir; return it.

    dtype: "f32" or "bf16" (as real checkpoints ship); max_shard_bytes: split the HF layout's
    weights into model-0000i-of-0000n.safetensors files plus an index above this many bytes
    (default: per size; 0 = one file).
    """
    s = spec(arch, size, tokenizer, sliding_window)
    _check("layout", layout, LAYOUTS)
    _check("dtype", dtype, tuple(DTYPES))
    if not 0 <= seed < 2**32:
        raise UsageError(f"seed {seed} is not between 0 and {2**32 - 1}", hint="e.g. --seed 0")
    out_dir = _check_out_dir(Path(out_dir))
    # Written into a hidden folder beside out_dir and moved into place once complete: a failure
    # (full disk, read-only place, Ctrl-C) leaves no half-written checkpoint behind.
    with _staging(out_dir) as stage:
        _write_checkpoint(s, stage, layout, seed, dtype, max_shard_bytes)
        _place(stage, out_dir)
    return out_dir


def _check_out_dir(out_dir: Path) -> Path:
    from localmix.errors import OutputError

    if not str(out_dir).strip() or out_dir.name in ("", ".", ".."):
        raise UsageError(
            f"{str(out_dir)!r} is not a directory name for the checkpoint",
            hint="give a new directory, e.g. `localmix synth ./tiny`",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(
            f"{out_dir}: is a file, not a directory", hint="give a new directory for the checkpoint"
        )
    return out_dir


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A fresh hidden folder beside out_dir; removed, with any parents this made, on failure."""
    from localmix import disk
    from localmix.errors import from_os_error

    made = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    stage = disk.partial_path(out_dir)  # a folder, named as every partial file is
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage.mkdir()
        yield stage
    except OSError as exc:
        raise from_os_error(exc, "writing the checkpoint") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in made:  # deepest first: only the empty folders this call created
            with contextlib.suppress(OSError):
                parent.rmdir()


def _place(stage: Path, out_dir: Path) -> None:
    """Move a complete checkpoint into out_dir: a new folder by one rename; an existing one
    keeps its other files and loses the previous checkpoint's."""
    import os

    if not out_dir.exists():
        os.rename(stage, out_dir)
        return
    _remove_stale(out_dir)
    for path in stage.iterdir():
        os.replace(path, out_dir / path.name)


def _write_checkpoint(
    s: Spec, out_dir: Path, layout: str, seed: int, dtype: str, max_shard_bytes: int | None
) -> None:
    _copy_tokenizer(s, out_dir, layout)
    tensors = list(s.tensors()) + s.image_stub()
    if layout == "hf":
        (out_dir / "config.json").write_text(json.dumps(_hf_config(s, dtype), indent=2) + "\n")
        (out_dir / "tokenizer_config.json").write_text(
            json.dumps(_tokenizer_config(s), indent=2) + "\n"
        )
        named = [(_hf_name(n, _nest(s)), shape) for n, shape in tensors]
        values = _hf_values(s, seed)
        shard = s.size.shard_bytes if max_shard_bytes is None else max_shard_bytes
        _write_shards(out_dir, named, dtype, values, shard)
    else:
        (out_dir / "params.json").write_text(json.dumps(_native_params(s), indent=2) + "\n")
        shapes = dict(tensors)
        write_safetensors(
            out_dir / "consolidated.safetensors",
            tensors,
            dtype,
            lambda name: _values(seed, name, shapes[name]),
        )


# ---- hyper-parameter files ---------------------------------------------------------------------


def _hf_config(s: Spec, dtype: str) -> dict:
    if s.arch == "ministral3":
        return _ministral3_config(s, dtype)
    config = {
        "architectures": ["MixtralForCausalLM" if s.n_experts else "MistralForCausalLM"],
        "model_type": s.arch,
        "hidden_size": s.size.dim,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.size.n_layers,
        "num_attention_heads": s.size.n_heads,
        "num_key_value_heads": s.size.n_kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.size.context,
        "rms_norm_eps": NORM_EPS,
        "rope_theta": s.tokenizer.rope_theta,
        "sliding_window": s.sliding_window,
        "vocab_size": s.tokenizer.vocab_size,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
    }
    if s.n_experts:
        config.update(num_local_experts=s.n_experts, num_experts_per_tok=N_EXPERTS_USED)
        config.update(output_router_logits=False, router_aux_loss_coef=0.02)
    return config


def _ministral3_config(s: Spec, dtype: str) -> dict:
    """Mistral3ForConditionalGeneration around a ministral3 text model (Ministral 3's layout)."""
    text = {
        "model_type": "ministral3",
        "hidden_size": s.size.dim,
        "intermediate_size": s.ffn,
        "num_hidden_layers": s.size.n_layers,
        "num_attention_heads": s.size.n_heads,
        "num_key_value_heads": s.size.n_kv_heads,
        "head_dim": s.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": s.size.context,
        "rms_norm_eps": NORM_EPS,
        "rope_parameters": {
            "rope_type": "yarn",
            "type": "yarn",
            "rope_theta": s.tokenizer.rope_theta,
            "factor": YARN_FACTOR,
            "original_max_position_embeddings": s.yarn_orig_context,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": LLAMA_4_SCALING_BETA,
        },
        "sliding_window": s.sliding_window,
        "vocab_size": s.tokenizer.vocab_size,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": text,
        "vision_config": {"model_type": "pixtral", "hidden_size": 8, "patch_size": 2},
        "image_token_index": 10,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if dtype == "bf16" else "float32",
    }


def _native_params(s: Spec) -> dict:
    params: dict = {
        "dim": s.size.dim,
        "n_layers": s.size.n_layers,
        "head_dim": s.head_dim,
        "hidden_dim": s.ffn,
        "n_heads": s.size.n_heads,
        "n_kv_heads": s.size.n_kv_heads,
        "norm_eps": NORM_EPS,
        "vocab_size": s.tokenizer.vocab_size,
        "rope_theta": s.tokenizer.rope_theta,
        "max_seq_len": s.size.context,
    }
    if s.sliding_window is not None:
        params["sliding_window"] = s.sliding_window
    if s.n_experts:
        params["moe"] = {"num_experts": s.n_experts, "num_experts_per_tok": N_EXPERTS_USED}
    if s.arch == "ministral3":
        orig = s.yarn_orig_context
        params["yarn"] = {
            "factor": YARN_FACTOR, "original_max_position_embeddings": orig, "beta": 32.0,
            "alpha": 1.0, "apply_scale": False,
        }  # fmt: skip
        params["llama_4_scaling"] = {
            "beta": LLAMA_4_SCALING_BETA, "original_max_position_embeddings": orig,
        }  # fmt: skip
    return params


def _tokenizer_config(s: Spec) -> dict:
    """What transformers writes for Mistral's sentencepiece tokenizers (control tokens listed)."""
    decoder = {
        str(i): {
            "content": piece,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, piece in _control_pieces(s.tokenizer)
    }
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "chat_template": s.tokenizer.template,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": s.size.context,
        "tokenizer_class": "LlamaTokenizer",
    }


def _control_pieces(tok: Tokenizer) -> list[tuple[int, str]]:
    if tok.file.endswith(".json"):
        return []  # tekken: the converter reads tekken.json itself
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(_data_dir() / tok.file))
    return [
        (i, sp.IdToPiece(i)) for i in range(sp.vocab_size()) if sp.IsControl(i) or sp.IsUnknown(i)
    ]


def _data_dir() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data"


def _copy_tokenizer(s: Spec, out_dir: Path, layout: str) -> None:
    name = s.tokenizer.hf_name if layout == "hf" else s.tokenizer.native_name
    shutil.copyfile(_data_dir() / s.tokenizer.file, out_dir / name)


def _remove_stale(out_dir: Path) -> None:
    """A rerun into the same directory must not mix two checkpoints' files."""
    for path in out_dir.iterdir():
        stale = path.suffix == ".safetensors" or path.name.startswith(("tokenizer", "tekken"))
        if path.is_file() and (
            stale or path.name in ("config.json", "params.json", "model.safetensors.index.json")
        ):
            path.unlink()


# ---- weights -----------------------------------------------------------------------------------

_HF_NAMES = {
    "attention_norm": "input_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.gate": "block_sparse_moe.gate",
    "feed_forward.experts": "block_sparse_moe.experts",
}


_HF_IMAGE_STUB = {
    "vision_encoder.patch_conv.weight": "model.vision_tower.patch_conv.weight",
    "vision_language_adapter.w_in.weight": "model.multi_modal_projector.linear_1.weight",
}


def _nest(s: Spec) -> str:
    """Where the HF layout keeps the language model: a multimodal release nests it."""
    return "model.language_model." if s.arch == "ministral3" else "model."


def _hf_name(native: str, nest: str = "model.") -> str:
    top = {
        "tok_embeddings.weight": nest + "embed_tokens.weight",
        "norm.weight": nest + "norm.weight",
    }
    if native in top:
        return top[native]
    if native == "output.weight":
        return "lm_head.weight"
    if native in _HF_IMAGE_STUB:
        return _HF_IMAGE_STUB[native]
    _, layer, rest = native.split(".", 2)
    for old, new in _HF_NAMES.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
            break
    return f"{nest}layers.{layer}.{rest}"


def _values(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded per tensor (so any write order gives the same model): norms near 1, weights with
    std 1/sqrt(fan_in) so activations and logits stay of order 1."""
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        x *= np.float32(0.1)
        x += np.float32(1.0)
        return x
    x *= np.float32(shape[1] ** -0.5)
    return x


def hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved q/k rows -> HF's rotate-half order (what HF's conversion script does)."""
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def _hf_values(s: Spec, seed: int) -> Callable[[str], np.ndarray]:
    native_of = {_hf_name(n, _nest(s)): (n, shape) for n, shape in [*s.tensors(), *s.image_stub()]}

    def produce(hf_name: str) -> np.ndarray:
        native, shape = native_of[hf_name]
        x = _values(seed, native, shape)
        if native.endswith("attention.wq.weight"):
            return hf_permute(x, s.size.n_heads)
        if native.endswith("attention.wk.weight"):
            return hf_permute(x, s.size.n_kv_heads)
        return x

    return produce


# ---- safetensors, written by hand so that only one tensor is ever in memory ------------------


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (no NaNs in random weights)."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16)


def write_safetensors(
    path: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    produce: Callable[[str], np.ndarray],
) -> int:
    """Write one .safetensors file tensor by tensor; return its data bytes."""
    import numpy as np

    st_dtype, width = DTYPES[dtype]
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = width * int(np.prod(shape, dtype=np.int64))
        header[name] = {
            "dtype": st_dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            x = produce(name)
            assert x.shape == tuple(shape), (name, x.shape, shape)
            (to_bf16(x) if dtype == "bf16" else x.astype(np.float32, copy=False)).tofile(f)
            del x
    return offset


def _write_shards(
    out_dir: Path,
    tensors: list[tuple[str, tuple[int, ...]]],
    dtype: str,
    produce: Callable[[str], np.ndarray],
    shard_bytes: int,
) -> None:
    width = DTYPES[dtype][1]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        n = width
        for dim in shape:
            n *= dim
        if shard_bytes and shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += n
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", tensors, dtype, produce)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / file, shard, dtype, produce)
        weight_map.update((name, file) for name, _ in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _check(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}", hint=f"choose one of: {', '.join(allowed)}")
