"""Read the models of a merge one tensor at a time, and their task vectors τ = θ − θ₀.

A model entry is one of
  * a full Hugging Face checkpoint directory: `model.safetensors`, or shards listed in
    `model.safetensors.index.json` (or a single other *.safetensors file);
  * a LoRA adapter directory in peft's format (engine.lora or peft wrote it):
    `adapter_config.json` + `adapter_model.safetensors`.

Nothing is loaded whole. safetensors files are memory-mapped (`safe_open`) and each call
reads one tensor. For an adapter the task vector of `<module>.weight` is computed for that
tensor only, when it is asked for:

    τ = s · B A        A (r, in), B (out, r), s = lora_alpha / r  (use_rslora: lora_alpha / √r)

and a weight the adapter does not touch has τ = 0 (returned as None, so callers can skip
it). A merged full model per adapter is never built.

Tied embeddings: a model with tie_word_embeddings stores its input embedding once and no
`lm_head.weight`. Such a checkpoint answers a read of `lm_head.weight` with its embedding,
so every model can be asked for the same names whether it is tied or not.

Every problem is a MergeError whose message names the model and the tensor.
"""
from __future__ import annotations

import os
import re
import shutil

import torch
from safetensors import safe_open

from engine.adapter_config import check_finite, lora_scale, read_adapter_config
from engine.safeio import CorruptFile, read_json
from engine.writes import atomic_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"  # the names engine.lora writes (peft's)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PREFIX = "base_model.model."
HEAD = "lm_head.weight"
# Input embeddings an untied lm_head would share its weight with, by architecture family.
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
# peft's saved keys: <prefix><module>.lora_A.weight, older ones with the adapter name
# (.lora_A.default.weight), embeddings as .lora_embedding_A(.default)
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")


class MergeError(ValueError):
    """A problem with the merge's inputs; the CLI prints it as one `error: ...` line."""


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


# ---------------------------------------------------------------------------- full checkpoints

class Checkpoint:
    """A full HF checkpoint directory, read tensor by tensor."""

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        self._files: dict[str, object] = {}  # shard file -> open safe_open handle
        if not os.path.isdir(path):
            raise MergeError(f"{label}: directory not found: {path}")
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = _read_json(index, label).get("weight_map")  # tensor name -> shard file
            if not isinstance(weight_map, dict):
                raise MergeError(f"{label}: {index} has no weight_map")
        else:
            files = [SINGLE_FILE] if os.path.isfile(os.path.join(path, SINGLE_FILE)) else \
                sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise MergeError(f"{label}: {path} has no {SINGLE_FILE} or {INDEX_FILE} "
                                 f"(only safetensors checkpoints are read: a pickle can run code)")
            weight_map = {name: files[0] for name in self._open(files[0]).keys()}
        self.file_of = weight_map
        self.config = self._read_config()
        # The tensors as stored, plus lm_head.weight as an alias of the embedding when tied.
        self.tied_to = None
        if HEAD not in weight_map and self.config.get("tie_word_embeddings", True):
            self.tied_to = next((n for n in weight_map if n.endswith(EMBED_SUFFIXES)), None)

    def _read_config(self) -> dict:
        path = os.path.join(self.path, "config.json")
        if not os.path.isfile(path):
            return {}
        return _read_json(path, self.label)

    def _open(self, file: str):
        handles = self._files
        if file not in handles:
            full = os.path.join(self.path, file)
            if not os.path.isfile(full):
                raise MergeError(f"{self.label}: missing shard file {full}")
            try:
                handles[file] = safe_open(full, framework="pt")  # memory-mapped; nothing read yet
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise MergeError(f"{self.label}: cannot read {full}: {e}") from None
        return handles[file]

    @property
    def names(self) -> list[str]:
        """The stored tensor names, in file order (lm_head is not listed when tied)."""
        return list(self.file_of)

    def has(self, name: str) -> bool:
        return name in self.file_of or (name == HEAD and self.tied_to is not None)

    def _stored(self, name: str) -> str:
        if name in self.file_of:
            return name
        if name == HEAD and self.tied_to is not None:
            return self.tied_to
        raise MergeError(f"{self.label}: tensor {name} missing from {self.path}")

    def shape(self, name: str) -> tuple[int, ...]:
        stored = self._stored(name)
        return tuple(self._open(self.file_of[stored]).get_slice(stored).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._stored(name)
        return _DTYPES[self._open(self.file_of[stored]).get_slice(stored).get_dtype()]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype.

        Read through a handle of its own, closed at once: get_tensor copies out of a memory
        map, and pages of a map that stays open count in our resident memory until it is
        closed, which for a long-lived handle means the whole file by the end of the merge.
        (The cached handles serve shapes and dtypes, which touch only the header.)"""
        stored = self._stored(name)
        self._open(self.file_of[stored])  # a clear error if the shard is missing
        with safe_open(os.path.join(self.path, self.file_of[stored]), framework="pt") as f:
            return f.get_tensor(stored)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


# ---------------------------------------------------------------------------- LoRA adapters

def _read_json(path: str, label: str) -> dict:
    """A JSON object from `path`; damaged (not UTF-8, not JSON, not an object): MergeError naming it."""
    try:
        obj = read_json(path)
    except (OSError, CorruptFile) as e:
        raise MergeError(f"{label}: cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise MergeError(f"{label}: {path}: expected a JSON object")
    return obj


class Adapter:
    """A peft-format LoRA adapter: τ of each targeted weight computed on demand."""

    def __init__(self, path: str, label: str):
        self.path, self.label = path, label
        try:  # the checks engine.lora.load_adapter makes too: r, lora_alpha, use_rslora typed and in range
            cfg = read_adapter_config(path)
        except (OSError, ValueError) as e:
            raise MergeError(f"{label}: {e}") from None
        self.config = cfg
        self.r = cfg["r"]
        self.alpha = cfg["lora_alpha"]
        self.scale = lora_scale(cfg)
        self.base_name = cfg["base_model_name_or_path"]

        weights = os.path.join(path, ADAPTER_WEIGHTS)
        if not os.path.isfile(weights):
            raise MergeError(f"{label}: adapter weights not found: {weights}")
        try:
            self._file = safe_open(weights, framework="pt")
        except Exception as e:  # noqa: BLE001
            raise MergeError(f"{label}: cannot read {weights}: {e}") from None
        # weight name -> {"A": key, "B": key, "embedding": bool}
        self.targets: dict[str, dict] = {}
        for key in self._file.keys():
            m = _LORA_KEY.match(key.removeprefix(ADAPTER_PREFIX))
            if not key.startswith(ADAPTER_PREFIX) or m is None:
                raise MergeError(f"{label}: tensor {key}: not a LoRA factor (only lora_A/lora_B are supported)")
            entry = self.targets.setdefault(m["module"] + ".weight", {})
            entry["embedding"] = m["kind"].startswith("lora_embedding")
            entry[m["kind"][-1]] = key
        for name, entry in self.targets.items():
            if "A" not in entry or "B" not in entry:
                raise MergeError(f"{label}: tensor {name}: has only one of lora_A / lora_B")
            a, b = self._shape(entry["A"]), self._shape(entry["B"])
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] != self.r:
                raise MergeError(f"{label}: tensor {name}: lora_A {a} and lora_B {b} do not make a rank-{self.r} "
                                 f"update")
        # Every factor finite, before any work: one NaN in A or B makes every merged weight it touches NaN.
        # (Factors are small, r·(in + out) per layer, so reading each once here costs little.)
        for key in self._file.keys():
            try:
                check_finite(self._file.get_tensor(key), key, weights)
            except ValueError as e:
                raise MergeError(f"{label}: {e}") from None

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(key).get_shape())

    def delta_shape(self, name: str) -> tuple[int, int]:
        """The shape of τ for a targeted weight: (out, in); an embedding's (vocab, dim)."""
        e = self.targets[name]
        a, b = self._shape(e["A"]), self._shape(e["B"])
        return (a[1], b[0]) if e["embedding"] else (b[0], a[1])

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A, B) in fp32 for a targeted weight, None if the adapter does not touch it.
        For an embedding, peft's A is (r, vocab) and B (dim, r): τ = s·(B A)ᵀ."""
        e = self.targets.get(name)
        if e is None:
            return None
        return self._file.get_tensor(e["A"]).float(), self._file.get_tensor(e["B"]).float()

    def delta(self, name: str) -> torch.Tensor | None:
        """τ = s·B A for this weight only (fp32), or None where the adapter leaves it alone."""
        ab = self.factors(name)
        if ab is None:
            return None
        A, B = ab
        d = (B @ A).mul_(self.scale)  # (out, r) @ (r, in): one dense (out, in) temporary
        return d.T.contiguous() if self.targets[name]["embedding"] else d


# ---------------------------------------------------------------------------- resolving names

def resolve_model_dir(name: str, label: str, scratch: str) -> str:
    """A directory for `name`: itself if it is one, else a name engine.models knows
    (`builtin:tiny-llama`, `smollm2-135m-instruct`, a .gguf file) turned into a safetensors
    directory: the GGUF cache engine.models keeps, or the built-in model saved under `scratch`."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if name.startswith("builtin:"):
        out = os.path.join(scratch, re.sub(r"[^\w.-]", "_", name))
        if os.path.isdir(out):  # already materialised for another entry of this merge
            return out
        from transformers.utils import logging as hf_logging

        from engine.models import load_model_and_tokenizer
        from engine.recipe import ModelConfig
        try:
            model, tokenizer = load_model_and_tokenizer(ModelConfig(name=name, dtype="float32"), torch.device("cpu"))
        except ValueError as e:
            raise MergeError(f"{label}: {e}") from None
        hf_logging.disable_progress_bar()
        with atomic_dir(out) as tmp:  # materialised once per merge; built-in models are small
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return out
    try:
        from engine.models import ModelConfig, cache_root, convert_gguf, gguf_cache_dir, resolve_gguf
        gguf = resolve_gguf(name)
    except (FileNotFoundError, ValueError) as e:
        raise MergeError(f"{label}: {e}") from None
    if gguf is None and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return _hub_snapshot(name, label)
    if gguf is None:
        raise MergeError(f"{label}: not found: {name!r} (a local HF checkpoint or adapter directory, "
                         f"'builtin:tiny-llama', 'smollm2-135m-instruct' or a .gguf file)")
    cache = gguf_cache_dir(gguf, cache_root(ModelConfig(name=name)))
    if not os.path.isdir(cache):
        convert_gguf(gguf, cache)  # once; engine.models reads the same cache
    return cache


def _hub_snapshot(repo_id: str, label: str) -> str:
    """A hub id (`mistralai/Mistral-7B-v0.1`): its local snapshot, downloaded once into the HF cache
    (weights as safetensors only; with HF_HUB_OFFLINE=1 only an already cached snapshot is found)."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model"])
    except Exception as e:  # offline, unknown repo, gated model: one line that names the entry
        raise MergeError(f"{label}: {repo_id!r} is neither a local directory nor a usable hub model "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def open_model(name: str, label: str, scratch: str) -> Checkpoint | Adapter:
    path = resolve_model_dir(name, label, scratch)
    return Adapter(path, label) if is_adapter(path) else Checkpoint(path, label)


def remove_tree(path: str | None) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- per-tensor reads

def check_against_base(model: Checkpoint | Adapter, base: Checkpoint, names: list[str]) -> None:
    """Fail before any work if `model` cannot be merged with `base` over `names`:
    a tensor missing on either side or of another shape."""
    if isinstance(model, Adapter):
        for name in model.targets:
            if not base.has(name):
                raise MergeError(f"{model.label}: tensor {name}: targeted by the adapter but not in the base "
                                 f"model {base.path}")
            if model.delta_shape(name) != base.shape(name):
                raise MergeError(f"{model.label}: tensor {name}: the adapter's update has shape "
                                 f"{model.delta_shape(name)}, the base weight {base.shape(name)}")
        return
    for name in names:
        if not model.has(name):
            raise MergeError(f"{model.label}: tensor {name}: missing (the base model has it)")
        if model.shape(name) != base.shape(name):
            raise MergeError(f"{model.label}: tensor {name}: shape {model.shape(name)}, base {base.shape(name)}")
    extra = [n for n in model.names if not base.has(n)]
    if extra:
        raise MergeError(f"{model.label}: tensor {extra[0]}: not in the base model {base.path}")


def task_vector(model: Checkpoint | Adapter, name: str, base_value: torch.Tensor) -> torch.Tensor | None:
    """τ = θ − θ₀ in fp32 (base_value is θ₀ in fp32); None when the model is the base here."""
    if isinstance(model, Adapter):
        return model.delta(name)
    return model.read(name).float() - base_value


def weight(model: Checkpoint | Adapter, name: str, base_value: torch.Tensor) -> torch.Tensor:
    """θ in fp32: the stored weight, or θ₀ + s·B A for an adapter."""
    if isinstance(model, Adapter):
        d = model.delta(name)
        return base_value if d is None else base_value + d
    return model.read(name).float()
