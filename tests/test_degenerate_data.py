"""Issue 14, class 6: degenerate data is counted, not trained on."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from engine.data import encode_pair, encode_pairs
from engine.lora import apply_lora
from engine.models import load_model_and_tokenizer
from engine.recipe import LoRAConfig, ModelConfig
from engine.train_setup import data_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DPO = os.path.join(REPO, "recipes", "tiny_dpo.yaml")
TINY_SFT = os.path.join(REPO, "recipes", "tiny_sft.yaml")


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))


def pair(chosen, rejected, prompt="Say something kind."):
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected}


def test_identical_pairs_are_dropped_and_counted(tiny):
    _, tok = tiny
    examples = [pair("Thank you, friend.", "Go away."),           # kept
                pair("Thank you.", "Thank you."),                 # identical answers
                pair("Thanks" + " a" * 200, "Thanks" + " a" * 200 + " lot"),  # differ only past max_length
                pair("Yes.", "No.")]                              # kept
    encoded, report = encode_pairs(examples, tok, "tokenizer", max_length=96)
    assert report["kept"] == 2 and report["identical"] == 2 and report["first_identical"] == 1
    assert report["dropped"] == 0 and len(encoded) == 2
    assert encode_pair(examples[1], tok, "tokenizer", 96) is None
    # with room for the whole answers the third pair differs again, and is kept
    _, long_report = encode_pairs(examples[2:3], tok, "tokenizer", max_length=2048)
    assert long_report["kept"] == 1 and long_report["identical"] == 0


def test_unusable_rows_count_toward_max_bad_fraction():
    d = SimpleNamespace(max_bad_fraction=0.1, max_length=16)
    ok = data_counts(d, {"rows": 20, "bad": 1, "source": "x.jsonl"}, {"dropped": 1, "identical": 0})
    assert ok == {"rows": 20, "malformed": 1, "no_trained_token": 1, "identical_pairs": 0}
    # each cause alone is under the bound, together they pass it
    with pytest.raises(ValueError, match=r"3 of 20 training rows of x.jsonl are unusable \(1 malformed or empty, "
                                         r"1 with no trained token within data.max_length=16, 1 pairs"):
        data_counts(d, {"rows": 20, "bad": 1, "source": "x.jsonl"}, {"dropped": 1, "identical": 1})
    with pytest.raises(ValueError, match="3 of 20"):
        data_counts(d, {"rows": 20, "bad": 0, "source": "x.jsonl"}, {"dropped": 3})  # SFT: truncated only


@pytest.mark.parametrize("r,targets,layer", [(33, ["v_proj"], "model.layers.0.self_attn.v_proj (32 x 64)"),
                                             (65, ["q_proj"], "model.layers.0.self_attn.q_proj (64 x 64)"),
                                             (40, "all-linear", "model.layers.0.self_attn.k_proj (32 x 64)")])
def test_lora_rank_above_a_layer_side_is_an_error_naming_it(r, targets, layer):
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    with pytest.raises(ValueError, match=rf"lora.r: {r} is more than the smaller side of {re.escape(layer)}"):
        apply_lora(model, LoRAConfig(r=r, target_modules=targets))
    apply_lora(model, LoRAConfig(r=32, target_modules=["v_proj"]))  # r = min(in, out) is allowed


def _train(tmp_path, recipe, *overrides):
    return subprocess.run([sys.executable, "-m", "engine.train", recipe, f"output_dir={tmp_path / 'run'}",
                           "train.max_steps=2", "train.save_every=0", "train.eval_every=0", "train.warmup_steps=0",
                           "train.batch_size=4", *overrides],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_cli_counts_identical_pairs_and_refuses_too_many(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(20)]
    long = "Well" + " well" * 40  # past data.max_length=96 with the prompt: two answers that differ only after it

    def same_within_max_length(i):
        rows[i]["chosen"], rows[i]["rejected"] = long + " yes.", long + " no."

    same_within_max_length(3)  # one of 20 (5 %): counted, training goes on
    # (answers equal as text are already malformed rows for the loader; these differ as text, not as tokens)
    res = _train(tmp_path, TINY_DPO, f"data.source={_write_jsonl(tmp_path / 'p.jsonl', rows)}", "data.max_length=96")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 dropped as chosen = rejected within max_length" in res.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["identical_pairs"] == 1 and summary["data"]["rows"] == 20
    for i in (5, 6, 7):  # four of 20 (20 %) > data.max_bad_fraction = 0.1: refused, exit 2
        same_within_max_length(i)
    res = _train(tmp_path / "b", TINY_DPO, f"data.source={_write_jsonl(tmp_path / 'q.jsonl', rows)}",
                 "data.max_length=96")
    assert res.returncode == 2 and res.stderr.startswith("error: data: 4 of 20 training rows")
    assert "4 pairs whose chosen and rejected are the same tokens" in res.stderr and res.stderr.count("\n") == 1


def test_train_cli_counts_rows_truncated_to_nothing(tmp_path):
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}"} for i in range(10)]
    for i in range(3):  # a prompt longer than max_length leaves no answer token: not trained, counted
        rows[i]["prompt"] = "Please think very carefully about this long question. " * 3 + rows[i]["prompt"]
    res = _train(tmp_path, TINY_SFT, f"data.source={_write_jsonl(tmp_path / 's.jsonl', rows)}",
                 "data.max_length=64")
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.startswith("error: data: 3 of 10 training rows") and "3 with no trained token" in res.stderr
