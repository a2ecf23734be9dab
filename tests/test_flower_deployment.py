"""FEDERATION=flower end to end with the deployment commands, each as its own process on 127.0.0.1, as on three
machines: `certs`, `superlink` (TLS + node authentication), two `site`s (each prepares its own data with its own
settings, through its own `prepare-site`, when the server asks), and the crew's run connected to the SuperLink.
The server never holds a client's text: it learns counts and NLL sums only."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_run_config

from fl_crew_reddit import FLCrewRedditManager
from fl_crew_reddit.federation.flower import free_port
from fl_crew_reddit.main import main

pytestmark = pytest.mark.e2e
ROUNDS = 1


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

        # Execute: the crew on the server machine, connected to the SuperLink
        monkeypatch.chdir(server_root)
        config = tiny_run_config(tiny_model_dir, server_root, federation="flower",
                                 superlink_address=f"127.0.0.1:{control}", flower_certs=certs, eval_samples=2,
                                 local_epochs=1, num_trainers=2, min_fit_clients=2, round_timeout=120,
                                 site_connect_timeout=120)
        result = FLCrewRedditManager(config).run_federated_learning(num_rounds=ROUNDS, run_id="deployed")
    finally:
        for process in processes:  # as `docker stop` does: SIGTERM to the command, SIGKILL to its group later
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
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

    # Assert: both sites trained in every round and the held-out perplexity is combined from both
    history = result.history
    assert [sorted(c.name for c in r.clients) for r in history.rounds] == [["site-a", "site-b"]] * ROUNDS
    assert set(history.base.per_client) == {"site-a", "site-b"}
    assert history.rounds[-1].global_.perplexity < history.base.perplexity
    assert all(c.num_train > 0 for c in history.data.clients)  # prepared on the server's request, on each site
    assert {s.subreddit for s in history.collection.subreddits} == {"cooking", "gardening"}  # each site's own
    assert all(c.metrics["bytes_down"] > 0 and c.metrics["bytes_up"] > 0 for r in history.rounds for c in r.clients)
    # the server holds no client text: no split files, no collected posts under its folder
    assert not [p for p in server_root.rglob("*.jsonl") if "flower-state" not in str(p)]
    assert history.rounds[-1].global_.samples == []  # generated replies need text the server does not have
