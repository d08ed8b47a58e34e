"""Records: what says a finished pipeline step is current.

Each step writes `<its output>.spec.json` beside its output once it has finished:
{"fingerprint": sha256 of the spec, "spec": ...}. A step's spec holds what decides its result,
including its inputs' identities: a stage's resolved recipe (and the adapter of the stage it
trains after), a merge's mergekit config and the sha256 of every adapter it merges, an
evaluation's arguments and the identity of the model it scores. A finished step is skipped only
while its record matches; a changed merge weight redoes the merge, which changes the merge's
fingerprint, which redoes its evaluation. A finished training stage is never retrained silently:
its spec changing is an error that says what changed and to remove the stage's directory
(training is the expensive, possibly hand-tuned result; nothing saved is deleted).
"""
from __future__ import annotations

import hashlib
import json
import os

from engine.safeio import file_digest

from engine.writes import write_json


def fingerprint(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def adapter_digest(adapter_dir: str) -> str:
    return file_digest(os.path.join(adapter_dir, "adapter_config.json"),
                       os.path.join(adapter_dir, "adapter_model.safetensors"))


def changes(old, new, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs (dicts and lists walked), for messages."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changes(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changes(a, b, f"{prefix[:-1]}[{i}].")]
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class Record:
    """`<output>.spec.json`: the spec a finished step's output was made from."""

    def __init__(self, output: str, spec: dict):
        self.path = output.rstrip(os.sep) + ".spec.json"
        self.spec = spec
        self.fingerprint = fingerprint(spec)

    def saved(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None  # none yet, or torn: the step is redone

    def current(self) -> bool:
        saved = self.saved()
        return saved is not None and saved.get("fingerprint") == self.fingerprint

    def what_changed(self) -> str:
        saved = self.saved()
        if saved is None:
            return "no record of the spec it was made from"
        diff = changes(saved.get("spec"), self.spec)
        return "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "") or "spec changed"

    def write(self) -> None:
        write_json(self.path, {"fingerprint": self.fingerprint, "spec": self.spec}, indent=1, sort_keys=True,
                   default=str)
