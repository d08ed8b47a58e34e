"""Issue 14, classes 5 and 8: no output is overwritten silently (export and merge agree), and an
exported or merged model is the trained one, or says how far from it it is (engine/rounding.py)."""
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine.export import main as export_main
from engine.lora import apply_lora, save_adapter
from engine.models import load_model_and_tokenizer
from engine.recipe import LoRAConfig, ModelConfig
from engine.rounding import RoundingLoss
from merge.__main__ import main as merge_main


# ---------------------------------------------------------------------------- the measure

def test_rounding_loss_of_a_small_update_in_bf16_and_fp32():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, generator=g)
    small = W + 1e-4 * torch.randn(256, 256, generator=g)  # |δ| far below half a bf16 ulp of |W| ~ 2^-9 |W|
    bf16, fp32 = RoundingLoss(torch.bfloat16), RoundingLoss(torch.float32)
    for loss in (bf16, fp32):
        loss.add("w", small, W)
    assert bf16.lost > 1.0 and bf16.erased_share > 0.9  # W itself rounds by more than δ: the update is gone
    assert fp32.lost == 0.0 and fp32.erased_share == 0.0  # W + δ is already an fp32 number
    big = RoundingLoss(torch.bfloat16)  # δ of W's size: the rounding costs ~2^-9 of it
    big.add("w", W + torch.randn(256, 256, generator=g), W.bfloat16().float())
    assert 1e-3 < big.lost < 1e-2 and big.erased_share < 0.01
    untouched = RoundingLoss(torch.bfloat16)
    untouched.add("w", W, W)  # δ = 0: nothing to lose, and it does not dilute the others
    assert untouched.changed == 0 and untouched.lost == 0.0


def test_erased_entries_are_exactly_those_that_leave_no_trace():
    W = torch.tensor([1.0, 1.0, 1.0, 0.001])
    delta = torch.tensor([2.0 ** -12, 2.0 ** -6, 0.0, 2.0 ** -12])  # bf16 ulp of 1.0 is 2^-7
    loss = RoundingLoss(torch.bfloat16)
    loss.add("w", W + delta, W)
    assert loss.changed == 3 and loss.erased == 1  # only the 2^-12 on 1.0 vanishes


# ---------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter of the tiny model with an update ~1e-4 of the weights: what bf16 erases."""
    out = tmp_path_factory.mktemp("adapter")
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-4)
    save_adapter(model, str(out), cfg, "builtin:tiny-llama")
    return str(out)


def test_export_default_keeps_the_update_and_says_so(adapter, tmp_path, capsys):
    out = tmp_path / "m"
    assert export_main([adapter, "--out", str(out), "--base", "original"]) == 0
    line = capsys.readouterr().out
    assert "float32 loses 0% of the update" in line
    q = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32


def test_export_lossy_dtype_is_refused_unless_allowed(adapter, tmp_path, capsys):
    out = tmp_path / "m"
    assert export_main([adapter, "--out", str(out), "--base", "original", "--out-dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out-dtype bfloat16: bfloat16 loses") and "--allow-lossy" in err
    assert err.count("\n") == 1 and not out.exists()  # refused before anything was written
    assert export_main([adapter, "--out", str(out), "--base", "original", "--out-dtype", "float16"]) == 2
    assert capsys.readouterr().err.startswith("error: --out-dtype float16: float16 loses")
    assert export_main([adapter, "--out", str(out), "--base", "original", "--out-dtype", "bfloat16",
                        "--allow-lossy"]) == 0
    assert capsys.readouterr().err.startswith("warning: --out-dtype bfloat16")
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_export_auto_uses_a_16bit_base_dtype_only_when_the_update_survives(tmp_path, capsys):
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    base = tmp_path / "bf16_base"
    model.to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    for scale, want in ((1.0, torch.bfloat16), (1e-4, torch.float32)):
        m, _ = load_model_and_tokenizer(ModelConfig(name=str(base)), torch.device("cpu"))
        cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
        apply_lora(m, cfg, seed=0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * scale)
        ad = tmp_path / f"adapter{scale}"
        save_adapter(m, str(ad), cfg, str(base))
        out = tmp_path / f"out{scale}"
        assert export_main([str(ad), "--out", str(out), "--base", "original"]) == 0
        got = load_file(str(out / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
        assert got.dtype == want, scale
        text = capsys.readouterr()
        if want == torch.float32:
            assert "the base's own bfloat16 would lose too much" in text.err


def test_export_refuses_an_existing_out_unless_overwrite(adapter, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert export_main([adapter, "--out", str(out), "--base", "original"]) == 2
    assert "already exists" in capsys.readouterr().err and os.listdir(out) == ["mine.txt"]
    # --overwrite replaces a model folder only: one holding a file of the user's is refused, naming it
    assert export_main([adapter, "--out", str(out), "--base", "original", "--overwrite"]) == 2
    assert "mine.txt" in capsys.readouterr().err and os.listdir(out) == ["mine.txt"]
    (out / "mine.txt").unlink()
    (out / "model.safetensors").write_text("an older export")
    assert export_main([adapter, "--out", str(out), "--base", "original", "--overwrite"]) == 0
    assert (out / "model.safetensors").stat().st_size > 1000
    f = tmp_path / "a_file"
    f.write_text("x")
    assert export_main([adapter, "--out", str(f), "--base", "original", "--overwrite"]) == 2
    assert "not a directory" in capsys.readouterr().err and f.read_text() == "x"


# ---------------------------------------------------------------------------- merge

def _merge_config(tmp_path, adapter, dtype):
    path = tmp_path / f"merge_{dtype}.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "builtin:tiny-llama",
                                    "models": [{"model": adapter, "parameters": {"weight": 1.0}}],
                                    "dtype": dtype}))
    return str(path)


def test_merge_lossy_dtype_is_refused_unless_allowed(adapter, tmp_path, capsys):
    out = tmp_path / "m"
    assert merge_main([_merge_config(tmp_path, adapter, "bfloat16"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dtype bfloat16: bfloat16 loses") and "dtype: float32" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".m.")]  # no leftovers
    assert merge_main([_merge_config(tmp_path, adapter, "bfloat16"), "--out", str(out), "--allow-lossy"]) == 0
    assert "warning: dtype bfloat16" in capsys.readouterr().err
    out32 = tmp_path / "m32"
    assert merge_main([_merge_config(tmp_path, adapter, "float32"), "--out", str(out32)]) == 0


def test_merge_refuses_an_existing_out_unless_overwrite(adapter, tmp_path, capsys):
    out = tmp_path / "m"
    config = _merge_config(tmp_path, adapter, "float32")
    assert merge_main([config, "--out", str(out)]) == 0
    first = load_file(str(out / "model.safetensors"))
    assert merge_main([config, "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    heavier = tmp_path / "heavier.yaml"
    heavier.write_text(open(config).read().replace("weight: 1.0", "weight: 3.0"))
    assert merge_main([str(heavier), "--out", str(out), "--overwrite"]) == 0
    second = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(first[q], second[q])  # replaced, by the new merge
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []  # no old/tmp copies left
