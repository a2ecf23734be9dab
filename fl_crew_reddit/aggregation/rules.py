"""Server-side averaging and Byzantine-robust aggregation rules.

Papers:
- FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep
  Networks from Decentralized Data" (example-weighted mean).
- FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks"
  (same server rule; the proximal term is a client-side loss).
- Krum / Multi-Krum: Blanchard et al. 2017, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent".
- Coordinate-wise median / trimmed mean: Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates".
- Bulyan: El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed
  Learning in Byzantium".

The semantics follow flwr.server.strategy.aggregate (aggregate, aggregate_krum,
aggregate_median, aggregate_trimmed_avg, aggregate_bulyan with Krum) so results
can be compared one to one; the implementation is vectorised torch and works
key by key / chunk by chunk, never on one n x d matrix of the whole model.
Distance-based rules treat all keys of a state as one flattened vector.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _kernels
from ._sortnet import median_block, padding, sorted_block
from ._tensors import (
    StateDict,
    check_num_byzantine,
    column_chunks,
    example_weights,
    flat_views,
    restore,
    validate_states,
    weighted_sum_flat,
)


# --------------------------------------------------------------------------- means
def weighted_average(states: Sequence[StateDict], num_examples: Sequence[int]) -> StateDict:
    """Example-weighted mean sum_k n_k x_k / sum_k n_k (float32 accumulation)."""
    keys = validate_states(states, num_examples)
    weights = example_weights(num_examples)
    return _weighted_average(states, keys, weights)


def fedavg(states: Sequence[StateDict], num_examples: Sequence[int]) -> StateDict:
    """FedAvg (McMahan 2017): the example-weighted mean of the client models."""
    return weighted_average(states, num_examples)


def fedprox(states: Sequence[StateDict], num_examples: Sequence[int]) -> StateDict:
    """FedProx (Li 2020) server rule, identical to FedAvg.

    FedProx changes only the client objective: each client adds
    (mu / 2) * ||w - w_global||^2 to its local loss. The proximal weight ``mu``
    therefore lives in the client trainer, not here.
    """
    return weighted_average(states, num_examples)


def _weighted_average(
    states: Sequence[StateDict], keys: Sequence[str], weights: Sequence[float]
) -> StateDict:
    out: StateDict = {}
    for key in keys:
        flats = flat_views(states, key)
        out[key] = restore(weighted_sum_flat(flats, weights), states[0][key])
    return out


# -------------------------------------------------------------------------- Krum
def pairwise_sq_distances(states: Sequence[StateDict]) -> Tensor:
    """(n, n) float64 squared Euclidean distances between flattened states.

    With numba: summed differences (`_kernels.pairwise_sq_distances`), one pass over the inputs. Without: computed
    from a Gram matrix after subtracting the per-coordinate mean of each column chunk (distances are
    translation invariant). Centring removes the large shared part of the clients' adapters, which is what makes
    ||a||^2 + ||b||^2 - 2ab cancel badly; after it the float32 Gram of each chunk (one BLAS call) is accurate to
    about 1e-7 relative, and the chunks are summed in float64. Twice as fast as a float64 Gram.
    """
    if _kernels.AVAILABLE:
        return _kernels.pairwise_sq_distances([flat_views(states, key) for key in states[0]])
    n = len(states)
    gram = torch.zeros((n, n), dtype=torch.float64)
    for key in states[0]:
        flats = flat_views(states, key)
        for start, stop in column_chunks(flats[0].numel(), n):
            block = torch.stack([flat[start:stop].to(torch.float32) for flat in flats])
            block -= block.mean(dim=0)
            gram += (block @ block.T).to(torch.float64)
    gram = (gram + gram.T) * 0.5  # BLAS need not return g_ij == g_ji bit for bit; equal scores must tie exactly
    diag = gram.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2.0 * gram).clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def krum_scores(dist: Tensor, num_byzantine: int) -> Tensor:
    """Krum score of each client: sum of squared distances to its n-f-2 nearest others.

    Like Flower, the neighbour count is max(1, n - f - 2).
    """
    n = dist.shape[0]
    closest = max(1, n - num_byzantine - 2)
    others = dist.clone()
    others.fill_diagonal_(float("inf"))
    nearest = torch.sort(others, dim=1).values[:, :closest]
    return nearest.sum(dim=1)


def krum_select(states: Sequence[StateDict], num_byzantine: int, num_selected: int) -> list[int]:
    """Indices of the ``num_selected`` clients with the lowest Krum scores."""
    scores = krum_scores(pairwise_sq_distances(states), num_byzantine)
    order = torch.argsort(scores, stable=True)
    return order[:num_selected].tolist()


def _check_krum(n: int, num_byzantine: int) -> int:
    f = check_num_byzantine(num_byzantine)
    if n <= 2 * f + 2:
        raise ValueError(
            f"Krum needs n > 2f + 2 clients: got n={n}, num_byzantine={f} "
            f"(need at least {2 * f + 3})"
        )
    return f


def multi_krum(
    states: Sequence[StateDict],
    num_examples: Sequence[int],
    *,
    num_byzantine: int = 0,
    num_selected: int | None = None,
) -> StateDict:
    """Multi-Krum (Blanchard 2017): average of the m lowest-score clients.

    The selected clients are averaged weighted by num_examples (as Flower does).
    Default m = n - f, the choice suggested in the paper.
    """
    keys = validate_states(states, num_examples)
    n = len(states)
    f = _check_krum(n, num_byzantine)
    m = n - f if num_selected is None else num_selected
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= n:
        raise ValueError(f"num_selected must be an int in [1, {n}], got {num_selected!r}")
    chosen = krum_select(states, f, int(m))
    if len(chosen) == 1:  # a single model: return it bit-exact
        return {key: restore(states[chosen[0]][key].detach().clone(), states[0][key]) for key in keys}
    subset = [states[i] for i in chosen]
    weights = example_weights([num_examples[i] for i in chosen])
    return _weighted_average(subset, keys, weights)


def krum(
    states: Sequence[StateDict], num_examples: Sequence[int], *, num_byzantine: int = 0
) -> StateDict:
    """Krum (Blanchard 2017): the single client model with the lowest score.

    Equal to multi_krum with num_selected=1.
    """
    return multi_krum(states, num_examples, num_byzantine=num_byzantine, num_selected=1)


# ----------------------------------------------------------- coordinate-wise rules
def median(states: Sequence[StateDict], num_examples: Sequence[int]) -> StateDict:
    """Coordinate-wise median (Yin 2018), unweighted.

    For an even number of clients the two middle values are averaged (numpy's
    convention); torch.median would return the lower one.
    """
    keys = validate_states(states, num_examples)
    out: StateDict = {}
    for key in keys:
        flats = flat_views(states, key)
        if _kernels.AVAILABLE and len(flats) > 1:
            out[key] = restore(_kernels.median(flats), states[0][key])
            continue
        numel = flats[0].numel()
        result = torch.empty(numel, dtype=torch.float32)
        for start, stop in column_chunks(numel, padding(len(flats))[0]):
            result[start:stop] = median_block(flats, start, stop)
        out[key] = restore(result, states[0][key])
    return out


def trimmed_mean(
    states: Sequence[StateDict], num_examples: Sequence[int], *, beta: float = 0.2
) -> StateDict:
    """Coordinate-wise trimmed mean (Yin 2018), unweighted.

    Cuts int(beta * n) values from each end per coordinate and averages the rest,
    like flwr's aggregate_trimmed_avg (scipy.stats.trim_mean). 0 <= beta < 0.5.
    """
    keys = validate_states(states, num_examples)
    if not 0.0 <= float(beta) < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    n = len(states)
    cut = int(float(beta) * n)
    out: StateDict = {}
    for key in keys:
        flats = flat_views(states, key)
        numel = flats[0].numel()
        if cut == 0:
            out[key] = restore(weighted_sum_flat(flats, [1.0 / n] * n), states[0][key])
            continue
        if _kernels.AVAILABLE:
            out[key] = restore(_kernels.trimmed_mean(flats, cut), states[0][key])
            continue
        result = torch.empty(numel, dtype=torch.float32)
        for start, stop in column_chunks(numel, padding(n)[0]):
            ordered = sorted_block(flats, start, stop)
            result[start:stop] = ordered[cut:n - cut].mean(dim=0)
        out[key] = restore(result, states[0][key])
    return out


# ------------------------------------------------------------------------- Bulyan
def bulyan_select(states: Sequence[StateDict], num_byzantine: int) -> list[int]:
    """Indices picked by Bulyan's first stage: theta = n - 2f rounds of Krum.

    Each round removes the Krum winner of the remaining set (neighbour count
    max(1, remaining - f - 2), as in Flower). The distance matrix is computed
    once and sub-indexed.
    """
    dist = pairwise_sq_distances(states)
    remaining = list(range(len(states)))
    theta = len(states) - 2 * num_byzantine
    chosen: list[int] = []
    for _ in range(theta):
        idx = torch.tensor(remaining)
        scores = krum_scores(dist[idx][:, idx], num_byzantine)
        best = remaining[int(torch.argmin(scores))]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def bulyan(
    states: Sequence[StateDict], num_examples: Sequence[int], *, num_byzantine: int = 0
) -> StateDict:
    """Bulyan (El Mhamdi 2018) with Krum as the selection rule.

    Stage 1 selects theta = n - 2f clients by repeated Krum; stage 2 averages,
    per coordinate, the beta = theta - 2f selected values closest to their
    coordinate-wise median. Needs n >= 4f + 3.
    """
    keys = validate_states(states, num_examples)
    n = len(states)
    f = check_num_byzantine(num_byzantine)
    if n < 4 * f + 3:
        raise ValueError(
            f"Bulyan needs n >= 4f + 3 clients: got n={n}, num_byzantine={f} "
            f"(need at least {4 * f + 3})"
        )
    selected = [states[i] for i in bulyan_select(states, f)]
    theta = len(selected)
    keep = theta - 2 * f
    out: StateDict = {}
    for key in keys:
        flats = flat_views(selected, key)
        if _kernels.AVAILABLE:
            out[key] = restore(_kernels.closest_to_median_mean(flats, keep), states[0][key])
            continue
        numel = flats[0].numel()
        result = torch.empty(numel, dtype=torch.float32)
        for start, stop in column_chunks(numel, padding(theta)[0]):
            result[start:stop] = _closest_to_median_mean(sorted_block(flats, start, stop), keep)
        out[key] = restore(result, states[0][key])
    return out


def _closest_to_median_mean(ordered: Tensor, keep: int) -> Tensor:
    """Per column, mean of the ``keep`` sorted values closest to the median.

    In sorted order the nearest values form a window around the median; start
    with all rows and drop the farther end until ``keep`` remain.
    """
    rows, cols = ordered.shape
    mid = (rows - 1) // 2
    med = (ordered[mid] + ordered[rows // 2]) * 0.5
    left = torch.zeros((1, cols), dtype=torch.long)
    right = torch.full((1, cols), rows - 1, dtype=torch.long)
    for _ in range(rows - keep):
        low = ordered.gather(0, left)[0]
        high = ordered.gather(0, right)[0]
        drop_left = (med - low) > (high - med)
        left += drop_left.long()
        right -= (~drop_left).long()
    row_ids = torch.arange(rows).unsqueeze(1)
    window = (row_ids >= left) & (row_ids <= right)
    return torch.where(window, ordered, 0.0).sum(dim=0) / keep
