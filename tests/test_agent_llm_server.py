"""A real agent LLM: `transformers serve` (the OpenAI-compatible server in transformers' own CLI) serves the embedded
SmolLM2-135M-Instruct on 127.0.0.1, offline, and one federated round runs in AGENT_MODE=llm against it.

The training model is the tiny random one of the other tests. Whatever the small agent model answers, the round
completes: each Flow step is recorded with the LLM's call accepted (llm) or the direct call run instead (fallback)
and why, and the server's own access log shows the agents' requests.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SUBREDDITS = ["cooking", "gardening", "learnpython"]
CHAT_REQUEST = re.compile(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})')
FLOW_STEPS = [(0, "collect_reddit_data"), (0, "preprocess_reddit_data"), (0, "evaluate_model"),
              (1, "train_local_adapter"), (1, "train_local_adapter"), (1, "train_local_adapter"),
              (1, "aggregate_adapters"), (1, "evaluate_model")]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(url: str, server: subprocess.Popen, log_path: Path, give_up_s: float = 300) -> None:
    """Poll GET /health until it answers 200; fail with the server's log if it exits or never comes up."""
    deadline = time.monotonic() + give_up_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"transformers serve exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"transformers serve did not answer {url} within {give_up_s:.0f} s:\n{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served_agent_model(tmp_path_factory):
    """(base_url, model name, server log path): `transformers serve <embedded folder>` on a free loopback port."""
    from fl_crew_reddit.training.model_loading import embedded_model_dir, is_prepared, prepare_embedded_model

    folder = embedded_model_dir()
    if not is_prepared(folder):  # scripts/setup.sh prepares it; this is the same step
        prepare_embedded_model()
    port = _free_port()
    log_path = tmp_path_factory.mktemp("agent-llm-server") / "serve.log"
    # Offline: no hub, no version check. One OpenMP thread: on a busy 2-core machine (CI, the tests' own process)
    # a second thread made each request 5-10x slower (measured: ~10 s vs 45-100 s for 680 prompt + 32 new tokens).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32", "--log-level", "info",
               "--default-seed", "0", "--format", "quiet"]
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_healthy(f"http://127.0.0.1:{port}/health", server, log_path)
        yield f"http://127.0.0.1:{port}/v1", str(folder), log_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.e2e
def test_one_round_with_a_served_agent_llm(tiny_config, served_agent_model):
    from fl_crew_reddit import FLCrewRedditManager

    base_url, model, server_log = served_agent_model
    config = tiny_config.model_copy(update={
        "agent_mode": "llm", "agent_llm_base_url": base_url, "agent_llm_model": model,  # the server's pinned model
        "agent_llm_max_tokens": 48, "agent_max_iter": 2, "agent_collect_allowlist": SUBREDDITS,
        "eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    log_text = Path(result.log_path).read_text()

    # The round completed, driven by the served model.
    assert f"Agents: LLM-driven ({model})" in log_text
    [record] = result.history["rounds"]
    assert [c["name"] for c in record["clients"]] == ["client-0", "client-1", "client-2"]
    assert record["aggregation"]["accepted"] and record["global"]["perplexity"] > 0

    # One recorded agent step per Flow step: the LLM's call was used, or the direct call ran and the reason is kept.
    steps = result.history["agent_steps"]
    assert [(s["round"], s["tool"]) for s in steps] == FLOW_STEPS
    for step in steps:
        assert step["outcome"] in ("llm", "fallback"), step
        if step["outcome"] == "fallback":
            assert step["reason"], step
            assert f"{step['role']}: LLM step failed ({step['reason']}); falling back to the direct call" in log_text
            assert "Connection" not in step["reason"], step  # the server answered: a bad answer, not no answer
        else:
            assert f"{step['role']} calls {step['tool']}(" in log_text and step["reason"] is None

    # The server really answered the agents: at least one chat completion per step, all of them 200.
    statuses = CHAT_REQUEST.findall(server_log.read_text())
    assert len(statuses) >= len(steps), server_log.read_text()[-3000:]
    assert set(statuses) == {"200"}, server_log.read_text()[-3000:]
