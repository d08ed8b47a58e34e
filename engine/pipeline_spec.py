"""A pipeline recipe checked whole before any work, and the records that say a finished step is current.

Checking (`check_pipeline`, called by engine.pipeline.load_pipeline): every stage's training
recipe is loaded with its overrides exactly as the stage will run it (engine.recipe's checks);
every merge spec's keys, method, models and weights are checked, and each of its variants is
turned into the mergekit config the merge step will write and checked by the merge tool's own
parser (merge.__main__.parse_config: densities in (0, 1], t in [0, 1], required parameters,
two models for slerp); the evaluation tasks and their data files are checked as `python -m
evals` checks them. So a typo in the last merge is an `error:` before the first stage trains,
not after an hour of training.

Records (`Record`): each step writes `<its output>.spec.json` beside its output once it has
finished: {"fingerprint": sha256 of the spec, "spec": ...}. A step's spec holds what decides
its result, including its inputs' identities: a stage's resolved recipe (and the adapter of the
stage it trains after), a merge's mergekit config and the sha256 of every adapter it merges, an
evaluation's arguments and the identity of the model it scores. A finished step is skipped
only while its record matches; a changed merge weight redoes the merge, which changes the
merge's fingerprint, which redoes its evaluation. A finished training stage is never retrained
silently: its spec changing is an error that says what changed and to remove the stage's
directory (training is the expensive, possibly hand-tuned result; nothing saved is deleted).
"""
from __future__ import annotations

import hashlib
import json
import os

from engine.recipe import RecipeError, _closest, load_recipe, recipe_to_dict
from engine.safeio import file_digest

MERGE_KEYS = ("name", "method", "models", "weight", "density", "t", "lambda", "normalize")
SWEPT = ("density", "t", "lambda")  # a list value of these is a sweep (engine.pipeline.merge_variants)
# Keys of a stage's recipe that do not change what it trains: where it runs and how it reports.
VOLATILE = ("output_dir", "train.resume", "train.threads", "logging")


# --------------------------------------------------------------------------- checks

def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_merge_spec(i: int, spec: dict, stages: dict) -> None:
    """One entry of pipeline.merges, before it is expanded into variants."""
    from merge.__main__ import METHODS
    where = f"pipeline.merges[{i}]"
    for key in spec:
        if key not in MERGE_KEYS:
            close = _closest(str(key), list(MERGE_KEYS))
            hint = f" (did you mean '{where}.{close}'?)" if close else ""
            raise RecipeError(f"unknown key '{where}.{key}'{hint} (known: {', '.join(MERGE_KEYS)})")
    method = spec.get("method")
    if method is None:
        raise RecipeError(f"{where}: missing 'method' (one of {', '.join(METHODS)})")
    if method not in METHODS:
        close = _closest(str(method), list(METHODS))
        hint = f" (did you mean {close!r}?)" if close else ""
        raise RecipeError(f"{where}.method: {method!r} is not one of {', '.join(METHODS)}{hint}")
    name = spec.get("name", method)
    if not isinstance(name, str) or not name or os.sep in name or name.startswith("."):
        raise RecipeError(f"{where}.name: must be a plain file name, got {name!r}")
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
    from merge.__main__ import MergeError, parse_config
    try:
        parse_config(config)
    except MergeError as e:
        raise RecipeError(f"pipeline.merges[{i}] ({variant}): {e}") from None


def check_evals(e) -> None:
    from paft_evals.__main__ import parse_data
    from paft_evals.tasks import TASKS
    for task in e.tasks:
        if task not in TASKS:
            close = _closest(task, list(TASKS))
            hint = f" (did you mean {close!r}?)" if close else ""
            raise RecipeError(f"pipeline.evals.tasks: unknown task {task!r}{hint} (known: {', '.join(TASKS)})")
    if not e.tasks:
        raise RecipeError("pipeline.evals.tasks: name at least one task")
    from engine.data import catalog
    unknown = [t for t in e.bbh_tasks if t not in catalog.BBH_TASKS]
    if unknown:
        raise RecipeError(f"pipeline.evals.bbh_tasks: unknown BBH task {unknown[0]!r} "
                          f"(known: {', '.join(catalog.BBH_TASKS)})")
    for task, n in e.task_max_new_tokens.items():
        if task not in e.tasks:
            raise RecipeError(f"pipeline.evals.task_max_new_tokens.{task}: not one of pipeline.evals.tasks")
        if not isinstance(n, int) or n < 1:
            raise RecipeError(f"pipeline.evals.task_max_new_tokens.{task}: must be an integer >= 1, got {n!r}")
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
    """The keys engine.pipeline's stage command sets on every stage (an `after` stage's model.name is
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


# --------------------------------------------------------------------------- records

def fingerprint(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def adapter_digest(adapter_dir: str) -> str:
    return file_digest(os.path.join(adapter_dir, "adapter_config.json"),
                       os.path.join(adapter_dir, "adapter_model.safetensors"))


def changes(old, new, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (dicts and lists walked), for messages."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changes(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changes(a, b, f"{prefix[:-1]}[{i}].")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class Record:
    """`<output>.spec.json`: the spec a finished step's output was made from."""

    def __init__(self, output: str, spec: dict):
        self.path = output.rstrip(os.sep) + ".spec.json"
        self.spec = spec
        self.fingerprint = fingerprint(spec)

    def saved(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # none yet, or torn: the step is redone

    def current(self) -> bool:
        saved = self.saved()
        return saved is not None and saved.get("fingerprint") == self.fingerprint

    def what_changed(self) -> str:
        saved = self.saved()
        if saved is None:
            return "no record of the spec it was made from"
        diff = changes(saved.get("spec"), self.spec)
        return "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "") or "spec changed"

    def write(self) -> None:
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "spec": self.spec}, f, indent=1, sort_keys=True,
                      default=str)
        os.replace(tmp, self.path)
