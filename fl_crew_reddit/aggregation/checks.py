"""Screening of client updates before aggregation.

Why: robust rules (Krum, Blanchard 2017; median / trimmed mean, Yin 2018;
Bulyan, El Mhamdi 2018) bound the influence of bad updates, but a single NaN,
a wrong shape or a missing key breaks every rule, including FedAvg (McMahan
2017). These cheap structural checks, plus an optional norm bound on
update - global (the usual clipping threshold), reject such updates by name
with a readable reason before any arithmetic happens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


class NotEnoughClientsError(RuntimeError):
    """Fewer accepted updates than the round needs."""


class GlobalAdapterError(RuntimeError):
    """The global adapter itself is unusable, so no client update can be judged against it: not the clients' fault."""


def check_global(global_state: Mapping[str, Tensor]) -> list[str]:
    """Reasons the global adapter cannot be used (non-tensors, non-finite values); empty when it is sound."""
    reasons = []
    for key, value in global_state.items():
        if not isinstance(value, Tensor):
            reasons.append(f"{key!r} is a {type(value).__name__}, not a tensor")
        elif (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            reasons.append(f"non-finite values at {key!r}: {count} of {value.numel()}")
    return reasons


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def check_update(
    global_state: Mapping[str, Tensor], update: Mapping[str, Tensor], *, max_norm: float | None
) -> list[str]:
    """Reasons to reject ``update`` (an empty list means accepted).

    Checks missing / extra keys, non-tensor values, shape and dtype mismatches,
    non-finite values (key and count), and, when max_norm is given and the update
    is otherwise sound, ||update - global||_2 over all keys > max_norm.
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be positive or None, got {max_norm}")
    if not isinstance(update, Mapping):
        return [f"update is a {type(update).__name__}, not a dict of tensors"]
    reasons: list[str] = []
    missing = [k for k in global_state if k not in update]
    extra = [k for k in update if k not in global_state]
    if missing:
        reasons.append(f"missing keys {_preview(missing)}")
    if extra:
        reasons.append(f"unexpected keys {_preview(extra)}")
    for key, ref in global_state.items():
        if key not in update:
            continue
        value = update[key]
        if not isinstance(value, Tensor):
            reasons.append(f"{key!r} is a {type(value).__name__}, not a tensor")
            continue
        if value.shape != ref.shape:
            reasons.append(
                f"shape mismatch at {key!r}: got {tuple(value.shape)}, expected {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            reasons.append(f"dtype mismatch at {key!r}: got {value.dtype}, expected {ref.dtype}")
        if value.is_floating_point() or value.is_complex():
            bad = ~torch.isfinite(value)
            count = int(bad.sum())
            if count:
                nans = int(torch.isnan(value).sum())
                reasons.append(
                    f"non-finite values at {key!r}: {count} of {value.numel()} "
                    f"(nan={nans}, inf={count - nans})"
                )
    if max_norm is not None and not reasons:
        norm = update_norm(global_state, update)
        if not norm <= max_norm:
            reasons.append(f"update norm {norm:.6g} exceeds max_norm {max_norm:.6g}")
    return reasons


def update_norm(global_state: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> float:
    """||update - global||_2 over all keys, accumulated in float64."""
    total = 0.0
    for key, ref in global_state.items():
        diff = update[key].detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)
        total += float(torch.dot(diff.reshape(-1), diff.reshape(-1)))
    return math.sqrt(total)


def screen_updates(
    global_state: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    max_norm: float | None,
    min_clients: int,
    references: Sequence[Mapping[str, Tensor]] | None = None,
) -> tuple[list[int], dict[str, list[str]]]:
    """Run check_update on every update.

    ``references``: what each update is checked against, one per update, when clients are sent different
    adapters (clients of lower LoRA rank get the global adapter truncated to their rank: other shapes); default:
    ``global_state`` for every update.

    Returns (indices of accepted updates, {name: reasons} for rejected ones).
    Raises NotEnoughClientsError when fewer than ``min_clients`` are accepted.
    """
    if len(names) != len(updates):
        raise ValueError(f"{len(names)} names for {len(updates)} updates")
    if references is not None and len(references) != len(updates):
        raise ValueError(f"{len(references)} references for {len(updates)} updates")
    if len(set(names)) != len(names):
        raise ValueError("client names must be unique")
    if min_clients < 0:
        raise ValueError(f"min_clients must be >= 0, got {min_clients}")
    accepted: list[int] = []
    rejected: dict[str, list[str]] = {}
    for idx, (name, update) in enumerate(zip(names, updates)):
        reference = global_state if references is None else references[idx]
        reasons = check_update(reference, update, max_norm=max_norm)
        if reasons:
            rejected[name] = reasons
        else:
            accepted.append(idx)
    if len(accepted) < min_clients:
        detail = "; ".join(f"{n}: {r[0]}" for n, r in rejected.items())
        raise NotEnoughClientsError(
            f"only {len(accepted)} of {len(updates)} updates accepted, need {min_clients}"
            + (f" (rejected - {detail})" if detail else "")
        )
    return accepted, rejected
