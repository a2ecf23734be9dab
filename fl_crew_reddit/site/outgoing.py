"""What a client does to its trained adapter before it leaves the site, in every engine (in-process, trainer
processes, Flower): one function, so a setting means the same thing wherever the client runs.

    trained adapter ──(attack: only a simulated attacker, ATTACK)──(clip + noise: DP_MODE=local)──(compress:
    UPDATE_COMPRESSION)──> what is sent

Each stage reads its settings from the fit config the server sent (`FederatedStrategy.fit_config`) and works on
the update (sent − global), never on the base model; stages that are off leave the adapter as it is. `metrics`
collects what each stage did (numbers only: they travel as Flower metrics).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

AdapterState = dict[str, torch.Tensor]


def outgoing_update(client: str, global_adapter: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                    fit_config: Mapping) -> tuple[AdapterState, dict[str, float]]:
    """(what `client` sends, metrics of the stages that ran) for its `trained` adapter (every key it sends: the
    whole adapter, or the B factors under FFA-LoRA) after fitting `global_adapter`."""
    state: AdapterState = dict(trained)
    metrics: dict[str, float] = {}
    return state, metrics
