"""TIES merges on CPU: `python -m merge` against mergekit, wall time and peak RSS.

    python -m benchmarks.merge_cpu [--repeats 3] [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--keep DIR]
                                   [--dtype float32|bfloat16] [--out benchmarks/results/cpu_merge.json]

Two merges into SmolLM2-135M-Instruct (fp32 safetensors, the engine's GGUF cache of it):
  adapters  TIES of two LoRA adapters (r 16, alpha 32, all seven projections, A kaiming-uniform,
            B random non-zero), weights 1.0 / 0.5, density 0.5, dtype float32;
  full      TIES of two full checkpoints (the base plus N(0, 1e-3²) on every tensor, fp32
            safetensors), same parameters.
Each tool runs as a child process (each run in a fresh output directory); wall time is
measured around it and peak RSS is the child's ru_maxrss from os.wait4. The runs alternate
(ours, mergekit, ours, ...) so that machine noise hits both; the minimum over repeats is
reported, every run is kept in the JSON. Both children get OMP_WAIT_POLICY=PASSIVE (our CLI
sets it by default; on a shared machine spinning OpenMP threads made runs of either tool
swing by 5-20x).

dtype float32 for both: mergekit's `dtype` is its COMPUTE dtype (bfloat16 would round every
input to bf16 before taking τ = θ − θ₀), ours is the output dtype with fp32 math always, so
only float32 does the same arithmetic on both sides; the outputs are then compared.

mergekit lives in its own virtual environment (it pins its own torch / transformers):
    python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit
If it is missing or fails, the JSON says so and only our numbers are reported. mergekit reads
a LoRA as `model: BASE+ADAPTER`: it loads the base in transformers, applies the adapter with
peft, merge_and_unload()s and saves a full model into --lora-merge-cache, then merges those
full models. That is its supported path and it is what is timed (a fresh cache per run); we
read the same adapter files directly. Both outputs are compared tensor by tensor at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.common import cpu_device, write_result

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT = os.path.join(os.path.dirname(__file__), "results", "cpu_merge.json")
DEFAULT_MERGEKIT = "/tmp/mkvenv/bin/mergekit-yaml"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")


def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a safetensors directory (engine.models' GGUF cache, made once)."""
    from engine.models import SMOLLM2_NAME, ModelConfig, cache_root, convert_gguf, gguf_cache_dir, resolve_gguf
    gguf = resolve_gguf(SMOLLM2_NAME)
    cache = gguf_cache_dir(gguf, cache_root(ModelConfig(name=SMOLLM2_NAME)))
    if not os.path.isdir(cache):
        convert_gguf(gguf, cache)
    return cache


def make_adapter(base: str, out: str, seed: int, r: int = 16, alpha: int = 32) -> None:
    """A peft-format adapter on every projection: A kaiming-uniform (peft's init), B ~ N(0, 0.01²)."""
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
        for name in f.keys():
            module = name.removesuffix(".weight")
            if module.rpartition(".")[2] in TARGETS:
                n_out, n_in = f.get_slice(name).get_shape()
                bound = 1 / math.sqrt(n_in)
                tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.rand(r, n_in, generator=g) * 2 - 1) * bound
                tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.01
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r,
              "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False, "target_modules": TARGETS,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "use_dora": False}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def make_full(base: str, out: str, seed: int, sigma: float = 1e-3) -> None:
    """The base plus N(0, sigma²) on every tensor, saved as one fp32 safetensors file."""
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    with safe_open(os.path.join(base, "model.safetensors"), "pt") as f:
        tensors = {n: f.get_tensor(n) + sigma * torch.randn(f.get_slice(n).get_shape(), generator=g)
                   for n in f.keys()}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for side in SIDE_FILES:
        if os.path.isfile(os.path.join(base, side)):
            shutil.copyfile(os.path.join(base, side), os.path.join(out, side))


def ties_yaml(path: str, base: str, models: list[str], dtype: str = "float32") -> str:
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    lines = ["merge_method: ties", f"base_model: {base}", f"dtype: {dtype}", "parameters:", "  normalize: true",
             "models:"]
    for m, p in zip(models, params):
        lines += [f"  - model: {m}", f"    parameters: {{weight: {p['weight']}, density: {p['density']}}}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd as a child; wall seconds and the child's peak RSS (ru_maxrss, KiB on Linux)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    res = {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "rc": proc.returncode}
    if proc.returncode != 0:
        res["tail"] = out.decode(errors="replace")[-2000:]
    return res


def compare(ours: str, theirs: str) -> dict:
    """Max |ours - mergekit| over all tensors and the share of entries that differ at all."""
    def index(d):
        files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
        return {k: os.path.join(d, f) for f in files for k in safe_open(os.path.join(d, f), "pt").keys()}
    a, b = index(ours), index(theirs)
    if set(a) != set(b):
        return {"same_tensor_names": False, "only_ours": sorted(set(a) - set(b))[:5],
                "only_mergekit": sorted(set(b) - set(a))[:5]}
    worst, differ, total = 0.0, 0, 0
    for k in a:
        with safe_open(a[k], "pt") as fa, safe_open(b[k], "pt") as fb:
            x, y = fa.get_tensor(k).float(), fb.get_tensor(k).float()
        worst = max(worst, (x - y).abs().max().item())
        differ += int((x != y).sum())
        total += x.numel()
    return {"same_tensor_names": True, "max_abs_diff": worst, "share_entries_differ": differ / total}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML", DEFAULT_MERGEKIT))
    p.add_argument("--keep", help="work directory to keep (default: a temporary one, deleted)")
    p.add_argument("--out", default=RESULT)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the configs' dtype (see above: only float32 means the same arithmetic for both)")
    args = p.parse_args(argv)

    work = args.keep or tempfile.mkdtemp(prefix="paft-merge-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        base = smollm2_dir()
        adapters = [os.path.join(work, f"adapter{i}") for i in (1, 2)]
        fulls = [os.path.join(work, f"full{i}") for i in (1, 2)]
        for i, (a, f) in enumerate(zip(adapters, fulls)):
            if not os.path.isdir(a):
                make_adapter(base, a, seed=10 + i)
            if not os.path.isdir(f):
                make_full(base, f, seed=20 + i)
        mk_ok = os.path.isfile(args.mergekit) and os.access(args.mergekit, os.X_OK)
        mk_version = None
        if mk_ok:
            probe = subprocess.run([os.path.join(os.path.dirname(args.mergekit), "python"), "-c",
                                    "import importlib.metadata as m; print(m.version('mergekit'), "
                                    "m.version('torch'), m.version('transformers'), m.version('peft'))"],
                                   capture_output=True, text=True)
            mk_ok = probe.returncode == 0
            mk_version = probe.stdout.strip() if mk_ok else probe.stderr.strip()[-300:]

        cases = {
            "adapters": (ties_yaml(os.path.join(work, "ours_adapters.yaml"), base, adapters, args.dtype),
                         ties_yaml(os.path.join(work, "mk_adapters.yaml"), base, [f"{base}+{a}" for a in adapters],
                                   args.dtype)),
            "full": (ties_yaml(os.path.join(work, "ours_full.yaml"), base, fulls, args.dtype),
                     ties_yaml(os.path.join(work, "mk_full.yaml"), base, fulls, args.dtype)),
        }
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_WAIT_POLICY": "PASSIVE"}
        results = {}
        for case, (ours_cfg, mk_cfg) in cases.items():
            runs = {"ours": [], "mergekit": []}
            for rep in range(args.repeats):
                out = os.path.join(work, f"out_ours_{case}")
                shutil.rmtree(out, ignore_errors=True)
                runs["ours"].append(timed([sys.executable, "-m", "merge", ours_cfg, "--out", out], env))
                if mk_ok:
                    mk_out = os.path.join(work, f"out_mk_{case}")
                    cache = os.path.join(work, f"lora_cache_{case}_{rep}")  # fresh: its LoRA folding is timed
                    shutil.rmtree(mk_out, ignore_errors=True)
                    runs["mergekit"].append(timed([args.mergekit, mk_cfg, mk_out, "--lora-merge-cache", cache,
                                                   "--no-write-model-card", "--quiet"], env))
                    shutil.rmtree(cache, ignore_errors=True)
                print(f"{case} rep {rep}: ours {runs['ours'][-1]}  mergekit {runs['mergekit'][-1:] or 'n/a'}",
                      file=sys.stderr)
            res = {"runs": runs}
            ok = [r for r in runs["ours"] if r["rc"] == 0]
            mk = [r for r in runs["mergekit"] if r["rc"] == 0]
            if ok:
                res["ours_wall_s"] = min(r["wall_s"] for r in ok)
                res["ours_peak_rss_mb"] = min(r["peak_rss_mb"] for r in ok)
            if mk:
                res["mergekit_wall_s"] = min(r["wall_s"] for r in mk)
                res["mergekit_peak_rss_mb"] = min(r["peak_rss_mb"] for r in mk)
            if ok and mk:
                res["speedup"] = round(res["mergekit_wall_s"] / res["ours_wall_s"], 2)
                res["rss_ratio_mergekit_over_ours"] = round(res["mergekit_peak_rss_mb"] / res["ours_peak_rss_mb"], 2)
                res["outputs_vs_mergekit"] = compare(os.path.join(work, f"out_ours_{case}"),
                                                     os.path.join(work, f"out_mk_{case}"))
            results[case] = res

        targets = {"adapters": 5.0, "full": 1.5}
        summary = {
            "benchmark": "merge_cpu",
            "device": cpu_device(torch.get_num_threads()),
            "model": "SmolLM2-135M-Instruct (fp32 safetensors from the GGUF Q4_1, tied embeddings)",
            "merge": f"ties, weights 1.0 / 0.5, density 0.5, normalize, lambda 1, dtype {args.dtype}",
            "env": "OMP_WAIT_POLICY=PASSIVE for both children; machine shared with other jobs (2 cores)",
            "adapters": "r=16 alpha=32, q,k,v,o,gate,up,down, B ~ N(0, 0.01^2)",
            "full_checkpoints": "base + N(0, 1e-3^2) on every tensor, fp32",
            "mergekit": mk_version if mk_ok else f"not available at {args.mergekit} ({mk_version or 'missing'}); "
                                                 "install: python -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip "
                                                 "install mergekit",
            "mergekit_adapter_path": "model: BASE+ADAPTER (peft merge_and_unload into --lora-merge-cache, "
                                     "then TIES over full models); a fresh cache each run",
            "outputs_note": "the outputs differ only where TIES' trim threshold has ties or near-ties: mergekit "
                            "keeps exactly k entries (argsort, ties broken arbitrarily), we keep every entry equal "
                            "to the k-th largest |tau|; with adapters mergekit's tau = fl(theta0 + s*B*A) - theta0 "
                            "of the peft-folded fp32 model also carries rounding that ours (s*B*A itself) does not",
            "torch": torch.__version__,
            "repeats": args.repeats,
            **results,
            "targets": {case: {"speedup_target": t, "speedup": results[case].get("speedup"),
                               "met": (results[case].get("speedup") or 0) >= t,
                               "lower_peak_rss": (results[case].get("rss_ratio_mergekit_over_ours") or 0) > 1}
                        for case, t in targets.items()},
        }
        write_result(summary, args.out)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
