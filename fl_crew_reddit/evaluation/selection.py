"""Which checkpoint to read: the round with the lowest validation perplexity, never chosen on the test split.

Every method (the federated model, local-only, centralized) is compared at its own best round on validation and
reported with the test perplexity of that checkpoint, so no method gains from peeking at test (early stopping on
a held-out split, as in the usual FL benchmark protocol). Pure functions over numbers and history records.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from fl_crew_reddit.history import finite

if TYPE_CHECKING:
    from fl_crew_reddit.history import RoundRecord


def argmin_round(points: Iterable[tuple[int, float | None]]) -> int | None:
    """The round of the lowest finite value (the earliest of ties); None when no value is finite."""
    best: tuple[float, int] | None = None
    for number, value in points:
        value = finite(value)
        if value is not None and (best is None or (value, number) < best):
            best = (value, number)
    return best[1] if best else None


def best_round_record(rounds: list[RoundRecord]) -> RoundRecord | None:
    """The aggregated round with the lowest `global.validation_perplexity`; None when no round has one."""
    usable = {r.round: r for r in rounds if r.aggregation is not None and r.global_ is not None}
    number = argmin_round((n, r.global_.validation_perplexity) for n, r in usable.items())
    return usable.get(number) if number is not None else None
