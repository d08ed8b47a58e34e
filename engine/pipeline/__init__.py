"""PAFT pipelines: train stages from one base, merge their deltas, evaluate every variant.

    python -m engine.train recipes/quickstart.yaml      # a recipe whose one key is `pipeline`

The pipeline sits on top of the library: it uses the engine core (recipes, training as a
command), merge and paft_evals, and nothing below imports it (engine.train's `main()` is the
command line's dispatch to it).

    config.py    the recipe's dataclasses and the checks that read it whole before any work
    records.py   `<output>.spec.json`: when a finished step is current, and what changed
    run.py       run(cfg): stages, merges, evaluations, once or once per seed
    seeds.py     several seeds: one config per seed, mean ± se, Figure 2, FINDINGS.md
    decide_again.py  FINDINGS.md again from a saved results.json (the decision rule changed)
    table.py     the papers' columns, the combined score, results.md/png/json
"""
from engine.pipeline.config import (EvalsConfig, PipelineConfig, StageConfig, is_pipeline, load_pipeline,
                                    merge_variants, mergekit_config, pipeline_to_dict)
from engine.pipeline.run import PipelineStepFailed, evals_args, run

__all__ = ["EvalsConfig", "PipelineConfig", "StageConfig", "PipelineStepFailed", "evals_args", "is_pipeline",
           "load_pipeline", "merge_variants", "mergekit_config", "pipeline_to_dict", "run"]
