#!/usr/bin/env python
"""Peer check (issue 6): leanfm's roofline figures for Llama-2-7B on an A100 next to LLM-Viewer's.

    python benchmarks/peer_llm_viewer.py [--batch 1] [--seqlen 1024] [--write docs/benchmarks.md]

LLM-Viewer (hahnyuan/LLM-Viewer, "LLM Inference Unveiled: Survey and Roofline Model Insights",
Yuan et al. 2024) is not installed (it needs transformers' AutoConfig and the hub). Its formulas
are re-implemented below from the source at commit

    472f71f1a1807e80b573252e9185fd5e8d795e95  (2024-07-30, "fix bug in compute flashattntion kv load data")

with every formula tied to the file and lines it comes from. Setting, as LLM-Viewer's defaults
(``analyze(seqlen, batchsize, w_bit=16, a_bit=16, kv_bit=None)``, kv_bit -> a_bit, no
FlashAttention; same defaults in analyze_cli.py and the web front end): batch 1, 16-bit weights,
activations and KV cache; its ``prefill`` stage is a forward over ``seqlen`` tokens, its
``decode`` stage one new token over ``seqlen`` cached keys. leanfm: the ``baseline`` recipe on
the ``a100`` profile (a100-80gb, bf16), public ``predict()``: the prefill from
``predict(prompt=seqlen, gen=1)``, the decode step from ``predict(prompt=seqlen - 1, gen=1)``,
whose step context ``prompt + (gen + 1) / 2`` is exactly ``seqlen`` keys.

Per-layer tables compare one decoder layer (both tools price all 32 identically) against
LLM-Viewer's ``nvidia_A100_80G`` entry (same 2039 GB/s as leanfm's profile, so time ratios show
method differences only); the totals also give LLM-Viewer's plain ``nvidia_A100`` entry, which is
the 40GB card (1555 GB/s). Ratios are leanfm / LLM-Viewer. Pure arithmetic: no model is loaded.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mdsection import write_section  # noqa: E402

LLM_VIEWER_COMMIT = "472f71f1a1807e80b573252e9185fd5e8d795e95"

# configs/Llama.py at that commit reads these from the HF config (get_hidden_size, ...); the
# values are meta-llama/Llama-2-7b-hf's config.json (the same file leanfm ships as
# predict/configs/llama-2-7b.json; checked against leanfm's arch below).
LLAMA2_7B = {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008, "vocab": 32000}

# hardwares/hardware_params.py, lines 11-13: bandwidth in bytes/s, "FP16"/"INT8" in OPs/s, dense
# ("the OPS = sparse OPS/2", line 1). "nvidia_A100" is commented "use 40G data" (line 11).
LV_HARDWARE = {
    "nvidia_A100": {"bandwidth": 1555e9, "FP16": 312e12, "INT8": 624e12, "onchip_buffer": 27648e3},
    "nvidia_A100_80G": {"bandwidth": 2039e9, "FP16": 312e12, "INT8": 624e12, "onchip_buffer": 27648e3},
}


# ----------------------------------------------------------------------------------------------
# LLM-Viewer's method, re-implemented (not copied) from model_analyzer.py / roofline_model.py /
# configs/Llama.py at LLM_VIEWER_COMMIT.
# ----------------------------------------------------------------------------------------------

def lv_roofline(hw: dict, ops: float, access: float, w_bit: int, a_bit: int, kv_bit: int) -> dict:
    """roofline_model.py lines 1-19 (roofline_analyze) + model_analyzer.py lines 68-71 and 478-485.

    Peak is hw["INT8"] only when w, a and kv bits are all <= 8, else hw["FP16"] (lines 480-483).
    intensity = OPs / memory_access; memory-bound if intensity < peak / bandwidth, then
    performance = intensity x bandwidth, else performance = peak; time = OPs / performance
    (line 71). That is max(OPs / peak, bytes / bandwidth): no efficiency factor, no overhead."""
    peak = hw["INT8"] if (w_bit <= 8 and a_bit <= 8 and kv_bit <= 8) else hw["FP16"]
    ai = ops / access
    if ai < peak / hw["bandwidth"]:
        bound, perf = "memory", ai * hw["bandwidth"]
    else:
        bound, perf = "compute", peak
    return {"ai": ai, "bound": bound, "time_s": ops / perf}


def lv_analyze(m: dict, hw: dict, seqlen: int, batch: int, w_bit: int = 16, a_bit: int = 16,
               kv_bit: int | None = None, flash: bool = False) -> dict:
    """model_analyzer.py ModelAnalyzer.analyze (lines 118-468) for a Llama config.

    Returns {"prefill": {op: row}, "decode": {op: row}, "total": {stage: {...}}}; rows are for
    ONE decoder layer, except lm_head (once per model)."""
    kv_bit = a_bit if kv_bit is None else kv_bit  # lines 178-179
    wb, ab, kb = w_bit / 8, a_bit / 8, kv_bit / 8  # lines 186-188
    h, heads, kvh, inter = m["hidden"], m["heads"], m["kv_heads"], m["intermediate"]
    hd = h // heads  # line 224: head_size = hidden_size // num_attention_heads
    res: dict = {"prefill": {}, "decode": {}}

    def put(stage, name, ops, load_weight=0.0, load_act=0.0, store_act=0.0, load_kv=0.0, store_kv=0.0):
        # _analyze_to_results, lines 56-84: memory_access is the plain sum of the five terms
        access = load_weight + load_act + store_act + load_kv + store_kv
        row = {"ops": ops, "bytes": access, "load_weight": load_weight, "load_act": load_act, "store_act": store_act,
               "load_kv_cache": load_kv, "store_kv_cache": store_kv}
        row.update(lv_roofline(hw, ops, access, w_bit, a_bit, kv_bit))
        res[stage][name] = row

    # Linear layers: configs/Llama.py get_linear_layers (lines 40-53): q/out [h, h], k/v
    # [h, h x kv_heads / heads], gate/up [h, inter], down [inter, h]. model_analyzer.py lines
    # 197-221: OPs = 2 x ic x oc x tokens (multiply-add = 2); weights once; input read; output
    # written as store_act, except k_proj/v_proj whose output is counted as store_kv_cache.
    linears = {"q_proj": (h, h), "k_proj": (h, h * kvh / heads), "v_proj": (h, h * kvh / heads), "out_proj": (h, h),
               "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    for stage, tok in (("decode", batch), ("prefill", batch * seqlen)):
        for name, (ic, oc) in linears.items():
            kv = name in ("k_proj", "v_proj")
            put(stage, name, ic * oc * tok * 2, load_weight=ic * oc * wb, load_act=ic * tok * ab,
                store_act=0 if kv else oc * tok * ab, store_kv=oc * tok * kb if kv else 0)

    # Decode attention, lines 225-289: ONE query over `seqlen` keys, no causal discount.
    # qk: 2 x seqlen x head x heads x batch OPs; reads q (head x heads) and K of seqlen tokens
    # (load_kv_cache uses num_key_value_heads); writes the score row (seqlen x heads) to memory.
    # sv: same OPs; reads the scores and V of seqlen tokens; writes head x heads.
    # softmax: 5 OPs per score (max, sub, exp, sum, div; comment lines 228-233), reads and writes
    # the scores.
    qk = seqlen * hd * heads * batch * 2
    sm = batch * heads * seqlen * 5
    if flash:
        # lines 235-252 (FlashAttention-2 branch, off by default): block_r = min(ceil(buffer /
        # (kv_byte x head)), head); K and V read n_blocks_r times over num_attention_heads;
        # store_act = 2 x o_numel with o_numel = seqlen x batch x heads x a_byte (a score-row
        # size, not the output's head x heads; kept as written).
        br = min(math.ceil(hw["onchip_buffer"] / (kb * hd)), hd)
        nbr = math.ceil(1 / br)
        put("decode", "fused_attention", qk * 2 + sm, load_act=hd * batch * heads * ab,
            store_act=2 * seqlen * batch * heads * ab, load_kv=nbr * seqlen * hd * batch * heads * kb * 2)
    else:
        put("decode", "qk_matmul", qk, load_act=hd * batch * heads * ab, store_act=seqlen * batch * heads * ab,
            load_kv=seqlen * hd * batch * kvh * kb)
        put("decode", "softmax", sm, load_act=batch * heads * seqlen * ab, store_act=batch * heads * seqlen * ab)
        put("decode", "sv_matmul", qk, load_act=seqlen * batch * heads * ab, store_act=hd * batch * heads * ab,
            load_kv=seqlen * hd * batch * kvh * kb)

    # Prefill attention, lines 327-382: seqlen queries x seqlen keys (full square, no causal
    # halving). qk reads Q as seqlen x head x batch x num_key_value_heads (line 356; equal to
    # heads for Llama-2-7B), K from the cache, and writes the seqlen^2 x heads score matrix;
    # softmax reads and writes it; sv reads it and V, writes seqlen x head x heads.
    qk = seqlen * seqlen * hd * heads * batch * 2
    sm = batch * heads * seqlen * seqlen * 5
    if flash:
        # lines 331-348: as the decode branch with n_blocks_r = ceil(seqlen / block_r) and
        # o_numel = seqlen^2 x batch x heads x a_byte (the score-matrix size), stored twice.
        br = min(math.ceil(hw["onchip_buffer"] / (kb * hd)), hd)
        nbr = math.ceil(seqlen / br)
        put("prefill", "fused_attention", qk * 2 + sm, load_act=seqlen * hd * batch * heads * ab,
            store_act=2 * seqlen * seqlen * batch * heads * ab, load_kv=nbr * seqlen * hd * batch * heads * kb * 2)
    else:
        put("prefill", "qk_matmul", qk, load_act=seqlen * hd * batch * kvh * ab,
            store_act=seqlen * seqlen * batch * heads * ab, load_kv=seqlen * hd * batch * kvh * kb)
        put("prefill", "softmax", sm, load_act=batch * heads * seqlen * seqlen * ab,
            store_act=batch * heads * seqlen * seqlen * ab)
        put("prefill", "sv_matmul", qk, load_act=seqlen * seqlen * batch * heads * ab,
            store_act=seqlen * hd * batch * heads * ab, load_kv=seqlen * hd * batch * kvh * kb)

    for stage, tok in (("decode", batch), ("prefill", batch * seqlen)):
        # Norms (configs/Llama.py lines 13-14: attn_norm, mlp_norm; model_analyzer.py lines
        # 291-302 / 383-393): 7 OPs per element ("sum sub pow sum div mul add"), activation read
        # and written, the norm's weight vector NOT loaded.
        for name in ("attn_norm", "mlp_norm"):
            put(stage, name, tok * h * 7, load_act=tok * h * ab, store_act=tok * h * ab)
        # Residual adds (lines 304-314 / 394-404): 1 OP per element; reads ONE operand of
        # hidden, writes hidden.
        for name in ("attn_add", "mlp_add"):
            put(stage, name, tok * h, load_act=tok * h * ab, store_act=tok * h * ab)
        # SiLU(gate) x up (lines 315-325 / 405-415): 2 OPs per element over hidden_size (not
        # intermediate_size, as written), reads two operands, writes one.
        put(stage, "mlp_act", tok * h * 2, load_act=tok * h * ab * 2, store_act=tok * h * ab)

    # Weight footprint, lines 428-434: the prefill load_weight total, taken BEFORE lm_head is
    # added (line 444 on): decoder-layer linears only (no embedding, no lm_head, no norms).
    weights_held = sum(r["load_weight"] for r in res["prefill"].values()) * m["layers"]

    # lm_head, configs/Llama.py post_process lines 25-38 (called at model_analyzer.py 444-451),
    # same row for both stages: OPs = batch x hidden x vocab x 1 (multiply-add = 1, unlike the
    # linears), weights once, reads hidden x a_byte and writes vocab x a_byte (not x batch).
    for stage in ("prefill", "decode"):
        put(stage, "lm_head", batch * h * m["vocab"], load_weight=h * m["vocab"] * wb, load_act=h * ab,
            store_act=m["vocab"] * ab)

    # Totals, lines 417-425 and 449-451: every per-layer row x num_hidden_layers, plus lm_head
    # once. No final norm, no embedding lookup, no fixed overhead.
    res["total"] = {}
    for stage in ("prefill", "decode"):
        t = {"ops": 0.0, "bytes": 0.0, "time_s": 0.0}
        for name, r in res[stage].items():
            n = 1 if name == "lm_head" else m["layers"]
            for k in t:
                t[k] += r[k] * n
        t["weights_held"] = weights_held
        res["total"][stage] = t
    return res


def check_against(checkout: str) -> str:
    """Run the real LLM-Viewer (a checkout of LLM_VIEWER_COMMIT, e.g. ``git clone`` +
    ``git checkout``; needs ``transformers`` importable, which leanfm's venv has) on the same
    shapes and assert that this re-implementation gives the same OPs, memory access, intensity,
    bound and time for every row and total, with and without FlashAttention, on both A100
    entries, at (seqlen 1024, batch 1) and (777, 3). The hub is not contacted: AutoConfig is
    replaced by the LLAMA2_7B shapes."""
    import contextlib
    import importlib
    import io
    import types

    root = str(Path(checkout).resolve())
    sys.path.insert(0, root)
    try:
        ma = importlib.import_module("model_analyzer")
        cfg = types.SimpleNamespace(hidden_size=LLAMA2_7B["hidden"], num_hidden_layers=LLAMA2_7B["layers"],
                                    num_attention_heads=LLAMA2_7B["heads"], num_key_value_heads=LLAMA2_7B["kv_heads"],
                                    intermediate_size=LLAMA2_7B["intermediate"], vocab_size=LLAMA2_7B["vocab"])
        ma.AutoConfig = types.SimpleNamespace(from_pretrained=lambda *a, **k: cfg)
        n = 0
        for hw in LV_HARDWARE:
            for flash in (False, True):
                for seqlen, batch in ((1024, 1), (777, 3)):
                    with contextlib.redirect_stdout(io.StringIO()):  # it prints "use config file ..."
                        ref = ma.ModelAnalyzer("meta-llama/Llama-2-7b-hf", hw, "configs/Llama.py").analyze(
                            seqlen, batch, use_flashattention=flash)
                    mine = lv_analyze(LLAMA2_7B, LV_HARDWARE[hw], seqlen, batch, flash=flash)
                    for st in ("prefill", "decode"):
                        assert set(ref[st]) == set(mine[st]), (hw, flash, st, set(ref[st]) ^ set(mine[st]))
                        pairs = [(ref[st][k], mine[st][k]) for k in ref[st]] + [(ref["total_results"][st], mine["total"][st])]
                        for r, x in pairs:
                            for a, b in (("OPs", "ops"), ("memory_access", "bytes"), ("inference_time", "time_s"),
                                         ("arithmetic_intensity", "ai"), ("bound", "bound"),
                                         ("memory_consumption_weight", "weights_held")):
                                if a in r and b in x:
                                    ok = r[a] == x[b] if b == "bound" else math.isclose(r[a], x[b], rel_tol=1e-12)
                                    assert ok, (hw, flash, seqlen, batch, st, a, r[a], x[b])
                                    n += 1
    finally:
        sys.path.remove(root)
    return f"re-implementation checked against LLM-Viewer at {checkout}: {n} figures equal"


# ----------------------------------------------------------------------------------------------
# leanfm's side (public API) and the comparison.
# ----------------------------------------------------------------------------------------------

# LLM-Viewer row -> leanfm row (None: the other tool has no such op)
PAIRS = {
    "prefill": [("attn_norm", "input_norm"), ("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                ("qk_matmul", "attn_qk"), ("softmax", None), ("sv_matmul", "attn_av"), ("out_proj", "o_proj"),
                ("attn_add", None), ("mlp_norm", "post_attention_norm"), ("gate_proj", "gate_proj"), ("up_proj", "up_proj"),
                ("mlp_act", None), ("down_proj", "down_proj"), ("mlp_add", None)],
}
PAIRS["decode"] = PAIRS["prefill"]
HEAD_PAIRS = [(None, "final_norm"), ("lm_head", "lm_head")]


def leanfm_side(model: str, hardware: str, batch: int, seqlen: int) -> dict:
    from leanfm.predict.analyzer import predict

    pre = predict(model, "baseline", hardware, batch=batch, prompt=seqlen, gen=1)
    dec = predict(model, "baseline", hardware, batch=batch, prompt=seqlen - 1, gen=1)
    assert dec["context"] == seqlen, dec["context"]
    a = pre["architecture"]
    mine = {"hidden": a["hidden"], "layers": a["layers"], "heads": a["heads"], "kv_heads": a["kv_heads"],
            "intermediate": a["intermediate"], "vocab": a["vocab"]}
    assert mine == LLAMA2_7B, mine
    out = {"hardware": pre["hardware"], "dtype": pre["dtype"], "context": dec["context"]}
    held = pre["weight_bytes"]
    for stage, r in (("prefill", pre), ("decode", dec)):
        rows = r["per_layer"][stage]
        layer = {x["op"]: x for x in rows if x["layers"] != "head"}
        assert len({x["layers"] for x in rows if x["layers"] != "head"}) == 1  # all 32 layers priced alike
        head = {x["op"]: x for x in rows if x["layers"] == "head"}
        ops = sum(x["flops"] * x["count"] for x in rows)  # norms included (predict's *_flops leave them out)
        byt = sum(x["bytes"] * x["count"] for x in rows)
        ms = r["prefill_ms"] if stage == "prefill" else r["decode_step_ms"]
        out[stage] = {"layer": layer, "head": head, "ops": ops, "bytes": byt, "time_s": ms / 1e3, "weights_held": held,
                      "matmul_flops": r["prefill_flops"] if stage == "prefill" else r["flops_per_token"] * batch}
    return out


def _ratio(a, b) -> str:
    if a is None or b is None:
        return "–"
    return f"{a / b:.3f}" if b else "∞"


def _g(x, scale, fmt="{:.4g}"):
    return "–" if x is None else fmt.format(x / scale)


def stage_table(stage: str, lv: dict, lf: dict, layers: int) -> str:
    head = ("| LLM-Viewer op | leanfm op | GOPs LV | GFLOPs lf | × | MB LV | MB lf | × | AI LV | AI lf | bound LV / lf "
            "| µs LV | µs lf | × | Δ ms (all layers) |\n|" + "---|" * 15 + "\n")
    lines = []
    for pairs, src_lv, src_lf, n in ((PAIRS[stage], lv[stage], lf[stage]["layer"], layers),
                                     (HEAD_PAIRS, lv[stage], lf[stage]["head"], 1)):
        for a, b in pairs:
            x = src_lv.get(a) if a else None
            y = src_lf.get(b) if b else None
            ops_x, ops_y = (x or {}).get("ops"), (y or {}).get("flops")
            by_x, by_y = (x or {}).get("bytes"), (y or {}).get("bytes")
            t_x = x["time_s"] * 1e6 if x else None
            t_y = y["time_ms"] * 1e3 if y else None
            ai_x = f"{x['ai']:.3g}" if x else "–"
            ai_y = f"{y['intensity']:.3g}" if y and y["intensity"] is not None else "–"
            bound = f"{x['bound'] if x else '–'} / {y['bound'] if y else '–'}"
            delta = ((t_y or 0.0) - (t_x or 0.0)) * n / 1e3
            label = f"{a}" + (" (×1)" if n == 1 and a else "") if a else "–"
            lines.append(f"| {label} | {b or '–'} | {_g(ops_x, 1e9)} | {_g(ops_y, 1e9)} | {_ratio(ops_y, ops_x)} "
                         f"| {_g(by_x, 1e6)} | {_g(by_y, 1e6)} | {_ratio(by_y, by_x)} | {ai_x} | {ai_y} "
                         f"| {bound} | {_g(t_x, 1)} | {_g(t_y, 1)} | {_ratio(t_y, t_x)} | {delta:+.3f} |")
    return head + "\n".join(lines)


def totals_table(lv40: dict, lv80: dict, lv80f: dict, lf: dict) -> str:
    rows = [("prefill time (ms)", "prefill", "time_s", 1e-3), ("decode step time (ms)", "decode", "time_s", 1e-3),
            ("prefill OPs (GOPs)", "prefill", "ops", 1e9), ("decode step OPs (GOPs)", "decode", "ops", 1e9),
            ("prefill memory traffic (GB)", "prefill", "bytes", 1e9), ("decode step memory traffic (GB)", "decode", "bytes", 1e9),
            ("weights held (GB, footprint)", "decode", "weights_held", 1e9)]
    out = ["| total | LLM-Viewer `nvidia_A100` (40GB, 1555 GB/s) | LLM-Viewer `nvidia_A100_80G` (2039 GB/s) "
           "| LLM-Viewer `nvidia_A100_80G` + `use_flashattention` | leanfm `a100` (80GB SXM, 2039 GB/s) "
           "| leanfm / LV-80G | leanfm / LV-A100 (40G) |", "|" + "---|" * 7]
    for label, st, key, sc in rows:
        v = [d["total"][st][key] for d in (lv40, lv80, lv80f)] + [lf[st][key]]
        out.append(f"| {label} | {v[0] / sc:.3f} | {v[1] / sc:.3f} | {v[2] / sc:.3f} | {v[3] / sc:.3f} "
                   f"| **{v[3] / v[1]:.3f}** | {v[3] / v[0]:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b", help="leanfm model (its shapes must equal LLAMA2_7B)")
    ap.add_argument("--hardware", default="a100", help="leanfm hardware profile")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=1024, help="prefill length = decode context (LLM-Viewer's seqlen)")
    ap.add_argument("--write", default=None, help="markdown file to update (section peer-llm-viewer)")
    ap.add_argument("--check-against", default=None, metavar="DIR",
                    help=f"an LLM-Viewer checkout at {LLM_VIEWER_COMMIT[:12]}: assert the re-implementation matches it")
    a = ap.parse_args(argv)
    checked = check_against(a.check_against) if a.check_against else None
    if checked:
        print(checked, file=sys.stderr)

    lv40 = lv_analyze(LLAMA2_7B, LV_HARDWARE["nvidia_A100"], a.seqlen, a.batch)
    lv80 = lv_analyze(LLAMA2_7B, LV_HARDWARE["nvidia_A100_80G"], a.seqlen, a.batch)
    lv80f = lv_analyze(LLAMA2_7B, LV_HARDWARE["nvidia_A100_80G"], a.seqlen, a.batch, flash=True)
    lf = leanfm_side(a.model, a.hardware, a.batch, a.seqlen)
    n = LLAMA2_7B["layers"]

    cmd = "python benchmarks/peer_llm_viewer.py" + (f" --batch {a.batch}" if a.batch != 1 else "") + \
          (f" --seqlen {a.seqlen}" if a.seqlen != 1024 else "") + (f" --write {a.write}" if a.write else "") + \
          (" --check-against <LLM-Viewer checkout>" if checked else "")
    body = [
        "## Peer check: LLM-Viewer's roofline vs leanfm predict (Llama-2-7B, A100)",
        "",
        f"Command: `{cmd}` (pure arithmetic, no model loaded). LLM-Viewer = own re-implementation of "
        f"hahnyuan/LLM-Viewer at `{LLM_VIEWER_COMMIT[:12]}` (model_analyzer.py, configs/Llama.py, roofline_model.py, "
        "hardwares/hardware_params.py), its defaults: 16-bit W/A/KV, no FlashAttention"
        + (f" ({checked.split(': ')[1]} with LLM-Viewer's own code run on the same shapes, "
           "seqlen/batch 1024/1 and 777/3, both A100 entries, with and without FlashAttention)" if checked else "")
        + ". "
        f"leanfm = `predict('{a.model}', 'baseline', '{a.hardware}')` → {lf['hardware']}, {lf['dtype']}. "
        f"Batch {a.batch}; prefill of {a.seqlen} tokens; one decode step over {a.seqlen} keys "
        f"(leanfm: `prompt={a.seqlen - 1}, gen=1`, context {lf['context']:g}). OPs/FLOPs include norms and "
        "elementwise ops where a tool prices them. Ratios are leanfm / LLM-Viewer. Differences and reasons: "
        "docs/predict.md, \"Peer check: LLM-Viewer\".",
        "",
        "### Totals",
        "",
        totals_table(lv40, lv80, lv80f, lf),
        "",
        f"leanfm matmul+attention FLOPs only (its `prefill_flops`, `flops_per_token`): prefill "
        f"{lf['prefill']['matmul_flops'] / 1e9:.1f} G, decode step {lf['decode']['matmul_flops'] / 1e9:.2f} G.",
        "",
    ]
    for stage, title in (("prefill", f"Prefill, {a.seqlen} tokens"), ("decode", f"Decode step, {a.seqlen} keys")):
        body += [f"### {title}: one decoder layer (× {n}) and the head, LLM-Viewer on `nvidia_A100_80G`", "",
                 stage_table(stage, lv80, lf, n), "",
                 f"Sum of the Δ column = leanfm − LLM-Viewer (80G) {stage} time: "
                 f"{(lf[stage]['time_s'] - lv80['total'][stage]['time_s']) * 1e3:+.3f} ms.", ""]
    text = "\n".join(body)
    print(text)
    if a.write:
        write_section(a.write, "peer-llm-viewer", text)
        print(f"\nwrote section peer-llm-viewer of {a.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
