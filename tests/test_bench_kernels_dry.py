"""The kernel benchmarks' dry runs (what benchmarks/gpu/run_gpu.sh calls on a GPU, on tiny
shapes on the CPU): they run end to end, write their JSON, and record the route that ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", module, "--dry-run", "--out", out], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_kernels_prox_dry_run(tmp_path):
    res = _run("benchmarks.kernels_prox", str(tmp_path / "prox.json"))
    assert res["dry_run"] and res["environment"]["torch"] and "triton" in res["environment"]
    (opt,) = res["optimizer"]
    assert opt["model"] == "tiny-llama" and opt["factors"] == 28  # 2 layers x 7 projections x (A, B)
    ours = opt["rows"]["ours ProxAdamW flat, l1=0"]
    assert ours["launches_per_step"] == {"torch": 1} and ours["ms"] > 0  # one flat step, on the torch route
    assert {"torch AdamW(foreach=False)", "torch AdamW(foreach=True)"} <= set(opt["rows"])
    assert res["l1"]


def test_nf4_dequant_dry_run(tmp_path):
    res = _run("benchmarks.nf4_dequant", str(tmp_path / "nf4.json"))
    assert res["dry_run"] and res["environment"]["torch"]
    ours = [r for r in res["rows"] if r["impl"].startswith("ours")]
    assert ours and all(set(r["paft_kernels.nf4 launches"]) == {"torch"} for r in ours)  # the route that ran
    assert all(r["identical"]["to_torch_reference"] for r in res["rows"])
    assert all(r["identical"]["to_bnb"] for r in res["rows"] if r["identical"]["to_bnb"] is not None)
