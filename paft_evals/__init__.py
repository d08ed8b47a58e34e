"""Evaluation suite: `python -m paft_evals TARGET --tasks ... --out results.json`, `python -m paft_evals.report`.

    common.py        EvalArgs, JSONL reading, chat prompts, with_items (every task's per-item scores)
    loading.py       TARGET (adapter dir | HF model dir | engine model name) -> model, tokenizer
    refusal.py       the refusal detector (is_refusal)
    arithmetic.py    task arithmetic        generation.py  tasks gsm8k, bbh, generation
    harmbench.py     task refusal           over_refusal.py task over_refusal (data/benign_prompts.jsonl)
    mc.py            task mc                preference.py  task preference
    tasks.py         the registry and evaluate()
    report.py        results.md + results.png across variants (write_report)

Greedy generation and the arithmetic answer extraction live in the engine (engine/generate.py:
training uses them too). Nothing is imported here, so `import paft_evals.tasks` stays light.
"""
