"""The handler of every tuning method: checks, training text, teacher, adapters, train, merge."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ... import progress
from ...allocator import fix_mmap_threshold
from ...errors import LeanfmError
from ...models.mapped import copy_out_of_mapped_files
from .adapters import add_lora, apply_masks, merge, quantize_base_4bit, sparsity_masks
from .loop import train, training_windows


def _packed_modules(model: nn.Module) -> list[str]:
    """Class names of modules holding integer tensors (packed weights cannot be trained)."""
    names = {type(m).__name__ for m in model.modules()
             if any(not t.is_floating_point() for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
                    if t.numel() > 0 and t.dtype != torch.bool)}
    return sorted(names)


def check_trainable(model: nn.Module, method: str) -> None:
    packed = _packed_modules(model)
    if packed:
        raise LeanfmError(f"{method} trains float weights, but this model holds packed integer ones ({', '.join(packed)}); "
                          "put the tuning step before the quantization step in the recipe (or use qlora on the float model)")


def training_text(name: str, data_dir: str | None = None) -> str:
    """The training text, refused when it is (or overlaps) the evaluation text, WikiText-2 test."""
    from ...data.text import load_text

    if name == "wikitext2":
        raise LeanfmError("data=wikitext2 is the evaluation text (perplexity is measured on WikiText-2 test); "
                          "train on gensim-wiki or a local text file")
    text = load_text(name, "test", data_dir)
    overlap = eval_overlap(text, data_dir)
    if overlap is not None and overlap >= 0.2:
        raise LeanfmError(f"training text {name} contains {overlap:.0%} of the sampled lines of WikiText-2 test, the evaluation "
                          "text; train on text the evaluation does not score (gensim-wiki, or your own file)")
    return text


def eval_overlap(text: str, data_dir: str | None = None, lines: int = 200) -> float | None:
    """Share of ``lines`` long lines of WikiText-2 test found verbatim in ``text`` (None: the
    evaluation text is not available here, so nothing to compare)."""
    from ...data.text import load_text

    try:
        ev = load_text("wikitext2", "test", data_dir)
    except LeanfmError:
        return None
    long = [x.strip() for x in ev.splitlines() if len(x.strip()) >= 100]
    if not long:
        return None
    sample = long[:: max(1, len(long) // lines)][:lines]
    return sum(x in text for x in sample) / len(sample)


def _teacher(model: nn.Module, cfg) -> nn.Module:
    from ...models.load import load

    info = getattr(model, "leanfm_info", {})
    name = cfg.teacher or info.get("name")
    if name is None:
        raise LeanfmError("kd needs a teacher: set teacher (an alias or a model folder); this model was not loaded by leanfm.load")
    from ...config import registered

    changed = [s for s in info.get("steps", []) if getattr(registered(s.get("method", "")), "produces", "") != "tuned-weights"]
    if cfg.teacher is None and not changed:
        raise LeanfmError(f"kd would distill {name} into itself: compress it first (a recipe step before kd, or leanfm tune "
                          "--recipe) or name another teacher")
    teacher, ttok = load(name)
    stok = info.get("tokenizer")
    if stok is not None and ttok.get_vocab() != stok.get_vocab():
        raise LeanfmError(f"teacher {name} and the student have different tokenizers ({len(ttok.get_vocab())} vs "
                          f"{len(stok.get_vocab())} tokens); distill from a teacher with the student's tokenizer")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def tune_step(model: nn.Module, cfg, calib=None) -> dict:
    """Train ``model`` in place per ``cfg`` (a :class:`~.decl.TuneConfig`); leaves merged float weights."""
    from ...data.calib import encode

    check_trainable(model, cfg.method)
    fix_mmap_threshold()  # before the teacher, the text and QLoRA's quantization (leanfm.allocator)
    info = getattr(model, "leanfm_info", {})
    tok = info.get("tokenizer")
    if tok is None:
        raise LeanfmError(f"{cfg.method} tokenizes its training text with the model's tokenizer: load the model with leanfm.load")
    teacher = _teacher(model, cfg) if cfg.method == "kd" else None
    windows = training_windows(encode(tok, training_text(cfg.data)), cfg.steps * cfg.batch, cfg.seqlen, cfg.seed)
    masks = sparsity_masks(model) if cfg.keep_sparsity else {}
    spec = cfg.lora_spec()
    if cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(spec is None and p.is_floating_point())
    record: dict = {"method": cfg.method, "data": cfg.data, "windows": list(windows.shape),
                    "teacher": (cfg.teacher or info.get("name")) if teacher is not None else None}
    with progress.bar(f"{cfg.method} ({cfg.steps} steps of {cfg.batch}x{cfg.seqlen} tokens)", cfg.steps) as adv:
        on_step = lambda step, loss: adv(1, status=f"loss {loss:.4f}")  # noqa: E731
        try:
            if spec is None:
                # every weight changes in place: in a memory-mapped checkpoint each changed page
                # would become a private copy beside the file's, and apply_'s copy out of the
                # mapping after the step would duplicate them all (MeZO: 1.7x its inference peak)
                copy_out_of_mapped_files(model)
                record["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
                record.update(train(model, cfg, windows, teacher, masks, on_step))
            else:
                if cfg.method == "qlora":
                    record["base_4bit_linears"] = quantize_base_4bit(model, cfg.quant_type, cfg.double_quant)
                pm = add_lora(model, spec)
                record["trainable_params"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
                record["trainable_params_peft"] = int(pm.get_nb_trainable_parameters()[0])
                record.update(train(pm, cfg, windows, teacher, None, on_step))
                merge(pm)
                if masks:
                    apply_masks(model, masks)  # the merged dense update would undo the pruning
        finally:
            if cfg.checkpointing:
                model.gradient_checkpointing_disable()
    for p in model.parameters():
        p.requires_grad_(False)
    record["kept_sparse_linears"] = len(masks)
    return {"simulated": False, "kernel": f"training: {cfg.how()}; result: float weights", "training": record}
