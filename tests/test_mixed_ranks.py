"""Clients of different capacity (issue 12, item 4): LoRA ranks 4 / 8 / 16 in one federation.

Pure math on small random factors (aggregation/mixed_rank.py), the screen with per-client shapes
(server/strategy.py), the settings that cannot go with mixed ranks (config.py), and an in-process run on the tiny
model: two rounds, each client's saved adapter at its own rank, the global adapter at rank 16, resume bit-exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fl_crew_reddit.aggregation import svd_exact
from fl_crew_reddit.aggregation.mixed_rank import (
    adapter_rank,
    dense_average,
    lora_scale,
    mixed_rank_average,
    truncate_adapter,
)

RANKS = (4, 8, 16)
ALPHA = 32.0
LAYERS = {"q": (40, 36), "v": (24, 36)}  # out, in


def _key(layer: str, factor: str) -> str:
    return f"base_model.model.layers.0.{layer}_proj.lora_{factor}.weight"


def _random_state(rank: int, gen: torch.Generator, dtype=torch.float64) -> dict[str, torch.Tensor]:
    state = {}
    for layer, (out, inp) in LAYERS.items():
        state[_key(layer, "A")] = torch.randn(rank, inp, generator=gen, dtype=torch.float64).to(dtype)
        state[_key(layer, "B")] = torch.randn(out, rank, generator=gen, dtype=torch.float64).to(dtype)
    return state


def _shared_subspace_states(gen: torch.Generator, total_rank: int = 16) -> list[dict[str, torch.Tensor]]:
    """Clients at ranks 4/8/16 whose products lie in one rank-16 column and row space: the average has rank <= 16."""
    bases = {layer: (torch.linalg.qr(torch.randn(out, total_rank, generator=gen, dtype=torch.float64))[0],
                     torch.linalg.qr(torch.randn(inp, total_rank, generator=gen, dtype=torch.float64))[0])
             for layer, (out, inp) in LAYERS.items()}
    states = []
    for rank in RANKS:
        state = {}
        for layer, (u, v) in bases.items():
            state[_key(layer, "B")] = u @ torch.randn(total_rank, rank, generator=gen, dtype=torch.float64)
            state[_key(layer, "A")] = torch.randn(rank, total_rank, generator=gen, dtype=torch.float64) @ v.T
        states.append(state)
    return states


def _product(state: dict[str, torch.Tensor], layer: str, rank: int | None = None) -> torch.Tensor:
    a, b = state[_key(layer, "A")].double(), state[_key(layer, "B")].double()
    return lora_scale(rank or a.shape[0], ALPHA) * (b @ a)


# --- the math ---------------------------------------------------------------------------------------------------------
def test_ranks_4_8_16_average_equals_the_dense_average_when_its_rank_fits():
    gen = torch.Generator().manual_seed(0)
    states = _shared_subspace_states(gen)
    counts = [3, 5, 9]
    result = mixed_rank_average(states, counts, rank=16, alpha=ALPHA)
    assert result.ranks == [4, 8, 16] and result.exact and result.discarded_energy < 1e-20
    dense = dense_average(states, counts, alpha=ALPHA)
    for layer in LAYERS:
        got = _product(result.state, layer)
        want = dense[_key(layer, "A")]
        assert result.state[_key(layer, "A")].shape == (16, LAYERS[layer][1])
        assert result.state[_key(layer, "B")].shape == (LAYERS[layer][0], 16)
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.abs().max()), (got - want).abs().max()


def test_the_scale_of_each_rank_counts_alpha_over_r():
    """A rank-4 client's factors stand for alpha/4 · B A, twice the alpha/8 of the same factors at rank 8."""
    gen = torch.Generator().manual_seed(1)
    low = _random_state(4, gen)
    padded = {k: (torch.cat([v, torch.zeros(4, v.shape[1], dtype=v.dtype)]) if "lora_A" in k
                  else torch.cat([v, torch.zeros(v.shape[0], 4, dtype=v.dtype)], dim=1)) for k, v in low.items()}
    one = mixed_rank_average([low], [1], rank=8, alpha=ALPHA)
    same_factors_at_8 = mixed_rank_average([padded], [1], rank=8, alpha=ALPHA)
    for layer in LAYERS:
        assert torch.allclose(_product(one.state, layer), _product(low, layer), atol=1e-12)
        assert torch.allclose(_product(one.state, layer), 2 * _product(same_factors_at_8.state, layer), atol=1e-12)


def test_beyond_rank_r_the_average_is_the_eckart_young_optimum_and_says_what_it_dropped():
    gen = torch.Generator().manual_seed(2)
    states = [_random_state(rank, gen) for rank in RANKS]  # independent: the average has rank up to 28 > 16
    counts = [1, 2, 3]
    result = mixed_rank_average(states, counts, rank=16, alpha=ALPHA)
    assert not result.exact and result.layers_truncated == len(LAYERS)
    dense = dense_average(states, counts, alpha=ALPHA)
    lost = total = 0.0
    for layer in LAYERS:
        want = dense[_key(layer, "A")]
        sigma = torch.linalg.svdvals(want)
        error = torch.linalg.matrix_norm(_product(result.state, layer) - want)
        assert float(error) == pytest.approx(float(sigma[16:].norm()), rel=1e-9)
        lost, total = lost + float((sigma[16:] ** 2).sum()), total + float((sigma ** 2).sum())
    assert result.discarded_energy == pytest.approx(lost / total, rel=1e-9)
    assert 0 < result.relative_error < 1


@pytest.mark.parametrize("rank", [4, 8])
def test_truncation_is_the_best_rank_r_approximation_at_the_clients_scale(rank):
    gen = torch.Generator().manual_seed(3)
    global_state = _random_state(16, gen, dtype=torch.float32)
    low = truncate_adapter(global_state, rank, alpha=ALPHA)
    assert adapter_rank(low) == rank
    for layer, (out, inp) in LAYERS.items():
        assert low[_key(layer, "A")].shape == (rank, inp) and low[_key(layer, "B")].shape == (out, rank)
        assert low[_key(layer, "A")].dtype == torch.float32
        full = _product(global_state, layer)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-r matrix
        got = _product(low, layer)
        assert torch.allclose(got, best, atol=1e-5 * float(s[0]))  # float32 factors
        error = float(torch.linalg.matrix_norm(got - full))
        assert error == pytest.approx(float(s[rank:].norm()), rel=1e-4)
    assert all(torch.equal(v, global_state[k]) for k, v in truncate_adapter(global_state, 16, alpha=ALPHA).items())


def test_every_client_at_rank_r_reproduces_svd_exact_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    states = [_random_state(16, gen, dtype=torch.float32) for _ in range(3)]
    counts = [4, 1, 7]
    mixed = mixed_rank_average(states, counts, rank=16, alpha=ALPHA, like=states[0])
    reference = svd_exact(states, counts)
    assert list(mixed.state) == list(reference)
    for key, value in reference.items():
        assert torch.equal(mixed.state[key], value), key


def test_wrong_shapes_and_ranks_above_r_are_refused():
    gen = torch.Generator().manual_seed(5)
    good = _random_state(8, gen)
    with pytest.raises(ValueError, match="exceed the global rank 4"):
        mixed_rank_average([good], [1], rank=4, alpha=ALPHA)
    bad = dict(good)
    bad[_key("q", "B")] = torch.randn(39, 8, dtype=torch.float64)  # wrong output dimension
    with pytest.raises(ValueError, match="shape mismatch"):
        mixed_rank_average([_random_state(4, gen), bad], [1, 1], rank=16, alpha=ALPHA)
    uneven = dict(good)
    uneven[_key("v", "A")] = torch.randn(4, 36, dtype=torch.float64)
    uneven[_key("v", "B")] = torch.randn(24, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="ranks \\[4, 8\\]"):
        mixed_rank_average([uneven], [1], rank=16, alpha=ALPHA)


# --- settings ------------------------------------------------------------------------------------------------------
def _config(**overrides):
    from fl_crew_reddit.config import FLCrewRedditConfig

    return FLCrewRedditConfig(_env_file=None, **{"lora_r": 16, "aggregation_method": "svd_exact", **overrides})


def test_client_ranks_are_read_as_pairs_or_in_client_order():
    assert _config(client_lora_ranks="4,8,16").client_lora_ranks == {"client-0": 4, "client-1": 8, "client-2": 16}
    assert _config(client_lora_ranks="client-2=4, client-1=8").client_lora_ranks == {"client-2": 4, "client-1": 8}
    assert _config(client_lora_ranks="").client_lora_ranks == {}


@pytest.mark.parametrize("overrides, message", [
    ({"client_lora_ranks": "4,32"}, "CLIENT_LORA_RANKS gives client-1=32 above LORA_R=16"),
    ({"client_lora_ranks": "4,8", "aggregation_method": "fedavg"},
     "CLIENT_LORA_RANKS \\(mixed ranks\\) with AGGREGATION_METHOD=fedavg"),
    ({"client_lora_ranks": "4,8", "aggregation_method": "median"},
     "CLIENT_LORA_RANKS \\(mixed ranks\\) with AGGREGATION_METHOD=median"),
    ({"client_lora_ranks": "4,8", "ffa_lora": True}, "CLIENT_LORA_RANKS \\(mixed ranks\\) with FFA_LORA=true"),
    ({"client_lora_ranks": "4,8", "dp_mode": "central", "dp_noise_multiplier": 1.0},
     "CLIENT_LORA_RANKS \\(mixed ranks\\) with DP_MODE=central"),
    ({"client_lora_ranks": "4,8", "update_compression": "topk"},
     "CLIENT_LORA_RANKS \\(mixed ranks\\) with UPDATE_COMPRESSION=topk"),
    ({"client_lora_ranks": "client-0=0"}, "not CLIENT=RANK or a rank >= 1"),
    ({"client_lora_ranks": "4,8,16,4"}, "CLIENT_LORA_RANKS names client-3, not a client of this run"),
    ({"client_lora_ranks": "client-O=4"}, "CLIENT_LORA_RANKS names client-O, not a client"),
])
def test_settings_that_cannot_go_with_mixed_ranks_stop_at_start(overrides, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        _config(**overrides)


def test_equal_ranks_need_no_particular_rule():
    assert _config(client_lora_ranks="16,16", aggregation_method="median").client_lora_ranks == {"client-0": 16,
                                                                                                 "client-1": 16}


# --- the server side: what each client is sent, what it may send back ------------------------------------------------
def _strategy(**overrides):
    from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings

    settings = {"aggregation_method": "svd_exact", "lora_r": 16, "lora_alpha": int(ALPHA), "min_fit_clients": 1,
                "client_lora_ranks": {"c4": 4, "c8": 8}, **overrides}
    return FederatedStrategy(StrategySettings(**settings))


def test_each_client_is_sent_the_global_adapter_at_its_rank_and_screened_at_it():
    from fl_crew_reddit.server.strategy import ClientUpdate

    gen = torch.Generator().manual_seed(6)
    global_state = _random_state(16, gen, dtype=torch.float32)
    strategy = _strategy()
    sent = {name: strategy.adapter_for(name, global_state) for name in ("c4", "c8", "c16")}
    assert [adapter_rank(s) for s in sent.values()] == [4, 8, 16] and sent["c16"] is global_state
    assert strategy.adapter_for("c4", global_state) is sent["c4"]  # truncated once per rank and round
    nudge = {name: {k: v + 0.01 for k, v in state.items()} for name, state in sent.items()}
    wrong = dict(nudge["c8"])
    wrong[_key("q", "A")] = torch.zeros(16, 36)  # a rank-8 client sending a rank-16 factor
    updates = [ClientUpdate("c4", nudge["c4"], 10), ClientUpdate("c8", wrong, 10),
               ClientUpdate("c16", nudge["c16"], 30)]
    outcome = strategy.aggregate(global_state, updates)
    assert outcome.accepted == ["c16", "c4"]
    assert "shape mismatch" in outcome.rejected["c8"][0] and "expected (8, 36)" in outcome.rejected["c8"][0]
    assert outcome.lora_ranks == {"c16": 16, "c4": 4} and outcome.discarded_energy is not None
    assert all(outcome.new_global[k].shape == v.shape for k, v in global_state.items())
    dense = dense_average([nudge["c16"], nudge["c4"]], [30, 10], alpha=ALPHA)
    for layer in LAYERS:
        want, got = dense[_key(layer, "A")], _product(outcome.new_global, layer)
        sigma = torch.linalg.svdvals(want)  # rank <= 20 > 16: the best rank-16 approximation
        assert float(torch.linalg.matrix_norm(got - want)) == pytest.approx(float(sigma[16:].norm()), rel=1e-3)


def test_a_quantized_update_of_a_lower_rank_client_is_decompressed_at_its_rank():
    """UPDATE_COMPRESSION=int8 with mixed ranks: each payload is decoded against what its client was sent."""
    from fl_crew_reddit.aggregation.compression import compress
    from fl_crew_reddit.server.strategy import ClientUpdate

    gen = torch.Generator().manual_seed(10)
    global_state = _random_state(16, gen, dtype=torch.float32)
    strategy = _strategy(update_compression="int8")
    updates, plain = [], []
    for name in ("c4", "c16"):
        sent = strategy.adapter_for(name, global_state)
        delta = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in sent.items()}
        updates.append(ClientUpdate(name, compress(delta, "int8"), 5))
        plain.append(ClientUpdate(name, {k: sent[k] + d for k, d in delta.items()}, 5))
    outcome = strategy.aggregate(global_state, updates)
    assert outcome.accepted == ["c16", "c4"] and not outcome.rejected
    reference = _strategy().aggregate(global_state, plain)
    for layer in LAYERS:  # the products (the factors' SVD basis may turn): within the int8 step of the deltas
        want = _product(reference.new_global, layer)
        assert float((_product(outcome.new_global, layer) - want).abs().max()) < 1e-2 * float(want.abs().max())


def test_a_rule_that_cannot_combine_mixed_ranks_is_refused_in_the_round_too():
    from fl_crew_reddit.server.strategy import ClientUpdate

    gen = torch.Generator().manual_seed(7)
    global_state = _random_state(16, gen, dtype=torch.float32)
    strategy = _strategy()
    updates = [ClientUpdate(name, strategy.adapter_for(name, global_state), 1) for name in ("c4", "c16")]
    with pytest.raises(ValueError, match="need AGGREGATION_METHOD=svd_exact"):
        strategy.aggregate(global_state, updates, method="weighted_average")


# --- the real loop --------------------------------------------------------------------------------------------------
def _adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.e2e
def test_ranks_4_8_16_in_process_two_rounds_and_resume(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import RunStopped, stopped_in_round, tiny_run_config
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fl_crew_reddit import FLCrewRedditManager

    monkeypatch.chdir(tmp_path)
    config = tiny_run_config(tiny_model_dir, tmp_path, lora_r=16, lora_alpha=16, client_lora_ranks="4,8,16",
                             aggregation_method="svd_exact", eval_samples=0, local_epochs=1)
    reference = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-mixed")
    ranks = {"client-0": 4, "client-1": 8, "client-2": 16}
    for record in reference.history.rounds:
        assert record.aggregation.accepted == sorted(ranks) and record.aggregation.lora_ranks == ranks
        assert 0 <= record.aggregation.discarded_energy < 1
        for client in record.clients:
            folder = Path(client.adapter_path)
            assert json.loads((folder / "adapter_config.json").read_text())["r"] == ranks[client.name]
            assert adapter_rank(_adapter(folder)) == ranks[client.name]
    final = Path(reference.final_adapter)
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 16
    assert adapter_rank(_adapter(final)) == 16
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))  # a rank-4 client's folder loads with PEFT
    low = PeftModel.from_pretrained(base, reference.history.rounds[-1].clients[0].adapter_path)
    assert low.peft_config["default"].r == 4

    with stopped_in_round(2), pytest.raises(RunStopped):
        FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-stopped")
    resumed = FLCrewRedditManager(config).resume("run-stopped")
    assert [r.round for r in resumed.history.rounds] == [1, 2]
    for key, value in _adapter(reference.final_adapter).items():
        assert torch.equal(_adapter(resumed.final_adapter)[key], value), key
    for mine, theirs in zip(resumed.history.rounds[-1].clients, reference.history.rounds[-1].clients):
        for key, value in _adapter(theirs.adapter_path).items():
            assert torch.equal(_adapter(mine.adapter_path)[key], value), (mine.name, key)


# --- Flower: the ServerApp's round sends each site the global adapter at its rank -------------------------------------
@pytest.fixture()
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_flower_server_round_sends_each_site_its_rank_and_averages_the_products(tmp_path, task_identity):
    from safetensors.torch import load_file, save_file
    from test_flower_server_round import SitesGrid, _reply_with

    from fl_crew_reddit.federation import flower
    from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings

    ranks = {"client-0": 4, "client-1": 8, "client-2": 16}
    settings = StrategySettings(aggregation_method="svd_exact", min_fit_clients=3, seed=1, lora_r=16,
                                lora_alpha=int(ALPHA), client_lora_ranks={"client-0": 4, "client-1": 8})
    global_state = _random_state(16, torch.Generator().manual_seed(8), dtype=torch.float32)
    job_dir = tmp_path / "round-1"
    job_dir.mkdir()
    save_file(global_state, str(job_dir / flower.GLOBAL_IN))
    (job_dir / flower.JOB_FILE).write_text(json.dumps({
        "round": 1, "sites": list(ranks), "strategy": settings.to_dict(), "strategy_state": None,
        "model": {"base_llm_model": "unused"}, "timeout_s": 5}))
    received, trained = {}, {}

    def train_reply(name, message):
        received[name] = flower.to_torch(flower.unpack_adapter(message.content))
        trained[name] = {k: v + 0.01 * (1 + len(trained)) for k, v in received[name].items()}
        return _reply_with(trained[name], 2 + len(trained), message)

    result = flower.run_server_round(SitesGrid(train_reply), job_dir)
    assert {name: adapter_rank(state) for name, state in received.items()} == ranks
    expected_sent = FederatedStrategy(settings).adapter_for("client-0", global_state)
    assert all(torch.equal(received["client-0"][k], v) for k, v in expected_sent.items())
    assert result["aggregation"]["accepted"] == list(ranks)
    assert result["aggregation"]["lora_ranks"] == ranks and result["aggregation"]["discarded_energy"] > 0
    counts = {name: int(result["clients"][name]["num_examples"]) for name in ranks}
    expected = FederatedStrategy(settings).aggregate(
        global_state, [ClientUpdate(name, trained[name], counts[name]) for name in ranks])
    new_global = load_file(str(job_dir / flower.GLOBAL_OUT))
    assert all(torch.equal(new_global[k], v) for k, v in expected.new_global.items())
    assert adapter_rank(new_global) == 16


def test_empty_directions_stay_trainable_as_a_fresh_peft_adapter_would():
    """Round 1: B = 0, so the global product is 0. A rank-4 client gets B' = 0 and the global A's first rows (a PEFT
    initialisation), not B' = A' = 0, whose LoRA gradients would be zero for good. The same where an average of low
    ranks leaves directions of the rank-16 global adapter empty: they keep the previous A rows, with B' = 0."""
    gen = torch.Generator().manual_seed(9)
    initial = _random_state(16, gen, dtype=torch.float32)
    initial.update({k: torch.zeros_like(v) for k, v in initial.items() if "lora_B" in k})
    low = truncate_adapter(initial, 4, alpha=ALPHA)
    for layer in LAYERS:
        assert torch.equal(low[_key(layer, "B")], torch.zeros_like(low[_key(layer, "B")]))
        assert torch.equal(low[_key(layer, "A")], initial[_key(layer, "A")][:4])
    clients = [{k: v + (0.1 * torch.randn(v.shape, generator=gen) if "lora_B" in k else 0) for k, v in low.items()}
               for _ in range(3)]  # three rank-4 clients: the average has rank <= 12 < 16
    result = mixed_rank_average(clients, [1, 1, 1], rank=16, alpha=ALPHA, like=initial)
    assert result.exact
    dense = dense_average(clients, [1, 1, 1], alpha=ALPHA)
    for layer in LAYERS:
        b, a = result.state[_key(layer, "B")], result.state[_key(layer, "A")]
        live = int(torch.linalg.matrix_rank(dense[_key(layer, "A")]))
        assert live <= 12
        assert torch.equal(b[:, live:], torch.zeros_like(b[:, live:]))
        assert torch.equal(a[live:], initial[_key(layer, "A")][live:])
        assert torch.allclose(_product(result.state, layer), dense[_key(layer, "A")], atol=1e-5)


def _declaring_grid(declared: dict[str, int], train_reply):
    from test_flower_server_round import SitesGrid

    class DeclaringGrid(SitesGrid):
        """Sites that declare their own LoRA rank in their query reply (`site --lora-r`)."""

        def _answer(self, messages):
            replies = super()._answer(messages)
            for reply in replies:
                if "site" in reply.content and reply.content["site"]["name"] in declared:
                    reply.content["site"]["lora_r"] = declared[reply.content["site"]["name"]]
            return replies

    return DeclaringGrid(train_reply)


def _round_job(tmp_path, settings, global_state, sites) -> Path:
    from safetensors.torch import save_file

    from fl_crew_reddit.federation import flower

    job_dir = tmp_path / "round-1"
    job_dir.mkdir()
    save_file(global_state, str(job_dir / flower.GLOBAL_IN))
    (job_dir / flower.JOB_FILE).write_text(json.dumps({
        "round": 1, "sites": list(sites), "strategy": settings.to_dict(), "strategy_state": None,
        "model": {"base_llm_model": "unused"}, "timeout_s": 5}))
    return job_dir


def test_a_flower_site_declares_its_own_rank_and_trains_at_it(tmp_path, task_identity):
    from test_flower_server_round import _reply_with

    from fl_crew_reddit.federation import flower
    from fl_crew_reddit.server.strategy import StrategySettings

    settings = StrategySettings(aggregation_method="svd_exact", min_fit_clients=2, seed=1, lora_r=16,
                                lora_alpha=int(ALPHA), client_lora_ranks={"client-1": 8})
    global_state = _random_state(16, torch.Generator().manual_seed(11), dtype=torch.float32)
    job_dir = _round_job(tmp_path, settings, global_state, ["client-0", "client-1", "client-2"])
    received = {}

    def train_reply(name, message):
        received[name] = flower.to_torch(flower.unpack_adapter(message.content))
        return _reply_with({k: v + 0.01 for k, v in received[name].items()}, 3, message)

    # client-0 declares 4; client-1 declares 32 but CLIENT_LORA_RANKS caps it at 8; client-2 declares nothing
    result = flower.run_server_round(_declaring_grid({"client-0": 4, "client-1": 32}, train_reply), job_dir)
    assert {name: adapter_rank(state) for name, state in received.items()} == {"client-0": 4, "client-1": 8,
                                                                                "client-2": 16}
    assert result["lora_ranks"] == {"client-0": 4, "client-1": 8}
    assert result["aggregation"]["lora_ranks"] == {"client-0": 4, "client-1": 8, "client-2": 16}
    assert flower.site_ranks(tmp_path) == {"client-0": 4, "client-1": 32}


def test_a_declared_rank_that_cannot_mix_with_the_rule_stops_the_round_before_training(tmp_path, task_identity):
    from fl_crew_reddit.federation import flower
    from fl_crew_reddit.server.strategy import StrategySettings

    settings = StrategySettings(aggregation_method="fedavg", min_fit_clients=1, lora_r=16)
    job_dir = _round_job(tmp_path, settings, _random_state(16, torch.Generator().manual_seed(12)), ["client-0"])

    def train_reply(name, message):
        raise AssertionError("no site trains in a round that cannot be aggregated")

    with pytest.raises(ValueError, match="client-0=4, from their own `site --lora-r`.*AGGREGATION_METHOD=fedavg"):
        flower.run_server_round(_declaring_grid({"client-0": 4}, train_reply), job_dir)


def test_the_site_tells_its_rank_in_its_query_reply(task_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fl_crew_reddit.federation import flower

    query = Message(RecordDict({"config": ConfigRecord({"ask": "site"})}), dst_node_id=5, message_type="query")
    for node_config, expected in (({"site": "site-a", "lora-r": 4}, {"name": "site-a", "lora_r": 4}),
                                  ({"site": "site-b"}, {"name": "site-b"})):
        context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
        reply = flower._query(query, context)
        assert dict(reply.content["site"]) == expected
