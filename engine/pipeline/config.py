"""A pipeline recipe: its dataclasses, and the checks that read it whole before any work.

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
      seeds: [0, 1, 2]                       # optional: everything once per seed (engine/pipeline/seeds.py)

Checking (`load_pipeline`): every stage's training recipe is loaded with its overrides exactly
as the stage will run it (engine.recipe's checks); every merge spec's keys, method, models and
weights are checked, and each of its variants is turned into the mergekit config the merge step
will write and checked by the merge tool's own reader (merge.config: densities in (0, 1], t in
[0, 1], required parameters, two models for slerp); the evaluation tasks and their data files
are checked as `python -m paft_evals` checks them. So a typo in the last merge is an `error:`
before the first stage trains, not after an hour of training.

Stage and merge names become file names under output_dir (`<output_dir>/<stage>/`,
`merges/<merge>/`, `evals/<name>.json`): each must be a plain file name (no separator, no
leading dot, so no `..`) and none of the pipeline's own (`check_name`: RESERVED_NAMES, `seed-<k>`).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from engine.recipe import load_recipe, recipe_to_dict
from engine.schema import RecipeError, build, check_output_dir, closest, parse_overrides, set_dotted, \
    unknown_key_error
from engine.safeio import read_yaml
from paft_evals.findings import FindingsConfig

MERGE_KEYS = ("name", "method", "models", "weight", "density", "t", "lambda", "normalize")
SWEPT = ("density", "t", "lambda")  # a list value of these is a sweep (merge_variants)
# Keys of a stage's recipe that do not change what it trains: where it runs and how it reports.
VOLATILE = ("output_dir", "train.resume", "train.threads", "logging")
# What the pipeline itself writes at the top of output_dir (run.py, table.py, seeds.py) and the variant
# name the base model's row has: no stage or merge may take one of these names.
RESERVED_NAMES = ("base", "merges", "evals", "results.md", "results.png", "results.json", "figure2.png",
                  "figure2.json", "FINDINGS.md")
# ... nor these: a seed's folder (seeds.py), a step's record (records.py), a merge's sparsity result (run.py).
RESERVED_PATTERN = re.compile(r"seed-\d+|.*\.spec\.json|.*\.sparsity", re.IGNORECASE)
MAX_NAME_BYTES = 200  # + ".sparsity.spec.json" and the like stays within a file name's 255 bytes


@dataclass
class StageConfig:
    recipe: str = field(metadata={"help": "training recipe file for this stage"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "key.path=value overrides"})
    after: Optional[str] = field(default=None, metadata={
        "help": "a stage whose adapter is folded into the base before this one trains (sequential)"})
    evaluate: bool = field(default=True, metadata={
        "help": "false: trained for its deltas only (Figure 2, claim (a)); not evaluated"})


_POSITIVE = (lambda v: v > 0, "must be > 0")


@dataclass
class EvalsConfig:
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "refusal", "over_refusal"],
                             metadata={"help": "python -m paft_evals tasks"})
    limit: int = field(default=50, metadata={"help": "examples per task", "check": _POSITIVE})
    task_limit: dict[str, int] = field(default_factory=dict, metadata={
        "help": "task -> its own number of examples (e.g. every benign prompt of over_refusal)"})
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
        "help": "run everything once per seed (train.seed) into output_dir/seed-<k>; table of mean ± se (engine/pipeline/seeds.py)"})
    findings: Optional[FindingsConfig] = field(default=None, metadata={
        "help": "with seeds: which variants the papers' claims compare, and the score columns (FINDINGS.md)"})


def is_pipeline(path: str) -> bool:
    raw = read_yaml(path)  # a damaged file: CorruptFile naming it (exit 2)
    return isinstance(raw, dict) and "pipeline" in raw


def load_pipeline(path: str, overrides: list[str] = ()) -> PipelineConfig:
    """Read, override and check a pipeline recipe whole (see the module docstring): any problem is
    a RecipeError naming its key, before anything runs."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a pipeline recipe must be a YAML mapping")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    if set(raw) != {"pipeline"}:
        extra = sorted(set(raw) - {"pipeline"}, key=str)[0]
        err = unknown_key_error(str(extra), "", ["pipeline"], (PipelineConfig, "pipeline."))
        raise RecipeError(f"{err} (a pipeline recipe holds only 'pipeline')")
    cfg = build(PipelineConfig, raw["pipeline"], "pipeline.")
    check_output_dir(cfg.output_dir, "pipeline.output_dir")
    for name, stage in cfg.stages.items():
        check_name(f"pipeline.stages.{name}", name)
        if not os.path.isfile(stage.recipe):
            raise RecipeError(f"pipeline.stages.{name}.recipe: file not found: {stage.recipe}")
        if stage.after is not None and stage.after not in cfg.stages:
            raise RecipeError(f"pipeline.stages.{name}.after: no stage named {stage.after!r}")
        if stage.after is not None and cfg.stages[stage.after].after is not None:
            raise RecipeError(f"pipeline.stages.{name}.after: {stage.after!r} is itself trained after another "
                              f"stage; chain at most one 'after'")
        stage_spec(cfg, name, stage, None)  # the stage's own recipe + overrides, checked now
    for i, spec in enumerate(cfg.merges):
        check_merge_spec(i, spec, cfg.stages)
        for variant, params in merge_variants(spec):
            check_merge_variant(i, variant, mergekit_config(params, cfg.model, {n: n for n in cfg.stages}))
    names = [name for spec in cfg.merges for name, _ in merge_variants(spec)]
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & (set(cfg.stages) | {"base"})))
    if clash:
        raise RecipeError(f"pipeline.merges: two variants would both be named {clash[0]!r} "
                          f"(give one merge a 'name')")
    check_evals(cfg.evals)
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


def check_name(key: str, name) -> None:
    """A stage or merge name is a file name under output_dir: RecipeError naming `key` unless it is a
    plain one (no path separator, no leading dot, so no `..`, printable, at most MAX_NAME_BYTES) and
    none of the pipeline's own names (RESERVED_NAMES, RESERVED_PATTERN; case-insensitively, as on a
    case-insensitive filesystem)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or os.sep in name \
            or name.startswith(".") or not name.isprintable() or len(name.encode()) > MAX_NAME_BYTES:
        raise RecipeError(f"{key}: must be a plain file name (no '/', no leading '.', at most {MAX_NAME_BYTES} "
                          f"bytes), got {name!r}")
    if name.casefold() in {r.casefold() for r in RESERVED_NAMES} or RESERVED_PATTERN.fullmatch(name):
        raise RecipeError(f"{key}: {name!r} is a name the pipeline uses for its own output under output_dir "
                          f"({', '.join(RESERVED_NAMES)}, seed-<k>, *.spec.json, *.sparsity); choose another")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_merge_spec(i: int, spec: dict, stages: dict) -> None:
    """One entry of pipeline.merges, before it is expanded into variants."""
    from merge.registry import METHODS
    where = f"pipeline.merges[{i}]"
    for key in spec:
        if key not in MERGE_KEYS:
            close = closest(str(key), list(MERGE_KEYS))
            hint = f" (did you mean '{where}.{close}'?)" if close else ""
            raise RecipeError(f"unknown key '{where}.{key}'{hint} (known: {', '.join(MERGE_KEYS)})")
    method = spec.get("method")
    if method is None:
        raise RecipeError(f"{where}: missing 'method' (one of {', '.join(METHODS)})")
    if method not in METHODS:
        close = closest(str(method), list(METHODS))
        hint = f" (did you mean {close!r}?)" if close else ""
        raise RecipeError(f"{where}.method: {method!r} is not one of {', '.join(METHODS)}{hint}")
    check_name(f"{where}.name", spec.get("name", method))
    models = spec.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise RecipeError(f"{where}.models: must be a list of stage names, got {models!r}")
    for m in models:
        if m not in stages:
            raise RecipeError(f"{where}.models: no stage named {m!r} (stages: {', '.join(stages)})")
        if stages[m].after is not None:
            raise RecipeError(f"{where}.models: stage {m!r} trains after {stages[m].after!r}, so its adapter is "
                              f"a delta of that model, not of the base; merge stages that start from the base")
    if len(set(models)) != len(models):
        raise RecipeError(f"{where}.models: a stage is listed twice: {models}")
    weight = spec.get("weight")
    if weight is not None:
        if method == "slerp":
            raise RecipeError(f"{where}.weight: slerp takes t, not weights")
        if isinstance(weight, list):
            if len(weight) != len(models) or not all(_number(w) for w in weight):
                raise RecipeError(f"{where}.weight: {len(weight)} value(s) {weight} for {len(models)} models "
                                  f"({', '.join(models)}): give one number per model, or one number for all")
        elif not _number(weight):
            raise RecipeError(f"{where}.weight: expected a number or a list of numbers, got {weight!r}")
    for key in SWEPT:
        value = spec.get(key)
        if isinstance(value, list) and (not value or not all(_number(v) for v in value)):
            raise RecipeError(f"{where}.{key}: a sweep is a non-empty list of numbers, got {value!r}")
        if value is not None and not isinstance(value, list) and not _number(value):
            raise RecipeError(f"{where}.{key}: expected a number or a list of numbers to sweep, got {value!r}")
    if "normalize" in spec and not isinstance(spec["normalize"], bool):
        raise RecipeError(f"{where}.normalize: expected true/false, got {spec['normalize']!r}")


def check_merge_variant(i: int, variant: str, config: dict) -> None:
    """The mergekit config one variant will be merged with, checked by the merge tool's own parser."""
    from merge.config import MergeError, parse_config
    try:
        parse_config(config)
    except MergeError as e:
        raise RecipeError(f"pipeline.merges[{i}] ({variant}): {e}") from None


def check_evals(e) -> None:
    from paft_evals.tasks import TASKS, parse_data
    for task in e.tasks:
        if task not in TASKS:
            close = closest(task, list(TASKS))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise RecipeError(f"pipeline.evals.tasks: unknown task {task!r}{hint} (known: {', '.join(TASKS)})")
    if not e.tasks:
        raise RecipeError("pipeline.evals.tasks: name at least one task")
    from engine.data import catalog
    unknown = [t for t in e.bbh_tasks if t not in catalog.BBH_TASKS]
    if unknown:
        raise RecipeError(f"pipeline.evals.bbh_tasks: unknown BBH task {unknown[0]!r} "
                          f"(known: {', '.join(catalog.BBH_TASKS)})")
    for key, per_task in (("task_max_new_tokens", e.task_max_new_tokens), ("task_limit", e.task_limit)):
        for task, n in per_task.items():
            if task not in e.tasks:
                raise RecipeError(f"pipeline.evals.{key}.{task}: not one of pipeline.evals.tasks")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise RecipeError(f"pipeline.evals.{key}.{task}: must be an integer >= 1, got {n!r}")
    try:
        parse_data(e.data, e.tasks)
    except (ValueError, FileNotFoundError) as err:
        raise RecipeError(f"pipeline.evals.data: {err}") from None


def stage_overrides(cfg, name: str, stage) -> list[str]:
    """The overrides a stage runs with: its own, then one the pipeline adds.

    A stage trained `after` another whose pairs include builtin:harmbench with generated rejected
    answers takes them from the shared base (data.rejected_from), as the parallel DPO arm does:
    PAFT's sequential baseline differs from the parallel arm in where it starts, not in its data.
    (It also reuses the base's cached answers instead of generating them again.)"""
    from engine.data.preference import HARMBENCH  # here: engine.data imports torch, a recipe check does not
    overrides = list(stage.overrides)
    if stage.after is None:
        return overrides
    try:
        d = load_recipe(stage.recipe, [*overrides, *_run_keys(cfg)]).data
    except RecipeError as e:
        raise RecipeError(f"pipeline.stages.{name} ({stage.recipe}): {e}") from None
    sources = d.source if isinstance(d.source, list) else [d.source]
    if HARMBENCH in sources and d.harmbench_rejected == "generate" and d.rejected_from is None:
        overrides.append(f"data.rejected_from={cfg.model}")
    return overrides


def _run_keys(cfg) -> list[str]:
    """The keys the pipeline's stage command (engine/pipeline/run.py) sets on every stage (an `after` stage's model.name is
    the folded model, which does not exist yet at check time: the shared base stands in for it)."""
    return [f"model.name={cfg.model}", "output_dir=.", "train.resume=auto", "logging.progress_bar=false"]


def stage_spec(cfg, name: str, stage, folded: str | None) -> dict:
    """The stage's recipe as the stage runs it, validated now (RecipeError names the stage).

    A stage trained after another one starts from a folded model that does not exist yet; it is
    validated with the shared base and recorded with the folded directory as its model.name."""
    overrides = [*stage_overrides(cfg, name, stage), *_run_keys(cfg)]
    try:
        recipe = load_recipe(stage.recipe, overrides)
    except RecipeError as e:
        raise RecipeError(f"pipeline.stages.{name} ({stage.recipe}): {e}") from None
    d = recipe_to_dict(recipe)
    if folded is not None:
        d["model"]["name"] = folded
    return strip_volatile(d)


def strip_volatile(d: dict) -> dict:
    d = json.loads(json.dumps(d))  # a deep copy of plain data
    for key in VOLATILE:
        node, *rest = key.split(".")
        if rest:
            d.get(node, {}).pop(rest[0], None)
        else:
            d.pop(node, None)
    return d


def pipeline_to_dict(cfg: PipelineConfig) -> dict:
    return {"pipeline": dataclasses.asdict(cfg)}
