"""Mistral and Mixtral -> GGUF "llama" architecture: hyper-parameters, tensor names, the q/k row
order, and Mixtral's experts stacked into ffn_{gate,down,up}_exps (one stacked tensor at a time)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from localmix.build.convert import register
from localmix.build.convert.checkpoint import Checkpoint, TensorEntry
from localmix.build.convert.output import OutputTensor, row_blocks, tensor_type
from localmix.errors import CheckpointError

if TYPE_CHECKING:
    import gguf
    import numpy as np

# tensors a checkpoint may carry that the GGUF does not need
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# the image encoder of multimodal checkpoints (Mistral Small 3.1+, Ministral 3, Magistral 2509):
# the text GGUF leaves it out, as convert_hf_to_gguf.py does (its mmproj is a separate file)
_MULTIMODAL = (
    "vision_tower.", "vision_encoder.", "vision_language_adapter.", "multi_modal_projector.",
    "patch_merger.", "pre_mm_projector_norm.",
)  # fmt: skip


def is_multimodal(name: str) -> bool:
    """A tensor of the image encoder or its projector (HF or Mistral-native names)."""
    return name.startswith(_MULTIMODAL) or any(f".{p}" in name for p in _MULTIMODAL)


DEFAULT_NATIVE_CONTEXT = 32768  # params.json rarely says; Mistral 7B v0.2+ and Mixtral train on 32k


@dataclass(frozen=True)
class Hparams:
    """Mistral / Mixtral hyper-parameters, whichever layout they came in."""

    n_layers: int
    dim: int
    ffn: int  # per expert for Mixtral
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context: int
    norm_eps: float
    rope_theta: float
    n_experts: int  # 0 = dense
    n_experts_used: int


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal HF config's language model part (text_config) over its top level."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def hparams(ckpt: Checkpoint) -> Hparams:
    """Hyper-parameters from config.json (HF) or params.json (Mistral-native)."""
    c = text_config(ckpt.config)

    def get(*keys: str, default: Any = None) -> Any:
        for key in keys:
            if c.get(key) is not None:
                return c[key]
        if default is None:
            raise CheckpointError(
                f"{ckpt.config_file}: no {keys[0]!r}", hint="the checkpoint's config is incomplete"
            )
        return default

    try:
        if ckpt.layout == "hf":
            heads = int(get("num_attention_heads"))
            dim = int(get("hidden_size"))
            rope = c.get("rope_parameters") or {}
            return Hparams(
                n_layers=int(get("num_hidden_layers")),
                dim=dim,
                ffn=int(get("intermediate_size")),
                n_heads=heads,
                n_kv_heads=int(get("num_key_value_heads", default=heads)),
                head_dim=int(get("head_dim", default=dim // heads)),
                vocab_size=int(get("vocab_size")),
                context=int(get("max_position_embeddings")),
                norm_eps=float(get("rms_norm_eps")),
                rope_theta=float(get("rope_theta", default=rope.get("rope_theta", 10000.0))),
                n_experts=int(c.get("num_local_experts") or 0),
                n_experts_used=int(c.get("num_experts_per_tok") or 0),
            )
        heads = int(get("n_heads"))
        dim = int(get("dim"))
        moe = c.get("moe") or {}
        return Hparams(
            n_layers=int(get("n_layers")),
            dim=dim,
            ffn=int(get("hidden_dim")),
            n_heads=heads,
            n_kv_heads=int(get("n_kv_heads", default=heads)),
            head_dim=int(get("head_dim", default=dim // heads)),
            vocab_size=int(get("vocab_size")),
            context=int(
                get("max_position_embeddings", "max_seq_len", default=DEFAULT_NATIVE_CONTEXT)
            ),
            norm_eps=float(get("norm_eps")),
            rope_theta=float(get("rope_theta", default=10000.0)),
            n_experts=int(moe.get("num_experts") or 0),
            n_experts_used=int(moe.get("num_experts_per_tok") or 0),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{ckpt.config_file}: bad value ({exc})", hint="the config is damaged"
        ) from None


# per-layer tensor names, by layout: role -> name under the layer prefix
_LAYER_NAMES = {
    "hf": {
        "attn_norm": "input_layernorm",
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "w1": "mlp.gate_proj",
        "w2": "mlp.down_proj",
        "w3": "mlp.up_proj",
        "router": "block_sparse_moe.gate",
        "expert": "block_sparse_moe.experts.{e}.{w}",
    },
    "mistral": {
        "attn_norm": "attention_norm",
        "q": "attention.wq",
        "k": "attention.wk",
        "v": "attention.wv",
        "o": "attention.wo",
        "ffn_norm": "ffn_norm",
        "w1": "feed_forward.w1",
        "w2": "feed_forward.w2",
        "w3": "feed_forward.w3",
        "router": "feed_forward.gate",
        "expert": "feed_forward.experts.{e}.{w}",
    },
}
_TOP_NAMES = {
    "hf": ("model.", "model.embed_tokens", "model.norm", "lm_head"),
    "mistral": ("", "tok_embeddings", "norm", "output"),
}


@register("MistralForCausalLM", "MixtralForCausalLM", "mistral", "mixtral")
class LlamaConverter:
    """Mistral 7B (every version) and Mixtral (8x7B, 8x22B) as GGUF "llama"."""

    gguf_arch = "llama"

    def __init__(self, ckpt: Checkpoint) -> None:
        import gguf

        self.ckpt = ckpt
        self.hp = hparams(ckpt)
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.gguf_arch)
        self.name_map = gguf.get_tensor_name_map(arch, self.hp.n_layers)
        self._used: set[str] = set()

    # ---- metadata ----

    def add_metadata(self, w: gguf.GGUFWriter, ftype: gguf.LlamaFileType) -> None:
        """The keys llama.cpp's converter writes for these models (vocab excluded)."""
        import gguf

        hp = self.hp
        total, shared, experts, n_exp = w.get_total_parameter_count()
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(self.ckpt.directory.name)
        w.add_size_label(gguf.size_label(total, shared, experts, n_exp))
        w.add_block_count(hp.n_layers)
        w.add_context_length(hp.context)
        w.add_embedding_length(hp.dim)
        w.add_feed_forward_length(hp.ffn)
        w.add_head_count(hp.n_heads)
        w.add_head_count_kv(hp.n_kv_heads)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.norm_eps)
        if hp.n_experts:
            w.add_expert_count(hp.n_experts)
            w.add_expert_used_count(hp.n_experts_used)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_file_type(ftype)
        w.add_vocab_size(hp.vocab_size)
        w.add_rope_dimension_count(hp.head_dim)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # ---- tensors ----

    def tensors(self, outtype: str) -> list[OutputTensor]:
        """Every output tensor, checked against the config, in llama.cpp's usual order."""
        hp, layout = self.hp, self.ckpt.layout
        prefix, embed, norm, head = self._top_names()
        out = [self._plain(embed + ".weight", (hp.vocab_size, hp.dim), outtype)]
        for i in range(hp.n_layers):
            out.extend(self._layer(i, f"{prefix}layers.{i}.", _LAYER_NAMES[layout], outtype))
        out.append(self._plain(norm + ".weight", (hp.dim,), outtype))
        if head + ".weight" in self.ckpt.tensors:  # absent = tied to the embeddings
            out.append(self._plain(head + ".weight", (hp.vocab_size, hp.dim), outtype))
        self._check_all_used()
        return out

    def _top_names(self) -> tuple[str, str, str, str]:
        """(layer prefix, embeddings, final norm, output head) names in this checkpoint."""
        layout = self.ckpt.layout
        if layout == "hf":
            # multimodal checkpoints nest the language model: transformers 5 writes
            # model.language_model.*, earlier versions language_model.model.*
            for nest, head in (("model.language_model.", "lm_head"),
                               ("language_model.model.", "language_model.lm_head")):  # fmt: skip
                if nest + "embed_tokens.weight" in self.ckpt.tensors:
                    return (nest, nest + "embed_tokens", nest + "norm", head)
        return _TOP_NAMES[layout]

    def _layer(self, i: int, p: str, names: dict[str, str], outtype: str) -> Iterator[OutputTensor]:
        hp = self.hp
        q_rows, kv_rows = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        # HF stores q/k rows in rotate-half order; GGUF llama wants Meta's interleaved pairs back
        undo = self.ckpt.layout == "hf"
        yield self._plain(p + names["attn_norm"] + ".weight", (hp.dim,), outtype)
        yield self._plain(
            p + names["q"] + ".weight", (q_rows, hp.dim), outtype, hp.n_heads if undo else 0
        )
        yield self._plain(
            p + names["k"] + ".weight", (kv_rows, hp.dim), outtype, hp.n_kv_heads if undo else 0
        )
        yield self._plain(p + names["v"] + ".weight", (kv_rows, hp.dim), outtype)
        yield self._plain(p + names["o"] + ".weight", (hp.dim, q_rows), outtype)
        yield self._plain(p + names["ffn_norm"] + ".weight", (hp.dim,), outtype)
        shapes = {"w1": (hp.ffn, hp.dim), "w2": (hp.dim, hp.ffn), "w3": (hp.ffn, hp.dim)}
        if not hp.n_experts:
            for w in ("w1", "w2", "w3"):
                yield self._plain(p + names[w] + ".weight", shapes[w], outtype)
            return
        yield self._plain(p + names["router"] + ".weight", (hp.n_experts, hp.dim), outtype)
        for w in ("w1", "w2", "w3"):
            sources = [
                self._entry(p + names["expert"].format(e=e, w=w) + ".weight", shapes[w])
                for e in range(hp.n_experts)
            ]
            gguf_name = self._gguf_name(f"layers.{i}.feed_forward.experts.{w}.weight")
            shape = (hp.n_experts, *shapes[w])
            qtype = tensor_type(gguf_name, shape, outtype)
            yield OutputTensor(gguf_name, shape, qtype, _stacked_blocks(sources))

    def _plain(
        self, name: str, shape: tuple[int, ...], outtype: str, undo_heads: int = 0
    ) -> OutputTensor:
        entry = self._entry(name, shape)
        gguf_name = self._gguf_name(name)
        qtype = tensor_type(gguf_name, shape, outtype)
        if undo_heads:
            return OutputTensor(gguf_name, shape, qtype, _unpermuted_blocks(entry, undo_heads))
        return OutputTensor(gguf_name, shape, qtype, _blocks(entry))

    def _entry(self, name: str, shape: tuple[int, ...]) -> TensorEntry:
        entry = self.ckpt.tensors.get(name)
        if entry is None:
            raise CheckpointError(
                f"{self.ckpt.directory}: tensor {name} is missing",
                hint="the checkpoint is incomplete, or not a Mistral/Mixtral checkpoint",
            )
        if entry.shape != shape:
            raise CheckpointError(
                f"{entry.file}: {name} has shape {list(entry.shape)}, but "
                f"{self.ckpt.config_file.name} implies {list(shape)}",
                hint="the weights and the config belong to different models",
            )
        self._used.add(name)
        return entry

    def _gguf_name(self, name: str) -> str:
        # the nesting prefix goes, as in convert_hf_to_gguf.py's filter_tensors
        plain = name.replace("language_model.", "")
        mapped = self.name_map.get_name(plain, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise CheckpointError(f"{self.ckpt.directory}: cannot map tensor {name} to GGUF")
        return mapped

    def _check_all_used(self) -> None:
        for name, entry in self.ckpt.tensors.items():
            ignored = name.endswith(_IGNORED_SUFFIXES) or is_multimodal(name)
            if name not in self._used and not ignored:
                raise CheckpointError(
                    f"{entry.file}: unexpected tensor {name}",
                    hint="this is not a plain Mistral/Mixtral checkpoint",
                )


def _blocks(entry: TensorEntry):
    def blocks() -> Iterator[np.ndarray]:
        row = entry.n_elements // max(entry.n_rows, 1)
        for start, stop in row_blocks(entry.n_rows, row):
            yield entry.read_rows(start, stop)

    return blocks


def undo_hf_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows -> Meta's interleaved order (llama.cpp's LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermuted_blocks(entry: TensorEntry, n_heads: int):
    def blocks() -> Iterator[np.ndarray]:
        # the row permutation mixes rows across the tensor; q/k are small next to the embeddings
        yield undo_hf_permute(entry.read(), n_heads)

    return blocks


def _stacked_blocks(sources: list[TensorEntry]):
    def blocks() -> Iterator[np.ndarray]:
        # stacked experts are contiguous expert after expert: stream each in turn
        for entry in sources:
            yield from _blocks(entry)()

    return blocks
