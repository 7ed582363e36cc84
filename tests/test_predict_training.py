"""The training what-if (leanfm.predict.training): its activation coefficients re-counted with
torch's saved-tensor hooks on shapes the fit did not use, and the ordering of the methods."""
from __future__ import annotations

import pytest
import torch

from leanfm.config import config_from_dict
from leanfm.predict.arch import arch_from_config, load_arch
from leanfm.predict.training import ACT_ADAPTER, ACT_FULL, _act_floats, adapter_params, plan_training

from .conftest import tiny_llama


def _saved_floats_per_token(model, ids) -> float:
    """Bytes the forward pass saves for backward (parameters excluded), per token, as floats."""
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, use_cache=False)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params) / ids.numel() / 4


@pytest.mark.parametrize("shape", [dict(hidden=80, layers=3, heads=5, kv_heads=1, inter=200),
                                   dict(hidden=160, layers=2, heads=10, kv_heads=5, inter=320)])
@pytest.mark.parametrize("rank", [None, 6])
def test_activation_coefficients_match_what_torch_saves(shape, rank):
    from leanfm.methods.tune.adapters import add_lora

    torch.manual_seed(0)
    model = tiny_llama(vocab=300, **shape).train()
    arch = arch_from_config(model.config.to_dict(), "tiny", "test")
    spec = None
    if rank:
        for p in model.parameters():
            p.requires_grad_(False)
        spec = {"rank": rank, "lora_alpha": 8.0, "dropout": 0.0, "targets": ["all-linear"], "dora": False}
        model = add_lora(model, spec)
    got = _saved_floats_per_token(model, torch.randint(3, 300, (2, 24)))
    want = _act_floats(arch, ACT_ADAPTER if rank else ACT_FULL, arch.layers, spec)
    assert want == pytest.approx(got, rel=0.03)


def test_methods_order_as_their_memory_should():
    arch = load_arch("smollm2-135m")
    peak = {m: plan_training(arch, config_from_dict({"method": m, **extra}), batch=4, seqlen=256).peak
            for m, extra in [("full", {}), ("lora", {}), ("qlora", {}), ("mezo", {}), ("kd", {})]}
    ckpt = plan_training(arch, config_from_dict({"method": "full", "checkpointing": True}), batch=4, seqlen=256).peak
    assert peak["qlora"] < peak["lora"] < peak["full"] and ckpt < peak["full"]
    assert peak["mezo"] < peak["lora"] and peak["kd"] > peak["full"]


def test_adapter_parameters_equal_peft_count():
    from leanfm.methods.tune.adapters import add_lora

    model = tiny_llama(vocab=300, hidden=64, layers=2, heads=4, kv_heads=2, inter=128)
    arch = arch_from_config(model.config.to_dict(), "tiny", "test")
    for p in model.parameters():
        p.requires_grad_(False)
    for dora in (False, True):
        spec = {"rank": 4, "lora_alpha": 8.0, "dropout": 0.0, "targets": ["q_proj", "down_proj"], "dora": dora}
        pm = add_lora(tiny_llama(vocab=300, hidden=64, layers=2, heads=4, kv_heads=2, inter=128).requires_grad_(False), spec)
        assert adapter_params(arch, spec) == pm.get_nb_trainable_parameters()[0]


def test_time_per_step_from_the_profile():
    from leanfm.predict.hardware import load_hardware

    arch = load_arch("smollm2-135m")
    cfg = config_from_dict({"method": "full"})
    slow = plan_training(arch, cfg, hardware=load_hardware("local"))
    fast = plan_training(arch, cfg, hardware=load_hardware("h100"))
    assert slow.step_seconds > 100 * fast.step_seconds > 0
    assert "training plan (full): peak" in slow.describe()


def test_predict_tune_cli(capsys):
    from leanfm import cli

    assert cli.main(["predict", "--model", "llama-2-7b", "--hardware", "h100", "--tune", "full,batch=8,seqlen=2048"]) == 0
    out = capsys.readouterr().out
    assert "training plan (full): peak" in out and "does not fit in the 80 GB" in out and "checkpointing=true" in out
    assert cli.main(["predict", "--model", "smollm2-135m", "--tune", "qlora,rank=8,checkpointing=true"]) == 0
    assert "fits in the" in capsys.readouterr().out


@pytest.mark.parametrize("step,needle", [("lora,rank", "'rank' is not field=value"), ("rtn", "not a fine-tuning method"),
                                         ("lora,rank=0", "rank=0 must be"), ("lora,bogus=1", "bogus")])
def test_predict_tune_bad_step_is_one_line(capsys, step, needle):
    from leanfm import cli

    assert cli.main(["predict", "--model", "smollm2-135m", "--tune", step]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
