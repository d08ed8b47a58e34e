"""evals `mc` against lm-evaluation-harness itself: the same JSONL file, the same model directory,
lm_eval 0.4.13 run with `--model hf` on a local task with output_type: multiple_choice (offline).
Compared per document: each choice's log-likelihood, acc and acc_norm; then the CLI's totals.

The fixture's choices differ in length and some are not ASCII ("café", "naïve"), so a
normalisation by bytes, or one that counts the " " delimiter, disagrees on many items (the rule
this file once had differed on 10 of the 20 items with this model)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.models import load_model_and_tokenizer
from engine.recipe import ModelConfig
from paft_evals.__main__ import main as evals_main
from paft_evals.loading import load_target
from paft_evals.mc import SHARED_PREFIX_MIN, common_prefix_length, jsonl_items, score_items

pytest.importorskip("lm_eval")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "fixtures", "evals", "lm_eval_mc.jsonl")
TASK = """task: paft_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
# A header before every question, as a few-shot benchmark has (TruthfulQA's 6-shot prefix): with it
# paft_evals.mc scores through its shared-prefix cache (the header's keys and values computed once).
HEADER = ("Each question below has one right answer among several. Some answers are long and some "
          "are short, a few use letters outside plain English, and none is a trick. Read the question, "
          "then pick the answer that fits it best.\n\n")


@pytest.mark.slow
@pytest.mark.parametrize("header", ["", HEADER], ids=["plain", "shared_header"])
def test_mc_agrees_with_lm_eval_per_item(tmp_path, header):
    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    model_dir = tmp_path / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (tmp_path / "tasks").mkdir()
    task = TASK.format(data=DATA) + (f"description: {json.dumps(header)}\n" if header else "")
    (tmp_path / "tasks" / "task.yaml").write_text(task)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf",
                           "--model_args", f"pretrained={model_dir},dtype=float32", "--include_path",
                           str(tmp_path / "tasks"), "--tasks", "paft_fixture_mc", "--device", "cpu",
                           "--batch_size", "4", "--output_path", str(tmp_path / "lm_eval"), "--log_samples"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = [json.loads(line) for line in open(glob.glob(str(tmp_path / "lm_eval" / "*" / "samples_*.jsonl"))[0])]
    ref.sort(key=lambda r: r["doc_id"])
    totals = json.load(open(glob.glob(str(tmp_path / "lm_eval" / "*" / "results_*.json"))[0]))
    totals = totals["results"]["paft_fixture_mc"]

    ours_model, ours_tok, _ = load_target(str(model_dir), None, torch.device("cpu"), "float32")
    items = [{**it, "context": header + it["context"]} for it in jsonl_items(DATA)]
    assert (common_prefix_length([ours_tok(it["context"])["input_ids"] for it in items]) >= SHARED_PREFIX_MIN) \
        == bool(header)  # the header is long enough to take the cached path; without it, the plain one
    scored = score_items(ours_model, ours_tok, items, batch_size=4)
    assert len(scored) == len(ref) == 20
    for it, r in zip(scored, ref):
        lls = [float(resp[0][0]) for resp in r["resps"]]
        assert it["scores"] == pytest.approx(lls, abs=2e-4), f"doc {r['doc_id']}"
        assert float(it["pred"] in it["gold"]) == r["acc"], f"acc, doc {r['doc_id']}"
        assert float(it["pred_norm"] in it["gold"]) == r["acc_norm"], f"acc_norm, doc {r['doc_id']}"
    assert {r["acc"] for r in ref} == {0.0, 1.0} or {r["acc_norm"] for r in ref} == {0.0, 1.0}

    if header:  # the CLI reads the file as it is, with no header: its totals are the plain case's
        return
    out = tmp_path / "ours.json"
    assert evals_main([str(model_dir), "--tasks", "mc", "--data", f"mc={DATA}", "--dtype", "float32",
                       "--batch-size", "4", "--out", str(out)]) == 0
    mc = json.load(open(out))["tasks"]["mc"]
    assert mc["accuracy"] == pytest.approx(totals["acc,none"])
    assert mc["accuracy_norm"] == pytest.approx(totals["acc_norm,none"])
    assert mc["stderr"] == pytest.approx(totals["acc_stderr,none"])
    assert mc["n"] == 20
