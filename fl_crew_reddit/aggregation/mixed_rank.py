"""LoRA aggregation across clients of different rank (FlexLoRA / HetLoRA style), exact on the products.

A LoRA layer adds Delta W = s(r) * B @ A to a frozen weight, with B: out x r, A: r x in and PEFT's scale
s(r) = alpha / r (alpha / sqrt(r) with rsLoRA). A client of lower capacity trains a lower rank r_i <= R, so its
factors have other shapes and, with one lora_alpha for everybody, another scale: the factors of different clients
cannot be averaged, the products they stand for can.

* ``truncate_adapter``: what the server sends a rank-r client, the best rank-r approximation of the global product
  (Eckart-Young, by SVD of each layer's product), factored so that the client's PEFT model, at its own scale s(r),
  applies exactly that product: s(r) B' A' = U_r S_r V_r^T.
* ``mixed_rank_average``: sum_i w_i s(r_i) B_i A_i (w_i example weights), re-factored at rank R with scale s(R)
  (``lora_exact._refactor``: thin QRs and an SVD of the small core; the product is never materialised). Exact when
  the average has rank <= R; otherwise the best rank-R approximation, and the energy the SVD discarded is returned
  so the caller can say so (``MixedRankResult.discarded_energy``).

FlexLoRA: Bai et al. 2024, "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources" (products averaged, global truncated by SVD to each client's rank). HetLoRA: Cho et al. 2024 (mixed
ranks; it pads and truncates factors instead of products). With every client at rank R this is ``svd_exact``,
bit for bit.

Pure: torch only, no I/O; inputs are never modified; float64 arithmetic, results in each key's input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._tensors import StateDict, example_weights, restore, weighted_sum_flat
from .lora_exact import _refactor_spectrum, _stacked_factors, lora_pairs


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """PEFT's LoRA scale for a layer of rank ``rank``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def adapter_rank(state: Mapping[str, Tensor]) -> int:
    """The rank of an adapter state dict: A.shape[0] of its LoRA pairs (ValueError if they differ or there are none)."""
    ranks = {int(state[a_key].shape[0]) for a_key in lora_pairs(list(state))}
    if len(ranks) != 1:
        raise ValueError(f"adapter has LoRA ranks {sorted(ranks)}: expected one rank for every layer"
                         if ranks else "adapter has no LoRA A/B pairs")
    return ranks.pop()


def _as_matrix(factor: Tensor) -> Tensor:
    return factor.detach().to("cpu", torch.float64).reshape(factor.shape[0], -1)


def _svd_of_product(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, Vh) of b @ a (b: out x k, a: k x in, float64) without forming the product: thin QRs + core SVD."""
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


# A singular value at most this share of the largest is treated as zero: that direction of the product is empty.
ZERO_SIGMA = 1e-10


def _keep_trainable(new_b: Tensor, new_a: Tensor, sigma: Tensor, rank: int, fill_a: Tensor | None) -> int:
    """Where the product has fewer than ``rank`` non-zero singular values, B' and A' would both be zero in the empty
    directions, and a LoRA direction with B = 0 and A = 0 gets zero gradients for good (dead for every later round).
    There, as PEFT initialises an adapter, B' gets exact zeros and A' the rows of ``fill_a`` (the adapter's previous
    A: its random initialisation in round 1), so the product is unchanged and the direction can still learn. In
    place; returns the number of non-empty directions."""
    top = float(sigma[0]) if sigma.numel() else 0.0
    live = int((sigma[:rank] > ZERO_SIGMA * top).sum()) if top > 0 else 0
    if live < rank and fill_a is not None:
        new_b[:, live:] = 0.0
        new_a[live:] = fill_a[live:rank]
    return live


def truncated_shape(shape: torch.Size, rank: int, is_a: bool) -> tuple[int, ...]:
    """The shape of a LoRA factor at ``rank``: A's first dimension, B's second."""
    dims = list(shape)
    dims[0 if is_a else 1] = rank
    return tuple(dims)


def truncate_adapter(state: Mapping[str, Tensor], rank: int, *, alpha: float, rslora: bool = False) -> StateDict:
    """The adapter at ``rank`` <= its own rank R whose every layer applies the best rank-``rank`` approximation of
    that layer's product s(R) B A (Frobenius and spectral norm, Eckart-Young), at the scale s(rank) a rank-``rank``
    PEFT model applies: s(rank) B' A' = U_r S_r V_r^T, with B' = U_r sqrt(S_r / s(rank)), A' = sqrt(S_r / s(rank))
    V_r^T. Where the product has fewer than ``rank`` non-zero singular values (round 1: B = 0), the empty directions
    get B' = 0 and the global A's rows, as a fresh PEFT adapter would (``_keep_trainable``). Non-LoRA keys are copied.
    ``rank`` == R returns a copy of the input unchanged (no re-factoring)."""
    keys = list(state)
    pairs = lora_pairs(keys)
    full = adapter_rank(state)
    if not 1 <= rank <= full:
        raise ValueError(f"cannot truncate a rank-{full} adapter to rank {rank}: use 1..{full}")
    if rank == full:
        return {key: value.detach().to("cpu").clone() for key, value in state.items()}
    scale_from, scale_to = lora_scale(full, alpha, rslora), lora_scale(rank, alpha, rslora)
    out: StateDict = {}
    partners = set(pairs.values())
    for key in keys:
        if key in pairs:
            b_key = pairs[key]
            like_a, like_b = state[key], state[b_key]
            u, s, vh = _svd_of_product(_as_matrix(like_b), _as_matrix(like_a))
            take = min(rank, s.numel())
            root = (s[:take] * (scale_from / scale_to)).sqrt()
            new_b = torch.zeros((like_b.shape[0], rank), dtype=torch.float64)
            new_a = torch.zeros((rank, _as_matrix(like_a).shape[1]), dtype=torch.float64)
            new_b[:, :take] = u[:, :take] * root
            new_a[:take] = root[:, None] * vh[:take]
            _keep_trainable(new_b, new_a, s, rank, _as_matrix(like_a))
            out[key] = new_a.reshape(truncated_shape(like_a.shape, rank, True)).to(like_a.dtype)
            out[b_key] = new_b.reshape(truncated_shape(like_b.shape, rank, False)).to(like_b.dtype)
        elif key not in partners:
            out[key] = state[key].detach().to("cpu").clone()
    return {key: out[key] for key in keys}


def expected_shapes(state: Mapping[str, Tensor], rank: int) -> dict[str, tuple[int, ...]]:
    """{key: shape} of ``state`` (any rank) at ``rank``: what a rank-``rank`` client trains and sends."""
    pairs = lora_pairs(list(state))
    partners = set(pairs.values())
    return {key: truncated_shape(value.shape, rank, True) if key in pairs
            else truncated_shape(value.shape, rank, False) if key in partners else tuple(value.shape)
            for key, value in state.items()}


@dataclass
class MixedRankResult:
    """The rank-R global adapter, and how much of the averaged products' energy the rank-R SVD discarded."""

    state: StateDict
    ranks: list[int]
    discarded_energy: float = 0.0  # sum of the discarded sigma^2 / sum of all sigma^2, over every layer
    layers_truncated: int = 0  # layers whose averaged product had rank > R (tolerance 1e-12 relative)
    per_layer: dict[str, float] = field(default_factory=dict)  # a_key -> that layer's discarded energy share

    @property
    def relative_error(self) -> float:
        """||avg(s B A) - s(R) B' A'||_F / ||avg(s B A)||_F over all layers (sqrt of the discarded energy share)."""
        return math.sqrt(self.discarded_energy)

    @property
    def exact(self) -> bool:
        return self.layers_truncated == 0


def _validate(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int]) -> tuple[list[str], dict]:
    if not states:
        raise ValueError("states must be a non-empty list of state dicts")
    if len(num_examples) != len(states):
        raise ValueError(f"len(num_examples)={len(num_examples)} does not match len(states)={len(states)}")
    keys = list(states[0])
    pairs = lora_pairs(keys)
    partners = set(pairs.values())
    for index, state in enumerate(states):
        if set(state) != set(keys):
            raise ValueError(f"state {index} has different keys than state 0")
        rank = adapter_rank(state)  # one rank per client
        for key in keys:
            value, first = state[key], states[0][key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise ValueError(f"state {index}[{key!r}] is not a float tensor")
            want = (truncated_shape(first.shape, rank, True) if key in pairs
                    else truncated_shape(first.shape, rank, False) if key in partners else tuple(first.shape))
            if tuple(value.shape) != tuple(want):
                raise ValueError(f"shape mismatch at {key!r}: state {index} (rank {rank}) has {tuple(value.shape)}, "
                                 f"expected {tuple(want)} (only the rank may differ from state 0)")
    return keys, pairs


def mixed_rank_average(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int], *, rank: int,
                       alpha: float, rslora: bool = False, like: Mapping[str, Tensor] | None = None
                       ) -> MixedRankResult:
    """Example-weighted average of the clients' LoRA products s(r_i) B_i A_i (each client at its own rank r_i,
    read from its A's first dimension), re-factored at ``rank`` R with the scale s(R) of a rank-R PEFT model.

    ``like``: the global adapter (rank R), whose shapes and dtypes the result takes; default: client 0's shapes at
    rank R and its dtypes. Non-LoRA keys (same shape for every client) are averaged plainly. Clients above rank R
    are refused (ValueError): the global adapter keeps the largest rank. With ``like``, directions the average leaves
    empty (it has rank < R) keep ``like``'s A rows with B' = 0 (``_keep_trainable``), so no LoRA direction dies."""
    keys, pairs = _validate(states, num_examples)
    ranks = [adapter_rank(state) for state in states]
    if max(ranks) > rank:
        raise ValueError(f"client ranks {ranks} exceed the global rank {rank}")
    weights = example_weights(num_examples)
    target = lora_scale(rank, alpha, rslora)
    # Bcat = [w_i s(r_i)/s(R) B_i], Acat = [A_i]: Bcat @ Acat = avg(s B A) / s(R). A ratio of 1.0 (same rank)
    # leaves w_i bit-identical, so uniform ranks reproduce svd_exact exactly.
    scaled = [w * (lora_scale(r, alpha, rslora) / target) for w, r in zip(weights, ranks)]
    partners = set(pairs.values())
    out: StateDict = {}
    discarded = total = 0.0
    per_layer: dict[str, float] = {}
    truncated = 0
    for key in keys:
        if key in pairs:
            b_key = pairs[key]
            ref_a = like[key] if like is not None else None
            ref_b = like[b_key] if like is not None else None
            bcat, acat = _stacked_factors(states, key, b_key, scaled)
            new_b, new_a, sigma = _refactor_spectrum(bcat, acat, rank=rank)
            live = _keep_trainable(new_b, new_a, sigma, rank, _as_matrix(ref_a) if ref_a is not None else None)
            energy = float((sigma ** 2).sum())
            lost = float((sigma[min(live, rank) if ref_a is not None else rank:] ** 2).sum())
            if sigma.numel() > rank and float(sigma[rank]) > 1e-12 * max(float(sigma[0]), 1e-300):
                truncated += 1
            per_layer[key] = lost / energy if energy > 0 else 0.0
            discarded += lost * target ** 2
            total += energy * target ** 2
            shape_a = tuple(ref_a.shape) if ref_a is not None else truncated_shape(states[0][key].shape, rank, True)
            shape_b = tuple(ref_b.shape) if ref_b is not None else truncated_shape(states[0][b_key].shape, rank,
                                                                                   False)
            out[key] = new_a.reshape(shape_a).to(ref_a.dtype if ref_a is not None else states[0][key].dtype)
            out[b_key] = new_b.reshape(shape_b).to(ref_b.dtype if ref_b is not None else states[0][b_key].dtype)
        elif key not in partners:
            flats = [state[key].detach().to("cpu").reshape(-1) for state in states]
            out[key] = restore(weighted_sum_flat(flats, weights), like[key] if like is not None else states[0][key])
    return MixedRankResult(state={key: out[key] for key in keys}, ranks=ranks,
                           discarded_energy=discarded / total if total > 0 else 0.0, layers_truncated=truncated,
                           per_layer=per_layer)


def dense_average(states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int], *, alpha: float,
                  rslora: bool = False) -> dict[str, Tensor]:
    """{a_key: avg_i s(r_i) B_i A_i} as dense float64 matrices: the reference for tests and small checks only."""
    weights = example_weights(num_examples)
    pairs = lora_pairs(list(states[0]))
    out = {}
    for a_key, b_key in pairs.items():
        total = None
        for state, weight in zip(states, weights):
            a, b = _as_matrix(state[a_key]), _as_matrix(state[b_key])
            term = weight * lora_scale(a.shape[0], alpha, rslora) * (b @ a)
            total = term if total is None else total + term
        out[a_key] = total
    return out
