"""Exact aggregation of LoRA adapters, and the FFA-LoRA alternative.

Why: a LoRA layer contributes Delta W = B @ A (PEFT's alpha / r scale is the
same for every client and factors out). Averaging the factors separately gives
avg(B) @ avg(A), which is not avg(B @ A). ``svd_exact`` averages the products
and re-factors the result to the adapter rank r with a truncated SVD:
B' = U_r sqrt(S_r), A' = sqrt(S_r) V_r^T. When avg(B @ A) has rank <= r this is
exact; otherwise it is the best rank-r approximation in Frobenius and spectral
norm (Eckart-Young). The idea of averaging products rather than factors appears
in several federated-LoRA papers; FFA-LoRA (Sun et al. 2024, "Improving LoRA in
Privacy-preserving Federated Learning") avoids the problem instead by freezing
A (shared by all clients) and training only B, so that plain averaging of B is
exact: avg(B_k) @ A = avg(B_k @ A).

The product is never materialised: with Bcat = [w_1 B_1 ... w_n B_n] and
Acat = [A_1; ...; A_n], avg(BA) = Bcat @ Acat. Thin QR factorisations
Bcat = Q_B R_B, Acat^T = Q_A R_A reduce the SVD to the small core R_B R_A^T
(size <= n*r), in float64. Cost per layer is O((out + in) (n r)^2 + (n r)^3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._tensors import StateDict, example_weights, restore, validate_states, weighted_sum_flat

_A_TO_B = (("lora_embedding_A", "lora_embedding_B"), ("lora_A", "lora_B"))


def _b_key(key: str) -> str | None:
    for a_name, b_name in _A_TO_B:
        if a_name in key:
            return key.replace(a_name, b_name)
    return None


def _is_b_key(key: str) -> bool:
    return any(b_name in key for _, b_name in _A_TO_B)


def lora_pairs(keys: Sequence[str]) -> dict[str, str]:
    """Map each lora_A key to its lora_B key (``lora_A`` -> ``lora_B`` in the name).

    Raises ValueError if a factor has no partner.
    """
    key_set = set(keys)
    pairs: dict[str, str] = {}
    for key in keys:
        b_key = _b_key(key)
        if b_key is None:
            continue
        if b_key not in key_set:
            raise ValueError(f"LoRA key {key!r} has no partner {b_key!r}")
        pairs[key] = b_key
    orphans = [k for k in keys if _is_b_key(k) and k not in pairs.values()]
    if orphans:
        raise ValueError(f"LoRA B keys without an A partner: {orphans[:3]}")
    return pairs


def ffa_lora_trainable(key: str) -> bool:
    """FFA-LoRA (Sun 2024): is this adapter parameter trained on the clients?

    False for LoRA A factors (frozen at their shared initialisation, identical on
    every client), True for B factors and any other adapter parameter. With A
    shared, plain averaging of B is exact.
    """
    return _b_key(key) is None


def _stacked_factors(
    states: Sequence[StateDict], a_key: str, b_key: str, weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """(Bcat, Acat) in float64 with avg(B @ A) = Bcat @ Acat; zero weights skipped."""
    b_parts, a_parts = [], []
    for state, weight in zip(states, weights):
        if weight == 0.0:
            continue
        a = state[a_key].detach().to("cpu", torch.float64)
        b = state[b_key].detach().to("cpu", torch.float64)
        a = a.reshape(a.shape[0], -1)
        b = b.reshape(b.shape[0], -1)
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"LoRA factors do not chain: {b_key!r} is {tuple(b.shape)}, "
                f"{a_key!r} is {tuple(a.shape)}"
            )
        b_parts.append(b * weight)
        a_parts.append(a)
    return torch.cat(b_parts, dim=1), torch.cat(a_parts, dim=0)


def _refactor(bcat: Tensor, acat: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors (B', A') of bcat @ acat by thin QR + core SVD."""
    new_b, new_a, _ = _refactor_spectrum(bcat, acat, rank)
    return new_b, new_a


def _refactor_spectrum(bcat: Tensor, acat: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """`_refactor`, and the singular values of bcat @ acat (all of them: what the rank cut kept and dropped)."""
    q_b, r_b = torch.linalg.qr(bcat)
    q_a, r_a = torch.linalg.qr(acat.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    take = min(rank, s.numel())
    root = s[:take].sqrt()
    new_b = torch.zeros((bcat.shape[0], rank), dtype=torch.float64)
    new_a = torch.zeros((rank, acat.shape[1]), dtype=torch.float64)
    new_b[:, :take] = (q_b @ u[:, :take]) * root
    new_a[:take] = root[:, None] * (vh[:take] @ q_a.T)
    return new_b, new_a, s


def svd_exact(states: Sequence[StateDict], num_examples: Sequence[int]) -> StateDict:
    """Average the LoRA products B @ A (example-weighted), re-factor to rank r.

    r is each pair's adapter rank (A.shape[0]); output shapes equal the input
    shapes. Keys that are not LoRA factors (biases, modules_to_save, DoRA
    magnitudes) are averaged plainly.
    """
    keys = validate_states(states, num_examples)
    weights = example_weights(num_examples)
    pairs = lora_pairs(keys)
    partners = set(pairs.values())
    out: StateDict = {}
    for key in keys:
        if key in pairs:
            b_key = pairs[key]
            like_a, like_b = states[0][key], states[0][b_key]
            bcat, acat = _stacked_factors(states, key, b_key, weights)
            new_b, new_a = _refactor(bcat, acat, rank=like_a.shape[0])
            out[key] = restore(new_a, like_a)
            out[b_key] = restore(new_b, like_b)
        elif key not in partners:
            flats = [s[key].detach().to("cpu").reshape(-1) for s in states]
            out[key] = restore(weighted_sum_flat(flats, weights), states[0][key])
    return {key: out[key] for key in keys}


def _frobenius_of_product(left: Tensor, right: Tensor) -> float:
    """||left @ right||_F without forming the product (thin QR of both sides)."""
    _, r_l = torch.linalg.qr(left)
    _, r_r = torch.linalg.qr(right.T)
    return float(torch.linalg.matrix_norm(r_l @ r_r.T))


def lora_product_error(
    states: Sequence[StateDict], num_examples: Sequence[int], aggregated: StateDict
) -> float:
    """Relative error ||avg(B A) - B' A'||_F / ||avg(B A)||_F over all LoRA pairs.

    ``aggregated`` is any aggregate of ``states`` (plain factor average,
    svd_exact, ...). Non-LoRA keys are ignored. Computed in float64 without
    materialising any product.
    """
    keys = validate_states(states, num_examples)
    weights = example_weights(num_examples)
    err_sq = ref_sq = 0.0
    for a_key, b_key in lora_pairs(keys).items():
        bcat, acat = _stacked_factors(states, a_key, b_key, weights)
        new_a = aggregated[a_key].detach().to("cpu", torch.float64)
        new_b = aggregated[b_key].detach().to("cpu", torch.float64)
        new_a = new_a.reshape(new_a.shape[0], -1)
        new_b = new_b.reshape(new_b.shape[0], -1)
        ref_sq += _frobenius_of_product(bcat, acat) ** 2
        err_sq += _frobenius_of_product(
            torch.cat([bcat, -new_b], dim=1), torch.cat([acat, new_a], dim=0)
        ) ** 2
    if ref_sq == 0.0:
        return 0.0 if err_sq == 0.0 else math.inf
    return math.sqrt(err_sq / ref_sq)
