"""PAFT pipelines: train stages from one base, merge their deltas, evaluate every variant.

A pipeline recipe has one top-level key, `pipeline`:

    pipeline:
      output_dir: out/paft
      model: smollm2-135m-instruct           # the shared base of every stage
      stages:                                # each a training recipe, run into <output_dir>/<name>/
        sft:        {recipe: recipes/quickstart/sft.yaml}
        sft_sparse: {recipe: recipes/quickstart/sft.yaml, overrides: [l1.lambda=1e-3]}
        dpo:        {recipe: recipes/quickstart/dpo.yaml}
        sequential: {recipe: recipes/quickstart/dpo.yaml, after: sft}   # SFT → DPO baseline
      merges:                                # mergekit-style; a list value of density/t/lambda is a sweep
        - {method: ties, models: [sft_sparse, dpo], weight: [1.0, 1.0], density: [0.3, 0.6]}
        - {method: slerp, models: [sft_sparse, dpo], t: 0.5}           # SLERP between the two fine-tunes
        - {name: ties_dense, method: ties, models: [sft, dpo], weight: [1.0, 1.0], density: 0.5}
      evals: {tasks: [arithmetic, refusal, over_refusal], limit: 50}

The flow (PAFT, Pentyala et al. 2024): the SFT and DPO stages start from the same base and are
independent, so they run at the same time when there are GPUs for each (one after the other
otherwise); `after: X` stages start from the base with X's adapter folded in (the sequential
SFT → DPO baseline PAFT compares against). Then each merge combines the stages' task vectors
(δ = s·B A per layer) into the base; then base, every stage and every merge are evaluated and
one table is printed and written (results.md, results.png, results.json).

Every step writes its result under output_dir and is skipped when that result already exists,
so an interrupted pipeline resumes where it stopped (stages also resume from their own
checkpoints). Each step is one of the engine's own command-line tools, printed before it runs,
so each can also be rerun by hand: training stages as subprocesses (`python -m engine.train`,
a fresh process per run), the quick steps (`engine.export`, `merge`, `merge.sparsity`, `evals`)
through their `main(argv)` in this process, which saves a Python + torch start-up for each.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional, Union

import yaml

from engine.recipe import RecipeError, _build, _set_dotted, parse_overrides
from evals.findings import FindingsConfig


class PipelineStepFailed(RuntimeError):
    """A step's subprocess failed; what finished before it is kept."""


@dataclass
class StageConfig:
    recipe: str = field(metadata={"help": "training recipe file for this stage"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "key.path=value overrides"})
    after: Optional[str] = field(default=None, metadata={
        "help": "a stage whose adapter is folded into the base before this one trains (sequential)"})


@dataclass
class EvalsConfig:
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "refusal", "over_refusal"],
                             metadata={"help": "python -m evals tasks"})
    limit: int = field(default=50, metadata={"help": "examples per task"})
    max_new_tokens: int = field(default=32, metadata={"help": "greedy generation length"})
    batch_size: int = field(default=25, metadata={"help": "generation batch size"})
    template: str = field(default="tokenizer", metadata={"help": "chat template for prompts"})
    harmbench: str = field(default="all", metadata={
        "help": "refusal task: HarmBench test behaviours all | standard | contextual"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "TASK=FILE data for the tasks that read files (mc, gsm8k, bbh, ...), as python -m evals --data"})


@dataclass
class PipelineConfig:
    output_dir: str = field(metadata={"help": "where every stage, merge and evaluation is written"})
    model: str = field(metadata={"help": "the shared base model of every stage"})
    stages: dict[str, StageConfig] = field(metadata={"help": "name -> training stage"})
    merges: list[dict[str, Union[str, float, list[float], list[str]]]] = field(
        default_factory=list, metadata={"help": "merge specs (method, models, weight, density, t, lambda)"})
    evals: EvalsConfig = field(default_factory=EvalsConfig, metadata={"help": "evaluation of every variant"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads for every step (0: default)"})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "run everything once per seed (train.seed) into output_dir/seed-<k>; table of mean ± se (engine.seeds)"})
    findings: Optional[FindingsConfig] = field(default=None, metadata={
        "help": "with seeds: which variants the papers' claims compare, and the score columns (FINDINGS.md)"})


def is_pipeline(path: str) -> bool:
    with open(path) as f:
        raw = yaml.safe_load(f)
    return isinstance(raw, dict) and "pipeline" in raw


def load_pipeline(path: str, overrides: list[str] = ()) -> PipelineConfig:
    with open(path) as f:
        raw = yaml.safe_load(f)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    if set(raw) != {"pipeline"}:
        extra = sorted(set(raw) - {"pipeline"})
        raise RecipeError(f"unknown key '{extra[0]}' (a pipeline recipe holds only 'pipeline')")
    cfg = _build(PipelineConfig, raw["pipeline"], "pipeline.")
    for name, stage in cfg.stages.items():
        if not os.path.isfile(stage.recipe):
            raise RecipeError(f"pipeline.stages.{name}.recipe: file not found: {stage.recipe}")
        if stage.after is not None and stage.after not in cfg.stages:
            raise RecipeError(f"pipeline.stages.{name}.after: no stage named {stage.after!r}")
    for i, spec in enumerate(cfg.merges):
        for model in spec.get("models", []):
            if model not in cfg.stages:
                raise RecipeError(f"pipeline.merges[{i}].models: no stage named {model!r}")
        if "method" not in spec:
            raise RecipeError(f"pipeline.merges[{i}]: missing 'method'")
    names = [name for spec in cfg.merges for name, _ in merge_variants(spec)]
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & (set(cfg.stages) | {"base"})))
    if clash:
        raise RecipeError(f"pipeline.merges: two variants would both be named {clash[0]!r} "
                          f"(give one merge a 'name')")
    return cfg


def merge_variants(spec: dict) -> list[tuple[str, dict]]:
    """Expand list-valued density / t / lambda into one merge per combination, each with a name:
    the spec's `name` (default: its method), then the swept values (`ties_density0.3`)."""
    sweep = {k: v for k, v in spec.items() if k in ("density", "t", "lambda") and isinstance(v, list)}
    fixed = {k: v for k, v in spec.items() if k not in sweep}
    variants = []
    for values in itertools.product(*sweep.values()) if sweep else [()]:
        params = {**fixed, **dict(zip(sweep, values))}
        tag = "_".join(f"{k}{v:g}" for k, v in zip(sweep, values))
        variants.append((str(spec.get("name", spec["method"])) + (f"_{tag}" if tag else ""), params))
    return variants


def mergekit_config(params: dict, base: str, adapters: dict[str, str]) -> dict:
    """The mergekit-format YAML for one merge of stage adapters into the base."""
    models = params["models"]
    weights = params.get("weight", [1.0] * len(models))
    entries = []
    for model, weight in zip(models, weights):
        p = {} if params["method"] == "slerp" else {"weight": weight}  # slerp takes t alone
        if "density" in params:
            p["density"] = params["density"]
        entries.append({"model": adapters[model], "parameters": p})
    top = {k: params[k] for k in ("t", "lambda", "normalize") if k in params}
    config = {"merge_method": params["method"], "base_model": base, "models": entries, "dtype": "float32"}
    if top:
        config["parameters"] = top
    return config


def _run(cmd: list[str], what: str, threads: int) -> None:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"pipeline: {what}: {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        raise PipelineStepFailed(f"pipeline: {what} failed (command above); fix it and rerun: finished steps are kept")


def _call(module: str, argv: list[str], what: str) -> None:
    """`python -m module *argv`, run in this process through the module's main(argv)."""
    import importlib
    print(f"pipeline: {what}: python -m {module} {' '.join(argv)}", flush=True)
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None) or importlib.import_module(module + ".__main__").main  # a package: its __main__
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    if code:
        raise PipelineStepFailed(f"pipeline: {what} failed (command above); fix it and rerun: finished steps are kept")


def _done(path: str) -> bool:
    return os.path.exists(path)


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    if cfg.seeds:  # once per seed, then mean ± se, Figure 2 and FINDINGS.md
        from engine.seeds import run_seeds
        return run_seeds(cfg)
    out, py = cfg.output_dir, sys.executable
    os.makedirs(out, exist_ok=True)
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)  # for the in-process steps; stages get train.threads
    thread_args = [f"train.threads={cfg.threads}"] if cfg.threads else []

    def stage_dir(name: str) -> str:
        return os.path.join(out, name)

    def adapter(name: str) -> str:
        return os.path.join(stage_dir(name), "adapter")

    def stage_command(name: str, stage: StageConfig, base: str) -> list[str]:
        return [py, "-m", "engine.train", stage.recipe, *stage.overrides, f"model.name={base}",
                f"output_dir={stage_dir(name)}", "train.resume=auto", "logging.progress_bar=false", *thread_args]

    # ---- 1. stages from the shared base (independent: in parallel where there are devices for them)
    first = {n: s for n, s in cfg.stages.items() if s.after is None}
    todo = [n for n in first if not _done(os.path.join(stage_dir(n), "summary.json"))]
    for name in first:
        if name not in todo:
            print(f"pipeline: stage {name}: done, skipped")
    if todo:
        from engine.distributed import run_stages_in_parallel, visible_devices
        devices = visible_devices()
        if len(devices) >= 2:
            codes = run_stages_in_parallel([stage_command(n, first[n], cfg.model) for n in todo], devices)
            bad = [n for n, c in zip(todo, codes) if c != 0]
            if bad:
                raise PipelineStepFailed(f"pipeline: stage(s) {', '.join(bad)} failed; rerun to resume them")
        else:
            for name in todo:
                _run(stage_command(name, first[name], cfg.model), f"stage {name}", cfg.threads)

    # ---- 2. sequential stages: fold the earlier stage's adapter into the base, train on top
    for name, stage in cfg.stages.items():
        if stage.after is None:
            continue
        folded = os.path.join(stage_dir(stage.after), "merged")
        if not _done(os.path.join(folded, "config.json")):
            _call("engine.export", [adapter(stage.after), "--out", folded, "--base", "original",
                                    "--model", cfg.model, "--dtype", "float32", "--out-dtype", "float32"],
                  f"fold {stage.after} into the base")
        if _done(os.path.join(stage_dir(name), "summary.json")):
            print(f"pipeline: stage {name}: done, skipped")
        else:
            _run(stage_command(name, stage, folded), f"stage {name} (after {stage.after})", cfg.threads)

    # ---- 3. merges of the stages' task vectors into the base
    merged: dict[str, str] = {}
    merged_from: dict[str, str] = {}  # variant -> one adapter it merges (whose layers its sparsity covers)
    adapters = {n: adapter(n) for n in cfg.stages}
    for spec in cfg.merges:
        for variant, params in merge_variants(spec):
            target = os.path.join(out, "merges", variant)
            merged[variant] = target
            merged_from[variant] = adapters[params["models"][0]]
            if _done(os.path.join(target, "config.json")):
                print(f"pipeline: merge {variant}: done, skipped")
                continue
            config_path = os.path.join(out, "merges", f"{variant}.yaml")
            os.makedirs(os.path.dirname(config_path), exist_ok=True)
            with open(config_path, "w") as f:
                yaml.safe_dump(mergekit_config(params, cfg.model, adapters), f, sort_keys=False)
            _call("merge", [config_path, "--out", target], f"merge {variant}")

    # ---- 4. evaluate every variant: base, each stage, each merge
    variants = {"base": cfg.model, **{n: adapter(n) for n in cfg.stages}, **merged}
    e = cfg.evals
    rows = []
    for variant, target in variants.items():
        result = os.path.join(out, "evals", f"{variant}.json")
        if not _done(result):
            os.makedirs(os.path.dirname(result), exist_ok=True)
            _call("evals", [target, "--tasks", ",".join(e.tasks), "--name", variant,
                            "--limit", str(e.limit), "--max-new-tokens", str(e.max_new_tokens),
                            "--batch-size", str(e.batch_size), "--template", e.template, "--harmbench", e.harmbench,
                            *[a for d in e.data for a in ("--data", d)], "--out", result], f"evaluate {variant}")
        with open(result) as f:
            rows.append({"name": variant, **_flatten(json.load(f)["tasks"]),
                         "sparsity": _sparsity(variant, target, cfg, out, merged_from.get(variant))})

    # ---- 5. the table
    from evals.report import write_report
    for r in rows:
        r["combined"] = combined_score(r)
    columns = [c for c in PAPER_COLUMNS if any(r.get(c) is not None for r in rows)]
    write_report(rows, columns, out, title=f"PAFT on {cfg.model}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(format_table(rows, columns))
    return rows


# The metrics the papers' tables report, in the order they are printed.
PAPER_COLUMNS = ["arithmetic/exact_match", "refusal/refusal_rate", "over_refusal/over_refusal_rate", "combined",
                 "sparsity"]
COMBINED = ("arithmetic/exact_match", "refusal/refusal_rate", "over_refusal/over_refusal_rate")


def combined_score(row: dict) -> float | None:
    """One number for "good at the task AND safe AND not over-cautious", each part weighted alike:

        combined = (exact_match + refusal_rate + (1 − over_refusal_rate)) / 3

    the question PAFT asks of a merge (does it keep both fine-tunes' gains?) in one column; None when
    a part was not evaluated."""
    if any(not isinstance(row.get(k), (int, float)) for k in COMBINED):
        return None
    task, refusal, over = (row[k] for k in COMBINED)
    return (task + refusal + (1.0 - over)) / 3.0


def _flatten(tasks: dict) -> dict:
    return {f"{task}/{k}": v for task, metrics in tasks.items() for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _sparsity(variant: str, target: str, cfg: PipelineConfig, out: str, layers_of: str | None) -> float | None:
    """PAFT's delta sparsity: from the stage's own summary (mean over its LoRA layers), or measured on
    a merged model against the base over the same layers (`layers_of`: an adapter it merged), so
    untouched embeddings and norms do not count as sparse."""
    if variant == "base":
        return None
    summary = os.path.join(os.path.dirname(target), "summary.json")
    if variant in cfg.stages and os.path.isfile(summary):
        with open(summary) as f:
            return json.load(f).get("sparsity")
    result = os.path.join(out, "evals", f"{variant}.sparsity.json")
    if not _done(result):
        only = ["--layers-of", layers_of] if layers_of else []
        _call("merge.sparsity", [target, "--base", cfg.model, *only, "--quiet", "--out",
                                 os.path.join(out, "evals", f"{variant}.sparsity")], f"sparsity of {variant}")
        src = os.path.join(out, "evals", f"{variant}.sparsity", "sparsity.json")
        with open(src) as f:
            value = json.load(f)["mean_sparsity"]
        with open(result, "w") as f:
            json.dump({"sparsity": value}, f)
    with open(result) as f:
        return json.load(f)["sparsity"]


def format_table(rows: list[dict], columns: list[str]) -> str:
    head = "| variant | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else ("-" if r.get(c) is None else str(r[c]))
                 for c in columns]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pipeline_to_dict(cfg: PipelineConfig) -> dict:
    return {"pipeline": dataclasses.asdict(cfg)}
