"""engine.losses: DPO family and ORPO against their formulas (float64) and TRL's code; chunked
sequence log-probs against full logits; the reference model; the pair-batch forward."""
import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

import engine.losses as losses
from engine.lora import apply_lora
from engine.losses import (dpo_loss, orpo_loss, preference_forward, reference_logps, sequence_logps,
                           sft_loss_sum, uses_mean_logps)
from engine.recipe import LoRAConfig

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
V = LLAMA["vocab_size"]


# --------------------------------------------------------------------------- helpers

def make_model(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, **overrides}))


def make_batch(lengths, prompt_lens, T: int, seed: int = 1, holes: bool = True) -> dict:
    """Right-padded rows as engine.data.batches builds them: row b has lengths[b] real tokens,
    the first prompt_lens[b] of them untrained; some answer tokens are also masked (holes)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    input_ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.full((B, T), -100, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, (n, p) in enumerate(zip(lengths, prompt_lens)):
        attention_mask[b, :n] = 1
        position_ids[b, :n] = torch.arange(n)
        position_ids[b, n:] = torch.arange(T - n)
        labels[b, p:n] = input_ids[b, p:n]
        if holes and n - p > 3:
            labels[b, p + 1] = -100  # a masked token inside the answer
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "position_ids": position_ids}


def full_logits_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive reference: every position's (B, T, V) logits, log_softmax, gather, masked sum."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits  # (B, T, V)
    logp = logits[:, :-1].float().log_softmax(-1)                                # (B, T-1, V)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)    # (B, T-1)
    return (picked * mask).sum(1), mask.sum(1)


def rand_logps(n: int, seed: int, low: float = 5.0, high: float = 60.0) -> torch.Tensor:
    """Summed sequence log-probs, fp32, like −U(low, high)."""
    g = torch.Generator().manual_seed(seed)
    return -(low + (high - low) * torch.rand(n, generator=g))


def np_logsigmoid(x):
    return -np.logaddexp(0.0, -x)  # log σ(x) = −log(1 + e^{−x}), stable in float64


def dpo_reference_f64(pc, pr, rc, rr, beta, loss_type, eps):
    """The four losses written out from the papers, float64 numpy."""
    pc, pr, rc, rr = (np.asarray(t.numpy(), dtype=np.float64) for t in (pc, pr, rc, rr))
    d = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        loss = -(1 - eps) * np_logsigmoid(beta * d) - eps * np_logsigmoid(-beta * d)
    elif loss_type == "robust":
        loss = (-(1 - eps) * np_logsigmoid(beta * d) + eps * np_logsigmoid(-beta * d)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = np.maximum(0.0, 1 - beta * d)
    elif loss_type == "ipo":
        loss = (d - 1 / (2 * beta)) ** 2
    return loss, beta * (pc - rc), beta * (pr - rr)


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("robust", 0.0), ("robust", 0.1),
         ("robust", 0.3), ("hinge", 0.0), ("ipo", 0.0)]


# --------------------------------------------------------------------------- DPO vs the formulas

@pytest.mark.parametrize("loss_type,eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_float64_formula(loss_type, eps, beta):
    B = 64
    pc, pr, rc, rr = (rand_logps(B, s) for s in range(4))
    if uses_mean_logps(loss_type):  # ipo takes per-token means
        pc, pr, rc, rr = (t / 17 for t in (pc, pr, rc, rr))
    pc.requires_grad_(True)
    got, cr, rj = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    want, want_cr, want_rj = dpo_reference_f64(pc.detach(), pr, rc, rr, beta, loss_type, eps)
    assert got.shape == (B,) and got.dtype == torch.float32
    # fp32 against float64: the margins are differences of numbers up to ~60, each rounded to ~4e-6.
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cr.numpy(), want_cr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rj.numpy(), want_rj, rtol=1e-5, atol=1e-6)
    assert not cr.requires_grad and not rj.requires_grad  # rewards are for logging only
    assert got.requires_grad
    if loss_type == "hinge":
        assert (want == 0).any() and (want > 0).any()  # both sides of the hinge are exercised


def test_dpo_sign_and_special_cases():
    pc, pr, rc, rr = (rand_logps(32, s) for s in range(4))
    # robust with ε = 0 is plain DPO; sigmoid's ε is a real change
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.1, "robust")[0], dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid")[0])
    assert not torch.allclose(dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.2)[0], dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid")[0])
    # raising the chosen log-prob lowers the loss (the gradient pushes π(y⁺) up)
    p = pc.clone().requires_grad_(True)
    dpo_loss(p, pr, rc, rr, 0.1, "sigmoid")[0].sum().backward()
    assert (p.grad < 0).all()
    # bf16 inputs are computed in fp32
    out = dpo_loss(pc.bfloat16(), pr.bfloat16(), rc.bfloat16(), rr.bfloat16(), 0.1, "sigmoid")[0]
    assert out.dtype == torch.float32
    assert uses_mean_logps("ipo") and not uses_mean_logps("sigmoid")
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, 0.1, "kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, 0.1, "robust", 0.5)


# --------------------------------------------------------------------------- DPO vs TRL's code

class _IdentityAccelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


@pytest.fixture(scope="module")
def trl_dpo():
    trl = pytest.importorskip("trl")
    return trl.DPOTrainer


def trl_dpo_row(DPOTrainer, pc, pr, rc, rr, n_c, n_r, beta, loss_type, eps):
    """Run TRL's own DPOTrainer._compute_loss for one pair, on a stand-in trainer and a fake model.

    The fake model returns per-token log-probs whose sum over the completion is the given sequence
    log-prob; reference log-probs come in precomputed (TRL's precompute_ref_log_probs path), so
    no network is involved. TRL divides by the completion lengths itself for IPO.
    """
    T = max(n_c, n_r) + 2
    completion_mask = torch.zeros((2, T), dtype=torch.long)
    completion_mask[0, 1:1 + n_c] = 1
    completion_mask[1, 1:1 + n_r] = 1
    log_probs = torch.zeros((2, T - 1))
    log_probs[0, 0], log_probs[1, 0] = pc, pr  # summed over the sequence by TRL

    def fake_model(**kwargs):
        z = torch.zeros((2, T - 1))
        return SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z, is_top1=z.bool())

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=_IdentityAccelerator(), beta=beta,
        label_smoothing=eps, loss_types=[loss_type], loss_weights=[1.0], f_divergence_type="reverse_kl",
        ld_alpha=None, use_weighting=False, aux_loss_enabled=False, precompute_ref_logps=True,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros((2, T), dtype=torch.long), "attention_mask": torch.ones((2, T), dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": rc.reshape(1), "ref_rejected_logps": rr.reshape(1)}
    loss = DPOTrainer._compute_loss(trainer, fake_model, inputs, return_outputs=False)
    m = trainer._metrics["eval"]
    return float(loss), m["rewards/chosen"][0], m["rewards/rejected"][0]


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.0), ("robust", 0.1), ("robust", 0.3),
                                           ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_matches_trl(trl_dpo, loss_type, eps):
    beta, B = 0.1, 12
    pc, pr, rc, rr = (rand_logps(B, s + 10) for s in range(4))
    g = torch.Generator().manual_seed(5)
    n_c, n_r = torch.randint(1, 30, (B,), generator=g), torch.randint(1, 30, (B,), generator=g)
    if uses_mean_logps(loss_type):
        ours = dpo_loss(pc / n_c, pr / n_r, rc / n_c, rr / n_r, beta, loss_type, eps)
    else:
        ours = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    for i in range(B):
        loss, r_c, r_r = trl_dpo_row(trl_dpo, pc[i], pr[i], rc[i], rr[i], int(n_c[i]), int(n_r[i]), beta, loss_type, eps)
        assert ours[0][i].item() == pytest.approx(loss, rel=1e-5, abs=1e-6), i
        if not uses_mean_logps(loss_type):  # for ipo our rewards are on the means we were given
            assert ours[1][i].item() == pytest.approx(r_c, rel=1e-5, abs=1e-6)
            assert ours[2][i].item() == pytest.approx(r_r, rel=1e-5, abs=1e-6)


def test_trl_sigmoid_ignores_label_smoothing_we_do_not(trl_dpo):
    """The one documented difference: TRL 1.16's sigmoid loss has no ε; ours is cDPO for ε > 0."""
    pc, pr, rc, rr = (rand_logps(1, s + 20) for s in range(4))
    trl_smoothed, _, _ = trl_dpo_row(trl_dpo, pc[0], pr[0], rc[0], rr[0], 3, 4, 0.1, "sigmoid", 0.2)
    trl_plain, _, _ = trl_dpo_row(trl_dpo, pc[0], pr[0], rc[0], rr[0], 3, 4, 0.1, "sigmoid", 0.0)
    assert trl_smoothed == trl_plain
    assert dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.0)[0].item() == pytest.approx(trl_plain, rel=1e-6)
    assert dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.2)[0].item() != pytest.approx(trl_plain, rel=1e-3)


# --------------------------------------------------------------------------- ORPO

ORPO_CHOSEN = [-1e-5, -1e-3, -0.05, -0.5, -0.69, -0.7, -1.5, -4.0, -20.0]
ORPO_REJECTED = [-1e-4, -0.3, -2e-3, -0.8, -0.7, -0.69, -3.0, -1.0, -25.0]


def test_orpo_matches_float64_formula():
    # Both sides of log1mexp's switch at −ln 2, and very near 0 (a confidently memorised answer), where
    # fp32 log1p(−exp(l)) alone loses most digits to the cancellation in 1 − e^l.
    lc = torch.tensor(ORPO_CHOSEN)
    lr = torch.tensor(ORPO_REJECTED)
    nll = torch.tensor(0.83)
    lam = 0.25
    loss, log_odds, ratio = orpo_loss(lc, lr, nll, lam)
    # Hong et al. 2024, eqs. 4 and 7, literally: odds = P / (1 − P) with P = exp(mean log-prob)
    Pc, Pr = np.exp(lc.numpy().astype(np.float64)), np.exp(lr.numpy().astype(np.float64))
    want_log_odds = np.log((Pc / (1 - Pc)) / (Pr / (1 - Pr)))
    want_ratio = np.log(1 / (1 + np.exp(-want_log_odds)))
    want_loss = float(nll.double()) - lam * want_ratio.mean()
    np.testing.assert_allclose(log_odds.numpy(), want_log_odds, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ratio.numpy(), want_ratio, rtol=1e-5, atol=1e-6)
    assert loss.shape == () and loss.item() == pytest.approx(want_loss, rel=1e-6)
    # the gradient raises the chosen answer and lowers the rejected one
    lc2, lr2 = lc.clone().requires_grad_(True), lr.clone().requires_grad_(True)
    orpo_loss(lc2, lr2, nll, lam)[0].backward()
    assert (lc2.grad < 0).all() and (lr2.grad > 0).all()


def test_orpo_matches_trl():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    lc, lr = torch.tensor(ORPO_CHOSEN), torch.tensor(ORPO_REJECTED)
    nll, lam = torch.tensor(1.7), 0.1
    stand_in = SimpleNamespace(beta=lam, accelerator=_IdentityAccelerator())  # TRL calls λ "beta"
    trl_losses, _, _, trl_ratio_mean, trl_log_odds_mean = orpo.ORPOTrainer.odds_ratio_loss(stand_in, lc, lr)
    trl_loss = nll - trl_losses.mean()  # get_batch_loss_metrics: loss = policy_nll_loss - losses.mean()
    loss, log_odds, ratio = orpo_loss(lc, lr, nll, lam)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert log_odds.mean().item() == pytest.approx(trl_log_odds_mean.item(), rel=1e-5)
    assert ratio.mean().item() == pytest.approx(trl_ratio_mean.item(), rel=1e-5)
    torch.testing.assert_close(ratio * lam, trl_losses)


# --------------------------------------------------------------------------- chunked log-probs

def test_sequence_logps_chunked_equals_full_logits(monkeypatch):
    model = make_model()
    batch = make_batch(lengths=[12, 9, 5], prompt_lens=[4, 2, 3], T=12)
    calls = {"n": 0}
    real_checkpoint = losses.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls["n"] += 1
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(losses, "LOGITS_CHUNK", 7)
    monkeypatch.setattr(losses, "checkpoint", counting_checkpoint)

    logps, n_tok = sequence_logps(model, losses.hidden_states(model, batch), batch["labels"])
    want, want_n = full_logits_logps(model, batch)
    assert n_tok.dtype == torch.long and n_tok.tolist() == want_n.tolist() == [7, 6, 2]
    assert calls["n"] == math.ceil(15 / 7) and calls["n"] >= 2  # several checkpointed chunks ran
    torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)
    assert (logps < 0).all()

    # Gradients of the same weighted sum through both paths, for every parameter.
    w = torch.tensor([0.3, -1.2, 2.0])
    grads = torch.autograd.grad((logps * w).sum(), list(model.parameters()))
    model.zero_grad()
    logps2, _ = sequence_logps(model, losses.hidden_states(model, batch), batch["labels"])
    want2, _ = full_logits_logps(model, batch)
    want_grads = torch.autograd.grad((want2 * w).sum(), list(model.parameters()))
    for (name, _), g, wg in zip(model.named_parameters(), grads, want_grads):
        assert wg.abs().max() > 0, name
        torch.testing.assert_close(g, wg, rtol=1e-5, atol=1e-5, msg=name)


def test_token_nll_sum_is_minus_sum_of_sequence_logps(monkeypatch):
    model = make_model()
    batch = make_batch(lengths=[12, 10], prompt_lens=[3, 5], T=12)
    monkeypatch.setattr(losses, "LOGITS_CHUNK", 4)
    nll, n = sft_loss_sum(model, batch)
    logps, n_tok = sequence_logps(model, losses.hidden_states(model, batch), batch["labels"])
    assert n == int(n_tok.sum())
    torch.testing.assert_close(nll, -logps.sum())
    want, _ = full_logits_logps(model, batch)
    torch.testing.assert_close(nll, -want.sum(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- pair batches and the reference

def pair_batch(B: int = 3, T: int = 14) -> dict:
    """2B rows: B chosen answers, then B rejected ones to the same prompts."""
    prompt = [3, 4, 2][:B]
    chosen = make_batch([14, 11, 8][:B], prompt, T, seed=3)
    rejected = make_batch([9, 14, 6][:B], prompt, T, seed=4)
    rejected["input_ids"][:, :max(prompt)] = chosen["input_ids"][:, :max(prompt)]  # shared prompts
    rejected["labels"] = torch.where(rejected["labels"] != -100, rejected["input_ids"], -100)
    return {k: torch.cat([chosen[k], rejected[k]]) for k in chosen}


def test_preference_forward_chosen_nll_equals_sft_loss_on_chosen_half(monkeypatch):
    monkeypatch.setattr(losses, "LOGITS_CHUNK", 5)
    model = make_model()
    batch = pair_batch()
    out = preference_forward(model, batch, n_pairs=3)
    assert out["logps"].shape == (6,) and out["n_tokens"].shape == (6,)
    chosen_half = {k: v[:3] for k, v in batch.items()}
    nll, n = sft_loss_sum(model, chosen_half)
    assert out["chosen_tokens"] == n == int(out["n_tokens"][:3].sum())
    torch.testing.assert_close(out["chosen_nll_sum"], nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["chosen_nll_sum"], -out["logps"][:3].sum(), rtol=1e-6, atol=1e-5)
    want, want_n = full_logits_logps(model, batch)
    torch.testing.assert_close(out["logps"], want, rtol=1e-5, atol=1e-5)
    assert out["n_tokens"].tolist() == want_n.tolist()
    # the NLL term is differentiable (RPO / ORPO train through it)
    out["chosen_nll_sum"].backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_preference_forward_errors():
    model = make_model()
    batch = pair_batch()
    with pytest.raises(ValueError, match="2 \\* n_pairs"):
        preference_forward(model, batch, n_pairs=2)
    batch["labels"][4] = -100  # an empty rejected answer
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        preference_forward(model, batch, n_pairs=3)


def test_lora_at_init_dpo_loss_is_ln2_and_rewards_zero():
    """B = 0 at init, so the policy is the base model = the reference: Δ = 0, loss = −log σ(0) = ln 2."""
    model = make_model()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), seed=0)
    model.train()
    batch = pair_batch()
    out = preference_forward(model, batch, n_pairs=3)
    ref = reference_logps(model, batch, n_pairs=3)
    assert not ref.requires_grad and out["logps"].requires_grad
    pol = out["logps"]
    loss, cr, rj = dpo_loss(pol[:3], pol[3:], ref[:3], ref[3:], beta=0.1, loss_type="sigmoid")
    assert torch.all((loss - math.log(2)).abs() < 1e-6), loss
    assert torch.equal(cr, torch.zeros(3)) and torch.equal(rj, torch.zeros(3))
    # and the loss has a gradient into the adapter (through A·B, B gets it first)
    loss.mean().backward()
    lora_B = [p for n, p in model.named_parameters() if n.endswith("lora_B.weight")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_B)


def test_reference_is_the_base_model_without_dropout_and_mode_is_restored():
    base = make_model(attention_dropout=0.5)  # dropout that eval mode must switch off
    model = copy.deepcopy(base)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.3, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():  # a trained adapter: B ≠ 0, so the policy differs from the reference
        for n, p in model.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.5)
    batch = pair_batch()
    model.train()
    model.model.layers[0].mlp.eval()  # a module deliberately in eval mode must stay so
    ref1 = reference_logps(model, batch, n_pairs=3)
    ref2 = reference_logps(model, batch, n_pairs=3)
    assert torch.equal(ref1, ref2)  # no dropout noise
    assert model.training and model.model.layers[1].self_attn.training
    assert not model.model.layers[0].mlp.training
    assert not any(m.disabled for m in model.modules() if hasattr(m, "disabled"))  # adapters back on
    base.eval()
    with torch.no_grad():
        want, _ = full_logits_logps(base, batch)
    torch.testing.assert_close(ref1, want, rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        policy = preference_forward(model, batch, n_pairs=3)["logps"]
    assert (policy - ref1).abs().max() > 1e-3  # the adapter does change the policy
