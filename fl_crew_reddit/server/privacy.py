"""The privacy a DP run spends, from Google's maintained accountant (`dp_accounting`, Rényi DP), never our formulas.

What is protected: one client's whole data set (client-level DP), with "replace one client" as the neighbouring
relation, so the number of clients N is public and the sum of clipped updates has L2 sensitivity 2C. Each round is
one Gaussian mechanism with noise σ·C on that sum, i.e. noise multiplier σ/2 relative to the sensitivity:

    central, all clients each round       GaussianDpEvent(σ/2), composed over the rounds
    central, m of N clients sampled        SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(σ/2)) (the server
                                           samples a fixed-size subset uniformly; Wang, Balle & Kasiviswanathan 2019)
    local                                  GaussianDpEvent(σ/2) per round for each client's own release, composed
                                           over every round (a client cannot count on not being sampled)

DP_TARGET_EPSILON picks σ for the planned rounds with `dp_accounting.calibrate_dp_mechanism`; a plan the accountant
cannot cover (no noise, δ out of range, a target no σ up to MAX_NOISE_MULTIPLIER reaches) is refused at start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

MAX_NOISE_MULTIPLIER = 1000.0


class PrivacyPlanError(ValueError):
    """A DP setting the accountant cannot turn into a finite (ε, δ); the message names the settings."""


@dataclass(frozen=True)
class PrivacyPlan:
    mode: str  # central | local
    noise_multiplier: float  # σ: noise std / clip norm
    clip_norm: float
    delta: float
    num_clients: int
    clients_per_round: int
    rounds: int

    def event(self, noise_multiplier: float | None = None):
        import dp_accounting

        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        gaussian = dp_accounting.GaussianDpEvent(sigma / 2)  # replace-one: sensitivity 2C
        if self.mode == "central" and self.clients_per_round < self.num_clients:
            return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.clients_per_round, gaussian)
        return gaussian

    def epsilon(self, rounds: int) -> float:
        """ε after `rounds` rounds at this plan's δ (0 rounds: 0)."""
        if rounds <= 0:
            return 0.0
        return _epsilon(self.event(), rounds, self.delta)

    def spent(self, noise_multipliers: list[float]) -> float:
        """ε after rounds run with these noise multipliers, one per round (a resumed run may have changed σ)."""
        import dp_accounting

        if not noise_multipliers:
            return 0.0
        accountant = _accountant()
        for sigma in sorted(set(noise_multipliers)):
            accountant.compose(dp_accounting.SelfComposedDpEvent(self.event(sigma), noise_multipliers.count(sigma)))
        return float(accountant.get_epsilon(self.delta))

    def describe(self, rounds: int | None = None) -> str:
        rounds = self.rounds if rounds is None else rounds
        sampled = f"{self.clients_per_round} of {self.num_clients} clients a round"
        return (f"DP_MODE={self.mode}: clip {self.clip_norm:g}, noise multiplier {self.noise_multiplier:.4g}, "
                f"{sampled}: ε = {self.epsilon(rounds):.3f} after {rounds} rounds (δ = {self.delta:g}, client-level, "
                f"replace-one, RDP accountant of dp_accounting)")


def _accountant():
    import dp_accounting

    return dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)


def _epsilon(event, rounds: int, delta: float) -> float:
    import dp_accounting

    accountant = _accountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def make_plan(*, mode: str, clip_norm: float, noise_multiplier: float | None, target_epsilon: float | None,
              delta: float, num_clients: int, clients_per_round: int, rounds: int) -> PrivacyPlan:
    """The run's plan, with σ from DP_TARGET_EPSILON when given; PrivacyPlanError when it cannot be accounted."""
    if mode not in ("central", "local"):
        raise PrivacyPlanError(f"DP_MODE={mode!r}: use off, central or local")
    if not (0 < delta < 1) or (num_clients > 0 and delta >= 1 / num_clients):
        raise PrivacyPlanError(f"DP_DELTA={delta:g} must be below 1/NUM_CLIENTS = {1 / max(num_clients, 1):g} "
                               "(a δ that large allows leaking one client's data outright)")
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise PrivacyPlanError(f"DP_CLIP_NORM={clip_norm} must be a positive number")
    plan = PrivacyPlan(mode, noise_multiplier or 0.0, clip_norm, delta, num_clients,
                       min(clients_per_round, num_clients), rounds)
    if target_epsilon is not None:
        import dp_accounting

        def event_for(sigma: float):
            return dp_accounting.SelfComposedDpEvent(plan.event(sigma), rounds)

        try:
            sigma = dp_accounting.calibrate_dp_mechanism(
                _accountant, event_for, target_epsilon, delta,
                dp_accounting.ExplicitBracketInterval(1e-3, MAX_NOISE_MULTIPLIER), tol=1e-4)
        except (ValueError, RuntimeError) as error:
            raise PrivacyPlanError(f"DP_TARGET_EPSILON={target_epsilon:g} cannot be reached in {rounds} rounds at "
                                   f"δ={delta:g} with a noise multiplier up to {MAX_NOISE_MULTIPLIER:g}: "
                                   f"{error}") from None
        plan = replace(plan, noise_multiplier=float(sigma))
    if not plan.noise_multiplier > 0:
        raise PrivacyPlanError(f"DP_MODE={mode} needs noise: set DP_NOISE_MULTIPLIER > 0 or DP_TARGET_EPSILON "
                               "(without noise ε is infinite)")
    spent = plan.epsilon(rounds)
    if not math.isfinite(spent):
        raise PrivacyPlanError(f"the accountant finds ε = ∞ for DP_NOISE_MULTIPLIER={plan.noise_multiplier:g} over "
                               f"{rounds} rounds at δ={delta:g}: raise the noise")
    return plan
