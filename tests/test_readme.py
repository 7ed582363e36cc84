"""README's examples run as written (with small sizes where they would take minutes).

Every ``leanfm ...`` line of the "Use" shell block and the Python block run on the embedded
model, in README order, in one scratch folder (``my-recipe.yaml`` is the README's YAML block).
The only edits are the size substitutions in ``SMALLER``; each must match, so a README edit that
a substitution no longer covers fails here instead of silently running for an hour.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
QUICK = "--seqlen 256 --repeats 2 --warmup 0 --gen 8 --prompt 32"
SMALLER = [  # (pattern, replacement): sizes only, never the command or its options' meaning
    (r"--max-eval-tokens 16384", f"--max-eval-tokens 1024 {QUICK}"),
    (r"--calib-samples 64 --calib-seqlen 512", "--calib-samples 4 --calib-seqlen 128"),
    (r"n=64, seqlen=512", "n=4, seqlen=128"),
    (r"leanfm\.Protocol\(max_eval_tokens=16384\)",
     "leanfm.Protocol(max_eval_tokens=1024, seqlen=256, repeats=2, warmup=0, gen=8, prompt=32)"),
    (r'dataset="wikitext2", groups=\("quality",\)', 'dataset="wikitext2", groups=("quality",), max_eval_tokens=512, seqlen=256'),
    (r"--rate 0\.5,1,2", "--rate 0.5,1,2 --num-requests 3 --max-tokens 8 --drain 120"),
]
# Commands that evaluate without a --max-eval-tokens of their own get the quick sizes too.
NEEDS_QUICK = ("leanfm bench", "leanfm eval")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def smaller(text: str) -> tuple[str, set[str]]:
    used = set()
    for pat, rep in SMALLER:
        text, n = re.subn(pat, rep, text)
        if n:
            used.add(pat)
    return text, used


def shell_commands() -> list[str]:
    use = README.read_text().split("## Use", 1)[1]
    sh = re.search(r"```sh\n(.*?)```", use, flags=re.S).group(1)
    cmds = []
    for line in sh.splitlines():
        cmd = line.split("#", 1)[0].strip()
        if cmd.startswith("leanfm"):
            cmds.append(cmd)
    return cmds


def readme_env(cwd: Path) -> dict:
    """The commands' environment: a cache of their own whose models and data are the user's
    (linked, so no model is converted twice) but whose hardware calibration is not: README's
    `leanfm predict --calibrate` must not replace the machine's measurement with one taken while
    the tests load it."""
    from leanfm.models.cache import cache_root

    mine = cwd / "leanfm-cache"
    if not mine.exists():
        mine.mkdir()
        for sub in ("models", "data"):
            (cache_root() / sub).mkdir(parents=True, exist_ok=True)
            (mine / sub).symlink_to(cache_root() / sub, target_is_directory=True)
    return {**os.environ, "LEANFM_PROGRESS": "0", "LEANFM_CACHE": str(mine)}


def run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = readme_env(cwd)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_readme_examples_run(tmp_path):
    cli = Path(sys.executable).parent / "leanfm"
    (tmp_path / "my-recipe.yaml").write_text(blocks("yaml")[0])
    used: set[str] = set()
    cmds = shell_commands()
    assert len(cmds) >= 10, cmds
    background = []  # `cmd &` lines (a server): started, then stopped after the last command
    try:
        for cmd in cmds:
            cmd, u = smaller(cmd)
            used |= u
            if cmd.startswith(NEEDS_QUICK) and "--max-eval-tokens" not in cmd:
                cmd += f" --max-eval-tokens 1024 {QUICK}"
            args = shlex.split(cmd)
            if args[-1] == "&":
                env = readme_env(tmp_path)
                background.append(subprocess.Popen([str(cli), *args[1:-1]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.STDOUT, text=True))
                continue
            t0 = time.perf_counter()
            p = run([str(cli), *args[1:]], tmp_path)
            print(f"{time.perf_counter() - t0:6.1f} s  {cmd}")
            if args[1] == "--version":
                assert p.stdout.startswith("leanfm ")
    finally:
        for b in background:
            b.terminate()
            out = b.communicate(timeout=60)[0]
            assert b.returncode == 0, out[-2000:]
    assert (tmp_path / "runs" / "demo" / "results.json").exists() and (tmp_path / "ckpt" / "leanfm-quant.json").exists()
    code, u = smaller(blocks("python")[0])
    used |= u
    (tmp_path / "example.py").write_text(code)
    p = run([sys.executable, "example.py"], tmp_path)
    ppl = [float(x) for x in re.findall(r"^(\d+\.\d+)", p.stdout, flags=re.M)]
    assert len(ppl) == 2 and all(1 < x < 1000 for x in ppl), p.stdout
    assert used == {pat for pat, _ in SMALLER}, f"README no longer matches: {set(p for p, _ in SMALLER) - used}"
