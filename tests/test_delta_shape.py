"""merge.delta_shape: scale-free shape of a LoRA update (below_rel, hoyer, row_conc), PAFT's raw
share as merge.sparsity gives it, and SFT vs DPO steps matched by ‖δ‖."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from merge import delta_shape as ds
from merge import sparsity

PRE = "base_model.model.model.layers.0."


def _adapter(path, layers, r, alpha):
    """A peft adapter folder (as tests/test_seeds.py writes one): layers = {module: (A, B)}."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                   "target_modules": sorted({m.split(".")[-1] for m in layers}),
                   "base_model_name_or_path": "builtin:tiny-llama"}, f)
    tensors = {}
    for module, (A, B) in layers.items():
        tensors[f"{PRE}{module}.lora_A.weight"] = A.clone()
        tensors[f"{PRE}{module}.lora_B.weight"] = B.clone()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return str(path)


def _laplace(shape, g):
    u = torch.rand(shape, generator=g, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()  # scale 1


def test_reference_values_in_the_docstring():
    assert ds.GAUSS_BELOW_REL == pytest.approx(0.0797, abs=1e-4)
    assert ds.LAPLACE_BELOW_REL == pytest.approx(0.1319, abs=1e-4)


@pytest.mark.parametrize("dist, below, hoyer", [("gauss", 0.080, ds.GAUSS_HOYER), ("laplace", 0.132, ds.LAPLACE_HOYER)])
def test_entry_level_gaussian_and_laplace(dist, below, hoyer):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400_000, generator=g) if dist == "gauss" else _laplace((400_000,), g)
    x *= 3e-4
    got = ds.entry_shape(x)
    assert got["below_rel"] == pytest.approx(below, abs=0.005)
    assert got["hoyer"] == pytest.approx(hoyer, abs=0.005)
    scaled = ds.entry_shape(x * 40)  # scale-free: same shape, 40× the size
    assert scaled["below_rel"] == pytest.approx(got["below_rel"], abs=1e-4)
    assert scaled["hoyer"] == pytest.approx(got["hoyer"], abs=1e-6)
    assert scaled["s_1e5"] < got["s_1e5"] / 10  # PAFT's raw share is not


@pytest.mark.parametrize("dist, below, hoyer", [("gauss", 0.080, ds.GAUSS_HOYER), ("laplace", 0.132, ds.LAPLACE_HOYER)])
def test_adapter_path_gaussian_and_laplace_and_scale(tmp_path, dist, below, hoyer):
    """B = I (r × r) makes δ = s·A exactly, so δ's entries are A's: i.i.d. Gaussian or Laplace."""
    g = torch.Generator().manual_seed(5)
    r, k = 40, 8192
    A = (torch.randn(r, k, generator=g) if dist == "gauss" else _laplace((r, k), g)) * 1e-4
    small = ds.layer_shapes(_adapter(tmp_path / "small", {"mlp.down_proj": (A, torch.eye(r))}, r, r))
    big = ds.layer_shapes(_adapter(tmp_path / "big", {"mlp.down_proj": (A, 40 * torch.eye(r))}, r, r))
    (name,) = small
    assert name == "model.layers.0.mlp.down_proj.weight"
    s, b = small[name], big[name]
    print(f"\n{dist}: below_rel {s['below_rel']:.4f} hoyer {s['hoyer']:.4f} "
          f"s_1e5 {s['s_1e5']:.4f} -> ×40 {b['s_1e5']:.4f}")
    assert s["numel"] == r * k and s["fro"] == pytest.approx(float(A.double().norm()), rel=1e-6)
    assert s["rms"] == pytest.approx(s["fro"] / math.sqrt(r * k))
    assert s["below_rel"] == pytest.approx(below, abs=0.005)
    assert s["hoyer"] == pytest.approx(hoyer, abs=0.005)
    assert b["fro"] == pytest.approx(40 * s["fro"], rel=1e-6)
    assert b["below_rel"] == pytest.approx(s["below_rel"], abs=1e-4)
    assert b["hoyer"] == pytest.approx(s["hoyer"], abs=1e-5)
    assert b["row_conc"] == pytest.approx(s["row_conc"]) == pytest.approx(0.1)  # equal rows of B = I
    assert b["s_1e5"] < s["s_1e5"] / 10  # the raw share moved with the size alone


def test_s_1e5_equals_merge_sparsity(tmp_path):
    g = torch.Generator().manual_seed(7)
    layers = {"self_attn.q_proj": (torch.randn(4, 96, generator=g) * 3e-3, torch.randn(80, 4, generator=g) * 3e-3),
              "mlp.up_proj": (torch.randn(4, 64, generator=g) * 1e-2, torch.randn(128, 4, generator=g) * 1e-3)}
    layers["self_attn.q_proj"][1][:10] = 0.0
    path = _adapter(tmp_path / "ad", layers, r=4, alpha=8)
    got = ds.layer_shapes(path)
    want = {r["name"]: r["sparsity"] for r in sparsity.measure(path)["layers"]}
    assert set(got) == set(want)
    for name in want:
        assert got[name]["s_1e5"] == want[name]
        assert 0.0 < want[name] < 1.0
    # and the entries, brute force
    A, B = layers["self_attn.q_proj"]
    d = (B @ A) * 2.0
    q = got["model.layers.0.self_attn.q_proj.weight"]
    assert q["fro"] == pytest.approx(float(d.double().norm()), rel=1e-6)
    assert q["hoyer"] == pytest.approx(ds.entry_shape(d)["hoyer"], abs=1e-6)
    assert q["below_rel"] == pytest.approx(ds.entry_shape(d)["below_rel"], abs=1e-6)


def test_row_concentration():
    assert ds.row_concentration(torch.ones(50)) == pytest.approx((0.1, 0.0))
    one = torch.zeros(50)
    one[17] = 3.0
    assert ds.row_concentration(one) == pytest.approx((1.0, 49 / 50))
    g = torch.Generator().manual_seed(0)  # a single dominant row of B: row_conc → 1
    A, B = torch.randn(4, 32, generator=g), torch.randn(60, 4, generator=g) * 1e-4
    B[3] = 10.0
    got = ds._layer(A, B, 2.0)
    assert got["row_conc"] > 0.999 and got["row_conc_delta"] > 0.999


def test_zero_update_has_no_shape():
    got = ds._layer(torch.randn(2, 16), torch.zeros(8, 2), 1.0)
    assert got["fro"] == 0 and got["s_1e5"] == 1.0
    assert math.isnan(got["below_rel"]) and math.isnan(got["hoyer"])


def test_matched_rule():
    sft = {100: {"fro_total": 1.0}, 200: {"fro_total": 2.0}, 300: {"fro_total": 4.0}}
    dpo = {50: {"fro_total": 0.5}, 100: {"fro_total": 1.8}}
    assert matched_ok(ds.matched(sft, dpo), (200, 100, 2.0 / 1.8))  # DPO final, SFT closest to 1.8
    # closeness is |log ratio|: |log(2.9/1.8)| = 0.48 < |log(1.0/1.8)| = 0.59 (a difference would pick 1.0)
    assert ds.matched({1: 1.0, 2: 2.9}, {9: 1.8})[:2] == (2, 9)
    assert ds.matched({1: 1.0, 2: 3.5}, {9: 1.8})[:2] == (1, 9)  # 0.59 < 0.67
    # SFT never reaches DPO's final size: SFT at its largest, DPO at the step closest to it
    big_dpo = {10: 0.3, 20: 0.9, 30: 5.0}
    assert ds.matched({1: 0.5, 2: 1.0, 3: 0.8}, big_dpo) == (2, 20, pytest.approx(1.0 / 0.9))
    assert ds.matched({0: 0.0, 5: 1.0}, {0: 0.0, 7: 1.0}) == (5, 7, 1.0)  # δ = 0 steps are skipped
    with pytest.raises(ValueError):
        ds.matched({0: 0.0}, {3: 1.0})


def matched_ok(got, want):
    return got[:2] == want[:2] and got[2] == pytest.approx(want[2])


def test_stage_shapes_and_paired_layers(tmp_path):
    g = torch.Generator().manual_seed(1)
    stage = tmp_path / "dpo"
    A = torch.randn(4, 48, generator=g)
    layers = lambda c: {"self_attn.q_proj": (A, c * torch.randn(32, 4, generator=g)),  # noqa: E731
                        "self_attn.v_proj": (A, c * torch.randn(16, 4, generator=g))}
    _adapter(stage / "checkpoints" / "step-10" / "adapter", layers(1e-3), 4, 8)
    _adapter(stage / "checkpoints" / "step-20" / "adapter", layers(2e-3), 4, 8)
    _adapter(stage / "adapter", layers(4e-3), 4, 8)
    (stage / "summary.json").write_text(json.dumps({"steps": 25}))
    got = ds.stage_shapes(str(stage))
    assert sorted(got) == [10, 20, 25]
    for v in got.values():
        assert v["fro_total"] == pytest.approx(math.sqrt(sum(x["fro"] ** 2 for x in v["layers"].values())))
        assert v["mean"]["s_1e5"] == pytest.approx(sum(x["s_1e5"] for x in v["layers"].values()) / 2)
    assert got[25]["adapter"] == str(stage / "adapter")
    assert got[10]["fro_total"] < got[20]["fro_total"] < got[25]["fro_total"]
    diff = ds.paired_layers(got[25]["layers"], got[10]["layers"], "hoyer")
    assert set(diff) == set(got[10]["layers"])
    name = next(iter(diff))
    assert diff[name] == got[25]["layers"][name]["hoyer"] - got[10]["layers"][name]["hoyer"]
    assert ds.paired_layers({"a": {"k": 1.0}, "b": {"k": 2.0}}, {"b": {"k": 0.5}}, "k") == {"b": 1.5}
    assert set(ds.shape_table({"dpo": str(stage)})["dpo"]) == {10, 20, 25}
