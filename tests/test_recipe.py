"""Recipe loading: defaults, overrides, and one-line errors for bad input."""
import os
import subprocess
import sys

import pytest
import yaml

from engine.recipe import Recipe, RecipeError, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = {
    "model": {"name": "builtin:tiny-llama"},
    "data": {"source": "builtin:arithmetic"},
    "output_dir": "out/x",
}


def write(tmp_path, raw, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return str(path)


def with_key(dotted, value):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return raw


def test_defaults_and_types(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    assert isinstance(r, Recipe)
    assert r.lora.r == 8 and r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.train.scheduler == "constant" and r.train.max_grad_norm == 1.0
    assert r.data.template == "tokenizer"


def test_overrides_parse_yaml_values(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["train.lr=1e-4", "lora.target_modules=[q_proj,k_proj]",
                                             "train.max_grad_norm=null", "lora.rslora=true", "train.max_steps=7"])
    assert r.train.lr == pytest.approx(1e-4)
    assert r.lora.target_modules == ["q_proj", "k_proj"]
    assert r.train.max_grad_norm is None and r.lora.rslora is True and r.train.max_steps == 7


def test_shipped_recipes_validate():
    for name in ("tiny_sft.yaml", "tiny_dpo.yaml", "quickstart/sft.yaml", "quickstart/dpo.yaml"):
        load_recipe(os.path.join(REPO, "recipes", name))


def test_quickstart_is_the_paft_pipeline(monkeypatch):
    # What the README promises of `python -m engine.train recipes/quickstart.yaml`.
    from engine.pipeline import load_pipeline, merge_variants
    monkeypatch.chdir(REPO)
    cfg = load_pipeline("recipes/quickstart.yaml")
    assert cfg.model == "smollm2-135m-instruct"
    assert {n: (s.recipe, s.after) for n, s in cfg.stages.items()} == {
        "sft": ("recipes/quickstart/sft.yaml", None), "sft_sparse": ("recipes/quickstart/sft.yaml", None),
        "dpo": ("recipes/quickstart/dpo.yaml", None), "sequential": ("recipes/quickstart/dpo.yaml", "sft")}
    sparse = load_recipe(cfg.stages["sft_sparse"].recipe, cfg.stages["sft_sparse"].overrides)
    assert sparse.l1.lam > 0 and load_recipe(cfg.stages["sft"].recipe).l1.lam == 0
    dpo = load_recipe(cfg.stages["dpo"].recipe)
    # DPO on real pairs: HarmBench val with the base model's own answers as rejected (HHH's pairs are gone
    # with bigbench 1.0.0: nothing the quickstart reads may need a withdrawn package)
    assert dpo.train.method == "dpo" and dpo.data.source == "builtin:harmbench"
    assert dpo.data.harmbench_rejected == "generate"
    assert load_recipe(cfg.stages["sft"].recipe).data.source == "builtin:arithmetic"
    variants = [v for spec in cfg.merges for v, _ in merge_variants(spec)]
    assert {"ties", "ties_dense"} == set(variants)
    assert cfg.evals.tasks == ["arithmetic", "refusal", "over_refusal", "truthfulqa_mc", "bigbench_bbh"]
    assert cfg.evals.bbh_tasks == ["navigate", "sports_understanding"]


BAD = [
    # (raw recipe or override, expected fragment of the message)
    (with_key("train.lr_rate", 1e-3), "unknown key 'train.lr_rate' (did you mean 'train.lr'?)"),
    (with_key("lora.rank", 8), "unknown key 'lora.rank'"),
    (with_key("trian", {}), "did you mean 'train'"),
    (with_key("train.max_steps", "ten"), "train.max_steps: expected an integer"),
    (with_key("train.max_steps", 0), "train.max_steps: must be > 0"),
    (with_key("train.max_steps", 2.5), "train.max_steps: expected an integer"),
    (with_key("lora.dropout", 1.5), "lora.dropout: must be in [0, 1)"),
    (with_key("train.scheduler", "cosin"), "did you mean 'cosine'"),
    (with_key("model.gradient_checkpointing", "yes"), "model.gradient_checkpointing: expected true/false"),
    (with_key("data.source", "missing.jsonl"), "data.source: file not found: missing.jsonl"),
    (with_key("data.source", "data.csv"), "data.source: expected"),
    (with_key("data.source", "builtin:poetry"), "unknown builtin source"),
    (with_key("model.name", "./no/such/model"), "model.name: not found"),
    (with_key("model.name", "weights.gguf"), "model.name: file not found: weights.gguf"),
    (with_key("model.name", "builtin:huge"), "unknown builtin model"),
    (with_key("data.template", "alpaca"), "data.template: must be one of tokenizer, vicuna, mistral"),
    (with_key("train.betas", [0.9]), "train.betas: must be two numbers"),
    (with_key("lora.target_modules", []), "lora.target_modules: must name at least one module"),
    (with_key("lora.target_modules", 3), "lora.target_modules: expected"),
    (with_key("train.warmup_steps", 500), "train.warmup_steps: 500 is more than train.max_steps"),
    (with_key("train.resume", "no/such/ckpt"), "train.resume: checkpoint directory not found"),
    (with_key("data.columns", ["prompt"]), "data.columns: expected a mapping"),
    ({"model": {"name": "builtin:tiny-llama"}, "output_dir": "o"}, "missing required key 'data'"),
    ({"model": {}, "data": {"source": "builtin:arithmetic"}, "output_dir": "o"}, "missing required key 'model.name'"),
    ("model: [unclosed", "not valid YAML"),
    ("- a list\n- not a mapping", "must be a YAML mapping"),
]


@pytest.mark.parametrize("raw,fragment", BAD, ids=[f[1][:40] for f in BAD])
def test_bad_recipes_name_the_key(tmp_path, monkeypatch, raw, fragment):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, raw)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_bad_override_syntax(tmp_path):
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(write(tmp_path, BASE), ["train.lr"])
    with pytest.raises(RecipeError, match="unknown key 'train.lrr'"):
        load_recipe(write(tmp_path, BASE), ["train.lrr=1"])


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found: nope.yaml"):
        load_recipe("nope.yaml")


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "engine.train", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})


def test_cli_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, with_key("train.lr_rate", 1e-3))
    res = run_cli(path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown key 'train.lr_rate'")
    assert "Traceback" not in res.stderr
    debug = run_cli(path, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_print_config_and_help(tmp_path):
    path = write(tmp_path, BASE)
    res = run_cli(path, "train.lr=0.01", "--print-config")
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert printed["train"]["lr"] == 0.01 and printed["lora"]["r"] == 8
    helped = run_cli("--help")
    assert helped.returncode == 0 and "train.max_grad_norm" in helped.stdout


def test_l1_section_as_the_paper_writes_it(tmp_path):
    # `on:` is a YAML 1.1 boolean key; `lambda` a Python keyword: both must still work.
    text = yaml.safe_dump(BASE) + "l1:\n  lambda: 1e-4\n  on: factors\n"
    r = load_recipe(write(tmp_path, text))
    assert r.l1.lam == pytest.approx(1e-4) and r.l1.on == "factors"
    with pytest.raises(RecipeError, match="l1.lambda: must be >= 0"):
        load_recipe(write(tmp_path, BASE), ["l1.lambda=-1"])
