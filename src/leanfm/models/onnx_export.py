"""Write a (compressed) Llama-family causal LM as an ONNX graph ONNX Runtime runs with a KV cache.

The graph is built node by node with ``onnx.helper`` (opset 17 plus ``com.microsoft`` 1, the
contrib ops ONNX Runtime's CPU provider runs):

- embedding: ``Gather`` on the fp32 embedding;
- RMSNorm: ``SimplifiedLayerNormalization``, and ``SkipSimplifiedLayerNormalization`` where the
  residual add comes first;
- linears that read the same input (q/k/v, gate/up) are concatenated along their outputs into
  one node: ``MatMulNBits`` for leanfm's packed layers (their own integer codes, scales and zero
  points, see :func:`_nbits`), ``MatMul`` with the transposed fp32 weight for float layers;
- attention: ``GroupQueryAttention`` on the packed q/k/v, with Hugging Face's rotary embedding
  (half-split, ``rotary_interleaved=0``) from cos/sin tables the model's own rotary module made,
  the causal mask, grouped-query heads and the past/present concatenation;
- MLP: ``QuickGelu`` with alpha 1 (= SiLU) times up, then down;
- head: ``Gemm`` with ``transB`` on the embedding when tied (one copy of the table), else a linear.

Inputs: ``input_ids`` int64 ``[batch, seq]`` and per layer ``past_key_values.{i}.key`` /
``.value`` fp32 ``[batch, n_kv_heads, past_seq, head_dim]`` (``past_seq`` may be 0). Positions
are not an input: token ``j`` of the call sits at position ``past_seq + j`` (no padding; every
row of a batch has the same length). Outputs: ``logits`` fp32 ``[batch, seq, vocab]`` and
``present.{i}.key`` / ``.value`` (past followed by this call's keys/values).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LeanfmError

ARCHS = ("llama", "qwen2")  # Hugging Face model_type written here (qwen2 = llama + q/k/v biases)
OPSET, MS = 17, "com.microsoft"
BLOCKS = (256, 128, 64, 32, 16)  # MatMulNBits block sizes tried, largest first
PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2  # beyond this the weights go to an external data file


def _pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[..., n]`` as bytes: 8-bit unchanged, 4-bit two per byte, the first code in
    the low nibble (MatMulNBits' order). An odd ``n`` is padded with a zero code."""
    c = codes.astype(np.uint8)
    if bits == 8:
        return c
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], 1), np.uint8)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def _unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`_pack_low_first` (the pad code, if any, is kept)."""
    if bits == 8:
        return packed.astype(np.uint8)
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


class _Graph:
    """Nodes and initializers under construction; every helper returns its output name."""

    def __init__(self):
        from onnx import helper

        self.h, self.nodes, self.inits, self._n = helper, [], [], 0

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           unused: tuple[int, ...] = (), outputs: tuple[str | None, ...] = (), **attrs):
        """Append a node. ``unused``: optional outputs left unnamed (not computed); ``outputs``:
        names for the first outputs (graph outputs), None for a generated one."""
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = ["" if i in unused else f"{base}/out{i}" if n_out > 1 else f"{base}/out" for i in range(n_out)]
        outs[:len(outputs)] = [o or outs[i] for i, o in enumerate(outputs)]
        self.nodes.append(self.h.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs if n_out > 1 else outs[0]


# --- linear layers: one node for siblings that share their input ---

def _weight_of(model: nn.Module, name: str, packed: dict, int_bits_ok: bool):
    """``("packed", MatMulNBits fields from :func:`_nbits`, bias)`` or ``("float", W [out, in] fp32, bias)``
    for the layer ``name``; bias fp32 or None."""
    from ..kernels.actquant import ActQuant

    mod = model.get_submodule(name)
    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach().float().cpu().numpy()
    if isinstance(mod, ActQuant):
        raise LeanfmError(f"{name} fake-quantizes its input activations (SmoothQuant W8A8), which the ONNX export does not "
                          "write; export a weight-only recipe (rtn, gptq, awq, hqq)")
    if name in packed:
        q = packed[name]
        if int_bits_ok:
            return "packed", _nbits(name, q.quantized_weight()), bias
        return "float", q.dequantized_weight().detach().float().cpu().numpy(), bias
    if isinstance(mod, nn.Linear):
        return "float", mod.weight.detach().float().cpu().numpy(), bias
    raise LeanfmError(f"{name} is a {type(mod).__name__}, not a linear or packed layer; the ONNX export writes nn.Linear "
                      "and leanfm's packed layers only")


def _nbits(name: str, qw) -> dict:
    """A packed layer as MatMulNBits inputs, leanfm's codes, scales and zero points unchanged.

    MatMulNBits dequantizes ``(code - zero) * scale`` per block of ``block_size`` inputs, as
    leanfm does per group. A group that is not a power of two but a multiple of one (e.g. a
    per-channel group of 576 = 9 * 64) is written as several blocks that repeat its scale and
    zero point, which is exact; a group no power of two >= 16 divides is refused.
    """
    bits, g = qw.bits, qw.group_size
    codes = qw.codes.cpu().numpy().astype(np.uint8)
    n, k = codes.shape
    if bits not in (4, 8):
        raise LeanfmError(f"{name} holds {bits}-bit codes; ONNX Runtime's MatMulNBits runs 4- or 8-bit codes: quantize it with "
                          "bits: 4 or bits: 8")
    block = next((b for b in BLOCKS if g % b == 0), None)
    if block is None or k % g:
        raise LeanfmError(f"{name} has groups of {g} inputs; MatMulNBits needs blocks of a power of two >= 16 inputs: quantize "
                          f"it with group_size 32, 64 or 128 (or a multiple of 16 that divides its {k} inputs)")
    if int(codes.max(initial=0)) >= 2**bits:
        raise LeanfmError(f"{name} has codes above {2**bits - 1}, outside its {bits}-bit grid; the layer is damaged")
    rep = g // block
    scale = qw.scale.float().cpu().numpy().repeat(rep, axis=1).astype(np.float32)  # [n, k/block]
    zero = qw.zero.float().cpu().numpy().repeat(rep, axis=1).astype(np.float32)
    integral = bool(np.all(zero == np.round(zero)) and zero.min(initial=0) >= 0 and zero.max(initial=0) < 2**bits)
    if bits == 8 and not integral:
        raise LeanfmError(f"{name} has fractional zero points on an 8-bit grid, which ONNX Runtime's MatMulNBits does not "
                          "run on CPU; quantize it with bits: 4 or with integer zero points (rtn, gptq, awq)")
    return {"bits": bits, "block": block, "n": n, "k": k,
            "B": _pack_low_first(codes.reshape(n, k // block, block), bits), "scale": scale, "zero": zero,
            "symmetric": bool(np.all(zero == 2 ** (bits - 1))), "integral": integral}


def _project(g: _Graph, x: str, name: str, layers: list[tuple[str, tuple]], accuracy_level: int) -> str:
    """``x @ [W_1; W_2; ...]^T + b``: the layers' outputs concatenated along the last axis.

    Layers of one kind and grid become one node (their weights stacked along N); otherwise each
    gets its own node and a ``Concat`` joins them."""
    kinds = {(k, w["bits"], w["block"]) if k == "packed" else (k,) for _, (k, w, _) in layers}
    if len(kinds) > 1:
        outs = [_project(g, x, n, [(n, spec)], accuracy_level) for n, spec in layers]
        return g.op("Concat", outs, axis=-1, name=f"{name}.concat")
    biases = [b for _, (_, _, b) in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = np.concatenate([b if b is not None else np.zeros(w.shape[0] if k == "float" else w["n"], np.float32)
                               for (_, (k, w, _)), b in zip(layers, biases)]).astype(np.float32)
    kind = layers[0][1][0]
    if kind == "float":
        w = np.concatenate([w for _, (_, w, _) in layers], axis=0)  # [N, K]
        y = g.op("MatMul", [x, g.const(f"{name}.weight_t", w.T.astype(np.float32))], name=f"{name}.MatMul")
        return y if bias is None else g.op("Add", [y, g.const(f"{name}.bias", bias)], name=f"{name}.bias_add")
    ws = [w for _, (_, w, _) in layers]
    w0 = ws[0]
    n = sum(w["n"] for w in ws)
    inputs = [x, g.const(f"{name}.qweight", np.concatenate([w["B"] for w in ws])),
              g.const(f"{name}.scales", np.concatenate([w["scale"] for w in ws]).reshape(-1))]
    zero = np.concatenate([w["zero"] for w in ws])
    if all(w["integral"] for w in ws):
        if not all(w["symmetric"] for w in ws):  # the default zero point 2^(bits-1) is the symmetric grid
            inputs.append(g.const(f"{name}.zero_points", _pack_low_first(zero.astype(np.uint8), w0["bits"]).reshape(-1)))
    else:  # fractional zero points (HQQ): the float form, same shape as the scales (4-bit only, checked)
        inputs.append(g.const(f"{name}.zero_points", zero.reshape(-1)))
    if bias is not None:
        inputs += ["", g.const(f"{name}.bias", bias)]  # g_idx (unused), bias
    return g.op("MatMulNBits", inputs, domain=MS, name=f"{name}.MatMulNBits", K=w0["k"], N=n, bits=w0["bits"],
                block_size=w0["block"], accuracy_level=accuracy_level)


# --- the model ---

def _check_arch(cfg) -> None:
    mt = getattr(cfg, "model_type", "?")
    if mt not in ARCHS:
        raise LeanfmError(f"the ONNX export does not know the architecture '{mt}'; it writes: {', '.join(ARCHS)}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rtype = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rtype != "default":
        raise LeanfmError(f"the ONNX export writes the default rotary embedding; this {mt} model uses rope_type '{rtype}'")
    if getattr(cfg, "use_sliding_window", False):
        raise LeanfmError(f"the ONNX export writes full attention; this {mt} model uses a sliding window")


def _rope_tables(model: nn.Module, head_dim: int, n_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[n_pos, head_dim/2]`` from the model's own rotary module (HF computes them in
    fp32; reusing it keeps ONNX and torch on the same values). HF's rotate_half uses the same
    frequency for dims ``i`` and ``i + head_dim/2``, so the first half holds every frequency."""
    rot = model.model.rotary_emb
    with torch.no_grad():
        x = torch.zeros(1, dtype=torch.float32)
        cos, sin = rot(x, torch.arange(n_pos).unsqueeze(0))
    half = head_dim // 2
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    if cos.shape[-1] != head_dim or not (np.array_equal(cos[:, :half], cos[:, half:]) and np.array_equal(sin[:, :half], sin[:, half:])):
        raise LeanfmError("the ONNX export writes rotary embeddings over whole heads in two halves; this model's rotary module differs")
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _norm_weight(mod: nn.Module) -> np.ndarray:
    return mod.weight.detach().float().cpu().numpy()


def _lengths(g: _Graph) -> tuple[str, str]:
    """``seqlens_k`` int32 ``[batch]`` and ``total_sequence_length`` int32 scalar, the lengths
    GroupQueryAttention reads, from the input shapes: total = past_seq + seq, seqlens_k = total - 1."""
    from onnx import TensorProto as TP

    ids_shape = g.op("Shape", ["input_ids"], name="ids_shape")
    plen = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const("const.two", np.array(2, np.int64))], axis=0, name="past_len")
    slen = g.op("Gather", [ids_shape, g.const("const.one", np.array(1, np.int64))], axis=0, name="seq_len")
    total = g.op("Cast", [g.op("Add", [plen, slen])], to=TP.INT32, name="total_len")
    batch = g.op("Gather", [ids_shape, g.const("const.zero", np.array([0], np.int64))], axis=0, name="batch")
    seqlens_k = g.op("Expand", [g.op("Sub", [total, g.const("const.one32", np.array(1, np.int32))]), batch], name="seqlens_k")
    return seqlens_k, total


def _build(model: nn.Module, int_bits_ok: bool, accuracy_level: int):
    from onnx import TensorProto as TP, helper

    from ..kernels.checkpoint import quantized_layers

    cfg = model.config
    _check_arch(cfg)
    n_layers, n_head, n_kv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    eps = float(cfg.rms_norm_eps)
    packed = quantized_layers(model)
    g = _Graph()

    def linear(x: str, name: str, members: list[str]) -> str:
        return _project(g, x, name, [(n, _weight_of(model, n, packed, int_bits_ok)) for n in members], accuracy_level)

    seqlens_k, total = _lengths(g)
    cos, sin = (g.const(f"rope.{k}", t) for k, t in zip(("cos", "sin"), _rope_tables(model, head_dim, int(cfg.max_position_embeddings))))
    emb = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    emb_name = g.const("model.embed_tokens.weight", emb)
    h = g.op("Gather", [emb_name, "input_ids"], name="model.embed_tokens")
    layers = model.model.layers
    normed = g.op("SimplifiedLayerNormalization", [h, g.const("model.layers.0.input_layernorm.weight", _norm_weight(layers[0].input_layernorm))],
                  axis=-1, epsilon=eps, stash_type=1, name="model.layers.0.input_layernorm")
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}"
        qkv = linear(normed, f"{p}.self_attn.qkv_proj", [f"{p}.self_attn.{n}_proj" for n in "qkv"])
        # packed q|k|v in; rotary (HF half-split), causal mask, GQA heads and past ++ new inside
        attn = g.op("GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total, cos, sin],
                    n_out=3, domain=MS, name=f"{p}.self_attn", outputs=(None, f"present.{i}.key", f"present.{i}.value"),
                    num_heads=n_head, kv_num_heads=n_kv, do_rotary=1, rotary_interleaved=0, scale=float(head_dim**-0.5))[0]
        o = linear(attn, f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"])
        # residual + attention, then RMSNorm of the sum: output 0 is the normed sum, output 3 the sum (the new residual)
        normed, _, _, h = g.op("SkipSimplifiedLayerNormalization", [o, h, g.const(f"{p}.post_attention_layernorm.weight",
                               _norm_weight(layer.post_attention_layernorm))], n_out=4, domain=MS, unused=(1, 2),
                               name=f"{p}.post_attention_layernorm", epsilon=eps)
        gu = linear(normed, f"{p}.mlp.gate_up_proj", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"])
        inter = layer.mlp.up_proj.out_features
        gate, up = g.op("Split", [gu, g.const(f"{p}.mlp.split", np.array([inter, inter], np.int64))], n_out=2, axis=-1, name=f"{p}.mlp.split")
        silu = g.op("QuickGelu", [gate], domain=MS, alpha=1.0, name=f"{p}.mlp.silu")  # x * sigmoid(1.0 * x) = SiLU
        down = linear(g.op("Mul", [silu, up], name=f"{p}.mlp.gated"), f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj"])
        last = i + 1 == n_layers
        nname = "model.norm" if last else f"model.layers.{i + 1}.input_layernorm"
        nw = _norm_weight(model.model.norm if last else layers[i + 1].input_layernorm)
        normed, _, _, h = g.op("SkipSimplifiedLayerNormalization", [down, h, g.const(f"{nname}.weight", nw)],
                               n_out=4, domain=MS, unused=(1, 2), name=nname, epsilon=eps)

    tied = "lm_head" not in packed and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied:  # logits = normed @ E^T on the embedding table itself (one copy in the file); Gemm takes 2-D input
        flat = g.op("Reshape", [normed, g.const("lm_head.flat", np.array([-1, emb.shape[1]], np.int64))], name="lm_head.flat")
        y = g.op("Gemm", [flat, emb_name], transB=1, name="lm_head.Gemm")
        lead = g.op("Slice", [g.op("Shape", ["input_ids"]), g.const("lm_head.s0", np.array([0], np.int64)),
                              g.const("lm_head.s2", np.array([2], np.int64))], name="lm_head.batch_seq")
        shape = g.op("Concat", [lead, g.const("lm_head.vocab", np.array([emb.shape[0]], np.int64))], axis=0, name="lm_head.shape")
        g.op("Reshape", [y, shape], name="lm_head.unflat", outputs=("logits",))
        vocab = emb.shape[0]
    else:
        g.op("Identity", [linear(normed, "lm_head", ["lm_head"])], name="lm_head.out", outputs=("logits",))
        vocab = model.lm_head.out_features

    kv = lambda name, seq: helper.make_tensor_value_info(name, TP.FLOAT, ["batch", n_kv, seq, head_dim])  # noqa: E731
    inputs = [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", "seq", vocab])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(kv(f"past_key_values.{i}.{kind}", "past_seq"))
            outputs.append(kv(f"present.{i}.{kind}", "total_seq"))
    graph = helper.make_graph(g.nodes, "leanfm", inputs, outputs, initializer=g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                          producer_name="leanfm", ir_version=8)
    helper.set_model_props(m, {"leanfm.architecture": cfg.model_type, "leanfm.max_positions": str(cfg.max_position_embeddings),
                               "leanfm.num_layers": str(n_layers), "leanfm.num_kv_heads": str(n_kv), "leanfm.head_dim": str(head_dim),
                               "leanfm.vocab_size": str(vocab), "leanfm.positions": "past_seq + arange(seq)",
                               "leanfm.matmulnbits_nodes": str(sum(n.op_type == "MatMulNBits" for n in g.nodes))})
    return m


def export_onnx(model: nn.Module, out: str | Path, int_bits_ok: bool = True, accuracy_level: int = 0) -> Path:
    """Write ``model`` (a Hugging Face ``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, compressed by
    leanfm or not) to the ONNX file ``out``, atomically; return its path.

    int_bits_ok: write leanfm's packed layers as ``MatMulNBits`` with their own 4- or 8-bit codes
        (True), or dequantized to fp32 ``MatMul`` (False: larger, same values).
    accuracy_level: MatMulNBits' ``accuracy_level``: 0 keeps fp32 activations (the torch
        forward's values up to summation order); 4 lets ONNX Runtime quantize activations to
        int8 per block (faster decode, like llama.cpp's q8 activations, slightly different values).
        In ONNX Runtime 1.32 on AVX2 the fp32 path of 4-bit layers is ~3x slower than level 4,
        and that of 8-bit layers dequantizes the whole weight at every call (~50x slower):
        export 8-bit models with 4 when decode speed matters.

    Weights go in the file itself; a model whose weights pass 2 GB writes them to ``out.data``
    next to it (ONNX's protobuf limit).
    """
    import onnx

    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LeanfmError(f"accuracy_level must be 0 (fp32), 1, 2, 3 or 4 (int8 activations), got {accuracy_level!r}")
    if not hasattr(model, "config"):
        raise LeanfmError(f"the ONNX export needs a Hugging Face causal LM (with .config), got {type(model).__name__}")
    out = Path(out)
    m = _build(model, int_bits_ok, accuracy_level)
    big = sum(t.ByteSize() for t in m.graph.initializer) > PROTO_LIMIT
    tmp = out.with_name(f".{out.name}.partial")
    data = out.with_name(out.name + ".data")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if big:  # external data: write both under temporary names in a scratch folder, then move them
            tmp.mkdir(exist_ok=True)
            onnx.save_model(m, str(tmp / out.name), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
            os.replace(tmp / data.name, data)
            os.replace(tmp / out.name, out)
            tmp.rmdir()
        else:
            onnx.save_model(m, str(tmp))
            os.replace(tmp, out)
    except OSError as e:
        from ..errors import os_reason

        raise LeanfmError(f"cannot write {out}: {os_reason(e)}") from None
    finally:
        if tmp.is_dir():
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        elif tmp.exists():
            tmp.unlink()
    return out
