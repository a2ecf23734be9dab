"""Client-level differential privacy (issue 12, item 1): the clip bound and the noise's standard deviation measured
empirically, the accountant's ε against dp_accounting's own events, refusals at start, and the real loop with DP
central and local, including a resume that adds the same noise."""
from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from safetensors.torch import load_file

from fl_crew_reddit.aggregation.dp import clip, l2_norm, noise_generator, noisy_clipped_mean, privatize_locally
from fl_crew_reddit.config import FLCrewRedditConfig
from fl_crew_reddit.server.privacy import PrivacyPlanError, make_plan
from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings


def _updates(count: int, norm: float, size: int = 1000) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        a, b = torch.randn(size, generator=generator), torch.randn(size // 2, generator=generator)
        scale = norm / math.sqrt(float((a ** 2).sum() + (b ** 2).sum()))
        out.append({"a": a * scale, "b": b * scale})
    return out


@pytest.mark.parametrize("norm", [0.1, 1.0, 37.0])
def test_clipping_bounds_the_norm_over_all_tensors_and_keeps_small_updates(norm):
    (update,) = _updates(1, norm)
    clipped, before = clip(update, 1.0)
    assert before == pytest.approx(norm, rel=1e-5)
    assert l2_norm(clipped) == pytest.approx(min(norm, 1.0), rel=1e-5)
    if norm <= 1.0:
        assert all(torch.equal(clipped[k], update[k]) for k in update)
    else:  # the direction is kept
        assert torch.allclose(clipped["a"] / l2_norm(clipped), update["a"] / norm, atol=1e-6)


def test_central_noise_has_std_sigma_c_over_m_and_the_mean_of_clipped_updates():
    global_state = {"a": torch.zeros(200_000), "b": torch.zeros(100_000)}
    sent = [{k: torch.zeros_like(v) for k, v in global_state.items()} for _ in range(4)]
    new, _ = noisy_clipped_mean(global_state, sent, clip_norm=0.5, noise_multiplier=2.0, num_sampled=5,
                                generator=torch.Generator().manual_seed(1))
    noise = torch.cat([new["a"], new["b"]])
    assert float(noise.mean()) == pytest.approx(0.0, abs=0.002)
    assert float(noise.std()) == pytest.approx(2.0 * 0.5 / 5, rel=0.01)  # σC/m, m = clients sampled, not answered

    updates = _updates(3, 10.0)  # all clipped to 1: the mean's noise-free part is (Σ clip(Δ_i)) / m
    zero = {k: torch.zeros_like(v) for k, v in updates[0].items()}
    new, norms = noisy_clipped_mean(zero, updates, clip_norm=1.0, noise_multiplier=1e-9, num_sampled=3,
                                    generator=torch.Generator().manual_seed(1))
    expected = {k: sum(clip(u, 1.0)[0][k] for u in updates) / 3 for k in zero}
    assert norms == pytest.approx([10.0] * 3, rel=1e-5)
    assert all(torch.allclose(new[k], expected[k], atol=1e-6) for k in zero)


def test_local_noise_has_std_sigma_c_on_each_client():
    global_state = {"w": torch.zeros(300_000)}
    sent, norm = privatize_locally(global_state, {"w": torch.full((300_000,), 1.0)}, clip_norm=0.25,
                                   noise_multiplier=3.0, generator=torch.Generator().manual_seed(2))
    clipped_part = 0.25 / math.sqrt(300_000)
    assert norm == pytest.approx(math.sqrt(300_000))
    assert float((sent["w"] - clipped_part).std()) == pytest.approx(0.75, rel=0.01)
    assert float((sent["w"] - clipped_part).mean()) == pytest.approx(0.0, abs=0.005)


def test_the_same_secret_round_and_client_give_the_same_noise_and_others_do_not():
    def draw(*parts):
        return torch.randn(5, generator=noise_generator(*parts))

    assert torch.equal(draw(123, "local", 1, "client-0"), draw(123, "local", 1, "client-0"))
    assert not torch.equal(draw(123, "local", 1, "client-0"), draw(123, "local", 1, "client-1"))
    assert not torch.equal(draw(123, "local", 1, "client-0"), draw(124, "local", 1, "client-0"))


def test_the_accountant_composes_dp_accountings_own_events():
    plan = make_plan(mode="central", clip_norm=1.0, noise_multiplier=1.2, target_epsilon=None, delta=1e-5,
                     num_clients=50, clients_per_round=10, rounds=20)
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(50, 10, dp_accounting.GaussianDpEvent(0.6)), 20)
    assert plan.epsilon(20) == pytest.approx(accountant.get_epsilon(1e-5))
    assert 0 < plan.epsilon(1) < plan.epsilon(10) < plan.epsilon(20)
    everyone = make_plan(mode="central", clip_norm=1.0, noise_multiplier=1.2, target_epsilon=None, delta=1e-5,
                         num_clients=50, clients_per_round=50, rounds=20)
    assert everyone.epsilon(20) > plan.epsilon(20)  # sampling amplifies privacy
    assert plan.spent([1.2] * 20) == pytest.approx(plan.epsilon(20))


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_target_epsilon_chooses_the_noise_for_the_planned_rounds(mode):
    plan = make_plan(mode=mode, clip_norm=1.0, noise_multiplier=None, target_epsilon=8.0, delta=1e-5, num_clients=10,
                     clients_per_round=5, rounds=10)
    assert plan.epsilon(10) == pytest.approx(8.0, rel=1e-3)
    assert plan.noise_multiplier > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_multiplier=None, target_epsilon=None), "needs noise"),
    (dict(noise_multiplier=None, target_epsilon=1e-6, rounds=1000), "cannot be reached"),
    (dict(noise_multiplier=1.0, target_epsilon=None, delta=0.5), "must be below 1/NUM_CLIENTS"),
])
def test_plans_the_accountant_cannot_cover_are_refused(kwargs, message):
    settings = dict(mode="central", clip_norm=1.0, delta=1e-5, num_clients=3, clients_per_round=3, rounds=10)
    with pytest.raises(PrivacyPlanError, match=message):
        make_plan(**{**settings, **kwargs})


@pytest.mark.parametrize("settings, message", [
    (dict(dp_mode="central", dp_noise_multiplier=1.0, aggregation_method="median"), "needs a mean-based rule"),
    (dict(dp_mode="central", dp_noise_multiplier=1.0, aggregation_method="svd_exact"), "needs a mean-based rule"),
    (dict(dp_mode="local"), "needs noise"),
    (dict(dp_mode="central", dp_noise_multiplier=1.0, dp_target_epsilon=8.0), "not both"),
    (dict(dp_mode="central", dp_noise_multiplier=1.0, dp_delta=0.5), "DP_DELTA"),
])
def test_dp_settings_that_cannot_work_are_refused_at_start(settings, message):
    with pytest.raises(ValueError, match=message):
        FLCrewRedditConfig(_env_file=None, **settings)
    FLCrewRedditConfig(_env_file=None, dp_mode="local", dp_noise_multiplier=1.0, aggregation_method="median")


def test_central_dp_strategy_skips_the_norm_screen_and_records_who_was_clipped():
    settings = StrategySettings(min_fit_clients=1, max_update_norm=1.0, dp_mode="central", dp_clip_norm=2.0,
                                dp_noise_multiplier=0.5)
    strategy = FederatedStrategy(settings, noise_secret=99)
    global_state = {"w": torch.zeros(10)}
    updates = [ClientUpdate("big", {"w": torch.full((10,), 3.0)}, 5), ClientUpdate("small", {"w": torch.zeros(10)}, 5)]
    outcome = strategy.aggregate(global_state, updates, round_number=3)
    assert outcome.accepted == ["big", "small"] and outcome.dp_clipped == ["big"]  # no norm rejection under DP
    again = FederatedStrategy(settings, noise_secret=99).aggregate(global_state, updates, round_number=3)
    assert torch.equal(outcome.new_global["w"], again.new_global["w"])  # same secret and round: same noise
    other = FederatedStrategy(settings, noise_secret=99).aggregate(global_state, updates, round_number=4)
    assert not torch.equal(outcome.new_global["w"], other.new_global["w"])


def _final(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.final_adapter) / "adapter_model.safetensors"))


@pytest.mark.e2e
def test_central_dp_run_reports_epsilon_each_round_and_resumes_with_the_same_noise(tiny_model_dir, tmp_path,
                                                                                   monkeypatch, caplog):
    from conftest import RunStopped, stopped_in_round, tiny_run_config

    import fl_crew_reddit.workspace as workspace_module
    from fl_crew_reddit import FLCrewRedditManager

    # Each run draws its own noise secret; the two runs compared here share one, as if they were one run.
    monkeypatch.setattr(workspace_module.secrets, "randbits", lambda bits: 0x5EC2E7)
    caplog.set_level("INFO", logger="fl_crew_reddit.progress")
    config = tiny_run_config(tiny_model_dir, tmp_path, dp_mode="central", dp_target_epsilon=8.0, dp_clip_norm=0.5)
    reference = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-dp")
    epsilons = [r.privacy.epsilon for r in reference.history.rounds]
    assert 0 < epsilons[0] < epsilons[1] == pytest.approx(8.0, rel=1e-3)
    assert all(r.privacy.mode == "central" and r.privacy.delta == 1e-5 for r in reference.history.rounds)
    console = [r.getMessage() for r in caplog.records if r.name == "fl_crew_reddit.progress"]  # each round's line
    for number, epsilon in enumerate(epsilons, start=1):
        assert any(line.startswith(f"Round {number}/2") and f"DP central: ε = {epsilon:.2f} (δ = 1e-05)" in line
                   for line in console), console

    with stopped_in_round(2), pytest.raises(RunStopped):
        FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-dp-stopped")
    monkeypatch.setattr(workspace_module.secrets, "randbits", lambda bits: 1)  # the saved secret must win
    resumed = FLCrewRedditManager(config).resume("run-dp-stopped")
    assert [r.privacy.epsilon for r in resumed.history.rounds] == pytest.approx(epsilons)
    assert all(torch.equal(_final(resumed)[k], v) for k, v in _final(reference).items())  # the same noise again


@pytest.mark.e2e
def test_local_dp_run_completes_with_any_rule(tiny_model_dir, tmp_path):
    from conftest import tiny_run_config

    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_run_config(tiny_model_dir, tmp_path, dp_mode="local", dp_noise_multiplier=1.0, dp_clip_norm=0.5,
                             aggregation_method="median")
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="run-local-dp")
    (record,) = result.history.rounds
    assert record.privacy.mode == "local" and record.privacy.noise_multiplier == 1.0
    assert record.aggregation.accepted == ["client-0", "client-1", "client-2"]
    assert all("dp_update_norm" in c.metrics for c in record.clients)
    from fl_crew_reddit.evaluation.report import markdown_report

    report = markdown_report(result.history, png_name=None)
    assert "## Privacy" in report and "DP_MODE=local" in report and f"ε = {record.privacy.epsilon:.3f}" in report
