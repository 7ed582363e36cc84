"""Speed of the diffusers-pipeline methods on the Stable Diffusion 1.5 architecture (issue 19), random weights.

    python benchmarks/diffusers_speed.py [--size 256] [--steps 10] [--repeats 3] [--threads 2]
        [--settings baseline,deepcache2,tome-unet50] [--out runs/diffusers-speed]

No pretrained text-to-image weights are installable here, so this measures *speed only*, on
the real architecture: ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel`` with
Stable Diffusion 1.5's configurations (860M + 84M + 123M parameters), weights drawn at random
(seed 0; identical for every setting), a character-level tokenizer (the text encoder's cost does
not depend on its vocabulary), DDIM, guidance 7.5 (the UNet runs on 2 latents per sample). Each
setting is a fresh pipeline with one leanfm recipe applied (``leanfm.apply_``), sampled by the
pipeline's own call as ``leanfm bench`` does (``PipelineModel.generate``). Timing: one sample
per call (seed 0), settings interleaved (A B C, A B C ...), one warm-up round and ``--repeats``
recorded ones; seconds per sample median (min-max) and the ratio to the first setting in the
same round; beside it, the seconds per sample ``leanfm predict`` gives for the same pipeline
(``predict_pipeline`` on ``local``, with this machine's calibration if there is one) and its
error. Fidelity numbers on random weights say nothing about image quality, so none are printed. Writes ``<out>/diffusers_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import string
import tempfile
import time
from pathlib import Path


def sd15_pipeline(size: int, tok_dir: Path):
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's UNet
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=size,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet.eval(), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="baseline,deepcache2,tome-unet50")
    ap.add_argument("--out", default="runs/diffusers-speed")
    a = ap.parse_args()

    import torch

    import leanfm
    from leanfm.models.pipeline import PipelineModel

    torch.set_num_threads(a.threads)
    names = a.settings.split(",")
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            m = PipelineModel(sd15_pipeline(a.size, Path(tmp) / "tok"))
            m.leanfm_info = {"family": "diffusion-pipeline", "steps": []}
            leanfm.apply_(m, n)
            models[n] = m
    params = sum(p.numel() for p in models[names[0]].unet.parameters())
    from leanfm.predict.hardware import load_hardware
    from leanfm.predict.pipeline import predict_pipeline

    hw = load_hardware("local", threads=a.threads)  # calibrated if `leanfm predict --calibrate` ran
    predicted = {n: predict_pipeline(m, hw, batch=1, steps=a.steps)["ms_per_sample"] / 1e3 for n, m in models.items()}
    secs = {n: [] for n in names}
    ratios = {n: [] for n in names}
    for rnd in range(a.repeats + 1):
        t_round = {}
        for n, m in models.items():
            t0 = time.perf_counter()
            m.generate([0], a.steps)
            t_round[n] = time.perf_counter() - t0
        if rnd == 0:
            continue  # warm-up round
        for n in names:
            secs[n].append(t_round[n])
            ratios[n].append(t_round[names[0]] / t_round[n])
        print(f"round {rnd}: " + ", ".join(f"{n} {t_round[n]:.2f} s" for n in names), flush=True)
    rows = {n: {"s_per_sample": statistics.median(secs[n]), "min": min(secs[n]), "max": max(secs[n]),
                "speedup": statistics.median(ratios[n]), "speedup_min": min(ratios[n]), "speedup_max": max(ratios[n]),
                "kernel": models[n].leanfm_info["steps"][-1]["kernel"] if models[n].leanfm_info["steps"] else "fp32",
                "predicted_s_per_sample": predicted[n]}
            for n in names}
    print(f"\nSD 1.5 architecture, random weights ({params / 1e6:.0f}M UNet parameters), {a.size}x{a.size}, {a.steps} DDIM "
          f"steps, guidance 7.5, 1 sample per call, {a.threads} threads, {a.repeats} rounds")
    cal = hw.get("calibration", {}).get("date", "not calibrated: nominal rates")
    print(f"predicted: leanfm's pipeline roofline on 'local' ({cal})")
    print(f"{'setting':<14} {'s/sample':>10} {'(min-max)':>16} {'speedup':>8} {'(min-max)':>14} {'predicted':>10} {'error':>7}")
    for n, r in rows.items():
        err = r["predicted_s_per_sample"] / r["s_per_sample"] - 1
        print(f"{n:<14} {r['s_per_sample']:>10.2f} {r['min']:>7.2f}-{r['max']:<8.2f} {r['speedup']:>7.2f}x "
              f"{r['speedup_min']:>6.2f}-{r['speedup_max']:<6.2f} {r['predicted_s_per_sample']:>9.2f}s {err:>+7.1%}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diffusers_speed.json").write_text(json.dumps({"args": vars(a), "unet_params": params, "rows": rows,
                                                          "seconds": secs}, indent=1))


if __name__ == "__main__":
    main()
