"""Running a pipeline: train the stages, merge their deltas, evaluate every variant, one table.

    run(cfg)        one run, or (pipeline.seeds) one per seed and then mean ± se (seeds.py)
    run_once(cfg)   1. stages from the shared base   2. sequential stages (`after`)
                    3. merges                        4. evaluations of base, stages, merges
                    5. the table (table.py): results.md, results.png, results.json

The flow (PAFT, Pentyala et al. 2024): the SFT and DPO stages start from the same base and are
independent, so they run at the same time when there are GPUs for each (one after the other
otherwise); `after: X` stages start from the base with X's adapter folded in (the sequential
SFT → DPO baseline PAFT compares against). Then each merge combines the stages' task vectors
(δ = s·B A per layer) into the base; then base, every stage and every merge are evaluated.

Every step writes its result under output_dir with a record of the spec it was made from
(records.py), and is skipped when that result exists and its spec is unchanged, so an
interrupted pipeline resumes where it stopped (stages also resume from their own checkpoints)
and a changed merge weight redoes that merge and its evaluation. A finished stage whose recipe
changed is an error before any work (remove its directory to retrain it).

Each step is one of the engine's own command-line tools, printed before it runs, so each can
also be rerun by hand: training stages as subprocesses (`python -m engine.train`, a fresh
process per run), the quick steps (`engine.export`, `merge`, `merge.sparsity`, `paft_evals`)
through their `main(argv)` in this process, which saves a Python + torch start-up for each.
The pipeline calls those tools as commands, by name: it imports none of their `__main__`s.

One pipeline per output_dir: it holds output_dir's lock for the whole run (engine/outputs.py;
each stage locks its own folder inside it). A stopped stage resumes only under the settings it
was started with (check_stopped_stage, before any work). Ctrl-C or SIGTERM stops the running
stage too (the signal is passed on, and a stage dies with the pipeline even if the pipeline is
killed outright: engine/interrupts.py), then the pipeline exits 130 or 143 with one line.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import yaml

from engine.checkpoint import STATE_FILE, check_resumable, list_checkpoints, temporaries_of
from engine.interrupts import Interrupted, as_interrupted, die_with_parent, raise_pending
from engine.outputs import claim_output
from engine.pipeline.config import EvalsConfig, PipelineConfig, StageConfig, merge_variants, mergekit_config, \
    stage_overrides, stage_spec, strip_volatile
from engine.pipeline.records import Record, adapter_digest
from engine.pipeline.seeds import reuse_base_eval, seed_config, summarize_seeds
from engine.pipeline.table import flatten, write_table
from engine.recipe import RecipeError
from engine.safeio import CorruptFile, read_json, read_yaml
from engine.writes import write_json, write_text


class PipelineStepFailed(RuntimeError):
    """A step's subprocess failed; what finished before it is kept."""


def run(cfg: PipelineConfig, command: str = "python -m engine.train"):
    """The pipeline once (its table rows), or once per seed into output_dir/seed-<k> and then the
    mean ± se table, Figure 2 and FINDINGS.md (the seeds' summary, a dict)."""
    with claim_output(cfg.output_dir, command, key="pipeline.output_dir"):  # one pipeline per output_dir
        if not cfg.seeds:
            return run_once(cfg)
        per_seed: dict[int, list[dict]] = {}
        first_dir = None
        for k, seed in enumerate(cfg.seeds, 1):
            sub = seed_config(cfg, seed)
            print(f"pipeline: ==== seed {seed} ({k} of {len(cfg.seeds)}) -> {sub.output_dir}", flush=True)
            if first_dir is not None:
                reuse_base_eval(first_dir, sub.output_dir)
            started = time.monotonic()
            per_seed[seed] = run_once(sub)
            first_dir = first_dir or sub.output_dir
            took = time.monotonic() - started
            left = len(cfg.seeds) - k
            print(f"pipeline: ==== seed {seed} done in {took / 60:.1f} min ({_elapsed()} into the run)"
                  + (f"; about {left * took / 60:.0f} min left at this seed's pace (less where steps are "
                     f"already done)" if left else ""), flush=True)
        remove_stale_temporaries(cfg)
        return summarize_seeds(cfg, per_seed)


def run_once(cfg: PipelineConfig) -> list[dict]:
    records = check_finished_stages(cfg)  # before the first write
    os.makedirs(cfg.output_dir, exist_ok=True)
    remove_stale_temporaries(cfg)
    if cfg.threads:
        import torch
        torch.set_num_threads(cfg.threads)  # for the in-process steps; stages get train.threads
    digests = train_stages(cfg, records)
    merged, merged_from, identity = merge_stages(cfg, digests)
    rows = evaluate_variants(cfg, merged, merged_from, identity)
    return write_table(cfg, rows)


# --------------------------------------------------------------------------- where things go

def stage_dir(cfg: PipelineConfig, name: str) -> str:
    return os.path.join(cfg.output_dir, name)


def adapter(cfg: PipelineConfig, name: str) -> str:
    return os.path.join(stage_dir(cfg, name), "adapter")


def finished(cfg: PipelineConfig, name: str) -> bool:
    return os.path.exists(os.path.join(stage_dir(cfg, name), "summary.json"))


def stage_command(cfg: PipelineConfig, name: str, stage: StageConfig, base: str) -> list[str]:
    threads = [f"train.threads={cfg.threads}"] if cfg.threads else []
    return [sys.executable, "-m", "engine.train", stage.recipe, *stage_overrides(cfg, name, stage),
            f"model.name={base}", f"output_dir={stage_dir(cfg, name)}", "train.resume=auto",
            "logging.progress_bar=false", *threads]


def step_is_current(what: str, record: Record, output: str) -> bool:
    """Skip a step whose output exists and was made from this spec; say why one is redone."""
    if not os.path.exists(output):
        return False
    if record.current():
        print(f"pipeline: {what}: done, skipped")
        return True
    print(f"pipeline: {what}: redone, its output is stale ({record.what_changed()})")
    return False


def own_files(cfg: PipelineConfig) -> list[str]:
    """Every file the pipeline itself writes under output_dir (not the stages' and tools' own)."""
    variants = [v for spec in cfg.merges for v, _ in merge_variants(spec)]
    files = [f"{n}.spec.json" for n in cfg.stages] + [os.path.join(n, "merged.spec.json") for n in cfg.stages]
    files += [os.path.join("merges", v + ext) for v in variants for ext in (".yaml", ".spec.json")]
    files += [os.path.join("evals", n + ext) for n in ["base", *cfg.stages, *variants]
              for ext in (".json", ".json.spec.json", ".sparsity.json", ".sparsity.json.spec.json")]
    return files + ["results.md", "results.png", "results.json", "figure2.png", "figure2.json", "FINDINGS.md"]


def remove_stale_temporaries(cfg: PipelineConfig) -> None:
    """The temporaries a killed pipeline left of its own files (engine.checkpoint.temporaries_of), nothing else."""
    for f in own_files(cfg):
        for path in temporaries_of(os.path.join(cfg.output_dir, f)):
            os.remove(path)
            print(f"pipeline: removed {path}, left by an interrupted write")


STOP_TIMEOUT_S = 60  # how long a stage may take to stop after the pipeline passes an interrupt on


def _interrupted(signum: int, detail: str) -> Interrupted:
    e = Interrupted(signum)
    e.detail = detail  # engine.train's `interrupted` prints it
    return e


def _stop(proc: subprocess.Popen, signum: int) -> None:
    """Pass an interrupt on to a running stage and wait for it to exit (its writes are atomic); a
    second interrupt, or STOP_TIMEOUT_S without exiting, kills it."""
    for sig in (signum, signal.SIGKILL):
        try:
            proc.send_signal(sig)
            proc.wait(timeout=STOP_TIMEOUT_S)
            return
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            continue


_START = time.monotonic()  # the progress lines say how far into the run each step ends


def _elapsed() -> str:
    return f"{(time.monotonic() - _START) / 60:.1f} min"


def _done(what: str, started: float) -> None:
    print(f"pipeline: {what}: finished in {time.monotonic() - started:.0f} s ({_elapsed()} into the run)", flush=True)


def _run(cmd: list[str], what: str, threads: int, run_dir: str) -> None:
    """A training stage as a subprocess that dies with the pipeline; an interrupt stops both."""
    raise_pending()
    started = time.monotonic()  # an interrupt whose exception Python dropped (engine/interrupts.py) stops here
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"pipeline: {what}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)  # SIGTERM if the pipeline dies, even by SIGKILL
    try:
        code = proc.wait()
        if code in (130, 143):  # the stage alone was interrupted
            raise Interrupted(code - 128)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the stage stops first, then the pipeline
        e = as_interrupted(e)
        _stop(proc, e.signum)
        ckpts = list_checkpoints(run_dir)
        raise _interrupted(e.signum, f"{what} stopped " + (f"at its last checkpoint {ckpts[-1]}" if ckpts
                                                           else "before its first checkpoint")) from None
    if code != 0:
        raise PipelineStepFailed(f"pipeline: {what} failed (command above); fix it and rerun: finished steps are kept")
    _done(what, started)


def _call(module: str, argv: list[str], what: str) -> None:
    """`python -m module *argv`, run in this process through the module's main(argv)."""
    raise_pending()
    started = time.monotonic()
    print(f"pipeline: {what}: python -m {module} {' '.join(argv)}", flush=True)
    mod = importlib.import_module(module)
    main = getattr(mod, "main", None) or importlib.import_module(module + ".__main__").main  # a package: its __main__
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    except KeyboardInterrupt as e:
        code = as_interrupted(e).exit_code
    if code in (130, 143):  # interrupted (the tool said so in its own line, or had no chance to)
        raise _interrupted(code - 128, f"{what} stopped")
    if code:
        raise PipelineStepFailed(f"pipeline: {what} failed (command above); fix it and rerun: finished steps are kept")
    _done(what, started)


# --------------------------------------------------------------------------- 1-2. stages

def check_finished_stages(cfg: PipelineConfig) -> dict[str, Record]:
    """Each stage's Record; a FINISHED stage whose spec changed is an error, before any work.

    A stage trained `after` another records that stage's adapter too: retraining the first
    makes the second stale. An output from before records existed is checked against the
    recipe.yaml engine.train wrote into it, and adopted when they agree."""
    records = {}
    for name, stage in cfg.stages.items():
        run_dir = stage_dir(cfg, name)
        folded = None if stage.after is None else os.path.join(stage_dir(cfg, stage.after), "merged")
        spec = {"recipe": stage_spec(cfg, name, stage, folded)}
        if stage.after is not None:
            spec["after"] = adapter_digest(adapter(cfg, stage.after)) if finished(cfg, stage.after) \
                else "<to be trained>"
        record = records[name] = Record(run_dir, spec)
        if not finished(cfg, name):
            check_stopped_stage(name, run_dir, spec["recipe"])
            continue
        if record.current():
            continue
        if record.saved() is None and _same_recipe(os.path.join(run_dir, "recipe.yaml"), spec["recipe"]) \
                and stage.after is None:
            record.write()  # written before records existed, by the same recipe
            continue
        raise RecipeError(f"pipeline.stages.{name}: {run_dir} finished under another spec "
                          f"({record.what_changed()}); remove {run_dir} to retrain it, or restore its recipe")
    return records


def check_stopped_stage(name: str, run_dir: str, recipe: dict) -> None:
    """A stage stopped mid-run resumes from its newest checkpoint (train.resume=auto), which engine.train
    allows only under the settings it was started with (engine.checkpoint.check_resumable): say so
    now, before any work, in the pipeline's terms. A damaged checkpoint is left to the stage."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return
    try:
        state = read_json(os.path.join(ckpts[-1], STATE_FILE))
        if isinstance(state, dict) and isinstance(state.get("step"), int):
            check_resumable(ckpts[-1], state, recipe)
    except CorruptFile:
        return
    except ValueError as e:
        raise RecipeError(f"pipeline.stages.{name}: {run_dir} holds a stopped run of this stage, which its spec "
                          f"now would not continue: {e}. Rerun the pipeline with the stage's overrides as they "
                          f"were, or remove {run_dir} to train it afresh") from None


def _same_recipe(path: str, spec: dict) -> bool:
    try:
        return strip_volatile(read_yaml(path)) == spec
    except (OSError, CorruptFile, AttributeError):  # none, damaged, or not a mapping: not the same recipe
        return False


def train_stages(cfg: PipelineConfig, records: dict[str, Record]) -> dict[str, str]:
    """Train every stage not yet finished; return each stage's adapter digest (its identity)."""
    # ---- 1. stages from the shared base (independent: in parallel where there are devices for them)
    first = {n: s for n, s in cfg.stages.items() if s.after is None}
    todo = [n for n in first if not finished(cfg, n)]
    for name in first:
        if name not in todo:
            print(f"pipeline: stage {name}: done, skipped")
    if todo:
        from engine.distributed import run_stages_in_parallel, visible_devices
        devices = visible_devices()
        if len(devices) >= 2:
            codes = run_stages_in_parallel([stage_command(cfg, n, first[n], cfg.model) for n in todo], devices)
            stopped = [c for c in codes if c in (130, 143)]  # a stage alone was interrupted
            if stopped:
                raise _interrupted(stopped[0] - 128, "a stage was interrupted")
            bad = [n for n, c in zip(todo, codes) if c != 0]
            for n in todo:
                if n not in bad:
                    records[n].write()
            if bad:
                raise PipelineStepFailed(f"pipeline: stage(s) {', '.join(bad)} failed; rerun to resume them")
        else:
            for name in todo:
                _run(stage_command(cfg, name, first[name], cfg.model), f"stage {name}", cfg.threads,
                     stage_dir(cfg, name))
                records[name].write()
    digests = {n: adapter_digest(adapter(cfg, n)) for n in first}

    # ---- 2. sequential stages: fold the earlier stage's adapter into the base, train on top
    for name, stage in cfg.stages.items():
        if stage.after is None:
            continue
        folded = os.path.join(stage_dir(cfg, stage.after), "merged")
        fold_args = ["--base", "original", "--model", cfg.model, "--dtype", "float32", "--out-dtype", "float32"]
        fold = Record(folded, {"adapter": digests[stage.after], "args": fold_args})
        if not step_is_current(f"fold {stage.after} into the base", fold, os.path.join(folded, "config.json")):
            _call("engine.export", [adapter(cfg, stage.after), "--out", folded, *fold_args, "--overwrite"],
                  f"fold {stage.after} into the base")
            fold.write()
        records[name] = Record(stage_dir(cfg, name), {**records[name].spec, "after": digests[stage.after]})
        if finished(cfg, name):
            if not records[name].current():  # its first stage was (re)trained since: this one is stale
                raise RecipeError(f"pipeline.stages.{name}: {stage_dir(cfg, name)} was trained after an earlier "
                                  f"{stage.after} ({records[name].what_changed()}); remove {stage_dir(cfg, name)} "
                                  f"to retrain it")
            print(f"pipeline: stage {name}: done, skipped")
        else:
            _run(stage_command(cfg, name, stage, folded), f"stage {name} (after {stage.after})", cfg.threads,
                 stage_dir(cfg, name))
            records[name].write()
        digests[name] = adapter_digest(adapter(cfg, name))
    return digests


# --------------------------------------------------------------------------- 3. merges

def merge_stages(cfg: PipelineConfig, digests: dict[str, str]) -> tuple[dict, dict, dict]:
    """Each merge variant into output_dir/merges/<variant>; returns (variant -> its directory,
    variant -> one adapter it merges (whose layers its sparsity covers), name -> identity)."""
    out = cfg.output_dir
    merged: dict[str, str] = {}
    merged_from: dict[str, str] = {}
    identity = {"base": cfg.model, **digests}  # what each evaluated variant is: its spec's fingerprint
    adapters = {n: adapter(cfg, n) for n in cfg.stages}
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
            write_text(config_path, yaml.safe_dump(config, sort_keys=False))
            _call("merge", [config_path, "--out", target, "--overwrite"], f"merge {variant}")
            record.write()
    return merged, merged_from, identity


# --------------------------------------------------------------------------- 4. evaluations

def evals_args(target: str, variant: str, e: EvalsConfig) -> list[str]:
    """The `python -m paft_evals` arguments that evaluate one variant as pipeline.evals says."""
    args = [target, "--tasks", ",".join(e.tasks), "--name", variant,
            "--limit", str(e.limit), "--max-new-tokens", str(e.max_new_tokens),
            "--batch-size", str(e.batch_size), "--template", e.template, "--harmbench", e.harmbench,
            *[a for d in e.data for a in ("--data", d)],
            *[a for t, n in e.task_max_new_tokens.items() for a in ("--max-new-tokens", f"{t}={n}")],
            *[a for t, n in e.task_limit.items() for a in ("--limit", f"{t}={n}")]]
    if "bigbench_bbh" in e.tasks:
        args += ["--shots", str(e.shots), *(["--bbh-tasks", ",".join(e.bbh_tasks)] if e.bbh_tasks else [])]
    if "hhh" in e.tasks:
        args += ["--hhh-split", e.hhh_split]
    return args


def evaluate_variants(cfg: PipelineConfig, merged: dict, merged_from: dict, identity: dict) -> list[dict]:
    """Evaluate base, each stage and each merge (skipping current results); one row per variant."""
    out = cfg.output_dir
    variants = {"base": cfg.model, **{n: adapter(cfg, n) for n, s in cfg.stages.items() if s.evaluate}, **merged}
    rows = []
    for variant, target in variants.items():
        result = os.path.join(out, "evals", f"{variant}.json")
        args = evals_args(target, variant, cfg.evals)
        record = Record(result, {"args": args, "target": identity[variant]})
        if not step_is_current(f"evaluate {variant}", record, result):
            os.makedirs(os.path.dirname(result), exist_ok=True)
            _call("paft_evals", [*args, "--out", result], f"evaluate {variant}")
            record.write()
        with open(result) as f:
            rows.append({"name": variant, **flatten(json.load(f)["tasks"]),
                         "sparsity": sparsity(cfg, variant, target, merged_from.get(variant), identity[variant])})
    return rows


def sparsity(cfg: PipelineConfig, variant: str, target: str, layers_of: str | None,
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
    evals = os.path.join(cfg.output_dir, "evals")
    result = os.path.join(evals, f"{variant}.sparsity.json")
    record = Record(result, {"target": identity, "layers_of": layers_of})
    if not (os.path.exists(result) and record.current()):
        only = ["--layers-of", layers_of] if layers_of else []
        _call("merge.sparsity", [target, "--base", cfg.model, *only, "--quiet", "--out",
                                 os.path.join(evals, f"{variant}.sparsity")], f"sparsity of {variant}")
        with open(os.path.join(evals, f"{variant}.sparsity", "sparsity.json")) as f:
            value = json.load(f)["mean_sparsity"]
        write_json(result, {"sparsity": value})
        record.write()
    with open(result) as f:
        return json.load(f)["sparsity"]
