"""Several ranks on CPU (gloo): `torchrun --nproc_per_node 2` runs of the tiny recipes against
single-process runs with the same global batch, save/resume under ddp and fsdp2, the errors.

Tolerances (fp32). The sharded micro-batches are padded to their own longest row and summed
over ranks in another order, so numbers differ in the last bits:
  * step losses and gradient norms: relative 1e-5 (observed: below 3e-6);
  * adapter factors: 2e-5 absolute + 1e-4 relative (observed: below 8e-6 with lr 3e-3; Adam
    divides by sqrt(v), which magnifies rounding in tiny gradient entries);
  * resuming on as many ranks as the run was saved on: bit-identical.
Every launch uses a constant learning rate, so a run stopped at step 2 and one that went on
to step 4 had the same schedule: the step-2 checkpoint of a 4-step run stands for a run
that stopped there (the "interrupted" copy drops the later checkpoint and outputs).
"""
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine import distributed as dist
from engine.data import Batches, PairBatches
from engine.log import read_metrics
from engine.recipe import load_recipe
from engine.train import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(REPO, "recipes", "tiny_sft.yaml")
DPO = os.path.join(REPO, "recipes", "tiny_dpo.yaml")
COMMON = ["train.scheduler=constant", "train.warmup_steps=0", "train.eval_every=0", "train.eval_batches=1",
          "logging.progress_bar=false"]
# Two micro-batches of 8 rows per step (4 per rank): accumulation across ranks is exercised too.
SFT_ARGS = [*COMMON, "train.max_steps=4", "train.save_every=2", "train.batch_size=8", "train.grad_accum=2"]
DPO_ARGS = [*COMMON, "train.max_steps=3", "train.save_every=0", "lora.dropout=0.0"]
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return {**env, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


def torchrun(recipe: str, out, *overrides: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "engine.train", recipe, f"output_dir={out}", "train.threads=1", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def losses(out) -> list[dict]:
    return [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "loss" in r]


def adapter(out) -> dict:
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def assert_same_trajectory(ref, got, exact: bool = False) -> None:
    a, b = losses(ref), losses(got)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["trained_tokens"] == y["trained_tokens"], (x, y)  # the same samples, step by step
        for key in ("loss", "grad_norm"):
            if exact:
                assert x[key] == y[key], (key, x, y)
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (key, x, y)
    held = [json.loads(open(os.path.join(out, "summary.json")).read())["eval_loss"] for out in (ref, got)]
    assert held[1] == (held[0] if exact else pytest.approx(held[0], rel=1e-5))  # sharded held-out pass
    fa, fb = adapter(ref), adapter(got)
    assert fa.keys() == fb.keys()
    for k in fa:
        if exact:
            assert torch.equal(fa[k], fb[k]), k
        else:
            torch.testing.assert_close(fb[k], fa[k], rtol=1e-4, atol=2e-5)


def interrupted_copy(src, dst) -> str:
    """dst: src as it stood after step 2 (checkpoints/step-000002, no later checkpoint or outputs)."""
    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, "checkpoints", "step-000004"))
    shutil.rmtree(os.path.join(dst, "adapter"))
    os.remove(os.path.join(dst, "summary.json"))
    return str(dst)


class Runs:
    """Each run made once per module and shared by the tests that compare against it."""

    def __init__(self, root):
        self.root, self.done = root, {}

    def get(self, name: str, make) -> str:
        if name not in self.done:
            out = str(self.root / name)
            make(out)
            self.done[name] = out
        return self.done[name]

    def single_sft(self):  # dropout 0: the reference for ddp and fsdp2
        return self.get("single_sft", lambda o: run(load_recipe(SFT, [f"output_dir={o}", *SFT_ARGS,
                                                                       "lora.dropout=0.0"])))

    def ddp_sft(self):
        return self.get("ddp_sft", lambda o: torchrun(SFT, o, *SFT_ARGS, "lora.dropout=0.0", "train.distributed=ddp"))

    def fsdp2_sft(self):
        return self.get("fsdp2_sft", lambda o: torchrun(SFT, o, *SFT_ARGS, "lora.dropout=0.0",
                                                        "train.distributed=fsdp2"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("dist"))


# --------------------------------------------------------------------------- same global batch, same trajectory

def test_ddp_sft_matches_single_process(runs):
    assert_same_trajectory(runs.single_sft(), runs.ddp_sft())
    ckpt = os.path.join(runs.ddp_sft(), "checkpoints", "step-000002")
    assert sorted(os.listdir(ckpt)) == ["adapter", "optimizer.safetensors", "rng-rank1.safetensors",
                                        "rng.safetensors", "trainer_state.json"]


def test_fsdp2_sft_matches_single_process(runs):
    assert_same_trajectory(runs.single_sft(), runs.fsdp2_sft())
    ckpt = os.path.join(runs.fsdp2_sft(), "checkpoints", "step-000002")
    assert "sharded" in os.listdir(ckpt) and "optimizer.safetensors" not in os.listdir(ckpt)


def test_ddp_dpo_matches_single_process(tmp_path):
    run(load_recipe(DPO, [f"output_dir={tmp_path / 'single'}", *DPO_ARGS]))
    torchrun(DPO, tmp_path / "ddp", *DPO_ARGS, "train.distributed=ddp")
    assert_same_trajectory(tmp_path / "single", tmp_path / "ddp")
    rows = read_metrics(str(tmp_path / "ddp" / "metrics.jsonl"))
    assert rows[0]["check/ok"]  # step 0: the summed loss over ranks is ln 2


# --------------------------------------------------------------------------- save and resume

def test_ddp_resume_is_exact_with_dropout(tmp_path):
    # Dropout on: rank 1 must get its own RNG stream back (rng-rank1.safetensors).
    args = [*SFT_ARGS, "lora.dropout=0.1", "train.distributed=ddp"]
    torchrun(SFT, tmp_path / "full", *args)
    resumed = interrupted_copy(tmp_path / "full", tmp_path / "resumed")
    torchrun(SFT, resumed, *args, "train.resume=auto")
    assert_same_trajectory(tmp_path / "full", resumed, exact=True)


def test_fsdp2_resume_is_exact(runs, tmp_path):
    resumed = interrupted_copy(runs.fsdp2_sft(), tmp_path / "resumed")
    torchrun(SFT, resumed, *SFT_ARGS, "lora.dropout=0.0", "train.distributed=fsdp2", "train.resume=auto")
    assert_same_trajectory(runs.fsdp2_sft(), resumed, exact=True)


def test_ddp_checkpoint_resumes_in_a_single_process(runs, tmp_path):
    # ddp state is replicated and the data position global: 2 ranks -> 1 process continues the same run.
    resumed = interrupted_copy(runs.ddp_sft(), tmp_path / "resumed")
    run(load_recipe(SFT, [f"output_dir={resumed}", *SFT_ARGS, "lora.dropout=0.0", "train.resume=auto"]))
    assert_same_trajectory(runs.single_sft(), resumed)


def test_fsdp2_checkpoint_refuses_another_world(runs, tmp_path):
    resumed = interrupted_copy(runs.fsdp2_sft(), tmp_path / "resumed")
    with pytest.raises(ValueError, match=r"holds fsdp2 shards from 2 ranks; it resumes only under "
                                         r"train.distributed=fsdp2 on 2 ranks \(this run: none on 1\)"):
        run(load_recipe(SFT, [f"output_dir={resumed}", *SFT_ARGS, "lora.dropout=0.0", "train.resume=auto"]))


# --------------------------------------------------------------------------- errors and pieces

def test_ddp_without_torchrun_is_a_one_line_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "engine.train", SFT, f"output_dir={tmp_path}",
                          "train.distributed=ddp"], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.distributed: ddp needs torchrun's environment")


def _samples(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_shards_are_the_single_process_batch():
    samples = _samples(22)  # 22 rows, batch 8: the last micro-batch of an epoch has 6 rows
    whole = Batches(samples, batch_size=8, seed=3, pad_id=0)
    shards = [Batches(samples, batch_size=8, seed=3, pad_id=0).shard(k, 2) for k in range(2)]
    for i in range(2 * len(whole)):  # two epochs
        rows = [r for r in whole.batch(i)["input_ids"].tolist()]
        got = [r for s in shards for r in s.batch(i)["input_ids"].tolist()]
        strip = lambda rs: sorted(tuple(t for t in r if t) for r in rs)  # padding differs per shard
        assert strip(got) == strip(rows)
        assert [tuple(t for t in r if t) for r in shards[1].batch(i)["input_ids"].tolist()] == \
               [tuple(t for t in r if t) for r in rows[1::2]]  # rank 1 takes rows 1, 3, 5, ...
    pairs = [{"chosen_input_ids": s["input_ids"], "chosen_labels": s["labels"],
              "rejected_input_ids": s["input_ids"][::-1], "rejected_labels": s["labels"][::-1]} for s in samples]
    whole_p = PairBatches(pairs, batch_size=4, seed=1, pad_id=0)
    for i in range(len(whole_p)):
        idx = whole_p.batch(i)["index"].tolist()
        parts = [PairBatches(pairs, batch_size=4, seed=1, pad_id=0).shard(k, 2).batch(i) for k in range(2)]
        assert sorted(sum((p["index"].tolist() for p in parts), [])) == sorted(idx)
        assert all(p["n_pairs"] * 2 == p["input_ids"].shape[0] for p in parts)


def test_shard_errors():
    with pytest.raises(ValueError, match="must be divisible by the 3 ranks"):
        Batches(_samples(16), batch_size=8, seed=0, pad_id=0).shard(0, 3)
    with pytest.raises(ValueError, match="last micro-batch of an epoch has 1 rows"):
        Batches(_samples(17), batch_size=8, seed=0, pad_id=0).shard(0, 2)


def test_single_process_helpers_are_identities():
    assert (dist.rank(), dist.world(), dist.is_main()) == (0, 1, True)
    assert dist.all_reduce_sum(3) == 3 and dist.all_reduce_sum({"a": 1.5, "n": 2}) == {"a": 1.5, "n": 2}
    dist.barrier()


def test_dcp_metadata_unpickler_refuses_code():
    # A crafted `.metadata` that would call os.system on load.
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        dist._MetadataUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()


def test_run_stages_in_parallel(tmp_path):
    # Two stages that each wait for the other's marker file: they only both succeed side by side.
    wait_for_other = ("import os, sys, time; d, me, other = sys.argv[1:]; "
                      "open(os.path.join(d, me), 'w').write(os.environ['CUDA_VISIBLE_DEVICES']); "
                      "t = time.time()\n"
                      "while not os.path.exists(os.path.join(d, other)) and time.time() - t < 60: time.sleep(0.05)\n"
                      "sys.exit(0 if os.path.exists(os.path.join(d, other)) else 1)")
    cmds = [[sys.executable, "-c", wait_for_other, str(tmp_path), "a", "b"],
            [sys.executable, "-c", wait_for_other, str(tmp_path), "b", "a"]]
    assert dist.run_stages_in_parallel(cmds, ["0", "1"]) == [0, 0]
    assert (tmp_path / "a").read_text() == "0" and (tmp_path / "b").read_text() == "1"
    # No devices (CPU): one after the other, in order; exit codes come back in command order.
    log = tmp_path / "order.txt"
    step = "import sys; open(sys.argv[1], 'a').write(sys.argv[2]); sys.exit(int(sys.argv[3]))"
    cmds = [[sys.executable, "-c", step, str(log), "1", "3"], [sys.executable, "-c", step, str(log), "2", "0"]]
    assert dist.run_stages_in_parallel(cmds, []) == [3, 0]
    assert log.read_text() == "12"
