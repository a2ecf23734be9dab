"""The ServerApp's round against a stand-in Grid (no processes): what comes back from the sites is decoded and
screened before the strategy aggregates it, a ClientApp error or an unreadable reply fails only that site, and the
result is exactly what the strategy computes from the accepted updates."""
import json

import pytest
import torch
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import load_file, save_file

from fl_crew_reddit.federation import flower
from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings

KEYS = ("m.lora_A.weight", "m.lora_B.weight")
NODES = {"client-0": 11, "client-1": 12, "client-2": 13, "client-3": 14, "client-4": 15}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What a ServerApp process has set when Flower starts it: messages take their run and node ids from it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _state(value: float) -> dict[str, torch.Tensor]:
    return {KEYS[0]: torch.full((2, 3), value), KEYS[1]: torch.full((3, 2), value)}


class SitesGrid(Grid):
    """Answers query, train and evaluate messages the way each site is scripted to."""

    def __init__(self, train_reply):
        self.train_reply = train_reply
        self.sent: list[Message] = []

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(NODES.values())

    def push_messages(self, messages):
        self.pending = {reply.metadata.reply_to_message_id: reply for reply in self._answer(messages)}
        return list(self.pending)

    def pull_messages(self, message_ids):
        return [self.pending.pop(message_id) for message_id in list(message_ids) if message_id in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("the ServerApp exchanges messages with push_messages / pull_messages")

    def _answer(self, messages):
        replies = []
        site_of = {node: name for name, node in NODES.items()}
        for message in messages:
            self.sent.append(message)
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"
            name = site_of[message.metadata.dst_node_id]
            if message.metadata.message_type == "query":
                content = RecordDict({"site": flower.ConfigRecord({"name": name})})
                reply = Message(content, reply_to=message)
            elif message.metadata.message_type == "train":
                reply = self.train_reply(name, message)
            else:
                reply = Message(RecordDict({"metrics": MetricRecord(
                    {"test.nll_sum": 10.0, "test.num_tokens": 5, "validation.nll_sum": 4.0,
                     "validation.num_tokens": 2})}), reply_to=message)
            reply.metadata.__dict__["_src_node_id"] = message.metadata.dst_node_id
            replies.append(reply)
        return replies


def _reply_with(state, num_examples, message):
    content = flower.pack_adapter(state) if isinstance(state, dict) else state
    content["metrics"] = MetricRecord({"train_loss": 1.5, "num-examples": num_examples})
    return Message(content, reply_to=message)


def test_server_round_screens_what_arrives_and_aggregates_the_rest(tmp_path):
    # Prepare: a job as the launcher writes it, and five scripted sites.
    settings = StrategySettings(aggregation_method="fedavg", min_fit_clients=2, seed=1)
    job_dir = tmp_path / "round-1"
    job_dir.mkdir()
    save_file(_state(0.0), str(job_dir / flower.GLOBAL_IN))
    (job_dir / flower.JOB_FILE).write_text(json.dumps({
        "round": 1, "sites": list(NODES), "strategy": settings.to_dict(), "strategy_state": None,
        "model": {"base_llm_model": "unused"}, "timeout_s": 5}))

    def train_reply(name, message):
        received = flower.to_torch(flower.unpack_adapter(message.content))
        assert all(torch.equal(received[k], _state(0.0)[k]) for k in KEYS)  # the global adapter went down
        assert message.content["config"]["round"] == 1
        if name == "client-1":
            return Message(Error(code=1, reason="RuntimeError: GPU fell off the bus"), reply_to=message)
        if name == "client-2":
            return _reply_with({k: v * float("nan") for k, v in _state(1.0).items()}, 4, message)
        if name == "client-3":
            forged = flower.pack_adapter(_state(1.0))  # the float32 array replaced by a pickle
            forged["arrays"] = ArrayRecord({"float32": Array(dtype="float32", shape=(12,), stype="torch.pickle",
                                                             data=b"\x80\x04.")})
            return _reply_with(forged, 4, message)
        return _reply_with(_state(1.0 if name == "client-0" else 4.0), 1 if name == "client-0" else 3, message)

    # Execute
    result = flower.run_server_round(SitesGrid(train_reply), job_dir)

    # Assert: the error and the unreadable reply failed their sites; the NaN update was rejected by screening.
    assert result["selected"] == list(NODES)
    assert "GPU fell off the bus" in result["failed"]["client-1"]
    assert "could not be read" in result["failed"]["client-3"]
    assert "non-finite" in result["aggregation"]["rejected"]["client-2"][0]
    assert result["aggregation"]["accepted"] == ["client-0", "client-4"]
    expected = FederatedStrategy(settings).aggregate(
        _state(0.0), [ClientUpdate("client-0", _state(1.0), 1), ClientUpdate("client-4", _state(4.0), 3)])
    new_global = load_file(str(job_dir / flower.GLOBAL_OUT))
    assert all(torch.equal(new_global[k], expected.new_global[k]) for k in KEYS)
    assert torch.equal(new_global[KEYS[0]], torch.full((2, 3), 3.25))
    assert result["evaluation"]["test"]["client-0"] == [10.0, 5]
    assert result["clients"]["client-0"]["bytes_up"] > 0 and result["clients"]["client-0"]["bytes_down"] > 0
    outcome = flower.read_outcome(job_dir) if (job_dir / flower.RESULT_FILE).exists() else None
    assert outcome is None  # run_server_round returns the record; the ServerApp's main writes result.json


def test_too_few_accepted_updates_end_the_round_with_the_reason(tmp_path):
    settings = StrategySettings(min_fit_clients=3)
    job_dir = tmp_path / "round-2"
    job_dir.mkdir()
    save_file(_state(0.0), str(job_dir / flower.GLOBAL_IN))
    (job_dir / flower.JOB_FILE).write_text(json.dumps({
        "round": 2, "sites": list(NODES)[:3], "strategy": settings.to_dict(), "strategy_state": None,
        "model": {}, "timeout_s": 5}))

    def train_reply(name, message):
        if name == "client-0":
            return _reply_with(_state(1.0), 1, message)
        return Message(Error(code=1, reason="boom"), reply_to=message)

    result = flower.run_server_round(SitesGrid(train_reply), job_dir)
    assert "only 1 of 1 updates accepted, need 3" in result["error"]
    assert "aggregation" not in result and "evaluation" not in result
    (job_dir / flower.RESULT_FILE).write_text(json.dumps(result))
    outcome = flower.read_outcome(job_dir)
    from fl_crew_reddit.aggregation import NotEnoughClientsError

    with pytest.raises(NotEnoughClientsError):
        outcome.take_aggregation("weighted_average")


def test_local_flower_needs_no_trainer_processes():
    from fl_crew_reddit.config import FLCrewRedditConfig

    assert FLCrewRedditConfig(_env_file=None).federation == "inprocess"
    with pytest.raises(ValueError, match="TRAINER_DEVICES"):
        FLCrewRedditConfig(_env_file=None, federation="local-flower", trainer_devices="cpu,cpu")


def test_a_resumed_round_never_shares_its_folder_with_the_killed_crews_serverapp(tmp_path):
    """A crew killed in round 2 leaves its ServerApp finishing round 2 in `round-2/`. The resumed crew's round 2
    must get a folder that ServerApp was never given: its late result.json (written by path) then cannot be read
    as the resumed round's result (the CI failure: result.json present, new_global.safetensors not)."""
    federation = flower.FlowerFederation(["site-a"], tmp_path)
    first = federation._job_dir("round-2")
    assert first == tmp_path / "round-2"  # the plain name when nothing is in the way
    (first / "global.safetensors").write_bytes(b"x")
    (tmp_path / "round-20").mkdir()  # another round's folder is not an earlier attempt of this one

    resumed = federation._job_dir("round-2")
    assert resumed != first and resumed.name.startswith("round-2.") and list(resumed.iterdir()) == []
    assert not first.exists() and (tmp_path / "round-20").is_dir()
    flower.write_json_atomic(first / flower.RESULT_FILE, {"round": 2, "stale": True})  # the old ServerApp, late
    assert not (resumed / flower.RESULT_FILE).exists()

    again = federation._job_dir("round-2")  # and a third attempt removes both earlier ones
    assert again not in (first, resumed) and not first.exists() and not resumed.exists()
