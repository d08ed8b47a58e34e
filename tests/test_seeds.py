"""Multi-seed pipeline: per-seed runs, the mean ± se table, PAFT Figure 2 and FINDINGS.md."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from engine.pipeline.seeds import aggregate
from paft_evals.findings import FindingsConfig, add_scores, claims, decide, mean_se, paired, render
from paft_evals.report import markdown_table
from merge.figure2 import THRESHOLDS, curve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEEDS = os.path.join(REPO, "recipes", "tiny_paft_seeds.yaml")


def test_decision_rule():
    assert decide([0.10, 0.12, 0.11]) == "holds"
    assert decide([-0.10, -0.12, -0.11]) == "does not hold"
    assert decide([0.10, -0.01, 0.11]) == "inconclusive at this scale"   # not the same sign on every seed
    assert decide([0.001, 0.5, 0.002]) == "inconclusive at this scale"   # mean within 2 se
    assert decide([0.3]) == "inconclusive at this scale"                 # one seed: no se
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    p = paired({0: 0.5, 1: 0.7, 2: None}, {0: 0.1, 1: 0.2, 2: 0.3})
    assert p["seeds"] == [0, 1] and p["diffs"] == pytest.approx([0.4, 0.5])


def test_scores_and_claims_from_rows():
    def rows(seed, dpo_sparsity):
        base = {"acc": 0.5, "refusal": 0.2, "over": 0.1}
        out = []
        for name, bump, sp in [("sft", 0.0, 0.01), ("sft_sparse", 0.0, 0.95 + seed / 100), ("dpo", 0.1, dpo_sparsity),
                               ("sequential", 0.0, 0.02), ("ties", 0.2, 0.5), ("ties_dense", 0.1, 0.4)]:
            out.append(add_scores({"name": name, "acc": base["acc"] + bump, "refusal": base["refusal"] + bump,
                                   "over": base["over"], "sparsity": sp}, ["acc"], ["refusal", "1-over"]))
        return out
    per_seed = {0: rows(0, 0.03), 1: rows(1, 0.04), 2: rows(2, 0.05)}
    r = per_seed[0][0]
    assert r["helpful"] == 0.5 and r["harmless"] == pytest.approx((0.2 + 0.9) / 2)
    assert r["combined_hh"] == pytest.approx((0.5 + 0.55) / 2)
    found = {c["id"]: c for c in claims(per_seed, FindingsConfig())}
    assert found["a"]["decision"] == "holds" and found["a"]["diffs"] == pytest.approx([0.02, 0.03, 0.04])
    assert found["b"]["decision"] == "holds"                  # 0.95.. > 0.9 on every seed
    assert found["c"]["decision"] == "holds"                  # ties beats sequential by 0.15 on every seed
    assert found["c'"]["diffs"] == []                         # no sequential_sparse stage here
    assert found["d"]["diffs"] == pytest.approx([0.075] * 3)  # a constant difference: se 0, still holds
    assert found["d"]["decision"] == "holds"
    assert found["e1"]["decision"] == "holds"
    text = render(list(found.values()), FindingsConfig(), "t")
    assert "| (a) | DPO's deltas are sparser than SFT's (PAFT Fig. 2) | **holds** |" in text
    table = aggregate(per_seed, ["sparsity", "combined_hh"])
    cell = table["dpo"]["sparsity"]
    assert cell["mean"] == pytest.approx(0.04) and cell["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert cell["values"] == {0: 0.03, 1: 0.04, 2: 0.05}
    md = markdown_table([{"name": n, **c} for n, c in table.items()], ["sparsity"], "x")
    assert "| dpo | 0.040 ± 0.006 |" in md


def _adapter(path, A, B, alpha, module="model.layers.0.mlp.down_proj"):
    os.makedirs(path, exist_ok=True)
    r = A.shape[0]
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
                   "target_modules": ["down_proj"], "base_model_name_or_path": "builtin:tiny-llama"}, f)
    save_file({f"base_model.model.{module}.lora_A.weight": A.contiguous(),
               f"base_model.model.{module}.lora_B.weight": B.contiguous()},
              os.path.join(path, "adapter_model.safetensors"))


def test_figure2_curve_matches_brute_force(tmp_path):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(4, 96, generator=g) * 1e-2
    B = torch.randn(80, 4, generator=g) * 1e-2
    B[:20] = 0.0      # zero rows of B: whole output rows of δ exactly zero
    A[:, :8] = 0.0    # zero columns of A: whole input columns exactly zero
    _adapter(tmp_path / "ad", A, B, alpha=8)
    delta = (B @ A) * 2.0  # s = α / r = 2
    want = [int((delta.abs() < t).sum()) / delta.numel() for t in THRESHOLDS]
    got = curve(str(tmp_path / "ad"))
    assert got == pytest.approx(want, abs=1e-9)
    exact_zeros = 1 - (60 / 80) * (88 / 96)
    assert got[0] >= exact_zeros - 1e-9 and got == sorted(got)


@pytest.mark.slow
def test_tiny_multi_seed_pipeline_end_to_end(tmp_path):
    out = tmp_path / "seeds"
    res = subprocess.run([sys.executable, "-m", "engine.train", TINY_SEEDS, f"pipeline.output_dir={out}"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluate base: same for every seed, reused" in res.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["seeds"] == [0, 1]
    # every stage, merge and eval ran once per seed, each with its own train.seed
    for seed in (0, 1):
        rec = (out / f"seed-{seed}" / "sft" / "recipe.yaml").read_text()
        assert re.search(rf"\n  seed: {seed}\n", rec)
        assert (out / f"seed-{seed}" / "merges" / "ties" / "config.json").is_file()
    a0 = (out / "seed-0" / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    a1 = (out / "seed-1" / "sft" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a0 != a1  # the seed changed the run
    # the table's mean ± se is over the per-seed values kept in results.json
    cell = result["variants"]["sft"]["sparsity"]
    vals = list(cell["values"].values())
    assert len(vals) == 2 and cell["mean"] == pytest.approx(sum(vals) / 2)
    assert cell["se"] == pytest.approx(abs(vals[0] - vals[1]) / 2)
    md = (out / "results.md").read_text()
    assert re.search(r"\| sft \|.*\d\.\d{3} ± \d\.\d{3}", md)
    assert (out / "results.png").stat().st_size > 1000
    # Figure 2: one curve per seed for SFT, SFT_sparse and DPO, over the thresholds and steps
    fig = json.loads((out / "figure2.json").read_text())
    assert set(fig["curves"]) == {"sft", "sft_sparse", "dpo"}
    assert all(len(c) == 2 and len(c[0]) == len(THRESHOLDS) for c in fig["curves"].values())
    assert len(fig["steps"]["sft"][0]) >= 3  # step 0, a kept checkpoint, the final step
    assert fig["curves"]["sft"][0][THRESHOLDS.index(1e-5)] == pytest.approx(
        result["variants"]["sft"]["sparsity"]["values"]["0"], abs=1e-9)
    assert (out / "figure2.png").stat().st_size > 1000
    # FINDINGS.md: every claim, with a decision that follows from the per-seed differences
    text = (out / "FINDINGS.md").read_text()
    for c in result["claims"]:
        assert f"| ({c['id']}) |" in text
        assert c["decision"] == decide(c["diffs"])
    a = next(c for c in result["claims"] if c["id"] == "a")
    assert len(a["diffs"]) == 2
