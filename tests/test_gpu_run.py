"""The GPU run's safety nets, on the CPU, in seconds: budgets, incremental results, the autotune key, routes.

benchmarks/gpu/run_gpu.sh gets one try on a GPU machine. What must hold for that try to be worth it:
  - the section budgets sum to <= 420 s (a 10-minute command, then a rerun inside a 15-minute lease),
    and the script's header names the call (command, carry .whl, timeout);
  - a section or a system killed by its time limit loses only itself: train_step rewrites its file after
    every system (tested with fake child processes, one of which hangs), kernels.py after every point;
  - the rerun line names exactly what did not finish;
  - the LoRA kernels' autotune key holds the operand layout, so the backward's dx GEMM never reuses the
    forward's pick on a square shape, and each role's pick is recorded; the launches of the training
    path (fp32 factors, bf16 activations) are variants the sm_90 compile check compiles;
  - `python -m benchmarks.kernels --write-routes FROM_JSON` builds the route table from a returned result.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from benchmarks import kernels, train_step
from benchmarks.gpu import status as gpu_status

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu", "run_gpu.sh")


# --------------------------------------------------------------------------- run_gpu.sh: budgets and the call

def _budgets() -> dict:
    text = open(SCRIPT).read()
    (line,) = re.findall(r'^BUDGETS="([^"]+)"', text, re.M)
    return {k: int(v) for k, v in (kv.split("=") for kv in line.split())}


def test_section_budgets_sum_to_at_most_420_s_and_cover_every_section():
    budgets = _budgets()
    text = open(SCRIPT).read()
    (all_sections,) = re.findall(r'^ALL="([^"]+)"', text, re.M)
    assert list(budgets) == all_sections.split()
    assert sum(budgets.values()) <= 420, budgets
    # the header gives the exact call: the command, .whl in carry (git-ignored, so named there), the timeout
    header = text.split("set -uo pipefail")[0]
    assert "command:    bash benchmarks/gpu/run_gpu.sh" in header and 'carry:      [".whl"]' in header
    timeout = int(re.search(r"timeout_s:\s+(\d+)", header).group(1))
    assert sum(budgets.values()) + 60 <= timeout <= 600


def test_bad_sections_are_one_line_and_exit_2(tmp_path):
    for sections in ("kernels_lora bogus", "kernels_prox:ours"):
        proc = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OUT": str(tmp_path), "SECTIONS": sections}, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error:") and not (tmp_path / "run.log").exists()


def test_rerun_line_names_only_what_did_not_finish(tmp_path):
    (tmp_path / "train_step").mkdir()
    systems = {"ours": {"status": "ok"}, "ours_triton": {"status": "ok"}, "hf": {"status": "ok"},
               "trl": {"status": "failed: timed out after 45 s"}, "liger": {"status": "running"}}
    (tmp_path / "train_step" / "nvidia-h200.json").write_text(json.dumps(
        {"benchmark": "train_step", "runs": {"gpu-llama2-7b-lora-sft-1024": {"systems": systems}}}))
    records = [{"section": "kernels_lora", "status": "ok", "budget": 100},
               {"section": "kernels_prox", "status": "failed: timed out after 30s", "budget": 30},
               {"section": "train_lora_sft", "status": "failed: exit status 1", "budget": 95,
                "config": "gpu-llama2-7b-lora-sft-1024", "systems": "ours,ours_triton,hf,trl,liger"},
               {"section": "train_lora_dpo", "status": "failed: timed out after 85s", "budget": 85,
                "config": "gpu-llama2-7b-lora-dpo-1024", "systems": "ours,trl"}]  # setup never finished
    recs, rerun = gpu_status.summarize(records, str(tmp_path))
    assert rerun == ["kernels_prox", "train_lora_sft:trl,liger", "train_lora_dpo:ours,trl"]
    assert recs[2]["systems_status"]["trl"].startswith("failed")
    line = gpu_status.rerun_command(rerun, recs, dry=False)
    assert line.startswith('SECTIONS="kernels_prox train_lora_sft:trl,liger train_lora_dpo:ours,trl" bash')
    assert 'carry [".whl"], timeout_s 300' in line  # 30 + 95 + 85 + 90


# --------------------------------------------------------------------------- train_step: rows survive a kill

FAKE_CHILD = textwrap.dedent('''
    import json, os, sys, time
    system, plan = sys.argv[1], json.load(open(sys.argv[2]))
    print(f"{system}: starting", flush=True)
    if system == "setup":
        rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]} for _ in range(8)]
        json.dump({"method": "sft", "rows": rows}, open(os.path.join(plan["workdir"], "data.json"), "w"))
        res = {"status": "ok", "device_name": "cpu", "counts": {"matmul_params": 10, "lora_params": 2, "layers": 1,
               "attn_dim": 4, "total_params": 12}, "model_config": {"num_hidden_layers": 1}, "data_note": "fake",
               "ceiling_flops": 1e9, "ceiling_how": "fake", "environment": {"torch": "fake"}}
    elif system in os.environ.get("FAKE_HANG", "").split(","):
        print(f"{system}: stuck in its first step", flush=True)
        time.sleep(600)
    else:
        res = {"status": "ok", "step_s": [0.1] * 4, "losses": [2.0, 1.9, 1.8, 1.7], "peak_mem_mib": 10.0}
    print("RESULT " + json.dumps(res), flush=True)
''')


@pytest.fixture
def fake_children(tmp_path, monkeypatch):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    monkeypatch.setattr(train_step, "child_argv", lambda system, plan: [sys.executable, str(script), system, plan])
    cfg = train_step.resolve_config(_ns(config="cpu-tiny-lora-sft", systems="ours,hf,trl", steps=3, warmup=1))
    yield cfg, tmp_path / "out"
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _ns(**kw):
    import argparse
    base = dict(config=None, steps=None, warmup=None, layers=None, seq=None, batch=None, threads=None, systems=None)
    return argparse.Namespace(**{**base, **kw})


def _systems(out) -> dict:
    (path,) = out.glob("cpu-*core.json")
    return json.loads(path.read_text())["runs"]["cpu-tiny-lora-sft"]["systems"]


def test_a_timed_out_system_loses_only_its_own_row(fake_children, monkeypatch, capsys):
    cfg, out = fake_children
    monkeypatch.setenv("FAKE_HANG", "hf")
    rc = train_step.run_benchmark(cfg, str(out), system_cap=3)
    systems = _systems(out)
    assert rc == 1 and systems["ours"]["status"] == "ok" and systems["trl"]["status"] == "ok"
    assert systems["hf"]["status"] == "failed: timed out after 3 s"
    err = capsys.readouterr()
    assert "hf: stuck in its first step" in err.err  # a timed-out child's own last lines are printed
    assert "RERUN cpu-tiny-lora-sft hf" in err.out


def test_a_killed_section_keeps_the_systems_that_finished(fake_children, monkeypatch, capsys):
    """SIGTERM (the section's `timeout`) while the second system hangs: the first one's row is in the file,
    the running one is marked as stopped, the one never started as skipped."""
    cfg, out = fake_children
    monkeypatch.setenv("FAKE_HANG", "hf")
    timer = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        rc = train_step.run_benchmark(cfg, str(out), system_cap=60)
    finally:
        timer.cancel()
    systems = _systems(out)
    assert rc == 1 and systems["ours"]["status"] == "ok" and "tokens_per_s" in systems["ours"]
    assert systems["hf"]["status"].startswith("failed: the section was stopped")
    assert systems["trl"]["status"] == "skipped: the section was stopped"
    assert "hf: stuck in its first step" in capsys.readouterr().err


def test_a_rerun_of_one_system_completes_the_row(fake_children, monkeypatch):
    cfg, out = fake_children
    monkeypatch.setenv("FAKE_HANG", "hf")
    train_step.run_benchmark(cfg, str(out), system_cap=3)
    monkeypatch.setenv("FAKE_HANG", "")
    import dataclasses
    assert train_step.run_benchmark(dataclasses.replace(cfg, systems=("hf",)), str(out), system_cap=10) == 0
    systems = _systems(out)
    assert {s: r["status"] for s, r in systems.items()} == {"ours": "ok", "hf": "ok", "trl": "ok"}
    assert systems["ours"]["from_earlier_run"] and "from_earlier_run" not in systems["hf"]


# --------------------------------------------------------------------------- kernels.py: rows survive a kill

def _kernel_args(tmp_path, monkeypatch, budget_s=None):
    import argparse
    monkeypatch.setattr(kernels.torch, "set_num_threads", lambda n: None)  # the dry run's 1 thread: not here
    return argparse.Namespace(dry_run=True, smoke=False, budget_s=budget_s, threads=1, out=str(tmp_path / "k.json"),
                              warmup_ms=1, rep_ms=1)


def test_kernels_json_is_written_after_every_point(tmp_path, monkeypatch):
    calls = []

    def point(K, N, r, M, *rest):
        calls.append(K)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill of the section's `timeout`
        return {"K": K, "N": N, "r": r, "tokens": M, "systems": {}}
    monkeypatch.setattr(kernels, "_lora_point", point)
    with pytest.raises(KeyboardInterrupt):
        kernels.bench_lora_linear(_kernel_args(tmp_path, monkeypatch))
    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["complete"] is False and len(doc["rows"]) == 1 and doc["environment"]["torch"]


def test_kernels_budget_counts_from_process_start_and_skips_points_that_would_not_fit(tmp_path, monkeypatch):
    import time
    monkeypatch.setenv("PAFT_BENCH_DEADLINE", str(time.time() + 3.5))

    def point(K, N, r, M, *rest):
        time.sleep(1.0)
        return {"K": K, "N": N, "r": r, "tokens": M, "systems": {}}
    monkeypatch.setattr(kernels, "_lora_point", point)
    doc = kernels.bench_lora_linear(_kernel_args(tmp_path, monkeypatch))
    assert doc["complete"] and len(doc["rows"]) == 1 and len(doc["skipped"]) == len(kernels.DRY_SHAPES) - 1
    from benchmarks.common import process_start
    assert 0 <= time.time() - process_start() < 24 * 3600  # from /proc: this process's start, not an import


# --------------------------------------------------------------------------- the autotune key and the picks

class _FakeTuned:
    """Stands for triton.autotune's wrapper: records what a launch would key on, runs nothing."""
    launches: list = []

    def __init__(self, kind):
        self.kind = kind
        self.best_config = type("Cfg", (), {"kwargs": {"BLOCK_M": 64}, "num_warps": 4, "num_stages": 3})()

    def __getitem__(self, grid):
        return lambda *args, **consts: self.launches.append((self.kind, consts))


def test_autotune_key_holds_the_layout_and_picks_are_kept_per_role(monkeypatch):
    pytest.importorskip("triton")
    from paft_kernels import lora_linear as LL, lora_triton as LT
    assert "LAYOUT" in LT.TUNE_KEYS["gemm"] and "LAYOUT" in LT.TUNE_KEYS["skinny"]
    monkeypatch.setattr(LT, "triton_interpreted", lambda: False)  # the GPU's path: through the autotuner
    monkeypatch.setattr(LT, "_tuned", lambda kind, elem, dropout: _FakeTuned(kind))
    _FakeTuned.launches = []
    monkeypatch.setattr(LT, "RECORD_PICKS", True)  # benchmarks/kernels.py turns it on; training leaves it off
    LT.PICKS.clear()
    M, K = 32, 64  # square: the forward and the dx GEMM share M, N, K and r
    x, W = torch.randn(M, K, dtype=torch.bfloat16), torch.randn(K, K, dtype=torch.bfloat16)
    A, B = torch.randn(8, K), torch.randn(K, 8)  # fp32 factors, bf16 activations: what training runs
    _, xa = LL.lora_forward_triton(x, W, None, A, B, 2.0)
    LL.lora_backward_triton(torch.randn(M, K, dtype=torch.bfloat16), x, W, A, B, 2.0, None, 0.0, xa)
    gemm = [c["LAYOUT"] for kind, c in _FakeTuned.launches if kind == "gemm"]
    skinny = [c["LAYOUT"] for kind, c in _FakeTuned.launches if kind == "skinny"]
    assert gemm == ["rcc", "rrr"] and skinny == ["rr", "rc"]  # forward ≠ backward in the key
    assert set(LT.PICKS) == {"xa", "fwd", "dyB", "dx"}
    assert LT.PICKS["fwd"]["key"]["LAYOUT"] == "rcc" and LT.PICKS["dx"]["key"]["LAYOUT"] == "rrr"
    assert LT.PICKS["dx"]["autotuned"] and LT.PICKS["dx"]["config"]["num_warps"] == 4

    # every launch of this training path is a variant the sm_90 compile check compiles (benchmarks/aot.py)
    short = {"bfloat16": "bf16", "float32": "fp32"}
    specs = [s for s in LT.compile_specs() if s.tags["dtype"] == "bf16" and s.tags["r"] == 16]
    for role, pick in LT.PICKS.items():
        want = ["*" + short[d] for d in pick["key"]["dtypes"]]
        found = [s for s in specs if s.tags["role"] == role and s.constexprs["LAYOUT"] == pick["key"]["LAYOUT"]
                 and [t for t in s.signature.values() if t.startswith("*")] == want]
        assert found, (role, pick["key"])


# --------------------------------------------------------------------------- --write-routes FROM_JSON

def _gpu_result(**over) -> dict:
    row = {"model": "llama2-7b", "family": "q/k/v/o_proj", "seq": 2048, "rows": 4, "K": 4096, "N": 4096, "r": 16,
           "tokens": 8192, "best_route": "cublas", "best_route_train": "triton", "systems": {}}
    other = {**row, "seq": 512, "best_route_train": "cublas"}  # not the 8k-token point: not in the table
    return {"benchmark": "kernels_lora", "dry_run": False, "complete": False, "dtype": "bfloat16",
            "environment": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "torch": "2.11.0+cu130"},
            "source": "kernels_lora.json", "rows": [row, other], **over}


def test_write_routes_from_a_returned_json(tmp_path):
    src, out = tmp_path / "kernels_lora.json", tmp_path / "routes.json"
    src.write_text(json.dumps(_gpu_result()))
    assert kernels.main(["--write-routes", str(src), "--routes-out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "NVIDIA H100 80GB HBM3" and doc["complete"] is False
    (route,) = doc["routes"]
    assert route["route"] == "triton" and route["factors"] == "fp32 (training)"  # the training pair decides
    from paft_kernels.lora_linear import TABLE_KEY
    assert all(name in route for name, _ in TABLE_KEY)  # what train.kernels=auto looks a shape up by


@pytest.mark.parametrize("content", [None, "{not json", json.dumps(_gpu_result(dry_run=True)),
                                     json.dumps(_gpu_result(rows=[]))])
def test_write_routes_refuses_bad_input_in_one_line(tmp_path, capsys, content):
    src = tmp_path / "in.json"
    if content is not None:
        src.write_text(content)
    assert kernels.main(["--write-routes", str(src), "--routes-out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --write-routes") and not (tmp_path / "r.json").exists()
