"""Recipes: named, seeded lists of technique steps, written as YAML.

```yaml
name: rtn-w4g64
seed: 0
steps:
  - {method: rtn, bits: 4, group_size: 64}
```
Built-in recipes ship in ``leanfm/recipes/*.yaml`` and are addressed by name; any other
argument is read as a path. Every error names the file and line. Names may hold characters
that some file systems forbid (``wanda-2:4``: Windows and git checkouts there reject ':');
their files spell those characters percent-encoded (``wanda-2%3A4.yaml``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

import yaml

from .config import BaseConfig, config_from_dict
from .errors import LeanfmError

_TOP_KEYS = ("name", "seed", "steps", "description")
_NOT_IN_FILE_NAMES = '%<>:"/\\|?*'


def recipe_file_stem(name: str) -> str:
    """Built-in recipe name -> file stem (percent-encode characters file systems may forbid)."""
    return "".join(f"%{ord(c):02X}" if c in _NOT_IN_FILE_NAMES else c for c in name)


def _recipe_name(stem: str) -> str:
    return unquote(stem)


@dataclass
class Recipe:
    name: str
    seed: int = 0
    steps: list[BaseConfig] = field(default_factory=list)
    description: str = ""
    source: str = ""

    def calibration(self, calib, tokenizer):
        """``(token ids, description)`` drawn with the recipe's seed; ``(None, None)`` if no step needs calibration."""
        if not any(s.needs_calibration for s in self.steps):
            return None, None
        seeded = dataclasses.replace(calib, seed=self.seed)
        return seeded.tokens(tokenizer), seeded.describe()

    def to_dict(self) -> dict:
        d = {"name": self.name, "seed": self.seed, "steps": [s.to_dict() for s in self.steps]}
        if self.description:
            d["description"] = self.description
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_yaml())
        return p


def builtin_names() -> list[str]:
    root = resources.files("leanfm.recipes")
    return sorted(_recipe_name(p.name[:-5]) for p in root.iterdir() if p.name.endswith(".yaml"))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe YAML; errors carry ``source`` and the 1-based line. Steps become
    validated configs (declarations are torch-free, so the cost predictor reads recipes this way too)."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LeanfmError(f"recipe {source}{line}: malformed YAML: {problem}") from None
    if not isinstance(data, dict):
        raise LeanfmError(f"recipe {source} line 1: expected a mapping with keys name, seed, steps")
    key_lines = {k.value: k.start_mark.line + 1 for k, _ in node.value}
    for key in data:
        if key not in _TOP_KEYS:
            raise LeanfmError(f"recipe {source} line {key_lines.get(key, 1)}: unknown key '{key}' (allowed: {', '.join(_TOP_KEYS)})")
    name = data.get("name") or Path(source).stem
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise LeanfmError(f"recipe {source} line {key_lines.get('seed', 1)}: seed must be an integer, got {seed!r}")
    steps_raw = data.get("steps") or []
    if not isinstance(steps_raw, list):
        raise LeanfmError(f"recipe {source} line {key_lines.get('steps', 1)}: steps must be a list of {{method: ..., ...}}")
    steps_node = {k.value: v for k, v in node.value}.get("steps")
    step_lines = [n.start_mark.line + 1 for n in steps_node.value] if isinstance(steps_node, yaml.SequenceNode) else []
    steps = []
    for i, raw in enumerate(steps_raw):
        line = step_lines[i] if i < len(step_lines) else key_lines.get("steps", 1)
        steps.append(config_from_dict(raw, where=f"recipe {source} line {line}: "))
    recipe = Recipe(name=str(name), seed=seed, steps=steps, description=str(data.get("description", "")), source=source)
    check_composition(recipe)
    return recipe


def check_composition(recipe: Recipe) -> None:
    """Refuse, before any work, step orders that the methods would refuse half-way through a run:
    quantizing weights that an earlier step already quantized (rounding compounds on a rounded
    grid; a later step may only quantize linears the earlier one left alone, via ``only``), and
    two decoding policies (one generation loop drives decoding)."""
    quant = [s for s in recipe.steps if s.produces == "int-weights"]
    for later in quant[1:]:
        first = quant[0]
        if getattr(first, "backend", None) == "fake" or not getattr(later, "only", ()):
            raise LeanfmError(
                f"recipe {recipe.name} quantizes the weights twice ({first.method}, then {later.method}); keep one "
                "quantization step, or give the later one `only: [...]` naming layers the first skips (e.g. lm_head)")
    policies = [s.method for s in recipe.steps if s.produces == "decoding-policy"]
    if len(policies) > 1:
        raise LeanfmError(f"recipe {recipe.name} attaches two decoding policies ({', '.join(policies)}); keep one")


def load_recipe(name_or_path: str | Recipe) -> Recipe:
    """A built-in recipe name, a ``+`` composition of them, a YAML path, or an already-built
    Recipe."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    arg = str(name_or_path)
    if arg in builtin_names():
        text = resources.files("leanfm.recipes").joinpath(f"{recipe_file_stem(arg)}.yaml").read_text()
        return parse_recipe(text, source=f"{arg}.yaml")
    p = Path(arg)
    if "+" in arg and not p.exists() and all(part in builtin_names() for part in arg.split("+")):
        return compose(arg.split("+"))
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise LeanfmError(f"recipe file '{arg}' does not exist")
        return parse_recipe(p.read_text(), source=str(p))
    raise LeanfmError(f"unknown recipe '{arg}'; built-in recipes: {', '.join(builtin_names())}; or pass a .yaml file "
                      "(or join built-in names with '+' to run them in order, e.g. wanda50+gptq-w4g64)")


def compose(names: list[str]) -> Recipe:
    """Built-in recipes run in order as one recipe named ``a+b`` (the first one's seed)."""
    parts = [load_recipe(n) for n in names]
    recipe = Recipe(name="+".join(r.name for r in parts), seed=parts[0].seed, steps=[st for r in parts for st in r.steps],
                    description=" then ".join(r.name for r in parts), source="+".join(r.source for r in parts))
    check_composition(recipe)
    return recipe
