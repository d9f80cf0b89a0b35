"""Ministral 3 (and the text part of Mistral Small 3.1 / 3.2's multimodal checkpoints) -> GGUF
"mistral3": the llama tensors under llama.cpp's mistral3 names, plus YaRN and Llama 4 style query
scaling (attention.temperature_scale), the keys llama.cpp's mistral3 loader reads
(models/mistral3.cpp) and convert_hf_to_gguf.py writes (conversion/mistral3.py, mistral.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from localmix.build.convert import register
from localmix.build.convert.checkpoint import Checkpoint
from localmix.build.convert.llama import LlamaConverter, text_config
from localmix.errors import CheckpointError

if TYPE_CHECKING:
    import gguf


@register("Mistral3ForConditionalGeneration", "Ministral3ForCausalLM", "ministral3")
class Mistral3Converter(LlamaConverter):
    """Ministral 3 3B / 8B / 14B and Mistral 3 multimodal checkpoints (text only) as "mistral3"."""

    gguf_arch = "mistral3"

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__(ckpt)
        self.rope = _rope(ckpt)

    def add_metadata(self, w: gguf.GGUFWriter, ftype: gguf.LlamaFileType) -> None:
        import gguf

        super().add_metadata(w, ftype)
        rope = self.rope
        if rope.get("factor") is not None:  # absent: Mistral Small 3.x's plain RoPE
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
            w.add_rope_scaling_yarn_log_mul(float(rope["mscale_all_dim"]))
        if rope.get("llama_4_scaling_beta") is not None:
            w.add_attn_temperature_scale(float(rope["llama_4_scaling_beta"]))


def _rope(ckpt: Checkpoint) -> dict[str, Any]:
    """YaRN and query-scaling parameters in Hugging Face's rope_parameters names."""
    c = ckpt.config
    try:
        if ckpt.layout == "hf":
            rope = text_config(c).get("rope_parameters") or {}
            if rope.get("factor") is not None and rope.get("rope_type", "yarn") != "yarn":
                raise CheckpointError(
                    f"{ckpt.config_file}: rope_type {rope.get('rope_type')!r}",
                    hint="mistral3 checkpoints use YaRN (rope_type 'yarn')",
                )
            return {**{"beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0}, **rope}
        yarn, scaling = c.get("yarn") or {}, c.get("llama_4_scaling") or {}
        if not yarn:
            return {"llama_4_scaling_beta": scaling.get("beta")}
        # Mistral's names (convert_hf_to_gguf.py MistralModel.set_mistral_config): beta is the
        # fast boundary, alpha the slow one; apply_scale turns the log multiplier off
        return {
            "factor": yarn["factor"],
            "original_max_position_embeddings": yarn["original_max_position_embeddings"],
            "beta_fast": yarn["beta"],
            "beta_slow": yarn["alpha"],
            "mscale_all_dim": 0.0 if yarn.get("apply_scale") else 1.0,
            "llama_4_scaling_beta": scaling.get("beta"),
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"{ckpt.config_file}: incomplete YaRN parameters ({exc})",
            hint="the checkpoint's config is incomplete",
        ) from None
