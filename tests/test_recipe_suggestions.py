"""Issue 14, class 7: a key written in the wrong section names the full path it belongs at."""
import os
import subprocess
import sys

import pytest

from engine.pipeline import load_pipeline
from engine.recipe import RecipeError, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SFT = os.path.join(REPO, "recipes", "tiny_sft.yaml")
TINY_PAFT = os.path.join(REPO, "recipes", "tiny_paft.yaml")

CASES = [  # override, the whole message after "unknown key"
    ("distributed=ddp", "'distributed' (did you mean 'train.distributed'?)"),
    ("lora.lr=1e-3", "'lora.lr' (did you mean 'lora.r' or 'train.lr'?)"),
    ("lr=1e-3", "'lr' (did you mean 'train.lr'?)"),           # not the section 'lora', a weak guess
    ("r=4", "'r' (did you mean 'lora.r'?)"),
    ("max_length=64", "'max_length' (did you mean 'data.max_length'?)"),
    ("train.beta=0.2", "'train.beta' (did you mean 'train.betas' or 'dpo.beta'?)"),
    ("train.template=vicuna", "'train.template' (did you mean 'data.template'?)"),
    ("model.target_modules=[q_proj]", "'model.target_modules' (did you mean 'lora.target_modules'?)"),
    ("data.seed=3", "'data.seed' (did you mean 'train.seed'?)"),
    ("train.lamda=1e-4", "'train.lamda' (did you mean 'l1.lambda'?)"),  # a near spelling elsewhere
    ("model.dtyp=float32", "'model.dtyp' (did you mean 'model.dtype'?)"),  # a plain typo stays local
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_wrong_section_suggests_the_full_path(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY_SFT, [override])
    assert str(e.value) == f"unknown key {message}"


PIPELINE_CASES = [
    ("output_dir=out/x", "'output_dir' (did you mean 'pipeline.output_dir'?)"),
    ("model=builtin:tiny-llama", "'model' (did you mean 'pipeline.model'?)"),
    ("pipeline.limit=3", "'pipeline.limit' (did you mean 'pipeline.evals.limit'?)"),
    ("pipeline.evals.threads=2", "'pipeline.evals.threads' (did you mean 'pipeline.threads'?)"),
]


@pytest.mark.parametrize("override,message", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_pipeline_keys_in_the_wrong_place(override, message, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(RecipeError) as e:
        load_pipeline(TINY_PAFT, [override])
    assert str(e.value).startswith(f"unknown key {message}")


def test_cli_prints_the_suggestion_on_one_line():
    res = subprocess.run([sys.executable, "-m", "engine.train", TINY_SFT, "distributed=ddp", "--print-config"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr == "error: unknown key 'distributed' (did you mean 'train.distributed'?)\n"
