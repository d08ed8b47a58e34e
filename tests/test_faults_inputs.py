"""Inputs a careless or hostile user hands the engine (issue 24, classes 6-9): adapter configs and
factors, model folders that do not match their config, parser bombs, byte-order marks.

Each case runs the real command lines in-process (`main(argv)`: engine.train, paft_evals,
engine.export, merge) on builtin:tiny-llama and asserts what issue 24 promises:

* the exit status is 0 or 2 (never 1, a traceback), a refusal is one `error:` line naming the file,
* a file the engine did not write is never changed (hashed before and after),
* class 6: every adapter-config key the update depends on is typed and ranged by one validator
  (engine.adapter_config) in every tool, and no NaN/inf factor is loaded;
* class 7: a model folder with a missing, unexpected or mis-shaped tensor, or a tokenizer larger than
  the embedding, is refused before any work;
* class 8: 3,000 levels of nesting and a YAML alias bomb are a damaged file (or, in a JSONL data
  file, one malformed row), within seconds;
* class 9: a UTF-8 byte-order mark costs no row.
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import engine.train as train
from engine.adapter_config import MAX_ALPHA, MAX_RANK, read_adapter_config
from engine.data.sources import load_examples
from engine.lora import apply_lora, copy_lora_tensors, load_adapter, save_adapter
from engine.models import load_model_and_tokenizer
from engine.recipe import DataConfig, LoRAConfig, ModelConfig, load_recipe
from engine.safeio import MAX_DEPTH, CorruptFile, UnsafeInput, parse_json, parse_yaml, read_jsonl_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny_sft.yaml")
FAST = ["train.max_steps=1", "train.eval_every=0", "train.warmup_steps=0", "data.num_train=16", "data.num_eval=4",
        "data.max_length=64", "train.batch_size=2", "lora.target_modules=[q_proj]", "logging.progress_bar=false"]
CPU = torch.device("cpu")
DEEP = 3000  # levels of nesting: a RecursionError in every Python parser before issue 24


def cli(main, *argv) -> int:
    """Exit status of a command line run in-process (argparse's SystemExit included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def train_cli(out, *extra) -> int:
    return cli(train.main, TINY, f"output_dir={out}", *FAST, *extra)


def evals_cli(target, tmp_path) -> int:
    from paft_evals.__main__ import main
    return cli(main, target, "--tasks", "arithmetic", "--limit", "1", "--out", tmp_path / "evals.json")


def export_cli(adapter, tmp_path, *extra) -> int:
    from engine.export import main
    return cli(main, adapter, "--out", tmp_path / "exported", "--base", "original", *extra)


def merge_cli(cfg: dict | str, tmp_path) -> int:
    from merge.__main__ import main
    path = tmp_path / "merge.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    return cli(main, path, "--out", tmp_path / "merged")


def linear_merge(adapter) -> dict:
    return {"merge_method": "linear", "base_model": "builtin:tiny-llama",
            "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}


def digests(root) -> dict:
    """sha256 of every file under root: a file the engine did not write must not change."""
    out = {}
    for here, _, files in os.walk(root):
        for name in files:
            full = os.path.join(here, name)
            out[os.path.relpath(full, root)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return out


def one_error_line(capsys, *names) -> str:
    """The refusal on stderr: one `error:` line that names each of `names`."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0, err[-3000:]
    for name in names:
        assert str(name) in err, err
    return err


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds` (SIGALRM, main thread)."""
    def expired(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny-llama adapter on q_proj and v_proj (r = 4) with non-zero factors, as engine.lora saves it."""
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama", dtype="float32"), CPU)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(model, cfg, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, str(out), cfg, "builtin:tiny-llama")
    return out


def adapter_with(tmp_path, adapter, change: dict | None = None, tensors=None, name="bad"):
    """A copy of `adapter` whose config has `change` applied and/or whose factors `tensors` rewrites."""
    out = tmp_path / name
    shutil.copytree(adapter, out)
    if change is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(change)
        (out / "adapter_config.json").write_text(json.dumps(cfg))  # NaN / Infinity as JSON's extension writes them
    if tensors is not None:
        save_file(tensors(load_file(out / "adapter_model.safetensors")), out / "adapter_model.safetensors",
                  metadata={"format": "pt"})
    return out


# ------------------------------------------------------------------ class 6: adapter configs

# (key, value) pairs no adapter may have; each is refused naming the key
BAD_CONFIG = [("r", None), ("r", 0), ("r", -4), ("r", [4]), ("r", True), ("r", "4"), ("r", 4.0), ("r", MAX_RANK + 1),
              ("lora_alpha", math.nan), ("lora_alpha", math.inf), ("lora_alpha", 1e300), ("lora_alpha", 10 ** 400),
              ("lora_alpha", 0), ("lora_alpha", -8), ("lora_alpha", "8"), ("lora_alpha", None), ("lora_alpha", False),
              ("lora_alpha", MAX_ALPHA * 2),
              ("use_rslora", "false"), ("use_rslora", "true"), ("use_rslora", 0), ("use_rslora", None),
              ("fan_in_fan_out", "false"), ("fan_in_fan_out", 1),
              ("lora_dropout", 1), ("lora_dropout", -0.1), ("lora_dropout", math.nan), ("lora_dropout", "0.1"),
              ("target_modules", []), ("target_modules", ""), ("target_modules", [1]), ("target_modules", None),
              ("target_modules", [""]), ("target_modules", {"q_proj": 1}),
              ("base_model_name_or_path", ["builtin:tiny-llama"]), ("base_model_name_or_path", 5),
              ("init_lora_weights", "pissa"), ("init_lora_weights", 1)]


@pytest.mark.parametrize("key,value", BAD_CONFIG, ids=[f"{k}={v!r}" for k, v in BAD_CONFIG])
def test_the_validator_refuses_each_bad_key_naming_it(tmp_path, adapter, key, value):
    bad = adapter_with(tmp_path, adapter, {key: value})
    with pytest.raises(ValueError) as err:
        read_adapter_config(str(bad))
    assert str(bad / "adapter_config.json") in str(err.value) and key in str(err.value), str(err.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "use_rslora", "fan_in_fan_out",
                                        "target_modules", "base_model_name_or_path", "peft_type", "bias"]),
                       JSON | st.sampled_from([1, 4, 16.0, 0.5, "false", "q_proj", ["q_proj"], math.nan]), max_size=4))
def test_any_adapter_config_is_checked_or_refused(tmp_path_factory, adapter, change):
    """Whatever JSON the keys hold, the validator returns the types the update needs, or refuses with a
    ValueError naming the file: never another exception, never a value that would poison the model."""
    tmp = tmp_path_factory.mktemp("fuzz")
    bad = adapter_with(tmp, adapter, change)
    try:
        cfg = read_adapter_config(str(bad))
    except ValueError as e:
        assert str(bad / "adapter_config.json") in str(e), str(e)
        return
    assert type(cfg["r"]) is int and 1 <= cfg["r"] <= MAX_RANK
    assert type(cfg["lora_alpha"]) is float and 0 < cfg["lora_alpha"] <= MAX_ALPHA
    assert 0 <= cfg["lora_dropout"] < 1 and type(cfg["use_rslora"]) is bool and cfg["fan_in_fan_out"] is False
    assert isinstance(cfg["target_modules"], (str, list)) and cfg["target_modules"]


# a few of BAD_CONFIG through every command that loads adapters
CLI_CASES = [("r", None), ("r", [4]), ("lora_alpha", math.nan), ("lora_alpha", 1e300), ("use_rslora", "false"),
             ("lora_dropout", 2), ("target_modules", [])]


@pytest.mark.parametrize("tool", ["evals", "export", "merge"])
def test_bad_adapter_configs_are_exit_2_in_every_tool_and_change_nothing(tmp_path, capsys, adapter, tool):
    for i, (key, value) in enumerate(CLI_CASES):
        bad = adapter_with(tmp_path, adapter, {key: value}, name=f"bad{i}")
        before = digests(bad)
        work = tmp_path / f"work{i}"
        work.mkdir()
        rc = {"evals": lambda: evals_cli(bad, work), "export": lambda: export_cli(bad, work),
              "merge": lambda: merge_cli(linear_merge(bad), work)}[tool]()
        assert rc == 2, (key, value, capsys.readouterr().err[-2000:])
        one_error_line(capsys, "adapter_config.json", key)
        assert digests(bad) == before
        assert not (work / "evals.json").exists() and not (work / "exported").exists() \
            and not (work / "merged").exists()


def _poison(key_part: str, value: float):
    def change(sd):
        key = next(k for k in sorted(sd) if key_part in k)
        sd[key] = sd[key].clone()
        sd[key].view(-1)[3] = value
        return sd
    return change


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("tool", ["evals", "export", "merge"])
def test_non_finite_factors_are_refused_naming_the_tensor(tmp_path, capsys, adapter, tool, value):
    bad = adapter_with(tmp_path, adapter, tensors=_poison("v_proj.lora_B", value))
    before = digests(bad)
    rc = {"evals": lambda: evals_cli(bad, tmp_path), "export": lambda: export_cli(bad, tmp_path),
          "merge": lambda: merge_cli(linear_merge(bad), tmp_path)}[tool]()
    assert rc == 2
    one_error_line(capsys, "adapter_model.safetensors", "v_proj.lora_B")
    assert digests(bad) == before


def test_factors_shaped_against_r_are_refused(tmp_path, capsys, adapter):
    """r says 8 but the factors are rank 4: refused by the engine and by merge, naming a tensor."""
    bad = adapter_with(tmp_path, adapter, {"r": 8})
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama", dtype="float32"), CPU)
    with pytest.raises(ValueError, match="lora_A.weight has shape"):
        load_adapter(model, str(bad))
    assert merge_cli(linear_merge(bad), tmp_path) == 2
    one_error_line(capsys, "rank-8")


def test_resume_refuses_non_finite_factors_before_copying_any(adapter):
    """engine.lora.copy_lora_tensors (what resume loads a checkpoint's adapter with) checks every factor
    before it writes into the model, so a refused checkpoint leaves the model as it was."""
    model, _ = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama", dtype="float32"), CPU)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = _poison("v_proj.lora_B", math.nan)(dict(load_file(adapter / "adapter_model.safetensors")))
    with pytest.raises(ValueError, match="NaN or inf"):
        copy_lora_tensors(model, poisoned, "ckpt/adapter_model.safetensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_good_adapter_still_loads_everywhere(tmp_path, adapter):
    cfg = read_adapter_config(str(adapter))
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (4, 8.0, False)
    assert merge_cli(linear_merge(adapter), tmp_path) == 0


# ------------------------------------------------------------------ class 7: model folders

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """tiny-llama saved, and four folders that do not match their config.json."""
    root = tmp_path_factory.mktemp("models")
    model, tok = load_model_and_tokenizer(ModelConfig(name="builtin:tiny-llama", dtype="float32"), CPU)
    good = root / "good"
    model.save_pretrained(good)
    tok.save_pretrained(good)
    sd = load_file(good / "model.safetensors")
    dirs = {}
    for kind in ("missing_layer", "unexpected_key", "config_shape", "big_tokenizer"):
        d = dirs[kind] = root / kind
        shutil.copytree(good, d)
    save_file({k: v for k, v in sd.items() if ".layers.1." not in k}, dirs["missing_layer"] / "model.safetensors",
              metadata={"format": "pt"})
    save_file({**sd, "model.layers.7.mlp.extra.weight": torch.zeros(4)}, dirs["unexpected_key"] / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((good / "config.json").read_text())
    (dirs["config_shape"] / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    tok.add_tokens(["<new-1>", "<new-2>", "<new-3>"])  # ids 261..263: past the 261-row embedding
    tok.save_pretrained(dirs["big_tokenizer"])
    return dirs


MODEL_PROBLEM = {"missing_layer": "model.layers.1.", "unexpected_key": "model.layers.7.mlp.extra.weight",
                 "config_shape": "mlp.down_proj.weight", "big_tokenizer": "embedding has 261 rows"}


@pytest.mark.parametrize("kind", list(MODEL_PROBLEM))
@pytest.mark.parametrize("tool", ["train", "evals", "export"])
def test_a_model_folder_that_does_not_match_is_exit_2_in_every_tool(tmp_path, capsys, adapter, model_dirs, tool, kind):
    folder = model_dirs[kind]
    before = digests(folder)
    if tool == "train":
        rc = train_cli(tmp_path / "run", f"model.name={folder}")
    elif tool == "evals":
        rc = evals_cli(folder, tmp_path)
    else:
        rc = export_cli(adapter, tmp_path, "--model", folder)
    assert rc == 2
    one_error_line(capsys, folder, MODEL_PROBLEM[kind])
    assert digests(folder) == before
    assert not [f for f in digests(tmp_path) if f.endswith((".safetensors", ".json"))]  # no weights, no results


def test_the_matching_folder_loads(model_dirs):
    model, tok = load_model_and_tokenizer(ModelConfig(name=str(model_dirs["missing_layer"].parent / "good")), CPU)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


# ------------------------------------------------------------------ class 8: parser denial of service

def nested(depth: int, style: str) -> str:
    """YAML/JSON text nested `depth` levels deep: flow lists, flow mappings or JSON objects."""
    if style == "list":
        return "[" * depth + "1" + "]" * depth
    if style == "flow_map":
        return "{a: " * depth + "1" + "}" * depth
    return '{"a": ' * depth + "1" + "}" * depth


# A "billion laughs": nine levels of nine aliases each, 10^9 leaves from a file of ~1 KB.
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.integers(1, 5000), st.sampled_from(["list", "flow_map", "json"]))
def test_nesting_parses_or_is_unsafe_input_never_a_recursion_error(depth, style):
    text = nested(depth, style)
    parse = parse_json if style == "json" else parse_yaml
    try:
        parse(text, "input")
    except UnsafeInput as e:
        assert depth + 1 > MAX_DEPTH and str(e).startswith("input"), (depth, str(e))
    else:
        assert depth + 1 <= MAX_DEPTH


def test_aliases_are_refused_and_yaml_1_2_numbers_are_numbers():
    with time_limit(5):
        with pytest.raises(UnsafeInput, match=r"bomb.yaml:2: YAML aliases"):
            parse_yaml(ALIAS_BOMB, "bomb.yaml")
    assert parse_yaml("a: &x 1\nb: [1e-3, 2E5, -1.5e-2, '1e-3', 1_000]", "f") == \
        {"a": 1, "b": [0.001, 200000.0, -0.015, "1e-3", 1000]}
    assert parse_yaml(yaml.safe_dump({"s": "1e-3"}), "f") == {"s": "1e-3"}  # what the engine writes reads back
    with pytest.raises(CorruptFile, match="lone surrogate"):
        parse_yaml('a: "\\ud800"', "f")


def test_a_merge_config_reads_1e_3_as_a_number(tmp_path):
    from merge.config import load_config
    path = tmp_path / "m.yaml"
    path.write_text("merge_method: linear\nbase_model: builtin:tiny-llama\nmodels:\n"
                    "  - {model: a, parameters: {weight: 1e-3}}\n  - {model: b, parameters: {weight: 2E0}}\n")
    assert [m.params["weight"] for m in load_config(str(path)).models] == [0.001, 2.0]


def _recipe_text(payload: str) -> str:
    return open(TINY).read() + f"\nextra_key: {payload}\n"


@pytest.mark.parametrize("payload", [nested(DEEP, "list"), nested(DEEP, "flow_map"), "\n" + ALIAS_BOMB.replace(
    "\n", "\n  ")], ids=["deep_list", "deep_map", "alias_bomb"])
@pytest.mark.parametrize("where", ["recipe", "pipeline", "merge"])
def test_parser_bombs_in_every_yaml_file_are_exit_2_within_seconds(tmp_path, capsys, where, payload):
    path = tmp_path / f"{where}.yaml"
    if where == "recipe":
        path.write_text(_recipe_text(payload))
    elif where == "pipeline":
        path.write_text(f"pipeline:\n  output_dir: {tmp_path / 'out'}\n  model: builtin:tiny-llama\n"
                        f"  stages: {payload if not payload.startswith(chr(10)) else payload.replace(chr(10), chr(10) + '  ')}\n")
    else:
        path.write_text(yaml.safe_dump(linear_merge("builtin:tiny-llama")) + f"parameters: {payload}\n")
    before = digests(tmp_path)
    with time_limit(20):
        if where == "merge":
            from merge.__main__ import main
            rc = cli(main, path, "--out", tmp_path / "merged")
        else:
            rc = cli(train.main, path, f"output_dir={tmp_path / 'out'}")
    assert rc == 2
    one_error_line(capsys, path)
    assert digests(tmp_path) == before


@pytest.mark.parametrize("override", [f"train.lr={nested(DEEP, 'list')}", "lora.target_modules=[&a q_proj, *a]",
                                      f"data.columns={nested(DEEP, 'flow_map')}"])
def test_parser_bombs_in_overrides_are_exit_2(tmp_path, capsys, override):
    assert train_cli(tmp_path / "run", override) == 2
    one_error_line(capsys, "override")
    assert not (tmp_path / "run").exists()


def test_a_deep_adapter_config_is_a_damaged_file(tmp_path, capsys, adapter):
    bad = tmp_path / "deep"
    shutil.copytree(adapter, bad)
    (bad / "adapter_config.json").write_text(nested(DEEP, "json"))
    assert merge_cli(linear_merge(bad), tmp_path) == 2
    one_error_line(capsys, bad / "adapter_config.json", "nested")


GOOD_ROW = '{"prompt": "1+1=", "completion": "2"}'


def test_a_deep_jsonl_row_is_one_malformed_row(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([GOOD_ROW] * 15 + ['{"prompt": ' + nested(DEEP, "json") + ', "completion": "x"}',
                               nested(DEEP, "list")]) + "\n")
    before = data.read_bytes()
    rows = read_jsonl_rows(str(data))
    assert len(rows) == 17 and rows[15] is None and rows[16] is None
    assert train_cli(tmp_path / "run", f"data.source={data}", "data.max_bad_fraction=0.2") == 0
    assert "2 malformed rows skipped" in capsys.readouterr().out
    assert train_cli(tmp_path / "run2", f"data.source={data}", "data.max_bad_fraction=0.05") == 2
    one_error_line(capsys, "line 16")
    assert data.read_bytes() == before


# ------------------------------------------------------------------ class 9: byte-order marks

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_a_bom_costs_no_row(tmp_path, newline):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(BOM + newline.join([GOOD_ROW.encode()] * 20) + newline)
    assert len(read_jsonl_rows(str(data))) == 20 and None not in read_jsonl_rows(str(data))
    examples, report = load_examples(DataConfig(source=str(data)), "train")
    assert (report["rows"], report["bad"], len(examples)) == (20, 0, 20)


def test_a_bom_is_accepted_in_every_file_kind(tmp_path, capsys, adapter):
    """Training data, preference data, evals data files (JSONL, a BIG-bench task.json), a recipe, an adapter config."""
    data = tmp_path / "rows.jsonl"
    data.write_bytes(BOM + ("\n".join([GOOD_ROW] * 16) + "\n").encode())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(BOM + open(TINY, "rb").read())
    assert load_recipe(str(recipe), [f"output_dir={tmp_path / 'x'}"]).model.name == "builtin:tiny-llama"
    assert cli(train.main, recipe, f"output_dir={tmp_path / 'run'}", *FAST, f"data.source={data}",
               "data.max_bad_fraction=0") == 0
    assert "(0 malformed rows skipped" in capsys.readouterr().out

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(BOM + ("\n".join(['{"prompt": "Hi", "chosen": "Hello.", "rejected": "No."}'] * 8) + "\n").encode())
    from engine.data.preference import load_preference_examples
    _, report = load_preference_examples(DataConfig(source=str(pairs), max_bad_fraction=0.0), "train")
    assert report["bad"] == 0 and report["rows"] == 8

    from paft_evals.common import read_jsonl
    evals_data = tmp_path / "mc.jsonl"
    evals_data.write_bytes(BOM + b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    assert read_jsonl(str(evals_data)) == [{"question": "q", "choices": ["a", "b"], "answer": 0}]
    from paft_evals.mc import bigbench_items
    task = tmp_path / "task.json"
    task.write_bytes(BOM + b'{"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}]}')
    items, skipped = bigbench_items(str(task))
    assert len(items) == 1 and skipped == 0

    bommed = tmp_path / "bom_adapter"
    shutil.copytree(adapter, bommed)
    config = bommed / "adapter_config.json"
    config.write_bytes(BOM + config.read_bytes())
    assert read_adapter_config(str(bommed))["r"] == 4
