"""Post-training quantization benchmark: quality, size, speed and compression time per recipe.

    python benchmarks/quantization.py --phase quality --tag a --recipes baseline,rtn-w4,gptq-w4
    python benchmarks/quantization.py --phase speed               # run alone on an idle machine
    python benchmarks/quantization.py --phase peer-data           # calibration + eval ids for the peer script
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

SPEED_RECIPES = "baseline,rtn-w8,rtn-w4g64,gptq-w4g64,int4-fast"


def _quality(a) -> None:
    proto = Protocol(groups=("quality",), threads=a.threads, max_eval_tokens=a.eval_tokens, max_fidelity_tokens=a.fidelity_tokens)
    cal = calibration("gensim-wiki", a.calib_n, a.calib_seqlen)
    bench(a.model, a.recipes.split(","), proto, Path(a.out_dir) / f"quality-{a.tag}", calib=cal)


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


def _runs(out_dir: Path, kind: str) -> dict[str, dict]:
    runs = {}
    for p in sorted(out_dir.glob(f"{kind}*/results.json")):
        d = json.loads(p.read_text())
        for r in d["runs"]:
            if r.get("status") == "ok":
                runs[r["recipe"]["name"]] = {**r, "_env": d["environment"], "_protocol": d["protocol"]}
    return runs


def _fmt(v, f):
    return "–" if v is None else format(v, f)


def _table(a) -> str:
    out = Path(a.out_dir)
    q, s = _runs(out, "quality"), _runs(out, "speed")
    peer = [json.loads(p.read_text()) for p in sorted(out.glob("peer-*.json"))]
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
            f"{_fmt(tps / base_s['decode_tokens_per_s'] if tps and base_s.get('decode_tokens_per_s') else None, '.2f')}× | "
            f"{_fmt(sm.get('roofline_fraction'), '.3f')} | {_fmt(q.get(n, sr).get('apply_seconds'), '.0f')} | "
            f"{'simulated' if steps.get('simulated') else 'real'}: {steps.get('kernel', '–')} |"
        )
    any_q = next(iter(q.values()), None)
    any_s = next(iter(s.values()), None)
    head = []
    if any_q:
        p, env = any_q["_protocol"], any_q["_env"]
        cal = any_q.get("calibration") or next((r.get("calibration") for r in q.values() if r.get("calibration")), None)
        head.append(f"Quality: WikiText-2 {p['split']}, {any_q['metrics'].get('eval_tokens')} scored tokens, seqlen {p['seqlen']}; "
                    f"top1 on the first {any_q['details'].get('fidelity_tokens', 'all')} tokens; calibration {cal}; threads {env.get('threads')}.")
    if any_s:
        p, env = any_s["_protocol"], any_s["_env"]
        head.append(f"Speed: one run, batch {p['batch']}, prompt {p['prompt']}, {p['gen']} decode steps × {p['repeats']} repeats after "
                    f"{p['warmup']} warm-up, {env.get('threads')} threads, load average before/after "
                    f"{env.get('load_average_before')} / {env.get('load_average_after')}.")
    for pr in peer:
        head.append(f"Peer: llm-compressor {pr.get('versions', {}).get('llmcompressor')} GPTQ {pr['scheme']} actorder={pr['actorder']}: "
                    f"ppl {pr['ppl_quant']:.3f} (its fp32 ppl {pr['ppl_fp32'] if pr.get('ppl_fp32') else '–'}), compress {pr['wall_s_compress']:.0f} s.")
    return "\n\n".join(head + ["\n".join(lines)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", choices=["quality", "speed", "peer-data", "table"], required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default=None, help="comma-separated recipe names")
    ap.add_argument("--tag", default="a", help="name of this quality batch (results in OUT/quality-TAG)")
    ap.add_argument("--out-dir", default="runs/bench-quant")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--fidelity-tokens", type=int, default=16384)
    ap.add_argument("--calib-n", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--write", default=None, help="markdown file to update (section quantization-<model>)")
    a = ap.parse_args()
    if a.phase == "quality":
        _quality(a)
    elif a.phase == "speed":
        _speed(a)
    elif a.phase == "peer-data":
        _peer_data(a)
    else:
        body = _table(a)
        print(body)
        if a.write:
            cmd = "python benchmarks/quantization.py --phase table --write " + a.write
            write_section(a.write, f"quantization-{a.model}", f"Command: `{cmd}` (after the quality/speed/peer phases)\n\n{body}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
