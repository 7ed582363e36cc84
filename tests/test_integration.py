"""Integration tests on the embedded default model (smollm2-135m). Slow: minutes, not seconds."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from leanfm import cli

pytestmark = pytest.mark.integration


def _wikitext_test() -> Path:
    p = Path(os.environ.get("LEANFM_DATA_DIR", "")) / "wikitext-2" / "test.txt"
    if not p.exists():
        pytest.skip("WikiText-2 not found: set LEANFM_DATA_DIR")
    return p


def independent_perplexity(model_dir: Path, text_file: Path, seqlen: int, max_tokens: int) -> tuple[float, int]:
    """Plain transformers, no leanfm code: the GPTQ evaluation loop with the model's own loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    lines = ["" if not ln.strip() else ln for ln in text_file.read_text(encoding="utf-8").splitlines(keepends=True)]
    enc = tok("\n\n".join(lines), return_tensors="pt", add_special_tokens=False).input_ids
    n = min(enc.shape[1], max_tokens) // seqlen
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            batch = enc[:, i * seqlen:(i + 1) * seqlen]
            total += model(batch, labels=batch).loss.double().item() * (seqlen - 1)  # mean over seqlen-1 shifted targets
    return math.exp(total / (n * (seqlen - 1))), n * (seqlen - 1)


def test_bench_baseline_perplexity_matches_plain_transformers(tmp_path, capsys):
    text = _wikitext_test()
    out = tmp_path / "D"
    code = cli.main(["bench", "--model", "smollm2-135m", "--recipe", "baseline", "--dataset", "wikitext2", "--seqlen", "2048",
                     "--max-eval-tokens", "16384", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    m = res["runs"][0]["metrics"]
    from leanfm.models.cache import model_cache_dir

    ppl, n_tokens = independent_perplexity(model_cache_dir("smollm2-135m"), text, 2048, 16384)
    assert m["eval_tokens"] == n_tokens == 8 * 2047
    assert abs(m["perplexity"] / ppl - 1) < 1e-3, (m["perplexity"], ppl)
    # The full metric set of the protocol is present for the main job.
    for key in ("prefill_ms", "tpot_ms_p50", "tpot_ms_p90", "decode_tokens_per_s", "weight_bytes", "model_size_on_disk_bytes",
                "peak_rss_bytes", "kv_cache_bytes", "flops_per_token", "energy_j_per_token", "usd_per_million_tokens",
                "co2_g_per_million_tokens"):
        assert m[key] > 0, key
    assert 500e6 < m["weight_bytes"] < 560e6  # 134.5M fp32 params, tied embeddings counted once


def test_rtn_ordering_quality_and_fidelity(tmp_path):
    _wikitext_test()
    out = tmp_path / "rtn"
    code = cli.main(["bench", "--model", "smollm2-135m", "--recipe", "baseline", "--recipe", "rtn-w8", "--recipe", "rtn-w4",
                     "--recipe", "rtn-w4g64", "--metrics", "quality", "--max-eval-tokens", "8192", "--out", str(out)])
    assert code == 0
    runs = {r["recipe"]["name"]: r["metrics"] for r in json.loads((out / "results.json").read_text())["runs"]}
    base, w8, w4, w4g = runs["baseline"]["perplexity"], runs["rtn-w8"], runs["rtn-w4"], runs["rtn-w4g64"]
    assert abs(w8["perplexity"] / base - 1) < 0.01
    assert w4["perplexity"] > base and w4g["perplexity"] > base
    for lossy in (w4, w4g):  # fidelity orders the same way as perplexity
        assert w8["top1_agreement"] > lossy["top1_agreement"]
        assert w8["kl_to_baseline"] < lossy["kl_to_baseline"]
    worse, better = (w4, w4g) if w4["perplexity"] > w4g["perplexity"] else (w4g, w4)
    assert worse["kl_to_baseline"] > better["kl_to_baseline"]
    assert worse["top1_agreement"] < better["top1_agreement"]
