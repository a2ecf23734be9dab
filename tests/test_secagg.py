"""SECURE_AGGREGATION=true: Flower's SecAgg+ (SecAggPlusWorkflow + secaggplus_mod) gives the server only the weighted
mean of the updates. Fast: the real workflow, mod and our ClientApp on an in-memory grid (synthetic updates; a
dropout; too many dropouts). e2e: a round on FEDERATION=local-flower equals plain FedAvg within SecAgg+'s quantization,
and no individual update reaches the server. And the settings SecAgg+ cannot go with are refused at start."""
import json
import re

import numpy as np
import pytest
import torch
from conftest import tiny_run_config
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from pydantic import ValidationError

from fl_crew_reddit.aggregation import NotEnoughClientsError
from fl_crew_reddit.federation import flower, secagg
from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings

SITES = {1: "site-a", 2: "site-b", 3: "site-c"}
EXAMPLES = {"site-a": 5, "site-b": 12, "site-c": 30}


class MemoryGrid:
    """A Grid whose SuperNodes are our ClientApp called in this process (one Context per node, kept between
    messages as a SuperNode keeps it). Nodes in `silent_from` stop answering from that SecAgg+ stage on."""

    def __init__(self, folders, silent_from=None):
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"site": name, "data-dir": str(folders[name])})
                         for node, name in SITES.items()}
        self.silent_from = silent_from or {}
        self.replies, self.stage_replies = {}, []

    def get_node_ids(self):
        return list(SITES)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message_id = message.object_id
            message.metadata.__dict__["_message_id"] = message_id
            ids.append(message_id)
            message = message_from_proto(message_to_proto(message))  # the wire: a SuperNode gets its own copy
            node = message.metadata.dst_node_id
            stage = message.content.config_records.get("secaggplus_configs", {}).get("stage")
            if stage and self.silent_from.get(node) is not None and \
                    ("setup", "share_keys", "collect_masked_vectors", "unmask").index(stage) >= self.silent_from[node]:
                continue
            try:
                reply = flower.client_app(message, self.contexts[node])
            except Exception as error:  # a SuperNode answers a ClientApp exception with an error message
                reply = Message(error=Error(code=1, reason=str(error)), reply_to=message)
            if stage == "collect_masked_vectors":
                self.stage_replies.append(reply)
            self.replies[message_id] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


@pytest.fixture()
def sites(tmp_path, monkeypatch):
    """Three site folders (train counts 5, 12, 30) and a synthetic `_fit`: site i sends global + its own Δ."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, name, value)
    folders = {}
    for name, count in EXAMPLES.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "train.jsonl").write_text("{}\n" * count)
    generator = torch.Generator().manual_seed(0)
    shapes = {"layer.lora_A.weight": (4, 16), "layer.lora_B.weight": (16, 4)}
    global_adapter = {key: torch.randn(shape, generator=generator) * 0.1 for key, shape in shapes.items()}
    deltas = {name: {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
              for name in EXAMPLES}

    def fake_fit(content, config, settings, context):
        name = str(context.node_config["site"])
        sent = flower.to_torch(flower.unpack_adapter(content))
        return {k: sent[k] + deltas[name][k] for k in sent}, EXAMPLES[name], {"train_loss": 1.5}

    monkeypatch.setattr(flower, "_fit", fake_fit)
    return folders, global_adapter, deltas


def _secure_round(grid, global_adapter, settings, timeout_s=30.0):
    model = {"lora_target_modules": ["q_proj"]}
    return secagg.run_secure_round(grid, {name: node for node, name in SITES.items()}, 1,
                                   flower.pack_adapter(global_adapter), {"round": 1}, model, sorted(global_adapter),
                                   settings, timeout_s, flower.exchange, flower.serialized_bytes)


def _weighted_mean(deltas, names):
    total = sum(EXAMPLES[n] for n in names)
    return {k: sum(deltas[n][k] * EXAMPLES[n] for n in names) / total for k in deltas[names[0]]}


def test_secagg_gives_the_weighted_mean_only_and_survives_a_dropout(sites):
    folders, global_adapter, deltas = sites
    settings = StrategySettings(secure_aggregation=True, max_update_norm=10.0)

    # all three sites: the unmasked mean equals the example-weighted mean within SecAgg+'s quantization
    grid = MemoryGrid(folders)
    result = _secure_round(grid, global_adapter, settings)
    assert result.in_sum == ["site-a", "site-b", "site-c"] and result.failed == {}
    p = result.parameters
    bound = secagg.error_bound(3, p.clipping_range, p.quantization_range, list(EXAMPLES.values()), p.max_weight)
    expected = torch.cat([_weighted_mean(deltas, result.in_sum)[k].reshape(-1) for k in sorted(global_adapter)])
    error = float(np.abs(result.mean - expected.double().numpy()).max())
    print(f"\nSecAgg+ mean vs weighted mean: max abs error {error:.3g} (bound {bound:.3g}; q={p.quantization_range}, "
          f"c={p.clipping_range}, max_weight={p.max_weight})")
    assert error <= bound and bound < 1e-4
    # what the server received of each client: counts and metrics, never an array; the masked vectors it summed
    # came without any clear-text array (secaggplus_mod cleared them)
    assert set(result.clients["site-b"]) == {"num_examples", "metrics", "bytes_down", "bytes_up"}
    assert result.clients["site-b"]["num_examples"] == 12
    assert all(not record for reply in grid.stage_replies for record in reply.content.array_records.values())
    assert all("masked_params" in reply.content.config_records["secaggplus_configs"] for reply in grid.stage_replies)

    # the strategy turns the mean into the new global adapter (the mean itself for weighted_average)
    mean = {}
    offset = 0
    for key in sorted(global_adapter):
        size = global_adapter[key].numel()
        mean[key] = torch.from_numpy(result.mean[offset:offset + size].copy()).reshape(global_adapter[key].shape)
        offset += size
    outcome = FederatedStrategy(settings).aggregate_secure(global_adapter, mean, result.in_sum)
    assert outcome.secure_aggregation == {"clients_in_sum": 3} and outcome.update_norms == {}
    for key, value in global_adapter.items():
        torch.testing.assert_close(outcome.new_global[key], value + mean[key].float())

    # site-c drops after sharing its keys: its masks are reconstructed from the others' shares, the sum is of two
    grid = MemoryGrid(folders, silent_from={3: 2})
    result = _secure_round(grid, global_adapter, settings, timeout_s=2.0)
    assert result.in_sum == ["site-a", "site-b"] and "site-c" in result.failed
    assert "no reply" in result.failed["site-c"]
    expected = torch.cat([_weighted_mean(deltas, ["site-a", "site-b"])[k].reshape(-1) for k in sorted(global_adapter)])
    assert float(np.abs(result.mean - expected.double().numpy()).max()) <= bound * 2


def test_secagg_round_that_loses_too_many_clients_fails_clearly(sites, tmp_path):
    folders, global_adapter, _ = sites
    settings = StrategySettings(secure_aggregation=True, max_update_norm=10.0)
    grid = MemoryGrid(folders, silent_from={2: 2, 3: 2})  # two of three drop: 1 < the 2 shares each secret needs
    result = flower._run_secure_round(grid, tmp_path, FederatedStrategy(settings), global_adapter,
                                      {name: node for node, name in SITES.items()}, {}, list(EXAMPLES),
                                      ConfigRecord({"round": 1}), ConfigRecord({"lora_target_modules": ["q_proj"]}),
                                      {}, 2.0, print)
    assert re.search(r"could not reconstruct the sum.*need 2 of 3 shares.*No model", result["error"])
    assert "aggregation" not in result and not (tmp_path / flower.GLOBAL_OUT).exists()
    assert set(result["failed"]) == set(EXAMPLES)  # each sampled site's outcome names why
    # the crew's side: the round fails as one with too few updates (the run stops, completed rounds saved)
    outcome = flower.FlowerRoundOutcome(round=1, selected=list(EXAMPLES), failed=result["failed"], results={},
                                        aggregation=None, error=result["error"])
    with pytest.raises(NotEnoughClientsError, match="SecAgg"):
        outcome.take_aggregation("weighted_average")
    # fewer clients in the sum than MIN_FIT_CLIENTS: the round fails like any round with too few updates
    strategy = FederatedStrategy(StrategySettings(secure_aggregation=True, min_fit_clients=3))
    zero = {k: torch.zeros_like(v) for k, v in global_adapter.items()}
    with pytest.raises(NotEnoughClientsError, match="SecAgg"):
        strategy.aggregate_secure(global_adapter, zero, ["site-a", "site-b"], num_failed=1)


def test_settings_secagg_cannot_go_with_are_refused(tiny_model_dir, tmp_path):
    def refused(**overrides):
        with pytest.raises(ValidationError) as caught:
            tiny_run_config(tiny_model_dir, tmp_path, secure_aggregation=True, **overrides)
        return str(caught.value)

    assert "SECURE_AGGREGATION=true with FEDERATION=inprocess" in refused()
    for method in ("krum", "median", "trimmed_mean", "bulyan", "svd_exact"):
        assert f"AGGREGATION_METHOD={method} needs individual updates" in refused(
            federation="local-flower", aggregation_method=method)
    assert "DP_MODE=central" in refused(federation="local-flower", dp_mode="central", dp_noise_multiplier=1.0)
    assert "UPDATE_COMPRESSION=topk" in refused(federation="local-flower", update_compression="topk")
    for method in ("weighted_average", "fedprox", "fedadam"):  # the mean is all they need
        assert tiny_run_config(tiny_model_dir, tmp_path, secure_aggregation=True, federation="local-flower",
                               aggregation_method=method).secure_aggregation


# The run-level SecAgg+ round on a real local federation (SuperLink + SuperNodes), against in-process FedAvg
# within the bound above: tests/test_multimodal_flower.py::test_secagg_sums_the_projector_with_the_adapter.


@pytest.mark.e2e
def test_a_run_whose_secagg_round_cannot_reconstruct_stops_with_its_state_saved(tiny_config, monkeypatch, capsys):
    """Bad input, at the run level: the ServerApp's SecAgg+ failure (the error `_run_secure_round` returns, see
    above) reaches the workspace as NotEnoughClientsError from `FlowerRoundOutcome.take_aggregation`, in the
    round's aggregate step. The run stops with one clear line that says so and how to continue; round 1's state is
    saved and no round-2 model was made (never a silently wrong model)."""
    import logging
    import signal

    from fl_crew_reddit import FLCrewRedditManager, main
    from fl_crew_reddit.workspace import FederatedWorkspace

    message = ("SecAgg+ round 2 could not reconstruct the sum: in stage 'unmask' 1 of 3 client(s) answered, need 2 "
               "of 3 shares of each secret. No model was made from this round")
    outcome = flower.FlowerRoundOutcome(round=2, selected=["client-0", "client-1", "client-2"], failed={},
                                        results={}, aggregation=None, error=message)
    original = FederatedWorkspace.aggregate

    def aggregate(self, round_number, method=None):
        if round_number == 2:  # what the Flower path does with a failed SecAgg+ round
            outcome.take_aggregation(method or self.config.aggregation_method)
        return original(self, round_number, method)

    FLCrewRedditManager(tiny_config).run_federated_learning(num_rounds=1, run_id="run-secagg")
    for name, value in tiny_config.model_dump(mode="json").items():
        if value is not None and not isinstance(value, (dict, list)) and "secret" not in name \
                and "key" not in name and "client_id" not in name:
            monkeypatch.setenv(name.upper(), str(value))
    handler = signal.getsignal(signal.SIGINT)
    try:
        monkeypatch.setattr(FederatedWorkspace, "aggregate", aggregate)
        assert main.main(["run", "--resume", "run-secagg", "--rounds", "2"]) == 1
        stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Run stopped")]
        assert len(stopped) == 1 and "could not reconstruct the sum" in stopped[0] and "need 2 of 3" in stopped[0]
        assert "Completed rounds are saved" in stopped[0] and "--resume run-secagg" in stopped[0]
        results = tiny_config.fl_crew_reddit_dir / "results" / "run-secagg"
        history = json.loads((results / "history.json").read_text())
        assert [r["round"] for r in history["rounds"] if r.get("aggregation")] == [1]  # no round-2 model
        assert (tiny_config.fl_crew_reddit_dir / "models" / "aggregated" / "run-secagg" / "round-1").is_dir()
        assert not (tiny_config.fl_crew_reddit_dir / "models" / "aggregated" / "run-secagg" / "round-2").exists()
        assert (results / "state" / "round-1").is_dir()  # round 1's state, which --resume continues from
    finally:
        signal.signal(signal.SIGINT, handler)
        root = logging.getLogger()
        for console in [h for h in root.handlers if getattr(h, "fl_crew_reddit_console", False)]:
            root.removeHandler(console)
