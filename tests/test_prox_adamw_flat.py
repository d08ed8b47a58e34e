"""ProxAdamW over one flat buffer (paft_kernels.prox_adamw): the parameters and gradients really are
views of two flat buffers, and stay views through backward, clipping, zero_grad and checkpoint
loading; one step equals torch.optim.AdamW; the engine builds it by default.

Fresh random inputs each run (the seed is in every failure message). The Triton route of the
same optimizer is checked under the interpreter in tests/test_kernel_prox_l1.py.
"""
from __future__ import annotations

import random

import pytest
import torch

from engine.distributed import _one_buffer
from engine.optim import build_optimizer
from engine.recipe import TrainConfig
from paft_kernels import prox_adamw as pak
from paft_kernels.prox_adamw import ProxAdamW, flatten_params_, is_view_of

SEED = random.SystemRandom().randrange(2 ** 31)
SHAPES = [(16, 45), (37, 16), (3, 7), (1, 1), (16, 130)]  # LoRA-like factors and odd ones


def make(shapes, g, scale=1.0):
    return [torch.nn.Parameter(torch.randn(s, generator=g) * scale) for s in shapes]


def test_flatten_makes_views_and_keeps_values():
    g = torch.Generator().manual_seed(SEED)
    ps = make(SHAPES, g)
    values = [p.detach().clone() for p in ps]
    ps[1].grad = torch.randn(ps[1].shape, generator=g)
    grad1 = ps[1].grad.clone()
    flat_p, flat_g = flatten_params_(ps)
    n = sum(v.numel() for v in values)
    assert flat_p.numel() == -(-n // pak.PAD) * pak.PAD and flat_p.is_contiguous()
    assert (flat_p[n:] == 0).all() and (flat_g[n:] == 0).all()  # the padding tail
    offset = 0
    for p, v in zip(ps, values):
        assert torch.equal(p, v) and is_view_of(p.data, flat_p) and is_view_of(p.grad, flat_g)
        assert p.data_ptr() == flat_p.data_ptr() + 4 * offset  # in list order, back to back
        offset += p.numel()
    assert torch.equal(ps[1].grad, grad1) and (ps[0].grad == 0).all()
    assert _one_buffer([p.grad for p in ps]).data_ptr() == flat_g.data_ptr()
    assert _one_buffer([ps[1].grad, ps[0].grad]) is None  # not in order: not one buffer
    with pytest.raises(ValueError, match="one dtype"):
        flatten_params_([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))])


def _adamw_pair(shapes, g, **kw):
    ps = make(shapes, g)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = ProxAdamW(ps, backend="torch", l1=0.0, **kw)
    ref = torch.optim.AdamW(qs, foreach=False, **kw)
    return ps, qs, ours, ref


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_flat_step_equals_adamw_bitwise(wd):
    """l1 = 0, torch route: the op sequence of AdamW(foreach=False) once over the flat buffer. AdamW
    is elementwise, so this is bit-identical, not merely close (6 steps, fresh gradients)."""
    g = torch.Generator().manual_seed(SEED)
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    ps, qs, ours, ref = _adamw_pair(SHAPES, g, **kw)
    foreach = torch.optim.AdamW([torch.nn.Parameter(q.detach().clone()) for q in qs], foreach=True, **kw)
    for _ in range(6):
        for p, q, f in zip(ps, qs, foreach.param_groups[0]["params"]):
            grad = torch.randn(p.shape, generator=g)
            p.grad.copy_(grad)
            q.grad, f.grad = grad.clone(), grad.clone()
        ours.step(), ref.step(), foreach.step()
        ours.zero_grad()
    for p, q, f in zip(ps, qs, foreach.param_groups[0]["params"]):
        assert torch.equal(p, q), f"seed {SEED}"
        assert torch.equal(ours.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"]), f"seed {SEED}"
        # foreach=True is a different op order: within a few fp32 ulps of the update
        assert (p - f).abs().max() <= 1e-6 * f.abs().max(), f"seed {SEED}"


def test_views_survive_backward_clip_and_zero_grad():
    g = torch.Generator().manual_seed(SEED)
    lin = torch.nn.Linear(45, 16, bias=True)
    params = list(lin.parameters())
    opt = ProxAdamW(params, lr=1e-2, backend="torch")
    flat_g = opt.flat_grad
    x = torch.randn(8, 45, generator=g)
    for _ in range(2):  # two backward passes accumulate into the views
        lin(x).pow(2).sum().backward()
    ref = torch.nn.Linear(45, 16)
    ref.load_state_dict(lin.state_dict())
    for _ in range(2):
        ref(x).pow(2).sum().backward()
    for p, q in zip(params, ref.parameters()):
        assert is_view_of(p.grad, flat_g) and torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-6), f"seed {SEED}"
    torch.nn.utils.clip_grad_norm_(params, 0.5)  # in place, on the views
    assert float(flat_g.norm()) == pytest.approx(0.5, rel=1e-5)
    opt.step()
    opt.zero_grad(set_to_none=True)  # zeroes in place: the views stay
    assert all(is_view_of(p.grad, flat_g) for p in params) and (flat_g == 0).all()
    assert all(is_view_of(p.data, opt.flat_param) for p in params)


def test_replaced_grad_and_data_are_copied_back():
    g = torch.Generator().manual_seed(SEED)
    ps = make(SHAPES[:3], g)
    opt = ProxAdamW(ps, lr=1e-2, weight_decay=0.0, backend="torch")
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.AdamW(ref_ps, lr=1e-2, weight_decay=0.0, foreach=False)
    grads = [torch.randn(p.shape, generator=g) for p in ps]
    ps[0].grad = grads[0].clone()            # a new tensor: copied in
    ps[1].grad = None                        # None: a zero gradient
    ps[2].grad.copy_(grads[2])
    new_data = torch.randn(ps[2].shape, generator=g)
    ps[2].data = new_data.clone()            # replaced data: copied into the buffer
    ref_ps[0].grad, ref_ps[1].grad, ref_ps[2].grad = grads[0], torch.zeros_like(grads[1]), grads[2]
    ref_ps[2].data.copy_(new_data)
    opt.step(), ref.step()
    for p, q in zip(ps, ref_ps):
        assert torch.equal(p, q) and is_view_of(p.data, opt.flat_param) and is_view_of(p.grad, opt.flat_grad)


def test_state_dict_roundtrip_and_loading_adamw_state():
    """AdamW's per-parameter layout; a fresh ProxAdamW loaded from it (ours or torch's AdamW) goes on
    bit for bit like the original, and its state is views of the flat moments again."""
    g = torch.Generator().manual_seed(SEED)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    ps, qs, ours, ref = _adamw_pair(SHAPES, g, **kw)
    steps = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(5)]

    def run(opt, params, gs_list):
        for gs in gs_list:
            for p, gr in zip(params, gs):
                p.grad = gr.clone() if not isinstance(opt, ProxAdamW) else p.grad.copy_(gr)
            opt.step()

    run(ours, ps, steps[:3])
    run(ref, qs, steps[:3])
    sd = ours.state_dict()
    assert sd["state"].keys() == ref.state_dict()["state"].keys()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} and float(s["step"]) == 3 for s in sd["state"].values())
    resumed = []
    for source in (sd, ref.state_dict()):
        ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt2 = ProxAdamW(ps2, lr=1.0, backend="torch")  # hyper-parameters come from the state dict
        opt2.load_state_dict(source)
        assert opt2.param_groups[0]["lr"] == kw["lr"]
        assert all(is_view_of(opt2.state[p]["exp_avg"], opt2.exp_avg) for p in ps2)
        run(opt2, ps2, steps[3:])
        resumed.append(ps2)
    run(ours, ps, steps[3:])
    run(ref, qs, steps[3:])
    for a, b, c, d in zip(ps, qs, *resumed):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d), f"seed {SEED}"


def test_engine_builds_flat_proxadamw_and_says_so():
    g = torch.Generator().manual_seed(SEED)
    lines = []
    opt = build_optimizer(make(SHAPES, g), TrainConfig(lr=1e-3), announce=lines.append)
    assert isinstance(opt, ProxAdamW) and len(lines) == 1
    assert "one flat buffer" in lines[0] and "torch step" in lines[0], lines
    before = dict(pak.LAUNCHES)
    opt.step()
    assert pak.LAUNCHES["torch"] == before["torch"] + 1 and pak.LAUNCHES["triton"] == before["triton"]
    opt_l1 = build_optimizer(make(SHAPES, g), TrainConfig(lr=1e-3), l1=1e-3, announce=lines.append)
    assert isinstance(opt_l1, ProxAdamW) and opt_l1.param_groups[0]["l1"] == 1e-3 and "L1 prox" in lines[-1]
