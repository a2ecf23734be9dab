"""Crash safety and faulty clients on the real loop (tiny model): a run killed with SIGKILL mid-round and resumed
ends with the same global adapter as a run left alone; a client that raises and one that sends NaN are left out
with their reasons while the round goes on."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fl_crew_reddit import FLCrewRedditManager
from fl_crew_reddit.config import FLCrewRedditConfig

ROOT = Path(__file__).resolve().parent.parent


def _env_for(config: FLCrewRedditConfig, base_dir: Path) -> dict:
    env = dict(os.environ)
    for name, value in config.model_dump(mode="json").items():
        if value is None or value == {} or name in ("openai_api_key", "reddit_client_id", "reddit_client_secret"):
            continue
        if isinstance(value, dict):  # CLIENT_LORA_RANKS: client=rank,...
            value = [f"{key}={item}" for key, item in value.items()]
        env[name.upper()] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    env["FL_CREW_REDDIT_DIR"] = str(base_dir)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _final_adapter(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.final_adapter) / "adapter_model.safetensors"))


@pytest.mark.e2e
def test_sigkill_mid_round_then_resume_matches_an_uninterrupted_run(tiny_config, tmp_path):
    # Prepare: the reference run, left alone (three runs compare adapters: one epoch, no generated samples).
    tiny_config = tiny_config.model_copy(update={"eval_samples": 0, "local_epochs": 1})
    reference = FLCrewRedditManager(tiny_config).run_federated_learning(num_rounds=3, run_id="run-reference")

    # Execute: the same run in a child process, killed with SIGKILL once round 2 has started training.
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    code = ("from fl_crew_reddit import FLCrewRedditManager, load_config; "
            "FLCrewRedditManager(load_config()).run_federated_learning(num_rounds=3, run_id='run-crash')")
    child = subprocess.Popen([sys.executable, "-c", code], env=_env_for(tiny_config, crash_dir), cwd=crash_dir,
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "child.err").open("w"))
    log_file = crash_dir / "logs" / "run-crash.log"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if log_file.exists() and "'round': 2})" in log_file.read_text():
            break
        time.sleep(0.05)
    assert child.poll() is None, (tmp_path / "child.err").read_text()[-3000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    state = json.loads((crash_dir / "results" / "run-crash" / "state" / "round-1" / "state.json").read_text())
    assert state["round"] == 1

    resumed_config = tiny_config.model_copy(update={"fl_crew_reddit_dir": crash_dir})
    resumed = FLCrewRedditManager(resumed_config).resume("run-crash")

    # Assert: identical final global adapter, and a history with no gap and no duplicate round.
    assert [r["round"] for r in resumed.history["rounds"]] == [1, 2, 3]
    expected, actual = _final_adapter(reference), _final_adapter(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed.perplexities() == pytest.approx(reference.perplexities(), rel=1e-6)
    assert resumed.best_round == reference.best_round is not None
    assert resumed.best_adapter.replace(str(crash_dir), "") == reference.best_adapter.replace(
        str(tiny_config.fl_crew_reddit_dir), "").replace("run-reference", "run-crash")
    # TensorBoard: the killed session's events are superseded, so each round shows once, with no gap.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(crash_dir / "logs" / "tensorboard" / "run-crash"))
    events.Reload()
    assert len(list((crash_dir / "logs" / "tensorboard" / "run-crash").glob("events.out.tfevents.*"))) == 2
    test_ppl = [(e.step, e.value) for e in events.Scalars("perplexity/test")]
    assert [step for step, _ in test_ppl] == [0, 1, 2, 3]
    assert [v for _, v in test_ppl[1:]] == pytest.approx(resumed.perplexities(), rel=1e-5)
    assert [e.step for e in events.Scalars("train_loss/client-0")] == [1, 2, 3]


@pytest.mark.e2e
def test_client_that_raises_and_client_that_sends_nan_are_skipped(tiny_config, monkeypatch):
    from fl_crew_reddit.training import trainer as trainer_module

    original_fit = trainer_module.LocalTrainer.fit

    def faulty_fit(self, global_adapter, config):
        if self.name == "client-1":
            raise RuntimeError("GPU fell off the bus")
        result = original_fit(self, global_adapter, config)
        if self.name == "client-2":
            result.state = {k: torch.full_like(v, float("nan")) for k, v in result.state.items()}
        return result

    monkeypatch.setattr(trainer_module.LocalTrainer, "fit", faulty_fit)
    config = tiny_config.model_copy(update={"num_trainers": 4, "partition": "iid", "min_fit_clients": 2})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)

    record = result.history["rounds"][0]
    assert set(record["skipped"]) == {"client-1", "client-2"}
    assert "GPU fell off the bus" in record["skipped"]["client-1"][0]
    assert any("finite" in reason or "nan" in reason.lower() for reason in record["skipped"]["client-2"])
    assert record["aggregation"]["accepted"] == ["client-0", "client-3"]
    assert math.isfinite(record["global"]["perplexity"])
    assert result.skipped_clients[1].keys() == {"client-1", "client-2"}
