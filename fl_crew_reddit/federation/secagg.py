"""SECURE_AGGREGATION=true on Flower (FEDERATION=local-flower / flower): Flower's own SecAgg+ protocol
(`flwr.server.workflow.SecAggPlusWorkflow` on the ServerApp, `flwr.client.mod.secaggplus_mod` on the ClientApp; no
cryptography of ours). The server learns the weighted sum of the round's updates (divided by the summed weights:
their weighted mean), never one client's update.

How a SecAgg round runs (flwr 1.39: the workflow speaks the legacy `fit` message layout and needs a LegacyContext
with a legacy Strategy, so a SecAgg round has its own code path; every other round is unchanged):
1. The ServerApp asks each sampled site how many train examples it holds (a count it already reported when the data
   was prepared) and picks SecAgg+'s parameters from them and from the update bound (`secagg_parameters`).
2. `SecAggPlusWorkflow` runs its four stages (setup, share keys, collect masked vectors, unmask) over the Grid.
   In the third, `secaggplus_mod` calls our train handler, which trains as usual and answers with the update
   Δ = sent − global (flat float64, the keys in the order the server named), clipped to the bound on the site, and
   its num_examples; the mod multiplies Δ by num_examples / max_weight, quantizes it, adds its masks and sends only
   the masked integers (it clears the clear-text arrays from the reply).
3. The workflow unmasks the sum and hands `_SumOnlyStrategy.aggregate_fit` the weighted mean of the Δs (the same
   array in every client's FitRes: no individual update exists on the server). `FederatedStrategy.aggregate_secure`
   turns it into the new global adapter (the rule's post-processing only: the mean itself, or one server-optimizer
   step).

Quantization: each client's Δ·w_i (w_i = num_examples_i / max_weight ≤ 1) is clipped to [−c, c] and rounded
stochastically to a grid of 2c / q, so the mean is exact up to n·(2c/q) / Σw_i per element (`error_bound`).
c is the bound every element of a (clipped) update keeps: MAX_UPDATE_NORM (each site clips its Δ's L2 norm to it,
so no element is cut), or under DP_MODE=local DP_CLIP_NORM·(1 + 6·DP_NOISE_MULTIPLIER) (the clipped update plus six
standard deviations of its Gaussian noise; an element beyond that is cut by the quantizer, which is post-processing
and is counted in the client's metrics). q is the largest power of two with n·q ≤ 2³¹ (at most 2³⁰), so the sum
of n quantized vectors never wraps around the 2³² modulus; max_weight is the largest train count of the sampled
sites (a site with more examples than that refuses, so a weight is never clipped silently).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable

if TYPE_CHECKING:
    from flwr.serverapp import Grid

FIT_KEY = "fl_crew"  # the one entry of a SecAgg+ round's legacy fit config: our instruction as JSON
MOD_RANGE = 2 ** 32  # SecAgg+'s modulus (Flower's default)
MIN_CLIENTS = 2  # SecAgg+ sums at least two vectors


class SecAggFailed(RuntimeError):
    """A SecAgg+ round that could not produce the sum (too few clients answered to reconstruct it)."""


# --- the parameters ------------------------------------------------------------------------------------------------
def clipping_range(settings) -> float:
    """c of SecAgg+'s quantizer: the bound every element of a site's (clipped) update keeps (module docstring)."""
    if settings.dp_mode == "local":
        return float(settings.dp_clip_norm * (1.0 + 6.0 * settings.dp_noise_multiplier))
    return float(settings.max_update_norm)


def quantization_range(num_clients: int) -> int:
    """The largest power of two q ≤ 2**30 with num_clients·q ≤ 2**31: the sum never wraps around 2**32."""
    return 2 ** min(30, 31 - math.ceil(math.log2(max(num_clients, 2))))


def reconstruction_threshold(num_clients: int, fraction: float) -> int:
    """The shares SecAggPlusWorkflow will need per client (its own formula, every client a neighbour of all)."""
    return max(round(fraction * num_clients), 2)


def error_bound(num_clients: int, clip: float, q: int, weights: list[float], max_weight: float) -> float:
    """Largest error of one element of the unmasked weighted mean: each client's stochastic rounding moves its
    weighted value by less than one step 2c/q; the mean divides the sum by Σ w_i / max_weight."""
    return num_clients * (2.0 * clip / q) / (sum(weights) / max_weight)


@dataclass
class SecAggParameters:
    num_clients: int
    threshold_fraction: float
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout_s: float

    def to_dict(self) -> dict:
        return {"clients_sampled": self.num_clients,
                "reconstruction_threshold": reconstruction_threshold(self.num_clients, self.threshold_fraction),
                "clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
                "modulus_range": MOD_RANGE, "max_weight": self.max_weight}


# --- the ServerApp side --------------------------------------------------------------------------------------------
@dataclass
class _Stage:
    name: str
    asked: set[int] = field(default_factory=set)
    answered: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)


class _CountingGrid:
    """The Grid as SecAggPlusWorkflow sees it: `send_and_receive` through `exchange` (replies asked for every 0.2 s
    instead of Flower's 3 s) that also notes who answered each stage, the errors and the bytes per node."""

    STAGES = ("setup", "share keys", "collect masked vectors", "unmask")

    def __init__(self, grid: Grid, exchange, serialized_bytes):
        self.grid, self._exchange, self._bytes = grid, exchange, serialized_bytes
        self.stages: list[_Stage] = []
        self.bytes_down: dict[int, int] = {}
        self.bytes_up: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        stage = _Stage(self.STAGES[min(len(self.stages), 3)], asked={m.metadata.dst_node_id for m in messages})
        self.stages.append(stage)
        for message in messages:
            node = message.metadata.dst_node_id
            self.bytes_down[node] = self.bytes_down.get(node, 0) + self._bytes(message)
        replies = self._exchange(self.grid, messages, timeout if timeout is not None else 1e9)
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                stage.errors[node] = f"ClientApp error {reply.error.code}: {(reply.error.reason or '').strip()[-800:]}"
            else:
                stage.answered.add(node)
                self.bytes_up[node] = self.bytes_up.get(node, 0) + self._bytes(reply)
        return replies


def _sum_only_strategy(fit_ins: dict, grid: Grid):
    """A legacy Strategy that configures the given FitIns and keeps what SecAggPlusWorkflow hands aggregate_fit (the
    unmasked weighted mean, the same in every FitRes, and each client's num_examples and metrics); it never sees an
    individual update because none exists on the server."""
    from flwr.common import parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import Strategy

    class SumOnlyStrategy(Strategy):
        def __init__(self):
            self.mean: list | None = None
            self.clients: dict[int, tuple[int, dict]] = {}

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(node, grid, 0), ins) for node, ins in fit_ins.items()]

        def aggregate_fit(self, server_round, results, failures):
            arrays = [parameters_to_ndarrays(res.parameters) for _, res in results]
            if arrays and any(len(a) != len(arrays[0]) or any((x != y).any() for x, y in zip(a, arrays[0],
                                                                                              strict=True))
                              for a in arrays):
                raise RuntimeError("SecAgg+ handed the strategy different arrays per client; expected one sum")
            self.mean = arrays[0] if arrays else None
            self.clients = {proxy.node_id: (int(res.num_examples), dict(res.metrics)) for proxy, res in results}
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return SumOnlyStrategy()


@dataclass
class SecureRound:
    """What a SecAgg+ round gave the server: the weighted mean of the Δs (flat, the server's key order), who is in the
    sum, what each sampled client reported (num_examples, metrics; no update), who failed and why."""

    mean: Any  # numpy float64 flat vector
    in_sum: list[str]
    clients: dict[str, dict]
    failed: dict[str, str]
    parameters: SecAggParameters


def run_secure_round(grid: Grid, nodes: dict[str, int], round_number: int, packed: RecordDict, fit_config: dict,
                     model: dict, delta_keys: list[str], settings, timeout_s: float, exchange,
                     serialized_bytes) -> SecureRound:
    """Train the sampled sites (`nodes`: {site: node id}) from the packed global adapter and get the weighted mean of
    their updates through SecAgg+ (`SecAggPlusWorkflow` on `grid`). SecAggFailed, naming the stage and the counts,
    when too few clients stayed to reconstruct the sum."""
    import numpy as np
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey

    site_of = {node: name for name, node in nodes.items()}
    if len(nodes) < MIN_CLIENTS:
        raise SecAggFailed(f"SecAgg+ round {round_number} needs at least {MIN_CLIENTS} clients to sum; "
                           f"{len(nodes)} sampled site(s) are connected ({', '.join(nodes) or 'none'})")
    # 1. the sampled sites' train counts (already reported when their data was prepared): SecAgg+'s max_weight
    queries = [Message(RecordDict({"config": ConfigRecord({"ask": "examples"})}), dst_node_id=node,
                       message_type=MessageType.QUERY) for node in nodes.values()]
    counts = {}
    for reply in exchange(grid, queries, timeout_s):
        if not reply.has_error():
            counts[site_of.get(reply.metadata.src_node_id)] = int(reply.content["data"]["train"])
    max_weight = float(max([c for c in counts.values() if c > 0], default=1))
    params = SecAggParameters(num_clients=len(nodes), threshold_fraction=float(settings.secagg_threshold),
                              clipping_range=clipping_range(settings),
                              quantization_range=quantization_range(len(nodes)), max_weight=max_weight,
                              timeout_s=timeout_s)

    # 2. the workflow: our instruction travels as a legacy FitIns (the layout SecAgg+'s mod expects)
    layout = packed["layout"]
    instruction = json.dumps({"config": fit_config, "model": model, "delta_keys": delta_keys,
                              "layout": {"keys": list(layout["keys"]), "dtypes": list(layout["dtypes"]),
                                         "shapes": str(layout["shapes"])},
                              "array_dtypes": list(packed["arrays"].keys()),
                              "clip_norm": None if settings.dp_mode == "local" else params.clipping_range,
                              "clipping_range": params.clipping_range, "max_weight": max_weight})
    arrays = [packed["arrays"][dtype].numpy() for dtype in packed["arrays"].keys()]
    fit_ins = {node: FitIns(ndarrays_to_parameters(arrays), {FIT_KEY: instruction}) for node in nodes.values()}
    strategy = _sum_only_strategy(fit_ins, grid)
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_number}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=strategy)
    counting = _CountingGrid(grid, exchange, serialized_bytes)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=params.threshold_fraction,
                                  max_weight=max_weight, clipping_range=params.clipping_range,
                                  quantization_range=params.quantization_range, modulus_range=MOD_RANGE,
                                  timeout=timeout_s)
    workflow(counting, context)

    # 3. who is in the sum, who failed and why
    failed: dict[str, str] = {}
    for stage in counting.stages:
        for node in stage.asked:
            name = site_of.get(node)
            if name in failed:
                continue
            if node in stage.errors:
                failed[name] = f"SecAgg+ stage '{stage.name}': {stage.errors[node]}"
            elif node not in stage.answered:
                failed[name] = f"SecAgg+ stage '{stage.name}': no reply within {timeout_s:.0f}s"
    collected = counting.stages[2].answered if len(counting.stages) > 2 else set()
    in_sum = sorted(site_of[node] for node in collected)
    if strategy.mean is None:
        last = counting.stages[-1] if counting.stages else _Stage("setup")
        threshold = reconstruction_threshold(len(nodes), params.threshold_fraction)
        raise SecAggFailed(
            f"SecAgg+ round {round_number} could not reconstruct the sum: in stage '{last.name}' "
            f"{len(last.answered)} of {len(last.asked)} clients answered and each client's secrets need "
            f"{threshold} of {len(nodes)} shares (SECAGG_THRESHOLD={params.threshold_fraction:g}); failed: "
            + ("; ".join(f"{name}: {why}" for name, why in sorted(failed.items())) or "none")
            + ". No model was made from this round")
    clients = {}
    for node, (num_examples, metrics) in strategy.clients.items():
        name = site_of[node]
        if num_examples > max_weight:  # the site refuses this itself; never let a clipped weight through
            raise SecAggFailed(f"{name} reported {num_examples} examples, above SecAgg+'s max_weight {max_weight:g}")
        clients[name] = {"num_examples": num_examples, "metrics": metrics,
                         "bytes_down": counting.bytes_down.get(node, 0), "bytes_up": counting.bytes_up.get(node, 0)}
    return SecureRound(mean=np.asarray(strategy.mean[0], dtype=np.float64).reshape(-1), in_sum=in_sum,
                       clients=clients, failed=failed, parameters=params)


# --- the ClientApp side --------------------------------------------------------------------------------------------
def secaggplus_when_asked(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for the train messages of a SecAgg+ round (they carry its config record); every
    other message goes straight to the handler."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


def is_secure_fit(message: Message) -> bool:
    return "fitins.config" in message.content.config_records


def secure_fit_reply(message: Message, fit) -> Message:
    """The site's answer to a SecAgg+ train instruction, for `secaggplus_mod` to mask: its update Δ = sent − global
    over the keys the server named (one flat float32 array), clipped on the site to the bound, and num_examples.
    `fit(content, config, model) -> (state, num_examples, metrics)` trains as in any other round."""
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from fl_crew_reddit.federation.flower import unpack_adapter

    ins = compat.recorddict_to_fitins(message.content, keep_input=True)
    instruction = json.loads(str(ins.config[FIT_KEY]))
    arrays = parameters_to_ndarrays(ins.parameters)
    content = RecordDict({"arrays": ArrayRecord({dtype: _array(values) for dtype, values
                                                 in zip(instruction["array_dtypes"], arrays, strict=True)}),
                          "layout": ConfigRecord(instruction["layout"])})
    global_state = unpack_adapter(content)
    started = time.perf_counter()
    state, num_examples, metrics = fit(content, instruction["config"], instruction["model"])
    state = {key: (value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value))
             for key, value in state.items()}
    if sorted(state) != sorted(instruction["delta_keys"]):
        raise ValueError(f"the trained update holds keys {sorted(state)[:3]}..., not the "
                         f"{len(instruction['delta_keys'])} the server asked for")
    if num_examples > float(instruction["max_weight"]):
        raise ValueError(f"{num_examples} train examples, above SecAgg+'s max_weight {instruction['max_weight']:g} "
                         "(the train count this site reported): refusing to send a weight SecAgg+ would clip")
    delta = np.concatenate([(state[key].astype(np.float64) - global_state[key].astype(np.float64)).reshape(-1)
                            for key in instruction["delta_keys"]])
    norm = float(np.linalg.norm(delta))
    clipped = 0
    if instruction["clip_norm"] is not None and norm > float(instruction["clip_norm"]):
        delta *= float(instruction["clip_norm"]) / norm  # this site bounds its own contribution (no server screen)
        clipped = 1
    cut = int(np.count_nonzero(np.abs(delta) > float(instruction["clipping_range"])))
    metrics = {key: value for key, value in metrics.items() if isinstance(value, (int, float))}
    metrics.update({"secagg_clipped": clipped, "secagg_elements_cut": cut,
                    "secagg_train_seconds": time.perf_counter() - started})
    # float64: the mod shifts each value by c before quantizing, which in float32 would cost ulp(c) (~1e-6 at c=10),
    # thirty times SecAgg+'s own rounding (this array never leaves the site: the mod sends only masked integers)
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([delta]), int(num_examples), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=message)


def _array(values):
    from flwr.app import Array

    return Array(values)
