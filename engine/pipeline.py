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

The whole recipe is checked before any step runs (engine/pipeline_spec.py): every stage's
recipe with its overrides, every merge variant's mergekit config, the evaluation tasks.
Every step writes its result under output_dir with a record of the spec it was made from
(`<output>.spec.json`), and is skipped when that result exists and its spec is unchanged, so
an interrupted pipeline resumes where it stopped (stages also resume from their own
checkpoints) and a changed merge weight redoes that merge and its evaluation. A finished stage
whose recipe changed is an error before any work (remove its directory to retrain it).
Each step is one of the engine's own command-line tools, printed before it runs, so each can
also be rerun by hand: training stages as subprocesses (`python -m engine.train`,
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
from typing import Literal, Optional, Union

import yaml

from engine import pipeline_spec as spec_check
from engine.pipeline_spec import Record, adapter_digest
from engine.recipe import RecipeError, _build, _set_dotted, check_output_dir, parse_overrides, unknown_key_error
from engine.safeio import read_yaml
from paft_evals.findings import FindingsConfig


class PipelineStepFailed(RuntimeError):
    """A step's subprocess failed; what finished before it is kept."""


@dataclass
class StageConfig:
    recipe: str = field(metadata={"help": "training recipe file for this stage"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "key.path=value overrides"})
    after: Optional[str] = field(default=None, metadata={
        "help": "a stage whose adapter is folded into the base before this one trains (sequential)"})


_POSITIVE = (lambda v: v > 0, "must be > 0")


@dataclass
class EvalsConfig:
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "refusal", "over_refusal"],
                             metadata={"help": "python -m paft_evals tasks"})
    limit: int = field(default=50, metadata={"help": "examples per task", "check": _POSITIVE})
    max_new_tokens: int = field(default=32, metadata={"help": "greedy generation length", "check": _POSITIVE})
    task_max_new_tokens: dict[str, int] = field(default_factory=dict, metadata={
        "help": "task -> its own generation length (a GSM8K chain needs more than a refusal check)"})
    bbh_tasks: list[str] = field(default_factory=list, metadata={
        "help": "bigbench_bbh: which BBH tasks (default: all of them)"})
    shots: int = field(default=3, metadata={"help": "bigbench_bbh: few-shot examples per task",
                                            "check": (lambda v: v >= 0, "must be >= 0")})
    hhh_split: Literal["test", "train", "all"] = field(default="test", metadata={
        "help": "hhh: which split of the HHH pairs is scored (train is what DPO stages may train on)"})
    batch_size: int = field(default=25, metadata={"help": "generation batch size", "check": _POSITIVE})
    template: Literal["tokenizer", "vicuna", "mistral"] = field(default="tokenizer", metadata={
        "help": "chat template for prompts"})
    harmbench: Literal["all", "standard", "contextual"] = field(default="all", metadata={
        "help": "refusal task: HarmBench test behaviours all | standard | contextual"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "TASK=FILE data for the tasks that read files (mc, gsm8k, bbh, ...), as python -m paft_evals --data"})


@dataclass
class PipelineConfig:
    output_dir: str = field(metadata={"help": "where every stage, merge and evaluation is written"})
    model: str = field(metadata={"help": "the shared base model of every stage"})
    stages: dict[str, StageConfig] = field(metadata={"help": "name -> training stage"})
    merges: list[dict[str, Union[str, float, list[float], list[str]]]] = field(
        default_factory=list, metadata={"help": "merge specs (method, models, weight, density, t, lambda)"})
    evals: EvalsConfig = field(default_factory=EvalsConfig, metadata={"help": "evaluation of every variant"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads for every step (0: default)",
                                              "check": (lambda v: v >= 0, "must be >= 0")})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "run everything once per seed (train.seed) into output_dir/seed-<k>; table of mean ± se (engine.seeds)"})
    findings: Optional[FindingsConfig] = field(default=None, metadata={
        "help": "with seeds: which variants the papers' claims compare, and the score columns (FINDINGS.md)"})


def is_pipeline(path: str) -> bool:
    raw = read_yaml(path)  # a damaged file: CorruptFile naming it (exit 2)
    return isinstance(raw, dict) and "pipeline" in raw


def load_pipeline(path: str, overrides: list[str] = ()) -> PipelineConfig:
    """Read, override and check a pipeline recipe whole (see engine/pipeline_spec.py): any problem is
    a RecipeError naming its key, before anything runs."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a pipeline recipe must be a YAML mapping")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(raw, key, value)
    if set(raw) != {"pipeline"}:
        extra = sorted(set(raw) - {"pipeline"}, key=str)[0]
        err = unknown_key_error(str(extra), "", ["pipeline"], (PipelineConfig, "pipeline."))
        raise RecipeError(f"{err} (a pipeline recipe holds only 'pipeline')")
    cfg = _build(PipelineConfig, raw["pipeline"], "pipeline.")
    check_output_dir(cfg.output_dir, "pipeline.output_dir")
    for name, stage in cfg.stages.items():
        if not os.path.isfile(stage.recipe):
            raise RecipeError(f"pipeline.stages.{name}.recipe: file not found: {stage.recipe}")
        if stage.after is not None and stage.after not in cfg.stages:
            raise RecipeError(f"pipeline.stages.{name}.after: no stage named {stage.after!r}")
        if stage.after is not None and cfg.stages[stage.after].after is not None:
            raise RecipeError(f"pipeline.stages.{name}.after: {stage.after!r} is itself trained after another "
                              f"stage; chain at most one 'after'")
        spec_check.stage_spec(cfg, name, stage, None)  # the stage's own recipe + overrides, checked now
    for i, spec in enumerate(cfg.merges):
        spec_check.check_merge_spec(i, spec, cfg.stages)
        for variant, params in merge_variants(spec):
            spec_check.check_merge_variant(i, variant, mergekit_config(params, cfg.model, {n: n for n in cfg.stages}))
    names = [name for spec in cfg.merges for name, _ in merge_variants(spec)]
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & (set(cfg.stages) | {"base"})))
    if clash:
        raise RecipeError(f"pipeline.merges: two variants would both be named {clash[0]!r} "
                          f"(give one merge a 'name')")
    spec_check.check_evals(cfg.evals)
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
    weights = params.get("weight", 1.0)
    if not isinstance(weights, list):  # one number for every model
        weights = [weights] * len(models)
    if len(weights) != len(models):  # load_pipeline refuses this; never zip it short
        raise ValueError(f"merge: {len(weights)} weights for {len(models)} models")
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


def check_finished_stages(cfg: PipelineConfig) -> dict[str, Record]:
    """Each stage's Record; a FINISHED stage whose spec changed is an error, before any work.

    A stage trained `after` another records that stage's adapter too: retraining the first
    makes the second stale. An output from before records existed is checked against the
    recipe.yaml engine.train wrote into it, and adopted when they agree."""
    records = {}
    for name, stage in cfg.stages.items():
        run_dir = os.path.join(cfg.output_dir, name)
        folded = None if stage.after is None else os.path.join(cfg.output_dir, stage.after, "merged")
        spec = {"recipe": spec_check.stage_spec(cfg, name, stage, folded)}
        if stage.after is not None:
            before = os.path.join(cfg.output_dir, stage.after, "adapter")
            finished = _done(os.path.join(cfg.output_dir, stage.after, "summary.json"))
            spec["after"] = adapter_digest(before) if finished else "<to be trained>"
        record = records[name] = Record(run_dir, spec)
        if not _done(os.path.join(run_dir, "summary.json")) or record.current():
            continue
        if record.saved() is None and _same_recipe(os.path.join(run_dir, "recipe.yaml"), spec["recipe"]) \
                and stage.after is None:
            record.write()  # written before records existed, by the same recipe
            continue
        raise RecipeError(f"pipeline.stages.{name}: {run_dir} finished under another spec "
                          f"({record.what_changed()}); remove {run_dir} to retrain it, or restore its recipe")
    return records


def _same_recipe(path: str, spec: dict) -> bool:
    try:
        with open(path) as f:
            return spec_check.strip_volatile(yaml.safe_load(f)) == spec
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def evals_args(target: str, variant: str, e: EvalsConfig) -> list[str]:
    """The `python -m paft_evals` arguments that evaluate one variant as pipeline.evals says."""
    args = [target, "--tasks", ",".join(e.tasks), "--name", variant,
            "--limit", str(e.limit), "--max-new-tokens", str(e.max_new_tokens),
            "--batch-size", str(e.batch_size), "--template", e.template, "--harmbench", e.harmbench,
            *[a for d in e.data for a in ("--data", d)],
            *[a for t, n in e.task_max_new_tokens.items() for a in ("--max-new-tokens", f"{t}={n}")]]
    if "bigbench_bbh" in e.tasks:
        args += ["--shots", str(e.shots), *(["--bbh-tasks", ",".join(e.bbh_tasks)] if e.bbh_tasks else [])]
    if "hhh" in e.tasks:
        args += ["--hhh-split", e.hhh_split]
    return args


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    if cfg.seeds:  # once per seed, then mean ± se, Figure 2 and FINDINGS.md
        from engine.seeds import run_seeds
        return run_seeds(cfg)
    out, py = cfg.output_dir, sys.executable
    records = check_finished_stages(cfg)  # before the first write
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
        return [py, "-m", "engine.train", stage.recipe, *spec_check.stage_overrides(cfg, name, stage),
                f"model.name={base}", f"output_dir={stage_dir(name)}", "train.resume=auto",
                "logging.progress_bar=false", *thread_args]

    def finished(name: str) -> bool:
        return _done(os.path.join(stage_dir(name), "summary.json"))

    def step_is_current(what: str, record: Record, output: str) -> bool:
        """Skip a step whose output exists and was made from this spec; say why one is redone."""
        if not _done(output):
            return False
        if record.current():
            print(f"pipeline: {what}: done, skipped")
            return True
        print(f"pipeline: {what}: redone, its output is stale ({record.what_changed()})")
        return False

    # ---- 1. stages from the shared base (independent: in parallel where there are devices for them)
    first = {n: s for n, s in cfg.stages.items() if s.after is None}
    todo = [n for n in first if not finished(n)]
    for name in first:
        if name not in todo:
            print(f"pipeline: stage {name}: done, skipped")
    if todo:
        from engine.distributed import run_stages_in_parallel, visible_devices
        devices = visible_devices()
        if len(devices) >= 2:
            codes = run_stages_in_parallel([stage_command(n, first[n], cfg.model) for n in todo], devices)
            bad = [n for n, c in zip(todo, codes) if c != 0]
            for n in todo:
                if n not in bad:
                    records[n].write()
            if bad:
                raise PipelineStepFailed(f"pipeline: stage(s) {', '.join(bad)} failed; rerun to resume them")
        else:
            for name in todo:
                _run(stage_command(name, first[name], cfg.model), f"stage {name}", cfg.threads)
                records[name].write()
    digests = {n: adapter_digest(adapter(n)) for n in first}  # the identity of each trained adapter

    # ---- 2. sequential stages: fold the earlier stage's adapter into the base, train on top
    for name, stage in cfg.stages.items():
        if stage.after is None:
            continue
        folded = os.path.join(stage_dir(stage.after), "merged")
        fold_args = ["--base", "original", "--model", cfg.model, "--dtype", "float32", "--out-dtype", "float32"]
        fold = Record(folded, {"adapter": digests[stage.after], "args": fold_args})
        if not step_is_current(f"fold {stage.after} into the base", fold, os.path.join(folded, "config.json")):
            _call("engine.export", [adapter(stage.after), "--out", folded, *fold_args, "--overwrite"],
                  f"fold {stage.after} into the base")
            fold.write()
        records[name] = Record(stage_dir(name), {**records[name].spec, "after": digests[stage.after]})
        if finished(name):
            if not records[name].current():  # its first stage was (re)trained since: this one is stale
                raise RecipeError(f"pipeline.stages.{name}: {stage_dir(name)} was trained after an earlier "
                                  f"{stage.after} ({records[name].what_changed()}); remove {stage_dir(name)} "
                                  f"to retrain it")
            print(f"pipeline: stage {name}: done, skipped")
        else:
            _run(stage_command(name, stage, folded), f"stage {name} (after {stage.after})", cfg.threads)
            records[name].write()
        digests[name] = adapter_digest(adapter(name))

    # ---- 3. merges of the stages' task vectors into the base
    merged: dict[str, str] = {}
    merged_from: dict[str, str] = {}  # variant -> one adapter it merges (whose layers its sparsity covers)
    identity = {"base": cfg.model, **digests}  # what each evaluated variant is: its spec's fingerprint
    adapters = {n: adapter(n) for n in cfg.stages}
    for spec in cfg.merges:
        for variant, params in merge_variants(spec):
            target = os.path.join(out, "merges", variant)
            merged[variant] = target
            merged_from[variant] = adapters[params["models"][0]]
            config = mergekit_config(params, cfg.model, adapters)
            record = Record(target, {"config": config, "inputs": {m: digests[m] for m in params["models"]}})
            identity[variant] = record.fingerprint
            if step_is_current(f"merge {variant}", record, os.path.join(target, "config.json")):
                continue
            config_path = os.path.join(out, "merges", f"{variant}.yaml")
            os.makedirs(os.path.dirname(config_path), exist_ok=True)
            with open(config_path, "w") as f:
                yaml.safe_dump(config, f, sort_keys=False)
            _call("merge", [config_path, "--out", target, "--overwrite"], f"merge {variant}")
            record.write()

    # ---- 4. evaluate every variant: base, each stage, each merge
    variants = {"base": cfg.model, **{n: adapter(n) for n in cfg.stages}, **merged}
    e = cfg.evals
    rows = []
    for variant, target in variants.items():
        result = os.path.join(out, "evals", f"{variant}.json")
        args = evals_args(target, variant, e)
        record = Record(result, {"args": args, "target": identity[variant]})
        if not step_is_current(f"evaluate {variant}", record, result):
            os.makedirs(os.path.dirname(result), exist_ok=True)
            _call("paft_evals", [*args, "--out", result], f"evaluate {variant}")
            record.write()
        with open(result) as f:
            rows.append({"name": variant, **_flatten(json.load(f)["tasks"]),
                         "sparsity": _sparsity(variant, target, cfg, out, merged_from.get(variant),
                                               identity[variant])})

    # ---- 5. the table
    from paft_evals.report import write_report
    for r in rows:
        r["combined"] = combined_score(r)
    columns = [c for c in PAPER_COLUMNS if any(r.get(c) is not None for r in rows)]
    write_report(rows, columns, out, title=f"PAFT on {cfg.model}")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(format_table(rows, columns))
    return rows


# The metrics the papers' tables report, in the order they are printed.
PAPER_COLUMNS = ["arithmetic/exact_match", "refusal/refusal_rate", "over_refusal/over_refusal_rate",
                 "truthfulqa_mc/accuracy", "hhh/accuracy", "bigbench_bbh/macro_score", "gsm8k100/exact_match",
                 "strongreject/refusal_rate", "combined", "sparsity"]
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


def _sparsity(variant: str, target: str, cfg: PipelineConfig, out: str, layers_of: str | None,
              identity: str | None = None) -> float | None:
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
    record = Record(result, {"target": identity, "layers_of": layers_of})
    if not (_done(result) and record.current()):
        only = ["--layers-of", layers_of] if layers_of else []
        _call("merge.sparsity", [target, "--base", cfg.model, *only, "--quiet", "--out",
                                 os.path.join(out, "evals", f"{variant}.sparsity")], f"sparsity of {variant}")
        src = os.path.join(out, "evals", f"{variant}.sparsity", "sparsity.json")
        with open(src) as f:
            value = json.load(f)["mean_sparsity"]
        with open(result, "w") as f:
            json.dump({"sparsity": value}, f)
        record.write()
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
