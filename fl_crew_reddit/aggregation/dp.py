"""Client-level differential privacy for federated averaging (DP-FedAvg, McMahan et al. 2018), as pure tensor math.

Each client's update Δ = sent − global is clipped to L2 norm C over all its tensors together; Gaussian noise of
standard deviation σ·C is added to the *sum* of the clipped updates, and the sum is divided by the number of clients
the round sampled, m (fixed, not the number that answered, so one client's presence changes the sum by at most C):

    central:  global + (Σ clip(Δ_i) + N(0, σ²C²)) / m        (the server adds the noise)
    local:    each client sends clip(Δ) + N(0, σ²C²); the server averages what arrives (noise added at the source)

Noise comes from a `torch.Generator` the caller seeds: from a per-run secret kept with the run's state (so a resumed
run draws the same noise and ends with the same model), never from SEED, which is in the settings anyone can read.
The privacy this buys is computed by a maintained accountant (`fl_crew_reddit/server/privacy.py`), not here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


def update_of(global_state: Mapping[str, Tensor], sent: Mapping[str, Tensor]) -> StateDict:
    """Δ = sent − global in float32, for the keys the client sent."""
    return {k: sent[k].detach().to(torch.float32) - global_state[k].detach().to(torch.float32) for k in sent}


def l2_norm(update: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(t.to(torch.float64) ** 2)) for t in update.values()))


def clip(update: Mapping[str, Tensor], clip_norm: float) -> tuple[StateDict, float]:
    """(update scaled to L2 norm ≤ `clip_norm` over all tensors together, its norm before clipping)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def gaussian_noise(like: Mapping[str, Tensor], std: float, generator: torch.Generator) -> StateDict:
    """Independent N(0, std²) for every element of every tensor of `like` (float32, CPU), drawn in key order."""
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float32) * std for k, v in sorted(like.items())}


def noisy_clipped_mean(global_state: Mapping[str, Tensor], sent: list[Mapping[str, Tensor]], *, clip_norm: float,
                       noise_multiplier: float, num_sampled: int,
                       generator: torch.Generator) -> tuple[StateDict, list[float]]:
    """Central DP: (the new values of the sent keys, global + (Σ clip(Δ_i) + N(0, σ²C²)) / m, and each client's
    update norm before clipping). `num_sampled` (m) is the number of clients the round asked, fixed in advance."""
    if num_sampled < max(len(sent), 1):
        raise ValueError(f"num_sampled={num_sampled} is below the {len(sent)} updates received")
    keys = list(sent[0]) if sent else []
    total = {k: torch.zeros(global_state[k].shape, dtype=torch.float32) for k in keys}
    norms = []
    for state in sent:
        clipped, norm = clip(update_of(global_state, state), clip_norm)
        norms.append(norm)
        for k in keys:
            total[k] += clipped[k]
    noise = gaussian_noise(total, noise_multiplier * clip_norm, generator)
    new = {k: (global_state[k].to(torch.float32) + (total[k] + noise[k]) / num_sampled).to(global_state[k].dtype)
           for k in keys}
    return new, norms


def privatize_locally(global_state: Mapping[str, Tensor], sent: Mapping[str, Tensor], *, clip_norm: float,
                      noise_multiplier: float, generator: torch.Generator) -> tuple[StateDict, float]:
    """Local DP: (global + clip(Δ) + N(0, σ²C²) for the sent keys, in their dtypes; the norm of Δ before clipping)."""
    clipped, norm = clip(update_of(global_state, sent), clip_norm)
    noise = gaussian_noise(clipped, noise_multiplier * clip_norm, generator)
    return {k: (global_state[k].to(torch.float32) + clipped[k] + noise[k]).to(sent[k].dtype) for k in sent}, norm


def noise_generator(secret: int, *parts: object) -> torch.Generator:
    """A generator seeded from a run's secret and a purpose (round, client): the same noise after a resume."""
    import hashlib

    digest = hashlib.sha256(":".join([str(secret), *map(str, parts)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
