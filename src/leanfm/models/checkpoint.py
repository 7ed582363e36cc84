"""Checkpoints of (compressed) models: the one place that decides which format a model is saved
in and which loader reads a directory back.

The file layouts live with the layers they store:

- ``leanfm-quant`` (:mod:`leanfm.kernels.checkpoint`): packed quantized linears plus
  ``leanfm-quant.json``; reloads without calibration on whichever backend this machine runs.
- ``leanfm-lowrank`` (:mod:`leanfm.kernels.lowrank`): factorized linears plus
  ``leanfm-lowrank.json``, which plain transformers cannot rebuild.
- plain Hugging Face (``save_pretrained`` / ``from_pretrained``): every other model (pruned,
  structurally smaller, fake-quantized fp32).
- ``compressed-tensors`` (:mod:`leanfm.kernels.export_ct`, written only): the packed layers in
  the ``pack-quantized`` format vLLM and transformers read.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanfmError, os_reason
from ..kernels.checkpoint import (
    REWRITE_HINT, check_tensor_files, dense_state, is_quantized_checkpoint, load_quantized, quantized_embeddings, quantized_layers,
    save_quantized,
)
from ..kernels.lowrank import is_lowrank_checkpoint, load_lowrank, lowrank_layout, save_lowrank

FORMATS = ("leanfm", "compressed-tensors", "gguf")
# What makes an existing folder replaceable with ``overwrite``: something leanfm (or
# save_pretrained) writes into every checkpoint. Anything else is not deleted on request.
_CHECKPOINT_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", "leanfm-quant.json", "leanfm-lowrank.json")




def _target(out: str | Path) -> Path:
    """``out`` as an absolute path without ``.``/``..`` (so ``--out .`` has a name), a symlink
    followed to the folder it points at (the link itself is left alone)."""
    p = Path(os.path.abspath(Path(out).expanduser()))
    return p.resolve() if p.is_symlink() else p


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_checkpoint_target(out: str | Path, overwrite: bool = False) -> None:
    """Refuse, in one line, a checkpoint folder ``out`` that :func:`save_checkpoint` could not
    fill: a file, an existing non-empty folder without ``overwrite`` (or, with it, a folder that
    is not a checkpoint, or holds the working directory), or a place this process cannot write.
    Cheap (it writes and removes one empty probe folder): call it before loading and calibrating."""
    shown = str(out)
    p = _target(out)
    if p.exists() and not p.is_dir():
        raise LeanfmError(f"checkpoint folder {shown} exists as a file; pass a folder path to --out (or remove the file)")
    if p.is_dir():
        try:
            entries = sorted(e.name for e in p.iterdir())
        except OSError as e:
            raise LeanfmError(f"cannot read checkpoint folder {shown}: {os_reason(e)}; choose a folder you can write to") from None
        if entries and not overwrite:
            raise LeanfmError(f"checkpoint folder {shown} already exists and is not empty; pass --overwrite to replace it "
                              "as a whole, or choose another --out")
        if entries:
            cwd, home = Path.cwd().resolve(), Path.home().resolve()
            real = p.resolve()
            if real in (home, Path(real.anchor)) or cwd == real or real in cwd.parents:
                raise LeanfmError(f"--overwrite would delete {shown}, which holds the working directory or is the home or "
                                  "root folder; choose a new folder for --out")
            if not any(m in entries for m in _CHECKPOINT_MARKERS):
                raise LeanfmError(f"checkpoint folder {shown} is not empty and holds no checkpoint (no config.json; it has "
                                  f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); --overwrite replaces only "
                                  "a checkpoint folder: choose another --out or empty it yourself")
    parent = _nearest_existing(p.parent)
    if not parent.is_dir():
        raise LeanfmError(f"cannot create checkpoint folder {shown}: {parent} is a file, not a folder; choose another --out")
    try:  # the real test of writability (os.access says yes to root on a read-only mount)
        os.rmdir(tempfile.mkdtemp(prefix=f".{p.name}.probe-", dir=parent))
    except OSError as e:
        raise LeanfmError(f"cannot write checkpoint folder {shown}: {parent} is not writable ({os_reason(e)}); "
                          "choose a folder you can write to for --out") from None


def _remove_stale_partials(p: Path) -> None:
    """Temp folders of earlier ``save_checkpoint`` runs on ``p`` whose process has ended."""
    for d in p.parent.glob(f".{p.name}.partial-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass


def gguf_type_for(qlayers: dict) -> str:
    """The GGUF block type that holds the packed layers' grid (``f16`` for a float model)."""
    if not qlayers:
        return "f16"
    q = next(iter(qlayers.values())).quantized_weight()
    if q.bits == 8:
        return "q8_0"
    sym = bool((q.zero == 2 ** (q.bits - 1)).all())
    return "q4_0" if sym else "q4_1"


def source_gguf(model: nn.Module, workdir: Path) -> Path | None:
    """The GGUF a packaged model was converted from (its tokenizer metadata is copied)."""
    info = getattr(model, "leanfm_info", {})
    if info.get("source") != "packaged":
        return None
    from .packaged import gguf_path
    from .registry import ALIASES

    return gguf_path(ALIASES[info["name"]], workdir / ".source")


def _write(model: nn.Module, out: Path, tokenizer, fmt: str, qlayers, gguf_type: str = "auto") -> None:
    embs = quantized_embeddings(model)
    if fmt == "gguf":
        from .gguf_export import export_gguf

        qtype = gguf_type_for(qlayers) if gguf_type == "auto" else gguf_type
        export_gguf(model, tokenizer, out / "model.gguf", qtype, source_gguf=source_gguf(model, out))
        shutil.rmtree(out / ".source", ignore_errors=True)
        return
    if fmt == "compressed-tensors":
        from ..kernels.export_ct import export_compressed_tensors

        dense = dense_state(model, qlayers)
        export_compressed_tensors(model.config, dense, {n: q.quantized_weight() for n, q in qlayers.items()}, out, tokenizer)
        return
    if qlayers or embs:
        save_quantized(model, out, tokenizer)
        return
    if lowrank_layout(model):  # two smaller linears per layer: plain transformers cannot rebuild them
        save_lowrank(model, out)
    else:
        model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_checkpoint(model: nn.Module, out: str | Path, tokenizer=None, fmt: str = "leanfm",
                    source: str = "the model", overwrite: bool = False, extra_files: dict[str, str] | None = None,
                    gguf_type: str = "auto") -> Path:
    """Write ``model`` (and ``tokenizer`` when given) to the directory ``out``; return it.

    ``fmt="leanfm"``: packed quantized layers in the leanfm-quant format, else factorized layers
    in the leanfm-lowrank format, else a plain Hugging Face directory. ``fmt="compressed-tensors"``:
    the packed layers in the compressed-tensors format (refused, naming ``source``, when the
    model has none). ``fmt="gguf"``: ``model.gguf`` for llama.cpp (:mod:`.gguf_export`) in
    ``gguf_type`` (``auto``: the block type the packed layers' grid fits). ``extra_files``: more files for the folder, ``{name: text}`` (e.g.
    ``{"recipe.yaml": ...}``).

    Everything is written to a temporary sibling ``.<name>.partial-<pid>`` that is renamed to
    ``out`` only when complete, so an interrupted save never leaves a half checkpoint. An existing
    non-empty ``out`` is refused (:func:`check_checkpoint_target`) unless ``overwrite``; then the
    old folder is replaced as a whole (renamed aside, the new one renamed in, the old deleted),
    so no stale file of it survives.
    """
    if fmt not in FORMATS:
        raise LeanfmError(f"unknown checkpoint format '{fmt}'; use one of {', '.join(FORMATS)}")
    for name in extra_files or {}:
        if not name or os.sep in name or name in (".", "..") or (os.altsep and os.altsep in name):
            raise LeanfmError(f"extra checkpoint file name {name!r} must be a plain file name")
    if fmt in ("gguf", "compressed-tensors") and quantized_embeddings(model):
        raise LeanfmError(f"--format {fmt}: leanfm has no {fmt} writer for a packed embedding table (embed_quant) yet; "
                          "save in leanfm's own format (the default --format) or drop the embed_quant step")
    qlayers = quantized_layers(model)
    if fmt == "compressed-tensors" and not qlayers:
        raise LeanfmError(f"{source} leaves no packed quantized layers; "
                          "compressed-tensors export needs a quantizing recipe without backend: fake")
    with partial_folder(out, overwrite) as tmp:
        _write(model, tmp, tokenizer, fmt, qlayers, gguf_type)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)


@contextmanager
def partial_folder(out: str | Path, overwrite: bool = False):
    """A temporary sibling ``.<name>.partial-<pid>`` to fill; renamed to ``out`` when the block
    completes, removed when it raises (an interrupted write never leaves a folder that loads as a
    checkpoint). ``out`` is checked first (:func:`check_checkpoint_target`)."""
    check_checkpoint_target(out, overwrite)
    shown, p = str(out), _target(out)
    _remove_stale_partials(p)
    tmp = p.parent / f".{p.name}.partial-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        _move_into_place(tmp, p, shown, overwrite)
    except OSError as e:
        raise LeanfmError(f"could not write checkpoint folder {shown}: {os_reason(e)}"
                          + (f" ({e.filename})" if e.filename and e.errno not in (errno.ENOSPC, errno.EDQUOT) else "")
                          + "; nothing was replaced: free space or choose another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a failed write leaves nothing behind


def _move_into_place(tmp: Path, p: Path, shown: str, overwrite: bool) -> None:
    cwd = Path.cwd().resolve()
    if p.is_dir() and not any(p.iterdir()) and (p.resolve() == cwd or p.resolve() in cwd.parents):
        for f in tmp.iterdir():  # an empty working directory stays the same folder (the shell is in it)
            os.rename(f, p / f.name)
        return
    try:
        os.rename(tmp, p)  # no folder there, or an empty one (rename replaces an empty folder)
        return
    except OSError as e:
        if e.errno == errno.EBUSY:  # an empty mount point: it cannot be replaced, so fill it
            for f in tmp.iterdir():
                os.rename(f, p / f.name)
            return
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not overwrite:  # another process filled it since the check
        raise LeanfmError(f"checkpoint folder {shown} was filled by something else while leanfm wrote; "
                          "pass --overwrite to replace it, or choose another --out")
    old = p.parent / f".{p.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(p, old)
    try:
        os.rename(tmp, p)
    except OSError:
        os.rename(old, p)  # put the old checkpoint back: never leave neither
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, family: str = "causal-lm") -> nn.Module:
    """The model stored in the directory ``path`` by the loader its format needs (``dtype``
    applies to a plain Hugging Face directory; the leanfm formats rebuild their own). A truncated
    or corrupt tensors file or manifest raises a one-line :class:`LeanfmError` naming it.
    ``family``: a causal LM loads with its LM head; the other families as the bare model
    (``AutoModel``: a ViT's or CLIP's encoders)."""
    if is_quantized_checkpoint(path):
        return load_quantized(path, bare=family != "causal-lm")
    if is_lowrank_checkpoint(path):  # factorized linears: rebuild them before loading
        return load_lowrank(path)
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoModelForCausalLM

    from .denoiser import is_denoiser, load_denoiser
    from .dual_encoder import is_dual_encoder, load_dual_encoder

    if Path(path).is_dir():
        cfg = _read_config(path)
        if is_dual_encoder(cfg):
            return load_dual_encoder(path, dtype)
        if is_denoiser(cfg):
            return load_denoiser(path)
        check_tensor_files(path)
    held: list[logging.LogRecord] = []
    try:
        with _hold_transformers_logs(held):
            auto = AutoModelForCausalLM if family == "causal-lm" else AutoModel
            return auto.from_pretrained(str(path), dtype=dtype)
    except SafetensorError as e:
        raise LeanfmError(f"a tensors file in {path} is truncated or corrupt ({e}); {REWRITE_HINT}") from None
    except RuntimeError as e:  # weights that do not fit config.json (transformers logs a table, then raises)
        if "mismatch" not in str(e) and "state_dict" not in str(e):
            raise
        lines = [ln for r in held for ln in r.getMessage().splitlines() if "MISMATCH" in ln or "size mismatch" in ln]
        example = " ".join(lines[0].replace("|", " ").split()) if lines else " ".join(str(e).split())[:200]
        raise LeanfmError(f"the tensors in {path} do not match its config.json ({example}); the model directory is damaged: "
                          "re-download the model, or re-run leanfm compress") from None


def _read_config(path) -> dict:
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


@contextmanager
def _hold_transformers_logs(held: list):
    """Hold back what transformers logs while the block runs: replayed when it succeeds, dropped
    when it raises (its multi-line load report would bury the one-line error)."""
    lg = logging.getLogger("transformers")

    class _Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    old = lg.handlers[:]
    lg.handlers = [_Hold()]
    try:
        yield
    except BaseException:
        lg.handlers = old
        raise
    lg.handlers = old
    for r in held:
        if r.levelno >= lg.getEffectiveLevel():
            lg.handle(r)


def tensors_file_bytes(model: nn.Module) -> int:
    """Size of the model's ``model.safetensors``, written for real to a temporary directory:
    packed models in the leanfm-quant format :func:`save_checkpoint` writes, any other model as
    its own tensors (tied ones stored once)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="leanfm-size-") as d:
        path = os.path.join(d, "model.safetensors")
        if quantized_layers(model) or quantized_embeddings(model):
            save_quantized(model, d)
        else:
            save_model(model, path)
        return os.path.getsize(path)
