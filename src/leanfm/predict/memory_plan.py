"""Peak memory of ``leanfm compress`` before it runs, from the config alone.

The plan adds, to what the process already holds when it is made (``base``: Python, torch,
transformers, the tokenizer; measured, not predicted), the largest set of tensors alive at once:

- **in memory**: the whole model in fp32, plus the working set below for one layer;
- **onloaded** (one decoder layer in RAM): the modules outside the decoder stack in fp32
  (embeddings, final norm, an untied head unless it is read only at the end), one decoder layer
  in fp32, and the largest tensor read from the file in its stored dtype before the upcast;
- both: the calibration activations of one layer (its inputs and outputs for every sample,
  ``2 x samples x seqlen x hidden x 4`` bytes; or two samples when they are spilled to disk), the
  transients of one layer's forward on one sample (the MLP's intermediate activations, q/k/v and
  the attention output), and what the step's algorithm holds for one layer
  (``layer_work_bytes`` of its config: GPTQ's Hessians, codes until packed).

A budget (``--max-memory``, else the memory available now) is checked against it: what does not
fit is refused before any work with the budget it needs and the option that would fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LeanfmError

GB = 1e9


@dataclass
class MemoryPlan:
    path: str  # "in-memory" | "onloaded"
    parts: dict[str, int] = field(default_factory=dict)
    spilled: bool = False

    transient: tuple[str, ...] = ()  # parts alive only while loading, before any layer is processed
    final: tuple[str, ...] = ()  # parts alive only at the end, once no layer is in memory

    @property
    def total(self) -> int:
        """Peak: the largest of the loading phase (base, resident modules, the read buffer), the
        layer phase (everything but the read buffer and the final parts) and the final phase
        (base, resident modules, the final parts and their read buffer)."""
        steady = sum(v for k, v in self.parts.items() if k not in self.transient + self.final)
        loading = sum(v for k, v in self.parts.items() if k in ("base", "outside layers", *self.transient))
        final = loading + sum(v for k, v in self.parts.items() if k in self.final)
        return max(steady, loading, final if self.final else 0)

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.parts.items() if v >= 0.005 * GB)
        return f"memory plan ({self.path}{', activations spilled to disk' if self.spilled else ''}): peak {self.total / GB:.2f} GB = {shown}"


def _layer_bytes(arch) -> int:
    lin = sum(i * o for _, i, o, _ in arch.linears())
    return (lin + arch.norms_per_layer * arch.hidden) * 4


def _outside_bytes(arch, head: bool = True) -> int:
    emb = arch.vocab * arch.hidden * 4
    return emb * (1 if arch.tie or not head else 2) + arch.hidden * 4


def plan(arch, steps: list, samples: int, seqlen: int, base: int, onload: bool, spill: bool = False,
         source_bytes_per_param: int = 4, defer_head: bool = False) -> MemoryPlan:
    """The plan of one compress run (``steps``: the recipe's configs; ``samples x seqlen``: the
    calibration, ``samples=0`` when no step calibrates; ``defer_head``: an onloaded run reads its
    untied head only after the layers)."""
    linears = [(i, o) for _, i, o, _ in arch.linears()]
    p = MemoryPlan("onloaded" if onload else "in-memory", spilled=spill)
    p.parts["base"] = base
    if onload:
        defer = defer_head and not arch.tie
        p.parts["outside layers"] = _outside_bytes(arch, head=not defer)
        if defer:
            p.parts["head, at the end"] = arch.vocab * arch.hidden * 4
            p.final = ("head, at the end",)
        p.parts["one layer"] = _layer_bytes(arch)
        if source_bytes_per_param != 4:  # a bf16/fp16 tensor is read, then upcast: both alive for a moment
            p.parts["read buffer"] = max(i * o for i, o in linears + [(arch.vocab, arch.hidden)]) * source_bytes_per_param
            p.transient = ("read buffer",)
    else:
        p.parts["model"] = _outside_bytes(arch) + arch.layers * _layer_bytes(arch)
    if samples:
        act = seqlen * arch.hidden * 4
        p.parts["calibration activations"] = 2 * act * (1 if spill else samples)
        p.parts["layer forward"] = seqlen * (3 * arch.intermediate + 4 * arch.heads * arch.head_dim) * 4
    p.parts["method"] = max((s.layer_work_bytes(linears, arch.layer_inputs()) for s in steps), default=0)
    return p


def check(p: MemoryPlan, budget: int, budget_name: str, samples: int, seqlen: int, arch, can_onload: bool = True) -> None:
    """Refuse a plan over ``budget`` in one line: what it needs, and what would fit."""
    if p.total <= budget:
        return
    fixes = []
    if p.path == "in-memory" and can_onload:
        fixes.append("--onload always (one decoder layer in memory at a time)")
    act = p.parts.get("calibration activations", 0)
    if act and not p.spilled:
        fixes.append("--max-memory lets calibration activations spill to disk")
        per = 2 * seqlen * arch.hidden * 4
        room = budget - (p.total - act)
        if room > per:
            fixes.append(f"--calib-samples {int(room // per)} fits")
    hint = "; ".join(fixes) if fixes else "a machine with more memory (the rest of the plan is one layer's working set)"
    raise LeanfmError(f"leanfm compress needs about {p.total / GB:.2f} GB ({p.describe().split(': ', 1)[1]}), more than the "
                      f"{budget / GB:.2f} GB of {budget_name}; {hint}")


_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """``6GB`` (powers of 1000), ``6GiB`` (of 1024), ``512MB``, or a number of bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE and unit:
        raise LeanfmError(f"{flag} {text!r} is not a size; write e.g. 6GB, 6GiB or 512MB")
    value = float(m.group(1)) * _SIZE[unit or "b"]
    if value <= 0:
        raise LeanfmError(f"{flag} {text!r} must be more than zero")
    return int(value)


def current_rss() -> int:
    """Resident set of this process now (bytes; 0 where /proc is missing)."""
    from ..measure.memory import proc_bytes

    return proc_bytes("/proc/self/status", "VmRSS") or 0


def available_bytes() -> int:
    """Memory this process could use now: MemAvailable plus what it already holds (Linux), else
    total physical memory."""
    import os

    from ..measure.memory import proc_bytes

    avail = proc_bytes("/proc/meminfo", "MemAvailable")
    if avail is None:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return avail + current_rss()
