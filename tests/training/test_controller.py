"""The λ controller of target mode (``lightning_dwf.training.controller``): the reference schedule (warm-up, ramp,
recovery), λ moving toward it, its state dict, the default control threshold, and ``plan_controller``'s start and
refusals."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from lightning_dwf import ScheduleConfig
from lightning_dwf.core.functional import lam_floor
from lightning_dwf.training.controller import SparsityController, default_control_threshold, plan_controller


def test_reference_schedule_warmup_ramp_recovery():
    c = SparsityController(target=0.9, total_steps=1000, lam=1e-3, threshold=1e-3)
    assert c.reference(50) == 0.0 and c.reference(100) == 0.0
    assert 0 < c.reference(200) < c.reference(400) < 0.9
    assert c.reference(500) == pytest.approx(0.9) and c.reference(1000) == pytest.approx(0.9)


def test_controller_moves_lam_toward_the_schedule():
    c = SparsityController(target=0.9, total_steps=1000, lam=1e-3, threshold=1e-3, lam_min=1e-6, lam_max=1.0)
    assert c.update(50, 0.0) == 1e-3  # warm-up: untouched
    up = c.update(400, 0.5)  # too dense -> λ rises, by at most max_step
    assert 1e-3 < up <= 1e-3 * math.exp(c.max_step) + 1e-12
    down = c.update(400, 0.99)  # too sparse -> λ falls, faster than it rose
    assert math.log(up / down) > math.log(up / 1e-3)
    clone = SparsityController(target=0.5, total_steps=1000, lam=1.0, threshold=1e-3)
    clone.load_state_dict(c.state_dict())
    assert clone == c
    assert not c.recovery_due(499) and c.recovery_due(500)
    c.start_recovery(500)
    assert c.recovery_step == 500 and c.lam == 0.0 and c.update(800, 0.5) == 0.0 and not c.recovery_due(900)
    clone.load_state_dict(c.state_dict())
    assert clone.recovering and clone.lam == 0.0 and clone.recovery_step == 500


def test_default_control_threshold_is_deeper_for_longer_runs():
    assert default_control_threshold(0.05, 20_000) == pytest.approx(0.05 * 0.02)  # long run: the deep threshold
    assert default_control_threshold(0.05, 1_000) == pytest.approx(0.05 * 0.25)  # short run: capped
    assert default_control_threshold(0.05, 2_000) == pytest.approx(0.05 * 0.08)  # in between: ∝ 1/steps²
    assert default_control_threshold(0.1, 2_000) == pytest.approx(2 * default_control_threshold(0.05, 2_000))
    steps = [500, 1_500, 2_000, 3_000, 6_000]
    values = [default_control_threshold(0.05, n) for n in steps]
    assert values == sorted(values, reverse=True)


def test_plan_controller_starts_at_a_tenth_of_the_floor():
    config = ScheduleConfig(control_threshold=1e-3, recovery=0.5)
    controller = plan_controller(0.95, 1000, [1.0, 2.0], 3, 0.05, 0.04, config, 1.19e-7)
    floor = lam_floor(1.0, 1000, 0.05, 1e-3, min_log_ratio=1.0)
    assert floor == pytest.approx(math.log(50) / 1000)
    assert controller.lam == pytest.approx(0.1 * floor) and controller.lam_min == pytest.approx(1e-3 * floor)
    assert controller.lam_max == pytest.approx(0.05 * 3 / (2 * 2.0))  # the penalty shrink 2·lr·λ/D stays <= 5 %
    assert (controller.threshold, controller.ramp_end, controller.warmup) == (1e-3, 0.5, 0.1)
    with pytest.raises(ValueError, match="at least 50 optimizer steps"):
        plan_controller(0.95, 49, [1.0], 3, 0.05, 0.04, config, 1.19e-7)
    with pytest.raises(ValueError, match="cannot be reached in 1000 steps"):  # one cut at recovery: λ must get there
        plan_controller(0.95, 1000, [1e-6, 10.0], 3, 0.05, 0.04, replace(config, gradual=False), 1.19e-7)
    # gradual cuts reach the target whatever λ does: nothing to refuse
    assert plan_controller(0.95, 1000, [1e-6, 10.0], 3, 0.05, 0.04, config, 1.19e-7).lead == 0.0
