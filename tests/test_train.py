"""The training loop end to end on the tiny recipe: loss, outputs, resume, NaN stop, early stopping."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from engine.log import read_metrics
from engine.recipe import load_recipe
from engine.train import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny_sft.yaml")


def tiny(tmp_path, *overrides):
    return load_recipe(TINY, [f"output_dir={tmp_path}", *overrides])


def test_tiny_sft_loss_goes_down_and_writes_outputs(tmp_path):
    summary = run(tiny(tmp_path / "run"))
    run_dir = tmp_path / "run"
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert len(train_rows) == 40
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"):
        assert key in train_rows[0]
    first = sum(r["loss"] for r in train_rows[:5]) / 5
    last = sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 4 and evals[-1] < evals[0]
    assert summary["eval_loss"] < evals[0]
    # trained token count is cumulative
    assert train_rows[-1]["trained_tokens"] > train_rows[0]["trained_tokens"] > 0
    # outputs
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    assert ckpts == ["step-000020", "step-000040"]


def test_second_run_into_same_dir_refuses_to_overwrite(tmp_path):
    run(tiny(tmp_path, "train.max_steps=2", "train.eval_every=0", "train.warmup_steps=0"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tiny(tmp_path, "train.max_steps=2", "train.eval_every=0", "train.warmup_steps=0"))


def test_grad_accum_equals_big_batch(tmp_path):
    common = ["train.max_steps=1", "train.eval_every=0", "train.warmup_steps=0", "lora.dropout=0.0"]
    run(tiny(tmp_path / "a", "train.batch_size=8", "train.grad_accum=1", *common))
    run(tiny(tmp_path / "b", "train.batch_size=4", "train.grad_accum=2", *common))
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    la = read_metrics(str(tmp_path / "a" / "metrics.jsonl"))[0]["loss"]
    lb = read_metrics(str(tmp_path / "b" / "metrics.jsonl"))[0]["loss"]
    assert la == pytest.approx(lb, rel=1e-5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


KILLER = textwrap.dedent("""
    # Run the tiny recipe and SIGKILL the process in the middle of a step (a forward pass),
    # after some checkpoints exist: what a crash or an OOM-kill does.
    import os, signal, sys
    import engine.train as train
    import engine.train_setup as train_setup
    from engine.recipe import load_recipe
    kill_at = int(sys.argv[1])
    calls = {"n": 0}
    real = train_setup.sft_objective
    def counting(model, batch, totals):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(model, batch, totals)
    train_setup.sft_objective = counting
    train.run(load_recipe(sys.argv[2], sys.argv[3:]))
""")


def test_kill_and_resume_is_bit_identical(tmp_path):
    overrides = ["train.max_steps=16", "train.save_every=5", "train.grad_accum=2", "train.batch_size=8",
                 "lora.dropout=0.1", "train.eval_every=4", "train.eval_batches=1"]
    # Uninterrupted reference run.
    run(tiny(tmp_path / "ref", *overrides))
    # Killed during the forward of step 13's second micro-batch (training forwards only count:
    # eval runs under no_grad but calls the same loss, so count them too: 2 per step + 1 per eval).
    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    kill_at = 12 * 2 + 3 * 1 + 2  # 12 full steps, 3 evaluations (steps 4, 8, 12), then step 13's 2nd forward
    res = subprocess.run([sys.executable, str(script), str(kill_at), TINY, f"output_dir={killed}", *overrides],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not (killed / "adapter").exists()
    assert sorted(os.listdir(killed / "checkpoints")) == ["step-000005", "step-000010"]
    # Resume from the newest checkpoint and finish.
    run(tiny(killed, *overrides, "train.resume=auto"))
    ref = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    # The metrics file reads as one clean run: one row per step, losses equal to the reference.
    ref_rows = [r for r in read_metrics(str(tmp_path / "ref" / "metrics.jsonl")) if "loss" in r]
    got_rows = [r for r in read_metrics(str(killed / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in got_rows] == list(range(1, 17))
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]


def test_overflowing_update_stops_and_keeps_no_poisoned_checkpoint(tmp_path):
    # lr=1e30: the first update itself overflows. It is refused before any checkpoint is written,
    # so nothing poisoned is kept (tests/test_faults.py covers a stop after good checkpoints).
    script = [sys.executable, "-m", "engine.train", TINY, f"output_dir={tmp_path}", "train.lr=1e30",
              "train.max_steps=20", "train.save_every=1", "train.warmup_steps=0", "train.max_grad_norm=null",
              "train.eval_every=0"]
    res = subprocess.run(script, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "non-finite weights after step 1" in res.stderr and "no checkpoint was saved yet" in res.stderr
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def test_early_stopping(tmp_path):
    # A learning rate far too small to move the loss: the held-out loss never improves after the first eval.
    summary = run(tiny(tmp_path, "train.lr=1e-12", "train.eval_every=1", "train.early_stopping_patience=2",
                       "train.warmup_steps=0"))
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] == 3


def test_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    run(tiny(tmp_path, "train.max_steps=2", "train.eval_every=0", "train.warmup_steps=0", "logging.wandb=true"))
    assert (tmp_path / "wandb").is_dir()


def test_resume_refuses_a_different_data_stream(tmp_path):
    run(tiny(tmp_path, "train.max_steps=2", "train.eval_every=0", "train.warmup_steps=0"))
    with pytest.raises(ValueError, match=r"train.resume: .* data.max_length=96, this recipe has 64"):
        run(tiny(tmp_path, "train.max_steps=4", "train.eval_every=0", "train.warmup_steps=0",
                 "train.resume=auto", "data.max_length=64"))
    # Extending the same run is fine.
    assert run(tiny(tmp_path, "train.max_steps=4", "train.eval_every=0", "train.warmup_steps=0",
                    "train.resume=auto"))["steps"] == 4


def test_start_up_line_names_the_route_of_every_layer_family(tmp_path, capsys):
    run(tiny(tmp_path, "train.max_steps=1", "train.eval_every=0", "train.warmup_steps=0", "train.save_every=0"))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("kernels: lora_linear ")]
    assert len(lines) == 1, lines
    families = {part.split("=")[0] for part in lines[0].split(" (")[0].split()[2:]}
    assert families == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, lines[0]
    assert "=torch" in lines[0] and "(torch: cpu: the torch reference; float32 on cpu)" in lines[0]
    capsys.readouterr()
    run(tiny(tmp_path / "forced", "train.max_steps=1", "train.eval_every=0", "train.warmup_steps=0",
             "train.save_every=0", "train.kernels=cublas"))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("kernels: lora_linear ")][0]
    assert "=torch" not in line and "(cublas: forced;" in line


@pytest.mark.parametrize("quantize", [[], ["lora.quantize_base=nf4"]], ids=["lora", "qlora"])
def test_kernel_routes_give_the_same_losses_as_torch(tmp_path, quantize):
    # The cublas route (torch GEMMs + in-place addmm_; plain torch on CPU) draws the same dropout mask as
    # the reference; the fused Triton kernels, run by Triton's interpreter on CPU (after NF4 dequant for
    # QLoRA), draw theirs from Philox, so they are compared with dropout off.
    common = [TINY, "train.max_steps=3", "train.eval_every=0", "train.save_every=0", "train.warmup_steps=0",
              "train.batch_size=4", *quantize]
    env = {**os.environ, "PYTHONPATH": REPO, "TRITON_INTERPRET": "1"}
    runs = {"torch": ("torch", "0.1"), "cublas": ("cublas", "0.1"), "torch0": ("torch", "0.0"),
            "triton0": ("triton", "0.0")}
    for name, (backend, p) in runs.items():
        res = subprocess.run([sys.executable, "-m", "engine.train", *common, f"output_dir={tmp_path / name}",
                              f"train.kernels={backend}", f"lora.dropout={p}"], cwd=REPO, env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"={backend}" in [ln for ln in res.stdout.splitlines() if ln.startswith("kernels: ")][0]
    losses = {b: [r["loss"] for r in read_metrics(str(tmp_path / b / "metrics.jsonl")) if "loss" in r] for b in runs}
    assert len(losses["torch"]) == 3
    assert losses["cublas"] == pytest.approx(losses["torch"], rel=1e-4)
    assert losses["triton0"] == pytest.approx(losses["torch0"], rel=1e-4)
    assert losses["torch"] != losses["torch0"]  # the dropout runs really dropped something


@pytest.mark.parametrize("on,lam", [("product", "1e-3"), ("factors", "1.0")])
def test_sparse_sft_makes_sparser_deltas(tmp_path, on, lam):
    dense = run(tiny(tmp_path / "dense", "train.save_every=0"))
    sparse = run(tiny(tmp_path / "sparse", "train.save_every=0", f"l1.lambda={lam}", f"l1.on={on}"))
    assert sparse["sparsity"] > 3 * max(dense["sparsity"], 1e-3), (dense["sparsity"], sparse["sparsity"])
    rows = read_metrics(str(tmp_path / "sparse" / "metrics.jsonl"))
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["l1"] > 0 for r in train_rows[1:])  # B starts at zero: so does the penalty
    assert [r["sparsity"] for r in rows if "sparsity" in r]  # logged with every evaluation
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
