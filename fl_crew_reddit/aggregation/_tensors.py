"""Shared validation and tensor plumbing for the aggregation rules.

Everything here is pure: inputs are never modified, outputs are new CPU tensors.
Rules work key by key (or on column chunks of a key) so that no n x d matrix of
the whole model is ever built; peak extra memory is one chunk per client.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

# Elements (all clients together) handled per chunk by the coordinate-wise rules.
# About 512K float32 = 2 MiB per buffer: large enough that per-op overhead is
# small, small enough for the sorting network to stay in a 2 MiB L2 cache.
CHUNK_ELEMENTS = 1 << 19


def validate_states(states: Sequence[StateDict], num_examples: Sequence[int]) -> list[str]:
    """Check the common preconditions and return the key order of ``states[0]``.

    Raises ValueError for: no clients, a count list of the wrong length,
    negative / non-integer counts, differing key sets or shapes, non-float tensors.
    """
    if not isinstance(states, Sequence) or len(states) == 0:
        raise ValueError("states must be a non-empty list of state dicts")
    if len(num_examples) != len(states):
        raise ValueError(
            f"len(num_examples)={len(num_examples)} does not match len(states)={len(states)}"
        )
    for count in num_examples:
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"num_examples must be non-negative integers, got {count!r}")
    first = states[0]
    if not isinstance(first, dict) or not first:
        raise ValueError("each state must be a non-empty dict of tensors")
    keys = list(first)
    key_set = set(keys)
    for idx, state in enumerate(states):
        if not isinstance(state, dict):
            raise ValueError(f"state {idx} is not a dict")
        if set(state) != key_set:
            missing = sorted(key_set - set(state))[:3]
            extra = sorted(set(state) - key_set)[:3]
            raise ValueError(
                f"state {idx} has different keys than state 0 (missing {missing}, extra {extra})"
            )
        for key in keys:
            tensor = state[key]
            if not isinstance(tensor, Tensor):
                raise ValueError(f"state {idx}[{key!r}] is not a tensor")
            if not tensor.is_floating_point():
                raise ValueError(f"state {idx}[{key!r}] has non-float dtype {tensor.dtype}")
            if tensor.shape != first[key].shape:
                raise ValueError(
                    f"shape mismatch at {key!r}: state {idx} has {tuple(tensor.shape)}, "
                    f"state 0 has {tuple(first[key].shape)}"
                )
    return keys


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Normalised example weights n_k / sum(n); raises if the total is zero."""
    total = sum(int(c) for c in num_examples)
    if total <= 0:
        raise ValueError("sum(num_examples) must be positive for a weighted rule")
    return [int(c) / total for c in num_examples]


def check_num_byzantine(num_byzantine: int) -> int:
    if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, numbers.Integral):
        raise ValueError(f"num_byzantine must be an int, got {num_byzantine!r}")
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    return int(num_byzantine)


def flat_views(states: Sequence[StateDict], key: str) -> list[Tensor]:
    """1-D CPU views (copies only when needed) of ``key`` for every client."""
    return [state[key].detach().to("cpu").reshape(-1) for state in states]


def column_chunks(numel: int, rows: int) -> list[tuple[int, int]]:
    """Split ``numel`` columns into ranges of about CHUNK_ELEMENTS / rows columns."""
    width = max(1024, CHUNK_ELEMENTS // max(rows, 1))
    return [(start, min(numel, start + width)) for start in range(0, numel, width)]


def weighted_sum_flat(flats: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k w_k x_k, accumulated in float32 (compiled when numba is there; else eager, in place)."""
    from . import _kernels

    if _kernels.AVAILABLE and len(flats) > 1:
        return _kernels.weighted_sum(flats, weights)
    acc = flats[0].to(torch.float32).mul(weights[0])  # mul allocates: input untouched
    for flat, weight in zip(flats[1:], weights[1:]):
        if weight != 0.0:
            acc.add_(flat, alpha=weight)
    return acc


def restore(flat: Tensor, like: Tensor) -> Tensor:
    """Reshape a float32 result to ``like``'s shape and cast to its dtype (CPU)."""
    return flat.reshape(like.shape).to(dtype=like.dtype, device="cpu")


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(n))) if n > 1 else 1
