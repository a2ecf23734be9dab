"""Pure aggregation rules over (LoRA adapter) state dicts.

Entry point: ``aggregate(method, states, num_examples, **options)``.

- fedavg / weighted_average (McMahan 2017), fedprox (Li 2020; mu is client-side)
- krum / multi_krum (Blanchard 2017), median / trimmed_mean (Yin 2018),
  bulyan (El Mhamdi 2018) -- semantics of flwr.server.strategy.aggregate
- svd_exact: average LoRA products B @ A, re-factor by truncated SVD
  (FFA-LoRA, Sun 2024, is the frozen-A alternative: see ffa_lora_trainable)
- fedavgm / fedadam / fedyogi / fedadagrad (Reddi 2021): weighted average,
  then ``server_optimizer.step(global_state, average)``; pass
  ``global_state=...`` and ``server_optimizer=make_server_optimizer(name)``.

torch + stdlib only; nothing here touches disk or network. Inputs are never
modified; results are new CPU tensors in each key's input dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from .checks import GlobalAdapterError, NotEnoughClientsError, check_global, check_update, screen_updates, update_norm
from .lora_exact import ffa_lora_trainable, lora_pairs, lora_product_error, svd_exact
from .rules import (
    bulyan,
    fedavg,
    fedprox,
    krum,
    median,
    multi_krum,
    pairwise_sq_distances,
    trimmed_mean,
    weighted_average,
)
from .server_optimizers import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    make_server_optimizer,
)

StateDict = dict[str, Tensor]

RULES: dict[str, Callable[..., StateDict]] = {
    "weighted_average": weighted_average,
    "fedavg": fedavg,
    "fedprox": fedprox,
    "krum": krum,
    "multi_krum": multi_krum,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "bulyan": bulyan,
    "svd_exact": svd_exact,
}

SUPPORTED_METHODS = tuple(RULES) + tuple(SERVER_OPTIMIZERS)


def _with_server_optimizer(
    name: str,
    states: Sequence[StateDict],
    num_examples: Sequence[int],
    global_state: StateDict | None = None,
    server_optimizer: ServerOptimizer | None = None,
) -> StateDict:
    expected = SERVER_OPTIMIZERS[name]
    if global_state is None or not isinstance(server_optimizer, expected):
        raise ValueError(
            f"method {name!r} needs global_state=... and server_optimizer="
            f"make_server_optimizer({name!r}) (a {expected.__name__})"
        )
    return server_optimizer.step(global_state, weighted_average(states, num_examples))


def aggregate(
    method: str, states: Sequence[StateDict], num_examples: Sequence[int], **options: Any
) -> StateDict:
    """Aggregate client state dicts with the named rule; see SUPPORTED_METHODS.

    Options per rule: krum(num_byzantine), multi_krum(num_byzantine,
    num_selected), trimmed_mean(beta), bulyan(num_byzantine); server-optimizer
    methods take global_state and server_optimizer. Unknown options raise
    TypeError, unknown methods ValueError.
    """
    if method in RULES:
        return RULES[method](states, num_examples, **options)
    if method in SERVER_OPTIMIZERS:
        return _with_server_optimizer(method, states, num_examples, **options)
    raise ValueError(f"unknown aggregation method {method!r}; supported: {', '.join(SUPPORTED_METHODS)}")


__all__ = [
    "RULES",
    "SUPPORTED_METHODS",
    "FedAdagrad",
    "FedAdam",
    "FedAvgM",
    "FedYogi",
    "GlobalAdapterError",
    "NotEnoughClientsError",
    "ServerOptimizer",
    "aggregate",
    "bulyan",
    "check_global",
    "check_update",
    "fedavg",
    "fedprox",
    "ffa_lora_trainable",
    "krum",
    "lora_pairs",
    "lora_product_error",
    "make_server_optimizer",
    "median",
    "multi_krum",
    "pairwise_sq_distances",
    "screen_updates",
    "svd_exact",
    "trimmed_mean",
    "update_norm",
    "weighted_average",
]
