"""Tests for fl_crew_reddit.aggregation.checks: each defect is caught and named."""

from __future__ import annotations

import math

import pytest
import torch

from fl_crew_reddit.aggregation import NotEnoughClientsError, check_update, screen_updates, update_norm

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def global_state():
    gen = torch.Generator().manual_seed(0)
    return {KEY_A: torch.randn(2, 6, generator=gen), KEY_B: torch.zeros(4, 2)}


def good_update(global_state, step=0.01):
    return {k: v + step for k, v in global_state.items()}


def test_good_update_is_accepted(global_state):
    assert check_update(global_state, good_update(global_state), max_norm=1.0) == []
    assert check_update(global_state, good_update(global_state), max_norm=None) == []


@pytest.mark.parametrize(
    ("defect", "expected"),
    [
        (lambda u: u[KEY_A].view(-1).__setitem__(3, float("nan")), f"non-finite values at {KEY_A!r}: 1"),
        (lambda u: u[KEY_B].view(-1)[:2].fill_(float("inf")), f"non-finite values at {KEY_B!r}: 2"),
        (lambda u: u.__setitem__(KEY_B, torch.zeros(4, 3)), f"shape mismatch at {KEY_B!r}"),
        (lambda u: u.__setitem__(KEY_A, u[KEY_A].half()), f"dtype mismatch at {KEY_A!r}"),
        (lambda u: u.pop(KEY_B), f"missing keys [{KEY_B!r}]"),
        (lambda u: u.__setitem__("extra.weight", torch.ones(1)), "unexpected keys ['extra.weight']"),
        (lambda u: u.__setitem__(KEY_A, [1.0]), f"{KEY_A!r} is a list, not a tensor"),
    ],
)
def test_each_defect_is_reported(global_state, defect, expected):
    # Prepare
    update = good_update(global_state)
    defect(update)
    # Execute
    reasons = check_update(global_state, update, max_norm=10.0)
    # Assert
    assert len(reasons) == 1 and reasons[0].startswith(expected), reasons


def test_nan_and_inf_counted_separately(global_state):
    update = good_update(global_state)
    update[KEY_A][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    (reason,) = check_update(global_state, update, max_norm=None)
    assert "3 of 12 (nan=1, inf=2)" in reason


def test_norm_above_max_norm_is_rejected(global_state):
    update = good_update(global_state, step=1.0)  # 20 values moved by 1 -> norm sqrt(20)
    assert math.isclose(update_norm(global_state, update), math.sqrt(20), rel_tol=1e-6)  # float32 rounding of v + 1
    (reason,) = check_update(global_state, update, max_norm=4.0)
    assert reason.startswith("update norm 4.47214 exceeds max_norm 4")
    assert check_update(global_state, update, max_norm=4.5) == []


def test_invalid_max_norm_raises(global_state):
    with pytest.raises(ValueError, match="max_norm"):
        check_update(global_state, good_update(global_state), max_norm=0.0)


def test_check_update_does_not_modify_inputs(global_state):
    update = good_update(global_state)
    before = {k: v.clone() for k, v in update.items()}
    check_update(global_state, update, max_norm=1.0)
    assert all(torch.equal(update[k], before[k]) for k in update)


def test_screen_updates_splits_accepted_and_rejected(global_state):
    # Prepare
    bad_nan = good_update(global_state)
    bad_nan[KEY_A][0, 0] = float("nan")
    far = good_update(global_state, step=5.0)
    updates = [good_update(global_state), bad_nan, good_update(global_state, 0.02), far]
    names = ["alice", "bob", "carol", "dave"]
    # Execute
    accepted, rejected = screen_updates(global_state, updates, names, max_norm=1.0, min_clients=2)
    # Assert
    assert accepted == [0, 2]
    assert set(rejected) == {"bob", "dave"}
    assert "non-finite" in rejected["bob"][0] and "exceeds max_norm" in rejected["dave"][0]


def test_screen_updates_raises_when_too_few_remain(global_state):
    bad = good_update(global_state)
    bad.pop(KEY_A)
    with pytest.raises(NotEnoughClientsError, match="only 1 of 2 updates accepted, need 2") as err:
        screen_updates(global_state, [good_update(global_state), bad], ["a", "b"], None, 2)
    assert isinstance(err.value, RuntimeError) and "b: missing keys" in str(err.value)


def test_screen_updates_validates_names(global_state):
    with pytest.raises(ValueError, match="names"):
        screen_updates(global_state, [good_update(global_state)], [], None, 1)
    with pytest.raises(ValueError, match="unique"):
        screen_updates(global_state, [good_update(global_state)] * 2, ["a", "a"], None, 1)
