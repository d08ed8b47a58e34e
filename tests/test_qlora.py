"""engine.qlora: the NF4 layers against a dequantize-then-LoRA reference, the memory they keep for
backward, QLoRA in the training loop (loss, adapter, resume), the paged-optimizer error, and export."""
import copy
import os
import shutil
import subprocess
import sys

import peft
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import engine.qlora as qlora
from engine.export import main as export_main, merged_model
from paft_kernels.nf4 import dequantize_nf4
from paft_kernels.nf4_quant import quantize_nf4
from engine.log import read_metrics
from engine.lora import (LoRALinear, disable_adapters, load_adapter, lora_parameters, merge_lora,
                         save_adapter)
from engine.models import load_model_and_tokenizer
from engine.qlora import NF4Linear, QLoRALinear, apply_qlora, base_memory_report
from engine.recipe import LoRAConfig, ModelConfig, RecipeError, load_recipe
from engine.train import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny_sft.yaml")
IN, OUT, R = 96, 40, 4  # in = 1.5 blocks of 64 per row: blocks straddle rows, as they do in real weights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def layer_pair(bias: bool, double_quant: bool):
    """A QLoRALinear with a nonzero B, and the reference: LoRALinear over nn.Linear(W = dequant(NF4))."""
    torch.manual_seed(0)
    linear = nn.Linear(IN, OUT, bias=bias)
    ours = QLoRALinear(copy.deepcopy(linear), r=R, alpha=8, double_quant=double_quant)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
    base = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        base.weight.copy_(dequantize_nf4(ours.base_layer.weight, dtype=torch.float32))
        if bias:
            base.bias.copy_(linear.bias)
    ref = LoRALinear(base, r=R, alpha=8)
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    for p in (*base.parameters(), *ours.base_layer.parameters()):
        p.requires_grad_(False)
    return ours, ref, linear


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_and_gradients_match_dequantized_reference(bias, double_quant):
    ours, ref, linear = layer_pair(bias, double_quant)
    x = torch.randn(3, 5, IN)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(3, 5, OUT)
    y1, y2 = ours(x1), ref(x2)
    (y1 * dy).sum().backward()
    (y2 * dy).sum().backward()
    assert rel_err(y1, y2) < 1e-5
    assert rel_err(x1.grad, x2.grad) < 1e-5
    assert rel_err(ours.lora_A.weight.grad, ref.lora_A.weight.grad) < 1e-5
    assert rel_err(ours.lora_B.weight.grad, ref.lora_B.weight.grad) < 1e-5
    # The base really is 4-bit (not the original weight), and it gets no gradient.
    assert 1e-3 < rel_err(ref.base_layer.weight, linear.weight) < 0.2
    assert ours.base_layer.bias is None or ours.base_layer.bias.grad is None
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def saved_tensors(layer, x):
    """(shape, dtype) of every tensor autograd saves for backward during layer(x)."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    return saved, y


def test_backward_keeps_no_dequantized_weight(monkeypatch):
    ours, ref, _ = layer_pair(bias=True, double_quant=True)
    x = torch.randn(3, 5, IN, requires_grad=True)
    weight_sized = lambda saved: [s for s in saved if sorted(s[0]) == sorted((OUT, IN))]  # W or Wᵀ  # noqa: E731
    # The hook catches a saved weight: the plain layer keeps W (as the view Wᵀ) for dx = dy W ...
    saved_ref, _ = saved_tensors(ref, x)
    assert weight_sized(saved_ref) == [((IN, OUT), torch.float32)]
    # ... the NF4 layer keeps none (only the LoRA path's small tensors) ...
    calls = []
    real = qlora.dequantize_nf4
    monkeypatch.setattr(qlora, "dequantize_nf4", lambda *a, **k: calls.append(1) or real(*a, **k))
    saved, y = saved_tensors(ours, x)
    assert saved and not weight_sized(saved), saved
    # ... and dequantizes W again in backward instead.
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2 and x.grad is not None


def test_nf4_linear_moves_whole_and_keeps_its_scales():
    layer = NF4Linear(nn.Linear(IN, OUT), double_quant=False)
    layer.to(torch.bfloat16)  # the bias follows; the fp32 scales must not, or W would change
    assert layer.bias.dtype == torch.bfloat16 and layer.weight.absmax.dtype == torch.float32
    x = torch.randn(2, IN)
    y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    W = dequantize_nf4(layer.weight, dtype=torch.float32)
    assert rel_err(y.float(), x @ W.T + layer.bias.float()) < 1e-2  # bf16 arithmetic
    assert "weight" not in layer.state_dict()  # runs save adapters, not the base


def test_apply_lora_quantizes_every_linear_but_the_head():
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], quantize_base="nf4")
    names = apply_qlora(model, cfg, seed=0)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, NF4Linear, LoRALinear)) and ".lora_" not in name and
             not name.endswith(".base_layer")}
    assert {kinds[n] for n in names} == {"QLoRALinear"}
    assert kinds["lm_head"] == "Linear"
    assert {k for n, k in kinds.items() if n not in names and n != "lm_head"} == {"NF4Linear"}
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    # B = 0: the model is the NF4 base, close to but not the original; adapters off changes nothing.
    with torch.no_grad():
        after = model(input_ids=ids).logits
        with disable_adapters(model):
            off = model(input_ids=ids).logits
    assert 1e-3 < rel_err(after, before) < 0.5  # ~9% error per weight, through 14 random layers
    assert torch.equal(after, off)
    assert len(lora_parameters(model)) == 2 * len(names)
    with pytest.raises(ValueError, match="engine.export"):
        merge_lora(model)
    line = base_memory_report(model)
    assert line.startswith("qlora: base weights") and "vs" in line and "in bf16" in line


def test_recipe_keys():
    r = load_recipe(TINY, ["output_dir=x", "lora.quantize_base=nf4", "train.optimizer=paged_adamw_32bit"])
    assert (r.lora.quantize_base, r.lora.double_quant, r.train.optimizer) == ("nf4", True, "paged_adamw_32bit")
    assert load_recipe(TINY, ["output_dir=x"]).lora.quantize_base is None
    with pytest.raises(RecipeError, match="lora.quantize_base"):
        load_recipe(TINY, ["output_dir=x", "lora.quantize_base=int4"])
    with pytest.raises(RecipeError, match="train.optimizer"):
        load_recipe(TINY, ["output_dir=x", "train.optimizer=sgd"])


def test_tiny_qlora_sft_learns_saves_and_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = load_recipe(TINY, [f"output_dir={run_dir}", "lora.quantize_base=nf4"])
    run(recipe)
    assert "qlora: base weights" in capsys.readouterr().out
    rows = [r for r in read_metrics(str(run_dir / "metrics.jsonl")) if "loss" in r]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    # A peft-format adapter: loads strictly into the full-precision model, and into peft.
    adapter = run_dir / "adapter"
    trained = load_file(str(adapter / "adapter_model.safetensors"))
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    load_adapter(model, str(adapter))
    base, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter))
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 14
    # Resume from the step-20 checkpoint: the last 20 steps again give the same factors, bit for bit.
    shutil.copytree(adapter, tmp_path / "first")
    run(load_recipe(TINY, [f"output_dir={run_dir}", "lora.quantize_base=nf4",
                           f"train.resume={run_dir / 'checkpoints' / 'step-000020'}"]))
    again = load_file(str(adapter / "adapter_model.safetensors"))
    assert trained.keys() == again.keys()
    for k in trained:
        assert torch.equal(trained[k], again[k]), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the paged optimizers may work")
def test_paged_optimizer_without_cuda_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "engine.train", TINY, f"output_dir={tmp_path}",
                          "train.optimizer=paged_adamw_8bit", "train.max_steps=2", "train.warmup_steps=0"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.optimizer: paged_adamw_8bit needs"), res.stderr
    assert "CUDA" in errors[0] and "train.optimizer=adamw" in errors[0]


# ---------------------------------------------------------------- export

@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory):
    """A QLoRA adapter on q_proj/v_proj of the tiny model with random B (so the update is not zero)."""
    out = tmp_path_factory.mktemp("adapter")
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], quantize_base="nf4")
    apply_qlora(model, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QLoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    save_adapter(model, str(out), cfg, "builtin:tiny-llama")
    return str(out), model


def fp32_tiny():
    return load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))[0]


def check_loads(out_dir, dtype=torch.bfloat16):
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.dtype == dtype
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 256, (1, 8))).logits
    assert torch.isfinite(logits).all()


def test_export_original_equals_merge_lora(qlora_adapter, tmp_path):
    adapter, _ = qlora_adapter
    bf16 = ["--out-dtype", "bfloat16", "--allow-lossy"]  # asked for; the default is auto (fp32 here)
    assert export_main([adapter, "--out", str(tmp_path), "--base", "original", *bf16]) == 0
    got = load_file(str(tmp_path / "model.safetensors"))
    expected = fp32_tiny()
    load_adapter(expected, adapter)
    merge_lora(expected)
    expected = {k: v.to(torch.bfloat16) for k, v in expected.state_dict().items()}
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k
    # the default (auto: the fp32 base's own dtype) keeps the merge exact, as --out-dtype float32 does
    # (the pipeline's sequential baseline trains on it)
    exact = tmp_path / "fp32"
    assert export_main([adapter, "--out", str(exact), "--base", "original"]) == 0
    got32 = load_file(str(exact / "model.safetensors"))
    expected32 = fp32_tiny()
    load_adapter(expected32, adapter)
    merge_lora(expected32)
    for k, v in expected32.state_dict().items():
        assert got32[k].dtype == torch.float32 and torch.equal(got32[k], v), k
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".export-")]  # no temporary left behind
    check_loads(str(tmp_path))


def test_export_nf4_equals_dequantized_base_plus_delta(qlora_adapter, tmp_path):
    adapter, trained = qlora_adapter
    assert export_main([adapter, "--out", str(tmp_path), "--base", "nf4", "--out-dtype", "bfloat16",
                        "--allow-lossy"]) == 0
    got = load_file(str(tmp_path / "model.safetensors"))
    factors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    base = fp32_tiny()
    n_quantized = n_adapted = 0
    for name, m in base.named_modules():
        if not isinstance(m, nn.Linear) or name == "lm_head":
            continue
        W = dequantize_nf4(quantize_nf4(m.weight, blocksize=64, double_quant=True), dtype=torch.float32)
        key = f"base_model.model.{name}"
        if f"{key}.lora_A.weight" in factors:  # W_nf4 + s B A, s = alpha / r = 2
            W = W + (factors[f"{key}.lora_B.weight"].float() @ factors[f"{key}.lora_A.weight"].float()) * 2.0
            n_adapted += 1
        assert torch.equal(got[f"{name}.weight"], W.to(torch.bfloat16)), name
        n_quantized += 1
    assert n_quantized == 14 and n_adapted == 4
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # not quantized
        assert torch.equal(got[k], base.state_dict()[k].to(torch.bfloat16)), k
    check_loads(str(tmp_path))
    # Before the bf16 rounding, the nf4 merge is the model that was trained; the original merge is not.
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        nf4 = merged_model(adapter, "nf4")[0](input_ids=ids).logits
        orig = merged_model(adapter, "original")[0](input_ids=ids).logits
    assert rel_err(nf4, want) < 1e-5
    assert rel_err(orig, want) > 1e-3


def test_export_errors_are_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--base", "nf4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "adapter config not found" in err and err.count("\n") == 1
