"""The outputs of merge, export and evals, tried as a careless or hostile user would (issue 24,
classes 1, 3, 4, 5, 6 and 10): nothing a user owns is deleted or changed, one command per output,
clean interrupts, OS errors as one line, no non-finite or untyped number, outputs that follow the
umask.

Every command answers 0, 2, 3, 130 or 143 (never 1, a traceback), and a file the command did not
write is never changed: `hashes` of everything around the output are compared before and after.
Most cases run the command lines in-process on builtin:tiny-llama (a second or less each); the
lock, signal and SIGKILL cases run real subprocesses; the disk-full and read-only cases mount a
small tmpfs, and skip with the reason where the test may not mount one.
"""
import contextlib
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from engine import export as export_mod
from engine.interrupts import Interrupted
from engine.lora import apply_lora, save_adapter
from engine.models import load_model_and_tokenizer
from engine.outputs import claim_output
from engine.recipe import LoRAConfig, ModelConfig
from engine.writes import atomic_dir, remove_own_temporaries, rename_noreplace
from merge import __main__ as merge_cli
from merge import write as merge_write
from merge.config import MergeError, parse_config, resolve
from paft_evals import __main__ as evals_cli
from paft_evals import report as evals_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_CODES = {0, 2, 3, 130, 143}


# ---------------------------------------------------------------------------- helpers

def cli(main, *argv) -> int:
    """Exit status of a command line run in-process (argparse's SystemExit included)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    assert rc in EXIT_CODES, rc
    return rc


def our_lines(err: str) -> list[str]:
    """stderr without warnings and transformers' progress bars ("Loading weights: 100%|...")."""
    return [line for line in err.strip().splitlines()
            if line.strip() and not line.startswith("warning: ") and "it/s]" not in line]


def one_error(capsys, *words) -> str:
    """stderr is exactly one `error: ...` line holding every word; returns it."""
    err = capsys.readouterr().err
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def hashes(root, skip=()) -> dict:
    """Every entry under root (files by sha256, links by target, folders by name), links not followed."""
    out = {}
    for here, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(here, d), root) not in skip]
        for name in dirs + files:
            path = os.path.join(here, name)
            rel = os.path.relpath(path, root)
            if rel in skip:
                continue
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                out[rel] = hashlib.sha256(open(path, "rb").read()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def write_yaml(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def merge_cfg(world, weight=1.0, **extra) -> dict:
    """A linear merge of the base and one adapter on it (one adapter: the quickest real merge)."""
    cfg = {"merge_method": "task_arithmetic", "base_model": world["base"],
           "models": [{"model": world["adapter"], "parameters": {"weight": weight}}]}
    cfg.update(extra)
    return cfg


def run_merge(tmp_path, world, out, *extra, cfg=None) -> int:
    path = write_yaml(tmp_path / f"c{len(os.listdir(tmp_path))}.yaml", cfg or merge_cfg(world))
    return cli(merge_cli.main, path, "--out", out, *extra)


def run_export(world, out, *extra) -> int:
    return cli(export_mod.main, world["adapter"], "--out", out, "--base", "original", *extra)


FAKE_RESULTS = {"model": "m", "name": "m", "kind": "name", "base": None, "settings": {}, "tasks": {"t": {"n": 1}}}


def run_evals(monkeypatch, target, out, *extra, results=FAKE_RESULTS) -> int:
    """python -m paft_evals with the evaluation itself replaced (what is tested is --out)."""
    monkeypatch.setattr(evals_cli, "run_evaluation", lambda *a, **k: results)
    return cli(evals_cli.main, target, "--tasks", "arithmetic", "--out", out, *extra)


MAIN = {"merge": merge_cli, "export": export_mod, "evals": evals_cli, "report": evals_report}


def tool_argv(tool, world, tmp_path, out) -> list:
    """The command line of `tool` writing `out`: merge_cfg's merge, an export of the adapter, an
    evaluation of builtin:tiny-llama, or the report of one results file."""
    if tool == "merge":
        return [write_yaml(tmp_path / "c.yaml", merge_cfg(world)), "--out", out]
    if tool == "export":
        return [world["adapter"], "--out", out, "--base", "original"]
    if tool == "report":
        (tmp_path / "results.json").write_text(json.dumps(FAKE_RESULTS))
        return [tmp_path / "results.json", "--out", out]
    return ["builtin:tiny-llama", "--tasks", "arithmetic", "--out", out]


def run_tool(tool, world, tmp_path, out) -> int:
    return cli(MAIN[tool].main, *tool_argv(tool, world, tmp_path, out))


def no_work(monkeypatch):
    """Fail the test if a command gets as far as loading a model: a refusal comes first."""
    fail = lambda *a, **k: pytest.fail("the command did its work before refusing")  # noqa: E731
    monkeypatch.setattr(evals_cli, "load_target", fail)
    monkeypatch.setattr(export_mod, "merged_model", fail)
    monkeypatch.setattr(merge_write, "prepare", fail)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny-llama base folder (with its tokenizer), one adapter on it, and its base without a tokenizer."""
    root = tmp_path_factory.mktemp("outputs")
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama", dtype="float32"), torch.device("cpu"))
    base = str(root / "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    adapter = str(root / "adapter")
    save_adapter(model, adapter, cfg, base)
    bare = root / "bare_base"
    bare.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        (bare / f).write_bytes((root / "base" / f).read_bytes())
    return {"root": root, "base": base, "adapter": adapter, "bare": str(bare)}


@contextlib.contextmanager
def tmpfs(path, size="300k", readonly=False):
    """A small tmpfs at `path` (needs root: skipped, with the reason, where mount is refused)."""
    path.mkdir(exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (mount -t tmpfs needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder) -> None:
    """Write into `folder` until its filesystem is full."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)


# ---------------------------------------------------------------------------- class 1: never delete what it did not write

FOREIGN = ["src/main.py", ".git/HEAD", "notes.txt", "model.safetensors.bak", "config.json/inside.txt",
           "results.json", ".hidden"]


@pytest.mark.parametrize("tool", ["merge", "export"])
@pytest.mark.parametrize("foreign", FOREIGN)
def test_overwrite_refuses_a_folder_holding_anything_else(world, tmp_path, capsys, monkeypatch, tool, foreign):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    p = out / foreign
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("the user's")
    before = hashes(tmp_path)
    no_work(monkeypatch)
    rc = run_merge(tmp_path, world, out, "--overwrite") if tool == "merge" else run_export(world, out, "--overwrite")
    assert rc == 2
    one_error(capsys, "--out", foreign.split("/")[0])
    after = hashes(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith(".yaml")} == \
           {k: v for k, v in before.items() if not k.endswith(".yaml")}


def test_out_dot_overwrite_in_a_project_keeps_the_project(world, tmp_path, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "a.py").write_text("print(1)")
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (project / "config.json").write_text("{}")  # a model file name alone does not make it a model folder
    cfg = write_yaml(tmp_path / "c.yaml", merge_cfg(world))
    before = hashes(tmp_path)
    monkeypatch.chdir(project)
    for argv in ([cfg, "--out", ".", "--overwrite"], [cfg, "--out", "./", "--overwrite"], [cfg, "--out", "."]):
        assert cli(merge_cli.main, *argv) == 2
        one_error(capsys, "--out")
    assert run_export(world, ".", "--overwrite") == 2
    one_error(capsys, "--out")
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("tool", ["merge", "export"])
def test_overwrite_replaces_a_previous_output_whole(world, tmp_path, capsys, tool):
    out = tmp_path / "out"
    run = (lambda *x: run_merge(tmp_path, world, out, *x)) if tool == "merge" else (lambda *x: run_export(world, out, *x))
    assert run() == 0
    capsys.readouterr()
    first = hashes(out)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a stale shard of an older output")
    assert run() == 2  # without --overwrite
    one_error(capsys, "already exists")
    assert run("--overwrite") == 0
    assert hashes(out) == first  # the stale shard went with the old folder; the same merge again


@pytest.mark.parametrize("tool", ["merge", "export"])
def test_symlinked_out_stays_a_link_and_its_target_is_written(world, tmp_path, tool):
    target = tmp_path / "disk" / "merged"
    target.mkdir(parents=True)  # a link to nothing is a dangling link: refused (test_unwritable_out_is_one_line)
    link = tmp_path / "out"
    link.symlink_to(target, target_is_directory=True)
    run = (lambda *x: run_merge(tmp_path, world, link, *x)) if tool == "merge" else (lambda *x: run_export(world, link, *x))
    for extra in ([], ["--overwrite"]):
        assert run(*extra) == 0
        assert os.path.islink(link) and os.readlink(link) == str(target)
        assert os.path.isfile(target / "config.json") and load_file(str(target / "model.safetensors"))
        assert sorted(os.listdir(target.parent)) == ["merged"]  # no temporaries, no lock left


@pytest.mark.parametrize("where", ["base", "base/sub", "adapter", "adapter/merged"])
@pytest.mark.parametrize("tool", ["merge", "export"])
def test_out_inside_an_input_is_refused(world, tmp_path, capsys, monkeypatch, tool, where):
    root = world["root"]
    out = root / where
    if tool == "export" and where.startswith("base"):
        extra = ["--model", world["base"]]
    else:
        extra = []
    before = hashes(root)
    no_work(monkeypatch)
    rc = run_merge(tmp_path, world, out, "--overwrite") if tool == "merge" else run_export(world, out, "--overwrite", *extra)
    assert rc == 2
    one_error(capsys, "--out", "inside")
    assert hashes(root) == before


@pytest.mark.parametrize("name", ["adapter_config.json", "adapter_model.safetensors", "results.json", "sub/r.json"])
def test_evals_out_inside_the_target_is_refused(world, capsys, monkeypatch, name):
    before = hashes(world["root"])
    no_work(monkeypatch)
    assert run_evals(monkeypatch, world["adapter"], os.path.join(world["adapter"], name)) == 2
    one_error(capsys, "--out", "inside")
    assert hashes(world["root"]) == before


@pytest.mark.parametrize("content", [b"", b"{}", b'{"model": "m"}', b"not json", b'{"peft_type": "LORA", "r": 8}',
                                     b'[{"model": "m", "settings": {}, "tasks": {}}]', b"\xff\xfe"])
def test_evals_replaces_only_a_previous_results_file(world, tmp_path, capsys, monkeypatch, content):
    f = tmp_path / "data.json"
    f.write_bytes(content)
    no_work(monkeypatch)
    assert run_evals(monkeypatch, "builtin:tiny-llama", f) == 2
    one_error(capsys, "--out", "not a results file")
    assert f.read_bytes() == content
    monkeypatch.undo()
    ok = tmp_path / "r.json"
    for _ in range(2):  # a new file, then the previous results replaced
        assert run_evals(monkeypatch, "builtin:tiny-llama", ok) == 0
        assert json.loads(ok.read_text())["tasks"] == FAKE_RESULTS["tasks"]


def test_evals_out_that_is_a_data_file_or_fifo_is_refused(world, tmp_path, capsys, monkeypatch):
    data = tmp_path / "mc.jsonl"
    data.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    no_work(monkeypatch)
    assert cli(evals_cli.main, "builtin:tiny-llama", "--tasks", "mc", "--data", f"mc={data}", "--out", data) == 2
    one_error(capsys, "--out")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert run_evals(monkeypatch, "builtin:tiny-llama", fifo) == 2  # refused, never opened (it would block)
    one_error(capsys, "--out")


def test_evals_through_a_symlink_writes_the_target(tmp_path, monkeypatch):
    real = tmp_path / "real.json"
    real.write_text(json.dumps(FAKE_RESULTS))
    link = tmp_path / "r.json"
    link.symlink_to(real)
    assert run_evals(monkeypatch, "builtin:tiny-llama", link, results={**FAKE_RESULTS, "name": "new"}) == 0
    assert os.path.islink(link) and json.loads(real.read_text())["name"] == "new"


# ---------------------------------------------------------------------------- class 3: one command per output

@pytest.mark.parametrize("tool", ["merge", "export", "evals", "report"])
def test_an_output_in_use_is_refused_naming_the_holder(world, tmp_path, capsys, monkeypatch, tool):
    out = tmp_path / ("r.json" if tool == "evals" else "out")
    no_work(monkeypatch)
    with claim_output(os.path.realpath(out), "python -m merge (the first)", kind="file" if tool == "evals" else "dir"):
        assert run_tool(tool, world, tmp_path, out) == 2
        one_error(capsys, "in use", "the first", f"pid {os.getpid()}")
    assert not out.exists()


def test_two_merges_on_one_out_one_wins(world, tmp_path):
    """Two real processes on one new --out, no --overwrite: exactly one exits 0, the other 2."""
    cfg = write_yaml(tmp_path / "c.yaml", merge_cfg(world))
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "merge", cfg, "--out", str(out)], cwd=REPO,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "Traceback" not in loser and ("in use" in loser or "already exists" in loser), loser
    assert load_file(str(out / "model.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["c.yaml", "out"]


def test_final_rename_never_replaces_what_appeared_meanwhile(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("new")
    b.write_text("someone else's")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(a), str(b))
    assert a.read_text() == "new" and b.read_text() == "someone else's"
    dest = tmp_path / "dest"
    with pytest.raises(FileExistsError):
        with atomic_dir(str(dest)) as tmp:
            open(os.path.join(tmp, "model.safetensors"), "w").close()
            dest.mkdir()
            (dest / "theirs").write_text("x")  # another process's folder, made during the work
    assert os.listdir(dest) == ["theirs"] and sorted(os.listdir(tmp_path)) == ["a", "b", "dest"]


# ---------------------------------------------------------------------------- class 4: interrupts and leftovers

SLOW = """
import importlib, os, sys, time
module, attr = sys.argv[1].rsplit(".", 1)
def slow(*a, **k):
    open(os.environ["PAFT_TEST_READY"], "w").close()
    time.sleep(120)
setattr(importlib.import_module(module), attr, slow)
sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))
"""

SLOW_POINT = {"merge": "merge.write.merge_tensor", "export": "engine.export.save_model",
              "evals": "paft_evals.__main__.run_evaluation"}


def start_slow(tool, world, tmp_path, out):
    """The command in a subprocess, stopped inside its work (in the folder it builds, holding the
    lock) until killed; returns the process once it is there."""
    ready = tmp_path / "ready"
    argv = tool_argv(tool, world, tmp_path, out)
    p = subprocess.Popen([sys.executable, "-c", SLOW, SLOW_POINT[tool], MAIN[tool].__name__, *map(str, argv)],
                         cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PAFT_TEST_READY": str(ready)})
    deadline = time.time() + 300
    while not ready.exists():
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("tool,sig", [("merge", signal.SIGINT), ("merge", signal.SIGTERM),
                                      ("export", signal.SIGTERM), ("evals", signal.SIGINT)])
def test_interrupt_is_one_line_and_leaves_nothing(world, tmp_path, tool, sig):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("the user's")
    out = work / ("r.json" if tool == "evals" else "out")
    p = start_slow(tool, world, tmp_path, out)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({sig.name})"), err
    assert os.listdir(work) == ["keep.txt"]  # no output, no temporary, no lock file


@pytest.mark.parametrize("tool", ["merge", "export"])
def test_a_killed_run_leaves_temporaries_the_next_start_removes(world, tmp_path, capsys, tool):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    p = start_slow(tool, world, tmp_path, out)
    p.kill()
    p.communicate(timeout=60)
    left = sorted(os.listdir(work))
    assert left and all(n.startswith(".out.") for n in left), left
    lookalikes = [".out.tmp-2024", "out.tmp-abcdefgh", ".other.tmp-abcdefgh", ".out.notes-abcdefgh",
                  ".out.tmp-abcdefghi", ".out.tmp-ABCDEFGH"]
    for name in lookalikes:
        (work / name).mkdir()
        (work / name / "thesis.tex").write_text("the user's")
    (work / ".out.tmp-linkedxx").symlink_to(work / ".out.tmp-2024")
    before = hashes(work, skip=set(left))
    assert (run_merge(tmp_path, world, out) if tool == "merge" else run_export(world, out)) == 0
    assert "left by an interrupted run" in capsys.readouterr().err
    assert hashes(work, skip={"out"}) == before  # the look-alikes are the user's
    assert not set(left) & set(os.listdir(work))


def test_an_old_output_moved_aside_before_a_kill_goes_back(tmp_path):
    old = tmp_path / ".out.old-abcd1234"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the previous merge")
    (tmp_path / ".out.tmp-abcd1234").mkdir()
    assert remove_own_temporaries(str(tmp_path / "out")) == [str(tmp_path / ".out.tmp-abcd1234")]
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "model.safetensors").read_bytes() == b"the previous merge"


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (Interrupted(signal.SIGTERM), 143)])
@pytest.mark.parametrize("tool", ["merge", "export", "evals"])
def test_interrupt_in_process_is_one_line(world, tmp_path, capsys, monkeypatch, tool, exc, code):
    def stop(*a, **k):
        raise exc
    monkeypatch.setattr(merge_write, "merge_tensor", stop)
    monkeypatch.setattr(export_mod, "save_model", stop)
    monkeypatch.setattr(evals_cli, "run_evaluation", stop)
    out = tmp_path / ("r.json" if tool == "evals" else "out")
    assert run_tool(tool, world, tmp_path, out) == code
    err = our_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("interrupted ("), err
    assert not [n for n in os.listdir(tmp_path) if not n.endswith(".yaml")]


# ---------------------------------------------------------------------------- class 5: OS errors

def test_disk_full_is_one_line_naming_the_file(world, tmp_path, capsys, monkeypatch):
    with tmpfs(tmp_path / "small", "300k") as small:
        assert run_merge(tmp_path, world, small / "merged") == 2
        one_error(capsys, "merged", "No space left on device")
        assert os.listdir(small) == []  # the partial merge is gone
        assert run_export(world, small / "exported") == 2
        one_error(capsys, "exported", "No space left on device")
        assert os.listdir(small) == []
        results = {**FAKE_RESULTS, "tasks": {"t": {"n": 1, "samples": ["x" * 5000]}}}

        def evaluate_while_the_disk_fills(*a, **k):
            fill(small)
            return results
        monkeypatch.setattr(evals_cli, "run_evaluation", evaluate_while_the_disk_fills)
        assert cli(evals_cli.main, "builtin:tiny-llama", "--tasks", "arithmetic", "--out", small / "r.json") == 2
        captured = capsys.readouterr()
        assert json.loads(captured.out) == results  # the evaluation's work is not lost
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and "r.json" in lines[0] and "No space left" in lines[0], captured.err
        assert os.listdir(small) == ["filler"]


def test_read_only_filesystem_is_refused_before_any_work(world, tmp_path, capsys, monkeypatch):
    no_work(monkeypatch)
    with tmpfs(tmp_path / "ro", "100k", readonly=True) as ro:
        for run in (lambda: run_merge(tmp_path, world, ro / "merged"), lambda: run_export(world, ro / "exported"),
                    lambda: run_evals(monkeypatch, "builtin:tiny-llama", ro / "r.json")):
            assert run() == 2
            line = one_error(capsys, "--out", str(ro))
            assert "read-only" in line or "not writable" in line, line


@pytest.mark.parametrize("kind", ["dangling", "long255", "long256", "long300", "file", "under_file"])
@pytest.mark.parametrize("tool", ["merge", "export", "evals", "report"])
def test_unwritable_out_is_one_line(world, tmp_path, capsys, monkeypatch, tool, kind):
    work = tmp_path / "work"
    work.mkdir()
    (work / "f").write_text("keep")
    if kind == "dangling":
        out = work / "link"
        out.symlink_to(work / "nowhere")
    elif kind.startswith("long"):
        out = work / ("x" * int(kind[4:]))
    elif kind == "file":
        out = work / "f"
    else:
        out = work / "f" / "sub"
    before = hashes(work)
    no_work(monkeypatch)
    assert run_tool(tool, world, tmp_path, out) == 2
    one_error(capsys)
    assert hashes(work) == before


@pytest.mark.parametrize("length", [200, 240, 246, 250])
def test_long_but_legal_names_work_or_are_one_line(world, tmp_path, capsys, length):
    """Names near NAME_MAX: the temporaries and the lock add characters; whatever happens is 0 or one line."""
    rc = run_merge(tmp_path, world, tmp_path / ("m" * length))
    if rc == 2:
        one_error(capsys)
    else:
        assert (tmp_path / ("m" * length) / "model.safetensors").is_file()


# ---------------------------------------------------------------------------- class 6: numbers

BAD_NUMBERS = [".nan", ".inf", "-.inf", "'nan'", "'inf'", "1e39", "'1e39'", "true", "'abc'", "[]", "null",
               "[0.5, {filter: q_proj, value: 1}]", "{filter: q_proj, value: .nan}", "[1, .nan]", "1" + "0" * 400]


@pytest.mark.parametrize("key", ["weight", "lambda", "density", "t"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_non_finite_or_untyped_merge_parameter_is_refused(world, tmp_path, capsys, monkeypatch, key, value):
    method = "slerp" if key == "t" else "dare_linear"
    params = {"t": "0.5"} if key == "t" else {"weight": "1.0", "density": "0.5", "lambda": "1.0"}
    params[key] = value
    text = (f"merge_method: {method}\nbase_model: {world['base']}\nmodels:\n  - model: {world['adapter']}\n"
            f"parameters: {{{', '.join(f'{k}: {v}' for k, v in params.items())}}}\n")
    (tmp_path / "c.yaml").write_text(text)
    no_work(monkeypatch)
    assert cli(merge_cli.main, tmp_path / "c.yaml", "--out", tmp_path / "out") == 2
    one_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("'1e-3'", 1e-3), ("'0.5'", 0.5), ("2", 2), ("-1.5E+2", -150.0)])
def test_numbers_written_as_strings_are_numbers(text, value):
    raw = yaml.safe_load(f"merge_method: task_arithmetic\nbase_model: b\nmodels: [{{model: a, parameters: "
                         f"{{weight: {text}}}}}]\nparameters: {{lambda: [{text}, 1]}}")
    cfg = parse_config(raw)
    assert cfg.models[0].params["weight"] == value and cfg.params["lambda"] == [value, 1]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SCALARS = (st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10 ** 40, 10 ** 40)
           | st.text(max_size=8) | st.sampled_from(["1e-3", "nan", "-inf", "1e39", "0.5", "1_0"]))
SETTINGS = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.fixed_dictionaries(
    {"filter": st.sampled_from(["q_proj", "mlp"]), "value": c}), max_leaves=4)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"]),
       st.sampled_from(["weight", "lambda", "density", "t", "normalize", "rescale"]), SETTINGS)
def test_any_merge_parameter_is_checked_or_refused(method, key, setting):
    """parse_config accepts a value only as finite numbers within float32 (or a bool for a bool
    parameter); everything else is a MergeError, never another exception."""
    raw = {"merge_method": method, "base_model": "b",
           "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "c", "parameters": {"weight": 1.0}}],
           "parameters": {"t": 0.5} if method == "slerp" else {}}
    raw["parameters"][key] = setting
    if method == "slerp":
        raw["models"] = [{"model": "a"}]
    try:
        cfg = parse_config(raw)
    except MergeError:
        return
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"):
        resolve(cfg.params[key], name, 0.5)  # what the merge does with it, tensor by tensor
    stack = [cfg.params[key]]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.append(v["value"])
        else:
            assert isinstance(v, bool) or (isinstance(v, (int, float)) and math.isfinite(v) and abs(v) < 3.5e38), v


def test_a_merged_tensor_that_is_not_finite_is_refused_naming_it(world, tmp_path, capsys):
    bad = tmp_path / "nan_adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(open(os.path.join(world["adapter"], "adapter_config.json")).read())
    tensors = load_file(os.path.join(world["adapter"], "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    cfg = {**merge_cfg(world), "models": [{"model": str(bad), "parameters": {"weight": 1.0}}]}
    assert run_merge(tmp_path, world, tmp_path / "out", cfg=cfg) == 2
    one_error(capsys)  # refused when loaded, or as a merged tensor: never written
    assert not (tmp_path / "out").exists()
    # finite in fp32, past float16's range: refused naming the tensor
    big = tmp_path / "big"
    big.mkdir()
    for f in os.listdir(world["base"]):
        (big / f).write_bytes(open(os.path.join(world["base"], f), "rb").read())
    sd = load_file(str(big / "model.safetensors"))
    name = sorted(n for n in sd if n.endswith("q_proj.weight"))[0]
    sd[name] = sd[name] * 0 + 1e6
    save_file(sd, str(big / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"merge_method": "linear", "dtype": "float16",
           "models": [{"model": str(big), "parameters": {"weight": 1.0}}]}
    assert run_merge(tmp_path, world, tmp_path / "out", "--allow-lossy", cfg=cfg) == 2
    one_error(capsys, name, "float16")
    assert not (tmp_path / "out").exists()


EVALS_BAD = [("--beta", v) for v in ["nan", "inf", "-inf", "0", "-1", "abc", "1e39", ""]] + \
            [("--max-length", v) for v in ["-5", "0", "abc", "1.5", "1e3", str(2 ** 31), ""]] + \
            [("--batch-size", v) for v in ["0", "-1", "x", str(2 ** 40)]] + \
            [("--limit", v) for v in ["0", "-3", "nan", str(2 ** 64)]] + \
            [("--shots", v) for v in ["-1", "two", str(2 ** 31)]] + \
            [("--max-new-tokens", v) for v in ["0", "-2", "x", "arithmetic=0", str(2 ** 31), "nope=3"]]


@pytest.mark.parametrize("option,value", EVALS_BAD)
def test_evals_numbers_are_type_checked_in_one_line(tmp_path, capsys, monkeypatch, option, value):
    no_work(monkeypatch)
    assert run_evals(monkeypatch, "builtin:tiny-llama", tmp_path / "r.json", f"{option}={value}") == 2
    one_error(capsys, option)
    assert os.listdir(tmp_path) == []


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(["--beta", "--max-length", "--batch-size", "--limit", "--shots", "--max-new-tokens"]),
       st.text(max_size=12) | st.integers(-10 ** 30, 10 ** 30).map(str) | st.floats().map(str))
def test_evals_any_number_is_accepted_or_one_line(tmp_path_factory, option, value):
    out = tmp_path_factory.getbasetemp() / "fuzz-evals.json"
    rc = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evals_cli, "run_evaluation", lambda *a, **k: FAKE_RESULTS)
        mp.setattr(evals_cli, "load_target", lambda *a, **k: pytest.fail("load"))
        rc = cli(evals_cli.main, "builtin:tiny-llama", "--tasks", "arithmetic", "--out", out, f"{option}={value}")
    assert rc in (0, 2)


# ---------------------------------------------------------------------------- class 10: modes, tokenizer, Σw = 0

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002, 0o077])
@pytest.mark.parametrize("tool", ["merge", "export"])
def test_outputs_follow_the_umask(world, tmp_path, tool, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        assert (run_merge(tmp_path, world, out) if tool == "merge" else run_export(world, out)) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~umask)
    for f in os.listdir(out):
        assert oct(os.stat(out / f).st_mode & 0o777) == oct(0o666 & ~umask), f


def test_a_base_without_tokenizer_files_is_said(world, tmp_path, capsys):
    cfg = {**merge_cfg(world), "base_model": world["bare"]}
    # the adapter names the full base; merging onto its tokenizer-less copy is what is tried
    assert run_merge(tmp_path, world, tmp_path / "out", cfg=cfg) == 0
    err = capsys.readouterr().err
    assert "has no tokenizer files" in err and "Traceback" not in err
    assert not any(f.startswith("tokenizer") for f in os.listdir(tmp_path / "out"))


@pytest.mark.parametrize("method,normalize,weights", [
    ("linear", True, [1.0, -1.0]), ("linear", False, [1.0, -1.0]), ("linear", True, [0.5, -0.5]),
    ("task_arithmetic", True, [1.0, -1.0]), ("dare_linear", True, [2.0, -2.0]),
    ("linear", True, [[1.0, 0.0], [-1.0, 0.0]]),  # a gradient: Σw = 0 in the last layers only
])
def test_weights_summing_to_zero_are_refused(world, tmp_path, capsys, monkeypatch, method, normalize, weights):
    two = [world["base"], world["bare"]] if method == "linear" else [world["adapter"], world["adapter"]]
    models = [{"model": m, "parameters": {"weight": w}} for m, w in zip(two, weights)]
    params = {"normalize": normalize, **({"density": 0.5} if method == "dare_linear" else {})}
    cfg = {"merge_method": method, "base_model": world["base"], "models": models, "parameters": params}
    assert run_merge(tmp_path, world, tmp_path / "out", cfg=cfg) == 2
    one_error(capsys, "sum to 0")
    assert not (tmp_path / "out").exists()
