"""Several GPUs: one process per GPU, launched by torchrun (`train.distributed: none | ddp | fsdp2`).

    torchrun --nproc_per_node 2 -m engine.train recipe.yaml train.distributed=ddp

torchrun starts N copies of the trainer with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in their environment; `init` joins them into one process group (NCCL on CUDA,
gloo on CPU) and puts process k on GPU LOCAL_RANK. A single-process run needs no process
group: every function here then works on a world of one (rank 0, sums of one term, no-op
barriers), so the training loop has one code path.

Data - the rule. `train.batch_size` is the GLOBAL micro-batch size. Rank k of W takes rows
k, k+W, k+2W, ... of the micro-batch a single-process run would use (`Batches.shard`), so
the union over ranks of micro-batch i is exactly single-process micro-batch i, and a step
on W ranks sees the same samples as a step of one process. batch_size must be divisible
by W, and every micro-batch, the last (shorter) one of an epoch included, must give each
rank at least one row.

Loss. Every micro-batch loss is (sum over its rows) / (the step's totals), as in a single
process (engine/objectives.py) - but the totals are the GLOBAL ones, summed over ranks
once per step before any backward. Rank k's loss is then its share of the single-process
loss, the single-process loss is the SUM of the ranks' losses, and its gradient the SUM of
their gradients. So gradients are summed over ranks, not averaged as torch's
DistributedDataParallel does (which would need every local loss multiplied by W to come
out the same): `sync_grads` all-reduces with SUM, and FSDP2's reduce-scatter gets a divide
factor of 1. Logged stats are summed over ranks the same way.

ddp   Every rank holds the whole model; only the LoRA factors have gradients. The loss
      functions call `model.get_decoder()` and read `get_output_embeddings().weight`
      directly instead of calling the model, so DistributedDataParallel's forward hooks,
      which arm its gradient all-reduce, would never run. Instead this module does what DDP
      does, by hand and visibly: parameters are broadcast from rank 0 at the start, the
      micro-batches' backward passes accumulate local gradients (DDP's `no_sync()`), and
      after the last one `sync_grads` sum-all-reduces the LoRA gradients in one flat buffer
      (DDP's bucketed all-reduce). Optimizer state is then identical on every rank.
      Checkpoints: rank 0 writes the usual files (factors and optimizer state are
      replicated) plus every other rank's RNG state (rng-rank<k>.safetensors) so dropout
      resumes exactly. They resume under none or ddp on ANY number of ranks: the data
      position is global and batch_size is global, so the samples of every step stay the
      same (only the dropout streams of ranks that did not exist before start fresh).
fsdp2 `torch.distributed.fsdp.fully_shard` on each decoder layer, then on the decoder as the
      root (it is the module the loss functions call, so the root's hooks run): the frozen
      base weights and the LoRA factors are sharded over ranks and gathered layer by layer
      in forward and backward. A unit mixing frozen and trainable parameters is fine in
      FSDP2. The LM head is read directly by the chunked loss (never called as a module),
      so it stays outside FSDP: a full replicated copy on every rank (for a tied head, the
      original embedding tensor, which fully_shard leaves in place). Checkpoints: the factors are gathered to full
      tensors for adapter/ (`full_tensor()`), and factors + optimizer state are written
      sharded with torch.distributed.checkpoint (DCP) into `sharded/`. They resume only
      under fsdp2 on the same number of ranks (anything else is a one-line error).
      Not with L1 (`l1.lambda > 0`: the penalty reads whole factors) or the paged
      optimizers. QLoRA (lora.quantize_base: nf4): NF4Linear keeps its 4-bit weight as a
      plain attribute, not a parameter, so FSDP2 does not shard it - every rank holds the
      whole 4-bit base; only the factors and the unquantized parts are sharded. It runs
      (3 steps of tiny_sft on 2 CPU ranks matched one process) but is not in the tests.

Only rank 0 prints (the other ranks' stdout goes to /dev/null; stderr stays, so their
errors show), logs and writes files; every rank takes part in the collectives of saving.
Every rank reads checkpoints and sees rank 0's files: one machine, or nodes that share
the output directory's file system.

Several stages on several GPUs (the PAFT pipeline's SFT and DPO stages side by side):
`run_stages_in_parallel(commands, visible_devices())`.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from engine.interrupts import die_with_parent

MODES = ("none", "ddp", "fsdp2")
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_state = {"mode": "none", "rank": 0, "world": 1, "owns_group": False, "stdout": None, "fsdp_root": None}


# --------------------------------------------------------------------------- process group

def init(mode: str, device: torch.device) -> torch.device:
    """Join torchrun's process group for `mode` and return this rank's device (none: `device` as is).

    An error (ValueError, one line) if ddp/fsdp2 is asked for outside torchrun, or if torchrun
    started several processes for a run with train.distributed: none.
    """
    if mode not in MODES:
        raise ValueError(f"train.distributed: expected one of {', '.join(MODES)}, got {mode!r}")
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none":
        if world_env > 1:
            raise ValueError(f"train.distributed: none, but torchrun started {world_env} processes; "
                             f"set train.distributed=ddp or fsdp2 (or run a single process)")
        _state.update(mode="none", rank=0, world=1)
        return device
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ValueError(f"train.distributed: {mode} needs torchrun's environment ({', '.join(missing)} not set); "
                         f"launch with `torchrun --nproc_per_node N -m engine.train recipe.yaml`")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's GPU
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
        _state["owns_group"] = True
    _state.update(mode=mode, rank=dist.get_rank(), world=dist.get_world_size(), fsdp_root=None)
    if _state["rank"] != 0 and _state["stdout"] is None:  # only rank 0 prints
        _state["stdout"], sys.stdout = sys.stdout, open(os.devnull, "w")
    return device


def teardown() -> None:
    """Leave the process group (if `init` made one) and give the other ranks their stdout back.

    No barrier here, so a rank that fails alone exits at once (and torchrun stops the others).
    A run that ends well has already waited for every rank (the barrier at the end of
    engine.train.run): a gloo rank that leaves while its peer still uses the group can abort.
    """
    if _state["owns_group"] and dist.is_initialized():
        dist.destroy_process_group()
    if _state["stdout"] is not None:
        sys.stdout.close()
        sys.stdout = _state["stdout"]
    _state.update(mode="none", rank=0, world=1, owns_group=False, stdout=None, fsdp_root=None)


def mode() -> str:
    return _state["mode"]


def rank() -> int:
    return _state["rank"]


def world() -> int:
    return _state["world"]


def is_main() -> bool:
    return _state["rank"] == 0


def _active() -> bool:
    return _state["mode"] != "none"  # ddp/fsdp2 always run in a process group (of one rank, maybe)


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(x):
    """The sum over ranks of a number, a tensor, or a dict of numbers (one collective for the dict).

    ints stay ints; a world of one returns x unchanged.
    """
    if not _active():
        return x
    if isinstance(x, dict):
        keys = sorted(x)  # every rank must lay the values out in the same order
        summed = all_reduce_sum(torch.tensor([float(x[k]) for k in keys], dtype=torch.float64, device=_comm_device()))
        return {k: (round(v) if isinstance(x[k], int) else v) for k, v in zip(keys, summed.tolist())}
    if torch.is_tensor(x):
        out = x.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(x.device)
    out = all_reduce_sum(torch.tensor(float(x), dtype=torch.float64, device=_comm_device())).item()
    return round(out) if isinstance(x, int) else out


def gather_object(obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (pickled between our own ranks)."""
    if not _active():
        return [obj]
    out = [None] * world() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def from_main(obj):
    """Rank 0's value of obj, on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def seed_rank_stream(seed: int) -> None:
    """Give ranks > 0 their own torch RNG stream (dropout); rank 0 keeps the single-process one.

    Call after the model is built: base weights drawn from the RNG (builtin:tiny-llama) and
    anything else initialised before must be the same on every rank.
    """
    if rank() > 0:
        torch.manual_seed(seed + rank())


# --------------------------------------------------------------------------- model

def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """Prepare the model (LoRA already applied) for the mode; returns it (the same object)."""
    if mode() == "ddp":
        # As DDP's constructor does: every rank starts from rank 0's parameters and buffers.
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
    elif mode() == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
        mesh = init_device_mesh(device.type, (world(),))
        decoder = model.get_decoder()
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            raise ValueError(f"train.distributed: fsdp2 needs a decoder with a `layers` list "
                             f"({type(decoder).__name__} has none)")
        for layer in decoder.layers:  # one FSDP unit per decoder layer: gathered just before it runs
            fully_shard(layer, mesh=mesh)
        fully_shard(decoder, mesh=mesh)  # the root: embeddings and final norm
        for m in decoder.modules():  # reduce-scatter SUMS gradients (see the module docstring)
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        _state["fsdp_root"] = decoder
    return model


def grad_sync(last: bool) -> None:
    """Call before each micro-batch's backward: FSDP2 reduces gradients only in the last one
    (the others accumulate locally, like DDP's no_sync()). Other modes: nothing."""
    if _state["fsdp_root"] is not None:
        _state["fsdp_root"].set_requires_gradient_sync(last)


def sync_grads(params: list[nn.Parameter]) -> None:
    """ddp: sum every LoRA gradient over ranks, in one flat all-reduce (others: nothing to do).

    Each rank's gradient is that of its share of the single-process loss (divided by the
    GLOBAL totals), so the SUM is exactly the single-process gradient.
    """
    if mode() != "ddp" or not _active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = _one_buffer(grads)
    if flat is not None:  # ProxAdamW's flat gradient: reduce it where it lies, no copies
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _one_buffer(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D tensor covering `tensors` when they are contiguous, back-to-back views of one
    storage in list order (paft_kernels.prox_adamw.flatten_params_ lays gradients out so), else None."""
    if not tensors or not all(t.is_contiguous() for t in tensors):
        return None
    storage = tensors[0].untyped_storage().data_ptr()
    for a, b in zip(tensors, tensors[1:]):
        if (b.untyped_storage().data_ptr() != storage or b.dtype != a.dtype
                or b.data_ptr() != a.data_ptr() + a.numel() * a.element_size()):
            return None
    return tensors[0].as_strided((sum(t.numel() for t in tensors),), (1,))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over all ranks' gradients; the global L2 norm before clipping, as a float."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the shards
        norm = norm.full_tensor()
    return float(norm)


@contextmanager
def full_lora(model: nn.Module):
    """Inside the block every LoRA factor is a plain full tensor (fsdp2: gathered from the shards,
    a collective that every rank must enter); other modes: nothing changes. For reading only
    (saving the adapter, measuring sparsity): the sharded parameters come back afterwards."""
    if mode() != "fsdp2":
        yield model
        return
    from engine.lora import LoRALinear
    swapped = []
    for m in model.modules():
        if isinstance(m, LoRALinear):
            for factor in (m.lora_A, m.lora_B):
                sharded = factor._parameters["weight"]
                factor._parameters["weight"] = nn.Parameter(sharded.full_tensor().detach(), requires_grad=False)
                swapped.append((factor, sharded))
    try:
        yield model
    finally:
        for factor, sharded in swapped:
            factor._parameters["weight"] = sharded


# --------------------------------------------------------------------------- FSDP2 checkpoints (DCP)
#
# DCP writes each rank's shards plus a `.metadata` file. torch's own reader unpickles that file
# with plain pickle.load, and any non-tensor entry with torch.load(weights_only=False): either
# can run code from a crafted checkpoint. So only tensors are saved here (hyper-parameters go
# to trainer_state.json as before), and `.metadata` is read by `_SafeReader`, whose unpickler
# builds nothing but DCP's own metadata classes and torch's dtype/size objects and refuses
# anything else: resuming from an untrusted checkpoint runs no code from it.

SHARDED_DIR = "sharded"


def _trainable_names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def save_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the factors and of their optimizer state under `path` (DCP)."""
    import torch.distributed.checkpoint as dcp
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sd = {}
    for name, p in zip(_trainable_names(model, params), params):
        sd[f"param/{name}"] = p.detach()
        for key, value in optimizer.state.get(p, {}).items():
            if not torch.is_tensor(value):
                raise ValueError(f"fsdp2 checkpoint: optimizer state {key} of {name} is not a tensor")
            sd[f"optim/{name}/{key}"] = value
    dcp.save(sd, checkpoint_id=path)


def load_sharded(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, param_groups: list[dict]) -> None:
    """Read `save_sharded`'s files back into the (sharded) factors and the optimizer, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = _SafeReader(path)
    meta = reader.read_metadata()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_name = dict(zip(_trainable_names(model, params), params))
    sd = {f"param/{name}": p.detach() for name, p in by_name.items()}  # loaded in place
    for key, m in meta.state_dict_metadata.items():
        if not key.startswith("optim/"):
            continue
        name, _, field = key[len("optim/"):].rpartition("/")
        if name not in by_name or not isinstance(m, TensorStorageMetadata):
            raise ValueError(f"train.resume: {path} holds {key}, which this model/optimizer does not have")
        p = by_name[name]
        # Moments shaped like the parameter are sharded like it; anything else (AdamW's step) is replicated.
        sd[key] = (torch.zeros_like(p.detach()) if tuple(m.size) == tuple(p.shape)
                   else torch.zeros(tuple(m.size), dtype=m.properties.dtype))
    dcp.load(sd, storage_reader=reader)
    state = {}
    for i, (name, p) in enumerate(by_name.items()):
        fields = {k.rpartition("/")[2]: v for k, v in sd.items() if k.startswith(f"optim/{name}/")}
        if fields:
            state[i] = fields
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` and nothing else: only these exact (module, name) globals,
    all plain data classes or harmless look-ups, may be built (no dotted names, no functions
    that act on the outside world)."""
    _ALLOWED = {
        *(("torch.distributed.checkpoint.metadata", n) for n in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),  # torch.strided etc. by name
        *(("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
        ("collections", "OrderedDict"), ("torch", "Size"),
        *(("torch", str(t).removeprefix("torch.")) for t in vars(torch).values() if isinstance(t, torch.dtype)),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's DCP metadata")


def _SafeReader(path: str):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if any(isinstance(m, BytesStorageMetadata) for m in metadata.state_dict_metadata.values()):
                raise ValueError(f"train.resume: {self.path} holds pickled (non-tensor) entries; refusing to load them")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


# --------------------------------------------------------------------------- several stages on several GPUs

def visible_devices() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries ("0", "1", ...); [] without CUDA."""
    if not torch.cuda.is_available():
        return []
    n = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def run_stages_in_parallel(stage_commands: list[list[str]], devices: list[str],
                           log_paths: list[str] | None = None, poll_s: float = 0.2) -> list[int]:
    """Run independent stages (e.g. the PAFT pipeline's SFT and DPO) side by side, one GPU each.

    Each command is started as a subprocess with CUDA_VISIBLE_DEVICES set to one entry of
    `devices`, so inside it that GPU is "cuda:0"; at most one command runs per device at a
    time (more commands than devices wait for a free one, in order). With no devices (a CPU
    machine) the commands run one after the other, with CUDA_VISIBLE_DEVICES="" . Output goes
    to this process's stdout/stderr, or, with `log_paths`, command i's to log_paths[i].
    Waits for all of them and returns their exit codes, in the order of `stage_commands`.
    """
    if log_paths is not None and len(log_paths) != len(stage_commands):
        raise ValueError("run_stages_in_parallel: one log path per command")
    slots = list(devices) if devices else [""]  # "" = no GPU: a single slot, so one command at a time
    pending = list(range(len(stage_commands)))
    running: dict[int, tuple[subprocess.Popen, str, object]] = {}
    codes: list[int | None] = [None] * len(stage_commands)
    try:
        while pending or running:
            while pending and slots:
                i, device = pending.pop(0), slots.pop(0)
                out = open(log_paths[i], "w") if log_paths else None
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": device}
                running[i] = (subprocess.Popen(stage_commands[i], env=env, stdout=out,  # dies with this process
                                               stderr=subprocess.STDOUT if out else None,
                                               preexec_fn=die_with_parent), device, out)
            for i, (proc, device, out) in list(running.items()):
                if proc.poll() is not None:
                    codes[i] = proc.returncode
                    if out is not None:
                        out.close()
                    slots.append(device)
                    del running[i]
            if running:
                time.sleep(poll_s)
    finally:  # a command that cannot start, or Ctrl-C: stop the ones already running
        for proc, _, out in running.values():
            proc.terminate()
            proc.wait()
            if out is not None:
                out.close()
    return codes
