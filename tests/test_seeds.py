"""Multi-seed pipeline: per-seed runs, the mean ± se table, PAFT Figure 2 and FINDINGS.md."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from engine.pipeline.decide_again import main as decide_again_main
from engine.pipeline.seeds import aggregate
from paft_evals.findings import FindingsConfig, add_scores, claims, mean_se, render
from paft_evals.report import markdown_table
from merge.figure2 import THRESHOLDS, curve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SEEDS = os.path.join(REPO, "recipes", "tiny_paft_seeds.yaml")


def _evidence(seed_bump: float = 0.0, n: int = 60):
    """Items of six variants over three seeds: ties beats sequential on 30 of 60 items (planted),
    ties_dense and ties differ on one item only, dpo refuses more than sft_chosen."""
    items = {}
    for name in ("sft", "sft_sparse", "sft_chosen", "dpo", "sequential", "ties", "ties_dense"):
        for seed in (0, 1, 2):
            acc = {f"q/{i}": float(i % 2) for i in range(n)}                    # half the questions right
            ref = {f"h/{i}": float(i % 3 == 0) for i in range(n)}               # a third refused
            if name == "ties":
                acc.update({f"q/{i}": 1.0 for i in range(0, n, 2)})              # +30 items: a planted effect
            if name == "ties_dense":
                acc.update({f"q/{i}": 1.0 for i in range(0, n, 2)})
                acc["q/0"] = 0.0                                                 # one item apart from ties
            if name in ("dpo", "ties", "ties_dense"):
                ref = {k: 1.0 for k in ref}
            items[name] = {"acc": {**items.get(name, {}).get("acc", {}), seed: acc},
                           "refusal": {**items.get(name, {}).get("refusal", {}), seed: ref}}
    layers = {f"l{j}": None for j in range(20)}
    deltas = {"sft": {s: {k: {"s_1e5": 0.02 + 0.001 * (j % 3)} for j, k in enumerate(layers)} for s in (0, 1, 2)},
              "dpo": {s: {k: {"s_1e5": 0.03 + 0.001 * (j % 3)} for j, k in enumerate(layers)} for s in (0, 1, 2)},
              "sft_sparse": {s: {k: {"s_1e5": 0.95 + 0.01 * (j % 2)} for j, k in enumerate(layers)} for s in (0, 1, 2)}}
    return {"items": items, "parts": {}, "deltas": deltas, "matched": {}}


def test_item_level_claims():
    found = {c["id"]: c for c in claims(_evidence(), FindingsConfig(), ["acc/accuracy"], ["refusal/refusal_rate"])}
    assert found["a"]["decision"] == "holds" and found["a"]["effect"] == pytest.approx(0.01)
    assert found["a"]["n"] == 20                               # layers are the items, seeds averaged per layer
    assert found["b"]["decision"] == "holds"                   # 0.95..0.96 > 0.9 on every layer
    c = found["c"]                                             # ties vs sequential on combined_hh
    assert c["effect"] == pytest.approx(0.5 * 0.5 + 0.5 * (2 / 3))   # +0.5 accuracy, +2/3 refusal, weights 1/2
    assert c["decision"] == "holds" and c["n"] == 120
    d = found["d"]                                             # one item of 60 apart, the same on every seed:
    assert d["effect"] == pytest.approx(0.5 / 60)              # the old rule said "holds" (se over seeds = 0)
    assert d["decision"] == "inconclusive"
    assert found["e1"]["decision"] == "holds"                  # dpo refuses every item, sft_chosen a third
    assert set(found) == {"a", "b", "c", "d", "e1", "e2"}      # no dpo_lr40, no matched pairs: not run
    assert all("p_holm" in c for c in found.values())
    text = render(list(found.values()), FindingsConfig(), "t", helpful=["acc/accuracy"])
    assert re.search(r"\| \(d\) \| .* \| \*\*inconclusive\*\* \| \+0\.008 \| \[", text)
    assert "items for MDE = paper's" in text


def test_scores_and_table():
    r = add_scores({"name": "x", "acc": 0.5, "refusal": 0.2, "over": 0.1}, ["acc"], ["refusal", "1-over"])
    assert r["helpful"] == 0.5 and r["harmless"] == pytest.approx((0.2 + 0.9) / 2)
    assert r["combined_hh"] == pytest.approx((0.5 + 0.55) / 2)
    m, se = mean_se([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(1.0 / math.sqrt(3))
    per_seed = {s: [{"name": "dpo", "sparsity": v}] for s, v in ((0, 0.03), (1, 0.04), (2, 0.05))}
    table = aggregate(per_seed, ["sparsity"])
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
    assert "evaluate base: redone" not in res.stdout  # the copy comes with its record: not evaluated again
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
    # FINDINGS.md: every claim, decided item by item from the items kept in results.json
    text = (out / "FINDINGS.md").read_text()
    for c in result["claims"]:
        assert f"| ({c['id']}) |" in text
        assert c["decision"].startswith(("holds", "does not hold", "inconclusive", "equivalent within ±"))
    ids = {c["id"] for c in result["claims"]}
    assert {"a", "a-matched", "a-hoyer", "a-rows", "b", "c", "d"} <= ids
    a = next(c for c in result["claims"] if c["id"] == "a")
    assert a["n"] > 0 and len(result["deltas"]["sft"]) == 2   # layers are the items; both seeds measured
    items = result["items"]["sft"]["arithmetic"]
    assert set(items) == {"0", "1"} and items["0"].keys() == items["1"].keys()  # the same items on every seed
    # Deciding again from the saved results.json alone gives the same claims and FINDINGS.md (the notes
    # name the recipe's output_dir, which this run overrode).
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    assert decide_again_main([TINY_SEEDS, str(copy / "results.json")]) == 0
    again = json.loads((copy / "results.json").read_text())
    assert again["claims"] == result["claims"] and again.keys() == result.keys()
    recipe_dir = yaml.safe_load(open(TINY_SEEDS))["pipeline"]["output_dir"]
    assert (copy / "FINDINGS.md").read_text().replace(recipe_dir, str(out)) == text


def test_decide_again_refuses_bad_input(tmp_path, capsys):
    missing = tmp_path / "results.json"
    assert decide_again_main([TINY_SEEDS, str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(missing) in err and "\n" not in err
    missing.write_text(json.dumps({"seeds": [0], "helpful": [], "harmless": []}))
    assert decide_again_main([TINY_SEEDS, str(missing)]) == 2
    assert "no key 'per_seed'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  model: m\n  output_dir: o\n  findings: {margn: 0.1}\n")
    assert decide_again_main([str(bad), str(missing)]) == 2
    assert "margn" in capsys.readouterr().err
