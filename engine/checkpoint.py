"""Checkpoints: everything needed to continue a run as if it never stopped.

A checkpoint is a directory `checkpoints/step-000120/` holding

    adapter/adapter_model.safetensors   LoRA factors (peft format, loadable by peft)
    adapter/adapter_config.json
    optimizer.safetensors               AdamW moments and step counters, per parameter
    rng.safetensors                     torch CPU (and CUDA) generator states
    trainer_state.json                  step, data position, optimizer hyper-parameters,
                                        early-stopping state, python/numpy RNG

Only safetensors and JSON: nothing is unpickled when a run resumes.

Several ranks (engine/distributed.py): every rank calls save_checkpoint and rank 0 writes
it. ddp adds `rng-rank<k>.safetensors` per other rank (dropout streams differ per rank);
the rest is replicated, so such a checkpoint resumes on any number of ranks. fsdp2 keeps
the factors and the optimizer state sharded: `sharded/` (torch.distributed.checkpoint,
tensors only, metadata read by a restricted unpickler) replaces optimizer.safetensors,
adapter/ still holds the full factors, and it resumes only under fsdp2 on as many ranks.

Atomicity: the directory is written under a temporary name and renamed into
place once complete, so a run killed mid-save leaves the previous checkpoint
untouched and no half checkpoint that looks complete. `trainer_state.json`
is the last file written; a directory without it is ignored. A save that fails (a full
disk: an OSError naming the file) removes its temporary; one killed outright leaves
`checkpoints/.tmp-step-NNNNNN-PID` (or `step-NNNNNN.old-PID`), which the next run removes
(remove_stale_temporaries: those exact names, and the run's own files' temporaries, never
anything else in output_dir).

Resume (check_resumable): `trainer_state.json` holds the run's whole resolved recipe, and a
resumed run must have the same one but for MAY_CHANGE_ON_RESUME; the optimizer's saved
hyper-parameters are then replaced by the recipe's (load_checkpoint), so what recipe.yaml says
is what runs.

Integrity: `trainer_state.json` records the SHA-256 of every other file of the checkpoint
(`file_digests`) and of its own content (`checksum`). `verify_checkpoint` checks them, that
every safetensors file opens and that the factors are finite; `find_resume_dir` with
`resume: auto` skips a damaged newest checkpoint (with a warning naming it and why) and
resumes from the newest intact one, which is what "the last good checkpoint" means.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

from engine import distributed as dist
from engine.lora import copy_lora_tensors, save_adapter
from engine.safeio import CorruptFile, file_digest, json_checksum, load_safetensors, read_json
from engine.writes import atomic_write, write_error

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {"python": [version, list(internal), gauss],
            "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Per-parameter optimizer state as flat safetensors keys: `state.<param index>.<name>`.

    torch's AdamW keeps tensors only. bitsandbytes' paged optimizers also keep python numbers
    and a nested dict (`__bnb_optimizer_quant_state__`): nested names are joined with '.', and
    a python number is stored as a 0-dim tensor under `<key>@int|float|bool` so that it comes
    back as the same python type.
    """
    tensors: dict[str, torch.Tensor] = {}

    def put(key: str, value) -> None:
        if isinstance(value, dict):
            for name, sub in value.items():
                put(f"{key}.{name}", sub)
        elif torch.is_tensor(value):
            # a copy: ProxAdamW's moments are views of one flat buffer and its step counter is one
            # tensor shared by every parameter, which safetensors would refuse to write twice
            tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        elif isinstance(value, (bool, int, float)):
            tensors[f"{key}@{type(value).__name__}"] = torch.tensor(value)
        else:
            raise TypeError(f"optimizer state {key}: cannot checkpoint a {type(value).__name__}")

    sd = optimizer.state_dict()
    for idx, state in sd["state"].items():
        put(f"state.{idx}", state)
    return tensors, sd["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        key, _, kind = key.partition("@")
        _, idx, *path = key.split(".")
        node = state.setdefault(int(idx), {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = {"int": int, "float": float, "bool": bool}[kind](value.item()) if kind else value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str, step: int, model, optimizer, lora_cfg, base_model_name: str,
                    trainer_state: dict, keep: int) -> str:
    """Write checkpoints/step-<step>/ atomically and prune all but the newest `keep`.

    With several ranks, every rank calls this (it gathers RNG states and, under fsdp2, the
    factors); rank 0 writes.
    """
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, f"step-{step:06d}")
    tmp = dist.from_main(os.path.join(root, f".tmp-step-{step:06d}-{os.getpid()}"))  # rank 0's name, everywhere
    rngs = dist.gather_object(_rng_state())  # [rank 0's, rank 1's, ...] on rank 0
    try:
        if dist.is_main():
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        sharded = dist.mode() == "fsdp2"
        if sharded:  # every rank writes its shards of the factors and their optimizer state
            dist.save_sharded(os.path.join(tmp, dist.SHARDED_DIR), model, optimizer)
        with dist.full_lora(model):  # fsdp2: the whole factors, gathered from every rank
            if dist.is_main():
                save_adapter(model, os.path.join(tmp, "adapter"), lora_cfg, base_model_name)
        if dist.is_main():
            _write_checkpoint(tmp, final, run_dir, step, optimizer, not sharded, rngs, trainer_state, keep)
    except BaseException as e:  # a full disk, Ctrl-C: the half-written temporary goes (the kept checkpoints stay)
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith(tmp):
            e.filename = final + e.filename[len(tmp):]  # the file the user knows: step-NNNNNN/<file>
        raise
    dist.barrier()  # no rank moves on before the checkpoint is in place
    return final


def _save(tensors: dict, path: str) -> None:
    """save_file, with a failed write (a full disk) an OSError naming `path` (engine.writes.write_error)."""
    try:
        save_file(tensors, path)
    except Exception as e:  # noqa: BLE001 - write_error passes on anything that is not about the disk
        named = write_error(e, path)
        if named is e:
            raise
        raise named from None


def _write_checkpoint(tmp: str, final: str, run_dir: str, step: int, optimizer, optimizer_file: bool, rngs: list,
                      trainer_state: dict, keep: int) -> None:
    if optimizer_file:
        opt_tensors, groups = _optimizer_tensors(optimizer)
        _save(opt_tensors, os.path.join(tmp, "optimizer.safetensors"))
    else:  # fsdp2: the state is in sharded/; its hyper-parameters still go to trainer_state.json
        groups = optimizer.state_dict()["param_groups"]
    rng_tensors, rng_meta = rngs[0]
    _save(rng_tensors, os.path.join(tmp, "rng.safetensors"))
    for k, (tensors, _) in enumerate(rngs[1:], start=1):
        _save(tensors, os.path.join(tmp, f"rng-rank{k}.safetensors"))
    state = {**trainer_state, "step": step, "optimizer_param_groups": groups, "rng": rng_meta}
    if dist.mode() != "none":
        state["distributed"] = {"mode": dist.mode(), "world": dist.world()}
        state["rng_ranks"] = {str(k): meta for k, (_, meta) in enumerate(rngs[1:], start=1)}
    # Digests of every other file, then of this JSON itself (as it reads back: tuples become lists).
    state["file_digests"] = {rel: file_digest(os.path.join(tmp, rel)) for rel in _files_under(tmp)}
    state = json.loads(json.dumps(state))
    state["checksum"] = json_checksum(state)
    with atomic_write(os.path.join(tmp, STATE_FILE), fsync=True) as f:
        json.dump(state, f, indent=1)

    if os.path.exists(final):  # same step saved again (e.g. after a resume): swap, then drop the old one
        old = final + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)

    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def _files_under(root: str) -> list[str]:
    """Paths (relative to root) of every file below it but trainer_state.json, sorted."""
    out = []
    for here, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(here, name), root)
            if rel != STATE_FILE:
                out.append(rel)
    return sorted(out)


def verify_checkpoint(ckpt_dir: str) -> dict:
    """The checkpoint's trainer state if the checkpoint is intact, else CorruptFile naming the bad file.

    Intact: trainer_state.json parses and matches its checksum, every file it lists is there
    with the same SHA-256, every safetensors file opens, and the saved factors are finite.
    """
    path = os.path.join(ckpt_dir, STATE_FILE)
    if not os.path.isfile(path):
        raise CorruptFile(f"{path}: missing (an incomplete checkpoint)")
    state = read_json(path)
    if not isinstance(state, dict) or "step" not in state:
        raise CorruptFile(f"{path}: not a trainer state (no 'step')")
    if "checksum" in state and state["checksum"] != json_checksum(state):
        raise CorruptFile(f"{path}: content does not match its checksum (the file was changed or damaged)")
    for rel, digest in state.get("file_digests", {}).items():
        full = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(full):
            raise CorruptFile(f"{full}: missing from the checkpoint")
        if file_digest(full) != digest:
            raise CorruptFile(f"{full}: content does not match the digest recorded at save time (damaged)")
    read_json(os.path.join(ckpt_dir, "adapter", "adapter_config.json"))
    adapter = os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")
    for name, t in load_safetensors(adapter).items():
        if not bool(torch.isfinite(t).all()):
            raise CorruptFile(f"{adapter}: {name} holds NaN or Inf")
    for rel in _files_under(ckpt_dir):
        if rel.endswith(".safetensors"):
            load_safetensors(os.path.join(ckpt_dir, rel))
    return state


def last_good_checkpoint(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest intact checkpoint or None, [(damaged newer checkpoint, why), ...])."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt, skipped
        except (CorruptFile, FileNotFoundError) as e:
            skipped.append((ckpt, str(e)))
    return None, skipped


def find_resume_dir(resume: str | None, run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """`auto`: the newest intact checkpoint of this run, if any, and the damaged newer ones it skipped.
    A path: that checkpoint, which must be intact (else CorruptFile naming the bad file)."""
    if resume is None:
        return None, []
    if resume == "auto":
        found, skipped = last_good_checkpoint(run_dir)
        if skipped and found is None:
            raise CorruptFile(f"train.resume: no intact checkpoint in {run_dir}: {skipped[0][1]}")
        return found, skipped
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
    verify_checkpoint(resume)
    return resume, []


def set_aside(damaged: list[tuple[str, str]]) -> None:
    """Rename damaged checkpoints to step-NNNNNN.damaged: kept on disk for inspection, but no longer
    taken for the newest one (so pruning never deletes an intact checkpoint in their favour)."""
    for ckpt, _ in damaged:
        target = ckpt + ".damaged"
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(ckpt, target)


# The files a run writes atomically (engine.writes: `<file>.tmp-<pid>` until complete), relative to output_dir.
RUN_FILES = ("recipe.yaml", "summary.json", "metrics.jsonl", "loss.png",
             os.path.join("adapter", "adapter_model.safetensors"), os.path.join("adapter", "adapter_config.json"))
# What a killed save leaves in checkpoints/: the checkpoint being written, or the one it was replacing.
_CHECKPOINT_TEMPORARY = re.compile(r"\.tmp-step-\d{6,}-\d+|step-\d{6,}\.old-\d+")


def temporaries_of(path: str) -> list[str]:
    """The temporaries a killed atomic write of `path` leaves beside it: `<name>.tmp-<pid>`
    (engine.writes.temporary_name), and the names older versions used (`<name>.tmp`,
    `<name>.<pid>.tmp`, `<name>.tmp.png`). Regular files only; nothing else matches."""
    parent, name = os.path.split(path)
    own = re.compile(re.escape(name) + r"\.(tmp-\d+|\d+\.tmp|tmp|tmp\.png)")
    if not os.path.isdir(parent):
        return []
    return [os.path.join(parent, n) for n in sorted(os.listdir(parent))
            if own.fullmatch(n) and os.path.isfile(os.path.join(parent, n))
            and not os.path.islink(os.path.join(parent, n))]


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete what a killed write of this run left behind, and nothing else; return the paths.

    Exactly: the temporaries of the run's own RUN_FILES (temporaries_of) and, in checkpoints/, the
    folders a killed save leaves (`.tmp-step-NNNNNN-PID`, `step-NNNNNN.old-PID`; real folders,
    never a link). A user's `notes.tmp` or `work.tmp-2024/` is not the engine's and stays. Call it
    only while holding output_dir's lock (engine.outputs.claim_output): then no other run is
    writing there."""
    removed = [t for f in RUN_FILES for t in temporaries_of(os.path.join(run_dir, f))]
    for path in removed:
        os.remove(path)
    root = os.path.join(run_dir, "checkpoints")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        full = os.path.join(root, name)
        if _CHECKPOINT_TEMPORARY.fullmatch(name) and os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
            removed.append(full)
    return removed


# --------------------------------------------------------------------------- resume: the same run

# The recipe keys a resumed run may change: when it stops (max_steps, early stopping), the learning
# rate and its schedule, what it reports and how often, how often it saves and how many checkpoints
# it keeps, and where and how fast it runs. A key is listed whole or as a section ("logging": every
# key under it). Every other key (the model, the data, the adapter, the method and its loss terms,
# the optimizer and its betas/eps/weight decay, the batch, the seed, the clipping, evaluation
# around training) decides what the checkpoint's factors and data position mean: changing it
# mid-run would train something that is neither run, so check_resumable refuses it.
MAY_CHANGE_ON_RESUME = (
    "output_dir", "train.resume",                                   # where the run is, how it continues
    "train.max_steps", "train.early_stopping_patience",             # when it stops
    "train.lr", "train.scheduler", "train.warmup_steps",            # the learning rate and its schedule
    "train.log_every", "logging",                                   # what it reports
    "train.eval_every", "train.eval_batches",                       # held-out loss cadence
    "train.save_every", "train.keep_checkpoints",                   # checkpoint cadence
    "train.threads", "train.device", "train.kernels", "train.distributed", "model.cache_dir",  # where, how fast
)


def may_change_on_resume(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE_ON_RESUME)


def _leaves(d: dict, prefix: str = "") -> dict:
    """{"train.lr": 0.001, ...}: a nested recipe dict by dotted key (an empty dict is a leaf)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def saved_recipe(state: dict) -> dict:
    """A checkpoint's recipe as dotted keys: the whole resolved recipe (`recipe`), or in a checkpoint
    from before it was saved, the settings it kept (`run_fingerprint`)."""
    if isinstance(state.get("recipe"), dict):
        return _leaves(state["recipe"])
    return _leaves(state.get("run_fingerprint") or {})


def resume_conflicts(state: dict, recipe: dict) -> list[tuple[str, object, object]]:
    """(key, the checkpoint's value, the recipe's) for every key that differs and may not change.

    Only keys both know are compared: a key the checkpoint does not record (an older checkpoint,
    a key added since) cannot be told apart."""
    saved, now = saved_recipe(state), _leaves(recipe)
    return [(k, saved[k], now[k]) for k in saved if k in now and saved[k] != now[k] and not may_change_on_resume(k)]


def check_resumable(ckpt: str, state: dict, recipe: dict) -> None:
    """ValueError (one line naming the key, the old and the new value) unless `recipe` (a resolved
    recipe as a dict) continues the run of checkpoint `ckpt` (its trainer state `state`)."""
    conflicts = resume_conflicts(state, recipe)
    if conflicts:
        key, old, new = conflicts[0]
        others = ", ".join(k for k, _, _ in conflicts[1:4])
        more = f" (and {len(conflicts) - 1} more: {others})" if conflicts[1:] else ""
        raise ValueError(f"train.resume: {ckpt} was written with {key}={old!r}, this recipe has {new!r}{more}; "
                         f"that would not continue the same run. Resume with the run's own settings (only "
                         f"train.max_steps, the learning rate and its schedule, logging, evaluation and checkpoint "
                         f"cadence and the devices may change), or use a new output_dir")
    max_steps = recipe.get("train", {}).get("max_steps")
    if max_steps is not None and state["step"] > max_steps:
        raise ValueError(f"train.max_steps: {max_steps} is below the step of the checkpoint to resume, {ckpt} "
                         f"(step {state['step']}); give train.max_steps >= {state['step']} to continue it, or use "
                         f"a new output_dir")


def load_checkpoint(ckpt_dir: str, model, optimizer) -> dict:
    """Restore LoRA factors, optimizer and RNG state in place; return the trainer state.

    With several ranks every rank calls this; each restores its own RNG stream.
    """
    state = read_json(os.path.join(ckpt_dir, STATE_FILE))
    saved = state.get("distributed", {"mode": "none", "world": 1})
    if saved["mode"] == "fsdp2" and (dist.mode(), dist.world()) != ("fsdp2", saved["world"]):
        raise ValueError(f"train.resume: {ckpt_dir} holds fsdp2 shards from {saved['world']} ranks; it resumes only "
                         f"under train.distributed=fsdp2 on {saved['world']} ranks (this run: {dist.mode()} on "
                         f"{dist.world()})")
    if dist.mode() == "fsdp2" and saved["mode"] != "fsdp2":
        raise ValueError(f"train.resume: {ckpt_dir} was saved by a train.distributed={saved['mode']} run; "
                         f"train.distributed=fsdp2 resumes only fsdp2 checkpoints")
    # The recipe's hyper-parameters (lr, betas, eps, weight decay, l1), which the optimizer was built
    # with, win over the saved ones: loading the state must not bring back settings recipe.yaml no longer says.
    recipe_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    if saved["mode"] == "fsdp2":
        dist.load_sharded(os.path.join(ckpt_dir, dist.SHARDED_DIR), model, optimizer, state["optimizer_param_groups"])
    else:
        adapter_file = os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")
        copy_lora_tensors(model, load_safetensors(adapter_file), adapter_file)
        _load_optimizer(optimizer, load_safetensors(os.path.join(ckpt_dir, "optimizer.safetensors")),
                        state["optimizer_param_groups"])
    for group, hyper in zip(optimizer.param_groups, recipe_groups):
        group.update(hyper)
    k = dist.rank()
    if k == 0:
        _set_rng_state(load_safetensors(os.path.join(ckpt_dir, "rng.safetensors")), state["rng"])
    elif os.path.isfile(os.path.join(ckpt_dir, f"rng-rank{k}.safetensors")):
        _set_rng_state(load_safetensors(os.path.join(ckpt_dir, f"rng-rank{k}.safetensors")), state["rng_ranks"][str(k)])
    if saved["world"] != dist.world():
        print(f"note: {ckpt_dir} was written on {saved['world']} rank(s), this run has {dist.world()}: the same "
              f"samples per step (batch_size is global), but ranks without a saved RNG state start fresh "
              f"dropout streams")
    return state
