"""Trainer processes (TRAINER_DEVICES): one long-lived worker per device trains the round's clients in parallel.

Two CPU workers stand in for two GPUs: they give the same global adapter as training one client after another in
the run's own process; a worker that raises, or dies mid-job, costs only that client its round."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import torch_threads_of_trainer_processes
from safetensors.torch import load_file, save_file

from fl_crew_reddit import FLCrewRedditManager
from fl_crew_reddit.config import ConfigError, load_config
from fl_crew_reddit.training.device_pool import (
    TrainerDevicesUnavailable,
    TrainerJobFailed,
    TrainerPool,
    TrainingJob,
    trainer_devices,
)

TWO_CPU_WORKERS = ["cpu", "cpu"]


def _fast(config, **update):
    return config.model_copy(update={"eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 8, **update})


def _adapter(folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


@pytest.mark.e2e
def test_two_cpu_trainer_processes_match_one_after_another_and_a_raising_job_costs_only_its_client(tiny_config,
                                                                                                   monkeypatch):
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = _fast(tiny_config)
    with torch_threads_of_trainer_processes(len(TWO_CPU_WORKERS)):
        sequential = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="run-sequential")
    original = FederatedWorkspace.dispatch_training

    def break_client_1_in_round_2(self, round_number, clients):  # its shard is unreadable: the worker's json fails
        if round_number == 2:  # a new file: a worker keeps the rows of a path it has read
            shard = next(s for s in self.data.clients if s.name == "client-1")
            broken = Path(shard.train_path).with_name("broken-train.jsonl")
            broken.write_text('{"messages": [\n', encoding="utf-8")
            shard.train_path = str(broken)
        return original(self, round_number, clients)

    monkeypatch.setattr(FederatedWorkspace, "dispatch_training", break_client_1_in_round_2)
    parallel = FLCrewRedditManager(config.model_copy(update={"trainer_devices": TWO_CPU_WORKERS, "min_fit_clients": 2})
                                   ).run_federated_learning(num_rounds=2, run_id="run-parallel")

    # The workers did the training: both devices' processes started and trained the clients.
    log_text = Path(parallel.log_path).read_text()
    assert "Started trainer process 1 on cpu" in log_text and "Started trainer process 2 on cpu" in log_text
    assert all(f"Round 1: client-{i} trained on cpu" in log_text for i in range(3))
    assert "trained on cpu" not in Path(sequential.log_path).read_text()

    # Round 1: same clients, same results, collected in client order; the global adapters are bit-identical.
    [seq_round], (par_round, broken_round) = sequential.history["rounds"], parallel.history["rounds"]
    assert [c["name"] for c in par_round["clients"]] == ["client-0", "client-1", "client-2"]
    assert par_round["skipped"] == {} and par_round["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    for seq_client, par_client in zip(seq_round["clients"], par_round["clients"]):
        assert par_client["num_examples"] == seq_client["num_examples"]
        assert par_client["train_loss"] == seq_client["train_loss"]
        assert par_client["metrics"]["update_bytes"] == seq_client["metrics"]["update_bytes"]
    expected = _adapter(sequential.final_adapter)
    actual = _adapter(str(Path(par_round["aggregation"]["adapter_path"])))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert par_round["global"]["perplexity"] == seq_round["global"]["perplexity"]

    # Round 2: the job that raised left only its client out, with the worker's reason.
    assert list(broken_round["skipped"]) == ["client-1"]
    [reason] = broken_round["skipped"]["client-1"]
    assert reason.startswith("training failed: TrainerJobFailed: JSONDecodeError: ") and "on cpu)" in reason
    assert [c["name"] for c in broken_round["clients"]] == ["client-0", "client-2"]
    assert broken_round["aggregation"]["accepted"] == ["client-0", "client-2"]
    assert broken_round["global"]["perplexity"] > 0
    assert parallel.skipped_clients == {2: {"client-1": [reason]}}


def _shard_and_adapter(tmp_path: Path, tiny_model) -> tuple[Path, Path]:
    from fl_crew_reddit.training.trainer import snapshot_adapter

    model, _ = tiny_model
    shard = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"How do I keep basil alive, take {i}?"},
                          {"role": "assistant", "content": "Pinch the tops and water it from below."}]}
            for i in range(8)]
    shard.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    adapter = tmp_path / "global.safetensors"
    save_file(snapshot_adapter(model), str(adapter))
    return shard, adapter


def _job(tmp_path, shard, adapter, client, round_number, epochs) -> TrainingJob:
    return TrainingJob(client=client, round=round_number, train_path=str(shard), global_adapter_path=str(adapter),
                       output_dir=str(tmp_path / client / f"round-{round_number}"),
                       fit_config={"round": round_number, "local_epochs": epochs, "batch_size": 4,
                                   "learning_rate": 1e-3, "max_steps": 0, "seed": 7, "proximal_mu": 0.0,
                                   "timeout_s": 0})


def test_a_worker_killed_mid_job_fails_that_client_and_is_started_again_for_the_next_round(
        tiny_config, tiny_model, tmp_path):
    shard, adapter = _shard_and_adapter(tmp_path, tiny_model)
    config = tiny_config.model_copy(update={"lora_r": 4, "lora_alpha": 8, "device": "cpu"})
    pool = TrainerPool(config, TWO_CPU_WORKERS)
    try:
        # Round 1: one long job (thousands of steps); SIGKILL its worker once it is training.
        pool.submit_round([_job(tmp_path, shard, adapter, "client-0", 1, epochs=5000)])
        while not pool.running():
            time.sleep(0.01)
        [(pid, client)] = pool.running().items()
        assert client == "client-0"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TrainerJobFailed, match=r"trainer process \d on cpu died while training client-0 "
                                                   r"\(exit code -9\)"):
            pool.result("client-0", 1)
        pool.wait_idle()
        assert pid not in pool.worker_pids() and pool.worker_pids().count(None) == 1

        # Round 2: the dead worker is started again; both jobs train and return PEFT adapter folders.
        pool.submit_round([_job(tmp_path, shard, adapter, name, 2, epochs=1) for name in ("client-0", "client-1")])
        outcomes = [pool.result(name, 2) for name in ("client-0", "client-1")]
        pool.wait_idle()
        assert None not in pool.worker_pids() and pid not in pool.worker_pids()
        for outcome in outcomes:
            assert outcome.num_examples == 8 and outcome.metrics["steps"] == 2 and outcome.device == "cpu"
            assert (Path(outcome.adapter_path) / "adapter_model.safetensors").is_file()
            assert outcome.adapter_path == str(tmp_path / outcome.client / "round-2")
    finally:
        pool.close()
    assert pool.worker_pids() == [None, None]


def test_trainer_devices_setting(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert load_config().trainer_devices == ["auto"]
    assert load_config(trainer_devices="CPU, cpu").trainer_devices == TWO_CPU_WORKERS
    for bad, message in [("cuda:0", "list 2\\+ devices"), ("gpu,cpu", "gpu is not a device")]:
        with pytest.raises(ConfigError, match=f"TRAINER_DEVICES='{bad}' is invalid: .*{message}"):
            load_config(trainer_devices=bad)
    # auto: in-process one after another unless 2+ CUDA devices are visible (and DEVICE is not cpu).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert trainer_devices(["auto"], "auto") == ["cuda:0", "cuda:1"]
    assert trainer_devices(["auto"], "cpu") == []
    assert trainer_devices(["cpu", "cpu"], "auto") == TWO_CPU_WORKERS
    with pytest.raises(TrainerDevicesUnavailable, match="names cuda:2 but torch sees 2 CUDA device"):
        trainer_devices(["cuda:0", "cuda:2"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert trainer_devices(["auto"], "auto") == []


def test_a_worker_that_dies_while_starting_is_started_once_more_then_fails(monkeypatch, caplog):
    from fl_crew_reddit.training import device_pool

    pool = TrainerPool.__new__(TrainerPool)  # no processes: only the start policy is under test
    attempts = []

    def dies(worker):
        attempts.append(worker)
        raise device_pool.WorkerDiedWhileStarting("trainer process 1 on cpu died while starting (exit code -9)")

    monkeypatch.setattr(pool, "_start_once", dies, raising=False)
    with pytest.raises(device_pool.WorkerDiedWhileStarting):
        pool._start("worker")
    assert attempts == ["worker", "worker"] and "starting it once more" in caplog.text

    attempts.clear()
    outcomes = iter([device_pool.WorkerDiedWhileStarting("died while starting"), None])

    def dies_once(worker):
        attempts.append(worker)
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    monkeypatch.setattr(pool, "_start_once", dies_once, raising=False)
    pool._start("worker")
    assert attempts == ["worker", "worker"]

    def load_error(worker):  # the model cannot load: retrying would fail the same way
        attempts.append(worker)
        raise TrainerJobFailed("trainer process 1 on cpu could not load the model: OSError: no weights")

    attempts.clear()
    monkeypatch.setattr(pool, "_start_once", load_error, raising=False)
    with pytest.raises(TrainerJobFailed, match="could not load"):
        pool._start("worker")
    assert attempts == ["worker"]
