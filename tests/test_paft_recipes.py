"""recipes/paft: the PAFT paper's recipes (Pentyala et al. 2024; Mistral-7B and Llama-3-8B, LoRA,
SFT on UltraChat-200k, L1-sparse SFT, DPO on UltraFeedback, the PAFT pipelines) and Thakkar et
al.'s SFT/DPO merges (SLERP, DARE). They run where a GPU and the hub are; here they are checked
without either: the values each recipe sets, --print-config, a 2-step dry run of every training
recipe on fixtures in the hub datasets' schemas with the tiny model, every merge of the pipelines
as a mergekit config the merge CLI accepts and runs, and the two merge configs run on tiny
stand-in adapters."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from engine.log import read_metrics
from engine.lora import apply_lora, merge_lora, save_adapter
from engine.models import load_model_and_tokenizer
from engine.pipeline import load_pipeline, merge_variants, mergekit_config, pipeline_to_dict
from engine.recipe import LoRAConfig, ModelConfig, load_recipe, recipe_to_dict
from engine.train import main as train_main
from engine.train import run
from paft_evals.tasks import NEEDS_DATA, TASKS
from merge import __main__ as merge_cli
from merge import config as merge_config
from merge import methods as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAFT = os.path.join(REPO, "recipes", "paft")
MERGES = os.path.join(PAFT, "merges")
FIXTURES = os.path.join(REPO, "tests", "fixtures")
ULTRACHAT = os.path.join(FIXTURES, "ultrachat", "train_sft.jsonl")            # HuggingFaceH4/ultrachat_200k rows
ULTRAFEEDBACK = os.path.join(FIXTURES, "ultrafeedback", "train_prefs.jsonl")  # ultrafeedback_binarized rows

MODELS = {"mistral7b": "mistralai/Mistral-7B-v0.1", "llama3_8b": "meta-llama/Meta-Llama-3-8B"}
TEMPLATES = {"mistral7b": "mistral", "llama3_8b": "vicuna"}
STAGES = {"sft": "sft_ultrachat", "sft_sparse": "sft_sparse_ultrachat", "dpo": "dpo_ultrafeedback"}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINING = sorted(f"{stem}_{model}.yaml" for stem in STAGES.values() for model in MODELS)
PIPELINES = sorted(f"paft_{model}.yaml" for model in MODELS)
MERGE_CONFIGS = ["thakkar_dare.yaml", "thakkar_slerp.yaml"]
ROWS = {"train_sft": 207_865, "train_prefs": 61_135}  # the hub splits' sizes: max_steps is one epoch
CPU = torch.device("cpu")


def model_of(name: str) -> str:
    return next(m for m in MODELS if name.endswith(f"_{m}.yaml"))


def stage_of(name: str) -> str:
    return next(s for s, stem in STAGES.items() if name.startswith(stem + "_"))


def recipe(name: str, *overrides):
    return load_recipe(os.path.join(PAFT, name), list(overrides))


# ---------------------------------------------------------------------------- 1. the files and their values

def test_the_expected_files_and_nothing_else():
    # laptop.yaml is this project's own 3-seed CPU reproduction (tests/test_seeds.py runs its tiny twin),
    # not one of the paper's settings, so it neither cites the paper nor belongs to these lists
    assert sorted(f for f in os.listdir(PAFT) if f.endswith(".yaml") and f != "laptop.yaml") == sorted(TRAINING + PIPELINES)
    assert sorted(os.listdir(MERGES)) == MERGE_CONFIGS
    for name in TRAINING + PIPELINES + [os.path.join("merges", m) for m in MERGE_CONFIGS]:
        with open(os.path.join(PAFT, name)) as f:
            header = f.read().split("\n", 3)[:3]
        cited = "Pentyala et al. 2024" if not name.startswith("merges") else "Thakkar et al. 2024"
        assert header[0].startswith("#") and cited in " ".join(header), name  # each file cites its paper


@pytest.mark.parametrize("name", TRAINING)
def test_training_recipe_values(name):
    r, model, stage = recipe(name), model_of(name), stage_of(name)
    assert r.model.name == MODELS[model] and r.model.gradient_checkpointing
    assert (r.lora.r, r.lora.alpha, r.lora.dropout, r.lora.quantize_base) == (16, 32.0, 0.05, None)
    assert r.lora.target_modules == ALL_LINEAR
    assert r.data.template == TEMPLATES[model]
    assert r.output_dir == f"out/paft/{model}/{stage}"
    assert r.train.batch_size * r.train.grad_accum == 32
    assert r.train.warmup_steps == r.train.max_steps // 10
    assert (r.train.scheduler, r.train.max_grad_norm, r.train.resume) == ("cosine", 1.0, "auto")
    epoch = ROWS[r.data.split] / 32
    assert abs(r.train.max_steps - epoch) / epoch < 0.01, (r.train.max_steps, epoch)
    if stage == "dpo":
        assert (r.data.source, r.data.format) == ("hf:HuggingFaceH4/ultrafeedback_binarized", "ultrafeedback")
        assert (r.data.split, r.data.eval_split, r.data.max_length) == ("train_prefs", "test_prefs", 1024)
        assert (r.train.method, r.train.lr) == ("dpo", 5e-5)
        assert (r.dpo.beta, r.dpo.loss_type, r.dpo.label_smoothing) == (0.1, "sigmoid", 0.0)
        assert r.l1.lam == 0.0
    else:
        assert (r.data.source, r.data.format) == ("hf:HuggingFaceH4/ultrachat_200k", "auto")
        assert (r.data.split, r.data.eval_split, r.data.max_length) == ("train_sft", "test_sft", 2048)
        assert (r.train.method, r.train.lr) == ("sft", 2e-4)
        assert (r.l1.lam, r.l1.on) == ((1e-4, "product") if stage == "sft_sparse" else (0.0, "product"))


@pytest.mark.parametrize("model", MODELS)
def test_sparse_sft_differs_from_dense_sft_only_by_the_l1_penalty(model):
    dense = recipe_to_dict(recipe(f"sft_ultrachat_{model}.yaml"))
    sparse = recipe_to_dict(recipe(f"sft_sparse_ultrachat_{model}.yaml"))
    assert sparse.pop("l1") != dense.pop("l1")
    assert sparse.pop("output_dir") != dense.pop("output_dir")
    assert sparse == dense


@pytest.mark.parametrize("stage", STAGES.values())
def test_the_two_models_share_every_setting_but_model_template_and_micro_batch(stage):
    a, b = (recipe_to_dict(recipe(f"{stage}_{m}.yaml")) for m in MODELS)
    for d in (a, b):
        del d["model"]["name"], d["data"]["template"], d["output_dir"]
        d["train"]["micro"] = (d["train"].pop("batch_size"), d["train"].pop("grad_accum"))
    assert a["train"].pop("micro") != b["train"].pop("micro")
    assert a == b


@pytest.mark.parametrize("name", TRAINING)
def test_print_config_in_process(name, capsys):
    assert train_main([os.path.join(PAFT, name), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == recipe_to_dict(recipe(name))


@pytest.mark.parametrize("name", ["sft_sparse_ultrachat_llama3_8b.yaml", "paft_mistral7b.yaml"])
def test_print_config_command_line(name):
    override = "l1.lambda=1e-3" if name.startswith("sft") else "pipeline.evals.limit=7"
    res = subprocess.run([sys.executable, "-m", "engine.train", os.path.join("recipes", "paft", name), override,
                          "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    if name.startswith("sft"):
        assert printed["l1"] == {"lambda": 1e-3, "on": "product"}
        assert printed["model"]["name"] == "meta-llama/Meta-Llama-3-8B"
    else:
        assert printed["pipeline"]["evals"]["limit"] == 7
        assert set(printed["pipeline"]["stages"]) == {"sft", "sft_sparse", "dpo", "sequential"}


# ---------------------------------------------------------------------------- 2. dry runs on the fixtures

@pytest.mark.parametrize("name", TRAINING)
def test_dry_run_on_fixtures(tmp_path, name):
    # The recipe as written, with the model and the hub dataset swapped for local stand-ins: the
    # tiny model, and fixture rows in the hub datasets' exact schemas (a .jsonl source reads the
    # same file for the train and eval splits). 2 of the 8 UltraFeedback fixture rows are malformed
    # on purpose, hence max_bad_fraction.
    stage = stage_of(name)
    source = ULTRAFEEDBACK if stage == "dpo" else ULTRACHAT
    r = recipe(name, "model.name=builtin:tiny-llama", f"data.source={source}", "data.max_bad_fraction=0.3",
               "data.max_length=256", "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
               "train.warmup_steps=0", "train.eval_batches=1", f"output_dir={tmp_path}",
               "logging.progress_bar=false")
    summary = run(r)
    assert summary["steps"] == 2 and math.isfinite(summary["eval_loss"])
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (16, 32, sorted(ALL_LINEAR))
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 2 * 7 * 2  # A and B, 7 modules, 2 layers of the tiny model
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert saved["data"]["template"] == TEMPLATES[model_of(name)] and saved["lora"]["quantize_base"] is None
    train = [row for row in read_metrics(str(tmp_path / "metrics.jsonl")) if "loss" in row]
    assert [row["step"] for row in train] == [1, 2] and all(math.isfinite(row["loss"]) for row in train)
    if stage == "sft_sparse":
        # λ‖δ‖₁ is logged every step: 0 at step 1 (B starts at zeros, so δ = 0), then positive
        assert train[0]["l1"] == 0.0 and train[1]["l1"] > 0
    else:
        assert all("l1" not in row for row in train)
    if stage == "dpo":
        check = [row for row in read_metrics(str(tmp_path / "metrics.jsonl")) if "check/step0_dpo_loss" in row]
        assert check and check[0]["check/ok"] and abs(check[0]["check/step0_dpo_loss"] - math.log(2)) < 1e-4
        assert train[0]["rewards/margins"] == 0.0 and "eval_rewards/accuracies" in summary


# ---------------------------------------------------------------------------- tiny stand-ins for merging

def tiny_adapter(base_dir, out_dir, seed, full_dir=None):
    """An adapter on the tiny base shaped as the recipes' (r 16, alpha 32, every linear layer) with
    random non-zero A and B; with full_dir, also the full checkpoint that folds it in."""
    model, _ = load_model_and_tokenizer(ModelConfig(name=base_dir, dtype="float32"), CPU)
    cfg = LoRAConfig(r=16, alpha=32, target_modules=ALL_LINEAR)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, out_dir, cfg, base_dir)
    if full_dir:
        merge_lora(model)
        model.save_pretrained(full_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("paft_merge")
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama", dtype="float32"), CPU)
    base = str(root / "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    out = {"root": root, "base": base}
    for seed, name in enumerate(["sft", "sft_sparse", "dpo"], start=1):
        out[name] = tiny_adapter(base, str(root / name / "adapter"), seed, full_dir=str(root / name / "merged"))
    return out


def tensors(out_dir):
    return {k: v for f in os.listdir(out_dir) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(out_dir, f)).items()}


# ---------------------------------------------------------------------------- 3. the pipelines

@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_validates_and_is_consistent(name, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # stage recipes are named relative to the repository, as in the README
    model = model_of(name)
    cfg = load_pipeline(os.path.join("recipes", "paft", name))
    assert cfg.model == MODELS[model] and cfg.output_dir == f"out/paft/{model}"
    assert set(cfg.stages) == {"sft", "sft_sparse", "dpo", "sequential"}
    for stage, sc in cfg.stages.items():
        expected = STAGES["dpo" if stage == "sequential" else stage]
        assert sc.recipe == f"recipes/paft/{expected}_{model}.yaml"
        assert sc.after == ("sft" if stage == "sequential" else None)
        # the stage as the pipeline runs it: the recipe, its overrides, the pipeline's base model
        r = load_recipe(sc.recipe, [*sc.overrides, f"model.name={cfg.model}"])
        assert r.model.name == cfg.model and r.data.template == cfg.evals.template == TEMPLATES[model]
    assert load_recipe(cfg.stages["sft_sparse"].recipe).l1.lam > 0
    assert load_recipe(cfg.stages["sft"].recipe).l1.lam == 0

    methods = {"ties", "dare_ties", "task_arithmetic", "linear", "slerp"}
    assert {spec["method"] for spec in cfg.merges} == methods
    sparse = [spec for spec in cfg.merges if spec["models"] == ["sft_sparse", "dpo"]]
    assert {spec["method"] for spec in sparse} == methods
    assert [spec["models"] for spec in cfg.merges if spec not in sparse] == [["sft", "dpo"]]  # the dense control
    variants = [v for spec in cfg.merges for v, _ in merge_variants(spec)]
    assert "ties_dense" in variants and "slerp" in variants
    assert len(variants) == len(set(variants)) == 10, variants  # a repeated name would be skipped as "done"
    assert set(cfg.evals.tasks) <= set(TASKS) and not set(cfg.evals.tasks) & set(NEEDS_DATA)

    assert train_main([os.path.join("recipes", "paft", name), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == pipeline_to_dict(cfg)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_merge_is_a_config_the_merge_cli_accepts(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_pipeline(os.path.join("recipes", "paft", name))
    adapters = {s: os.path.join(cfg.output_dir, s, "adapter") for s in cfg.stages}
    for spec in cfg.merges:
        for variant, params in merge_variants(spec):
            path = tmp_path / f"{variant}.yaml"
            path.write_text(yaml.safe_dump(mergekit_config(params, cfg.model, adapters), sort_keys=False))
            mc = merge_config.load_config(str(path))  # raises MergeError on a config the CLI refuses
            assert mc.method == spec["method"] and mc.base == cfg.model
            assert [m.name for m in mc.models] == [adapters[s] for s in spec["models"]]


def test_pipeline_merges_run_on_tiny_stage_adapters(tiny, tmp_path, monkeypatch):
    # Each merge of the Mistral pipeline as the pipeline writes it, over tiny adapters standing
    # in for its stages (the Llama pipeline's merges are the same specs; checked by the test above).
    monkeypatch.chdir(REPO)
    cfg = load_pipeline(os.path.join("recipes", "paft", "paft_mistral7b.yaml"))
    adapters = {s: tiny[s] for s in ("sft", "sft_sparse", "dpo")}
    base = tensors(tiny["base"])
    outs = {}
    for spec in cfg.merges:
        for variant, params in merge_variants(spec):
            path = tmp_path / f"{variant}.yaml"
            path.write_text(yaml.safe_dump(mergekit_config(params, tiny["base"], adapters), sort_keys=False))
            assert merge_cli.main([str(path), "--out", str(tmp_path / variant)]) == 0, variant
            outs[variant] = tensors(tmp_path / variant)
    name = "model.layers.0.mlp.down_proj.weight"
    for variant, out in outs.items():
        assert out.keys() == base.keys()
        assert not torch.equal(out[name], base[name]), variant
        assert torch.equal(out["model.norm.weight"], base["model.norm.weight"]), variant  # not adapted
    # the sweeps are real: another density or lambda gives another model
    assert not torch.equal(outs["ties_density0.3"][name], outs["ties_density0.7"][name])
    assert not torch.equal(outs["task_arithmetic_lambda0.5"][name], outs["task_arithmetic_lambda1"][name])
    # linear with weights 0.5/0.5 is the mean of the two folded models; slerp their midpoint on the sphere
    folded = [tensors(os.path.join(os.path.dirname(tiny[s]), "merged")) for s in ("sft_sparse", "dpo")]
    torch.testing.assert_close(outs["linear"][name], (folded[0][name] + folded[1][name]) / 2)
    torch.testing.assert_close(outs["slerp"][name], M.slerp(folded[0][name], folded[1][name], 0.5))


# ---------------------------------------------------------------------------- 4. Thakkar et al.'s merge configs

def thakkar_output_dir(name):
    return load_recipe(os.path.join(REPO, "recipes", "thakkar", f"{name}.yaml")).output_dir


def test_merge_configs_load_and_name_the_thakkar_runs():
    dare = merge_config.load_config(os.path.join(MERGES, "thakkar_dare.yaml"))
    assert (dare.method, dare.base, dare.dtype) == ("dare_ties", "mistralai/Mistral-7B-v0.1", torch.bfloat16)
    assert [m.name for m in dare.models] == [f"{thakkar_output_dir(n)}/adapter" for n in ("sft_hh_helpful",
                                                                                           "dpo_hh_helpful")]
    assert [m.params for m in dare.models] == [{"weight": 0.5, "density": 0.5}] * 2
    slerp = merge_config.load_config(os.path.join(MERGES, "thakkar_slerp.yaml"))
    assert (slerp.method, slerp.params, slerp.dtype) == ("slerp", {"t": 0.5}, torch.bfloat16)
    assert slerp.base == "mistralai/Mistral-7B-v0.1"
    assert [m.name for m in slerp.models] == [f"{thakkar_output_dir(n)}/adapter"  # t = 0: SFT, t = 1: DPO
                                              for n in ("sft_hh_helpful", "dpo_hh_helpful")]


def substituted(config_name, tmp_path, paths):
    """The merge config as written, with its model paths replaced by tiny stand-ins."""
    with open(os.path.join(MERGES, config_name)) as f:
        cfg = yaml.safe_load(f)
    cfg["base_model"] = paths[cfg["base_model"]]
    for entry in cfg["models"]:
        entry["model"] = paths[entry["model"]]
    path = tmp_path / config_name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_thakkar_dare_runs_on_tiny_adapters(tiny, tmp_path):
    sft, dpo = (thakkar_output_dir(n) for n in ("sft_hh_helpful", "dpo_hh_helpful"))
    cfg = substituted("thakkar_dare.yaml", tmp_path, {"mistralai/Mistral-7B-v0.1": tiny["base"],
                                                      f"{sft}/adapter": tiny["sft"], f"{dpo}/adapter": tiny["dpo"]})
    assert merge_cli.main([cfg, "--out", str(tmp_path / "out")]) == 0
    out, base = tensors(tmp_path / "out"), tensors(tiny["base"])
    assert all(v.dtype == torch.bfloat16 for v in out.values())  # dtype: bfloat16
    for name, value in out.items():
        changed = (value != base[name].bfloat16()).float().mean().item()
        if any(f".{m}." in name for m in ALL_LINEAR):
            # each task vector keeps a random half of its entries (density 0.5): about 3/4 of the
            # entries get an update from one adapter or both, not all of them
            assert 0.6 < changed < 0.9, (name, changed)
        else:
            assert changed == 0.0, name


def test_thakkar_slerp_runs_on_tiny_adapters(tiny, tmp_path):
    # From the two adapters it equals SLERP of the two folded models (up to bf16 rounding of the output).
    sft, dpo = (thakkar_output_dir(n) for n in ("sft_hh_helpful", "dpo_hh_helpful"))
    folded = {s: os.path.join(os.path.dirname(tiny[s]), "merged") for s in ("sft", "dpo")}
    cfg = substituted("thakkar_slerp.yaml", tmp_path, {"mistralai/Mistral-7B-v0.1": tiny["base"],
                                                       f"{sft}/adapter": tiny["sft"], f"{dpo}/adapter": tiny["dpo"]})
    assert merge_cli.main([cfg, "--out", str(tmp_path / "out")]) == 0
    out, a, b = tensors(tmp_path / "out"), tensors(folded["sft"]), tensors(folded["dpo"])
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(a[name], b[name])
    for k in out:
        assert out[k].dtype == torch.bfloat16
        torch.testing.assert_close(out[k].float(), M.slerp(a[k].float(), b[k].float(), 0.5), rtol=1e-2, atol=1e-3)


def test_laptop_reproduction_validates_whole(tmp_path, monkeypatch):
    # recipes/paft/laptop.yaml as a user runs it, after `python -m paft_evals.laptop_data out/laptop/data`:
    # every stage, merge and evaluation setting passes load_pipeline, and the variants are the issue's.
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO, "recipes"), tmp_path / "recipes")
    os.symlink(os.path.join(REPO, "paft_evals"), tmp_path / "paft_evals")  # paft_evals/data/benign_prompts.jsonl
    data = tmp_path / "out" / "laptop" / "data"
    data.mkdir(parents=True)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (data / "sharegpt_train800.jsonl").write_text(json.dumps(chat) + "\n")
    cfg = load_pipeline("recipes/paft/laptop.yaml")
    assert cfg.seeds == [0, 1, 2]
    assert set(cfg.stages) == {"sft", "sft_sparse", "sft_chosen", "dpo", "dpo_lr40", "sequential"}
    assert not cfg.stages["dpo_lr40"].evaluate                            # claim (a) only: its deltas
    assert "train.method=sft" in cfg.stages["sft_chosen"].overrides       # Thakkar's control for (e1)
    variants = {v for spec in cfg.merges for v, _ in merge_variants(spec)}
    assert variants == {"ties", "dare_ties", "task_arithmetic", "ties_dense"}
    assert cfg.evals.limit >= 100 and cfg.evals.task_limit["over_refusal"] >= 121  # issue 25: n ≥ 100 per task
    assert {"bigbench_bbh", "truthfulqa_mc", "refusal", "strongreject"} <= set(cfg.evals.tasks)
    assert "hhh" not in cfg.evals.tasks  # bigbench 1.0.0 is withdrawn: a fresh machine cannot score it
    for column in cfg.findings.helpful + cfg.findings.harmless:  # every score column is one a task reports
        task = column.removeprefix("1-").split("/")[0]
        assert task in cfg.evals.tasks, column
