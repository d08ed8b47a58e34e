"""The heavy fault loops of issue 14 (marked slow; `make test` runs them):

* SIGKILL at random points of a run, mid-write included, then `train.resume=auto` is bit-exact
  with the run that was never killed, and no checkpoint complete before the kill is lost;
* every file of a run damaged three ways (truncated, one byte flipped, emptied): the resume
  falls back to the newest intact checkpoint (and is still bit-exact) or refuses with exit 2
  writing nothing; no intact checkpoint is touched;
* property-based (hypothesis) recipe values and data rows over real training runs: the exit
  status is only ever 0, 2 or 3, and after a 3 every kept checkpoint is intact and finite.
"""
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.checkpoint import list_checkpoints, verify_checkpoint
from engine.log import read_metrics
from test_faults import FAST, REPO, TINY, adapter_of, assert_same_adapter, snapshot, train_cli

pytestmark = pytest.mark.slow

KILLER = textwrap.dedent("""
    # Run engine.train and SIGKILL this process at the n-th call of one function, in the middle of
    # what it does: a half-written safetensors file, a torn metrics line, a forward pass.
    import json, os, signal, sys
    import engine.checkpoint, engine.lora, engine.log, engine.train as train, engine.train_setup as train_setup
    where, n = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}
    def due():
        calls["n"] += 1
        return calls["n"] == n
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    if where in ("checkpoint_save_file", "adapter_save_file"):
        module = engine.checkpoint if where == "checkpoint_save_file" else engine.lora
        real_save = module.save_file
        def save_file(tensors, path, *a, **k):
            real_save(tensors, path, *a, **k)
            if due():
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)  # the rest never reached the disk
                die()
        module.save_file = save_file
    elif where == "metrics_write":
        real_write = engine.log.RunLog.write
        def write(self, row):
            if due():
                self.file.write(json.dumps(row)[:15])
                self.file.flush()
                die()
            real_write(self, row)
        engine.log.RunLog.write = write
    elif where == "forward":
        real_objective = train_setup.sft_objective
        def objective(*a, **k):
            if due():
                die()
            return real_objective(*a, **k)
        train_setup.sft_objective = objective
    sys.exit(train.main(sys.argv[3:]))
""")

# Per 4-step FAST run: 4 forwards, 4 checkpoints (optimizer + rng safetensors each, 2 per
# checkpoint in engine.checkpoint; one adapter each in engine.lora, plus the final adapter), 4 rows.
KILL_POINTS = [("forward", n) for n in (2, 3, 4)] + [("checkpoint_save_file", n) for n in range(1, 9)] + \
              [("adapter_save_file", n) for n in range(1, 6)] + [("metrics_write", n) for n in range(2, 5)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("loops_reference") / "run"
    assert train_cli(out) == 0
    return out


def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path, reference):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    points = random.Random(14).sample(KILL_POINTS, 4)
    for where, n in points:
        out = tmp_path / f"{where}-{n}"
        res = subprocess.run([sys.executable, str(script), where, str(n), TINY, f"output_dir={out}", *FAST],
                             cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True)
        assert res.returncode == -9, (where, n, res.stderr[-2000:])
        kept = {c: snapshot(c) for c in list_checkpoints(str(out))}
        for ckpt in kept:  # everything that looks complete is complete
            verify_checkpoint(ckpt)
        assert train_cli(out, "train.resume=auto") == 0, (where, n)
        assert_same_adapter(adapter_of(out / "adapter"), adapter_of(reference / "adapter"))
        rows = [r for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r]
        ref = [r for r in read_metrics(str(reference / "metrics.jsonl")) if "loss" in r]
        assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in ref], (where, n)
        assert not [p for p in os.listdir(out / "checkpoints") if p.startswith(".tmp")]


def _damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:])
    else:
        path.write_bytes(b"")


def _stopped_after_two(reference, out):
    os.makedirs(out / "checkpoints")
    for name in ("step-000001", "step-000002"):
        shutil.copytree(reference / "checkpoints" / name, out / "checkpoints" / name)
    rows = [json.dumps(r) for r in read_metrics(str(reference / "metrics.jsonl")) if r["step"] <= 2]
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    for name in ("recipe.yaml", "summary.json", "loss.png"):
        shutil.copy(reference / name, out / name)


CHECKPOINT_FILES = ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "optimizer.safetensors",
                    "rng.safetensors", "trainer_state.json"]


@pytest.mark.parametrize("how", ["truncate", "flip", "empty"])
def test_damage_each_checkpoint_file_then_resume_falls_back(tmp_path, reference, capsys, how):
    for rel in CHECKPOINT_FILES:
        out = tmp_path / f"{how}-{rel.replace('/', '_')}"
        _stopped_after_two(reference, out)
        intact = snapshot(out / "checkpoints" / "step-000001")
        _damage(out / "checkpoints" / "step-000002" / rel, how)
        assert train_cli(out, "train.resume=auto") == 0, (how, rel)
        assert "skipping damaged checkpoint" in capsys.readouterr().err, (how, rel)
        assert snapshot(out / "checkpoints" / "step-000001") == intact  # the intact one is untouched
        assert_same_adapter(adapter_of(out / "adapter"), adapter_of(reference / "adapter"))


@pytest.mark.parametrize("how", ["truncate", "flip", "empty"])
@pytest.mark.parametrize("rel", ["metrics.jsonl", "recipe.yaml", "summary.json", "loss.png"])
def test_damage_each_run_file_then_resume_continues_or_refuses_cleanly(tmp_path, reference, capsys, how, rel):
    out = tmp_path / "run"
    _stopped_after_two(reference, out)
    _damage(out / rel, how)
    before = snapshot(out)
    rc = train_cli(out, "train.resume=auto")
    err = capsys.readouterr().err
    assert rc in (0, 2), err[-2000:]
    if rc == 2:  # refused: it says which file, and wrote nothing
        assert rel in err and snapshot(out) == before
    else:  # continued: the same model as the run that never broke
        assert_same_adapter(adapter_of(out / "adapter"), adapter_of(reference / "adapter"))


# ------------------------------------------------------------------ hypothesis over real runs

# Half of the draws are plausible settings (so most examples really train), half hostile ones.
NUMBERS = st.one_of(st.floats(min_value=1e-6, max_value=0.5), st.integers(1, 48), st.sampled_from([1e-3, 0.9, 8]),
                    st.floats(allow_nan=True, allow_infinity=True), st.integers(-10 ** 40, 10 ** 40),
                    st.sampled_from([0, -1, 1e-30, 1e30, 3.5e38, 2 ** 63]))
KEYS = ["train.lr", "train.max_grad_norm", "train.weight_decay", "train.eps", "train.betas", "lora.r", "lora.alpha",
        "lora.dropout", "train.batch_size", "data.max_length", "train.grad_accum", "l1.lambda", "lora.rslora",
        "train.scheduler", "train.method", "l1.on", "train.warmup_steps", "data.packing", "dpo.beta"]


FUZZ_OUTCOMES: list[int] = []


def yaml_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.one_of(NUMBERS, st.lists(NUMBERS, max_size=3), st.booleans(),
                                                            st.sampled_from(["dpo", "orpo", "cosine", "factors"]))),
                min_size=1, max_size=3))
def test_fuzzed_recipes_train_or_refuse_never_crash(tmp_path_factory, overrides):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    argv = [f"{k}={yaml_text(v)}" for k, v in overrides]
    rc = train_cli(out, "train.max_steps=2", "data.source=builtin:harmbench", "data.harmbench_rejected=template",
                   "data.num_train=8", *argv) if any(v == "dpo" or v == "orpo" for _, v in overrides) else \
        train_cli(out, "train.max_steps=2", *argv)
    assert rc in (0, 2, 3), argv
    FUZZ_OUTCOMES.append(rc)
    if rc == 3:  # stopped on a non-finite step: whatever it kept is intact and finite
        for ckpt in list_checkpoints(str(out)):
            verify_checkpoint(ckpt)


def test_the_recipe_fuzz_reached_training():
    # Runs after the fuzz above (file order): some examples must have trained, not all been refused.
    assert FUZZ_OUTCOMES and 0 in FUZZ_OUTCOMES, FUZZ_OUTCOMES


LINE = st.one_of(
    st.binary(max_size=40),  # any bytes: bad encodings, control characters
    st.builds(lambda p, c: json.dumps({"prompt": p, "completion": c}), st.text(max_size=30), st.text(max_size=30)),
    st.builds(lambda p: '{"prompt": "%s\\ud800", "completion": "x"}' % p, st.sampled_from(["", "a", "1+1="])),
    st.builds(lambda m: json.dumps({"messages": m}), st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": st.text(max_size=20)}),
        max_size=3)),
    st.recursive(st.none() | st.booleans() | st.floats() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                 max_leaves=6).map(json.dumps),
)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(LINE, min_size=1, max_size=12), st.sampled_from([0.0, 0.5, 1.0]))
def test_fuzzed_data_rows_train_or_refuse_never_crash(tmp_path_factory, lines, bad_fraction):
    root = tmp_path_factory.mktemp("rows")
    data = root / "rows.jsonl"
    good = json.dumps({"prompt": "2+2=", "completion": "4"})
    data.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass")
                                for x in [good, *lines]) + b"\n")
    rc = train_cli(root / "run", f"data.source={data}", f"data.max_bad_fraction={bad_fraction}", "train.max_steps=1")
    assert rc in (0, 2)
