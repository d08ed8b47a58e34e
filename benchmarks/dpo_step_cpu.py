"""One DPO training step on CPU: the engine against TRL's DPOTrainer with peft.

    python -m benchmarks.dpo_step_cpu [--steps 8] [--warmup 2] [--threads 2]

Both sides: SmolLM2-135M-Instruct (fp32), LoRA r=16 alpha=32 dropout 0.05 on
all seven projections, the same preference pairs (4 pairs per step; prompts
and answers of about 64 tokens each, chat template of the tokenizer), sigmoid
DPO with β=0.1, reference = the base with the adapter disabled (no second
model), AdamW at a constant learning rate, grad-norm clipping at 1.0, no
gradient checkpointing and LoRA dropout kept on (TRL's defaults turn on
checkpointing and zero every dropout; both are set here so that both sides
do the same work).

Each side runs in its own child process, started one after the other by this
script, so that its peak RSS (ru_maxrss) is its own. Both load the model the
same way (engine.models, from the safetensors cache). Reported: median step
time over the timed steps after warm-up, tokens/s (prompt+answer tokens of
chosen and rejected rows, as the engine tokenises them), peak RSS, and the
DPO loss of the first step (ln 2 on both sides if they compute the same thing).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import cpu_device, write_result

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 5e-5


def make_pairs(n: int) -> list[dict]:
    """Deterministic pairs: a ~64-token question, a ~64-token helpful answer and a ~64-token bad one."""
    from engine.data.arithmetic import arithmetic_rows
    rows = arithmetic_rows("train", 4 * n)
    pairs = []
    for i in range(n):
        qs = rows[4 * i: 4 * i + 4]
        prompt = "Please solve these and show each result: " + "; ".join(r["messages"][0]["content"] for r in qs)
        chosen = "Here are the results. " + " ".join(r["messages"][1]["content"] + "." for r in qs) + \
            " Each line shows the operation and its exact value."
        rejected = "I think the answers are roughly " + ", ".join(str(r["answer"] + 7) for r in qs) + \
            ", but I did not check them carefully and some may be wrong, sorry."
        pairs.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
    return pairs


def load_model():
    from engine.models import load_model_and_tokenizer
    from engine.recipe import ModelConfig
    return load_model_and_tokenizer(ModelConfig(name="smollm2-135m-instruct", dtype="float32"), torch.device("cpu"))


def run_engine(pairs, batch: int, n_steps: int) -> tuple[list[float], float, int]:
    from engine.data import PairBatches, encode_pairs
    from engine.lora import apply_lora, lora_parameters
    from engine.objectives import dpo_objective, step_totals
    from engine.recipe import DPOConfig, LoRAConfig

    model, tok = load_model()
    apply_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=TARGETS), seed=0)
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=LR)
    enc, _ = encode_pairs(pairs, tok, "tokenizer", 256)
    batches = PairBatches(enc, batch_size=batch, seed=0, pad_id=tok.pad_token_id)
    cfg = DPOConfig(beta=0.1, loss_type="sigmoid")
    model.train()
    times, first_loss, tokens = [], None, 0
    for i in range(n_steps):
        mb = batches.batch(i)
        t0 = time.perf_counter()
        totals = step_totals([mb])
        loss, stats = dpo_objective(model, mb, totals, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        first_loss = stats["dpo_loss"] if first_loss is None else first_loss
        tokens = int(mb["attention_mask"].sum())
    return times, first_loss, tokens


def run_trl(pairs, batch: int, n_steps: int) -> tuple[list[float], float, int]:
    import datasets
    import peft
    import trl
    from transformers import TrainerCallback

    model, tok = load_model()
    ds = datasets.Dataset.from_list([{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = trl.DPOConfig(output_dir="/tmp/paft_bench_trl", per_device_train_batch_size=batch, max_steps=n_steps,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                         beta=0.1, loss_type=["sigmoid"], max_length=256, gradient_checkpointing=False,
                         use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no",
                         dataloader_num_workers=0, seed=0,
                         disable_dropout=False)  # TRL zeroes every dropout by default; keep LoRA's 0.05 as asked
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                             peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                         target_modules=TARGETS, task_type="CAUSAL_LM"),
                             callbacks=[Timer()])
    trainer.train()
    return times, losses[0] if losses else float("nan"), 0


def child(side: str, batch: int, steps: int, warmup: int, threads: int) -> None:
    torch.set_num_threads(threads)
    pairs = make_pairs(batch * (steps + warmup))
    fn = run_engine if side == "engine" else run_trl
    times, first_loss, tokens = fn(pairs, batch, steps + warmup)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print("RESULT " + json.dumps({"side": side, "step_s": statistics.median(times[warmup:]),
                                  "first_loss": first_loss, "peak_rss_mib": rss_mib, "tokens": tokens}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--side", choices=["engine", "trl"], help=argparse.SUPPRESS)  # internal: one child
    ap.add_argument("--out", default="benchmarks/results/cpu_dpo_step.json")
    args = ap.parse_args(argv)
    if args.side:
        child(args.side, args.batch, args.steps, args.warmup, args.threads)
        return {}

    results = {}
    for side in ("engine", "trl"):
        cmd = [sys.executable, "-m", "benchmarks.dpo_step_cpu", "--side", side, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(line[0][len("RESULT "):])
    tokens = results["engine"]["tokens"]  # same pairs, same tokenizer and template on both sides
    import trl
    res = {
        "benchmark": "dpo_step_cpu",
        "device": cpu_device(args.threads),
        "model": "SmolLM2-135M-Instruct (fp32, from GGUF Q4_1)",
        "lora": "r=16 alpha=32 dropout=0.05 q,k,v,o,gate,up,down",
        "batch": f"{args.batch} pairs, {tokens} tokens per step (chosen + rejected rows, no padding)",
        "timed_steps": args.steps,
        "engine_step_s": results["engine"]["step_s"], "trl_step_s": results["trl"]["step_s"],
        "engine_tokens_per_s": tokens / results["engine"]["step_s"],
        "trl_tokens_per_s": tokens / results["trl"]["step_s"],
        "engine_peak_rss_mib": results["engine"]["peak_rss_mib"], "trl_peak_rss_mib": results["trl"]["peak_rss_mib"],
        "engine_first_loss": results["engine"]["first_loss"], "trl_first_loss": results["trl"]["first_loss"],
        "peer": f"trl {trl.__version__} DPOTrainer + peft, gradient_checkpointing off, disable_dropout off",
        "torch": torch.__version__,
    }
    res["speedup_vs_trl"] = res["trl_step_s"] / res["engine_step_s"]
    write_result(res, args.out)
    return res


if __name__ == "__main__":
    main()
