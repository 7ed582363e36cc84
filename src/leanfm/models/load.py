"""``leanfm.load``: an alias, a local Hugging Face directory, or a hub id -> (model, tokenizer)."""
from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import LeanfmError
from .cache import build_cache
from .registry import ALIASES

HUB_PROBE_SECONDS = 3.0
# Files any tokenizer needs one of (a tokenizer_config.json alone only points at them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The whole message of ``e`` on one line (not just its first line), shortened to ``limit``."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 1].rstrip() + "…"


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in TOKENIZER_FILES) or any(d.glob("*.tiktoken"))


def _check_config(d: Path) -> dict:
    """The readable JSON object in ``d/config.json`` (else transformers blames the tokenizer)."""
    import json

    f = d / "config.json"
    fix = "re-download the model, or re-run leanfm compress"
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LeanfmError(f"{f} is not a text file; the model directory is damaged: {fix}") from None
    except json.JSONDecodeError as e:
        raise LeanfmError(f"{f} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the model directory is damaged: {fix}") from None
    except OSError as e:
        raise LeanfmError(f"cannot read {f}: {e.strerror or e}; check that the file is readable") from None
    if not isinstance(cfg, dict):
        raise LeanfmError(f"{f} holds a JSON {type(cfg).__name__}, not a model config object; the model directory is damaged: {fix}")
    return cfg


def _family(path: str) -> str:
    """The family of the model at ``path`` (a folder or a hub id), from its config."""
    from .family import family_of_config

    if os.path.isdir(path):
        from .pipeline import is_pipeline_folder

        if is_pipeline_folder(path):
            return "diffusion-pipeline"
        return family_of_config(_check_config(Path(path)))
    from transformers import AutoConfig

    return family_of_config(AutoConfig.from_pretrained(path).to_dict())


def _from_dir(path: str, dtype: torch.dtype, tok=None):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # leanfm shows its own progress; per-load bars are noise

    from .checkpoint import load_checkpoint

    family = _family(path)
    if family == "diffusion-pipeline":
        from .pipeline import load_pipeline

        return load_pipeline(path), None
    if family in ("vit", "diffusion"):  # images in, features (or images) out: no tokenizer
        return load_checkpoint(path, dtype, family=family), None
    if family != "causal-lm":  # an image-text model: its text tokenizer when the folder has one
        from .dual_encoder import tokenizer_folder

        where = next((d for d in (tokenizer_folder(path), Path(path)) if os.path.isdir(path) and _has_tokenizer(d)), None)
        tok = tok or (AutoTokenizer.from_pretrained(str(where)) if where is not None else None)
        return load_checkpoint(path, dtype, family=family), tok
    if tok is not None:  # the caller has it already (compress loads it for calibration first)
        pass
    elif os.path.isdir(path):  # its config.json was read and checked by _family
        d = Path(path)
        if not _has_tokenizer(d):
            raise LeanfmError(f"no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES[:2])}); copy the tokenizer files "
                              "(tokenizer.json, tokenizer_config.json) from the source model into it")
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LeanfmError(f"could not load the tokenizer in {path}: {_one_line(e)}; copy the tokenizer files "
                              "(tokenizer.json, tokenizer_config.json) from the source model into it") from None
    else:
        tok = AutoTokenizer.from_pretrained(path)
    return load_checkpoint(path, dtype), tok


def _hub_endpoint() -> tuple[str, int]:
    """Host and port of the Hugging Face hub (``$HF_ENDPOINT`` or huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub host opens within ``timeout`` seconds (name lookup
    included: it runs in a daemon thread, since a hanging DNS lookup ignores socket timeouts)."""
    host, port = _hub_endpoint()
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True, name="leanfm-hub-probe")
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cached_snapshot(repo_id: str) -> str | None:
    """The local Hugging Face cache's snapshot folder of ``repo_id``, when its config.json is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an unusable cache is a cache miss
        return None
    return str(Path(hit).parent) if isinstance(hit, str) else None


def _resolve_hub(name: str) -> tuple[str, str]:
    """``(path, source)`` for the hub id ``name``: the id itself when the hub is reachable, the
    cached snapshot when it is not (or ``HF_HUB_OFFLINE`` is set), else a one-line refusal; never
    the ~50 s of retries huggingface_hub spends on an unreachable hub."""
    offline = _hub_offline()
    if not offline and hub_reachable():
        return name, "hub"
    cached = _cached_snapshot(name)
    if cached:
        return cached, "hub-cache"
    if offline:
        raise LeanfmError(f"HF_HUB_OFFLINE is set and {name} is not in the local Hugging Face cache; unset HF_HUB_OFFLINE "
                          "to download it, or pass a local model directory")
    host, port = _hub_endpoint()
    raise LeanfmError(f"cannot reach the Hugging Face hub ({host}:{port}) to download {name}; pass a local model directory "
                      "(or set HF_HUB_OFFLINE=1 if it is cached)")


def _looks_local(name: str) -> bool:
    """A path, not a hub id: starts with . / ~, has other than one slash, characters a hub id
    cannot have, or its first part exists here (``models/x`` next to a ``models`` folder)."""
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name:
        return True
    return not _HUB_ID.fullmatch(name) or os.path.exists(name.split("/", 1)[0])


def load(name_or_path: str, dtype: torch.dtype = torch.float32, tokenizer=None) -> tuple[nn.Module, object]:
    """Load a model and its tokenizer in eval mode (a vision model: its tokenizer is None).

    ``name_or_path``: an alias from ``leanfm models`` (packaged weights, converted to an fp32
    cache on first use), a local directory with ``config.json``, or a Hugging Face hub id
    (needs network access to the hub, or the model in the local Hugging Face cache).
    ``tokenizer``: one already loaded for this model (from :func:`load_tokenizer`), used as is.
    """
    t0 = time.perf_counter()
    name = str(name_or_path)
    path, source = resolve(name)
    try:
        model, tok = _from_dir(path, dtype, tokenizer)
    except LeanfmError:
        raise
    except (OSError, ValueError) as e:
        where = "the Hugging Face hub" if source == "hub" else f"'{path}'"
        raise LeanfmError(f"could not load model '{name}' from {where}: {_one_line(e)}") from None
    model.eval()
    from .family import family_of

    model.leanfm_info = {
        "name": name, "path": path, "source": source, "tokenizer": tok, "family": family_of(model),
        "load_seconds": round(time.perf_counter() - t0, 2), "steps": [],
    }
    from ..kernels.checkpoint import act_quant_bits, kernel_summary, quantized_layers

    if quantized_layers(model):  # a packed checkpoint: record what runs it
        acts = act_quant_bits(model)  # SmoothQuant activations are fake-quantized: simulated
        kernel = kernel_summary(model) + ("; fake-quant activations" if acts else "")
        model.leanfm_info["steps"].append({"method": "load-quantized", "simulated": bool(acts), "kernel": kernel})
    return model, tok


def load_tokenizer(path: str):
    """The tokenizer of a resolved model path (a folder or a hub id), as :func:`load` loads it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise LeanfmError(f"could not load the tokenizer of {path}: {_one_line(e)}; copy the tokenizer files "
                          "(tokenizer.json, tokenizer_config.json) from the source model into it") from None


def resolve(name: str) -> tuple[str, str]:
    """``(path, source)`` of a model argument, without loading it: an alias's fp32 cache folder
    (built on first use), a local directory, or a hub id (or its cached snapshot when offline)."""
    local = os.path.expanduser(name)
    if name in ALIASES:
        spec = ALIASES[name]
        spec.require_installed()
        path, source = str(build_cache(spec)), "packaged"
    elif os.path.isdir(local):
        if not any((Path(local) / f).is_file() for f in ("config.json", "model_index.json")):
            raise LeanfmError(f"directory '{name}' has no config.json (nor a diffusers pipeline's model_index.json); pass a "
                              "Hugging Face model directory or an alias (see: leanfm models)")
        path, source = local, "local"
    elif os.path.exists(local):
        raise LeanfmError(f"model path '{name}' is a file; pass the model's directory (the folder holding config.json)")
    elif "/" in name or os.sep in name or name.startswith((".", "~")):
        if _looks_local(name):
            raise LeanfmError(f"model path '{name}' does not exist; pass an existing model directory, an alias "
                              f"({', '.join(ALIASES)}), or a hub id like org/name")
        path, source = _resolve_hub(name)
    else:
        raise LeanfmError(
            f"unknown model '{name}'; use an alias ({', '.join(ALIASES)}), a local model directory, or a hub id like org/name"
        )
    return path, source
