"""engine.lora: the LoRA layer against peft's, file interop both ways, disable/merge, targeting, errors."""
import json
import math
import os
import re

import peft
import pytest
import torch
import torch.nn as nn
import transformers
from safetensors.torch import load_file, save_file

from engine.lora import (LoRALinear, apply_lora, disable_adapters, load_adapter, lora_parameters,
                         lora_state_dict, merge_lora, save_adapter, target_module_names)
from engine.recipe import LoRAConfig

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def make_base(seed: int = 0) -> transformers.LlamaForCausalLM:
    """The same random tiny Llama for a given seed, in eval mode."""
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))  # (B, T)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits  # (B, T, V)


def randomise_B(model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def adapted(cfg=None, seed: int = 0) -> transformers.LlamaForCausalLM:
    model = make_base()
    apply_lora(model, cfg or LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=seed)
    randomise_B(model)
    return model


# ---------------------------------------------------------------- 1. the layer equals peft's

@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_peft(rslora, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    ours = LoRALinear(nn.Linear(24, 40, bias=bias), r=4, alpha=16, rslora=rslora)
    ours.base_layer.load_state_dict(base.state_dict())
    theirs = peft.tuners.lora.Linear(base, "default", config=peft.LoraConfig(r=4, lora_alpha=16, use_rslora=rslora),
                                     r=4, lora_alpha=16)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    assert ours.scaling == theirs.scaling["default"] == (16 / 2 if rslora else 16 / 4)
    x = torch.randn(3, 5, 24)  # (B, T, in)
    y = ours(x)
    assert y.shape == (3, 5, 40)
    assert (y - theirs(x)).abs().max().item() < 1e-6
    assert (y - base(x)).abs().max().item() > 1e-2  # the low-rank path really contributes


def test_bf16_base_keeps_fp32_factors():
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.5)
    x = torch.randn(2, 16, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_A.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- 2. engine -> peft

@pytest.mark.parametrize("target_modules", [["v_proj", "q_proj", "down_proj"], r".*\.mlp\.(up|gate)_proj",
                                            "all-linear", ["layers.0.self_attn.q_proj"]])
def test_engine_adapter_loads_in_peft(tmp_path, target_modules):
    cfg = LoRAConfig(r=4, alpha=8, rslora=True, target_modules=target_modules)
    model = adapted(cfg)
    save_adapter(model, str(tmp_path), cfg, base_model_name="tiny-llama")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["base_model_name_or_path"] == "tiny-llama"
    if target_modules == "all-linear":  # expanded to short names; lm_head not among them
        assert saved["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                           "v_proj"]
    if target_modules == ["layers.0.self_attn.q_proj"]:  # "q_proj" would also pick layer 1: full paths
        assert saved["target_modules"] == ["model.layers.0.self_attn.q_proj"]

    theirs = peft.PeftModel.from_pretrained(make_base(), str(tmp_path)).eval()
    assert set(peft.get_peft_model_state_dict(theirs, save_embedding_layers=False)) == set(lora_state_dict(model))
    ids = tokens()
    out = logits(model, ids)
    assert (out - logits(make_base(), ids)).abs().max().item() > 1e-3  # the adapter changes the output
    assert (out - logits(theirs, ids)).abs().max().item() < 1e-5


def test_save_replaces_files(tmp_path):
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])
    save_adapter(adapted(cfg), str(tmp_path / "a"), cfg, "x")
    model = adapted(cfg)
    with torch.no_grad():
        lora_parameters(model)[1].fill_(3.0)
    save_adapter(model, str(tmp_path / "a"), cfg, "x")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert torch.all(saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == 3.0)


# ---------------------------------------------------------------- 3. peft -> engine

@pytest.mark.parametrize("target_modules", [["v_proj", "o_proj", "q_proj", "up_proj"], r".*\.self_attn\.(q|k)_proj"])
def test_peft_adapter_loads_in_engine(tmp_path, target_modules):
    theirs = peft.get_peft_model(make_base(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                              target_modules=target_modules, task_type="CAUSAL_LM"))
    randomise_B(theirs)
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()

    model = make_base()
    cfg = load_adapter(model, str(tmp_path))
    model.eval()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.rslora) == (4, 8.0, 0.1, False)
    assert sorted(cfg.target_modules) == sorted(target_modules) if isinstance(target_modules, list) \
        else cfg.target_modules == target_modules
    ids = tokens()
    out = logits(model, ids)
    assert (out - logits(make_base(), ids)).abs().max().item() > 1e-3
    assert (out - logits(theirs, ids)).abs().max().item() < 1e-5


def test_old_peft_keys_with_adapter_name(tmp_path):
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj"])
    model = adapted(cfg)
    save_adapter(model, str(tmp_path), cfg, "x")
    f = str(tmp_path / "adapter_model.safetensors")
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(f).items()}, f)
    fresh = make_base()
    load_adapter(fresh, str(tmp_path))
    ids = tokens()
    assert (logits(fresh, ids) - logits(model, ids)).abs().max().item() < 1e-6


# ---------------------------------------------------------------- 4. disable_adapters

def test_disable_adapters():
    model, ids = adapted(), tokens()
    with_lora, base = logits(model, ids), logits(make_base(), ids)
    assert (with_lora - base).abs().max().item() > 1e-3
    with disable_adapters(model):
        assert (logits(model, ids) - base).abs().max().item() < 1e-6
    assert torch.equal(logits(model, ids), with_lora)
    with pytest.raises(RuntimeError, match="boom"):
        with disable_adapters(model):
            raise RuntimeError("boom")
    assert not any(m.disabled for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(logits(model, ids), with_lora)


# ---------------------------------------------------------------- 5. merge

def test_merge_lora():
    model, ids = adapted(LoRAConfig(r=4, alpha=8, target_modules="all-linear")), tokens()
    before = logits(model, ids)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (logits(model, ids) - before).abs().max().item() < 1e-5
    assert (logits(model, ids) - logits(make_base(), ids)).abs().max().item() > 1e-3


# ---------------------------------------------------------------- 6. targeting

def test_target_module_names():
    model = make_base()
    assert target_module_names(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert target_module_names(model, ["layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    assert target_module_names(model, ["lm_head"]) == ["lm_head"]
    every = target_module_names(model, "all-linear")
    assert len(every) == 2 * 7 and "lm_head" not in every
    assert target_module_names(model, r"model\.layers\.0\..*_proj") == every[:7]
    assert target_module_names(model, r".*k_proj") == ["model.layers.0.self_attn.k_proj",
                                                      "model.layers.1.self_attn.k_proj"]
    with pytest.raises(ValueError, match=r"no nn.Linear matches.*look like: model.layers.0.self_attn.q_proj"):
        target_module_names(model, ["qkv_proj"])
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        target_module_names(model, ["proj"])  # a name matches whole path components only
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        target_module_names(model, "k_proj")  # a string is a regex over the full path


# ---------------------------------------------------------------- 7. trainable params and init

def test_only_lora_trainable_and_init():
    model, ids = make_base(), tokens()
    base = logits(model, ids)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    assert len(names) == 4
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    params = lora_parameters(model)
    assert [id(p) for p in params] == [id(p) for _, p in model.named_parameters() if p.requires_grad]
    assert all(torch.all(m.lora_B.weight == 0) for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(logits(model, ids), base)
    A = params[0]
    assert A.shape == (4, 64) and A.abs().max() <= 1 / math.sqrt(64) and A.std() > 0.5 / math.sqrt(3 * 64)


def test_seed_makes_init_deterministic():
    cfg = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    a, b, c = make_base(), make_base(), make_base()
    torch.manual_seed(123)
    apply_lora(a, cfg, seed=7)
    torch.manual_seed(456)
    apply_lora(b, cfg, seed=7)
    apply_lora(c, cfg, seed=8)
    for pa, pb, pc in zip(lora_parameters(a), lora_parameters(b), lora_parameters(c)):
        assert torch.equal(pa, pb)
    assert not torch.equal(lora_parameters(a)[0], lora_parameters(c)[0])
    g = make_base()
    apply_lora(g, LoRAConfig(r=16, alpha=8, init="gaussian", target_modules=["up_proj"]), seed=0)
    A = lora_parameters(g)[0]
    assert abs(A.std().item() - 1 / 16) < 0.01


# ---------------------------------------------------------------- 8. load errors

def saved_adapter(path) -> str:
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    save_adapter(adapted(cfg), str(path), cfg, "x")
    return str(path)


def test_load_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(make_base(), str(tmp_path))


def test_load_shape_mismatch(tmp_path):
    d = saved_adapter(tmp_path)
    f = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(f)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    sd[key] = torch.zeros(3, 64)
    save_file(sd, f)
    with pytest.raises(ValueError, match=re.escape(f"adapter_model.safetensors: {key} has shape (3, 64)")):
        load_adapter(make_base(), d)


def test_load_missing_and_unexpected_key(tmp_path):
    d = saved_adapter(tmp_path)
    f = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    del sd[key]
    save_file(sd, f)
    with pytest.raises(ValueError, match=f"adapter_model.safetensors: missing key {key}"):
        load_adapter(make_base(), d)
    sd[key] = torch.zeros(64, 2)
    sd["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 64)
    save_file(sd, f)
    with pytest.raises(ValueError, match="unexpected key .*k_proj.lora_A.weight"):
        load_adapter(make_base(), d)


@pytest.mark.parametrize("change", [{"use_dora": True}, {"bias": "all"}, {"modules_to_save": ["lm_head"]},
                                    {"rank_pattern": {"q_proj": 8}}, {"fan_in_fan_out": True},
                                    {"peft_type": "IA3"}])
def test_load_unsupported_options(tmp_path, change):
    d = saved_adapter(tmp_path)
    path = os.path.join(d, "adapter_config.json")
    raw = json.load(open(path))
    raw.update(change)
    json.dump(raw, open(path, "w"))
    with pytest.raises(ValueError, match=rf"adapter_config.json: .*{next(iter(change))}.*"):
        load_adapter(make_base(), d)


def test_load_targets_absent_from_model(tmp_path):
    d = saved_adapter(tmp_path)
    path = os.path.join(d, "adapter_config.json")
    raw = json.load(open(path))
    raw["target_modules"] = ["c_attn"]
    json.dump(raw, open(path, "w"))
    with pytest.raises(ValueError, match="adapter_config.json: lora.target_modules: no nn.Linear matches"):
        load_adapter(make_base(), d)
