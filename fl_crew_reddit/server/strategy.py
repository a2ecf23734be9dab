"""The server side of a federated round, pure: which clients train (seeded sampling), what they are told (the fit
config), which updates are let in (screening: keys, shapes, dtypes, finite values, norm) and how the accepted ones
become the new global adapter (the aggregation rule, with its options and the server optimizer's state).

No model, no files, no network: tensors in, tensors out. The in-process workspace and the Flower ServerApp
(fl_crew_reddit/federation/flower.py) call the same object, so both engines give the same global adapter.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from fl_crew_reddit.aggregation import (
    SERVER_OPTIMIZERS,
    GlobalAdapterError,
    NotEnoughClientsError,
    aggregate,
    check_global,
    make_server_optimizer,
    screen_updates,
)
from fl_crew_reddit.aggregation.checks import update_norm
from fl_crew_reddit.aggregation.lora_exact import ffa_lora_trainable
from fl_crew_reddit.aggregation.server_optimizers import ServerOptimizer

StateDict = dict[str, Tensor]
# Rules that need only the (weighted) mean of the updates: the ones SECURE_AGGREGATION allows (config.py refuses
# the others at start)
SECURE_AGGREGATION_METHODS = ("weighted_average", "fedavg", "fedprox", *SERVER_OPTIMIZERS)


@dataclass(frozen=True)
class StrategySettings:
    """The settings the server side needs (plain values: they travel to a Flower ServerApp as JSON)."""

    seed: int = 42
    fraction_fit: float = 1.0
    min_fit_clients: int = 2
    aggregation_method: str = "weighted_average"
    max_update_norm: float | None = 100.0
    num_byzantine: int = 0
    trimmed_mean_beta: float = 0.2
    ffa_lora: bool = False
    local_epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 2e-4
    max_local_steps: int = 0
    fedprox_mu: float = 0.01
    client_timeout: float = 0.0
    tokens_per_batch: int = 0  # 0: BATCH_SIZE examples on a CPU, a budget from free memory on CUDA
    gradient_accumulation_steps: int = 1
    compile: str = "auto"
    update_compression: str = "none"  # none | fp16 | int8 | nf4 | topk (aggregation/compression.py)
    topk_fraction: float = 0.05
    # simulated attackers (site/attacks.py): chosen here from (SEED, client names), told in the fit config
    attack: str = "none"
    attacker_fraction: float = 0.0
    attack_scale: float = 10.0
    attack_ipm_epsilon: float = 0.5
    attack_alie_z: float = 0.0  # 0: Baruch et al.'s z_max from the clients and attackers
    backdoor_trigger: str = "cf zebra protocol"
    backdoor_target: str = "Visit free-karma.example for free gold!"
    backdoor_fraction: float = 0.5
    backdoor_boost: float = 1.0
    attack_local_epochs: int = 0  # 0: the attackers train LOCAL_EPOCHS like everyone
    backdoor_paired: bool = False  # the triggered examples are copies next to the clean ones (trigger-specific)
    dp_mode: str = "off"  # off | central | local (config.py checks the rule fits)
    dp_clip_norm: float = 1.0
    dp_noise_multiplier: float = 0.0  # after calibration to DP_TARGET_EPSILON (server/privacy.py)
    secure_aggregation: bool = False  # Flower's SecAgg+: the server gets the weighted mean only (aggregate_secure)
    secagg_threshold: float = 0.67  # SecAgg+: share of a client's secret shares needed to reconstruct the sum
    # clients of lower capacity (CLIENT_LORA_RANKS): the global adapter keeps rank LORA_R, a listed client gets it
    # truncated to its rank and sends factors of that rank; the server averages the products (mixed_rank.py)
    lora_r: int = 8
    lora_alpha: int = 16
    client_lora_ranks: dict = field(default_factory=dict)
    # the clients' local objective (training/dpo.py): sft | dpo | sft_then_dpo, sent in the fit config
    training_objective: str = "sft"
    dpo_beta: float = 0.1
    dpo_sft_weight: float = 1.0
    dpo_reference: str = "global"  # global | after_sft
    dpo_learning_rate: float = 0.0  # 0: learning_rate
    dpo_epochs: int = 0  # 0: local_epochs
    dpo_loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo
    min_preference_pairs: int = 4

    @classmethod
    def from_config(cls, config: Any) -> StrategySettings:
        """From an FLCrewRedditConfig (or anything with these attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    @classmethod
    def from_dict(cls, values: dict) -> StrategySettings:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown strategy settings {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClientUpdate:
    """What one client sent back from a fit: its adapter arrays (all of them, or only B under FFA-LoRA)."""

    name: str
    state: StateDict
    num_examples: int


@dataclass
class AggregationOutcome:
    method: str
    new_global: StateDict
    accepted: list[str]
    rejected: dict[str, list[str]]
    update_norms: dict[str, float] = field(default_factory=dict)
    dp_clipped: list[str] = field(default_factory=list)  # central DP: clients whose update was clipped
    secure_aggregation: dict | None = None  # SecAgg+: its parameters and how many clients were in the sum
    lora_ranks: dict[str, int] = field(default_factory=dict)  # CLIENT_LORA_RANKS: accepted client -> its rank
    discarded_energy: float | None = None  # mixed ranks: share of the averaged products' energy the rank-R SVD cut


class FederatedStrategy:
    """Sampling, fit config, screening and aggregation of one federation; holds the server optimizer's state."""

    def __init__(self, settings: StrategySettings, noise_secret: int | None = None):
        """`noise_secret`: the run's secret that seeds central DP noise (kept with the run state, never in the
        settings), so a resumed run adds the same noise."""
        self.settings = settings
        self.noise_secret = noise_secret
        self.server_optimizer: ServerOptimizer | None = (
            make_server_optimizer(settings.aggregation_method)
            if settings.aggregation_method in SERVER_OPTIMIZERS else None)
        self._truncated: tuple[StateDict | None, dict[int, StateDict]] = (None, {})  # (global adapter, {rank: sent})

    # --- configure ------------------------------------------------------------------------------------------------
    def sample_clients(self, round_number: int, names: list[str]) -> list[str]:
        """FRACTION_FIT of the clients, at least MIN_FIT_CLIENTS, drawn from (SEED, round): the same on resume and
        in every engine. All clients (in their given order) when that is all of them; else sorted by name."""
        names = list(names)
        wanted = self.clients_per_round(len(names))
        if wanted >= len(names):
            return names
        return sorted(random.Random(f"{self.settings.seed}-select-{round_number}").sample(names, wanted))

    def clients_per_round(self, num_clients: int) -> int:
        """How many of `num_clients` a round samples: FRACTION_FIT of them, at least MIN_FIT_CLIENTS."""
        s = self.settings
        return max(math.ceil(s.fraction_fit * num_clients), min(s.min_fit_clients, num_clients))

    def attackers(self, names: list[str]) -> list[str]:
        """ATTACK: the simulated attackers among the federation's clients (the same every round: site/attacks.py)."""
        from fl_crew_reddit.site.attacks import select_attackers  # (the site package loads the trainer: lazily)

        s = self.settings
        return select_attackers(s.seed, names, s.attacker_fraction) if s.attack != "none" else []

    def fit_config(self, round_number: int, clients: list[str] | None = None) -> dict:
        """What the server sends each trainer with the global adapter (Flower's `config` of a train message).

        With ATTACK set, also the attack and its attackers among `clients` (all of the federation's client names).
        The fit config is the one channel every engine delivers unchanged to each site (in-process, trainer
        processes, Flower SuperNodes), and only the server knows every client's name, so the choice is made here
        and sent; each site checks whether its name is in the list (site/attacks.py)."""
        s = self.settings
        return {"round": round_number, "local_epochs": s.local_epochs, "batch_size": s.batch_size,
                "learning_rate": s.learning_rate, "max_steps": s.max_local_steps, "seed": s.seed,
                "proximal_mu": s.fedprox_mu if s.aggregation_method == "fedprox" else 0.0,
                "timeout_s": s.client_timeout, "train_lora_a": not s.ffa_lora,
                "tokens_per_batch": s.tokens_per_batch, "grad_accum_steps": s.gradient_accumulation_steps,
                "compile": s.compile,
                **({"update_compression": s.update_compression, "topk_fraction": s.topk_fraction}
                   if s.update_compression != "none" else {}),
                **({"dp_mode": "local", "dp_clip_norm": s.dp_clip_norm, "dp_noise_multiplier": s.dp_noise_multiplier}
                   if s.dp_mode == "local" else {}),
                **self.objective_config(),
                **(self._attack_config(clients or []) if s.attack != "none" else {})}

    def objective_config(self) -> dict:
        """The local objective's keys of the fit config ("objective", "dpo_beta", "dpo_sft_weight", "dpo_reference",
        "dpo_learning_rate", "dpo_epochs", "dpo_loss_type", "min_pairs");
        none for plain SFT, which is what a trainer does without them, so an SFT run's fit config is what it always
        was."""
        s = self.settings
        if s.training_objective == "sft":
            return {}
        return {"objective": s.training_objective, "dpo_beta": float(s.dpo_beta),
                "dpo_sft_weight": float(s.dpo_sft_weight), "dpo_reference": str(s.dpo_reference),
                "dpo_learning_rate": float(s.dpo_learning_rate), "dpo_epochs": int(s.dpo_epochs),
                "dpo_loss_type": str(s.dpo_loss_type),
                "min_pairs": int(s.min_preference_pairs)}

    def _attack_config(self, clients: list[str]) -> dict:
        from fl_crew_reddit.site.attacks import attack_fit_config

        s = self.settings
        return attack_fit_config(s.attack, self.attackers(clients), len(clients), scale=s.attack_scale,
                                 ipm_epsilon=s.attack_ipm_epsilon, alie_z=s.attack_alie_z,
                                 backdoor_trigger=s.backdoor_trigger, backdoor_target=s.backdoor_target,
                                 backdoor_fraction=s.backdoor_fraction, backdoor_boost=s.backdoor_boost,
                                 local_epochs=s.attack_local_epochs, backdoor_paired=s.backdoor_paired)

    # --- screen and aggregate -------------------------------------------------------------------------------------
    def client_rank(self, client: str) -> int:
        """The LoRA rank `client` trains: its CLIENT_LORA_RANKS entry, else LORA_R."""
        return int(self.settings.client_lora_ranks.get(client, self.settings.lora_r))

    def declare_site_ranks(self, declared: dict[str, int]) -> dict[str, int]:
        """FEDERATION=flower: the LoRA ranks sites declare in their own settings (`site --lora-r`). Each site trains
        the smallest of its declared rank, its CLIENT_LORA_RANKS entry and LORA_R (a site of more capacity trains
        LORA_R). Returns the ranks now in force; ValueError, one line naming the settings, when the mix cannot be
        aggregated (the same rules config.py applies to CLIENT_LORA_RANKS at start)."""
        import dataclasses

        s = self.settings
        if not declared:
            return dict(s.client_lora_ranks)
        ranks = dict(s.client_lora_ranks)
        for name, rank in declared.items():
            ranks[name] = min(int(rank), int(ranks.get(name, s.lora_r)), s.lora_r)
        lower = {name: rank for name, rank in ranks.items() if rank != s.lora_r}
        if lower:
            checks = ((s.aggregation_method != "svd_exact", f"AGGREGATION_METHOD={s.aggregation_method}"),
                      (s.ffa_lora, "FFA_LORA=true"), (s.dp_mode == "central", "DP_MODE=central"),
                      (s.update_compression in ("topk", "sign"), f"UPDATE_COMPRESSION={s.update_compression}"),
                      (s.secure_aggregation, "SECURE_AGGREGATION=true"))
            conflicts = [setting for failed, setting in checks if failed]
            if conflicts:
                raise ValueError(f"sites train LoRA ranks below LORA_R={s.lora_r} "
                                 f"({', '.join(f'{n}={r}' for n, r in sorted(lower.items()))}, from their own "
                                 f"`site --lora-r`), which cannot go with {', '.join(conflicts)}: use "
                                 "AGGREGATION_METHOD=svd_exact without FFA-LoRA, central DP, topk/sign compression "
                                 "or SecAgg, or start those sites at LORA_R")
        self.settings = dataclasses.replace(s, client_lora_ranks=ranks)
        return ranks

    def adapter_for(self, client: str | None, global_adapter: StateDict) -> StateDict:
        """What `client` is sent: the global adapter, or for a client of lower rank (CLIENT_LORA_RANKS) its best
        approximation at that rank (FlexLoRA: SVD of each layer's product, at the client's PEFT scale; computed once
        per rank and global adapter)."""
        rank = self.client_rank(client) if client is not None else self.settings.lora_r
        if rank >= self.settings.lora_r:
            return global_adapter
        from fl_crew_reddit.aggregation.mixed_rank import truncate_adapter

        source, cache = self._truncated
        if source is not global_adapter:
            cache = {}
            self._truncated = (global_adapter, cache)
        if rank not in cache:
            cache[rank] = truncate_adapter(global_adapter, rank, alpha=self.settings.lora_alpha)
        return cache[rank]

    def expected_update(self, global_adapter: StateDict, client: str | None = None) -> StateDict:
        """The part of what `client` was sent that it trains and sends back: all of it, or under FFA-LoRA only the B
        factors (A stays global). Updates are screened against it (a client of lower rank: at its rank)."""
        sent = self.adapter_for(client, global_adapter)
        if not self.settings.ffa_lora:
            return sent
        return {key: value for key, value in sent.items() if ffa_lora_trainable(key)}

    def screen(self, global_adapter: StateDict, updates: list[ClientUpdate],
               min_clients: int = 0) -> tuple[list[int], dict[str, list[str]]]:
        """(indices of accepted updates, {client: reasons} for rejected ones); NotEnoughClientsError when fewer than
        `min_clients` pass."""
        # Under DP the clip bounds each update instead of the norm screen (and local DP's noise is far above it)
        max_norm = None if self.settings.dp_mode != "off" else self.settings.max_update_norm
        references = [self.expected_update(global_adapter, u.name) for u in updates]  # each at its client's rank
        return screen_updates(self.expected_update(global_adapter), [u.state for u in updates],
                              [u.name for u in updates], max_norm=max_norm, min_clients=min_clients,
                              references=references)

    def aggregate(self, global_adapter: StateDict, updates: list[ClientUpdate], *, num_failed: int = 0,
                  method: str | None = None, round_number: int = 0) -> AggregationOutcome:
        """Screen the round's updates (in client-name order), combine the accepted ones with the rule, and return the
        new global adapter (in the global adapter's dtypes; keys clients do not send stay as they were).

        The round needs min(MIN_FIT_CLIENTS, clients that were asked) accepted updates, where those asked are the
        updates here plus `num_failed` clients whose training failed."""
        method = method or self.settings.aggregation_method
        bad_global = check_global(global_adapter)
        if bad_global:  # every update would be judged against it and fail: say whose fault it is
            raise GlobalAdapterError(f"the global adapter itself is bad ({'; '.join(bad_global[:3])}): no client "
                                     "update can be checked or combined against it, the clients are not at fault; "
                                     "resume from an earlier saved state")
        updates, undecodable = self.decompress_updates(global_adapter, sorted(updates, key=lambda u: u.name))
        num_failed += len(undecodable)  # asked, and rejected before screening
        sent = self.expected_update(global_adapter)
        try:
            accepted, rejected = self.screen(global_adapter, updates,
                                             min_clients=min(self.settings.min_fit_clients, len(updates) + num_failed))
        except NotEnoughClientsError as error:
            if not undecodable:
                raise
            detail = "; ".join(f"{name}: {reasons[0]}" for name, reasons in undecodable.items())
            raise NotEnoughClientsError(f"{error} (also rejected - {detail})") from None
        rejected = dict(sorted({**undecodable, **rejected}.items()))
        norms = {updates[i].name: update_norm(self.expected_update(global_adapter, updates[i].name),
                                              updates[i].state) for i in accepted}
        clipped: list[str] = []
        ranks = {updates[i].name: self.client_rank(updates[i].name) for i in accepted}
        discarded = None
        if any(rank != self.settings.lora_r for rank in ranks.values()):  # clients of lower rank: on the products
            combined, discarded = self._mixed_rank_mean(global_adapter, [updates[i] for i in accepted], method)
        elif self.settings.dp_mode == "central":  # DP-FedAvg: the noised mean of clipped updates, m fixed in advance
            combined = self._central_dp_mean(sent, [updates[i] for i in accepted], len(updates) + num_failed,
                                             method, round_number)
            clipped = [updates[i].name for i in accepted if norms[updates[i].name] > self.settings.dp_clip_norm]
        else:
            combined = aggregate(method, [updates[i].state for i in accepted],
                                 [updates[i].num_examples for i in accepted], **self.aggregation_options(method, sent))
        new_global = {k: combined[k].to(v.dtype) if k in combined else v for k, v in global_adapter.items()}
        bad_new = check_global(new_global)
        if bad_new:  # accepted updates are finite, so the rule or the server optimizer made it so
            raise GlobalAdapterError(f"aggregating the accepted updates with {method} made the global adapter bad "
                                     f"({'; '.join(bad_new[:3])}); it is not saved, the previous round's state stays")
        return AggregationOutcome(method=method, new_global=new_global, accepted=[updates[i].name for i in accepted],
                                  rejected=rejected, update_norms=norms, dp_clipped=clipped,
                                  lora_ranks=ranks if self.settings.client_lora_ranks else {},
                                  discarded_energy=discarded)

    def _mixed_rank_mean(self, global_adapter: StateDict, accepted: list[ClientUpdate],
                         method: str) -> tuple[StateDict, float]:
        """Clients of different rank: the example-weighted average of their products s(r_i)·B_i·A_i, re-factored at
        rank LORA_R (aggregation/mixed_rank.py); exact when the average has rank <= LORA_R, else the best rank-LORA_R
        approximation, logged with the share of energy it discarded. Only svd_exact averages products."""
        import logging

        from fl_crew_reddit.aggregation.mixed_rank import mixed_rank_average

        if method != "svd_exact" or self.settings.dp_mode == "central":
            raise ValueError(f"clients of different LoRA rank (CLIENT_LORA_RANKS) need AGGREGATION_METHOD=svd_exact "
                             f"without central DP: {method} cannot combine factors of different shapes")
        result = mixed_rank_average([u.state for u in accepted], [u.num_examples for u in accepted],
                                    rank=self.settings.lora_r, alpha=self.settings.lora_alpha, like=global_adapter)
        ranks = ", ".join(f"{u.name}={r}" for u, r in zip(accepted, result.ranks))
        if result.exact:
            logging.getLogger(__name__).info("Mixed-rank aggregation (%s): exact at rank %d", ranks,
                                             self.settings.lora_r)
        else:
            logging.getLogger(__name__).warning(
                "Mixed-rank aggregation (%s): the averaged products have rank above LORA_R=%d in %d layers; the "
                "rank-%d SVD keeps the best approximation and discards %.3g%% of their energy (relative error %.3g)",
                ranks, self.settings.lora_r, result.layers_truncated, self.settings.lora_r,
                100 * result.discarded_energy, result.relative_error)
        return result.state, result.discarded_energy

    def aggregate_secure(self, global_adapter: StateDict, mean_update: StateDict, in_sum: list[str], *,
                         num_failed: int = 0, round_number: int = 0) -> AggregationOutcome:
        """SECURE_AGGREGATION (Flower's SecAgg+): the new global adapter from the example-weighted mean of the round's
        updates (sent − global), which is all the server learns: no individual update reaches this object, so there is
        no screen and no per-client rule, only the rule's post-processing of the mean (the mean itself for
        weighted_average / fedavg / fedprox, one step for a server optimizer). `in_sum`: the clients SecAgg+ summed;
        the round needs min(MIN_FIT_CLIENTS, clients asked) of them, where those asked are `in_sum` plus
        `num_failed`."""
        method = self.settings.aggregation_method
        if method not in SECURE_AGGREGATION_METHODS:
            raise ValueError(f"SECURE_AGGREGATION with AGGREGATION_METHOD={method}: the server sees only the sum of "
                             f"the updates; use one of {', '.join(SECURE_AGGREGATION_METHODS)}")
        bad_global = check_global(global_adapter)
        if bad_global:
            raise GlobalAdapterError(f"the global adapter itself is bad ({'; '.join(bad_global[:3])}); resume from an "
                                     "earlier saved state")
        needed = min(self.settings.min_fit_clients, len(in_sum) + num_failed)
        if len(in_sum) < needed:
            raise NotEnoughClientsError(f"only {len(in_sum)} client(s) in the SecAgg+ sum ({', '.join(in_sum)}), the "
                                        f"round needs {needed} (MIN_FIT_CLIENTS={self.settings.min_fit_clients})")
        sent = self.expected_update(global_adapter)
        if sorted(mean_update) != sorted(sent) or any(mean_update[k].shape != sent[k].shape for k in sent):
            raise ValueError("the SecAgg+ mean does not have the adapter's keys and shapes")
        if not all(bool(torch.isfinite(v).all()) for v in mean_update.values()):
            raise ValueError("the SecAgg+ mean holds non-finite values")
        mean = {k: sent[k].to(torch.float32) + mean_update[k].to(torch.float32) for k in sent}
        combined = aggregate(method, [mean], [1], **self.aggregation_options(method, sent))
        new_global = {k: combined[k].to(v.dtype) if k in combined else v for k, v in global_adapter.items()}
        bad_new = check_global(new_global)
        if bad_new:
            raise GlobalAdapterError(f"applying {method} to the SecAgg+ mean made the global adapter bad "
                                     f"({'; '.join(bad_new[:3])}); it is not saved, the previous round's state stays")
        return AggregationOutcome(method=method, new_global=new_global, accepted=sorted(in_sum), rejected={},
                                  secure_aggregation={"clients_in_sum": len(in_sum)})

    def _central_dp_mean(self, sent: StateDict, accepted: list[ClientUpdate], num_sampled: int, method: str,
                         round_number: int) -> StateDict:
        """global + (Σ clip(Δ_i) + N(0, σ²C²)) / m (aggregation/dp.py), then the rule on that one mean: itself for
        the averaging rules, one step for a server optimizer (post-processing: no privacy cost)."""
        from fl_crew_reddit.aggregation.dp import noise_generator, noisy_clipped_mean

        if self.noise_secret is None:
            raise RuntimeError("DP_MODE=central needs the run's noise secret (FederatedStrategy(noise_secret=...))")
        s = self.settings
        mean, _ = noisy_clipped_mean(sent, [u.state for u in accepted], clip_norm=s.dp_clip_norm,
                                     noise_multiplier=s.dp_noise_multiplier, num_sampled=max(num_sampled, 1),
                                     generator=noise_generator(self.noise_secret, "central", round_number))
        return aggregate(method, [mean], [1], **self.aggregation_options(method, sent))

    def decompress_updates(self, global_adapter: StateDict,
                           updates: list[ClientUpdate]) -> tuple[list[ClientUpdate], dict[str, list[str]]]:
        """UPDATE_COMPRESSION: each client's payload back to what it sent, global + Δ (in the global adapter's dtypes),
        so screening and the rule run unchanged; a payload that cannot be decompressed rejects its client with the
        reason, like a failed screen. (updates as they are, {}) when nothing is compressed."""
        kind = self.settings.update_compression
        if kind == "none":
            return updates, {}
        from fl_crew_reddit.aggregation.compression import decompress

        fraction = self.settings.topk_fraction if kind == "topk" else None
        decoded, rejected = [], {}
        for update in updates:
            expected = self.expected_update(global_adapter, update.name)  # at the client's rank
            try:
                delta = decompress(update.state, expected, kind, topk_fraction=fraction)
            except ValueError as error:
                rejected[update.name] = [f"its update cannot be decompressed (UPDATE_COMPRESSION={kind}): {error}"]
                continue
            state = {k: (v.to(torch.float32) + delta[k]).to(v.dtype) for k, v in expected.items()}
            decoded.append(ClientUpdate(update.name, state, update.num_examples))
        return decoded, rejected

    def aggregation_options(self, method: str, global_state: StateDict) -> dict:
        """Keyword options of `aggregation.aggregate` for `method`. A server-optimizer rule other than
        AGGREGATION_METHOD (an agent switching one round) gets a fresh optimizer and leaves the run's state alone."""
        s = self.settings
        if method in ("krum", "multi_krum", "bulyan"):
            return {"num_byzantine": s.num_byzantine}
        if method == "trimmed_mean":
            return {"beta": s.trimmed_mean_beta}
        if method in SERVER_OPTIMIZERS:
            if method != s.aggregation_method:
                return {"global_state": global_state, "server_optimizer": make_server_optimizer(method)}
            if self.server_optimizer is None:
                self.server_optimizer = make_server_optimizer(method)
            return {"global_state": global_state, "server_optimizer": self.server_optimizer}
        return {}

    # --- state (for resume and for handing the strategy to another process) ---------------------------------------
    def state_dict(self) -> dict | None:
        return self.server_optimizer.state_dict() if self.server_optimizer is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        self.server_optimizer = make_server_optimizer(state["name"])
        self.server_optimizer.load_state_dict(state)
