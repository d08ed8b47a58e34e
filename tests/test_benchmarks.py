"""benchmarks/train_step*.py, benchmarks/report.py and the GPU scripts.

Fast: every GPU configuration builds its model config and plan on the meta device (--dry-run),
the FLOP count matches a hand count, the targets are judged right, the report renders a table,
a chart and the docs/BENCHMARKS.md block from a results file, the GPU scripts parse and name real configurations,
and run_gpu.sh --dry-run runs its kernel section on the CPU (all sections: a slow test).
Slow (real child processes on builtin:tiny-llama, ~30 s each): ours vs the transformers + peft
loop (SFT) and ours vs TRL's DPOTrainer; both must start from the same loss, since they train
the same model from the same factors on the same tokens.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from benchmarks import report, train_step, train_step_setup
from benchmarks.train_step import CONFIGS, main, resolve_config, step_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CONFIGS = [name for name, c in CONFIGS.items() if c.device == "cuda"]


def _args(*argv):
    """The parsed-and-resolved config, as main() would build it."""
    import argparse
    ns = argparse.Namespace(config=None, steps=None, warmup=None, layers=None, seq=None, batch=None, threads=None,
                            systems=None)
    for key, value in zip(argv[::2], argv[1::2]):
        setattr(ns, key.lstrip("-"), value)
    return resolve_config(ns)


# --------------------------------------------------------------------------- configurations and FLOPs

def test_the_issue_grid_of_gpu_configurations_exists():
    # Llama-2-7B and Mistral-7B shapes x LoRA / QLoRA x SFT / DPO x seq 1024 / 2048.
    assert len(GPU_CONFIGS) == 16
    for name in GPU_CONFIGS:
        c = CONFIGS[name]
        assert c.model in train_step.RANDOM_MODELS and c.seq in (1024, 2048)
        assert ("hf" in c.systems) == (c.method == "sft") and "trl" in c.systems and "liger" in c.systems


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_every_gpu_configuration_dry_runs_on_the_cpu(name):
    plan = train_step.dry_run(_args("--config", name, "--layers", 1))
    assert plan["model_config"]["num_hidden_layers"] == 1
    assert plan["model_config"]["hidden_size"] == 4096 and plan["model_config"]["vocab_size"] == 32000
    assert plan["model_config"]["num_key_value_heads"] == (8 if "mistral" in name else 32)
    assert plan["flops_per_step"] > 0


def test_parameter_and_flop_counts_match_a_hand_count():
    plan = train_step.dry_run(_args("--config", "gpu-llama2-7b-lora-sft-1024", "--layers", 1))
    h, f, v, r = 4096, 11008, 32000, 16
    layer = 4 * h * h + 3 * h * f                        # q, k, v, o and gate, up, down (no GQA in Llama-2-7B)
    lora = r * (4 * (h + h) + 3 * (h + f))               # A (r, in) + B (out, r) on all seven
    counts = plan["counts"]
    assert counts["matmul_params"] == layer + v * h      # + the LM head (untied)
    assert counts["lora_params"] == lora
    assert counts["total_params"] == layer + 2 * v * h + 2 * h + h + lora  # + embedding, two norms + final norm
    # SFT: 4 rows of 1024 tokens, 4N T + 6 N_lora T + 12 L d T^2 each
    T = 1024
    assert plan["flops_per_step"] == 4 * (4 * (layer + v * h) * T + 6 * lora * T + 12 * 1 * h * T * T)
    dpo = step_flops(counts, "dpo", [T])
    assert dpo == 6 * (layer + v * h) * T + 6 * lora * T + 16 * h * T * T


def test_full_size_shapes_have_the_published_parameter_counts():
    for name, billions in (("gpu-llama2-7b-lora-sft-1024", 6.74), ("gpu-mistral-7b-lora-sft-1024", 7.24)):
        counts = train_step.dry_run(_args("--config", name))["counts"]
        base = counts["total_params"] - counts["lora_params"]
        assert abs(base / 1e9 - billions) < 0.01, (name, base)


def test_bad_options_are_one_line_errors(capsys):
    assert main(["--config", "cpu-smollm2-lora-dpo", "--systems", "ours,hf"]) == 2
    assert "the DPO peer is 'trl'" in capsys.readouterr().err
    assert main(["--config", "cpu-smollm2-lora-sft", "--layers", "4"]) == 2
    assert "only for random-init models" in capsys.readouterr().err
    assert main(["--config", "cpu-tiny-lora-sft", "--systems", "ours,deepspeed"]) == 2
    assert main(["--config", "no-such-config"]) == 2
    assert main(["--list"]) == 0 and "gpu-mistral-7b-qlora-dpo-2048" in capsys.readouterr().out


def test_targets_are_judged_against_the_issue_thresholds():
    qlora_sft = _args("--config", "gpu-llama2-7b-qlora-sft-1024")
    got = train_step.judge_targets(qlora_sft, {"hf": {"speedup": 1.6, "memory": 0.75}})
    assert [(t["metric"], t["result"]) for t in got] == [("speedup", "pass"), ("memory", "miss")]
    got = train_step.judge_targets(_args("--config", "gpu-mistral-7b-lora-dpo-2048"), {})
    assert [(t["target"], t["result"]) for t in got] == [("ours tokens/s >= 1.5x trl", "not measured")]
    got = train_step.judge_targets(_args("--config", "cpu-smollm2-lora-dpo"), {"trl": {"speedup": 1.29}})
    assert got[0]["result"] == "miss"
    assert train_step.judge_targets(_args("--config", "gpu-llama2-7b-lora-sft-1024"), {}) == []  # no target set


def test_random_rows_split_prompt_and_answer():
    cfg = _args("--config", "gpu-llama2-7b-lora-dpo-1024")
    rows = train_step_setup.random_rows(cfg, 32000, 3)
    assert [len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows] == [1024] * 3
    assert all(len(r["rejected_ids"]) == 512 for r in rows)
    assert rows == train_step_setup.random_rows(cfg, 32000, 3)  # fixed seed: the same ids for every system
    sft = train_step_setup.random_rows(_args("--config", "gpu-llama2-7b-lora-sft-1024"), 32000, 1)[0]
    assert sft["labels"][:512] == [-100] * 512 and sft["labels"][512:] == sft["input_ids"][512:]


# --------------------------------------------------------------------------- GPU scripts

def test_gpu_scripts_parse_and_name_real_configurations():
    for script in ("fetch_wheels.sh", "run_gpu.sh"):
        subprocess.run(["bash", "-n", os.path.join(REPO, "benchmarks", "gpu", script)], check=True)
    text = open(os.path.join(REPO, "benchmarks", "gpu", "run_gpu.sh")).read()
    named = re.findall(r"train (train_\w+) (\S+) (\S+) (\S+)", text)
    assert {n for n, *_ in named} == {"train_lora_sft", "train_qlora_sft", "train_lora_dpo"}
    for _, gpu, tiny, systems in named:  # the GPU row and its dry-run stand-in both exist
        assert CONFIGS[gpu].device == "cuda" and CONFIGS[tiny].device == "cpu"
        assert CONFIGS[gpu].method == CONFIGS[tiny].method and CONFIGS[gpu].qlora == CONFIGS[tiny].qlora
        # both run the GPU configuration's own systems (the dry run too: every system rehearsed)
        assert systems.split(",") == list(CONFIGS[gpu].systems)


def _dry_run_gpu_script(out, sections: str) -> dict:
    env = {**os.environ, "OUT": str(out), "SECTIONS": sections, "PAFT_CACHE": str(out / "cache"),
           "PYTHONPATH": REPO, "PYTHON": sys.executable}  # this interpreter, whatever python3 is on PATH
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu", "run_gpu.sh"), "--dry-run"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    run = json.loads((out / "run.json").read_text())
    assert run["benchmark"] == "run_gpu" and run["dry_run"] is True
    assert [s["section"] for s in run["sections"]] == sections.split()
    assert "torch" in run["environment"] and "triton" in run["environment"] and run["environment"]["gpu"] is None
    assert (out / "run.log").read_text().count("=== ") >= 2 * len(sections.split())
    return run


def test_gpu_script_dry_run_kernel_section(tmp_path):
    """run_gpu.sh --dry-run, kernel LoRA section only: real CPU runs of base, peft, cublas and (interpreted)
    triton on tiny shapes, and the JSON records what ran."""
    run = _dry_run_gpu_script(tmp_path, "kernels_lora")
    assert run["sections"][0]["status"] == "ok", run
    doc = json.loads((tmp_path / "kernels_lora.json").read_text())
    assert doc["dry_run"] and doc["environment"]["triton_interpret"] and doc["rows"]
    for row in doc["rows"]:
        sysd = row["systems"]
        assert all(sysd[n]["status"] == "ok" for n in ("base", "peft", "cublas", "triton")), sysd
        assert set(sysd["cublas"]["launches"]) == {"route:cublas"}  # the route that was asked for, and only it
        assert sysd["triton"]["launches"]["route:triton"] > 0 and sysd["triton"]["launches"]["kernel:gemm"] > 0
        assert sysd["triton"]["rel_err_vs_peft"] < 1e-5 and sysd["cublas"]["rel_err_vs_peft"] < 1e-5


@pytest.mark.slow
def test_gpu_script_dry_run_end_to_end(tmp_path):
    """Every section of run_gpu.sh on the CPU (several minutes on 2 cores): one section failing (a module
    without --dry-run, say) is recorded and the others still run; the report reads the train_step file."""
    all_sections = "kernels_lora kernels_prox nf4 train_lora_sft train_qlora_sft train_lora_dpo"
    run = _dry_run_gpu_script(tmp_path, all_sections)
    status = {s["section"]: s["status"] for s in run["sections"]}
    assert all(status[k] == "ok" for k in ("kernels_lora", "kernels_prox", "nf4")), status
    for sec in run["sections"][3:]:  # every system of the GPU list ran; liger where it is installed (else n/a)
        for system, st in sec["systems_status"].items():
            assert st == "ok" or (system == "liger" and st.startswith(("rehearsed", "n/a"))), sec
    doc = json.loads(next((tmp_path / "train_step").glob("cpu-*core.json")).read_text())
    assert {"cpu-tiny-lora-sft", "cpu-tiny-qlora-sft", "cpu-tiny-lora-dpo"} <= set(doc["runs"])
    assert report.main(["--results", str(tmp_path)]) == 0
    assert "cpu-tiny-qlora-sft" in (tmp_path / "train_step.md").read_text()


# --------------------------------------------------------------------------- report

def _fake_run(name: str, device: str, systems: dict, ratios: dict) -> dict:
    cfg = CONFIGS[name]
    return {"config": name, "settings": train_step.settings_of(cfg),
            "environment": {"torch": "2.x", "transformers": "5.x", "device": device, "cpu": "a cpu",
                            "torch_threads": 2},
            "model": {"name": cfg.model, "num_hidden_layers": 8 if cfg.device == "cuda" else 30},
            "systems": systems, "ratios": ratios, "targets": train_step.judge_targets(cfg, ratios)}


def _ok(tps, mem, l0, l1):
    return {"status": "ok", "tokens_per_s": tps, "peak_mem_mib": mem, "loss_first": l0, "loss_last": l1, "mfu": 0.1}


def test_report_renders_table_chart_and_benchmarks_doc_block(tmp_path, capsys):
    run = _fake_run("cpu-smollm2-lora-sft", "cpu",
                    {"ours": _ok(300.0, 900.0, 1.5, 1.2), "hf": _ok(200.0, 1200.0, 1.5, 1.2),
                     "liger": {"status": train_step.LIGER_CPU}},
                    {"hf": {"speedup": 1.5, "memory": 0.75, "same_initial_loss": True}})
    (tmp_path / "cpu-2core.json").write_text(json.dumps({"benchmark": "train_step", "device": "cpu-2core",
                                                         "runs": {run["config"]: run}}))
    (tmp_path / "cpu_merge.json").write_text(json.dumps({"benchmark": "merge_cpu"}))  # another benchmark: skipped
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"intro\n{report.BEGIN}\nold table\n{report.END}\noutro\n")
    assert report.main(["--results", str(tmp_path), "--doc", str(doc)]) == 0
    table = (tmp_path / "train_step.md").read_text()
    assert "| cpu-2core | cpu-smollm2-lora-sft" in table and "| hf | 200 | 1.50× | 1,200 | 0.75× |" in table
    assert "n/a: Liger" in table and "**pass**" in table
    assert "GPU: not measured yet" in table and "run_gpu.sh" in table  # no GPU file: the note and the command
    assert (tmp_path / "train_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert text.startswith(f"intro\n{report.BEGIN}\n| device") and text.endswith(f"{report.END}\noutro\n")
    assert "old table" not in text and table in text

    gpu = _fake_run("gpu-llama2-7b-qlora-sft-1024", "NVIDIA H200",
                    {"ours": _ok(9000.0, 9000.0, 10.4, 10.3), "hf": _ok(5000.0, 15000.0, 10.4, 10.3)},
                    {"hf": {"speedup": 1.8, "memory": 0.6, "same_initial_loss": True}})
    (tmp_path / "nvidia-h200.json").write_text(json.dumps({"benchmark": "train_step", "device": "nvidia-h200",
                                                           "runs": {gpu["config"]: gpu}}))
    assert report.main(["--results", str(tmp_path)]) == 0
    table = (tmp_path / "train_step.md").read_text()
    assert "GPU: not measured yet" not in table and "8 of 32 decoder layers" in table
    assert table.index("cpu-2core") < table.index("nvidia-h200")  # CPU first


def test_report_leaves_a_doc_without_markers_untouched(tmp_path, capsys):
    run = _fake_run("cpu-smollm2-lora-dpo", "cpu", {"ours": _ok(3.0, 9.0, 0.69, 0.6)}, {})
    (tmp_path / "cpu-2core.json").write_text(json.dumps({"benchmark": "train_step", "device": "cpu-2core",
                                                         "runs": {run["config"]: run}}))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("no markers here\n")
    assert report.main(["--results", str(tmp_path), "--doc", str(doc)]) == 2
    assert "left it untouched" in capsys.readouterr().err
    assert doc.read_text() == "no markers here\n"
    assert report.main(["--results", str(tmp_path / "empty")]) == 2


# --------------------------------------------------------------------------- real runs (child processes)

def _run_smoke(tmp_path, monkeypatch, config: str, systems: str) -> dict:
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache"))  # the children inherit it
    out = tmp_path / "results"
    assert main(["--config", config, "--systems", systems, "--steps", "2", "--warmup", "0", "--out", str(out)]) == 0
    files = list(out.glob("cpu-*core.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    assert doc["benchmark"] == "train_step"
    run = doc["runs"][config]
    for key in ("settings", "environment", "model", "flops_formula", "matmul_ceiling", "tokens_per_step",
                "systems", "ratios", "targets"):
        assert key in run, key
    for name in systems.split(","):
        r = run["systems"][name]
        assert r["status"] == "ok", r
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
        assert r["tokens_per_s"] > 0 and r["peak_mem_mib"] > 0 and 0 < r["mfu"] < 1
    peer = systems.split(",")[1]
    q = run["ratios"][peer]
    # Same model, same LoRA factors, same token ids: the step-1 loss (before any update) is the same number.
    assert abs(run["systems"]["ours"]["loss_first"] - run["systems"][peer]["loss_first"]) < 1e-4
    assert q["same_initial_loss"] and q["speedup"] > 0 and q["memory"] > 0
    assert report.main(["--results", str(out)]) == 0
    assert (out / "train_step.png").exists() and config in (out / "train_step.md").read_text()
    return run


@pytest.mark.slow
def test_sft_smoke_ours_against_transformers_peft_loop(tmp_path, monkeypatch):
    run = _run_smoke(tmp_path, monkeypatch, "cpu-tiny-lora-sft", "ours,hf")
    assert run["tokens_per_step"] == [2 * 64, 2 * 64]
    # Both took the same two AdamW steps from the same start: the second step's loss agrees too (fp32).
    assert abs(run["ratios"]["hf"]["final_loss_diff"]) < 1e-3


@pytest.mark.slow
def test_dpo_smoke_ours_against_trl(tmp_path, monkeypatch):
    run = _run_smoke(tmp_path, monkeypatch, "cpu-tiny-lora-dpo", "ours,trl")
    assert run["systems"]["ours"]["loss_first"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy = reference
    assert run["systems"]["trl"]["loss_first"] == pytest.approx(math.log(2), abs=1e-6)
