"""Combining the sites' evaluation answers: (summed reply-token NLL, token count) per site and split.

Perplexity is exp(total NLL / total tokens) over the union of the sites' rows: sums combine, perplexities do not.
Summed in the sites' order, this is the same arithmetic as the in-process evaluator's, so the numbers are equal."""
from __future__ import annotations

from fl_crew_reddit.evaluation.metrics import perplexity


def combine_split(sums: dict[str, tuple[float, int]],
                  per_client_from: int = 1) -> tuple[float | None, dict[str, float], int]:
    """(perplexity over all sites or None without tokens, {site: its own perplexity}, total tokens).

    `per_client_from`: the fewest sites for which per-site perplexities are reported (the evaluator reports them on
    test only when there are two or more sites)."""
    count = sum(int(n) for _, n in sums.values())
    if not count:
        return None, {}, 0
    overall = perplexity(sum(float(t) for t, _ in sums.values()), count)
    per_client = ({name: perplexity(float(t), int(n)) for name, (t, n) in sums.items() if n}
                  if len(sums) >= per_client_from else {})
    return overall, per_client, count


def combine_preferences(per_site: dict[str, dict]) -> dict:
    """Preference accuracy and reward margin over the union of the sites' pairs from each site's own (both are means
    over pairs, so each site weighs by its pair count): {"preference_accuracy", "reward_margin", "pairs"}, the first
    two None without pairs."""
    weighted = [(values, int(values.get("pairs") or 0)) for values in per_site.values()]
    weighted = [(values, n) for values, n in weighted if n and values.get("preference_accuracy") is not None]
    pairs = sum(n for _, n in weighted)
    if not pairs:
        return {"preference_accuracy": None, "reward_margin": None, "pairs": 0}
    return {"preference_accuracy": sum(float(v["preference_accuracy"]) * n for v, n in weighted) / pairs,
            "reward_margin": sum(float(v["reward_margin"]) * n for v, n in weighted) / pairs, "pairs": pairs}
