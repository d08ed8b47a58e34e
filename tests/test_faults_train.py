"""Issue 24 for engine.train and the pipeline, tried as a careless or hostile user would:

1. nothing the engine did not write is deleted (only its own exact temporaries; stage names are
   plain file names, none of the pipeline's own);
2. resume refuses changed settings (the whole recipe is compared, but for MAY_CHANGE_ON_RESUME),
   the recipe's optimizer settings are the ones that run, and a checkpoint past max_steps is refused;
3. one command per output: a second train or pipeline on the same output exits 2 naming the first;
4. Ctrl-C and SIGTERM are one line naming the last checkpoint, exit 130 or 143, and a pipeline's
   training stage stops with it (even when the pipeline is killed outright);
5. a full disk, a read-only filesystem, a dangling symlink or an over-long name is one `error:` line
   (exit 2) naming the file, and no checkpoint saved before the failure is harmed.

Throughout, the exit status is only ever 0, 2, 3, 130 or 143, and a file the engine did not write
keeps its SHA-256. The command lines run in-process (`main(argv)`) where they can, and as real
subprocesses where a signal or a second process is the point, on builtin:tiny-llama with
test_faults' FAST overrides (two-sample steps, a checkpoint after each).
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.train as train
from engine.checkpoint import (MAY_CHANGE_ON_RESUME, RUN_FILES, STATE_FILE, list_checkpoints,
                               remove_stale_temporaries, verify_checkpoint)
from engine.log import read_metrics
from engine.optim import lr_at
from engine.pipeline import load_pipeline
from engine.pipeline.config import RESERVED_NAMES
from engine.pipeline.run import check_finished_stages
from engine.recipe import RecipeError, load_recipe
from engine.safeio import json_checksum
from engine.schema import schema_paths
from test_faults import (FAST, REPO, TINY, adapter_of, assert_same_adapter, cli, reference, snapshot,  # noqa: F401
                         train_cli, two_steps)
from test_faults_outputs import tmpfs

EXITS = {0, 2, 3, 130, 143}  # the only exit statuses a command line may have


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def hashes(paths) -> dict:
    """SHA-256 of every file under each of `paths` (a file, a folder, or a link: what it points to)."""
    out = {}
    for p in map(str, paths):
        if os.path.isfile(p):
            out[p] = sha(p)
        for here, _, files in os.walk(p):
            for name in files:
                out[os.path.join(here, name)] = sha(os.path.join(here, name))
    return out


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def pipeline_yaml(tmp_path, out, stages: dict, name: str = "p.yaml") -> str:
    """A pipeline recipe of `stages` (name -> overrides of recipes/tiny_sft.yaml), one tiny evaluation."""
    raw = {"pipeline": {"output_dir": str(out), "model": "builtin:tiny-llama",
                        "stages": {n: {"recipe": TINY, "overrides": list(o)} for n, o in stages.items()},
                        "evals": {"tasks": ["arithmetic"], "limit": 1, "max_new_tokens": 2, "batch_size": 1}}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def wait_for(condition, what: str, timeout: float = 120.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def start(argv: list[str], log_dir, name: str, **kw) -> subprocess.Popen:
    """`python -m engine.train *argv` as a subprocess, its output in log_dir/<name>.out and .err."""
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "engine.train", *argv], cwd=REPO, env=env,
                            stdout=open(log_dir / f"{name}.out", "w"), stderr=open(log_dir / f"{name}.err", "w"), **kw)


def holder_pid(lock) -> int | None:
    """The pid engine.outputs wrote into a lock file (`pid N: command`), once it is there."""
    try:
        text = open(lock).read()
    except OSError:
        return None
    return int(text.split(":")[0].split()[1]) if text.startswith("pid ") else None


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie that nobody reaped yet counts as gone: it runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ------------------------------------------------------------------ class 1: only the engine's own files

RUN_NAMES = [f for f in RUN_FILES if os.sep not in f]
ADAPTER_NAMES = [os.path.basename(f) for f in RUN_FILES if f.startswith("adapter" + os.sep)]
SUFFIXES = [".tmp-{pid}", ".{pid}.tmp", ".tmp", ".tmp.png"]  # engine.safeio's, and older versions'
PID, STEP = st.integers(1, 4_194_304), st.integers(0, 999_999)

OWN = st.one_of(  # (folder, name, kind): what a killed write of the engine leaves
    st.builds(lambda f, s, p: ("", f + s.format(pid=p), "file"), st.sampled_from(RUN_NAMES),
              st.sampled_from(SUFFIXES), PID),
    st.builds(lambda f, s, p: ("adapter", f + s.format(pid=p), "file"), st.sampled_from(ADAPTER_NAMES),
              st.sampled_from(SUFFIXES), PID),
    st.builds(lambda s, p: ("checkpoints", f".tmp-step-{s:06d}-{p}", "dir"), STEP, PID),
    st.builds(lambda s, p: ("checkpoints", f"step-{s:06d}.old-{p}", "dir"), STEP, PID),
)
MOVED = {"": "adapter", "adapter": "", "checkpoints": ""}


def near_miss(entry, how: str):
    """An entry that looks like the engine's own but is not: the user's, which must stay."""
    folder, name, kind = entry
    return {"suffix": (folder, name + "x", kind), "prefix": (folder, "my" + name, kind),
            "kind": (folder, name, "dir" if kind == "file" else "file"), "folder": (MOVED[folder], name, kind),
            "letters": (folder, name.replace("1", "l").replace("2", "z") + "a", kind),
            "link": (folder, name, "link")}[how]


USERS = [("", "work.tmp-2024", "dir"), ("", "notes.tmp", "file"), ("", "draft.tmp-3", "file"),
         ("checkpoints", "mine.tmp-1", "dir"), ("checkpoints", ".tmp-foo", "dir"), ("adapter", "x.tmp", "file"),
         ("", ".tmp-step-000003-77", "dir"), ("checkpoints", "step-000001.damaged", "dir")]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(OWN, min_size=1, max_size=6),
       st.lists(st.tuples(OWN, st.sampled_from(["suffix", "prefix", "kind", "folder", "letters", "link"])), max_size=8),
       st.binary(min_size=1, max_size=64))
def test_only_the_engines_own_temporaries_are_removed(tmp_path_factory, own, misses, content):
    """Property: remove_stale_temporaries removes exactly what a killed write of the engine leaves
    (by exact name and kind), and not one byte of anything else: a user's `work.tmp-2024/`, a
    file named like the engine's folder, a link named like the engine's temporary."""
    root = tmp_path_factory.mktemp("stale")
    run, outside = root / "run", root / "outside"
    os.makedirs(outside / "target")
    (outside / "target" / "thesis.tex").write_bytes(content)
    users = USERS + [near_miss(entry, how) for entry, how in misses]
    users = [u for u in dict.fromkeys(users) if (u[0], u[1]) not in {(o[0], o[1]) for o in own}]
    own = list(dict.fromkeys(own))
    for folder, name, kind in own + users:
        path = run / folder / name
        os.makedirs(path.parent, exist_ok=True)
        if kind == "dir":
            os.makedirs(path / "adapter", exist_ok=True)
            (path / "adapter" / "inside.bin").write_bytes(content)
        elif kind == "link":
            os.symlink(outside / "target", path)
        else:
            path.write_bytes(content)
    before = hashes([run / f / n for f, n, _ in users] + [outside])
    removed = remove_stale_temporaries(str(run))
    assert sorted(removed) == sorted(str(run / f / n) for f, n, _ in own)
    assert hashes([run / f / n for f, n, _ in users] + [outside]) == before
    for folder, name, kind in users:
        assert os.path.lexists(run / folder / name), (folder, name, kind)


def test_a_resumed_run_keeps_every_file_it_did_not_write(two_steps, capsys):
    """The run of issue 24: a user's `work.tmp-2024/thesis.tex` in output_dir was deleted at the start."""
    mine = {"work.tmp-2024/thesis.tex": b"chapter 1", "notes.tmp": b"todo", "metrics.jsonl.tmp-old/x": b"mine",
            "checkpoints/.tmp-mine/a": b"a", "adapter.tmp-1/adapter_model.safetensors": b"not a tensor"}
    for rel, data in mine.items():
        os.makedirs((two_steps / rel).parent, exist_ok=True)
        (two_steps / rel).write_bytes(data)
    beside = two_steps.parent / "beside.txt"
    beside.write_text("next to output_dir")
    own = [two_steps / "recipe.yaml.tmp-4242", two_steps / "metrics.jsonl.tmp",
           two_steps / "checkpoints" / ".tmp-step-000003-4242"]
    for p in own[:2]:
        p.write_text("half")
    os.makedirs(own[2])
    before = hashes([two_steps / rel for rel in mine] + [beside])
    assert train_cli(two_steps, "train.resume=auto") == 0
    assert hashes([two_steps / rel for rel in mine] + [beside]) == before
    assert not any(p.exists() for p in own)
    assert sorted(os.listdir(two_steps.parent)) == ["beside.txt", "run"]  # the lock is gone with the run


def test_a_pipeline_removes_only_its_own_files_temporaries(tmp_path, capsys):
    from engine.pipeline.run import remove_stale_temporaries as remove_pipeline_temporaries
    out = tmp_path / "paft"
    cfg = load_pipeline(pipeline_yaml(tmp_path, out, {"sft": FAST}))
    own = ["sft.spec.json.tmp-12", "results.json.tmp-3", "FINDINGS.md.tmp-4", "evals/base.json.tmp-5",
           "evals/sft.json.spec.json.tmp-6", "sft/merged.spec.json.tmp-7"]
    mine = ["notes.tmp", "results.json.tmp-x", "evals/other.json.tmp-5", "sft.spec.json.tmp-12.bak", "sft/x.tmp-1"]
    for rel in own + mine:
        os.makedirs((out / rel).parent, exist_ok=True)
        (out / rel).write_text(rel)
    before = hashes([out / rel for rel in mine])
    remove_pipeline_temporaries(cfg)
    assert not any((out / rel).exists() for rel in own)
    assert hashes([out / rel for rel in mine]) == before


BAD_STAGE_NAMES = ["../../x", "a/b", "..", ".hidden", "/abs", "a\\b", "a\nb", "x" * 201, *RESERVED_NAMES,
                   "Base", "EVALS", "seed-0", "seed-12", "sft.spec.json", "sft.sparsity"]


def test_stage_names_are_plain_file_names_and_not_the_pipelines_own(tmp_path, capsys):
    out = tmp_path / "deep" / "er" / "out"
    for name in BAD_STAGE_NAMES:
        path = pipeline_yaml(tmp_path, out, {name: FAST})
        with pytest.raises(RecipeError) as err:
            load_pipeline(path)
        assert str(err.value).startswith(f"pipeline.stages.{name}:"), (name, str(err.value))
    for name in ["../../x", "base"]:  # the command line: one line, exit 2, nothing written anywhere
        path = pipeline_yaml(tmp_path, out, {name: FAST})
        before = snapshot(tmp_path)
        assert cli(train.main, path) == 2
        assert one_error_line(capsys.readouterr().err).startswith(f"error: pipeline.stages.{name}")
        assert snapshot(tmp_path) == before
    for name in ["sft", "dpo-2", "sft_sparse.v2", "seeds", "base_line", "x" * 200]:
        load_pipeline(pipeline_yaml(tmp_path, out, {name: FAST}))


def test_merge_names_follow_the_same_rule(tmp_path):
    for name in ["../m", ".m", "evals", "seed-1", "m.spec.json"]:
        path = tmp_path / "m.yaml"
        raw = yaml.safe_load(open(pipeline_yaml(tmp_path, tmp_path / "out", {"a": FAST, "b": FAST})))
        raw["pipeline"]["merges"] = [{"name": name, "method": "linear", "models": ["a", "b"]}]
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(RecipeError, match=r"pipeline.merges\[0\].name: "):
            load_pipeline(str(path))


# ------------------------------------------------------------------ class 2: resume under the same settings

def test_every_key_that_may_change_on_resume_is_a_recipe_key():
    keys = set(schema_paths(train.Recipe))
    for k in MAY_CHANGE_ON_RESUME:
        assert k in keys or any(p.startswith(k + ".") for p in keys), k


# (override, key, the checkpoint's value, the new one) as the refusal prints them
REFUSED = [("train.weight_decay=0.1", "train.weight_decay", "0.0", "0.1"),
           ("train.betas=[0.8, 0.99]", "train.betas", "[0.9, 0.999]", "[0.8, 0.99]"),
           ("train.eps=1.0e-6", "train.eps", "1e-08", "1e-06"),
           ("train.method=orpo", "train.method", "'sft'", "'orpo'"),
           ("l1.lambda=0.001", "l1.lambda", "0.0", "0.001"),
           ("l1.on=factors", "l1.on", "'product'", "'factors'"),
           ("dpo.beta=0.5", "dpo.beta", "0.1", "0.5"),
           ("dpo.loss_type=ipo", "dpo.loss_type", "'sigmoid'", "'ipo'"),
           ("orpo.lam=0.5", "orpo.lam", "0.1", "0.5"),
           ("train.max_grad_norm=0.5", "train.max_grad_norm", "1.0", "0.5"),
           ("train.seed=1", "train.seed", "0", "1"),
           ("train.batch_size=4", "train.batch_size", "2", "4"),
           ("train.grad_accum=2", "train.grad_accum", "1", "2"),
           ("lora.dropout=0.1", "lora.dropout", "0.0", "0.1"),
           ("data.max_length=80", "data.max_length", "64", "80"),
           ("eval.exact_match=true", "eval.exact_match", "False", "True"),
           ("model.dtype=float32", "model.dtype", "'auto'", "'float32'")]


@pytest.mark.parametrize("override,key,old,new", REFUSED, ids=[r[1] for r in REFUSED])
def test_resume_refuses_a_key_that_may_not_change(two_steps, capsys, override, key, old, new):
    before = snapshot(two_steps)
    rc = train_cli(two_steps, "train.resume=auto", override)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("error: train.resume: ") and f"{key}={old}, this recipe has {new}" in line, line
    assert snapshot(two_steps) == before


def test_several_changes_are_named_in_one_line(two_steps, capsys):
    assert train_cli(two_steps, "train.resume=auto", "train.weight_decay=0.1", "train.eps=1.0e-6", "dpo.beta=0.5") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "train.weight_decay=0.0" in line and "and 2 more: train.eps, dpo.beta" in line, line


ALLOWED = ["train.lr=1.0e-3", "train.scheduler=linear", "train.warmup_steps=1", "train.max_steps=5",
           "train.log_every=2", "logging.progress_bar=true", "train.eval_every=2", "train.eval_batches=1",
           "train.save_every=2", "train.keep_checkpoints=1", "train.threads=1", "train.early_stopping_patience=3",
           "train.kernels=torch", "train.device=cpu"]


@pytest.mark.parametrize("override", ALLOWED)
def test_resume_accepts_a_key_that_may_change(two_steps, override):
    rc = train_cli(two_steps, "train.resume=auto", override)
    assert rc == 0
    summary = json.loads((two_steps / "summary.json").read_text())
    assert summary["steps"] == load_recipe(TINY, [f"output_dir={two_steps}", *FAST, override]).train.max_steps


def test_a_changed_learning_rate_is_the_one_that_runs(two_steps):
    """recipe.yaml, the metrics and the optimizer agree: the resumed steps use the new train.lr."""
    assert train_cli(two_steps, "train.resume=auto", "train.lr=1.0e-3") == 0
    recipe = load_recipe(str(two_steps / "recipe.yaml"))
    assert recipe.train.lr == 1.0e-3
    rows = {r["step"]: r for r in read_metrics(str(two_steps / "metrics.jsonl")) if "lr" in r}
    for step in (3, 4):
        assert rows[step]["lr"] == lr_at(step - 1, recipe.train)
    state = json.loads((two_steps / "checkpoints" / "step-000004" / STATE_FILE).read_text())
    assert state["optimizer_param_groups"][0]["lr"] == lr_at(3, recipe.train)
    assert state["recipe"]["train"]["lr"] == 1.0e-3  # the next resume compares against what ran


def _make_old_style(ckpt) -> None:
    """Rewrite a checkpoint as one written before the whole recipe was saved: only `run_fingerprint`."""
    path = ckpt / STATE_FILE
    state = json.loads(path.read_text())
    d = state.pop("recipe")
    state["run_fingerprint"] = {"model.name": d["model"]["name"], "train.batch_size": d["train"]["batch_size"],
                                "train.grad_accum": d["train"]["grad_accum"], "train.seed": d["train"]["seed"],
                                "train.optimizer": d["train"]["optimizer"],
                                **{f"lora.{k}": v for k, v in d["lora"].items()},
                                **{f"data.{k}": v for k, v in d["data"].items()}}
    state["checksum"] = json_checksum(state)
    path.write_text(json.dumps(state, indent=1))


def test_an_older_checkpoint_is_compared_on_what_it_recorded(two_steps, capsys):
    for ckpt in list_checkpoints(str(two_steps)):
        _make_old_style(two_steps / "checkpoints" / os.path.basename(ckpt))
    before = snapshot(two_steps)
    assert train_cli(two_steps, "train.resume=auto", "lora.dropout=0.1") == 2
    assert "lora.dropout=0.0, this recipe has 0.1" in one_error_line(capsys.readouterr().err)
    assert snapshot(two_steps) == before
    # weight decay was not recorded, so it cannot be checked: the recipe's value is the one that runs
    # (the optimizer's saved hyper-parameters never win over recipe.yaml), and the next checkpoint records it
    assert train_cli(two_steps, "train.resume=auto", "train.weight_decay=0.1", "train.eps=1.0e-6",
                     "train.betas=[0.8, 0.99]") == 0
    state = json.loads((two_steps / "checkpoints" / "step-000004" / STATE_FILE).read_text())
    group = state["optimizer_param_groups"][0]
    assert (group["weight_decay"], group["eps"], group["betas"]) == (0.1, 1.0e-6, [0.8, 0.99])
    assert state["recipe"]["train"]["weight_decay"] == 0.1


@pytest.mark.parametrize("max_steps", [1])
def test_a_checkpoint_past_max_steps_is_refused(two_steps, reference, capsys, max_steps):
    before = snapshot(two_steps)
    assert train_cli(two_steps, "train.resume=auto", f"train.max_steps={max_steps}") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"train.max_steps: {max_steps} " in line and "step 2" in line and "step-000002" in line, line
    assert snapshot(two_steps) == before
    assert train_cli(two_steps, "train.resume=auto", "train.max_steps=2") == 0  # at max_steps: finishes


def _stopped_stage(tmp_path, two_steps, name="sft"):
    """A pipeline output whose stage `name` was stopped after step 2 (two_steps' run, as its folder)."""
    out = tmp_path / "paft"
    os.makedirs(out)
    shutil.copytree(two_steps, out / name)
    return out


@pytest.mark.parametrize("extra,key", [(["train.weight_decay=0.1"], "train.weight_decay"),
                                       (["l1.lambda=0.001"], "l1.lambda"), (["train.max_steps=1"], "train.max_steps")])
def test_a_stopped_stage_rerun_with_other_overrides_is_refused_before_any_work(tmp_path, two_steps, capsys,
                                                                                extra, key):
    out = _stopped_stage(tmp_path, two_steps)
    check_finished_stages(load_pipeline(pipeline_yaml(tmp_path, out, {"sft": FAST})))  # its own overrides: fine
    path = pipeline_yaml(tmp_path, out, {"sft": FAST + extra})
    with pytest.raises(RecipeError, match=f"pipeline.stages.sft: .*stopped run.*{key}"):
        check_finished_stages(load_pipeline(path))
    before = snapshot(tmp_path)
    assert cli(train.main, path) == 2
    assert one_error_line(capsys.readouterr().err).startswith("error: pipeline.stages.sft:")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ class 3: one command per output

@pytest.mark.slow
def test_a_second_train_on_a_busy_output_dir_exits_2_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    first = start([TINY, f"output_dir={out}", *FAST, "train.max_steps=12"], tmp_path, "first")
    pid = wait_for(lambda: holder_pid(tmp_path / ".run.lock"), "the first run's lock", proc=first)
    assert pid == first.pid
    assert train_cli(out, "train.lr=1.0e-3") == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: output_dir: ") and f"pid {first.pid}" in line, line
    assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
    assert load_recipe(str(out / "recipe.yaml")).train.lr == 3.0e-3  # everything is the first run's
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl")) if "loss" in r] == list(range(1, 13))


@pytest.mark.slow
def test_two_trains_started_together_one_runs_the_other_exits_2(tmp_path):
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        procs = [start([TINY, f"output_dir={out}", *FAST, f"train.lr={lr}"], tmp_path, f"{attempt}-{i}")
                 for i, lr in enumerate(["3.0e-3", "1.0e-3"])]
        codes = [p.wait(timeout=300) for p in procs]
        assert sorted(codes) == [0, 2], codes
        winner = codes.index(0)
        loser_err = (tmp_path / f"{attempt}-{1 - winner}.err").read_text()
        one_error_line(loser_err)
        assert load_recipe(str(out / "recipe.yaml")).train.lr == [3.0e-3, 1.0e-3][winner]
        for ckpt in list_checkpoints(str(out)):
            assert json.loads(open(os.path.join(ckpt, STATE_FILE)).read())["recipe"]["train"]["lr"] == \
                [3.0e-3, 1.0e-3][winner]


# ------------------------------------------------------------------ class 4: interrupts

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["before_a_checkpoint", "after_checkpoints"])
def test_an_interrupted_run_says_where_it_stopped_in_one_line(tmp_path, sig, when):
    out = tmp_path / "run"
    save = "train.save_every=0" if when == "before_a_checkpoint" else "train.save_every=1"
    proc = start([TINY, f"output_dir={out}", *FAST, "train.max_steps=500", save], tmp_path, "run")
    if when == "before_a_checkpoint":
        wait_for(lambda: "model:" in (tmp_path / "run.out").read_text(), "the model to load", proc=proc)
    else:
        wait_for(lambda: len(list_checkpoints(str(out))) >= 2, "two checkpoints", proc=proc)
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = (tmp_path / "run.err").read_text()
    assert rc == 128 + sig and "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    ckpts = list_checkpoints(str(out))
    where = (f"the last checkpoint is {ckpts[-1]} (train.resume=auto continues from it)" if ckpts
             else "no checkpoint was saved yet")
    assert err.strip().splitlines()[-1] == f"interrupted ({signal.Signals(sig).name}): {where}", err[-3000:]
    assert (when == "after_checkpoints") == bool(ckpts)
    for ckpt in ckpts:
        verify_checkpoint(ckpt)
    if (out / "checkpoints").exists():  # an interrupted save removes its temporary
        assert not [p for p in os.listdir(out / "checkpoints") if ".tmp-" in p or ".old-" in p]
    assert not (tmp_path / ".run.lock").exists()
    if ckpts:  # and it continues from there
        step = int(os.path.basename(ckpts[-1])[5:])
        assert train_cli(out, "train.resume=auto", f"train.max_steps={step + 1}") == 0


class _DropsASignal:
    """Sends this process a signal from its __del__, where Python drops the handler's exception
    ("Exception ignored in ...") and carries on: what a Ctrl-C during garbage collection does."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        for _ in range(10_000):  # the handler runs here, inside __del__
            pass


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_python_drops_still_stops_the_run_at_the_next_step(tmp_path, capsys, monkeypatch, sig):
    real = train.train_step
    calls = {"n": 0}

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            _DropsASignal(sig)  # deleted at once: the signal arrives inside its __del__
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step)
    assert train_cli(tmp_path / "run", "train.max_steps=50") == 128 + sig
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and calls["n"] == 2, err
    assert err.strip().splitlines()[-1] == (f"interrupted ({signal.Signals(sig).name}): the last checkpoint is "
                                            f"{tmp_path / 'run' / 'checkpoints' / 'step-000002'} "
                                            f"(train.resume=auto continues from it)")


@pytest.mark.slow
@pytest.mark.parametrize("sig,to", [(signal.SIGTERM, "pid"), (signal.SIGINT, "group"), (signal.SIGKILL, "pid")],
                         ids=["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_a_stopped_pipeline_leaves_no_stage_running(tmp_path, capsys, sig, to):
    out = tmp_path / "paft"
    path = pipeline_yaml(tmp_path, out, {"sft": [*FAST, "train.max_steps=500"]})
    proc = start([path], tmp_path, "pipeline", start_new_session=True)
    stage = wait_for(lambda: holder_pid(out / ".sft.lock"), "the stage to start", proc=proc)
    wait_for(lambda: list_checkpoints(str(out / "sft")), "the stage's first checkpoint", proc=proc)
    # one pipeline per output_dir: a second one is refused while this one runs
    assert cli(train.main, path) == 2
    assert "is in use by another command" in one_error_line(capsys.readouterr().err)
    os.killpg(proc.pid, sig) if to == "group" else proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    wait_for(lambda: gone(stage), f"the stage (pid {stage}) to exit", timeout=60)
    err = (tmp_path / "pipeline.err").read_text()
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 128 + sig and "Traceback" not in err, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"interrupted ({signal.Signals(sig).name}): stage sft stopped at its last checkpoint "
                               f"{out / 'sft' / 'checkpoints'}"), last
        assert "rerun the same command to continue" in last
    for ckpt in list_checkpoints(str(out / "sft")):
        verify_checkpoint(ckpt)


# ------------------------------------------------------------------ class 5: OS errors

@pytest.fixture
def small_disk(tmp_path):
    """A 512 KB tmpfs at tmp_path/small: room for one FAST run with two checkpoints kept (skipped, with
    the reason, where it cannot be mounted)."""
    with tmpfs(tmp_path / "small", size="512k") as mnt:
        yield mnt


def _fill(mnt, leave: int):
    """A filler file that leaves about `leave` bytes free on the filesystem of `mnt`."""
    st_ = os.statvfs(mnt)
    free = st_.f_bavail * st_.f_frsize
    with open(mnt / "filler.bin", "wb") as f:
        f.write(b"\1" * max(0, free - leave))


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_no_checkpoint_is_harmed(small_disk, reference, capsys):
    failed = []
    for leave in (8_192, 49_152, 98_304, 147_456, 196_608, 245_760):  # runs out at a different write each time
        run = small_disk / "run"
        _fill(small_disk, leave)
        filler = sha(small_disk / "filler.bin")
        rc = train_cli(run, "train.keep_checkpoints=2")
        err = capsys.readouterr().err
        assert rc in (0, 2), err[-3000:]
        if rc == 2:
            line = one_error_line(err)
            assert line.startswith(f"error: {run}") and "No space left on device" in line, line
            failed.append(leave)
        assert sha(small_disk / "filler.bin") == filler  # not the engine's: untouched
        for ckpt in list_checkpoints(str(run)):
            verify_checkpoint(ckpt)  # everything that looks complete is complete
        if (run / "checkpoints").exists():
            assert not [p for p in os.listdir(run / "checkpoints") if ".tmp-" in p or ".old-" in p]
        os.remove(small_disk / "filler.bin")  # room again: the run continues to the same result
        assert train_cli(run, "train.resume=auto", "train.keep_checkpoints=2") == 0, capsys.readouterr().err[-3000:]
        assert_same_adapter(adapter_of(run / "adapter"), adapter_of(reference / "adapter"))
        shutil.rmtree(run)
    assert failed, "no case ran out of space: make the disk smaller"


@pytest.mark.slow
def test_a_read_only_output_is_refused_before_any_work(small_disk, reference, tmp_path, capsys):
    shutil.copytree(reference, small_disk / "done")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    before = snapshot(small_disk)
    for argv in ([TINY, f"output_dir={small_disk / 'new'}", *FAST],
                 [TINY, f"output_dir={small_disk / 'done'}", *FAST, "train.resume=auto", "train.max_steps=6"],
                 [pipeline_yaml(tmp_path, small_disk / "paft", {"sft": FAST})]):
        assert cli(train.main, *argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert ("read-only" in line or "not writable" in line) and str(small_disk) in line, line
    assert snapshot(small_disk) == before


def test_a_dangling_symlink_or_an_overlong_name_is_refused_in_one_line(tmp_path, capsys):
    link = tmp_path / "link"
    os.symlink(tmp_path / "nowhere", link)
    for out in (link, tmp_path / ("a" * 256), tmp_path / ("b" * 255)):
        assert train_cli(out) == 2
        line = one_error_line(capsys.readouterr().err)
        assert os.path.basename(out)[:50] in line, line
        assert cli(train.main, pipeline_yaml(tmp_path, out, {"sft": FAST})) == 2
        one_error_line(capsys.readouterr().err)
    assert os.readlink(link) == str(tmp_path / "nowhere") and not (tmp_path / "nowhere").exists()
    assert sorted(os.listdir(tmp_path)) == ["link", "p.yaml"]
