"""merge/: the operators against dense references, DARE's statistics, adapter inputs against the
folded full checkpoints, the written model in transformers, --as-adapter, bad input, sparsity."""
import json
import math
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine.lora import apply_lora, load_adapter, merge_lora, save_adapter
from engine.models import load_model_and_tokenizer
from engine.recipe import LoRAConfig, ModelConfig
from merge import __main__ as cli
from merge import config as merge_config
from merge import methods as M
from merge import sparsity
from merge import write

CPU = torch.device("cpu")
IDS = torch.tensor([[5, 72, 101, 108, 108, 111, 33, 260, 7, 99]])  # (1, T) byte-level ids of tiny-llama


# ---------------------------------------------------------------------------- helpers

def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dyadic(shape, gen, denom=16, span=8):
    """Random multiples of 1/denom: sums and products of a few of them are exact in fp32, so the
    adapter path and the folded full checkpoint give bit-identical task vectors."""
    return torch.randint(-span, span + 1, shape, generator=gen).float() / denom


def tiny(name="builtin:tiny-llama"):
    model, tok = load_model_and_tokenizer(ModelConfig(name=name, dtype="float32"), CPU)
    return model.eval(), tok


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


def write_yaml(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def run_cli(tmp_path, cfg, out_name="out", extra=()):
    """Run `python -m merge` in-process; return (exit status, out dir)."""
    cfg_path = write_yaml(tmp_path / f"{out_name}.yaml", cfg)
    out = str(tmp_path / out_name)
    return cli.main([cfg_path, "--out", out, *extra]), out


def tensors_of(out):
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(out, f)))
    return sd


def make_adapter(base_dir, out_dir, targets, seed, r=4, alpha=8, rslora=False, full_dir=None):
    """An engine adapter on base_dir with random dyadic A and non-zero B; with full_dir, also the
    full checkpoint that folds it into the base (engine.lora.merge_lora + save_pretrained)."""
    model, _ = tiny(base_dir)
    cfg = LoRAConfig(r=r, alpha=alpha, rslora=rslora, target_modules=targets)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(dyadic(p.shape, g))
    save_adapter(model, out_dir, cfg, base_dir)
    if full_dir:
        merge_lora(model)
        model.save_pretrained(full_dir)
    return out_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dyadic tiny-llama base dir, two adapters on it (different targets, ranks and scale rules,
    both s = 2 so that s·B A stays dyadic) and the two full checkpoints that fold them in."""
    root = tmp_path_factory.mktemp("merge")
    model, tok = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 256) / 256)  # multiples of 2^-8
    base = str(root / "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    a1 = make_adapter(base, str(root / "a1"), ["q_proj", "v_proj", "up_proj"], seed=1, full_dir=str(root / "f1"))
    a2 = make_adapter(base, str(root / "a2"), ["q_proj", "o_proj", "down_proj"], seed=2, r=16, alpha=8,
                      rslora=True, full_dir=str(root / "f2"))
    return {"root": root, "base": base, "a": [a1, a2], "f": [str(root / "f1"), str(root / "f2")]}


# ---------------------------------------------------------------------------- 1. operators vs dense references

def test_linear_and_task_arithmetic_match_reference():
    xs = [rand(6, 5, seed=s) for s in (11, 12, 13)]
    w = [0.5, 1.5, -0.25]
    ref = (0.5 * xs[0] + 1.5 * xs[1] - 0.25 * xs[2])
    torch.testing.assert_close(M.linear(xs, w, normalize=False), ref)
    torch.testing.assert_close(M.linear(xs, w, normalize=True), ref / 1.75)
    base = rand(6, 5, seed=14)
    torch.testing.assert_close(M.task_arithmetic(base, xs, w, lam=0.7), base + 0.7 * ref)
    torch.testing.assert_close(M.task_arithmetic(base, xs, w, lam=0.7, normalize=True), base + 0.7 * ref / 1.75)
    # bf16 inputs are computed in fp32 and come back fp32 (the caller rounds once)
    assert M.linear([x.bfloat16() for x in xs], w).dtype == torch.float32


def ties_reference(base, deltas, weights, density, lam, normalize):
    """TIES written out entry by entry's worth of dense ops, mergekit style (argsort trim)."""
    trimmed = []
    for d in deltas:
        k = max(1, int(density * d.numel()))
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.argsort(d.abs().flatten(), descending=True)[:k]] = True
        trimmed.append(d * keep.view_as(d))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    total = sum(weighted)
    elected = torch.where(total >= 0, 1.0, -1.0)
    num = sum(torch.where(torch.sign(x) == elected, x, 0.0) for x in weighted)
    den = sum(torch.where(torch.sign(x) == elected, w, 0.0) for x, w in zip(weighted, weights))
    den = torch.where(den == 0, 1.0, den)
    return base + lam * (num / den if normalize else num)


@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(density, normalize):
    base = rand(16, 24, seed=21)
    deltas = [rand(16, 24, seed=s) for s in (22, 23, 24)]
    w = [1.0, 0.6, 0.3]
    got = M.ties(base, deltas, w, density, lam=0.9, normalize=normalize)
    torch.testing.assert_close(got, ties_reference(base, deltas, w, density, 0.9, normalize))


def test_ties_trim_keeps_exactly_k_and_per_model_density():
    d = rand(1000, seed=25)
    assert int((M.magnitude_trim(d, 0.3) != 0).sum()) == 300
    assert int((M.magnitude_trim(d, 1e-9) != 0).sum()) == 1  # mergekit: density > 0 keeps >= 1 entry
    base, deltas = rand(40, seed=26), [rand(40, seed=27), rand(40, seed=28)]
    mixed = M.ties(base, deltas, [1.0, 1.0], [1.0, 0.25], lam=1.0)
    ref = ties_reference(base, [deltas[0], M.magnitude_trim(deltas[1], 0.25)], [1.0, 1.0], 1.0, 1.0, True)
    torch.testing.assert_close(mixed, ref)


@pytest.mark.parametrize("case", ["random", "sorted", "reversed", "constant", "few_levels", "blocky"])
def test_kth_largest_is_exact(case):
    """The sample-narrowed selection equals torch.kthvalue on everything, on inputs built to
    fool the sample (so the fallback path runs too)."""
    n = 200_003
    x = {"random": rand(n, seed=71).abs(), "sorted": torch.arange(n, dtype=torch.float32),
         "reversed": torch.arange(n, dtype=torch.float32).flip(0), "constant": torch.full((n,), 0.5),
         "few_levels": torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(72)).float(),
         "blocky": torch.arange(n, dtype=torch.float32).remainder(32)}[case]
    for k in (1, 2, 1000, n // 2, n - 7, n):
        assert M.kth_largest(x, k) == torch.kthvalue(x, n - k + 1).values, (case, k)


def test_parameter_gradients_and_filters():
    """mergekit's parameter settings: scalar, gradient over t = layer/(L-1), filtered list."""
    assert merge_config.resolve(0.3, "x", 0.7) == 0.3
    assert merge_config.resolve([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert merge_config.resolve([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.2}, {"value": 0.9}]
    assert merge_config.resolve(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert merge_config.resolve(setting, "model.layers.1.mlp.up_proj.weight", 1.0) == 0.2
    assert merge_config.resolve(setting, "model.norm.weight", 0.0) == 0.9


def test_every_registry_entry_fits_its_function_and_is_in_help():
    """merge/registry.py is the one list of methods: each entry passes its function only keywords
    the function takes, names its paper, and --help lists it with its parameters."""
    import inspect

    from merge.registry import METHODS
    for m in METHODS.values():
        takes = inspect.signature(m.fn).parameters
        passed = [p.arg for p in m.params.values() if p.arg] + (["generator"] if m.random else [])
        assert set(passed) <= set(takes), m.name
        assert m.inputs in ("weights", "pair", "deltas") and m.url.startswith("https://"), m.name
        assert f"    {m.name}  " in cli.__doc__ and m.url in cli.__doc__, m.name


@pytest.mark.parametrize("fn", ["dare_linear", "dare_ties"])
def test_dare_matches_reference(fn):
    base = rand(30, 20, seed=31)
    deltas = [rand(30, 20, seed=32), rand(30, 20, seed=33)]
    w, dens = [1.0, 0.5], [0.3, 0.7]
    got = getattr(M, fn)(base, deltas, w, dens, M.tensor_generator("x.weight", 5), lam=0.8, normalize=True)
    g = M.tensor_generator("x.weight", 5)  # the same draws, written out
    dropped = [d * (torch.rand(d.shape, generator=g) < p) / p for d, p in zip(deltas, dens)]
    if fn == "dare_linear":
        ref = base + 0.8 * (w[0] * dropped[0] + w[1] * dropped[1]) / 1.5
    else:
        ref = ties_reference(base, dropped, w, 1.0, 0.8, True)
    torch.testing.assert_close(got, ref)


def test_dare_kept_fraction_and_unbiased():
    # kept count ~ Binomial(n, p): |kept/n - p| <= 5 sqrt(p(1-p)/n) fails with probability < 1e-6
    n, p = 200_000, 0.3
    kept = M.random_drop(torch.ones(n), p, M.tensor_generator("w", 0))
    frac = float((kept != 0).float().mean())
    assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n), frac
    torch.testing.assert_close(kept[kept != 0], torch.full_like(kept[kept != 0], 1 / p))  # rescaled by 1/p
    # E[m τ / p] = τ: the mean of N independent drops of τ; per entry the std of the mean is
    # |τ| sqrt((1-p)/(p N)), so 5 sigma over 32 entries fails with probability < 2e-5
    N, tau = 20_000, rand(32, seed=41)
    drops = M.random_drop(tau.expand(N, 32), p, M.tensor_generator("w2", 0))
    sigma = tau.abs() * math.sqrt((1 - p) / (p * N))
    assert ((drops.mean(0) - tau).abs() <= 5 * sigma + 1e-7).all()
    assert int((M.random_drop(torch.ones(1000), 0.5, M.tensor_generator("w", 0), rescale=False) == 1).sum()) > 0


def test_dare_reproducible_and_per_tensor():
    d = rand(64, 64, seed=51)
    a = M.random_drop(d, 0.5, M.tensor_generator("layers.0.q.weight", 7))
    b = M.random_drop(d, 0.5, M.tensor_generator("layers.0.q.weight", 7))
    assert torch.equal(a, b)
    assert not torch.equal(a, M.random_drop(d, 0.5, M.tensor_generator("layers.0.k.weight", 7)))
    assert not torch.equal(a, M.random_drop(d, 0.5, M.tensor_generator("layers.0.q.weight", 8)))


def test_slerp_matches_reference():
    a, b = rand(12, 9, seed=61), rand(12, 9, seed=62)
    t = 0.3
    ad, bd = a.double().flatten(), b.double().flatten()
    omega = torch.acos(torch.dot(ad / ad.norm(), bd / bd.norm()))
    ref = (torch.sin((1 - t) * omega) * ad + torch.sin(t * omega) * bd) / torch.sin(omega)
    torch.testing.assert_close(M.slerp(a, b, t), ref.view(12, 9).float())
    torch.testing.assert_close(M.slerp(a, b, 0.0), a)
    torch.testing.assert_close(M.slerp(a, b, 1.0), b, atol=1e-6, rtol=1e-5)
    # nearly colinear (|cos| > 0.9995, mergekit's threshold): plain lerp, no 0/0
    c = 2 * a + 1e-4 * b
    torch.testing.assert_close(M.slerp(a, c, 0.25), 0.75 * a + 0.25 * c)
    torch.testing.assert_close(M.slerp(a, -a, 0.5), torch.zeros_like(a))  # opposite: lerp too


# ---------------------------------------------------------------------------- 2. adapters vs folded checkpoints

def two_model_cfg(method, base, models):
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}]
    if method == "linear":
        params = [{"weight": 0.25}, {"weight": 0.75}]
    cfg = {"merge_method": method, "base_model": base, "dtype": "float32",
           "models": [{"model": m, "parameters": p} for m, p in zip(models, params)],
           "parameters": {"lambda": 0.8} if method not in ("linear", "slerp") else {}}
    if method == "slerp":
        cfg["models"] = [{"model": base}, {"model": models[0]}]
        cfg["parameters"] = {"t": [0.2, 0.6]}  # a gradient over the layers, as mergekit reads it
    return cfg


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"])
def test_adapter_inputs_equal_folded_checkpoints(world, tmp_path, method):
    rc1, out_a = run_cli(tmp_path, two_model_cfg(method, world["base"], world["a"]), "from_adapters")
    rc2, out_f = run_cli(tmp_path, two_model_cfg(method, world["base"], world["f"]), "from_full")
    assert rc1 == rc2 == 0
    sa, sf = tensors_of(out_a), tensors_of(out_f)
    assert sa.keys() == sf.keys()
    for k in sa:
        assert torch.equal(sa[k], sf[k]), k  # dyadic weights: bit-identical
    base = load_file(os.path.join(world["base"], "model.safetensors"))
    changed = [k for k in sa if not torch.equal(sa[k], base[k])]
    assert changed and all(("self_attn" in k or "mlp" in k) for k in changed)


def test_dare_order_independent_and_reproducible(world, tmp_path):
    # the same base stored as two shards in reversed tensor order
    base = load_file(os.path.join(world["base"], "model.safetensors"))
    shuffled = tmp_path / "base_sharded"
    shuffled.mkdir()
    names = sorted(base, reverse=True)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ns in halves.items():
        save_file({n: base[n] for n in ns}, str(shuffled / f), metadata={"format": "pt"})
    (shuffled / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in halves.items() for n in ns}}))
    (shuffled / "config.json").write_text(open(os.path.join(world["base"], "config.json")).read())
    outs = []
    for i, b in enumerate([world["base"], world["base"], str(shuffled)]):
        rc, out = run_cli(tmp_path, two_model_cfg("dare_ties", b, world["a"]), f"dare{i}", extra=["--seed", "3"])
        assert rc == 0
        outs.append(tensors_of(out))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]) and torch.equal(outs[0][k], outs[2][k]), k
    rc, out = run_cli(tmp_path, two_model_cfg("dare_ties", world["base"], world["a"]), "dare_seed4",
                      extra=["--seed", "4"])
    other = tensors_of(out)
    assert any(not torch.equal(other[k], outs[0][k]) for k in other)


# ---------------------------------------------------------------------------- 3. the written model

def test_output_loads_with_expected_logits(world, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": world["base"], "dtype": "float32",
           "models": [{"model": world["f"][0], "parameters": {"weight": 1.0}},
                      {"model": world["f"][1], "parameters": {"weight": 0.5}}],
           "parameters": {"lambda": 0.6}}
    rc, out = run_cli(tmp_path, cfg)
    assert rc == 0
    assert sorted(os.listdir(out)) == ["chat_template.jinja", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # the expected model, its weights set by hand
    expected, _ = tiny(world["base"])
    f1, f2 = (load_file(os.path.join(f, "model.safetensors")) for f in world["f"])
    with torch.no_grad():
        for k, p in expected.named_parameters():
            p.copy_(p + 0.6 * ((f1[k] - p) + 0.5 * (f2[k] - p)))
    torch.testing.assert_close(logits(merged), logits(expected), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(merged), logits(tiny(world["base"])[0]), atol=1e-3)


def test_bf16_sharded_output_loads(world, tmp_path, monkeypatch):
    monkeypatch.setattr(write, "SHARD_BYTES", 60_000)  # force several shards and an index
    cfg = two_model_cfg("ties", world["base"], world["a"])
    cfg["dtype"] = "bfloat16"
    rc, out = run_cli(tmp_path, cfg)
    assert rc == 0
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) > 3 and os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # Independent reference: the same merge written in float32 (one shard), rounded once to bf16 here.
    # The bf16 output must be exactly that: fp32 math, one rounding at the end, no shard lost or mixed up.
    cfg32 = {**cfg, "dtype": "float32"}
    monkeypatch.setattr(write, "SHARD_BYTES", 10**12)
    rc32, out32 = run_cli(tmp_path, cfg32, "out32")
    assert rc32 == 0
    ref = {k: v.bfloat16().float() for k, v in tensors_of(out32).items()}
    got = merged.state_dict()
    assert set(ref) <= set(got) and len(ref) > 3
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    with safe_open(os.path.join(out, shards[0]), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def test_tied_embeddings(world, tmp_path):
    """A tied base stores no lm_head: the output stays tied unless an adapter targets lm_head."""
    base = load_file(os.path.join(world["base"], "model.safetensors"))
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file({k: v for k, v in base.items() if k != "lm_head.weight"}, str(tied / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.load(open(os.path.join(world["base"], "config.json")))
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tied / f).write_text(open(os.path.join(world["base"], f)).read())
    a_head = make_adapter(str(tied), str(tmp_path / "a_head"), ["lm_head", "q_proj"], seed=9)
    # adapters that leave lm_head alone: tied output, no lm_head tensor
    rc, out = run_cli(tmp_path, two_model_cfg("ties", str(tied), world["a"]), "still_tied")
    assert rc == 0 and "lm_head.weight" not in tensors_of(out)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    # an adapter on lm_head unties it: lm_head = embedding + λ·s·B A, the embedding unchanged
    cfg = {"merge_method": "task_arithmetic", "base_model": str(tied), "dtype": "float32",
           "models": [{"model": a_head, "parameters": {"weight": 1.0}}]}
    rc, out = run_cli(tmp_path, cfg, "untied")
    assert rc == 0
    sd = tensors_of(out)
    ad = load_file(os.path.join(a_head, "adapter_model.safetensors"))
    delta = 2.0 * ad["base_model.model.lm_head.lora_B.weight"] @ ad["base_model.model.lm_head.lora_A.weight"]
    torch.testing.assert_close(sd["lm_head.weight"], base["model.embed_tokens.weight"] + delta)
    assert torch.equal(sd["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    m = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(m.lm_head.weight, sd["lm_head.weight"])


# ---------------------------------------------------------------------------- 4. --as-adapter

@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_as_adapter_is_exact(tmp_path, method):
    """Adapters on builtin:tiny-llama (resolved by engine.models): the concatenated adapter on the
    base gives the logits of the merged full model."""
    root = tmp_path
    a1 = make_adapter("builtin:tiny-llama", str(root / "a1"), ["q_proj", "v_proj"], seed=3)
    a2 = make_adapter("builtin:tiny-llama", str(root / "a2"), ["v_proj", "gate_proj"], seed=4, r=2, alpha=4,
                      rslora=True)
    cfg = {"merge_method": method, "base_model": "builtin:tiny-llama", "dtype": "float32",
           "models": [{"model": a1, "parameters": {"weight": 1.0}}, {"model": a2, "parameters": {"weight": -0.5}}],
           "parameters": {"lambda": 0.7} if method == "task_arithmetic" else {}}
    if method == "linear":
        cfg["models"][1]["parameters"]["weight"] = 0.5
    rc, full = run_cli(tmp_path, cfg, "full")
    rc2, adapter = run_cli(tmp_path, cfg, "adapter", extra=["--as-adapter"])
    assert rc == rc2 == 0
    acfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert acfg["r"] == acfg["lora_alpha"] == 6 and acfg["peft_type"] == "LORA"
    merged = AutoModelForCausalLM.from_pretrained(full).eval()
    model, _ = tiny()
    load_adapter(model, adapter)  # engine.lora reads it (peft's format)
    assert (logits(merged) - logits(model)).abs().max().item() < 1e-5
    assert (logits(merged) - logits(tiny()[0])).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------- 5. bad input

def _shape_mismatch(world, tmp_path):
    sd = load_file(os.path.join(world["f"][0], "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.1.self_attn.q_proj.weight"][:, :32].contiguous()
    d = tmp_path / "bad_shape"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    return str(d)


def _missing_tensor(world, tmp_path):
    sd = load_file(os.path.join(world["f"][0], "model.safetensors"))
    del sd["model.layers.0.mlp.up_proj.weight"]
    d = tmp_path / "missing"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    return str(d)


def _foreign_adapter(world, tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                       "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.ones(2, 64),
               "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)},
              str(d / "adapter_model.safetensors"))
    return str(d)


def _wrong_size_adapter(world, tmp_path):
    d = tmp_path / "wrong_size"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                       "target_modules": ["q_proj"]}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 96),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(64, 2)},
              str(d / "adapter_model.safetensors"))
    return str(d)


BAD = {
    "shape": (lambda w, p: {"models": [{"model": _shape_mismatch(w, p), "parameters": {"weight": 1.0}}]},
              ["bad_shape", "model.layers.1.self_attn.q_proj.weight"]),
    "missing_tensor": (lambda w, p: {"models": [{"model": _missing_tensor(w, p), "parameters": {"weight": 1.0}}]},
                       ["missing", "model.layers.0.mlp.up_proj.weight"]),
    "adapter_not_in_base": (lambda w, p: {"models": [{"model": _foreign_adapter(w, p),
                                                      "parameters": {"weight": 1.0}}]},
                            ["foreign", "model.layers.7.self_attn.q_proj.weight"]),
    "adapter_wrong_size": (lambda w, p: {"models": [{"model": _wrong_size_adapter(w, p),
                                                     "parameters": {"weight": 1.0}}]},
                           ["wrong_size", "model.layers.0.self_attn.q_proj.weight"]),
    "density_zero": (lambda w, p: {"models": [{"model": w["a"][0], "parameters": {"weight": 1.0, "density": 0}}]},
                     ["models[0]", "density"]),
    "density_above_one": (lambda w, p: {"parameters": {"density": [0.5, 1.5]}}, ["parameters", "density"]),
    "slerp_three": (lambda w, p: {"merge_method": "slerp", "parameters": {"t": 0.5},
                                  "models": [{"model": m} for m in [w["base"], *w["a"]]]}, ["slerp", "two"]),
    "unknown_method": (lambda w, p: {"merge_method": "frankenmerge"}, ["frankenmerge"]),
    "unknown_key": (lambda w, p: {"tokenizer_source": "union"}, ["tokenizer_source"]),
    "unknown_param": (lambda w, p: {"parameters": {"gamma": 0.1}}, ["gamma"]),
    "missing_model": (lambda w, p: {"models": [{"model": str(p / "nope"), "parameters": {"weight": 1.0}}]},
                      ["models[0]", "nope"]),
    "missing_weight": (lambda w, p: {"models": [{"model": w["a"][0], "parameters": {"density": 0.5}}]},
                       ["models[0]", "weight"]),
    "missing_t": (lambda w, p: {"merge_method": "slerp", "models": [{"model": w["a"][0]}]}, ["parameters", "'t'"]),
    "missing_base": (lambda w, p: {"base_model": str(p / "no_base")}, ["base_model", "no_base"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(world, tmp_path, capsys, case):
    make, words = BAD[case]
    cfg = {"merge_method": "ties", "base_model": world["base"],
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in world["a"]]}
    cfg.update(make(world, tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    before = set(os.listdir(tmp_path))
    rc = cli.main([write_yaml(tmp_path / "c.yaml", cfg), "--out", str(work / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert os.listdir(work) == []  # no output, no temp dirs left
    assert set(os.listdir(tmp_path)) == before | {"c.yaml"}


def test_failure_midway_leaves_nothing(world, tmp_path, monkeypatch):
    calls = []

    def boom(plan, name, seed):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return torch.zeros(plan.reference.shape(name))
    monkeypatch.setattr(write, "merge_tensor", boom)
    with pytest.raises(RuntimeError):
        run_cli(tmp_path, two_model_cfg("ties", world["base"], world["a"]))
    assert not [p for p in os.listdir(tmp_path) if not p.endswith(".yaml")]
    with pytest.raises(SystemExit):  # the config file itself missing
        cli.main(["--out", str(tmp_path / "x")])


def test_missing_config_and_existing_out(tmp_path, capsys, world):
    assert cli.main([str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "none.yaml" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    rc, _ = run_cli(tmp_path, two_model_cfg("ties", world["base"], world["a"]), "taken")
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc, _ = run_cli(tmp_path, two_model_cfg("ties", world["base"], world["a"]), "as_ad", extra=["--as-adapter"])
    assert rc == 2 and "--as-adapter" in capsys.readouterr().err


# ---------------------------------------------------------------------------- 6. sparsity

def test_sparsity_of_constructed_adapter(tmp_path, capsys):
    """q: half of B's rows zero -> δ half zero; v: B zero -> all zero; mean over layers 0.75."""
    d = tmp_path / "sparse_adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                       "target_modules": ["q_proj", "v_proj"]}))
    A = torch.full((2, 64), 0.25)
    Bq = torch.full((64, 2), 0.5)
    Bq[::2] = 0
    pre = "base_model.model.model.layers.0.self_attn."
    save_file({pre + "q_proj.lora_A.weight": A, pre + "q_proj.lora_B.weight": Bq,
               pre + "v_proj.lora_A.weight": torch.full((2, 64), 0.25),
               pre + "v_proj.lora_B.weight": torch.zeros(32, 2)}, str(d / "adapter_model.safetensors"))
    out = tmp_path / "report"
    assert sparsity.main([str(d), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "75.00%" in table and "q_proj" in table
    res = json.load(open(out / "sparsity.json"))
    assert res["mean_sparsity"] == pytest.approx(0.75)
    assert [r["sparsity"] for r in res["layers"]] == [pytest.approx(0.5), pytest.approx(1.0)]
    # the non-zero entries are s·(0.5·0.25·2) = 0.5: all in the log10 bin at -0.3
    counts, edges = res["histogram"]["counts"], res["histogram"]["log10_edges"]
    (i,) = [j for j, c in enumerate(counts) if c]
    assert counts[i] == 32 * 64 and edges[i] <= math.log10(0.5) < edges[i + 1]
    assert res["histogram"]["exact_zeros"] == 32 * 64 + 32 * 64
    assert open(out / "sparsity_hist.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_sparsity_of_full_model_against_base(world, tmp_path, capsys):
    assert sparsity.main([world["f"][0], "--out", str(tmp_path / "r")]) == 2  # needs --base
    assert "--base" in capsys.readouterr().err
    assert sparsity.main([world["f"][0], "--base", world["base"], "--out", str(tmp_path / "r")]) == 0
    res = json.load(open(tmp_path / "r" / "sparsity.json"))
    by_name = {r["name"]: r["sparsity"] for r in res["layers"]}
    assert by_name["model.embed_tokens.weight"] == 1.0  # untouched by the adapter
    assert by_name["model.layers.0.self_attn.q_proj.weight"] < 1.0
    # the same adapter measured directly gives the same per-layer values for the layers it touches
    direct = sparsity.measure(world["a"][0])
    for r in direct["layers"]:
        assert r["sparsity"] == pytest.approx(by_name[r["name"]])


def test_cli_leaves_grad_mode_alone(tmp_path):
    # main() runs in-process in tests and tools: a leaked torch.set_grad_enabled(False) broke later training.
    import merge.__main__ as merge_cli
    import merge.sparsity as sparsity_cli
    assert torch.is_grad_enabled()
    merge_cli.main([str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    sparsity_cli.main([str(tmp_path / "missing")])
    assert torch.is_grad_enabled()


def _slerp_float64(a: torch.Tensor, b: torch.Tensor, t: float, threshold: float = 0.9995) -> torch.Tensor:
    """mergekit's SLERP written out independently of merge.methods, in float64 numpy:
    normalise copies to measure the angle, lerp when |cos| > 0.9995, else combine the
    unnormalised tensors with sin((1-t)θ)/sin θ and sin(tθ)/sin θ."""
    import numpy as np
    v0, v1 = a.double().numpy().ravel(), b.double().numpy().ravel()
    dot = float(np.clip(np.dot(v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)), -1.0, 1.0))
    if abs(dot) > threshold:
        out = (1 - t) * v0 + t * v1
    else:
        theta = np.arccos(dot)
        out = np.sin((1 - t) * theta) / np.sin(theta) * v0 + np.sin(t * theta) / np.sin(theta) * v1
    return torch.from_numpy(out.reshape(a.shape))


def test_slerp_between_two_adapters_of_the_base(world, tmp_path):
    # Thakkar et al. 2024 SLERP an SFT and a DPO model of one base: base_model + two others, the
    # first at t = 0 and the second at t = 1; from adapters it equals slerp of the folded checkpoints.
    cfg = {"merge_method": "slerp", "base_model": world["base"], "dtype": "float32", "parameters": {"t": 0.3},
           "models": [{"model": m} for m in world["a"]]}
    rc, out = run_cli(tmp_path, cfg, "slerp2")
    assert rc == 0
    merged = tensors_of(out)
    f1, f2 = (load_file(os.path.join(f, "model.safetensors")) for f in world["f"])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.layers.0.mlp.down_proj.weight"):
        torch.testing.assert_close(merged[name], _slerp_float64(f1[name], f2[name], 0.3).float(),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], f1["model.layers.0.self_attn.q_proj.weight"])


def test_sparsity_of_full_model_on_the_layers_of_an_adapter(world, tmp_path):
    # --layers-of: only the weights the adapter adapts, so a merged model compares with its adapters.
    res = sparsity.measure(world["f"][0], base=world["base"], layers_of=world["a"][0])
    direct = sparsity.measure(world["a"][0])
    assert [r["name"] for r in res["layers"]] == [r["name"] for r in direct["layers"]]
    assert res["mean_sparsity"] == pytest.approx(direct["mean_sparsity"])
    everything = sparsity.measure(world["f"][0], base=world["base"])
    assert everything["mean_sparsity"] > res["mean_sparsity"]  # untouched tensors count as sparse there
    assert sparsity.main([world["f"][0], "--base", world["base"], "--layers-of", world["base"],
                          "--out", str(tmp_path / "x")]) == 2  # not an adapter


def test_hub_id_that_is_not_available_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": "no-such-org/no-such-model", "parameters": {"weight": 1.0}}]}
    rc, _ = run_cli(tmp_path, cfg, "hub")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "no-such-org/no-such-model" in err[0] and "hub" in err[0]
