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

from fl_crew_reddit.site.attacks import attack_update

AdapterState = dict[str, torch.Tensor]


def outgoing_update(client: str, global_adapter: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                    fit_config: Mapping, *, error_feedback: dict[str, torch.Tensor] | None = None
                    ) -> tuple[AdapterState, dict[str, float]]:
    """(what `client` sends, metrics of the stages that ran) for its `trained` adapter (every key it sends: the
    whole adapter, or the B factors under FFA-LoRA) after fitting `global_adapter`.

    `error_feedback`: this client's residual (UPDATE_COMPRESSION topk / sign), a dict the compression stage reads and
    then replaces in place with the new residual; its keeper saves it (the workspace with the run state, a Flower
    site in its own folder). None: top-k without memory (what it drops is lost)."""
    # 1. attack (a simulated attacker only, ATTACK): the update after honest training is rewritten
    state, metrics = attack_update(client, global_adapter, trained, fit_config)
    if fit_config.get("dp_mode") == "local":
        state = _local_dp(client, global_adapter, state, fit_config, metrics)
    if fit_config.get("update_compression", "none") != "none":  # last: it changes the form of what is sent
        state = _compress(global_adapter, state, fit_config, error_feedback, metrics)
    return state, metrics


def _compress(global_adapter: Mapping[str, torch.Tensor], state: AdapterState, fit_config: Mapping,
              error_feedback: dict[str, torch.Tensor] | None, metrics: dict[str, float]) -> AdapterState:
    """UPDATE_COMPRESSION: the update (state − global, float32) as a payload of tensors (aggregation/compression.py),
    which the server decompresses and adds back to the global adapter before screening. Top-k and sign add this client's
    residual first and keeps what it drops as the next residual (error feedback)."""
    from fl_crew_reddit.aggregation.compression import (
        ERROR_FEEDBACK_KINDS,
        compress,
        compress_with_feedback,
        payload_bytes,
    )

    kind, fraction = str(fit_config["update_compression"]), float(fit_config.get("topk_fraction", 0.05))
    update = {key: value.detach().to("cpu", torch.float32) - global_adapter[key].detach().to("cpu", torch.float32)
              for key, value in state.items()}
    if kind in ERROR_FEEDBACK_KINDS and error_feedback is not None:
        payload, residual = compress_with_feedback(update, error_feedback, kind, topk_fraction=fraction)
        error_feedback.clear()
        error_feedback.update(residual)
        metrics["error_feedback_norm"] = float(sum(float((r.double() ** 2).sum()) for r in residual.values()) ** 0.5)
    else:
        payload = compress(update, kind, topk_fraction=fraction)
    dense = sum(v.numel() * v.element_size() for v in state.values())
    metrics["compression_ratio"] = dense / max(1, payload_bytes(payload))
    return payload


def _local_dp(client: str, global_adapter: Mapping[str, torch.Tensor], state: AdapterState, fit_config: Mapping,
              metrics: dict[str, float]) -> AdapterState:
    """DP_MODE=local: clip the update to DP_CLIP_NORM and add N(0, (σ·C)²) here, before it leaves. A simulated run
    (in-process) seeds the noise from the run's secret (`dp_noise_seed`), so a resume draws it again; a real site
    draws it from the operating system's randomness, which the server never sees."""
    import secrets

    from fl_crew_reddit.aggregation.dp import noise_generator, privatize_locally

    seed = fit_config.get("dp_noise_seed")
    generator = noise_generator(int(seed), "local", int(fit_config.get("round", 0)), client) if seed is not None \
        else torch.Generator().manual_seed(secrets.randbits(63))
    clip_norm = float(fit_config["dp_clip_norm"])
    private, norm = privatize_locally(global_adapter, state, clip_norm=clip_norm,
                                      noise_multiplier=float(fit_config["dp_noise_multiplier"]), generator=generator)
    metrics["dp_update_norm"] = norm
    metrics["dp_clipped"] = float(norm > clip_norm)
    return private
