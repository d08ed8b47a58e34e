"""The child processes of `python -m benchmarks.train_step`: one per system, plus the setup.

    python -m benchmarks.train_step --child SYSTEM --plan PLAN.json    (started by the parent only)

    run_child          reads the plan, sets the threads, runs one of the functions below and prints
                       its result as one `RESULT {json}` line, which the parent reads
    child_setup        writes the model directory, the data and the shared LoRA init (made by
                       benchmarks/train_step_setup.py) into the work directory; measures the matmul ceiling
    child_ours         the engine: engine.step.train_step itself, the step engine/train.py runs
                       (ours: train.kernels=auto; ours_triton: train.kernels=triton)
    child_hf           a plain transformers + peft loop (liger=True: on a Liger-patched model)
    child_trl          TRL's SFTTrainer / DPOTrainer (liger=True: use_liger_kernel)
    child_liger        Liger-Kernel where it applies: the hf loop (SFT) or TRL (DPO); on CPU rehearsed
                       up to the first step (patched, loaded, wrapped), since its kernels need a GPU

Every child returns its raw numbers (seconds and loss per step, peak memory); the parent
(benchmarks/train_step.py) turns them into tokens/s, MFU and ratios. Each runs in its own
process so that its peak memory is its own.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from contextlib import nullcontext

from benchmarks.train_step_setup import (DPO_BETA, LORA, LR, SEED, TARGETS, Config, config_summary, count_params,
                                         engine_batch, initial_factors, lora_config, make_data, model_dir)


def run_child(system: str, plan_path: str) -> int:
    import torch
    with open(plan_path) as f:
        plan = json.load(f)
    cfg = Config(**{**plan["config"], "systems": tuple(plan["config"]["systems"])})
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads or os.cpu_count())
    elif not torch.cuda.is_available():
        raise SystemExit(f"{cfg.name} needs a CUDA device; torch sees none")
    fn = {"setup": child_setup, "ours": child_ours, "hf": child_hf, "trl": child_trl, "liger": child_liger,
          "ours_triton": lambda c, w: child_ours(c, w, kernels="triton")}[system]
    result = fn(cfg, plan["workdir"])
    print("RESULT " + json.dumps(result))
    return 0


def child_setup(cfg: Config, workdir: str) -> dict:
    """Write the model directory (cached), the data and the shared LoRA init; measure the matmul ceiling."""
    import torch
    import transformers
    from safetensors.torch import save_file
    path = model_dir(cfg, create=True)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    data, note = make_data(cfg, tok, hf_config.vocab_size)
    with open(os.path.join(workdir, "data.json"), "w") as f:
        json.dump(data, f)

    save_file(initial_factors(hf_config, cfg), os.path.join(workdir, "lora_init.safetensors"))

    ceiling, how = matmul_ceiling(torch.device(cfg.device))
    name = torch.cuda.get_device_name(0) if cfg.device == "cuda" else "cpu"
    return {"status": "ok", "model_dir": path, "device_name": name, "counts": count_params(hf_config, cfg),
            "model_config": config_summary(hf_config), "data_note": note, "ceiling_flops": ceiling,
            "ceiling_how": how, "environment": environment(cfg, name)}


def matmul_ceiling(device) -> tuple[float, str]:
    """FLOP/s of one large matrix product: bf16 8192^3 on GPU, fp32 2048^3 on CPU; median of timed runs."""
    import torch
    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (2048, torch.float32, 5)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(reps + 3):  # 3 warm-ups
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    how = f"torch.matmul {n}x{n}x{n} {str(dtype).removeprefix('torch.')}, median of {reps}"
    return 2 * n ** 3 / statistics.median(times), how


def environment(cfg: Config, device_name: str) -> dict:
    import platform
    from importlib import metadata
    from benchmarks.common import cpu_model_name

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    import torch
    from benchmarks.common import gpu_driver
    env = {pkg: version(pkg) for pkg in ("torch", "triton", "transformers", "peft", "trl", "bitsandbytes",
                                         "liger-kernel", "accelerate", "datasets", "numpy")}
    env.update(python=platform.python_version(), device=device_name, cpu=cpu_model_name(), cpu_count=os.cpu_count(),
               cuda=torch.version.cuda, driver=gpu_driver() if cfg.device == "cuda" else None)
    if cfg.device == "cpu":
        env["torch_threads"] = torch.get_num_threads()
    return env


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


class Meter:
    """Peak memory of the training steps: reset after setup, read after the last step."""

    def __init__(self, device):
        import torch
        self.device = device
        if device.type == "cuda":
            self.load_peak = torch.cuda.max_memory_allocated() / 2 ** 20  # loading / quantizing, for the record
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated over the training steps"
        else:
            from benchmarks.common import reset_peak_rss
            self.load_peak = None
            self.method = reset_peak_rss()

    def result(self) -> dict:
        import torch
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            from benchmarks.common import peak_rss_mib
            peak = peak_rss_mib(self.method)
        return {"peak_mem_mib": peak, "load_peak_mib": self.load_peak, "mem_method": self.method}


def _load_data(workdir: str) -> dict:
    with open(os.path.join(workdir, "data.json")) as f:
        return json.load(f)


def _init_factors(workdir: str) -> dict:
    from safetensors.torch import load_file
    return load_file(os.path.join(workdir, "lora_init.safetensors"))


def _batches(cfg: Config, workdir: str, pad_id: int) -> list[dict]:
    rows = _load_data(workdir)["rows"]
    return [engine_batch(rows[i * cfg.batch:(i + 1) * cfg.batch], cfg.method, pad_id)
            for i in range(cfg.warmup + cfg.steps)]


def timed_steps(batches: list[dict], device, step) -> tuple[list[float], list[float]]:
    """Run step(mb) -> loss (a float) on every batch; (seconds per step, losses). The clock brackets one
    whole optimizer step, after a device synchronize on both sides (the ours and hf loops share it)."""
    times, losses = [], []
    for mb in batches:
        _sync(device)
        t0 = time.perf_counter()
        losses.append(step(mb))
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses


def _autocast(device):
    """bf16 autocast on GPU, as engine/train.py runs it; nothing on CPU (fp32)."""
    import torch
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def kernel_counters() -> dict:
    """Every launch counter of paft_kernels: which LoRA linear route ran, which Triton kernels, which
    optimizer and NF4 route (the difference over the steps is recorded, so a silent fallback shows)."""
    from paft_kernels import lora_linear, lora_torch, lora_triton, nf4, prox_adamw
    return {**{f"lora_linear route {k}": v for k, v in lora_linear.ROUTE_CALLS.items()},
            **{f"lora triton kernel {k}": v for k, v in lora_triton.LAUNCHES.items()},
            "lora cublas forward": lora_torch.LAUNCHES["cublas"],
            **{f"prox_adamw {k}": v for k, v in prox_adamw.LAUNCHES.items()},
            **{f"nf4 dequant {k}": v for k, v in nf4.LAUNCHES.items()}}


def child_ours(cfg: Config, workdir: str, kernels: str = "auto") -> dict:
    """The engine: its loader, LoRA / QLoRA, objective and optimizer, and its step itself.

    The timed step is engine.step.train_step, the function engine/train.py's loop calls, with one
    micro-batch per step (train.grad_accum 1) and the recipe's default clip (train.max_grad_norm
    1.0): forward + loss, backward, clip, the finiteness checks, the optimizer step, zero_grad. No
    copy of it lives here, so the benchmark measures the step users run, checks included.
    """
    from functools import partial

    import torch
    from engine.lora import copy_lora_tensors, kernel_routes_line, lora_parameters, set_kernels
    from engine.models import load_model_and_tokenizer
    from engine.objectives import dpo_objective, sft_objective
    from engine.optim import build_optimizer
    from engine.qlora import apply_adapter
    from engine.recipe import DPOConfig, ModelConfig, TrainConfig
    from engine.step import train_step

    device = torch.device(cfg.device)
    model, tok = load_model_and_tokenizer(ModelConfig(name=model_dir(cfg, create=False)), device)
    apply_adapter(model, lora_config(cfg), seed=SEED)  # LoRA, or QLoRA's NF4 base (quantize_base), as train.py
    copy_lora_tensors(model, _init_factors(workdir), "lora_init.safetensors")  # the same values, made explicit
    set_kernels(model, kernels)  # train.kernels, as engine/train.py sets it
    routes_line = kernel_routes_line(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    params = lora_parameters(model)
    # The recipe's default optimizer, as train.py builds it; its start-up line (which optimizer, which
    # route) goes into the description instead of the child's stdout.
    announced = []
    optimizer = build_optimizer(params, TrainConfig(lr=LR[cfg.method], kernels=kernels), announce=announced.append)
    objective = sft_objective if cfg.method == "sft" else partial(dpo_objective, cfg=DPOConfig(beta=DPO_BETA))
    autocast = partial(_autocast, device)  # train_step wants a zero-argument callable, as train.py passes it

    def step(mb: dict) -> float:
        result = train_step(model, objective, [mb], optimizer, params, device=device, autocast=autocast,
                            max_grad_norm=1.0, kernels=kernels)
        # the number every system records: the SFT loss, or DPO's preference loss (TRL logs that one)
        return result.stats["dpo_loss"] if cfg.method == "dpo" else result.loss

    batches = _batches(cfg, workdir, tok.pad_token_id)
    model.train()
    meter = Meter(device)
    before = kernel_counters()
    times, losses = timed_steps(batches, device, step)
    launches = {k: v - before.get(k, 0) for k, v in kernel_counters().items() if v - before.get(k, 0)}
    opt_line = announced[0] if announced else f"optimizer: {type(optimizer).__name__}"
    desc = ("engine: engine.qlora NF4 base" if cfg.qlora else "engine: engine.lora") + \
        f", {'sft_objective' if cfg.method == 'sft' else 'dpo_objective (reference = adapters off)'}" + \
        f", step engine.step.train_step (grad-norm clip 1.0), train.kernels={kernels}, " + opt_line
    return {"status": "ok", "description": desc, "kernels": kernels, "optimizer": type(optimizer).__name__,
            "optimizer_line": opt_line, "routes_line": routes_line,
            "launches_over_all_steps": launches, "steps_counted": len(batches),
            "step_s": times, "losses": losses, **meter.result()}


def load_peer_model(cfg: Config):
    """The model as a transformers user loads it: from_pretrained, bitsandbytes 4-bit for QLoRA."""
    import torch
    import transformers
    path = model_dir(cfg, create=False)
    dtype = torch.bfloat16 if cfg.device == "cuda" else torch.float32
    if cfg.qlora:
        # QLoRA as the paper's code and the peft docs set it up. No prepare_model_for_kbit_training: it
        # would upcast the embedding, norms and head to fp32 and turn on gradient checkpointing, work the
        # engine does not do (TRL calls it itself for a quantized model; that is TRL's default behaviour).
        bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        # device_map: the GPU; on CPU (the dry run) bitsandbytes' CPU backend, so the peer's code path is rehearsed
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=bnb,
                                                                  device_map={"": 0 if cfg.device == "cuda" else "cpu"})
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(cfg.device)
    model.config.use_cache = False
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # as engine.models does, so every system pads with the same id
        tok.pad_token = tok.eos_token
    return model, tok


def peft_lora_config():
    import peft
    return peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules=list(TARGETS), task_type="CAUSAL_LM")


def set_factors(peft_model, workdir: str) -> None:
    """Load the shared init into a peft model (peft's own loader; every key must land)."""
    import peft
    result = peft.set_peft_model_state_dict(peft_model, _init_factors(workdir))
    if result.unexpected_keys:
        raise RuntimeError(f"LoRA init keys peft did not take: {result.unexpected_keys[:3]}")


def child_hf(cfg: Config, workdir: str, liger: bool = False) -> dict:
    """A plain transformers + peft (+ bitsandbytes) loop; with liger=True on a Liger-patched model."""
    import peft
    import torch
    if liger:
        import liger_kernel.transformers as lk
        from transformers import AutoConfig
        kind = AutoConfig.from_pretrained(model_dir(cfg, create=False)).model_type
        getattr(lk, f"apply_liger_kernel_to_{kind}")()  # patches the model classes before loading
    device = torch.device(cfg.device)
    base, tok = load_peer_model(cfg)
    model = peft.get_peft_model(base, peft_lora_config())
    set_factors(model, workdir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR[cfg.method], weight_decay=0.0)

    def step(mb: dict) -> float:
        with _autocast(device):
            loss = model(input_ids=mb["input_ids"].to(device), attention_mask=mb["attention_mask"].to(device),
                         labels=mb["labels"].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    batches = _batches(cfg, workdir, tok.pad_token_id)
    model.train()
    if liger and device.type == "cpu":
        return rehearsed(model, "patched by liger_kernel, peft-wrapped, optimizer built")
    meter = Meter(device)
    times, losses = timed_steps(batches, device, step)
    desc = "transformers + peft loop" + (" + bitsandbytes 4-bit" if cfg.qlora else "") + \
        (" on a liger_kernel-patched model" if liger else "") + ", torch AdamW"
    return {"status": "ok", "description": desc, "step_s": times, "losses": losses, **meter.result()}


def child_trl(cfg: Config, workdir: str, liger: bool = False) -> dict:
    """TRL's SFTTrainer / DPOTrainer on the same token ids, in order, from the same factors."""
    import datasets
    import torch
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    device = torch.device(cfg.device)
    model, tok = load_peer_model(cfg)
    rows = _load_data(workdir)["rows"]
    times, losses = [], []
    state = {}

    class StepClock(TrainerCallback):
        """Times each optimizer step (Trainer fetches the batch before on_step_begin) and collects losses."""

        def on_train_begin(self, args, st, control, **kw):
            state["meter"] = Meter(device)

        def on_step_begin(self, args, st, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(device)
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class InOrder:
        """Rows in the given order, as every other system reads them (Trainer shuffles by default)."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    common = dict(output_dir=os.path.join(workdir, "trl"), per_device_train_batch_size=cfg.batch,
                  max_steps=cfg.warmup + cfg.steps, learning_rate=LR[cfg.method], lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, gradient_checkpointing=False,
                  bf16=device.type == "cuda", use_cpu=device.type == "cpu", report_to=[], logging_steps=1,
                  save_strategy="no", dataloader_num_workers=0, seed=SEED, use_liger_kernel=liger)
    if cfg.method == "sft":
        args = trl.SFTConfig(**common, max_length=cfg.seq, packing=False)
        cls = type("SFTTrainerInOrder", (InOrder, trl.SFTTrainer), {})
    else:
        args = trl.DPOConfig(**common, beta=DPO_BETA, loss_type=["sigmoid"], max_length=None)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            # The rows are already token ids (prompt_ids, chosen_ids, rejected_ids: the columns TRL's
            # own tokenization produces), so both systems train on identical ids; nothing to redo.
            return dataset
        cls = type("DPOTrainerInOrder", (InOrder, trl.DPOTrainer), {"_prepare_dataset": _prepare_dataset})
    trainer = cls(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                  peft_config=peft_lora_config(), callbacks=[StepClock()])
    set_factors(trainer.model, workdir)
    if liger and device.type == "cpu":  # what Trainer.train() does first with use_liger_kernel, then stop
        from transformers.integrations.liger import apply_liger_kernel
        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
        return rehearsed(trainer.model, f"trl {trl.__version__} {cls.__name__} with use_liger_kernel=True, "
                                        "Liger applied as Trainer.train() applies it")
    trainer.train()
    desc = f"trl {trl.__version__} {'SFTTrainer' if cfg.method == 'sft' else 'DPOTrainer'} + peft" + \
        (" + bitsandbytes 4-bit" if cfg.qlora else "") + (", use_liger_kernel" if liger else "") + \
        f", optim {args.optim}"
    return {"status": "ok", "description": desc, "step_s": times, "losses": losses, **state["meter"].result()}


def rehearsed(model, what: str) -> dict:
    """The dry run's liger row: everything up to the first step ran; the steps need a GPU (Liger's Triton
    kernels fail under the Triton interpreter). The count of Liger modules shows the patch took."""
    def liger(m) -> bool:  # a Liger class, or (TRL / Trainer patching an instance) a Liger forward bound to it
        fwd = getattr(m.forward, "__func__", m.forward)
        return any(getattr(o, "__module__", "").startswith("liger_kernel") for o in (type(m), fwd))
    kinds = sorted({m._get_name() for m in model.modules() if liger(m)})
    if not kinds:
        raise RuntimeError("liger: no liger_kernel module in the model after patching (the patch did not apply)")
    return {"status": f"rehearsed: {what}; Liger modules {', '.join(kinds)}; no step (CPU: Liger's kernels "
                      "need a GPU)", "liger_modules": kinds}


def child_liger(cfg: Config, workdir: str) -> dict:
    """Liger-Kernel where it applies: SFT on a patched model in the hf loop; DPO through TRL's switch."""
    return child_hf(cfg, workdir, liger=True) if cfg.method == "sft" else child_trl(cfg, workdir, liger=True)
