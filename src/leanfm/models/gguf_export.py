"""Write a (compressed) Llama, Qwen2 or Gemma 3 model as a GGUF file llama.cpp loads.

Tensor names and conventions follow llama.cpp's ``convert_hf_to_gguf.py`` (the per-architecture
tables are in :mod:`.gguf_archs`): for ``llama`` the q/k rows are reordered per head
(``_permute``: llama.cpp rotates interleaved pairs, Hugging Face Llama the two halves of each
head; qwen2 and gemma3 use the half-split layout in llama.cpp too), Gemma's ``(1 + w)`` norm
weights are written as ``w + 1``. Packed layers keep their own codes and scales in the block type
asked for (:mod:`leanfm.formats.gguf_blocks`); float tensors are written as llama.cpp's own
quantizer would (see :func:`export_gguf`). Norms and biases stay f32. The tokenizer's metadata is
copied from the GGUF a packaged model came from; for other models it is built from the Hugging
Face ``tokenizer.json`` (byte-level BPE), its pre-tokenizer named as llama.cpp knows it
(:func:`tokenizer_pre`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LeanfmError
from ..formats.gguf_blocks import TYPES as BLOCK_TYPES, fitting_step, llama_grid, to_blocks
from ..kernels.checkpoint import quantized_layers
from .family import decoder_config
from .gguf_archs import ARCHS, arch_for, decoder, is_norm, write_hparams

__all__ = ["ARCHS", "FILE_TYPES", "export_gguf", "tokenizer_pre"]

FILE_TYPES = ("f32", "f16") + BLOCK_TYPES

# tokenizer.json pre-tokenizer -> ``tokenizer.ggml.pre``. llama.cpp (src/llama-vocab.cpp) picks its
# split regexes from that name; each entry below is a structure whose splitting equals the regexes
# llama.cpp uses for the name (llama-bpe: LLAMA3, qwen2: QWEN2, gpt-2: GPT2, smollm: "\p{N}" then GPT2).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE = {
    (("split", _LLAMA3_RE), ("bytes",)): "llama-bpe",
    (("split", _QWEN2_RE), ("bytes",)): "qwen2",
    (("bytes+gpt2-regex",),): "gpt-2",
    (("digits",), ("bytes+gpt2-regex",)): "smollm",
}


def _pre_steps(pt: dict | None) -> tuple | None:
    """A tokenizer.json ``pre_tokenizer`` as comparable steps, None for a step not in the table."""
    if not pt:
        return ()
    if pt.get("type") == "Sequence":
        steps = [_pre_steps(p) for p in pt.get("pretokenizers", [])]
        return None if any(s is None for s in steps) else tuple(x for s in steps for x in s)
    if pt.get("type") == "ByteLevel":
        if pt.get("add_prefix_space", True):
            return None  # llama.cpp adds no prefix space to a BPE text
        return (("bytes+gpt2-regex",) if pt.get("use_regex", True) else ("bytes",),)
    if pt.get("type") == "Digits" and pt.get("individual_digits"):
        return (("digits",),)
    if pt.get("type") == "Split" and "Regex" in (pt.get("pattern") or {}) and pt.get("behavior") == "Isolated" \
            and not pt.get("invert"):
        return (("split", pt["pattern"]["Regex"]),)
    return None


def tokenizer_pre(spec: dict) -> tuple[str, str | None]:
    """``(tokenizer.ggml.pre, note)`` for a tokenizer.json ``spec``: the llama.cpp pre-tokenizer
    name whose splitting matches its ``pre_tokenizer`` (``llama-bpe``, ``qwen2``, ``gpt-2``,
    ``smollm``); ``"default"`` with a note saying so when the structure is not in the table."""
    name = _PRE.get(_pre_steps(spec.get("pre_tokenizer")))
    if name:
        return name, None
    kind = (spec.get("pre_tokenizer") or {}).get("type", "none")
    return "default", (f"tokenizer.ggml.pre written as 'default': the GGUF writer does not know this tokenizer's "
                       f"{kind} pre-tokenizer, so llama.cpp may split text differently from Hugging Face")


def _permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved one
    (any tensor whose first dimension is the output rows: weights, biases, codes, scales)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _ggml_type(qtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, qtype.upper())


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


def _hf_tokenizer(writer, tok) -> str | None:
    """Byte-level BPE metadata from a Hugging Face fast tokenizer (``tokenizer.ggml.model: gpt2``);
    returns the note of :func:`tokenizer_pre` (None when the pre-tokenizer was recognized)."""
    import gguf

    spec = json.loads(tok.backend_tokenizer.to_str()) if hasattr(tok, "backend_tokenizer") else None
    if not spec or spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(
            [spec.get("pre_tokenizer"), spec.get("decoder")]):
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
    pre, note = tokenizer_pre(spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for what, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{what}_token_id")(tid)
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)
    return note


def head_type(qtype: str) -> str:
    """llama.cpp's type for the output head in a ``qtype`` file: its quantizer picks Q6_K for
    q4_0/q4_1 (Q8_0 when the rows are not a multiple of 256); with no Q6_K writer here it is Q8_0."""
    return "q8_0" if qtype in ("q4_0", "q4_1") else qtype


def _float(w: torch.Tensor, t: str) -> tuple[np.ndarray, object]:
    if t in BLOCK_TYPES and w.shape[-1] % 32 == 0:
        return to_blocks(llama_grid(w, t), t), _ggml_type(t)
    t = "f16" if t == "f16" else "f32"  # rows that are not whole 32-column blocks stay f32
    return w.numpy().astype(np.float16 if t == "f16" else np.float32), _ggml_type(t)


def export_gguf(model: nn.Module, tokenizer, out: str | Path, qtype: str = "q4_0", source_gguf: str | Path | None = None,
                float_type: str | None = None) -> Path:
    """Write ``model`` (Hugging Face ``llama``, ``qwen2``, ``gemma3_text`` or ``gemma3``'s text
    part) to the GGUF file ``out``, a file of type ``qtype`` (f32, f16, q4_0, q4_1, q8_0).

    Packed layers keep their own codes in ``qtype`` blocks (refused, naming the layer, when their
    grid does not fit). Tensors leanfm left in float are typed as llama.cpp's own quantizer
    (``llama_model_quantize``) types them for that file type, by its round-to-nearest:

    - the output head (``output.weight``, or ``token_embd.weight`` when the embeddings are tied
      and so are the head) in q8_0 for q4_0/q4_1 files: llama.cpp picks Q6_K there, Q8_0 when
      the rows are not a multiple of 256 (SmolLM2's 576); with no Q6_K writer, this writer uses
      Q8_0 in both cases (slightly larger than llama.cpp's file where it would pick Q6_K);
    - every other float linear, and an untied ``token_embd.weight``, in ``qtype``;
    - norms and biases in f32.

    ``float_type`` (f32, f16, q4_0, q4_1, q8_0) overrides that for every float tensor but the
    norms and biases (``f32`` keeps them exact). ``source_gguf``: a GGUF whose ``tokenizer.*``
    metadata is copied; without it the metadata is built from ``tokenizer`` (a warning says when
    its pre-tokenizer is not one :func:`tokenizer_pre` knows).
    """
    import gguf

    for t in (qtype, float_type or qtype):
        if t not in FILE_TYPES:
            raise LeanfmError(f"unknown GGUF type '{t}'; use one of {', '.join(FILE_TYPES)}")
    arch = arch_for(model)
    cfg = decoder_config(model)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial")
    w = gguf.GGUFWriter(str(tmp), arch.name)  # opens no file before write_header_to_file
    w.add_name(getattr(cfg, "_name_or_path", "") or "leanfm export")
    write_hparams(w, arch, cfg)  # refuses what llama.cpp would run differently, before any tensor is converted
    w.add_file_type(_file_type(qtype))
    tensors = _tensors(model, arch, cfg, qtype, float_type)
    try:
        note = _write(w, tokenizer, source_gguf, tensors)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    if note:
        warnings.warn(note, stacklevel=2)
    return out


def _tensors(model: nn.Module, arch, cfg, qtype: str, float_type: str | None) -> list[tuple[str, np.ndarray, object]]:
    """(GGUF name, data, ggml type) of every tensor, typed as :func:`export_gguf` says."""
    prefix, dec = decoder(model)
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    packed = quantized_layers(model)
    head_mod = model.get_output_embeddings()
    embed = model.get_input_embeddings().weight
    tied = "lm_head" not in packed and getattr(head_mod, "weight", None) is not None and head_mod.weight.data_ptr() == embed.data_ptr()
    tensors: list[tuple[str, np.ndarray, object]] = []

    def f32(name: str, t: torch.Tensor) -> None:
        tensors.append((name, t.detach().float().numpy().astype(np.float32), _ggml_type("f32")))

    def linear(hf: str, stem: str, key: str = "", head: bool = False) -> None:
        heads = (n_head if stem.endswith("attn_q") else n_kv if stem.endswith("attn_k") else None) if arch.permute_qk else None
        mod = model.get_submodule(hf)
        if hf in packed:
            qw = packed[hf].quantized_weight()
            if heads:
                qw.codes, qw.scale, qw.zero = (_permute(t, heads) for t in (qw.codes, qw.scale, qw.zero))
            if qtype not in BLOCK_TYPES:
                raise LeanfmError(f"{hf} holds packed {qw.bits}-bit weights; export them as q4_0, q4_1 or q8_0, not {qtype}")
            try:
                tensors.append((f"{stem}.weight", to_blocks(qw, qtype, name=hf), _ggml_type(qtype)))
            except LeanfmError as e:
                raise LeanfmError(f"{e}; a recipe step that fits: {fitting_step(qtype)}") from None
        else:
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor):
                raise LeanfmError(f"the GGUF writer cannot write {hf}: a {type(mod).__name__} is neither a plain nor a packed linear")
            w = w.detach().float()
            tensors.append((f"{stem}.weight", *_float(_permute(w, heads) if heads else w,
                                                      float_type or (head_type(qtype) if head else qtype))))
        bias = getattr(mod, "bias", None)
        if bias is not None:
            if key not in arch.biases:
                raise LeanfmError(f"{hf} has a bias, which llama.cpp's {arch.name} does not load; the GGUF writer refuses it")
            f32(f"{stem}.bias", _permute(bias.detach(), heads) if heads else bias)

    def norm(hf: str, stem: str) -> None:
        # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w: the converter writes w + 1 (norm_shift)
        f32(f"{stem}.weight", model.get_submodule(hf).weight.detach().float() + arch.norm_shift)

    tensors.append(("token_embd.weight", *_float(embed.detach().float(), float_type or (head_type(qtype) if tied else qtype))))
    for i in range(len(dec.layers)):
        for key, stem in arch.layer.items():
            hf = f"{prefix}.layers.{i}.{key}"
            try:
                model.get_submodule(hf)
            except AttributeError:
                raise LeanfmError(f"the GGUF writer expected {hf} in this {arch.name} model and found none") from None
            if is_norm(key):
                norm(hf, f"blk.{i}.{stem}")
            else:
                linear(hf, f"blk.{i}.{stem}", key)
    norm(f"{prefix}.norm", "output_norm")
    if not tied:
        linear("lm_head", "output", head=True)
    return tensors


def _write(w, tokenizer, source_gguf, tensors) -> str | None:
    note = None
    if source_gguf is not None:
        _copy_tokenizer(w, Path(source_gguf))
    else:
        note = _hf_tokenizer(w, tokenizer)
    for name, data, dtype in tensors:
        w.add_tensor(name, data, raw_dtype=dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return note
