"""Per-architecture tables for the GGUF writer (:mod:`.gguf_export`): tensor names, norm and
rotary conventions, and the hyperparameter keys llama.cpp reads for each architecture.

Facts taken from llama.cpp (``convert_hf_to_gguf.py``, ``gguf-py/gguf/tensor_mapping.py``,
``src/llama-model.cpp``, ``src/models/gemma3.cpp``):

- q/k row permutation: only the converter's Llama class (Llama/Mistral) reorders q and k rows,
  because llama.cpp runs ``llama`` with interleaved ("normal") rotary pairs. ``qwen2`` and
  ``gemma3`` use the NEOX rope type, the same half-split layout as Hugging Face: no permutation.
- Gemma RMSNorm multiplies by ``(1 + w)``, llama.cpp's by ``w``: the converter adds 1 to every
  tensor whose name ends in ``norm.weight`` (attn/ffn pre- and post-norms, q/k norms, the final
  norm). The embedding's ``sqrt(hidden)`` scale is applied by llama.cpp's gemma3 graph itself,
  so the embedding is written unscaled.
- gemma3 attention scale: llama.cpp does not read ``query_pre_attn_scalar``; it uses
  ``1/sqrt(head_dim)`` (``1/sqrt(hidden/heads)`` for the 62-layer 27B), so another scalar is refused.
- gemma3 sliding window: llama.cpp defaults to "5 sliding, 1 global" (period 6) and the local
  rope base 10000; recent builds read ``gemma3.attention.sliding_window_pattern`` (a per-layer
  array, written here from ``layer_types``) and ``gemma3.rope.freq_base_swa`` (written too).
  Older builds ignore both keys: a model off that default then runs differently there. The
  llama.cpp of llama-cpp-python 0.3.36 reads both and applies ``final_logit_softcapping``
  (tests/test_gguf_archs.py compares its logits with the torch forward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import LeanfmError

_ATTN = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output"}
_MLP = {"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


@dataclass(frozen=True)
class Arch:
    """How one Hugging Face family is written. ``layer``: module path inside a decoder layer ->
    GGUF tensor stem (``blk.N.<stem>``); keys ending in ``norm`` are norms. ``biases``: layer keys
    whose linear bias llama.cpp loads for this architecture (another bias is refused)."""

    name: str
    layer: dict[str, str]
    biases: frozenset[str] = frozenset()
    permute_qk: bool = False
    norm_shift: float = 0.0
    hparams: Callable | None = None  # (writer, text config) -> None: keys beyond the common ones


def is_norm(key: str) -> bool:
    return key.endswith("norm")


def rope(cfg, kind: str = "full_attention") -> tuple[float, str, float | None]:
    """(theta, rope type, factor) for layers of ``kind``, from a transformers 5 ``rope_parameters``
    (flat, or per layer type as Gemma 3's) or a transformers 4 ``rope_theta``/``rope_scaling``."""
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get(kind), dict):
        rp = rp[kind]
    if isinstance(rp, dict) and "rope_theta" in rp:
        return float(rp["rope_theta"]), rp.get("rope_type", "default") or "default", rp.get("factor")
    local = kind == "sliding_attention"
    theta = getattr(cfg, "rope_local_base_freq" if local else "rope_theta", None) or 10000.0
    sc = {} if local else (getattr(cfg, "rope_scaling", None) or {})
    return float(theta), sc.get("rope_type", sc.get("type", "default")) or "default", sc.get("factor")


def _scaling(w, typ: str, factor, what: str) -> None:
    import gguf

    if typ == "default":
        return
    if typ != "linear":
        raise LeanfmError(f"the GGUF writer does not write rope scaling '{typ}' ({what}); it writes default and linear rope")
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(factor))


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def write_hparams(w, arch: Arch, cfg) -> None:
    """The keys llama.cpp's loader reads for ``arch`` (``<arch>.context_length`` etc.)."""
    hd = head_dim(cfg)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    theta, typ, factor = rope(cfg)
    w.add_rope_freq_base(theta)
    _scaling(w, typ, factor, arch.name)
    w.add_vocab_size(cfg.vocab_size)
    if arch.hparams:
        arch.hparams(w, cfg)


def _qwen2(w, cfg) -> None:
    # llama.cpp's qwen2 has no sliding-window attention; Qwen2.5 checkpoints ship with it off
    if getattr(cfg, "use_sliding_window", False):
        raise LeanfmError("this qwen2 model uses sliding-window attention, which llama.cpp's qwen2 does not run; "
                          "the GGUF writer refuses it")


def _gemma3(w, cfg) -> None:
    hd, n = head_dim(cfg), cfg.num_hidden_layers
    # llama.cpp: 1/sqrt(head_dim), except the 62-layer 27B: 1/sqrt(hidden/heads) (llama-model.cpp, gemma3)
    expected = cfg.hidden_size / cfg.num_attention_heads if n == 62 else hd
    scalar = getattr(cfg, "query_pre_attn_scalar", None) or hd
    if not math.isclose(scalar, expected, rel_tol=1e-6):
        raise LeanfmError(f"this gemma3 model scales queries by 1/sqrt({scalar:g}); llama.cpp uses 1/sqrt({expected:g}) "
                          "for its shape, so the GGUF writer refuses it")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise LeanfmError("gemma3 with attention logit softcapping cannot be written: llama.cpp's gemma3 has none")
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    types = list(getattr(cfg, "layer_types", None) or [])
    sliding = [t == "sliding_attention" for t in types] if len(types) == n else None
    window = getattr(cfg, "sliding_window", None)
    if window and (sliding is None or any(sliding)):
        w.add_sliding_window(int(window))
        if sliding is not None:
            w.add_sliding_window_pattern(sliding)
        theta, typ, factor = rope(cfg, "sliding_attention")
        if typ != "default":
            raise LeanfmError(f"gemma3 with rope scaling '{typ}' on its sliding layers cannot be written: llama.cpp scales only the global ones")
        w.add_rope_freq_base_swa(theta)


LLAMA = Arch("llama", {"input_layernorm": "attn_norm", **_ATTN, "post_attention_layernorm": "ffn_norm", **_MLP},
             biases=frozenset({*_ATTN, *_MLP}), permute_qk=True)
QWEN2 = Arch("qwen2", LLAMA.layer, biases=frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}), hparams=_qwen2)
GEMMA3 = Arch("gemma3", {
    "input_layernorm": "attn_norm", **_ATTN, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm", **_MLP,
    "post_feedforward_layernorm": "post_ffw_norm",
}, norm_shift=1.0, hparams=_gemma3)

# Hugging Face model_type -> what is written ("gemma3" is the multimodal wrapper: its text part)
ARCHS: dict[str, Arch] = {"llama": LLAMA, "qwen2": QWEN2, "gemma3_text": GEMMA3, "gemma3": GEMMA3}


def arch_for(model: nn.Module) -> Arch:
    mt = getattr(model.config, "model_type", "?")
    if mt not in ARCHS:
        known = ", ".join(dict.fromkeys(a.name for a in ARCHS.values()))
        raise LeanfmError(f"the GGUF writer does not know the architecture '{mt}'; it writes: {known}")
    return ARCHS[mt]


def decoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, module) of the text decoder holding ``embed_tokens``, ``layers`` and ``norm``."""
    base = getattr(model, "model", None)
    if base is not None and hasattr(getattr(base, "language_model", None), "layers"):
        return "model.language_model", base.language_model
    if base is None or not hasattr(base, "layers"):
        raise LeanfmError(f"the GGUF writer cannot find the decoder layers of this {type(model).__name__}")
    return "model", base
