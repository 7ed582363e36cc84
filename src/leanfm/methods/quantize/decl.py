"""Declarations of the weight quantizers (torch-free): RTN, GPTQ, AWQ, HQQ, SmoothQuant.

Each config holds its parameters, their validation and its cost effect; the handler it names
(``handler``) holds the torch code and is imported on first apply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...config import BaseConfig
from ...errors import LeanfmError
from ...formats.layout import BACKEND_NAMES, ROW_LOCAL
from ..effects import QuantSpec, Rule, TiedHeadRule
from ...space import Choice, Range

BACKEND_CHOICES = ("auto", "fake", *BACKEND_NAMES)


def check_bits(bits: int, lo: int = 2, hi: int = 8) -> None:
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise LeanfmError(f"bits={bits} is not supported; use an integer from {lo} to {hi}")


def check_obs_params(damp: float, block_size: int) -> None:
    """Shared by the OBS-style solvers (GPTQ, SparseGPT)."""
    if not 0 <= damp < 1:
        raise LeanfmError(f"damp={damp} must be in [0, 1)")
    if block_size < 1:
        raise LeanfmError(f"block_size={block_size} must be >= 1")


# what a search varies for the 3-4-bit grouped quantizers (AWQ, HQQ)
W34_SPACE = {"bits": Choice(3, 4), "group_size": Choice(32, 64, divides="in_features")}


@dataclass
class WeightQuantConfig(BaseConfig):
    """Fields shared by weight-only quantizers.

    bits: 2..8. group_size: columns sharing one scale (null = per output channel; must divide
    each layer's in_features). symmetric: zero point fixed at the grid midpoint.
    skip: linear layers left in full precision (names or fnmatch patterns; lm_head by default).
    only: if given, quantize just the linears matching these patterns (e.g. [lm_head]).
    backend: auto | fake | reference | cpp-int4 | tinygemm-int4 | int8pack (``auto``: the fastest
    real kernel that runs the layout here; ``fake``: dequantized fp32 written back, simulated).
    """

    produces = "int-weights"
    fractional_zero: ClassVar[bool] = False  # float zero points (HQQ), stored as fp32

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    skip: tuple[str, ...] = ("lm_head",)
    only: tuple[str, ...] = ()
    backend: str = "auto"

    def targets(self, model) -> dict:
        from ..targets import iter_linears

        return dict(iter_linears(model, self.skip, self.only))

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and self.group_size != -1 and self.group_size <= 0:
            raise LeanfmError(f"group_size={self.group_size} must be positive (or null for per-channel)")
        if self.backend not in BACKEND_CHOICES:
            raise LeanfmError(f"unknown backend '{self.backend}' for {self.method}; use one of: {', '.join(BACKEND_CHOICES)}")

    def check_model(self, model) -> None:
        from .common import check_layers

        check_layers(self, model)

    def layer_work_bytes(self, linears: list[tuple[int, int]], inputs: list[int] | None = None) -> int:
        # the layer's uint8 codes until packed, its packed copy, and one fp32 weight being rounded
        return sum(i * o for i, o in linears) * 2 + max(i * o for i, o in linears) * 4 * 2

    def effect(self, eff) -> None:
        gs = self.group_size if self.group_size not in (None, -1) else None
        spec = QuantSpec(self.method, int(self.bits), gs, bool(self.symmetric), str(self.backend),
                         getattr(self, "act_bits", None), fractional_zero=self.fractional_zero, simulated=self.backend == "fake")
        eff.rules.append(Rule(spec, tuple(self.skip), tuple(self.only)))


def block_type(bits: int, group_size: int | None, symmetric: bool) -> str | None:
    """The llama.cpp block type a leanfm grid is (``q4_0``/``q4_1``/``q8_0``), or None."""
    if group_size != 32:
        return None
    return {(4, True): "q4_0", (4, False): "q4_1", (8, True): "q8_0"}.get((bits, bool(symmetric)))


ROUNDINGS = ("nearest", "llama.cpp")


@dataclass
class BlockGridConfig(WeightQuantConfig):
    """Weight quantizers whose group grid can be chosen by llama.cpp's rule (RTN, GPTQ, AWQ); the
    ``rounding`` field is documented on :class:`RTNConfig`."""

    rounding: str = "nearest"

    @property
    def fractional_zero(self) -> bool:  # Q4_1's zero point is -m/d, a float per block
        return self.rounding == "llama.cpp" and not self.symmetric

    def gguf_type(self) -> str | None:
        """The llama.cpp block type this grid is (None if it is none)."""
        return block_type(self.bits, self.group_size, self.symmetric)

    def validate(self) -> None:
        super().validate()
        if self.rounding not in ROUNDINGS:
            raise LeanfmError(f"rounding '{self.rounding}' is unknown; use nearest or llama.cpp")
        if self.rounding == "llama.cpp" and self.gguf_type() is None:
            raise LeanfmError(
                f"rounding: llama.cpp needs a llama.cpp block grid (group_size 32 with bits 4 symmetric = Q4_0, 4 asymmetric "
                f"= Q4_1, or 8 symmetric = Q8_0), got bits {self.bits}, group_size {self.group_size}, symmetric {self.symmetric}")


@dataclass
class RTNConfig(BlockGridConfig):
    """Round-to-nearest weight quantization, the calibration-free baseline.

    Besides the WeightQuantConfig fields:

    rounding: ``nearest`` (leanfm's grid: scale from the group's range, codes rounded half to
    even) or ``llama.cpp`` (each block's scale by llama.cpp's reference rule for the block type
    the grid names: 4-bit symmetric groups of 32 = Q4_0, the weight of largest magnitude mapped
    with its sign to code -8; 4-bit asymmetric = Q4_1, the block's min and max kept; 8-bit
    symmetric = Q8_0; scales in fp16). RTN's weights are then those ``llama-quantize`` writes,
    bit for bit; gptq and awq take the same field and choose their codes on those blocks.
    """

    families = ("causal-lm", "vit", "clip", "diffusion-pipeline")  # no calibration: any stack of nn.Linear (a ViT, a UNet)

    search_space = {"bits": Choice(3, 4, 8), "group_size": Choice(32, 64, None, divides="in_features"),
                    "symmetric": Choice(True, False)}

    method = "rtn"
    onload = "per-layer"
    handler = "leanfm.methods.quantize.rtn:apply_rtn"
    bits: int = 8


@dataclass
class GPTQConfig(BlockGridConfig):
    """GPTQ (Frantar et al., 2023): second-order error compensation column by column.

    Besides the WeightQuantConfig fields:

    damp: fraction of the mean Hessian diagonal added for stability (paper: 0.01).
    act_order: quantize columns by decreasing activation energy (the reference's --act-order).
    block_size: columns per lazy batch update (paper: 128).
    rounding: ``llama.cpp`` chooses each group's scale by llama.cpp's rule for its block type
    (see rtn), so the codes go into that GGUF type unchanged; GPTQ then picks the codes.
    Layers outside the decoder stack (e.g. an unskipped lm_head) fall back to RTN.
    """

    search_space = {"bits": Choice(3, 4, 8), "group_size": Choice(32, 64, None, divides="in_features"),
                    "symmetric": Choice(True, False), "act_order": Choice(False, True)}

    method = "gptq"
    families = ("causal-lm", "vit")  # a ViT calibrates on images (its encoder blocks are the layer stack)
    onload = "layerwise"
    handler = "leanfm.methods.quantize.gptq:apply_gptq"
    needs_calibration = True
    damp: float = 0.01
    act_order: bool = False
    block_size: int = 128

    def validate(self) -> None:
        super().validate()
        check_obs_params(self.damp, self.block_size)

    def layer_work_bytes(self, linears: list[tuple[int, int]], inputs: list[int] | None = None) -> int:
        # Frantar et al. (2023) Alg. 1: one fp32 Hessian [in, in] per distinct input of the layer
        # (linears fed the same input share it), all collected before the first is solved and
        # each freed once its last linear is solved. Solving linear j holds the Hessians not yet
        # freed, two [in, in] working matrices (H's copy, then its Cholesky factors), about 3 x W
        # (its copy, the permuted copy, the block errors) and the uint8 codes of linears 0..j.
        # Packing comes after, when the Hessians are gone (the base class's term).
        groups = list(inputs) if inputs is not None else list(range(len(linears)))
        width = {g: i for (i, _), g in zip(linears, groups)}
        solve = 0
        for j, (i, o) in enumerate(linears):
            alive = sum(width[g] ** 2 for g in set(groups[j:])) * 4
            codes = sum(a * b for a, b in linears[: j + 1])
            solve = max(solve, alive + i * i * 4 * 2 + i * o * 4 * 3 + codes)
        return max(solve, super().layer_work_bytes(linears, inputs))


@dataclass
class AWQConfig(BlockGridConfig):
    """AWQ (Lin et al., 2024): activation-aware per-channel scales and clipping.

    Besides the WeightQuantConfig fields:

    n_grid: points of the α grid in [0, 1) (paper: 20). clip: search a per-group clipping range.
    scale_tokens / clip_tokens: calibration rows used by the scale / clip searches.
    rounding: ``llama.cpp`` quantizes (and scores the searches) on llama.cpp's block grid (see rtn).
    """

    search_space = W34_SPACE

    method = "awq"
    onload = "layerwise"
    handler = "leanfm.methods.quantize.awq:apply_awq"
    needs_calibration = True
    symmetric: bool = False
    n_grid: int = 20
    clip: bool = True
    scale_tokens: int = 4096
    clip_tokens: int = 512

    def validate(self) -> None:
        super().validate()
        if self.n_grid < 1 or self.scale_tokens < 1 or self.clip_tokens < 1:
            raise LeanfmError("awq needs n_grid, scale_tokens and clip_tokens >= 1")

    def layer_work_bytes(self, linears: list[tuple[int, int]], inputs: list[int] | None = None) -> int:
        # sampled inputs of each linear (scale_tokens rows) and, per grid point of the scale
        # search, a scaled and a rounded copy of the largest group's weights
        x = sum(self.scale_tokens * i * 4 for i, _ in linears)
        return x + max(i * o for i, o in linears) * 4 * 3 + super().layer_work_bytes(linears, inputs)


@dataclass
class HQQConfig(WeightQuantConfig):
    """HQQ weight quantization: half-quadratic zero-point optimization, no calibration data (asymmetric; ``symmetric`` must stay false).

    iters: half-quadratic iterations (paper: 20). p: the l_p norm of the error (paper: 0.7).
    beta, kappa: initial penalty and its growth factor per iteration (paper: 10, 1.01).
    """

    search_space = W34_SPACE

    families = ("causal-lm", "vit", "clip", "diffusion-pipeline")
    method = "hqq"
    onload = "per-layer"
    handler = "leanfm.methods.quantize.hqq:apply_hqq"
    fractional_zero = True
    symmetric: bool = False
    iters: int = 20
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01

    def validate(self) -> None:
        super().validate()
        if self.symmetric:
            raise LeanfmError("hqq optimizes the zero point, so it is asymmetric: set symmetric: false")
        if not 0 < self.p <= 1:
            raise LeanfmError(f"p={self.p} must be in (0, 1]")
        if self.iters < 0 or self.beta <= 0 or self.kappa < 1:
            raise LeanfmError("hqq needs iters >= 0, beta > 0 and kappa >= 1")


@dataclass
class SmoothQuantConfig(WeightQuantConfig):
    """SmoothQuant W8A8: activation outliers migrated into the weights, then int weights and per-token int activations.

    alpha: migration strength in [0, 1] (paper: 0.5 for most models).
    act_bits: activation bits (per-token dynamic). Weights: ``bits`` per output channel, symmetric."""

    search_space = {"alpha": Range(0.3, 0.8, step=0.1)}

    method = "smoothquant"
    onload = "layerwise"
    handler = "leanfm.methods.quantize.smoothquant:apply_smoothquant"
    needs_calibration = True
    bits: int = 8
    alpha: float = 0.5
    act_bits: int = 8

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.alpha <= 1:
            raise LeanfmError(f"alpha={self.alpha} must be in [0, 1]")
        if not 2 <= self.act_bits <= 8:
            raise LeanfmError(f"act_bits={self.act_bits} is not supported; use 2..8")


@dataclass
class EmbedQuantConfig(BaseConfig):
    """Integer token embeddings: the input embedding table stored as codes on a group grid.

    The table (vocab x hidden; 113 MB of SmolLM2-135M's 538 MB in fp32) is untouched by the
    linear quantizers. This step rounds it to nearest on the grid given by ``bits``,
    ``group_size`` (columns of the hidden dimension per scale; null = one scale per token row)
    and ``symmetric``, as llama.cpp stores ``token_embd``. A lookup dequantizes only the rows
    it gathers. When the LM head is tied to the embedding (``tie_word_embeddings``) and still a
    dense linear, the head becomes the same packed table run by an integer kernel: one copy of
    the codes serves both, as the fp32 tied matrix did. backend: auto | reference | cpp-int4 |
    int8pack (kernels whose storage keeps each row whole, so a lookup can gather it; auto: the
    fastest of them that runs the grid here).
    """

    search_space = {"bits": Choice(4, 8), "group_size": Choice(32, 64, None, divides="in_features")}

    method = "embed_quant"
    onload = "outside"
    handler = "leanfm.methods.quantize.embedding:apply_embed_quant"
    produces = "int-embeddings"

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    backend: str = "auto"

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size is not None and self.group_size <= 0:
            raise LeanfmError(f"group_size={self.group_size} must be positive (or null for one scale per row)")
        if self.backend not in ("auto", *ROW_LOCAL):
            raise LeanfmError(f"backend '{self.backend}' cannot gather embedding rows; use one of: auto, {', '.join(ROW_LOCAL)}")

    def effect(self, eff) -> None:
        spec = QuantSpec(self.method, int(self.bits), self.group_size, bool(self.symmetric), str(self.backend), row_local=True)
        eff.embed = spec
        eff.rules.append(TiedHeadRule(spec, (), ("lm_head",)))
