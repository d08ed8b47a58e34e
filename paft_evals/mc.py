"""Task `mc`: multiple choice by log-likelihood (MMLU / ARC-style JSONL, BIG-bench task.json).

Nothing is generated. Each choice c is appended to the question's prompt x and scored by
the model's log-probability of the choice's tokens, summed:

    score(c)       = log p(" " + c | x) = Σ_{t ∈ tokens of " " + c} log p(c_t | x, c_<t)
    prediction     = argmax_c score(c)
    accuracy       = (1/n) Σ_i [ prediction_i ∈ gold_i ]                       (lm-eval's acc)
    accuracy_norm  = the same with score(c) / len(c), len in characters of the
                     choice itself, without the " " delimiter                    (lm-eval's acc_norm)
    accuracy_bytes = the same with score(c) / len(c.encode("utf-8"))            (lm-eval's acc_bytes)
    stderr         = sqrt(p (1 - p) / (n - 1)), the sample standard error of the mean of 0/1 hits
                     (lm-eval's mean_stderr)

A sum favours short choices (every extra token can only lower it); dividing by the length
removes most of that bias and, unlike a token count, means the same for every tokenizer.
lm-evaluation-harness 0.4.13 (api/task.py, process_results for multiple_choice) divides by
`len(choice)`, the Python string length of doc_to_choice's choice: characters, not bytes, and
the target delimiter " " is not counted. Dividing by the bytes of " " + choice, as this file once
did, flips the argmax whenever two choices are close (it adds 1 to every length).

Formats, by file extension:

.jsonl  {"question": ..., "choices": ["...", ...], "answer": 2 | "C" | "2" | "the choice text"}
        (+ optional "subject": then `by_subject` accuracies). Prompt, cloze style as
        lm-evaluation-harness's ARC:   "Question: {question}\\nAnswer:"   choice " {text}".
.json   a BIG-bench task: {"examples": [{"input": ..., "target_scores": {"choice": 0 | 1, ...}}],
        optional "task_prefix", "example_input_prefix" (default "\\nQ: "),
        "example_output_prefix" (default "\\nA: ")}. Prompt task_prefix + input prefix + input
        + output prefix (leading newlines and the trailing space cut), choice " {text}"; the
        gold choices are those with the highest target score. Examples without
        target_scores (generative ones) are skipped and counted in `skipped`.

Items: {"id": "<file stem>/<index in the file>" (a BIG-bench example's index among all its examples,
skipped ones counted), "score": 1 | 0 (accuracy's hit), "margin": score(gold) − max score(other choice)
(the summed log-probs accuracy uses; > 0 means correct; the best gold choice where several are gold;
None where every choice is gold), "pred": the predicted choice's index}.

The prompt is plain text, not a chat turn: the usual setting for log-likelihood benchmarks.
Tokens as lm-eval's HFLM makes them (api/model.py _encode_pair): trailing spaces of the prompt
move to the front of the continuation, prompt + continuation is tokenized as one string (with
the tokenizer's default special tokens, e.g. a BOS), the prompt alone likewise, and the
continuation's tokens are the whole string's tokens after the prompt's count. A prompt longer
than max_length loses tokens from its start.
"""
from __future__ import annotations

import copy
import inspect

import torch

from engine.data.batches import collate
from engine.losses import IGNORE, hidden_states, sequence_logps
from engine.safeio import read_json
from paft_evals.common import EvalArgs, eval_mode, file_stem, first, need_data, read_jsonl, stderr, with_items


DELIMITER = " "  # lm-eval's default target_delimiter, between the prompt and each choice

# --------------------------------------------------------------------------- data

def _gold_index(answer, choices: list[str], where: str) -> int:
    if isinstance(answer, bool):
        answer = None  # a JSON true/false is not an index
    elif isinstance(answer, str):
        a = answer.strip()
        if len(a) == 1 and a.isalpha():
            answer = ord(a.upper()) - ord("A")
        elif a.isdigit():
            answer = int(a)
        elif a in choices:
            answer = choices.index(a)
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is not a choice index, letter or text of {len(choices)} choices")
    return answer


def jsonl_items(path: str) -> list[dict]:
    """MMLU / ARC-style rows -> [{"context", "choices", "gold": [index], "subject", "index": row index}]."""
    items = []
    for i, row in enumerate(read_jsonl(path)):
        where = f"{path} row {i + 1}"
        choices = row.get("choices")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: needs \"question\" and a \"choices\" list of at least 2 strings")
        items.append({"context": f"Question: {row['question'].strip()}\nAnswer:", "choices": choices,
                      "gold": [_gold_index(row.get("answer"), choices, where)], "subject": row.get("subject"),
                      "index": i})
    return items


def bigbench_items(path: str) -> tuple[list[dict], int]:
    """A BIG-bench task.json -> (items as jsonl_items gives them, number of skipped examples)."""
    task = read_json(path)  # engine.safeio: a BOM is dropped; not JSON or nested too deep is one error naming it
    if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
        raise ValueError(f"{path}: not a BIG-bench task (no \"examples\" list)")
    prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    items, skipped = [], 0
    for index, ex in enumerate(task["examples"]):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(ex.get("input"), str):
            skipped += 1
            continue
        choices = list(scores)
        best = max(scores.values())
        context = (prefix + in_prefix + ex["input"] + out_prefix).lstrip("\n").rstrip(" ")
        items.append({"context": context, "choices": choices,
                      "gold": [i for i, c in enumerate(choices) if scores[c] == best], "subject": None,
                      "index": index})
    return items, skipped


# --------------------------------------------------------------------------- scoring

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's HFLM encodes a causal-LM request."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "x" -> "Answer:" + " x": the space belongs to the word's token
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:  # lm-eval scores from a lone prefix token (BOS, else EOS)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer(continuation, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return ctx, whole[len(ctx):]


SHARED_PREFIX_MIN = 32  # tokens; a shorter common header is not worth a cache


def common_prefix_length(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix that every sequence starts with."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _cache_key(decoder) -> str:
    """transformers 5.2x renamed the decoder's `past_key_values` argument and output to `cache`."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _prefix_cache(model, ids: list[int], device):
    """The decoder's key/value cache of one token sequence, (1, p)."""
    decoder = model.get_decoder()
    out = decoder(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return out[_cache_key(decoder)]


def _hidden_after_prefix(model, prefix_cache, p: int, batch: dict) -> torch.Tensor:
    """Hidden states (B, T, H) of each row of `batch` as if the p cached tokens preceded it.

    The cache is copied and repeated for the batch (a forward appends to it, and the next batch
    needs the prefix alone). Rows are right-padded: a real token never attends to the padding
    after it, so the mask only has to cover the prefix and the rows' own tokens."""
    B, T = batch["input_ids"].shape
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(B)
    ones = torch.ones(B, p, dtype=batch["attention_mask"].dtype, device=batch["input_ids"].device)
    position_ids = p + torch.arange(T, device=batch["input_ids"].device).expand(B, T)  # (B, T)
    decoder = model.get_decoder()
    out = decoder(input_ids=batch["input_ids"], attention_mask=torch.cat([ones, batch["attention_mask"]], 1),
                  position_ids=position_ids, use_cache=True, **{_cache_key(decoder): cache})
    return out.last_hidden_state


@torch.no_grad()
def continuation_logps(model, tokenizer, requests: list[tuple[str, str]], batch_size: int,
                       max_length: int = 1024) -> list[tuple[float, int]]:
    """(Σ log p(continuation tokens | context), number of continuation tokens) per (context, continuation).

    One right-padded forward per batch; the continuation's tokens are the only labels, so
    engine.losses.sequence_logps sums exactly their log-probs (the chunked LM-head path
    training uses, in fp32).

    Few-shot benchmarks put one header (instructions + shots) before every question: TruthfulQA's
    6-shot prefix is ~170 of a request's ~190 tokens. When all requests share ≥ SHARED_PREFIX_MIN
    leading context tokens, that prefix runs once, its keys and values are cached, and each request
    runs only its own tokens after it (~8x fewer tokens for TruthfulQA). Causal attention makes the
    result the same as one forward over the whole request, up to float rounding. The prefix stops at
    least one token before every context's end: the first continuation token is predicted from the
    context's last position, which must be in the request's own part.
    """
    device = next(model.parameters()).device
    contexts, samples = [], []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"mc: the choice {continuation!r} has no tokens")
        ctx = ctx[-max(1, max_length - len(cont)):]  # a long prompt loses its start
        contexts.append(ctx)
        samples.append({"input_ids": ctx + cont, "labels": [IGNORE] * len(ctx) + cont})
    p = min(common_prefix_length(contexts), min(len(c) for c in contexts) - 1) if len(samples) > 1 else 0
    cache = None
    if p >= SHARED_PREFIX_MIN:
        with eval_mode(model):
            cache = _prefix_cache(model, contexts[0][:p], device)
        samples = [{k: v[p:] for k, v in s.items()} for s in samples]  # the first label is a context token
    # Batch requests of similar length (longest first), so a short one is not padded to a long one's
    # length; results go back in the callers' order. Padding is masked, so a request's log-prob does
    # not depend on its batch (up to float rounding).
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]["input_ids"]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(samples)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([[samples[i]] for i in idx], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = hidden_states(model, batch) if cache is None else _hidden_after_prefix(model, cache, p, batch)
            sums, counts = sequence_logps(model, hidden, batch["labels"])  # (B,), (B,)
            for i, s, c in zip(idx, sums.tolist(), counts.tolist()):
                out[i] = (s, c)
    return out


def score_items(model, tokenizer, items: list[dict], batch_size: int, max_length: int = 1024) -> list[dict]:
    """Each item with `scores` (summed log-probs), `norm_scores` (per byte) and both predictions."""
    requests = [(it["context"], DELIMITER + c) for it in items for c in it["choices"]]
    logps = continuation_logps(model, tokenizer, requests, batch_size, max_length)
    scored, k = [], 0
    for it in items:
        n = len(it["choices"])
        sums = [s for s, _ in logps[k:k + n]]
        norm = [s / max(1, len(c)) for s, c in zip(sums, it["choices"])]  # characters, no delimiter
        by_bytes = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(sums, it["choices"])]
        k += n
        # argmax: the first maximum, as numpy's argmax (lm-eval) takes it
        scored.append({**it, "scores": sums, "norm_scores": norm, "pred": _argmax(sums),
                       "pred_norm": _argmax(norm), "pred_bytes": _argmax(by_bytes)})
    return scored


def mc_item(it: dict, item_id: str, **extra) -> dict:
    """One scored item's record for a result's "items": id, score (1 if the prediction is gold),
    margin (gold's summed log-prob minus the best other choice's, the scoring accuracy uses), pred."""
    gold = max(it["scores"][g] for g in it["gold"])
    others = [s for j, s in enumerate(it["scores"]) if j not in it["gold"]]
    return {"id": item_id, "score": float(it["pred"] in it["gold"]),
            "margin": gold - max(others) if others else None, "pred": it["pred"], **extra}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def run_mc(model, tokenizer, args: EvalArgs) -> dict:
    path = need_data(args, "mc", "an MMLU-style .jsonl or a BIG-bench task.json")
    if path.endswith(".json"):
        items, skipped = bigbench_items(path)
    else:
        items, skipped = jsonl_items(path), 0
    items = first(items, args.limit)
    if not items:
        raise ValueError(f"mc: {path} has no multiple-choice items")
    scored = score_items(model, tokenizer, items, args.batch_size, args.max_length)
    hits = [it["pred"] in it["gold"] for it in scored]
    hits_norm = [it["pred_norm"] in it["gold"] for it in scored]
    hits_bytes = [it["pred_bytes"] in it["gold"] for it in scored]
    result = {"accuracy": sum(hits) / len(hits), "accuracy_norm": sum(hits_norm) / len(hits),
              "accuracy_bytes": sum(hits_bytes) / len(hits), "n": len(hits), "stderr": stderr(hits),
              "stderr_norm": stderr(hits_norm), "skipped": skipped}
    subjects = {it["subject"] for it in scored if it["subject"]}
    if subjects:
        result["by_subject"] = {s: sum(h for it, h in zip(scored, hits) if it["subject"] == s)
                                / sum(1 for it in scored if it["subject"] == s) for s in sorted(subjects)}
    result["samples"] = [{"prompt": it["context"][-200:], "choices": it["choices"], "gold": it["gold"],
                          "scores": it["scores"], "pred": it["pred"], "correct": h}
                         for it, h in zip(scored[:5], hits)]
    stem = file_stem(path)
    return with_items(result, [mc_item(it, f"{stem}/{it['index']}") for it in scored], "accuracy")
