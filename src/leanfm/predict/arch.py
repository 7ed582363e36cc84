"""Model architecture for the cost predictor: a Hugging Face ``config.json`` -> layer shapes.

No weights and no model classes: only the JSON fields below are read, so a 70B model is analyzed
in milliseconds. ``load_arch(model)`` accepts, in this order:

1. a ``dict`` (the contents of a config.json);
2. a path to a ``config.json`` file, or a directory holding one;
3. a name of a config shipped in ``leanfm/predict/configs/`` (``llama-3.1-70b``, ...);
4. a leanfm model alias (``smollm2-135m``...): its cached checkpoint's config when present
   (``$LEANFM_CACHE/models/<alias>/config.json``), else the shipped one;
5. a hub id whose config is in the local Hugging Face cache (the hub itself is never contacted).

Required fields: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
``intermediate_size``, ``vocab_size``. Optional: ``num_key_value_heads`` (default: heads),
``head_dim`` (default hidden / heads), ``tie_word_embeddings`` (default false), ``layer_types`` /
``sliding_window`` / ``use_sliding_window`` (bounded KV cache per layer), ``gated_mlp`` (default:
true, the Llama-style gate/up/down MLP; false for a two-matrix MLP), ``attention_bias`` /
``mlp_bias``. A multimodal config's ``text_config`` is used when present.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LeanfmError

CONFIG_DIR = Path(__file__).with_name("configs")
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
# Two-matrix (up, down) MLP families; everything else is read as gate/up/down (Llama style).
_UNGATED = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2", "bert")
# Families with pre- and post-norms around attention and MLP (4 RMSNorms per layer, not 2).
_SANDWICH_NORMS = ("gemma2", "gemma3", "gemma4")


@dataclass(frozen=True)
class Arch:
    """Per-layer shapes of a decoder-only transformer (what the roofline needs, nothing else)."""

    name: str
    source: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie: bool = False
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple[str, ...] = ()  # "full" or "sliding" per layer
    sliding_window: int | None = None
    norms_per_layer: int = 2
    max_position: int | None = None

    def linears(self) -> list[tuple[str, int, int, bool]]:
        """``(short name, in_features, out_features, bias)`` of one decoder layer's linears."""
        h, d = self.hidden, self.head_dim
        out = [
            ("q_proj", h, self.heads * d, self.qkv_bias),
            ("k_proj", h, self.kv_heads * d, self.qkv_bias),
            ("v_proj", h, self.kv_heads * d, self.qkv_bias),
            ("o_proj", self.heads * d, h, self.o_bias),
        ]
        if self.gated_mlp:
            out.append(("gate_proj", h, self.intermediate, self.mlp_bias))
        out += [("up_proj", h, self.intermediate, self.mlp_bias), ("down_proj", self.intermediate, h, self.mlp_bias)]
        return out

    def layer_inputs(self) -> list[int]:
        """For each of :meth:`linears`, which distinct input it reads: q/k/v share the normed
        hidden state, gate/up the second one; o and down have their own."""
        return [0, 0, 0, 1] + ([2, 2, 3] if self.gated_mlp else [2, 3])

    @staticmethod
    def module_name(layer: int, short: str) -> str:
        """The Hugging Face (Llama-style) qualified name that recipe ``skip``/``only`` patterns see."""
        part = "self_attn" if short in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        return f"model.layers.{layer}.{part}.{short}"

    def kv_window(self, layer: int) -> int | None:
        """Tokens a layer's cache keeps at most (None: unbounded). transformers' sliding layers keep
        ``sliding_window - 1`` past tokens (``DynamicSlidingWindowLayer``)."""
        if self.layer_types and self.layer_types[layer] == "sliding" and self.sliding_window:
            return self.sliding_window - 1
        return None

    def params(self) -> int:
        """Parameter count (embedding, linears with biases, norms; tied head counted once)."""
        lin = sum(i * o + (o if b else 0) for _, i, o, b in self.linears()) * self.layers
        norms = self.hidden * (self.norms_per_layer * self.layers + 1)
        return self.vocab * self.hidden * (1 if self.tie else 2) + lin + norms


def _int(cfg: dict, key: str, src: str) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LeanfmError(f"model config {src}: '{key}' must be a positive integer, got {v!r}")
    return v


def _layer_types(cfg: dict, n: int) -> tuple[str, ...]:
    """Which layers keep a sliding-window cache, following transformers' config rules."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return tuple("sliding" if "sliding" in str(t) else "full" for t in types)
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return ("full",) * n
    pattern = cfg.get("sliding_window_pattern")  # Gemma 2/3 configs without layer_types
    if isinstance(pattern, int) and pattern > 1:
        return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(n))
    if "max_window_layers" in cfg:  # Qwen2: sliding only from max_window_layers on
        return tuple("sliding" if i >= cfg["max_window_layers"] else "full" for i in range(n))
    return ("sliding",) * n  # Mistral: every layer


def arch_from_config(cfg: dict, name: str = "model", source: str = "<dict>") -> Arch:
    """Read an :class:`Arch` from a config dict; one-line LeanfmError naming a missing field."""
    if not isinstance(cfg, dict):
        raise LeanfmError(f"model config {source} must be a JSON object, got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg["text_config"].get("tie_word_embeddings", cfg.get("tie_word_embeddings"))}
    from ..models.family import family_of_config

    family = family_of_config(cfg)
    if family != "causal-lm":
        raise LeanfmError(f"model config {source} is a {family} model (model_type {cfg.get('model_type')}): this roofline prices "
                          "causal LMs; pass the model's folder or alias to leanfm predict, which prices a ViT per image "
                          "and a denoiser per step")
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    if isinstance(experts, int) and experts > 1:
        raise LeanfmError(f"model config {source} is a mixture of experts ({experts} experts): the predictor models dense decoders only")
    for key in REQUIRED:
        if key not in cfg:
            raise LeanfmError(f"model config {source} lacks '{key}' (the predictor needs {', '.join(REQUIRED)})")
    hidden, layers, heads = (_int(cfg, k, source) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    inter, vocab = _int(cfg, "intermediate_size", source), _int(cfg, "vocab_size", source)
    kv = _int(cfg, "num_key_value_heads", source) if cfg.get("num_key_value_heads") is not None else heads
    if heads % kv:
        raise LeanfmError(f"model config {source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    head_dim = _int(cfg, "head_dim", source) if cfg.get("head_dim") is not None else hidden // heads
    mt = str(cfg.get("model_type", ""))
    attn_bias = cfg.get("attention_bias")
    qkv_bias = bool(attn_bias) if attn_bias is not None else mt.startswith("qwen2")  # Qwen2: q/k/v biases, no flag
    window = cfg.get("sliding_window")
    return Arch(
        name=name, source=source, model_type=mt, hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=head_dim,
        intermediate=inter, vocab=vocab, tie=bool(cfg.get("tie_word_embeddings", False)),
        gated_mlp=bool(cfg.get("gated_mlp", not mt.startswith(_UNGATED))), qkv_bias=qkv_bias, o_bias=bool(attn_bias),
        mlp_bias=bool(cfg.get("mlp_bias", False)), layer_types=_layer_types(cfg, layers),
        sliding_window=int(window) if isinstance(window, int) and not isinstance(window, bool) else None,
        norms_per_layer=4 if mt.startswith(_SANDWICH_NORMS) else 2, max_position=cfg.get("max_position_embeddings"),
    )


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LeanfmError(f"cannot read model config {path}: {str(e).splitlines()[0]}") from None


def _alias_cache_config(alias: str) -> Path:
    # The same rule as leanfm.models.cache.model_cache_dir (not imported: that module loads torch).
    root = Path(os.environ.get("LEANFM_CACHE", Path.home() / ".cache" / "leanfm")).expanduser()
    return root / "models" / alias / "config.json"


def _hf_cache_config(hub_id: str) -> Path | None:
    if hub_id.count("/") != 1:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = sorted((hub / f"models--{hub_id.replace('/', '--')}" / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1] if snaps else None


def resolve_config(model) -> tuple[dict, str, str]:
    """``(config dict, display name, source)`` for a dict / path / built-in name / alias / cached hub id."""
    if isinstance(model, dict):
        return model, str(model.get("_name_or_path") or model.get("model_type") or "model"), "<dict>"
    arg = str(model)
    p = Path(arg).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return _read(p / "config.json"), p.name, str(p / "config.json")
    if p.is_file():
        return _read(p), p.parent.name if p.name == "config.json" else p.stem, str(p)
    # A leanfm alias's cached checkpoint (models/cache.py names its directory after the alias)
    # wins over the shipped config; every alias in models/registry.py ships one (a test checks).
    if "/" not in arg and _alias_cache_config(arg).is_file():
        return _read(_alias_cache_config(arg)), arg, str(_alias_cache_config(arg))
    if (CONFIG_DIR / f"{arg}.json").is_file():
        return _read(CONFIG_DIR / f"{arg}.json"), arg, f"builtin:{arg}.json"
    cached = _hf_cache_config(arg)
    if cached is not None:
        return _read(cached), arg, str(cached)
    raise LeanfmError(
        f"unknown model '{arg}': not a config.json path, a directory holding one, a built-in config "
        f"({', '.join(builtin_configs())}) or a cached hub id; pass --model path/to/config.json (architecture only, no weights needed)"
    )


def load_arch(model) -> Arch:
    """:class:`Arch` of ``model`` (see the module docstring for what ``model`` may be)."""
    if isinstance(model, Arch):
        return model
    cfg, name, source = resolve_config(model)
    return arch_from_config(cfg, name, source)
