"""Write a (compressed) Llama-family model as a GGUF file llama.cpp loads.

Tensor names and the q/k row permutation follow llama.cpp's ``convert_hf_to_gguf.py``: llama.cpp
applies rotary embeddings to interleaved pairs, Hugging Face Llama to the two halves of each
head, so q and k rows are reordered per head (``_permute``). Packed layers keep their own codes
and scales in the block type asked for (:mod:`leanfm.formats.gguf_blocks`); float layers are
written in that type by llama.cpp's own round-to-nearest (:func:`llama_grid`), or as f32/f16.
Norms stay f32. The tokenizer's metadata is copied from the GGUF a packaged model came from;
for other models it is built from the Hugging Face ``tokenizer.json`` (byte-level BPE).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LeanfmError
from ..formats.gguf_blocks import TYPES as BLOCK_TYPES, llama_grid, to_blocks
from ..kernels.checkpoint import quantized_layers

FILE_TYPES = ("f32", "f16") + BLOCK_TYPES
ARCHS = {"llama": "llama"}  # Hugging Face model_type -> GGUF architecture written here
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str | None:
    """Hugging Face parameter name (without ``.weight``) -> GGUF tensor name, None if unknown."""
    if hf_name == "model.embed_tokens":
        return "token_embd"
    if hf_name == "model.norm":
        return "output_norm"
    if hf_name == "lm_head":
        return "output"
    parts = hf_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        key = ".".join(parts[3:])
        if key in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[key]}"
    return None


def _permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one
    (any tensor whose first dimension is the output rows: weights, codes, scales)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _ggml_type(qtype: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[qtype]


def _file_type(qtype: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]


def _copy_tokenizer(writer, source_gguf: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, field.types[0])


def _hf_tokenizer(writer, tok) -> None:
    """Byte-level BPE metadata from a Hugging Face fast tokenizer (``tokenizer.ggml.model: gpt2``)."""
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else None
    if not spec or spec.get("model", {}).get("type") != "BPE":
        raise LeanfmError("GGUF export needs a byte-level BPE tokenizer (tokenizer.json with a BPE model) when the model "
                          "did not come from a GGUF; this one is not")
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        if i < len(tokens):
            tokens[i] = t
    special = set(tok.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{what}_token_id")(tid)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)


def _fitting_step(qtype: str) -> str:
    bits, sym = {"q4_0": (4, "true"), "q4_1": (4, "false"), "q8_0": (8, "true")}[qtype]
    return f"{{method: gptq, bits: {bits}, group_size: 32, symmetric: {sym}}} (or rtn/awq with the same grid)"


def _dense(mod: nn.Module) -> torch.Tensor | None:
    w = getattr(mod, "weight", None)
    return w.detach().float() if isinstance(w, torch.Tensor) else None


def export_gguf(model: nn.Module, tokenizer, out: str | Path, qtype: str = "q4_0", source_gguf: str | Path | None = None,
                float_type: str | None = None) -> Path:
    """Write ``model`` to the GGUF file ``out``; packed layers keep their own codes in ``qtype``
    blocks (refused, naming the layer, when their grid does not fit). Tensors leanfm left in float
    (embedding, a skipped head, unquantized linears) are written in ``float_type`` (default
    ``qtype``, by llama.cpp's own round-to-nearest for a block type; ``f32`` keeps them exact)."""
    import gguf

    float_type = float_type or qtype
    for t in (qtype, float_type):
        if t not in FILE_TYPES:
            raise LeanfmError(f"unknown GGUF type '{t}'; use one of {', '.join(FILE_TYPES)}")
    cfg = model.config
    arch = ARCHS.get(getattr(cfg, "model_type", ""))
    if arch is None:
        raise LeanfmError(f"the GGUF writer does not know the architecture '{getattr(cfg, 'model_type', '?')}'; "
                          f"it writes: {', '.join(ARCHS)}")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    out = Path(out)
    packed = quantized_layers(model)
    tensors: list[tuple[str, np.ndarray, object]] = []

    def add(hf: str, kind: str, dense: torch.Tensor | None):
        name = gguf_name(hf)
        if name is None:
            raise LeanfmError(f"the GGUF writer has no llama.cpp name for the tensor {hf}")
        heads = n_head if name.endswith("attn_q") else n_kv if name.endswith("attn_k") else None
        if hf in packed:
            qw = packed[hf].quantized_weight()
            if heads:
                qw.codes, qw.scale, qw.zero = (_permute(t, heads) for t in (qw.codes, qw.scale, qw.zero))
            if qtype not in BLOCK_TYPES:
                raise LeanfmError(f"{hf} holds packed {qw.bits}-bit weights; export them as q4_0, q4_1 or q8_0, not {qtype}")
            try:
                tensors.append((f"{name}.weight", to_blocks(qw, qtype, name=hf), _ggml_type(qtype)))
            except LeanfmError as e:
                raise LeanfmError(f"{e}; a recipe step that fits: {_fitting_step(qtype)}") from None
            return
        w = _permute(dense, heads) if heads else dense
        if kind == "norm":
            tensors.append((f"{name}.weight", w.numpy().astype(np.float32), _ggml_type("f32")))
        elif float_type in BLOCK_TYPES and w.shape[-1] % 32 == 0:
            tensors.append((f"{name}.weight", to_blocks(llama_grid(w, float_type), float_type), _ggml_type(float_type)))
        else:
            ft = "f16" if float_type == "f16" else "f32"
            tensors.append((f"{name}.weight", w.numpy().astype(np.float16 if ft == "f16" else np.float32), _ggml_type(ft)))

    add("model.embed_tokens", "linear", model.get_input_embeddings().weight.detach().float())
    for i, layer in enumerate(model.model.layers):
        for key in _LAYER:
            hf = f"model.layers.{i}.{key}"
            kind = "norm" if key.endswith("layernorm") else "linear"
            add(hf, kind, None if hf in packed else _dense(model.get_submodule(hf)))
    add("model.norm", "norm", model.model.norm.weight.detach().float())
    tied = getattr(cfg, "tie_word_embeddings", False) and "lm_head" not in packed
    if not tied:
        add("lm_head", "linear", None if "lm_head" in packed else model.lm_head.weight.detach().float())

    tmp = out.with_name(f".{out.name}.partial")
    try:
        _write(gguf.GGUFWriter(str(tmp), arch), cfg, n_head, n_kv, qtype, tokenizer, source_gguf, tensors)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return out


def _write(w, cfg, n_head: int, n_kv: int, qtype: str, tokenizer, source_gguf, tensors) -> None:
    w.add_name(getattr(cfg, "_name_or_path", "") or "leanfm export")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(rope))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(_file_type(qtype))
    if source_gguf is not None:
        _copy_tokenizer(w, Path(source_gguf))
    else:
        _hf_tokenizer(w, tokenizer)
    for name, data, dtype in tensors:
        w.add_tensor(name, data, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
