"""The PAFT pipeline end to end on the tiny model: stages, sequential baseline, merges, evals, table, resume."""
import json
import os
import subprocess
import sys

import pytest

from engine.pipeline import load_pipeline, merge_variants
from engine.recipe import RecipeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PAFT = os.path.join(REPO, "recipes", "tiny_paft.yaml")


def run_pipeline_cli(out):
    return subprocess.run([sys.executable, "-m", "engine.train", TINY_PAFT, f"pipeline.output_dir={out}"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_and_resume(tmp_path):
    out = tmp_path / "paft"
    res = run_pipeline_cli(out)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    names = [r["name"] for r in rows]
    assert names == ["base", "sft", "sft_sparse", "dpo", "sequential", "ties_density0.5", "dare_ties",
                     "task_arithmetic"]
    for r in rows:
        for col in ("arithmetic/exact_match", "refusal/refusal_rate", "over_refusal/over_refusal_rate"):
            assert 0.0 <= r[col] <= 1.0
    by_name = {r["name"]: r for r in rows}
    assert by_name["sft_sparse"]["sparsity"] > by_name["sft"]["sparsity"]  # the L1 term did its job
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 1000
    assert "| sequential |" in res.stdout
    # the sequential stage trained on the base with the SFT adapter folded in
    seq_cfg = json.loads((out / "sequential" / "adapter" / "adapter_config.json").read_text())
    assert seq_cfg["base_model_name_or_path"].endswith(os.path.join("sft", "merged"))

    # Rerun: everything is found done and skipped; removing one result redoes only that step.
    stamp = (out / "dpo" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    os.remove(out / "evals" / "dpo.json")
    again = run_pipeline_cli(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done, skipped") >= 4 + 3  # 4 stages, 3 merges
    assert "evaluate dpo: python -m paft_evals" in again.stdout and "evaluate sft: done, skipped" in again.stdout
    assert "evaluate sft: python" not in again.stdout
    assert (out / "dpo" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp


def test_pipeline_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline:\n  output_dir: o\n  model: builtin:tiny-llama\n  stages:\n"
                   "    a: {recipe: recipes/tiny_sft.yaml, after: nope}\n")
    with pytest.raises(RecipeError, match="pipeline.stages.a.after: no stage named 'nope'"):
        load_pipeline(str(bad))
    bad.write_text("pipeline:\n  output_dir: o\n  model: m\n  stages:\n    a: {recipe: missing.yaml}\n")
    with pytest.raises(RecipeError, match="pipeline.stages.a.recipe: file not found"):
        load_pipeline(str(bad))
    bad.write_text("pipeline:\n  output_dir: o\n  model: m\n  stagse: {}\n")
    with pytest.raises(RecipeError, match="did you mean 'pipeline.stages'"):
        load_pipeline(str(bad))


def test_merge_sweeps_expand():
    variants = merge_variants({"method": "ties", "models": ["a", "b"], "density": [0.3, 0.6], "lambda": 1.0})
    assert [name for name, _ in variants] == ["ties_density0.3", "ties_density0.6"]
    assert [p["density"] for _, p in variants] == [0.3, 0.6]
    assert merge_variants({"method": "slerp", "models": ["a", "b"], "t": 0.5})[0][0] == "slerp"


def test_merge_names_and_clashes(tmp_path):
    assert merge_variants({"name": "ties_dense", "method": "ties", "models": ["a", "b"],
                           "density": [0.5]})[0][0] == "ties_dense_density0.5"
    bad = tmp_path / "clash.yaml"
    bad.write_text("pipeline:\n  output_dir: o\n  model: builtin:tiny-llama\n  stages:\n"
                   "    a: {recipe: recipes/tiny_sft.yaml}\n    b: {recipe: recipes/tiny_dpo.yaml}\n"
                   "  merges:\n    - {method: ties, models: [a, b], density: 0.5}\n"
                   "    - {method: ties, models: [b, a], density: 0.5}\n")
    with pytest.raises(RecipeError, match="both be named 'ties'.*give one merge a 'name'"):
        load_pipeline(str(bad), [])


def test_slerp_merge_config_has_no_weights():
    from engine.pipeline import mergekit_config
    cfg = mergekit_config({"method": "slerp", "models": ["a", "b"], "t": 0.5}, "base", {"a": "A", "b": "B"})
    assert cfg["models"] == [{"model": "A", "parameters": {}}, {"model": "B", "parameters": {}}]
    assert cfg["parameters"] == {"t": 0.5}
    ties = mergekit_config({"method": "ties", "models": ["a", "b"], "weight": [1.0, 0.5], "density": 0.3},
                           "base", {"a": "A", "b": "B"})
    assert [m["parameters"] for m in ties["models"]] == [{"weight": 1.0, "density": 0.3},
                                                          {"weight": 0.5, "density": 0.3}]


def test_sequential_stage_trains_on_the_bases_generated_pairs(tmp_path):
    """An `after` stage with generated builtin:harmbench answers gets data.rejected_from=<base>, so it
    trains on the parallel DPO arm's pairs; a first stage, or templated answers, get nothing added."""
    from engine.pipeline.config import stage_overrides
    dpo = os.path.join(REPO, "recipes", "quickstart", "dpo.yaml")
    path = tmp_path / "p.yaml"
    path.write_text("pipeline:\n  output_dir: " + str(tmp_path / "out") + "\n  model: builtin:tiny-llama\n"
                    "  stages:\n"
                    f"    sft: {{recipe: {os.path.join(REPO, 'recipes', 'tiny_sft.yaml')}}}\n"
                    f"    dpo: {{recipe: {dpo}}}\n"
                    f"    seq: {{recipe: {dpo}, after: sft}}\n"
                    f"    seq_template: {{recipe: {dpo}, after: sft, overrides: [data.harmbench_rejected=template]}}\n"
                    "  evals: {tasks: [arithmetic]}\n")
    cfg = load_pipeline(str(path))
    assert stage_overrides(cfg, "dpo", cfg.stages["dpo"]) == []
    assert stage_overrides(cfg, "seq", cfg.stages["seq"]) == ["data.rejected_from=builtin:tiny-llama"]
    assert stage_overrides(cfg, "seq_template", cfg.stages["seq_template"]) == ["data.harmbench_rejected=template"]
