"""Compressed updates (UPDATE_COMPRESSION, issue 12 item 3): round trips and error bounds of each kind, top-k error
feedback, malformed payloads refused with their reason (and the client rejected, never a silently wrong model),
settings that cannot work refused at start, and the real loop (tiny model) with int8 and top-k: fewer bytes on the
wire, and a stopped top-k run resumed to the same adapter, bit for bit."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_crew_reddit.aggregation import NotEnoughClientsError
from fl_crew_reddit.aggregation.compression import (
    BLOCK,
    KINDS,
    NF4_LEVELS,
    compress,
    compress_with_feedback,
    decompress,
    payload_bytes,
    topk_count,
)
from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings


def _update(seed: int = 0, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"m.q.lora_A.weight": (4, 96), "m.q.lora_B.weight": (96, 4), "m.v.lora_B.weight": (7, 3)}
    return {key: torch.randn(shape, generator=generator) * scale for key, shape in shapes.items()}


# --- round trips -----------------------------------------------------------------------------------------------------
def test_fp16_round_trip_is_exact_to_half_precision():
    update = _update()
    back = decompress(compress(update, "fp16"), update, "fp16")
    for key, value in update.items():
        assert back[key].dtype == torch.float32 and back[key].shape == value.shape
        assert torch.equal(back[key], value.half().float())


def test_int8_error_is_at_most_half_a_step_of_its_block():
    update = _update(1)
    payload = compress(update, "int8")
    back = decompress(payload, update, "int8")
    for key, value in update.items():
        flat = value.reshape(-1)
        pad = (-flat.numel()) % BLOCK
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, BLOCK)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127
        error = torch.nn.functional.pad((back[key] - value).reshape(-1), (0, pad)).reshape(-1, BLOCK).abs()
        assert bool((error <= step / 2 + 1e-9).all()), key
        assert payload[f"{key}::int8"].dtype == torch.int8 and payload[f"{key}::scale"].dtype == torch.float32


def test_nf4_error_is_at_most_half_the_widest_gap_of_its_block_and_packs_two_codes_a_byte():
    update = _update(2)
    payload = compress(update, "nf4")
    back = decompress(payload, update, "nf4")
    half_gap = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:], strict=False)) / 2
    for key, value in update.items():
        assert payload[f"{key}::nf4"].numel() == math.ceil(value.numel() / 2)
        absmax = value.abs().max()  # each block's absmax is at most the tensor's
        assert float((back[key] - value).abs().max()) <= half_gap * float(absmax) + 1e-9, key
    # the block maximum itself is exact (level ±1)
    key = "m.q.lora_A.weight"
    flat = update[key].reshape(-1)[:BLOCK]
    position = int(flat.abs().argmax())
    assert float(back[key].reshape(-1)[position]) == pytest.approx(float(flat[position]), rel=1e-6)


def test_topk_keeps_exactly_the_k_largest_and_nothing_else():
    update = _update(3)
    payload = compress(update, "topk", topk_fraction=0.1)
    back = decompress(payload, update, "topk", topk_fraction=0.1)
    for key, value in update.items():
        k = topk_count(value.numel(), 0.1)
        assert payload[f"{key}::index"].numel() == k and payload[f"{key}::index"].dtype == torch.int32
        expected = set(torch.topk(value.reshape(-1).abs(), k).indices.tolist())
        assert set(payload[f"{key}::index"].tolist()) == expected
        kept = back[key].reshape(-1)
        assert set(kept.nonzero().reshape(-1).tolist()) == expected
        assert torch.equal(kept[sorted(expected)], value.reshape(-1)[sorted(expected)].half().float())


def test_sign_sends_one_bit_per_value_times_its_blocks_mean_magnitude():
    update = _update(4)
    payload = compress(update, "sign")
    back = decompress(payload, update, "sign")
    for key, value in update.items():
        flat = value.reshape(-1)
        assert payload[f"{key}::sign"].dtype == torch.uint8 and payload[f"{key}::sign"].numel() == -(-flat.numel() // 8)
        assert torch.equal(torch.sign(back[key].reshape(-1)), torch.where(flat >= 0, 1.0, -1.0))
        for start in range(0, flat.numel(), BLOCK):
            block = back[key].reshape(-1)[start:start + BLOCK]
            assert torch.allclose(block.abs(), flat[start:start + BLOCK].abs().mean().expand_as(block))


def test_payload_sizes_shrink_as_advertised():
    update = {"big.lora_A.weight": torch.randn(64, 1024)}
    dense = 64 * 1024 * 4
    ratios = {kind: dense / payload_bytes(compress(update, kind, topk_fraction=0.05)) for kind in KINDS}
    assert ratios["fp16"] == pytest.approx(2.0)
    assert ratios["int8"] == pytest.approx(32 / 8.5)
    assert ratios["nf4"] == pytest.approx(32 / 4.5)
    assert ratios["topk"] == pytest.approx(32 / (0.05 * 48), rel=1e-3)  # int32 index + fp16 value: 13x
    assert ratios["sign"] == pytest.approx(32 / 1.5)


@pytest.mark.parametrize("kind", ["topk", "sign"])
def test_error_feedback_makes_the_sum_of_what_was_sent_track_the_sum_of_true_updates(kind):
    residual: dict[str, torch.Tensor] = {}
    true_sum = sent_sum = plain_sum = None
    for step in range(60):
        update = _update(100 + step)
        update = {k: v + 2e-4 for k, v in update.items()}  # a consistent drift top-k alone would mostly drop
        payload, residual = compress_with_feedback(update, residual, kind, topk_fraction=0.05)
        sent = decompress(payload, update, kind)
        plain = decompress(compress(update, kind, topk_fraction=0.05), update, kind)
        if true_sum is None:
            true_sum, sent_sum, plain_sum = dict(update), dict(sent), dict(plain)
        else:
            for key in update:
                true_sum[key] += update[key]
                sent_sum[key] += sent[key]
                plain_sum[key] += plain[key]
        for key in update:  # Σ sent = Σ true − residual, exactly (up to float32 rounding)
            assert torch.allclose(sent_sum[key] + residual[key], true_sum[key], atol=1e-5)

    def norm(state):
        return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values()))

    gap = norm({k: true_sum[k] - sent_sum[k] for k in true_sum}) / norm(true_sum)
    plain_gap = norm({k: true_sum[k] - plain_sum[k] for k in true_sum}) / norm(true_sum)
    assert gap < 0.25 and plain_gap > 0.15 and gap < plain_gap / 3, (gap, plain_gap)


def test_a_residual_that_does_not_fit_is_dropped():
    update = _update()
    payload, residual = compress_with_feedback(update, {"other": torch.ones(3)}, "topk", topk_fraction=0.5)
    assert torch.equal(decompress(payload, update, "topk")["m.v.lora_B.weight"] + residual["m.v.lora_B.weight"],
                       update["m.v.lora_B.weight"])


# --- malformed payloads ----------------------------------------------------------------------------------------------
def _corrupt(kind: str, how: str) -> dict[str, torch.Tensor]:
    payload = compress(_update(), kind, topk_fraction=0.1)
    key = "m.q.lora_A.weight"
    first = {"fp16": "::fp16", "int8": "::int8", "nf4": "::nf4", "topk": "::index", "sign": "::sign"}[kind]
    second = {"fp16": "::fp16", "int8": "::scale", "nf4": "::absmax", "topk": "::value", "sign": "::scale"}[kind]
    if how == "missing":
        del payload[key + second]
    elif how == "extra":
        payload["m.q.lora_A.weight::smuggled"] = torch.zeros(3)
    elif how == "shape":
        payload[key + first] = payload[key + first][:-1]
    elif how == "dtype":
        payload[key + first] = payload[key + first].to(torch.float64)
    elif how == "non-finite":
        payload[key + second] = payload[key + second].float().clone()
        payload[key + second][0] = float("nan")
    return payload


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("how, reason", [("missing", "missing"), ("extra", "unexpected"), ("shape", "shape"),
                                          ("dtype", "expected"), ("non-finite", "non-finite")])
def test_malformed_payloads_are_refused_with_a_reason(kind, how, reason):
    if kind == "fp16" and how == "non-finite":
        payload = compress(_update(), "fp16")
        payload["m.q.lora_A.weight::fp16"][0, 0] = float("inf")
    else:
        payload = _corrupt(kind, how)
    with pytest.raises(ValueError, match=reason):
        decompress(payload, _update(), kind, topk_fraction=0.1)


@pytest.mark.parametrize("change, reason", [
    (lambda p: p["m.q.lora_A.weight::index"].__setitem__(-1, 10_000), "out of range"),
    (lambda p: p["m.q.lora_A.weight::index"].__setitem__(1, int(p["m.q.lora_A.weight::index"][0])), "increasing"),
    (lambda p: p["m.q.lora_A.weight::index"].__setitem__(0, -1), "out of range"),
])
def test_topk_indices_are_checked(change, reason):
    payload = compress(_update(), "topk", topk_fraction=0.1)
    change(payload)
    with pytest.raises(ValueError, match=reason):
        decompress(payload, _update(), "topk", topk_fraction=0.1)


def test_topk_must_send_the_agreed_k_and_codes_must_be_in_range():
    payload = compress(_update(), "topk", topk_fraction=0.5)  # more than agreed: a dense update in disguise
    with pytest.raises(ValueError, match="agrees on"):
        decompress(payload, _update(), "topk", topk_fraction=0.1)
    payload = compress(_update(), "int8")
    payload["m.q.lora_A.weight::int8"][0] = -128
    with pytest.raises(ValueError, match="-128"):
        decompress(payload, _update(), "int8")
    payload = compress(_update(), "nf4")
    payload["m.v.lora_B.weight::nf4"][-1] |= 0x0F  # 21 values: the last low nibble is padding
    with pytest.raises(ValueError, match="padding"):
        decompress(payload, _update(), "nf4")
    payload = compress(_update(), "sign")
    payload["m.v.lora_B.weight::sign"][-1] |= 0x01  # 21 values: the last three bits are padding
    with pytest.raises(ValueError, match="padding"):
        decompress(payload, _update(), "sign")
    payload = compress(_update(), "int8")  # a plain adapter where a payload is expected
    with pytest.raises(ValueError, match="not a nf4 payload"):
        decompress(payload, _update(), "nf4")


# --- the server: decompress, then screen and aggregate unchanged ------------------------------------------------------
def test_the_server_reconstructs_global_plus_update_and_rejects_an_undecodable_client():
    global_adapter = {k: torch.randn(v.shape) for k, v in _update().items()}
    strategy = FederatedStrategy(StrategySettings(update_compression="int8", min_fit_clients=2,
                                                  aggregation_method="fedavg"))
    deltas = {name: _update(seed) for seed, name in enumerate(["a", "b"])}
    updates = [ClientUpdate(name, compress(delta, "int8"), 10) for name, delta in deltas.items()]
    bad = compress(_update(9), "int8")
    bad["m.q.lora_A.weight::scale"][0] = float("inf")
    updates.append(ClientUpdate("c", bad, 10))
    outcome = strategy.aggregate(global_adapter, updates)
    assert outcome.accepted == ["a", "b"] and list(outcome.rejected) == ["c"]
    assert "cannot be decompressed (UPDATE_COMPRESSION=int8)" in outcome.rejected["c"][0]
    assert "non-finite" in outcome.rejected["c"][0]
    for key, value in global_adapter.items():
        mean = sum(decompress(compress(d, "int8"), d, "int8")[key] for d in deltas.values()) / 2
        assert torch.allclose(outcome.new_global[key], value + mean, atol=1e-6)
    with pytest.raises(NotEnoughClientsError, match="cannot be decompressed"):
        strategy.aggregate(global_adapter, updates[:1] + updates[2:])
    plain = FederatedStrategy(StrategySettings(update_compression="none", min_fit_clients=1))
    assert plain.aggregate(global_adapter, [ClientUpdate("a", compress(deltas["a"], "int8"), 1),
                                            ClientUpdate("b", dict(global_adapter), 1)]).rejected["a"]


def test_settings_that_cannot_work_are_refused_at_start():
    from fl_crew_reddit.config import FLCrewRedditConfig

    for method in ("median", "trimmed_mean", "bulyan"):
        with pytest.raises(ValueError, match=f"UPDATE_COMPRESSION=topk with AGGREGATION_METHOD={method}"):
            FLCrewRedditConfig(_env_file=None, update_compression="topk", aggregation_method=method)
    with pytest.raises(ValueError, match="topk_fraction"):
        FLCrewRedditConfig(_env_file=None, update_compression="topk", topk_fraction=0)
    assert FLCrewRedditConfig(_env_file=None, update_compression="nf4", aggregation_method="median")
    assert FLCrewRedditConfig(_env_file=None, update_compression="topk", ffa_lora=True)


def test_a_flower_site_keeps_its_residual_per_round_in_its_folder(tmp_path):
    from fl_crew_reddit.site.feedback import FOLDER, load_site_feedback, save_site_feedback

    assert load_site_feedback(tmp_path, 1) == {}
    save_site_feedback(tmp_path, 1, {"k": torch.ones(2)})
    save_site_feedback(tmp_path, 2, {"k": torch.full((2,), 2.0)})
    assert torch.equal(load_site_feedback(tmp_path, 2)["k"], torch.ones(2))  # a replayed round 2 starts alike
    assert torch.equal(load_site_feedback(tmp_path, 3)["k"], torch.full((2,), 2.0))
    save_site_feedback(tmp_path, 3, {"k": torch.zeros(2)})
    assert sorted(p.name for p in (tmp_path / FOLDER).iterdir()) == ["round-2.safetensors", "round-3.safetensors"]


def test_residuals_are_saved_with_the_run_state_and_checked(tmp_path):
    from fl_crew_reddit.run_state import (
        ERROR_FEEDBACK_WEIGHTS,
        SavedState,
        StateError,
        load_error_feedback,
        load_state,
        save_state,
    )
    from fl_crew_reddit.runs import RunPaths

    paths = RunPaths(tmp_path, "run-ef").create()
    reference = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
    residuals = {"client-0": {"m.lora_B.weight": torch.randn(4, 2)}}
    state = SavedState(round=1, total_rounds=2, history={"run_id": "run-ef", "rounds": []}, settings={})
    folder = save_state(paths, state, reference, None, error_feedback=residuals)
    assert ERROR_FEEDBACK_WEIGHTS in state.model_validate_json((folder / "state.json").read_text()).files
    loaded, _, _ = load_state(paths, reference, max_norm=None, optimizer_name=None)
    back = load_error_feedback(paths, loaded, reference)
    assert torch.equal(back["client-0"]["m.lora_B.weight"], residuals["client-0"]["m.lora_B.weight"])
    from safetensors.torch import save_file

    save_file({"client-0::m.lora_B.weight": torch.zeros(3)}, str(folder / ERROR_FEEDBACK_WEIGHTS))
    with pytest.raises(Exception, match="sha256|no usable"):
        load_state(paths, reference, max_norm=None, optimizer_name=None)
    with pytest.raises(StateError, match="shape"):
        load_error_feedback(paths, loaded, reference)


# --- the real loop (tiny model) --------------------------------------------------------------------------------------
def _fast(config, kind: str, **overrides):
    return config.model_copy(update={"update_compression": kind, "eval_samples": 0, "local_epochs": 1,
                                     "max_examples_per_client": 8, **overrides})


def _run(config, kind: str, rounds: int, run_id: str, **overrides):
    from fl_crew_reddit import FLCrewRedditManager

    return FLCrewRedditManager(_fast(config, kind, **overrides)).run_federated_learning(num_rounds=rounds,
                                                                                        run_id=run_id)


@pytest.mark.e2e
def test_int8_and_topk_runs_complete_with_fewer_bytes_on_the_wire(tiny_config):
    tiny_config = tiny_config.model_copy(update={"eval_samples": 0})
    sizes, perplexities = {}, {}
    for kind in ("none", "int8", "topk"):
        result = _run(tiny_config, kind, 1, f"run-{kind}")
        record = result.history.rounds[0]
        assert sorted(record.aggregation.accepted) == ["client-0", "client-1", "client-2"], record.aggregation
        sizes[kind] = {c.metrics["update_bytes"] for c in record.clients}
        perplexities[kind] = result.perplexities()[-1]
        if kind != "none":
            from fl_crew_reddit.evaluation.report import markdown_report

            total = sum(c.metrics["update_bytes"] for c in record.clients)  # the report's: the compressed files
            assert f"per round, compressed with UPDATE_COMPRESSION={kind}" in markdown_report(result.history)
            assert f"{total / 1e6:,.1f} MB of adapter files" in markdown_report(result.history)
            folder = Path(record.clients[0].adapter_path)
            assert record.clients[0].metrics["update_bytes"] == (folder / "update.safetensors").stat().st_size
            assert any(k.endswith("::index" if kind == "topk" else "::int8")
                       for k in load_file(str(folder / "update.safetensors")))
    assert max(sizes["int8"]) < 0.5 * min(sizes["none"]) and max(sizes["topk"]) < 0.3 * min(sizes["none"]), sizes
    assert perplexities["int8"] == pytest.approx(perplexities["none"], rel=1e-3)
    assert math.isfinite(perplexities["topk"])


@pytest.mark.e2e
def test_a_stopped_topk_run_resumes_to_the_same_adapter_bit_for_bit(tiny_config, monkeypatch):
    from conftest import RunStopped, stopped_in_round

    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.run_state import ERROR_FEEDBACK_WEIGHTS

    tiny_config = tiny_config.model_copy(update={"eval_samples": 0, "topk_fraction": 0.1})
    reference = _run(tiny_config, "topk", 2, "run-reference")

    with stopped_in_round(2), pytest.raises(RunStopped):
        _run(tiny_config, "topk", 2, "run-stopped")
    state = tiny_config.fl_crew_reddit_dir / "results" / "run-stopped" / "state"
    assert (state / "LATEST").read_text().strip() == "round-1"
    residuals = load_file(str(state / "round-1" / ERROR_FEEDBACK_WEIGHTS))
    assert {k.partition("::")[0] for k in residuals} == {"client-0", "client-1", "client-2"}
    assert all(float(t.abs().sum()) > 0 for t in residuals.values())
    resumed = FLCrewRedditManager(_fast(tiny_config, "topk")).resume("run-stopped")
    final = load_file(str(Path(resumed.final_adapter) / "adapter_model.safetensors"))
    expected = load_file(str(Path(reference.final_adapter) / "adapter_model.safetensors"))
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), key



def test_a_trainer_process_job_takes_the_clients_residual_and_returns_the_new_one(tiny_config, tmp_path):
    """The worker's job function (training/device_pool.py `_train`, what each trainer process runs), called here:
    the residual arrives with the job and leaves with the outcome as safetensors bytes, and what was sent plus the
    new residual is the update plus the old residual."""
    import json

    from safetensors.torch import load as load_tensors
    from safetensors.torch import save as save_tensors
    from safetensors.torch import save_file

    from fl_crew_reddit.training.device_pool import TrainingJob, _train
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.peft_setup import build_peft_model
    from fl_crew_reddit.training.trainer import snapshot_adapter

    config = tiny_config.model_copy(update={"update_compression": "topk", "topk_fraction": 0.1})
    base, tokenizer = load_base_model(config, torch.device("cpu"))
    torch.manual_seed(config.seed)
    model = build_peft_model(base, config)
    global_adapter = snapshot_adapter(model)
    save_file({k: v.contiguous() for k, v in global_adapter.items()}, str(tmp_path / "global.safetensors"))
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} about soup"},
                                                      {"role": "assistant", "content": f"answer {i}: add salt"}]})
                             + "\n" for i in range(8)), encoding="utf-8")
    fit = {**FederatedStrategy(StrategySettings.from_config(config)).fit_config(1), "local_epochs": 1}
    previous = {k: torch.randn(v.shape) * 1e-3 for k, v in global_adapter.items()}

    def job(name: str, residual: dict) -> tuple[dict, dict]:
        outcome = _train(TrainingJob(client="client-0", round=1, train_path=str(train),
                                     global_adapter_path=str(tmp_path / "global.safetensors"),
                                     output_dir=str(tmp_path / name), fit_config=fit,
                                     error_feedback=save_tensors(residual) if residual else b""),
                         model, tokenizer, torch.device("cpu"), config, {})
        payload = load_file(str(tmp_path / name / "update.safetensors"))
        return decompress(payload, global_adapter, "topk", topk_fraction=0.1), load_tensors(outcome.error_feedback)

    sent_fresh, residual_fresh = job("fresh", {})
    sent_carried, residual_carried = job("carried", previous)
    assert residual_fresh.keys() == global_adapter.keys()
    for key in global_adapter:  # the same training both times: only the residual differs
        assert torch.allclose(sent_carried[key] + residual_carried[key] - previous[key],
                              sent_fresh[key] + residual_fresh[key], atol=1e-6), key
    assert not all(torch.equal(sent_carried[k], sent_fresh[k]) for k in global_adapter)


def test_a_flower_round_decompresses_before_screening_and_counts_compressed_bytes_up(tmp_path, monkeypatch):
    """The ServerApp's round (federation/flower.py `run_server_round`) against the stand-in Grid of
    test_flower_server_round: top-k payloads arrive through pack_adapter, one that cannot be decompressed rejects its
    site with the reason, the rest aggregate as the strategy does, and bytes_up counts the compressed reply."""
    import json

    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import save_file

    from fl_crew_reddit.federation import flower
    from tests.test_flower_server_round import NODES, SitesGrid, _reply_with

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    global_adapter = {k: torch.zeros(v.shape) for k, v in _update().items()}
    settings = StrategySettings(aggregation_method="fedavg", min_fit_clients=2, seed=1, update_compression="topk",
                                topk_fraction=0.1)
    job_dir = tmp_path / "round-1"
    job_dir.mkdir()
    save_file(global_adapter, str(job_dir / flower.GLOBAL_IN))
    sites = list(NODES)[:3]
    (job_dir / flower.JOB_FILE).write_text(json.dumps({
        "round": 1, "sites": sites, "strategy": settings.to_dict(), "strategy_state": None, "model": {},
        "timeout_s": 60}))
    deltas = {name: _update(seed) for seed, name in enumerate(sites)}

    def train_reply(name, message):
        assert message.content["config"]["update_compression"] == "topk"
        payload = compress(deltas[name], "topk", topk_fraction=0.1)
        if name == "client-1":
            payload["m.q.lora_A.weight::index"][-1] = 10_000
        return _reply_with(payload, 2, message)

    result = flower.run_server_round(SitesGrid(train_reply), job_dir)
    assert result["aggregation"]["accepted"] == ["client-0", "client-2"]
    assert "cannot be decompressed" in result["aggregation"]["rejected"]["client-1"][0]
    assert "out of range" in result["aggregation"]["rejected"]["client-1"][0]
    expected = FederatedStrategy(settings).aggregate(
        global_adapter, [ClientUpdate(n, compress(deltas[n], "topk", topk_fraction=0.1), 2)
                         for n in ("client-0", "client-2")])
    new_global = load_file(str(job_dir / flower.GLOBAL_OUT))
    assert all(torch.equal(new_global[k], expected.new_global[k]) for k in global_adapter)
    dense_reply = flower.serialized_bytes(flower.pack_adapter(deltas["client-0"]))  # without its metrics even
    assert result["clients"]["client-0"]["bytes_up"] < 0.75 * dense_reply
