"""Issue 14, class 4: a pipeline recipe is checked whole before any training, and a finished step
is skipped only while the spec it was made from is unchanged (engine/pipeline/records.py)."""
import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from engine.pipeline import load_pipeline, mergekit_config, run as run_pipeline
from engine.pipeline.records import Record, changes
from engine.recipe import RecipeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PAFT = os.path.join(REPO, "recipes", "tiny_paft.yaml")
MERGE = "pipeline.merges=[{method: ties, models: [sft, dpo], %s}]"

# (override of recipes/tiny_paft.yaml, what the one error line must say)
BAD = [
    ("pipeline.merges=[{method: tie, models: [sft, dpo]}]", r"pipeline.merges\[0\].method: 'tie' .*did you mean 'ties'"),
    ("pipeline.merges=[{models: [sft, dpo]}]", r"pipeline.merges\[0\]: missing 'method'"),
    (MERGE % "weight: [1.0], density: 0.5", r"pipeline.merges\[0\].weight: 1 value\(s\) \[1.0\] for 2 models"),
    (MERGE % "weight: [1.0, 1.0, 1.0]", r"pipeline.merges\[0\].weight: 3 value\(s\)"),
    (MERGE % "weight: heavy", r"pipeline.merges\[0\].weight: expected a number"),
    (MERGE % "density: 1.5", r"pipeline.merges\[0\] \(ties\): .*density must be in \(0, 1\], got 1.5"),
    (MERGE % "density: [0.5, 0.0]", r"pipeline.merges\[0\] \(ties_density0\): .*density must be in \(0, 1\]"),
    (MERGE % "density: []", r"pipeline.merges\[0\].density: a sweep is a non-empty list"),
    (MERGE % "lambda: [1, x]", r"pipeline.merges\[0\].lambda: expected .*got \[1, 'x'\]"),
    (MERGE % "wieght: [1, 1]", r"unknown key 'pipeline.merges\[0\].wieght' \(did you mean 'pipeline.merges\[0\].weight'"),
    (MERGE % "normalize: maybe", r"pipeline.merges\[0\].normalize: expected true/false"),
    (MERGE % "name: a/b", r"pipeline.merges\[0\].name: must be a plain file name"),
    ("pipeline.merges=[{method: slerp, models: [sft, dpo], t: 1.5}]", r"\(slerp\): parameters: t must be in \[0, 1\]"),
    ("pipeline.merges=[{method: slerp, models: [sft, dpo]}]", r"\(slerp\): .*required parameter 't'"),
    ("pipeline.merges=[{method: slerp, models: [sft, dpo], weight: [1, 1], t: 0.5}]", r"slerp takes t, not weights"),
    ("pipeline.merges=[{method: slerp, models: [sft, dpo, sft_sparse], t: 0.5}]", r"slerp takes two models"),
    ("pipeline.merges=[{method: ties, models: [sft, nope]}]", r"pipeline.merges\[0\].models: no stage named 'nope'"),
    ("pipeline.merges=[{method: ties, models: [sft, sft]}]", r"pipeline.merges\[0\].models: a stage is listed twice"),
    ("pipeline.merges=[{method: ties, models: [sft, sequential]}]", r"stage 'sequential' trains after 'sft'"),
    ("pipeline.evals.tasks=[arithmetc]", r"pipeline.evals.tasks: unknown task 'arithmetc' \(did you mean 'arithmetic'"),
    ("pipeline.evals.tasks=[mc]", r"pipeline.evals.data: mc: needs a data file"),
    ("pipeline.evals={tasks: [mc], data: [mc=missing.json]}", r"pipeline.evals.data: .*missing.json: file not found"),
    ("pipeline.evals.limit=0", r"pipeline.evals.limit: must be > 0"),
    ("pipeline.evals.bbh_tasks=[navigat]", r"pipeline.evals.bbh_tasks: unknown BBH task 'navigat'"),
    ("pipeline.evals.task_max_new_tokens={gsm8k100: 64}", r"task_max_new_tokens.gsm8k100: not one of pipeline.evals.tasks"),
    ("pipeline.evals={tasks: [arithmetic], task_max_new_tokens: {arithmetic: 0}}", r"arithmetic: must be an integer >= 1"),
    ("pipeline.evals.shots=-1", r"pipeline.evals.shots: must be >= 0"),
    ("pipeline.evals.hhh_split=val", r"pipeline.evals.hhh_split: expected one of"),
    ("pipeline.evals.template=chatml", r"pipeline.evals.template: expected one of"),
    ("pipeline.stages.sft.overrides=[train.lr=-1]", r"pipeline.stages.sft \(recipes/tiny_sft.yaml\): train.lr: must be > 0"),
    ("pipeline.stages.dpo.overrides=[dpo.loss_type=sigmod]", r"pipeline.stages.dpo .*dpo.loss_type: .*did you mean 'sigmoid'"),
    ("pipeline.stages.sft.overrides=[lora.lr=1e-3]", r"pipeline.stages.sft .*did you mean 'lora.r' or 'train.lr'"),
    ("pipeline.stages.sequential.after=sft_sparse2", r"pipeline.stages.sequential.after: no stage named"),
    ("pipeline.model=builtin:tiny-gpt", r"pipeline.stages.sft .*model.name: unknown builtin model"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0][9:40] for b in BAD])
def test_bad_pipeline_is_refused_at_load(override, message, monkeypatch):
    monkeypatch.chdir(REPO)  # the stage recipes are relative to the repository root
    with pytest.raises(RecipeError, match=message):
        load_pipeline(TINY_PAFT, [override])


def test_bad_pipeline_cli_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    res = subprocess.run([sys.executable, "-m", "engine.train", TINY_PAFT, f"pipeline.output_dir={out}",
                          MERGE % "density: 1.5"], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: pipeline.merges[0]") and res.stderr.count("\n") == 1
    assert not out.exists()  # no stage trained, nothing written


def test_weights_are_never_zipped_short():
    with pytest.raises(ValueError, match="1 weights for 2 models"):
        mergekit_config({"method": "ties", "models": ["a", "b"], "weight": [1.0]}, "base", {"a": "A", "b": "B"})
    one = mergekit_config({"method": "ties", "models": ["a", "b"], "weight": 0.5}, "base", {"a": "A", "b": "B"})
    assert [m["parameters"]["weight"] for m in one["models"]] == [0.5, 0.5]  # a number is for every model


def test_record_is_current_only_for_the_same_spec(tmp_path):
    out = str(tmp_path / "step")
    r = Record(out, {"config": {"models": [{"w": 1.0}, {"w": 1.0}]}, "inputs": {"a": "x"}})
    assert not r.current() and "no record" in r.what_changed()
    r.write()
    assert Record(out, {"config": {"models": [{"w": 1.0}, {"w": 1.0}]}, "inputs": {"a": "x"}}).current()
    changed = Record(out, {"config": {"models": [{"w": 1.0}, {"w": 0.5}]}, "inputs": {"a": "x"}})
    assert not changed.current() and changed.what_changed() == "config.models[1].w: 1.0 -> 0.5"
    assert not Record(out, {"config": {"models": [{"w": 1.0}, {"w": 1.0}]}, "inputs": {"a": "y"}}).current()
    (tmp_path / "step.spec.json").write_text("{torn")
    assert not r.current()  # a torn record redoes the step
    assert changes({"a": 1}, {"a": 1, "b": 2}) == ["b: '<unset>' -> 2"]


def _mini_pipeline(tmp_path, weight, lr="3.0e-3"):
    """Two 2-step SFT stages of the tiny model, one linear merge, one small evaluation."""
    stage = {"recipe": "recipes/tiny_sft.yaml",
             "overrides": ["train.max_steps=2", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=0",
                           "data.num_train=32", "data.num_eval=8", f"train.lr={lr}"]}
    raw = {"pipeline": {"output_dir": str(tmp_path / "out"), "model": "builtin:tiny-llama",
                        "stages": {"a": stage, "b": {**stage, "overrides": stage["overrides"] + ["train.seed=1"]}},
                        "merges": [{"method": "linear", "models": ["a", "b"], "weight": weight}],
                        "evals": {"tasks": ["arithmetic"], "limit": 2, "max_new_tokens": 4, "batch_size": 2}}}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_pipeline(str(path))


@pytest.mark.slow
def test_changed_merge_weights_redo_the_merge_and_its_evaluation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PYTHONPATH", REPO)  # the stages' subprocesses import this checkout
    out = tmp_path / "out"
    run_pipeline(_mini_pipeline(tmp_path, [1.0, 0.0]))
    first = load_file(str(out / "merges" / "linear" / "model.safetensors"))
    capsys.readouterr()

    run_pipeline(_mini_pipeline(tmp_path, [1.0, 0.0]))  # same spec: everything skipped
    log = capsys.readouterr().out
    assert "merge linear: done, skipped" in log and "evaluate linear: done, skipped" in log

    run_pipeline(_mini_pipeline(tmp_path, [0.0, 1.0]))  # changed weights: the merge and its evaluation redone
    log = capsys.readouterr().out
    assert "stage a: done, skipped" in log and "stage b: done, skipped" in log
    assert "merge linear: redone, its output is stale" in log
    assert "models[0].parameters.weight: 1.0 -> 0.0" in log
    assert "evaluate linear: redone" in log and "evaluate a: done, skipped" in log
    second = load_file(str(out / "merges" / "linear" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (first[q] == second[q]).all()  # the stale merge is not what is reported
    spec = json.loads((out / "merges" / "linear.spec.json").read_text())["spec"]
    assert [m["parameters"]["weight"] for m in spec["config"]["models"]] == [0.0, 1.0]

    # A finished stage whose recipe changed is refused before any work, and nothing is touched.
    stamp = {p: os.stat(p).st_mtime_ns for p in (out / "a" / "summary.json", out / "merges" / "linear.spec.json")}
    with pytest.raises(RecipeError, match=r"pipeline.stages.a: .* finished under another spec "
                                          r"\(recipe.train.lr: 0.003 -> 0.01.*remove .* to retrain it"):
        run_pipeline(_mini_pipeline(tmp_path, [0.0, 1.0], lr="1.0e-2"))
    assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp


def test_evals_settings_reach_the_evals_command(monkeypatch):
    # Every pipeline.evals key is passed to python -m paft_evals, and evals' own parser accepts the result.
    from engine.pipeline import evals_args
    from paft_evals.__main__ import build_parser, parse_max_new_tokens, parse_per_task
    monkeypatch.chdir(REPO)
    cfg = load_pipeline(TINY_PAFT, ["pipeline.evals={tasks: [bigbench_bbh, hhh, gsm8k100], bbh_tasks: [navigate], "
                                    "shots: 1, hhh_split: all, max_new_tokens: 8, task_max_new_tokens: {gsm8k100: 96}, "
                                    "task_limit: {hhh: 7}}"])
    a = build_parser().parse_args([*evals_args("some/adapter", "sft", cfg.evals), "--out", "x.json"])
    assert (a.bbh_tasks, a.shots, a.hhh_split) == ("navigate", 1, "all")
    tasks = ["bigbench_bbh", "hhh", "gsm8k100"]
    assert parse_per_task(a.limit, tasks, "--limit") == (cfg.evals.limit, {"hhh": 7})
    assert parse_max_new_tokens(a.max_new_tokens, tasks) == (8, {"gsm8k100": 96})
    with pytest.raises(ValueError, match=r"--limit 'mc=3': 'mc' is not one of --tasks"):
        parse_per_task(["mc=3"], tasks, "--limit")
