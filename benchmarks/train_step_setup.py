"""What every system of `python -m benchmarks.train_step` shares: the configurations, the model, its
FLOP count, the LoRA init and the token ids.

    Config, CONFIGS       the named configurations (`--list`) and the settings common to all systems
    step_flops            the model FLOPs of one step (formula: benchmarks/train_step.py's docstring)
    model_config,         the model's transformers config (meta device: no weights), its parameter
    count_params          counts, and the HF model directory every system loads with from_pretrained
    initial_factors       the LoRA factors every system starts from (engine.lora's seeded init)
    make_data,            the rows (token ids) every system trains on, in the same order, and the
    engine_batch          engine's collated batch of a step's rows

The setup child (benchmarks/train_step_children.py) calls these once and writes their output to
the run's work directory; the system children read it back, so no system makes its own.
Heavy imports (torch, transformers, the engine) stay inside the functions: `--list` and the
parent process never pay for them.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE = -100
SYSTEMS = ("ours", "ours_triton", "hf", "trl", "liger")  # ours_triton: ours with train.kernels=triton
FINISHED = ("ok", "rehearsed", "n/a")  # status prefixes of a system row that needs no rerun
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.0)
LR = {"sft": 1e-4, "dpo": 5e-5}
DPO_BETA = 0.1
SEED = 0
LIGER_CPU = "n/a: Liger's kernels are Triton, GPU only"

# The real shapes of the two 7B models (their config.json on the hub), built here with random weights.
# num_hidden_layers is the one knob (--layers): fewer layers, same per-layer shapes.
RANDOM_MODELS = {
    "random:llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                       tie_word_embeddings=False)),
    "random:mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                                          sliding_window=None, tie_word_embeddings=False)),
}


@dataclass(frozen=True)
class Config:
    name: str
    device: str            # "cpu" | "cuda"
    model: str             # engine model name, or a key of RANDOM_MODELS
    method: str            # "sft" | "dpo"
    qlora: bool            # frozen base stored as NF4 (engine.qlora; bitsandbytes for the peers)
    seq: int               # SFT: tokens per row. DPO: at most this many tokens per side (prompt + answer)
    batch: int             # SFT: rows per step. DPO: pairs per step (two rows each)
    steps: int             # timed steps
    warmup: int            # untimed steps before them
    layers: int | None     # num_hidden_layers override (random-init models only)
    systems: tuple[str, ...]
    threads: int = 0       # CPU threads for torch (0: one per core)


def _configs() -> dict[str, Config]:
    cfgs = [
        Config("cpu-smollm2-lora-sft", "cpu", "smollm2-135m-instruct", "sft", False, 256, 4, 10, 2, None,
               ("ours", "hf", "trl", "liger")),
        Config("cpu-smollm2-lora-dpo", "cpu", "smollm2-135m-instruct", "dpo", False, 256, 4, 8, 2, None,
               ("ours", "trl", "liger")),
        # Seconds-long smoke configurations on the built-in random 2-layer model (tests use them).
        Config("cpu-tiny-lora-sft", "cpu", "builtin:tiny-llama", "sft", False, 64, 2, 2, 1, None, ("ours", "hf", "trl")),
        Config("cpu-tiny-lora-dpo", "cpu", "builtin:tiny-llama", "dpo", False, 64, 2, 2, 1, None, ("ours", "trl")),
        # QLoRA SFT smoke (run_gpu.sh --dry-run rehearses the QLoRA row with it)
        Config("cpu-tiny-qlora-sft", "cpu", "builtin:tiny-llama", "sft", True, 64, 2, 2, 1, None, ("ours",)),
    ]
    for short in ("llama2-7b", "mistral-7b"):
        for adapter in ("lora", "qlora"):
            for method in ("sft", "dpo"):
                for seq in (1024, 2048):
                    # The same tokens per step for SFT and DPO: 4 rows (4 SFT rows, or 2 pairs).
                    batch = 4 if method == "sft" else 2
                    systems = (("ours", "ours_triton", "hf", "trl", "liger") if method == "sft"
                               else ("ours", "ours_triton", "trl", "liger"))
                    cfgs.append(Config(f"gpu-{short}-{adapter}-{method}-{seq}", "cuda", f"random:{short}", method,
                                       adapter == "qlora", seq, batch, 6, 2, None, systems))
    return {c.name: c for c in cfgs}


CONFIGS = _configs()


# =========================================================================== model shapes and FLOPs

FLOPS_FORMULA = {
    "sft": "per row of T tokens: 4*N*T + 6*N_lora*T + 12*L*d*T^2 (N: frozen matmul weights incl. LM head)",
    "dpo": "per row of T tokens: 6*N*T + 6*N_lora*T + 16*L*d*T^2 (policy forward+backward + reference forward)",
}


def step_flops(counts: dict, method: str, lengths: list[int]) -> float:
    """Model FLOPs of one step whose rows have these lengths (formula in the module docstring)."""
    n, n_lora, attn = counts["matmul_params"], counts["lora_params"], counts["layers"] * counts["attn_dim"]
    dense, attention = (4, 12) if method == "sft" else (6, 16)
    return float(sum(dense * n * t + 6 * n_lora * t + attention * attn * t * t for t in lengths))


def model_config(cfg: Config):
    """The transformers config of the configuration's model (with the layer override).

    Built in code for the random-init models; read from the model directory otherwise (for SmolLM2
    that is the engine's safetensors cache, converted from the GGUF file once if not there yet).
    """
    import transformers
    if cfg.model in RANDOM_MODELS:
        kind, shape = RANDOM_MODELS[cfg.model]
        cls = transformers.LlamaConfig if kind == "llama" else transformers.MistralConfig
        tok = byte_tokenizer()
        hf_config = cls(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
        if cfg.layers is not None:
            hf_config.num_hidden_layers = cfg.layers
        return hf_config
    return transformers.AutoConfig.from_pretrained(model_dir(cfg, create=True))


def config_summary(hf_config) -> dict:
    return {k: getattr(hf_config, k) for k in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                               "num_attention_heads", "num_key_value_heads", "vocab_size")}


def count_params(hf_config, cfg: Config) -> dict:
    """Matmul weights, LoRA factors, layers and attention width, counted on a meta-device model."""
    import torch
    import transformers
    from engine.lora import LoRALinear, apply_lora, lora_parameters
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    # Counted without quantization: NF4 changes how the frozen weights are stored, not the FLOPs.
    apply_lora(model, dataclasses.replace(lora_config(cfg), quantize_base=None), seed=SEED)
    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    inside = {id(x) for m in lora_layers for x in (m.base_layer, m.lora_A, m.lora_B)}
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in inside)
    matmul += sum(m.base_layer.weight.numel() for m in lora_layers)  # the frozen projections; the rest is the head
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "matmul_params": matmul, "lora_params": sum(p.numel() for p in lora_parameters(model)),
            "layers": hf_config.num_hidden_layers, "attn_dim": hf_config.num_attention_heads * head_dim}


def lora_config(cfg: Config):
    from engine.recipe import LoRAConfig
    return LoRAConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=list(TARGETS),
                      quantize_base="nf4" if cfg.qlora else None)


def byte_tokenizer():
    """builtin:tiny-llama's byte-level tokenizer: the tokenizer saved beside the random-init models."""
    import torch
    from engine.models import load_model_and_tokenizer
    from engine.recipe import ModelConfig
    return load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))[1]


def model_dir(cfg: Config, create: bool) -> str:
    """An HF model directory (safetensors + tokenizer) that every system loads with from_pretrained.

    SmolLM2: the engine's own safetensors cache of the GGUF file. tiny-llama and the random-init
    models: written once under <cache root>/bench/ and reused, so every child (and every later
    run) reads the very same weights.
    """
    from engine.models import cache_root, convert_gguf, gguf_cache_dir, resolve_gguf
    from engine.recipe import ModelConfig
    root = cache_root(ModelConfig(name=cfg.model))
    gguf = resolve_gguf(cfg.model) if cfg.model not in RANDOM_MODELS and not cfg.model.startswith("builtin:") else None
    if gguf is not None:
        path = gguf_cache_dir(gguf, root)
        if create and not os.path.isdir(path):
            convert_gguf(gguf, path)
        return path
    layers = f"-L{cfg.layers}" if cfg.layers is not None else ""
    path = os.path.join(root, "bench", cfg.model.replace(":", "-") + layers)
    if create and not os.path.isdir(path):
        _write_model_dir(cfg, path)
    return path


def _write_model_dir(cfg: Config, path: str) -> None:
    import torch
    import transformers
    from engine.models import load_model_and_tokenizer
    from engine.recipe import ModelConfig
    if cfg.model in RANDOM_MODELS:
        device = torch.device(cfg.device)
        torch.manual_seed(SEED)
        with device:  # initialise on the GPU when there is one: seconds instead of minutes for 7B shapes
            model = transformers.AutoModelForCausalLM.from_config(model_config(cfg), dtype=torch.bfloat16)
        tok = byte_tokenizer()
    else:
        model, tok = load_model_and_tokenizer(ModelConfig(name=cfg.model), torch.device("cpu"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, path)  # written under a temporary name, so a killed run never leaves half a model
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# =========================================================================== the LoRA init (setup child)

def initial_factors(hf_config, cfg: Config) -> dict:
    """The LoRA factors every system starts from, under peft's key names: engine.lora's init.

    apply_lora draws A (Kaiming-uniform, B = 0) layer by layer, in module order, from one generator
    seeded with SEED. The same draws are made here on stand-in layers of the right shapes (the model
    itself is only a meta-device shell, and a stand-in's weight is allocated, never written: no
    weights are loaded). The "ours" child still copies these in after its own apply_adapter, so all
    systems share them whatever happens.
    """
    import torch
    import transformers
    from engine.lora import KEY_PREFIX, LoRALinear, target_module_names
    with torch.device("meta"):
        shell = transformers.AutoModelForCausalLM.from_config(hf_config)
    lcfg = lora_config(cfg)
    generator = torch.Generator().manual_seed(SEED)
    factors = {}
    for name in target_module_names(shell, lcfg.target_modules):
        shape = shell.get_submodule(name)
        stand_in = torch.nn.utils.skip_init(torch.nn.Linear, shape.in_features, shape.out_features, bias=False)
        layer = LoRALinear(stand_in, lcfg.r, lcfg.alpha, lcfg.dropout, lcfg.rslora, lcfg.init, generator)
        factors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().clone()
        factors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().clone()
    return factors


# =========================================================================== data (made once, in the setup child)

def text_sft_rows(tok, n: int, seq: int) -> list[dict]:
    """n multi-turn arithmetic chats, each cut to exactly `seq` tokens; loss on the assistant tokens."""
    from engine.data import arithmetic_rows, encode_all
    per_chat = seq // 8 + 1  # an exchange is more than 8 tokens, so every chat overflows seq and is cut there
    qa = arithmetic_rows("train", n * per_chat)
    chats = [{"messages": [m for r in qa[i * per_chat:(i + 1) * per_chat] for m in r["messages"]]} for i in range(n)]
    enc, _ = encode_all(chats, tok, "tokenizer", seq)
    if len(enc) != n or any(len(e["input_ids"]) != seq for e in enc):
        raise ValueError(f"data: could not fill {n} rows of {seq} tokens")
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in enc]


def text_pairs(n: int) -> list[dict]:
    """n preference pairs: a four-question prompt, the correct answers (chosen), wrong ones (rejected)."""
    from engine.data import arithmetic_rows
    qa = arithmetic_rows("train", 4 * n)
    pairs = []
    for i in range(n):
        qs = qa[4 * i: 4 * i + 4]
        prompt = "Please solve these and show each result: " + "; ".join(r["messages"][0]["content"] for r in qs)
        chosen = "Here are the results. " + " ".join(r["messages"][1]["content"] + "." for r in qs) + \
            " Each line shows the operation and its exact value."
        rejected = "I think the answers are roughly " + ", ".join(str(r["answer"] + 7) for r in qs) + \
            ", but I did not check them carefully and some may be wrong, sorry."
        pairs.append({"prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": rejected})
    return pairs


def text_dpo_rows(tok, n: int, seq: int) -> list[dict]:
    """The pairs tokenized by the engine (its chat template and truncation), split into prompt / answers.

    The answer is the run of trained tokens; whatever the template puts after it (an untrained
    newline) is dropped for every system alike, so TRL's (prompt_ids, chosen_ids, rejected_ids)
    and the engine's labelled rows are the same tokens with the same trained positions.
    """
    from engine.data import encode_pairs
    enc, _ = encode_pairs(text_pairs(n), tok, "tokenizer", seq)
    rows = []
    for p in enc:
        sides = {}
        for side in ("chosen", "rejected"):
            ids, labels = p[f"{side}_input_ids"], p[f"{side}_labels"]
            trained = [t for t, lab in enumerate(labels) if lab != IGNORE]
            start, end = trained[0], trained[-1] + 1
            if end - start != len(trained):
                raise ValueError("data: the trained answer tokens are not one contiguous run")
            sides[side] = (ids[:start], ids[start:end])
        if sides["chosen"][0] != sides["rejected"][0]:
            raise ValueError("data: chosen and rejected rows do not share their prompt tokens")
        rows.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                     "rejected_ids": sides["rejected"][1]})
    return rows


def random_rows(cfg: Config, vocab: int, n: int) -> list[dict]:
    """Random token ids (fixed seed): SFT rows of seq tokens, half prompt / half answer; DPO pairs likewise."""
    import torch
    g = torch.Generator().manual_seed(SEED)
    half = cfg.seq // 2
    if cfg.method == "sft":
        ids = torch.randint(0, vocab, (n, cfg.seq), generator=g).tolist()
        return [{"input_ids": r, "labels": [IGNORE] * half + r[half:]} for r in ids]
    ids = torch.randint(0, vocab, (n, half + 2 * (cfg.seq - half)), generator=g).tolist()
    return [{"prompt_ids": r[:half], "chosen_ids": r[half:cfg.seq], "rejected_ids": r[cfg.seq:]} for r in ids]


def make_data(cfg: Config, tok, vocab: int) -> tuple[dict, str]:
    n = cfg.batch * (cfg.warmup + cfg.steps)  # step i reads rows [i*batch, (i+1)*batch): every system, in order
    if cfg.model in RANDOM_MODELS:
        note = (f"random token ids (seed {SEED}); SFT rows of {cfg.seq} tokens, first half prompt" if cfg.method == "sft"
                else f"random token ids (seed {SEED}); prompt {cfg.seq // 2} + answers {cfg.seq - cfg.seq // 2} tokens")
        return {"method": cfg.method, "rows": random_rows(cfg, vocab, n)}, note
    if cfg.method == "sft":
        return ({"method": "sft", "rows": text_sft_rows(tok, n, cfg.seq)},
                f"multi-turn arithmetic chat, {cfg.seq} tokens per row, loss on assistant tokens")
    return ({"method": "dpo", "rows": text_dpo_rows(tok, n, cfg.seq)},
            "arithmetic preference pairs (4 questions; correct vs wrong answers), chat template")


def engine_batch(rows: list[dict], method: str, pad_id: int) -> dict:
    """The step's rows as the engine's data pipeline hands them to the loop (engine.data collate).

    The hf loop reads input_ids / attention_mask / labels of the same tensors. A DPO batch holds
    the chosen rows, then the rejected ones, as engine.data.PairBatches builds it.
    """
    from engine.data.batches import collate
    if method == "sft":
        return collate([[{"input_ids": r["input_ids"], "labels": r["labels"]}] for r in rows], pad_id)
    sides = [{"input_ids": r["prompt_ids"] + r[k], "labels": [IGNORE] * len(r["prompt_ids"]) + r[k]}
             for k in ("chosen_ids", "rejected_ids") for r in rows]
    batch = collate([[s] for s in sides], pad_id)
    batch["n_pairs"] = len(rows)
    return batch
