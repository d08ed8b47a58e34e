"""Learning-rate schedules: warmup then constant, linear or cosine decay to zero."""
import math

import pytest

from engine.optim import lr_at
from engine.recipe import TrainConfig


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_peak_over_warmup(scheduler):
    cfg = TrainConfig(lr=1e-3, max_steps=100, warmup_steps=10, scheduler=scheduler)
    assert [lr_at(t, cfg) for t in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert lr_at(9, cfg) == pytest.approx(1e-3)


def test_decays():
    lin = TrainConfig(lr=1.0, max_steps=110, warmup_steps=10, scheduler="linear")
    cos = TrainConfig(lr=1.0, max_steps=110, warmup_steps=10, scheduler="cosine")
    const = TrainConfig(lr=1.0, max_steps=110, warmup_steps=10, scheduler="constant")
    assert lr_at(10, lin) == pytest.approx(1.0) and lr_at(60, lin) == pytest.approx(0.5)
    assert lr_at(110, lin) == pytest.approx(0.0)
    assert lr_at(60, cos) == pytest.approx(0.5) and lr_at(35, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(109, cos) < 0.001
    assert all(lr_at(t, const) == 1.0 for t in range(10, 110))
    # monotone after warmup
    for cfg in (lin, cos):
        lrs = [lr_at(t, cfg) for t in range(10, 110)]
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))
