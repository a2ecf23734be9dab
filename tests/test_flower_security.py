"""The Flower federation is secure by default and survives a lost node, on Flower's real SuperLink and SuperNodes
(127.0.0.1): TLS with our CA, SuperNode authentication (only registered keys join), a clear message for an
unregistered node and for a wrong CA, and a SuperNode killed in a round leaves only that client out of it."""
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_run_config

from fl_crew_reddit import FLCrewRedditManager
from fl_crew_reddit.federation import flower
from fl_crew_reddit.federation.certs import CertsError, check_certs, make_certs, make_site_key
from fl_crew_reddit.federation.flower import (
    FlowerFederation,
    FlowerRunFailed,
    LocalFlowerFederation,
    explain_supernode_failure,
)

pytestmark = pytest.mark.e2e


def _kill_everything_under(folder: Path) -> None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if str(folder) in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture()
def work(tmp_path):
    folder = tmp_path / "flower"
    folder.mkdir()
    yield folder
    _kill_everything_under(folder)


def _wait_exit(process: subprocess.Popen, timeout_s: float = 60.0) -> int | None:
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _online_nodes(federation: LocalFlowerFederation) -> list[dict]:
    done = subprocess.run(flower.with_env([flower._executable("flwr"), "supernode", "ls", "local", "--format", "json"],
                                          federation.home), capture_output=True, text=True, timeout=60)
    listing = json.loads(done.stdout[done.stdout.index("{"):])
    return [node for node in listing.get("nodes", []) if node.get("status") == "online"]


def test_tls_and_node_authentication_let_in_only_registered_sites(work, tmp_path, monkeypatch, caplog):
    site_folder = tmp_path / "site-a"
    site_folder.mkdir()
    # The port handed to the SuperNode is taken before it binds it (as when another process grabs a port free_port
    # has just freed): the node exits, and the federation starts it again on a new port.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    handed_out, original_free_port = [], flower.free_port

    def free_port_taken_for_the_first_node(host="127.0.0.1"):
        handed_out.append(taken.getsockname()[1] if len(handed_out) == 2 else original_free_port(host))
        return handed_out[-1]  # 1st and 2nd: the SuperLink's ports; 3rd: the SuperNode's

    monkeypatch.setattr(flower, "free_port", free_port_taken_for_the_first_node)
    federation = LocalFlowerFederation({"site-a": site_folder}, work, site_workers=False)
    with federation, taken:
        assert len(handed_out) == 4 and handed_out[2] == taken.getsockname()[1]
        assert b"address already in use" in federation.logs["supernode-site-a"].read_bytes()
        assert "its port was taken in the meantime; starting it again on a new port" in caplog.text
        # the SuperLink serves TLS with our certificate and requires registered node keys
        superlink = " ".join(federation.processes["superlink"].args)
        assert "--ssl-certfile" in superlink and "--enable-supernode-auth" in superlink
        assert "--insecure" not in superlink
        registered = federation.processes["supernode-site-a"]
        assert "--insecure" not in " ".join(registered.args)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(_online_nodes(federation)) < 1:
            time.sleep(1)
        assert len(_online_nodes(federation)) == 1  # the registered site joined over TLS

        # an unregistered node (a valid key the SuperLink has never seen) is refused, with a clear reason
        make_site_key(tmp_path / "intruder", "site-b")
        intruder = federation.start_node("site-a", key=tmp_path / "intruder" / "site-b.key")
        assert _wait_exit(intruder) not in (None, 0)
        reason = explain_supernode_failure(federation.logs["supernode-site-a"].read_text(), "the SuperLink")
        assert reason and "not registered" in reason

        # a node that trusts another CA fails the TLS handshake, with one clear message
        make_certs(tmp_path / "other-ca", ["site-a"])
        wrong_ca = federation.start_node("site-a", ca=tmp_path / "other-ca" / "ca.crt")
        assert _wait_exit(wrong_ca) not in (None, 0)
        reason = explain_supernode_failure(federation.logs["supernode-site-a"].read_text(), "the SuperLink")
        assert reason and reason.startswith("TLS handshake") and "CA" in reason

        # the registered node is still the only one online (the refused ones never were)
        assert registered.poll() is None
        assert len(_online_nodes(federation)) == 1


def test_insecure_only_on_loopback_and_certs_checked(tmp_path):
    with pytest.raises(FlowerRunFailed, match="only loopback may go without TLS"):
        FlowerFederation(["a"], tmp_path, control_address="10.1.2.3:9093").connect()
    with pytest.raises(ValueError, match="loopback"):
        LocalFlowerFederation({}, tmp_path, host="0.0.0.0")
    with pytest.raises(FlowerRunFailed, match="no SuperLink Control API answers"):
        FlowerFederation(["a"], tmp_path, control_address=f"127.0.0.1:{flower.free_port()}").connect()
    written = make_certs(tmp_path / "certs", ["site-0", "site-1"], ["superlink.example"])
    assert oct(written["ca_key"].stat().st_mode & 0o777) == "0o600"
    assert written["site-0_pub"].read_text().startswith("ecdsa-sha2-nistp384 ")
    check_certs(tmp_path / "certs", server=True, site="site-1")
    with pytest.raises(CertsError, match="site-2.key"):
        check_certs(tmp_path / "certs", site="site-2")
    with pytest.raises(CertsError, match="exists"):
        make_certs(tmp_path / "certs", ["site-0"])  # never replace a CA by accident
    with pytest.raises(CertsError, match="site names"):
        make_certs(tmp_path / "bad", ["../etc"])


def test_a_site_killed_in_a_round_is_left_out_and_rejoins(tiny_model_dir, tmp_path, work, monkeypatch):
    # Prepare: two sites on a Flower federation; client-1's SuperNode is killed in round 1, right after
    # the ServerApp has sent the train messages (it logs the sites first, then sends; training takes seconds).
    monkeypatch.chdir(tmp_path)
    # Without node authentication, so the restarted node joins at once under a new node id (with it, Flower lets
    # the same key in again only after two missed 30-second heartbeats: restart_dead_nodes waits for that).
    config = tiny_run_config(tiny_model_dir, work, federation="local-flower", eval_samples=0, local_epochs=1,
                             max_examples_per_client=8, num_trainers=2, min_fit_clients=1, round_timeout=20,
                             site_connect_timeout=60, flower_insecure=True)
    round_log = work / "results" / "faults" / "flower" / "sessions" / "1" / "flwr-run.log"  # the ServerApp's
    killed = []

    def kill_in_round_one():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if round_log.is_file() and "round 1: sites on nodes" in round_log.read_text(errors="replace"):
                federation = next(iter(flower._RUNNING))
                federation.kill_node("client-1")
                killed.append(federation.processes["supernode-client-1"].returncode)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_in_round_one, daemon=True)
    watcher.start()

    # Execute
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="faults")
    watcher.join(timeout=5)

    # Assert: round 1 completed with client-0 (MIN_FIT_CLIENTS=1), client-1 out with its reason; it rejoined round 2
    assert killed == [-signal.SIGKILL]
    first, second = result.history["rounds"]
    assert [c["name"] for c in first["clients"]] == ["client-0"]
    reason = " ".join(first["skipped"]["client-1"])
    assert "SuperNode" in reason or "ClientApp error" in reason, reason
    assert first["aggregation"]["accepted"] == ["client-0"]
    assert first["global"]["perplexity"] > 0  # evaluated on client-0 alone: client-1 was not waited for again
    assert sorted(c["name"] for c in second["clients"]) == ["client-0", "client-1"]
    assert set(second["global"]["per_client"]) == {"client-0", "client-1"}


def test_kill_and_wait_returns_only_once_the_process_tree_has_exited(tmp_path):
    # A process that starts a helper in a session of its own (as flower-supernode's superexec does) and ignores
    # SIGTERM; the helper would outlive a signal to the group of its parent.
    pid_file = tmp_path / "helper.pid"
    parent = subprocess.Popen(["bash", "-c", f"trap '' TERM; setsid sleep 300 & echo $! > {pid_file}; wait"])
    deadline = time.monotonic() + 10
    while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    helper = int(pid_file.read_text())
    tree = [parent.pid, *flower._descendants([parent.pid])]
    assert helper in tree

    assert flower.kill_and_wait(tree, timeout_s=10) == []

    # Nothing of the tree is running the moment it returns (a zombie waiting for its parent is not running).
    for pid in tree:
        identity = flower._identity(pid)
        assert identity is None or identity[0] in "ZX", (pid, identity)
    parent.wait(timeout=5)


def test_kill_and_wait_leaves_alone_a_process_whose_id_was_reused():
    # An id noted earlier with its start time: if a new process has that id now (another start time), it is not ours.
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        _, started = flower._identity(bystander.pid)
        assert flower.kill_and_wait({bystander.pid: started + 1}, timeout_s=2) == []
        assert bystander.poll() is None  # still running
        assert flower.kill_and_wait(flower.identities([bystander.pid]), timeout_s=10) == []
        assert bystander.wait(timeout=5) == -signal.SIGKILL
    finally:
        bystander.kill()
