"""FEDERATION=flower end to end with the deployment commands, each as its own process on 127.0.0.1, as on three
machines: `certs`, `superlink` (TLS + node authentication), two `site`s (each prepares its own data with its own
settings, through its own `prepare-site`, when the server asks), and the crew's run connected to the SuperLink.
The crew's process is killed in round 2 and `resume` finishes the run while the SuperLink and sites stay up. The
server never holds a client's text: it learns counts and NLL sums only."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_crew_reddit.federation.flower import free_port
from fl_crew_reddit.history import load_run_history
from fl_crew_reddit.main import main

pytestmark = pytest.mark.e2e
ROUNDS = 2


def _site_environment(model_dir: Path, root: Path, subreddits: str) -> dict[str, str]:
    """A site's own settings: its folder, the same base model as the server, its own choice of subreddits."""
    return {**os.environ, "FL_CREW_REDDIT_DIR": str(root), "BASE_LLM_MODEL": str(model_dir), "SUBREDDITS": subreddits,
            "POSTS_PER_SUBREDDIT": "12", "MAX_EXAMPLES_PER_CLIENT": "8", "MAX_SEQ_LENGTH": "128", "SEED": "7",
            "LORA_R": "4", "LORA_ALPHA": "8", "MIXED_PRECISION": "no", "REDDIT_BACKEND": "snapshot"}


def _start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fl_crew_reddit.main", *command], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=log.parent)


def _processes_under(folder: Path) -> list[int]:
    """Live processes whose command line names `folder` (this test's SuperLink, SuperNodes, workers)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(entry.name) != os.getpid() and str(folder) in (entry / "cmdline").read_bytes().decode(
                    errors="replace").replace("\0", " "):
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_three_machines_on_loopback(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # Prepare: the operator makes the certificates; the server machine starts the SuperLink
    certs, server_root = tmp_path / "certs", tmp_path / "server"
    server_root.mkdir()
    assert main(["certs", "--out", str(certs), "--sites", "site-a,site-b", "--hosts", "127.0.0.1"]) == 0
    fleet, control = free_port(), free_port()
    processes = []
    try:
        superlink = _start(["superlink", "--certs", str(certs), "--listen", "127.0.0.1", "--fleet-port", str(fleet),
                            "--control-port", str(control), "--state", str(server_root / "flower-state")],
                           server_root / "superlink.log")
        processes.append(superlink)
        _wait_for(lambda: "Registered site site-b" in (server_root / "superlink.log").read_text(errors="replace"),
                  90, "the SuperLink to register the sites")
        # each site machine: its own folder and settings (its own subreddits)
        sites = {}
        for name, subreddits in (("site-a", "cooking"), ("site-b", "gardening")):
            root = tmp_path / name
            root.mkdir()
            sites[name] = (root, _site_environment(tiny_model_dir, root, subreddits))
        for name, (root, env) in sites.items():
            processes.append(_start(["site", "--name", name, "--data-dir", str(root / "data"), "--superlink",
                                     f"127.0.0.1:{fleet}", "--certs", str(certs), "--threads", "1",
                                     "--port", str(free_port())], root / "site.log", env))
        for name, (root, _) in sites.items():
            _wait_for(lambda root=root: "SuperNode ID" in (root / "site.log").read_text(errors="replace"), 90,
                      f"{name} to join the SuperLink")

        # Execute: the crew on the server machine, connected to the SuperLink, as `python -m fl_crew_reddit.main`;
        # its process is killed once round 1 is saved (round 2 is under way) and `resume` finishes the run.
        crew_env = {**os.environ, "FL_CREW_REDDIT_DIR": str(server_root), "BASE_LLM_MODEL": str(tiny_model_dir),
                    "FEDERATION": "flower", "SUPERLINK_ADDRESS": f"127.0.0.1:{control}", "FLOWER_CERTS": str(certs),
                    "EVAL_SAMPLES": "2", "LOCAL_EPOCHS": "1", "NUM_TRAINERS": "2", "MIN_FIT_CLIENTS": "2",
                    "ROUND_TIMEOUT": "120", "SITE_CONNECT_TIMEOUT": "120", "MAX_SEQ_LENGTH": "128", "LORA_R": "4",
                    "LORA_ALPHA": "8", "SEED": "7", "MIXED_PRECISION": "no", "BATCH_SIZE": "4",
                    "LEARNING_RATE": "3e-3"}
        crew = _start(["run", "--rounds", str(ROUNDS)], server_root / "crew.log", crew_env)
        processes.append(crew)
        _wait_for(lambda: any("State saved after round 1" in log.read_text(errors="replace")
                              for log in server_root.glob("logs/run-*.log")), 300, "the crew to save round 1")
        os.killpg(crew.pid, signal.SIGKILL)  # the server machine's crew dies mid-run; SuperLink and sites stay up
        crew.wait(timeout=30)
        round_one = json.loads(next(server_root.glob("results/run-*/history.json")).read_text())["rounds"]
        resumed = subprocess.run([sys.executable, "-m", "fl_crew_reddit.main", "resume"], env=crew_env,
                                 cwd=server_root, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        run_dir = next(server_root.glob("results/run-*/history.json")).parent
        history = load_run_history(run_dir / "history.json")
        assert superlink.poll() is None and all(p.poll() is None for p in processes[1:3])  # stayed up throughout
    finally:
        # as `docker compose down` does: the sites first, then the SuperLink; SIGTERM to each command, SIGKILL to
        # its group after docker stop's 10 s grace
        needed_sigkill = []
        for process in [*processes[1:], processes[0]] if processes else []:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                needed_sigkill.append(process.args[3:6])
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    time.sleep(2)  # processes still exiting
    leftovers = {}
    for pid in _processes_under(tmp_path):
        try:
            leftovers[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
        except OSError:
            continue
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert leftovers == {}, "a deployment command left processes behind when its group was killed"
    # each command stopped on SIGTERM within the grace (a site's superexec once kept it open ~30 s, retrying)
    assert needed_sigkill == [], needed_sigkill

    # Assert: the resumed run kept round 1 as it was saved, stopped the killed crew's ServerApp session and ran
    # round 2 in a session of its own
    assert len(round_one) == 1 and history.rounds[0].global_.perplexity == round_one[0]["global"]["perplexity"]
    assert [c.train_loss for c in history.rounds[0].clients] == [c["train_loss"] for c in round_one[0]["clients"]]
    assert sorted(p.name for p in (run_dir / "flower" / "sessions").iterdir()) == ["1", "2"]
    run_log = next(server_root.glob("logs/run-*.log")).read_text()
    assert "Stopped the ServerApp run" in run_log and "left by an earlier process" in run_log
    assert "session stopped by its submitter" in (run_dir / "flower" / "sessions" / "2" / "flwr-run.log").read_text()
    # both sites trained in every round and the held-out perplexity is combined from both
    assert [sorted(c.name for c in r.clients) for r in history.rounds] == [["site-a", "site-b"]] * ROUNDS
    assert set(history.base.per_client) == {"site-a", "site-b"}
    assert history.rounds[-1].global_.perplexity < history.base.perplexity
    assert all(c.num_train > 0 for c in history.data.clients)  # prepared on the server's request, on each site
    assert {s.subreddit for s in history.collection.subreddits} == {"cooking", "gardening"}  # each site's own
    assert all(c.metrics["bytes_down"] > 0 and c.metrics["bytes_up"] > 0 for r in history.rounds for c in r.clients)
    # the server holds no client text: no split files, no collected posts under its folder
    assert not [p for p in server_root.rglob("*.jsonl") if "flower-state" not in str(p)]
    assert history.rounds[-1].global_.samples == []  # generated replies need text the server does not have
