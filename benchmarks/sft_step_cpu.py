"""One LoRA SFT training step on CPU: the engine against a plain transformers + peft loop.

    python -m benchmarks.sft_step_cpu [--steps 10] [--warmup 3] [--threads 2]

Both sides get the same model (SmolLM2-135M-Instruct, fp32), the same LoRA
(r=16, alpha=32, dropout 0.05, all seven projections), the same batches
(4 × 64 tokens of multi-turn arithmetic chat, loss on assistant tokens only),
AdamW, grad-norm clipping at 1.0. A step is forward + loss + backward + clip +
optimizer step + zero_grad. The two loops alternate step by step so that
machine noise hits both alike; the median step time over the timed steps is
reported, with the loss after the last step to show both do the same work.

Peer loop, as a transformers + peft user writes it:
    loss = peft_model(input_ids, attention_mask=..., labels=labels).loss
The engine's loop: decoder once, LM head on the trained positions only
(engine.losses), its own LoRALinear.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from benchmarks.common import cpu_device, write_result

from engine.data import Batches, encode_all
from engine.data.arithmetic import arithmetic_rows
from engine.lora import apply_lora, lora_parameters
from engine.losses import sft_loss_sum
from engine.models import load_model_and_tokenizer
from engine.recipe import LoRAConfig, ModelConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_batches(tokenizer, n_batches: int, batch_size: int, seq: int) -> list[dict]:
    # Three arithmetic exchanges per conversation, truncated to `seq` tokens: every row is full length.
    rows = arithmetic_rows("train", 3 * batch_size * n_batches)
    convs = []
    for i in range(0, len(rows), 3):
        convs.append({"messages": [m for r in rows[i:i + 3] for m in r["messages"]]})
    enc, _ = encode_all(convs, tokenizer, "tokenizer", seq)
    batches = Batches(enc, batch_size=batch_size, seed=0, pad_id=tokenizer.pad_token_id, packing=False,
                      max_length=seq)
    return [batches.batch(i) for i in range(n_batches)]


def engine_step(model, params, opt, batch):
    nll_sum, n = sft_loss_sum(model, batch)
    loss = nll_sum / n
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def peer_step(model, params, opt, batch):
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/cpu_sft_step.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft

    base, tok = load_model_and_tokenizer(ModelConfig(name="smollm2-135m-instruct", dtype="float32"),
                                         torch.device("cpu"))
    peer_base = copy.deepcopy(base)

    torch.manual_seed(0)
    apply_lora(base, LoRAConfig(r=16, alpha=32, dropout=0.05, target_modules=TARGETS), seed=0)
    ours_params = lora_parameters(base)
    peer = peft.get_peft_model(peer_base, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                          target_modules=TARGETS, task_type="CAUSAL_LM"))
    peer_params = [p for p in peer.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in peer_params)
    # Same starting factors on both sides.
    with torch.no_grad():
        ours_named = {n: p for n, p in base.named_parameters() if "lora_" in n}
        for n, p in peer.named_parameters():
            if "lora_" in n:
                p.copy_(ours_named[n.replace("base_model.model.", "").replace(".default", "")])
    ours_opt = torch.optim.AdamW(ours_params, lr=1e-4, foreach=False)
    peer_opt = torch.optim.AdamW(peer_params, lr=1e-4, foreach=False)
    base.train()
    peer.train()

    batches = make_batches(tok, args.warmup + args.steps, args.batch, args.seq)
    times = {"engine": [], "peer": []}
    losses = {}
    for i, batch in enumerate(batches):
        for name, fn, model, params, opt in (("engine", engine_step, base, ours_params, ours_opt),
                                             ("peer", peer_step, peer, peer_params, peer_opt)):
            torch.manual_seed(1000 + i)  # same dropout masks are not guaranteed, same RNG stream is
            t0 = time.perf_counter()
            losses[name] = fn(model, params, opt, batch)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    res = {
        "benchmark": "sft_step_cpu",
        "device": cpu_device(args.threads),
        "model": "SmolLM2-135M-Instruct (fp32, from GGUF Q4_1)",
        "lora": "r=16 alpha=32 dropout=0.05 q,k,v,o,gate,up,down",
        "batch": f"{args.batch} x {args.seq} tokens",
        "timed_steps": args.steps,
        "engine_step_s": statistics.median(times["engine"]),
        "peer_step_s": statistics.median(times["peer"]),
        "engine_tokens_per_s": tokens / statistics.median(times["engine"]),
        "peer_tokens_per_s": tokens / statistics.median(times["peer"]),
        "engine_final_loss": losses["engine"],
        "peer_final_loss": losses["peer"],
        "peer": f"transformers {__import__('transformers').__version__} + peft {peft.__version__}",
        "torch": torch.__version__,
    }
    res["speedup_vs_peer"] = res["peer_step_s"] / res["engine_step_s"]
    write_result(res, args.out)
    return res


if __name__ == "__main__":
    main()
