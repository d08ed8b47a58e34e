"""run_gpu.sh's bookkeeping: $OUT/run.json after every section, and one command that reruns what failed.

    python benchmarks/gpu/status.py STATUS.jsonl ENV.json OUT DRY WALL_S

STATUS.jsonl holds one line per section run_gpu.sh has finished (name, status, exit, seconds, budget;
for a train section its configuration and the systems it was asked for). ENV.json is the environment
recorded once at the start. It writes OUT/run.json (engine.writes: a reader never sees half of it) and
prints the rerun line, `SECTIONS="..." bash benchmarks/gpu/run_gpu.sh`, naming every section that did
not finish and, for a train section, only its systems that did not (from OUT/train_step/*.json, which
train_step rewrites after every system, so the file knows even when the section was killed).
No torch import: it runs between sections and must cost no start-up time.
"""
from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.train_step_setup import FINISHED  # noqa: E402 - the repository root first (run as a script)
from engine.writes import write_json  # noqa: E402 - no torch


def train_runs(out: str) -> dict:
    """Every train_step run under OUT/train_step/, by configuration name."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "train_step", "*.json"))):
        try:
            with open(path) as f:
                runs.update(json.load(f).get("runs", {}))
        except (OSError, ValueError, AttributeError):
            continue
    return runs


def unfinished(record: dict, runs: dict) -> str | None:
    """What of this section to run again: None (nothing), the section, or section:sys1,sys2."""
    name = record["section"]
    if "config" not in record:  # a kernel section: all or nothing
        return None if record["status"] == "ok" else name
    wanted = [s for s in record.get("systems", "").split(",") if s]
    run = runs.get(record["config"])
    if run is None:  # the setup never finished: the whole section, with the systems it was asked for
        return f"{name}:{','.join(wanted)}" if wanted else name
    left = [s for s in wanted if not run["systems"].get(s, {}).get("status", "").startswith(FINISHED)]
    return f"{name}:{','.join(left)}" if left else None


def summarize(records: list[dict], out: str) -> tuple[list[dict], list[str]]:
    """The records with each train section's per-system outcome added, and the rerun list."""
    runs = train_runs(out)
    rerun = []
    for rec in records:
        again = unfinished(rec, runs)
        if "config" in rec and rec["config"] in runs:
            rec["systems_status"] = {s: runs[rec["config"]]["systems"].get(s, {}).get("status", "missing")
                                     for s in rec.get("systems", "").split(",") if s}
        if again:
            rerun.append(again)
    return records, rerun


def rerun_command(rerun: list[str], records: list[dict], dry: bool) -> str:
    budget = sum(r.get("budget", 0) for r in records if r["section"] in {x.split(":")[0] for x in rerun})
    flag = " --dry-run" if dry else ""
    return (f'SECTIONS="{" ".join(rerun)}" bash benchmarks/gpu/run_gpu.sh{flag}'
            f'    # device tool: carry [".whl"], timeout_s {min(600, budget + 90)}')


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print("usage: status.py STATUS.jsonl ENV.json OUT DRY WALL_S", file=sys.stderr)
        return 2
    status, env_path, out, dry, wall = argv[0], argv[1], argv[2], argv[3] == "1", int(argv[4])
    with open(status) as f:
        records = [json.loads(line) for line in f if line.strip()]
    try:
        with open(env_path) as f:
            env = json.load(f)
    except (OSError, ValueError):
        env = {"note": "the environment could not be recorded (see run.log)"}
    records, rerun = summarize(records, out)
    doc = {"benchmark": "run_gpu", "dry_run": dry, "wall_s": wall, "environment": env, "sections": records,
           "rerun": rerun_command(rerun, records, dry) if rerun else None}
    write_json(os.path.join(out, "run.json"), doc, indent=1)
    print(doc["rerun"] or "nothing to rerun")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
