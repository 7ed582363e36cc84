"""Post-training quantization benchmark: quality, size, speed and compression time per recipe.

    python benchmarks/quantization.py --phase quality --tag a --recipes baseline,rtn-w4,gptq-w4
    python benchmarks/quantization.py --phase speed               # run alone on an idle machine
    python benchmarks/quantization.py --phase peer-data           # calibration + eval ids for the peer script
    python benchmarks/quantization.py --phase compress-time --recipes gptq-w4   # idle machine, beside the peer's timing
    python benchmarks/quantization.py --phase table --write docs/benchmarks.md

Quality phase: ``leanfm.bench`` with metrics=quality on WikiText-2 test (``--eval-tokens``,
seqlen 2048), fidelity on the first ``--fidelity-tokens``, calibration from gensim-wiki
(``--calib-n`` x ``--calib-seqlen``, the recipe's seed). Each invocation re-measures the
baseline, so ``ppl_increase`` is always against a baseline on the same windows.
Speed phase: one ``bench`` with metrics=speed,memory for the baseline and the packed recipes,
side by side in one run, pinned threads. Table phase: merges every results.json under
``--out-dir`` into one markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdsection import write_section  # noqa: E402

from leanfm.bench import bench  # noqa: E402
from leanfm.data.calib import calibration  # noqa: E402
from leanfm.measure.protocol import Protocol  # noqa: E402

SPEED_RECIPES = "baseline,rtn-w8,rtn-w4,rtn-w4g64,hqq-w4g64,int4-fast,smoothquant-w8a8"


def _quality(a) -> None:
    proto = Protocol(groups=("quality",), threads=a.threads, max_eval_tokens=a.eval_tokens, max_fidelity_tokens=a.fidelity_tokens)
    cal = calibration("gensim-wiki", a.calib_n, a.calib_seqlen)
    bench(a.model, a.recipes.split(","), proto, Path(a.out_dir) / f"quality-{a.tag}", calib=cal,
          reuse_baseline=Path(a.out_dir) / f"quality-{a.reuse_baseline}" if a.reuse_baseline else None)


def _speed(a) -> None:
    proto = Protocol(groups=("speed", "memory"), threads=a.threads, repeats=a.repeats)
    cal = calibration("gensim-wiki", a.calib_n, a.calib_seqlen)
    bench(a.model, (a.recipes or SPEED_RECIPES).split(","), proto, Path(a.out_dir) / "speed", calib=cal)


def _peer_data(a) -> None:
    """The exact calibration ids and evaluation windows leanfm uses, for the llm-compressor run."""
    import torch

    from leanfm.measure.quality import make_windows
    from leanfm.measure.run import eval_ids
    from leanfm.models.load import load

    _, tok = load(a.model)
    calib = calibration("gensim-wiki", a.calib_n, a.calib_seqlen, seed=0).tokens(tok)
    proto = Protocol(max_eval_tokens=a.eval_tokens)
    windows = make_windows(eval_ids(tok, proto), proto.seqlen, proto.max_eval_tokens, None)
    out = Path(a.out_dir) / "peer-data.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"calib": calib, "eval": windows}, out)
    print(f"{out}: calib {tuple(calib.shape)}, eval {tuple(windows.shape)}")


def _compress_time(a) -> None:
    """Wall time of leanfm's apply_ alone on the peer's calibration ids (compare with the peer's
    wall_s_compress measured on the same idle machine)."""
    import time

    import torch

    import leanfm

    data = torch.load(Path(a.out_dir) / "peer-data.pt")
    torch.set_num_threads(a.threads)
    for name in a.recipes.split(","):
        model, _ = leanfm.load(a.model)
        t0 = time.perf_counter()
        leanfm.apply_(model, name, calib=data["calib"])
        wall = time.perf_counter() - t0
        tag = Path(name).stem
        (Path(a.out_dir) / f"time-{tag}.json").write_text(json.dumps({"recipe": tag, "wall_s_compress": wall, "threads": a.threads}))
        print(f"{tag}: {wall:.1f} s")


def _label(recipe: dict) -> str:
    """The recipe name, annotated when the built-in of that name has changed since the run."""
    from leanfm.recipe import builtin_names, load_recipe

    name = recipe["name"]
    if name not in builtin_names():
        return name
    now = load_recipe(name).to_dict()["steps"]
    diff = [f"{k}: {json.dumps(v)}" for old, new in zip(recipe["steps"], now) for k, v in old.items() if new.get(k) != v]
    return f"{name} (earlier definition, {', '.join(diff)})" if diff else name


def _runs(out_dir: Path, kind: str) -> dict[str, dict]:
    runs = {}
    for p in sorted(out_dir.glob(f"{kind}*/results.json")):
        d = json.loads(p.read_text())
        for r in d["runs"]:
            if r.get("status") == "ok":
                runs[_label(r["recipe"])] = {**r, "_env": d["environment"], "_protocol": d["protocol"]}
    return runs


def _short_kernel(k: str) -> str:
    import re

    found = re.findall(r"\[([\w-]+): (\d+) layers\]", k)
    extra = " + fake-quant activations" if "fake-quant" in k and found else ""
    return (", ".join(f"{b} ×{n}" for b, n in found) + extra) if found else k


def _fmt(v, f):
    return "–" if v is None else format(v, f)


PEER_MATCH = {"w4": "gptq-w4", "w4g64": "gptq-w4g64-sym", "w3": "gptq-w3"}


def _peer_table(out: Path, q: dict, peer: list[dict]) -> str:
    rows = ["| scheme (symmetric) | llm-compressor actorder | leanfm recipe | leanfm ppl | llm-compressor ppl | ratio | leanfm compress s | llm-compressor compress s | time ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    for pr in peer:
        name = PEER_MATCH.get(pr["scheme"], "?")
        ours = q.get(name, {}).get("metrics", {}).get("perplexity")
        tfile = out / f"time-{name}.json"
        t_ours = json.loads(tfile.read_text())["wall_s_compress"] if tfile.exists() else q.get(name, {}).get("apply_seconds")
        pfile = out / f"peer-time-{pr['scheme']}.json"  # a clean re-timing of the peer's oneshot, if taken
        t_peer = json.loads(pfile.read_text())["wall_s_compress"] if pfile.exists() else pr.get("wall_s_compress")
        rows.append(f"| {pr['scheme']} | {pr['actorder']} | {name} | {_fmt(ours, '.3f')} | {pr['ppl_quant']:.3f} | "
                    f"{_fmt(ours / pr['ppl_quant'] if ours else None, '.4f')} | {_fmt(t_ours, '.0f')} | {_fmt(t_peer, '.0f')} | "
                    f"{_fmt(t_ours / t_peer if t_ours and t_peer else None, '.2f')} |")
    v = peer[0].get("versions", {})
    fp = next((p["ppl_fp32"] for p in peer if p.get("ppl_fp32")), None)
    return (f"Peer comparison: llm-compressor {v.get('llmcompressor')} (transformers {v.get('transformers')}, own venv), GPTQ "
            f"dampening 0.01, block 128, lm_head ignored, the same calibration ids and evaluation windows "
            f"(its fp32 perplexity on them: {_fmt(fp, '.4f')}).\n\n" + "\n".join(rows))


def _table(a) -> str:
    out = Path(a.out_dir)
    q, s = _runs(out, "quality"), _runs(out, "speed")
    peer = [json.loads(p.read_text()) for p in sorted(out.glob("peer-*.json")) if not p.name.startswith("peer-time-")]
    base_s = s.get("baseline", {}).get("metrics", {})
    names = list(q) + [n for n in s if n not in q]
    lines = [
        "| recipe | perplexity | ppl_increase | top1_agreement | weight_bytes (MB) | linears bytes vs fp32 | decode tok/s (min–max) | speedup | roofline_fraction | compress s | kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        qm = q.get(n, {}).get("metrics", {})
        sr = s.get(n, {})
        sm, sd = sr.get("metrics", {}), sr.get("details", {})
        steps = sr.get("flags", {}) or q.get(n, {}).get("flags", {})
        tps = sm.get("decode_tokens_per_s")
        spread = f" ({_fmt(sd.get('decode_tokens_per_s_min'), '.1f')}–{_fmt(sd.get('decode_tokens_per_s_max'), '.1f')})" if tps else ""
        lin = sd.get("linear_bytes_ratio")
        lines.append(
            f"| {n} | {_fmt(qm.get('perplexity'), '.3f')} | {_fmt(qm.get('ppl_increase'), '+.2%') if n != 'baseline' else '–'} | "
            f"{_fmt(qm.get('top1_agreement'), '.4f')} | {_fmt(sm.get('weight_bytes') and sm['weight_bytes'] / 1e6, '.1f')} | "
            f"{_fmt(lin, '.3f')} | {_fmt(tps, '.2f')}{spread} | "
            f"{_fmt(tps / base_s['decode_tokens_per_s'] if tps and base_s.get('decode_tokens_per_s') else None, '.2f')} | "
            f"{_fmt(sm.get('roofline_fraction'), '.3f')} | {_fmt(q.get(n, sr).get('apply_seconds'), '.0f')} | "
            f"{'simulated' if steps.get('simulated') else 'real'}: {_short_kernel(steps.get('kernel', '–'))} |"
        )
    any_q = next(iter(q.values()), None)
    any_s = next(iter(s.values()), None)
    head = []
    if any_q:
        p, env = any_q["_protocol"], any_q["_env"]
        cal = next((r.get("calibration") for r in q.values() if r.get("calibration")), None)
        cal = f"{cal['dataset']} {cal['n']} x {cal['seqlen']} tokens (seed {cal['seed']})" if cal else "none needed"
        fid = next((r["details"]["fidelity_tokens"] for r in q.values() if r["details"].get("fidelity_tokens")), None)
        head.append(f"Quality: WikiText-2 {p['split']}, {any_q['metrics'].get('eval_tokens')} scored tokens, seqlen {p['seqlen']}; "
                    f"top1_agreement on the first {fid} of them; calibration {cal}; threads "
                    f"{'/'.join(sorted({str(r['_env'].get('threads')) for r in q.values()}))} (per batch). "
                    "Caveat: the packaged SmolLM2 baseline was published as 4-bit GGUF (Q4_1, blocks of 32), so its fp32 "
                    "weights already sit on a 4-bit grid; group 32 would look falsely lossless, hence per-channel, group 64 and 3-bit.")
    if any_s:
        p, env = any_s["_protocol"], any_s["_env"]
        head.append(f"Speed: one run, batch {p['batch']}, prompt {p['prompt']}, {p['gen']} decode steps × {p['repeats']} repeats after "
                    f"{p['warmup']} warm-up, {env.get('threads')} threads, load average before/after "
                    f"{env.get('load_average_before')} / {env.get('load_average_after')}.")
    if peer:
        head.append(_peer_table(out, q, peer))
    from leanfm.kernels.backends import BACKENDS

    legend = "Kernels: " + "; ".join(f"`{n}` = {b.kernel}" for n, b in BACKENDS.items()) + "."
    return "\n\n".join(head + ["\n".join(lines), legend])


def add_common_args(ap: argparse.ArgumentParser, out_dir: str, section: str) -> None:
    """Options shared by the benchmark scripts built on these phases (quantization, pruning)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=None, help="comma-separated recipe names or YAML paths")
    ap.add_argument("--reuse-baseline", default=None, help="TAG of an earlier quality batch whose baseline run to reuse")
    ap.add_argument("--tag", default="a", help="name of this quality batch (results in OUT/quality-TAG)")
    ap.add_argument("--out-dir", default=out_dir)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--fidelity-tokens", type=int, default=16384)
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--write", default=None, help=f"markdown file to update (section {section}-<model>)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["quality", "speed", "peer-data", "compress-time", "table"], required=True)
    add_common_args(ap, "runs/bench-quant", "quantization")
    a = ap.parse_args()
    if a.phase == "quality":
        _quality(a)
    elif a.phase == "speed":
        _speed(a)
    elif a.phase == "peer-data":
        _peer_data(a)
    elif a.phase == "compress-time":
        _compress_time(a)
    else:
        body = _table(a)
        print(body)
        if a.write:
            cmd = "python benchmarks/quantization.py --phase table --write " + a.write
            write_section(a.write, f"quantization-{a.model}", f"Command: `{cmd}` (after the quality/speed/peer phases)\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
