"""Faults and bad input, tried as a hostile user would (issue 14): the engine answers 0, 2 or 3,
never a traceback (1); nothing already saved is lost or poisoned; a refused run writes nothing.

Everything runs the command lines in-process (`main(argv)`) on builtin:tiny-llama with a few
two-sample steps, so each case takes about a second. The heavy loops (SIGKILL at random
points, every file of a run damaged three ways, fuzzed training runs) are in
tests/test_fault_loops.py, marked slow.
"""
import dataclasses
import os
import shutil
import typing

import pytest
import torch
from safetensors.torch import load_file

import engine.train as train
import engine.train_setup as train_setup
from engine.checkpoint import verify_checkpoint
from engine.log import read_metrics
from engine.recipe import Recipe, RecipeError, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny_sft.yaml")
# Two-sample steps on one adapted layer kind, a checkpoint after every step: ~0.3 s a step on CPU.
FAST = ["train.max_steps=4", "train.eval_every=0", "train.warmup_steps=0", "train.save_every=1",
        "train.keep_checkpoints=5", "data.num_train=16", "data.num_eval=4", "data.max_length=64",
        "train.batch_size=2", "lora.target_modules=[q_proj]", "logging.progress_bar=false"]


def cli(main, *argv) -> int:
    """Exit status of a command line run in-process (argparse's SystemExit included)."""
    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code


def train_cli(out, *extra) -> int:
    return cli(train.main, TINY, f"output_dir={out}", *FAST, *extra)


def snapshot(root) -> dict:
    """Every file under root with its bytes: 'nothing was written' means this does not change."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(here, name)
            out[os.path.relpath(full, root)] = open(full, "rb").read() if os.path.isfile(full) else None
    return out


def adapter_of(path) -> dict:
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted FAST run: its directory (checkpoints step-1..4, adapter, metrics)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train_cli(out) == 0
    return out


@pytest.fixture
def two_steps(tmp_path, reference):
    """A run stopped after step 2 (its checkpoints 1 and 2 and metrics), as a kill would leave it."""
    out = tmp_path / "run"
    os.makedirs(out / "checkpoints")
    for name in ("step-000001", "step-000002"):
        shutil.copytree(reference / "checkpoints" / name, out / "checkpoints" / name)
    rows = [line for line in (reference / "metrics.jsonl").read_text().splitlines() if '"step": 3' not in line
            and '"step": 4' not in line]
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(reference / "recipe.yaml", out / "recipe.yaml")
    return out


# ------------------------------------------------------------------ class 1: non-finite numbers

def _float_keys(cls=Recipe, prefix=""):
    """Every float-typed key of the recipe schema (float, Optional[float], list[float])."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.metadata.get("key", f.name)
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, key + ".")
        elif tp is float or float in typing.get_args(tp):
            yield key, False
        elif typing.get_origin(tp) is list and typing.get_args(tp) == (float,):
            yield key, True


FLOAT_KEYS = list(_float_keys())


def test_the_schema_has_float_keys():
    assert {"train.lr", "train.betas", "lora.alpha", "train.max_grad_norm", "l1.lambda"} <= {k for k, _ in FLOAT_KEYS}


@pytest.mark.parametrize("key,is_list", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e39", "-3.5e38", str(10 ** 40)])
def test_every_float_key_refuses_non_finite_and_out_of_range(tmp_path, key, is_list, value):
    text = f"[{value}, {value}]" if is_list else value
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, [f"output_dir={tmp_path}", f"{key}={text}"])
    assert str(err.value).startswith(key), str(err.value)


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=1e39", "train.max_steps=1" + "0" * 30])
def test_bad_numbers_exit_2_with_one_line(tmp_path, capsys, override):
    assert train_cli(tmp_path / "run", override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train."), err
    assert not (tmp_path / "run").exists()


def _poisoned_optimizer_at(step_to_poison: int, monkeypatch):
    """build_optimizer whose step number `step_to_poison` writes a NaN into one LoRA factor."""
    real = train.build_optimizer

    def build(params, *a, **k):
        opt = real(params, *a, **k)
        step, calls = opt.step, {"n": 0}

        def poisoned_step(*sa, **sk):
            out = step(*sa, **sk)
            calls["n"] += 1
            if calls["n"] == step_to_poison:
                with torch.no_grad():
                    params[0].view(-1)[0] = float("nan")
            return out
        opt.step = poisoned_step
        return opt
    monkeypatch.setattr(train, "build_optimizer", build)


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a gradient goes bad while the loss stays finite."""
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan_gradient_at(call: int, monkeypatch):
    real, calls = train_setup.sft_objective, {"n": 0}

    def objective(model, batch, totals):
        loss, stats = real(model, batch, totals)
        calls["n"] += 1
        return (_NaNGradient.apply(loss) if calls["n"] == call else loss), stats
    monkeypatch.setattr(train_setup, "sft_objective", objective)


@pytest.mark.parametrize("inject", ["nan_in_weights_after_step_3", "nan_in_gradient_of_step_3"])
def test_non_finite_step_stops_at_a_good_resumable_checkpoint(tmp_path, capsys, monkeypatch, reference, inject):
    out = tmp_path / "run"
    if inject == "nan_in_weights_after_step_3":
        _poisoned_optimizer_at(3, monkeypatch)
    else:
        _nan_gradient_at(3, monkeypatch)
    assert train_cli(out) == 3
    err = capsys.readouterr().err
    last = str(out / "checkpoints" / "step-000002")
    assert f"the last good checkpoint is {last}" in err, err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000001", "step-000002"]  # step 3 was not kept
    verify_checkpoint(last)  # intact and finite
    assert not (out / "adapter").exists()
    # ... and resumable: continuing from it gives the uninterrupted run's adapter bit for bit.
    monkeypatch.undo()
    assert train_cli(out, f"train.resume={last}") == 0
    assert_same_adapter(adapter_of(out / "adapter"), adapter_of(reference / "adapter"))


# ------------------------------------------------------------------ class 2: damaged files

def test_resume_auto_skips_a_damaged_newest_checkpoint(two_steps, reference, capsys):
    newest = two_steps / "checkpoints" / "step-000002"
    weights = newest / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # truncated, as a full disk leaves it
    assert train_cli(two_steps, "train.resume=auto") == 0
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {newest}" in err and "adapter_model.safetensors" in err, err
    assert (two_steps / "checkpoints" / "step-000002.damaged").is_dir()  # set aside, not deleted
    # resumed from step 1: the same result as the run that never broke
    assert_same_adapter(adapter_of(two_steps / "adapter"), adapter_of(reference / "adapter"))


def test_explicit_resume_of_a_damaged_checkpoint_is_exit_2(two_steps, capsys):
    ckpt = two_steps / "checkpoints" / "step-000002"
    (ckpt / "optimizer.safetensors").write_bytes(b"")
    before = snapshot(two_steps)
    assert train_cli(two_steps, f"train.resume={ckpt}") == 2
    err = capsys.readouterr().err
    assert f"{ckpt}/optimizer.safetensors" in err and err.count("\n") == 1, err
    assert snapshot(two_steps) == before


def test_flipped_byte_in_tensor_data_is_caught_by_the_digest(two_steps, capsys):
    ckpt = two_steps / "checkpoints" / "step-000002"
    path = ckpt / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last factor: still parses, still finite
    path.write_bytes(bytes(data))
    assert train_cli(two_steps, f"train.resume={ckpt}") == 2
    assert "does not match the digest" in capsys.readouterr().err


def test_torn_last_metrics_line_does_not_block_resume(two_steps, reference, capsys):
    with open(two_steps / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the kill hit mid-write
    assert train_cli(two_steps, "train.resume=auto") == 0
    assert "torn last line" in capsys.readouterr().err
    rows = [r for r in read_metrics(str(two_steps / "metrics.jsonl")) if "loss" in r]
    ref = [r for r in read_metrics(str(reference / "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["loss"] for r in rows] == [r["loss"] for r in ref]


def test_damaged_metrics_line_is_exit_2_and_writes_nothing(two_steps, capsys):
    lines = (two_steps / "metrics.jsonl").read_bytes().split(b"\n")
    lines[0] = b"\xff\xfe" + lines[0][2:]
    (two_steps / "metrics.jsonl").write_bytes(b"\n".join(lines))
    before = snapshot(two_steps)
    assert train_cli(two_steps, "train.resume=auto") == 2
    assert f"{two_steps}/metrics.jsonl:1" in capsys.readouterr().err
    assert snapshot(two_steps) == before


def test_leftover_temporaries_of_a_killed_write_are_removed(two_steps):
    stale = [two_steps / "checkpoints" / ".tmp-step-000003-4242", two_steps / "checkpoints" / "step-000002.old-4242"]
    for d in stale:
        os.makedirs(d / "adapter")
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    (two_steps / "metrics.jsonl.tmp").write_text("half")
    (two_steps / "recipe.yaml.tmp-4242").write_text("half")
    assert train_cli(two_steps, "train.resume=auto") == 0
    assert sorted(p for p in os.listdir(two_steps / "checkpoints")) == [f"step-00000{i}" for i in (1, 2, 3, 4)]
    assert not any(".tmp" in p for p in os.listdir(two_steps))


@pytest.mark.parametrize("content", [b"\xff\xfe not utf-8", b"model: [unclosed\n", b"\tmodel: x\n", b"- a\n- b\n",
                                     b"pipeline: {stages: [\n"])
def test_damaged_recipe_file_is_exit_2(tmp_path, capsys, content):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    assert cli(train.main, str(path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], err


def test_jsonl_rows_with_bad_encodings_and_lone_surrogates_are_malformed_rows(tmp_path, capsys):
    good = '{"prompt": "1+1=", "completion": "2"}'
    data = tmp_path / "rows.jsonl"
    data.write_bytes("\n".join([good] * 8).encode() + b"\n" + b'{"prompt": "\xff\xfe", "completion": "x"}\n'
                     + b'{"prompt": "\\ud800", "completion": "y"}\n' + b'{"prompt": "a", "compl\n')
    out = tmp_path / "run"
    assert train_cli(out, f"data.source={data}", "data.max_bad_fraction=0.5", "train.max_steps=1") == 0
    assert "3 malformed rows skipped" in capsys.readouterr().out
    shutil.rmtree(out)
    assert train_cli(out, f"data.source={data}", "data.max_bad_fraction=0.1", "train.max_steps=1") == 2
    err = capsys.readouterr().err
    assert "line 9" in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def damaged_artifacts(tmp_path_factory, reference):
    """A truncated adapter, a truncated model directory and an adapter whose config is not UTF-8."""
    from engine.models import load_model_and_tokenizer
    from engine.recipe import ModelConfig
    root = tmp_path_factory.mktemp("damaged")
    adapter = root / "adapter"
    shutil.copytree(reference / "adapter", adapter)
    w = adapter / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    bad_config = root / "bad_config"
    shutil.copytree(reference / "adapter", bad_config)
    (bad_config / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama"), torch.device("cpu"))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    m = model_dir / "model.safetensors"
    m.write_bytes(m.read_bytes()[:-100])
    return {"adapter": adapter, "bad_config": bad_config, "model": model_dir}


@pytest.mark.parametrize("what", ["adapter", "bad_config", "model"])
@pytest.mark.parametrize("tool", ["train", "evals", "export", "merge"])
def test_damaged_weights_are_exit_2_naming_the_file_in_every_tool(tmp_path, capsys, damaged_artifacts, tool, what):
    target = damaged_artifacts[what]
    bad_file = {"adapter": "adapter_model.safetensors", "bad_config": "adapter_config.json",
                "model": "model.safetensors"}[what]
    if tool == "train":
        if what != "model":
            pytest.skip("train reads models, not adapters")
        rc = train_cli(tmp_path / "run", f"model.name={target}")
    elif tool == "evals":
        from paft_evals.__main__ import main
        rc = cli(main, str(target), "--tasks", "arithmetic", "--limit", "1", "--out", str(tmp_path / "r.json"))
    elif tool == "export":
        from engine.export import main
        if what == "model":
            pytest.skip("export reads adapters (and their base by name)")
        rc = cli(main, str(target), "--out", str(tmp_path / "exported"), "--base", "original")
    else:
        import yaml
        from merge.__main__ import main
        cfg = ({"merge_method": "linear", "base_model": "builtin:tiny-llama", "models": [{"model": str(target), "parameters": {"weight": 1.0}}]}
               if what != "model" else {"merge_method": "linear", "base_model": str(target),
                                        "models": [{"model": "builtin:tiny-llama", "parameters": {"weight": 1.0}}]})
        (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
        rc = cli(main, str(tmp_path / "m.yaml"), "--out", str(tmp_path / "merged"))
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert bad_file in err and err.strip().count("\n") == 0, err


# ------------------------------------------------------------------ class 3 and 5: refusals write nothing

@pytest.mark.parametrize("refusal", [["train.resume=auto", "lora.r=4"], ["train.resume=auto", "data.num_train=17"],
                                     [], ["train.resume=auto", "model.name=./nowhere"],
                                     ["train.resume=auto", "data.source=missing.jsonl"]])
def test_a_refused_run_writes_nothing(two_steps, capsys, refusal):
    before = snapshot(two_steps)
    assert train_cli(two_steps, *refusal) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert snapshot(two_steps) == before


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    for out in (f, f / "sub"):
        assert train_cli(out) == 2
        assert "output_dir" in capsys.readouterr().err
    assert f.read_text() == "keep me"


def test_evals_out_that_is_a_directory_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import paft_evals.__main__ as ev
    monkeypatch.setattr(ev, "load_target", lambda *a, **k: pytest.fail("the evaluation ran"))
    assert cli(ev.main, "builtin:tiny-llama", "--tasks", "arithmetic", "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "is a directory" in err, err
    f = tmp_path / "file"
    f.write_text("")
    assert cli(ev.main, "builtin:tiny-llama", "--tasks", "arithmetic", "--out", str(f / "r.json")) == 2


# ------------------------------------------------------------------ hypothesis: any value, any key

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _leaf_keys(cls=Recipe, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.metadata.get("key", f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], key + ".")
        else:
            yield key


VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10 ** 40, 10 ** 40)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=2), max_leaves=5)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(sorted(_leaf_keys()) + ["train", "lora", "nope", "train.nope", "lora.r.x"]), VALUES)
def test_any_value_for_any_key_validates_or_refuses(tmp_path_factory, key, value):
    """Validation (--print-config stops after it) answers 0 or 2 for whatever a key is set to."""
    import yaml
    text = yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
    out = tmp_path_factory.getbasetemp() / "fuzz-validate"
    assert cli(train.main, TINY, f"output_dir={out}", f"{key}={text}", "--print-config") in (0, 2), (key, text)
