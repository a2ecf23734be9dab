"""The commands of a real deployment (README, "Several machines"; deploy/ runs the same ones in containers):

    certs --out certs/ --sites site-0,site-1,site-2 --hosts superlink.example.org   # once, by the federation's operator
    superlink --certs certs/                                      # the server machine: TLS + node authentication
    prepare-site --data-dir /data/site-0                          # each site: collects + preprocesses its own data
    site --name site-0 --data-dir /data/site-0 --superlink superlink.example.org:9092 --certs certs/
    FEDERATION=flower SUPERLINK_ADDRESS=127.0.0.1:9093 FLOWER_CERTS=certs/ python -m fl_crew_reddit.main run

A site gets `ca.crt` and its own `<site>.key` only; the SuperLink machine keeps `ca.key`, `superlink.key` and the
sites' public keys. Each function returns a process exit status and prints one clear line when something is wrong.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def certs_command(out: Path, sites: list[str], hosts: list[str], overwrite: bool = False) -> int:
    from fl_crew_reddit.federation.certs import CertsError, make_certs

    if not sites:
        return _fail("certs: --sites needs at least one site name (comma-separated)")
    try:
        written = make_certs(out, sites, hosts, overwrite=overwrite)
    except CertsError as error:
        return _fail(f"certs: {error}")
    print(f"Wrote the CA, the SuperLink certificate (for {', '.join(hosts + ['localhost', '127.0.0.1'])}) and "
          f"{len(sites)} site key pairs to {out}:")
    for path in written.values():
        print(f"  {path}")
    print(f"Give each site {out}/ca.crt and its own <site>.key; keep ca.key on the operator's machine.")
    return 0


def _stop(process: subprocess.Popen, helpers) -> None:
    """End a Flower process (SIGTERM, SIGKILL after 10 s, as `docker stop` does) and the helper processes it started
    in other sessions. A SuperNode whose SuperLink is already gone keeps retrying its connection through SIGTERM."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    from fl_crew_reddit.federation.flower import kill_and_wait

    kill_and_wait(helpers)


def _wait_noting_helpers(process: subprocess.Popen, helpers: dict[int, int]) -> int:
    """Wait for a Flower process, noting every second the processes below it ({id: start time}): its superexec and
    app processes run in sessions of their own and outlive it unless stopped (they are no longer below it once it
    has exited)."""
    from fl_crew_reddit.federation.flower import _descendants, identities

    while True:
        try:
            return process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            helpers.update(identities(_descendants([process.pid])))


def _run_foreground(command: list[str], home: Path, explain=None, label: str = "") -> int:
    """Run a Flower process in the foreground with its output on the console; Ctrl+C / SIGTERM stop it. On a failed
    exit, `explain(last_lines)` may turn its log into one clear line."""
    from fl_crew_reddit.federation.flower import _descendants, identities, with_env

    # the same process group as this command: whoever stops the group (Ctrl+C, a container runtime, a test) stops
    # the Flower process too; a SIGTERM sent to this process alone is passed on
    process = subprocess.Popen(with_env(command, home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = deque(maxlen=400)

    def forward(signum, _frame):
        process.send_signal(signum)

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None)}  # the group's Ctrl+C reaches it too
    helpers: dict[int, int] = {}

    def relay() -> None:  # the output, on its own thread: helpers that outlive the process keep the pipe open
        for line in process.stdout:
            last.append(line)
            print(line, end="", flush=True)

    reader = threading.Thread(target=relay, name="flower-output", daemon=True)
    reader.start()
    try:
        code = _wait_noting_helpers(process, helpers)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        helpers.update(identities(_descendants([process.pid])) if process.poll() is None else {})
        # A SuperNode's superexec keeps retrying its dead node (and writing to the pipe) for ~30 s: stop it now.
        _stop(process, helpers)
        reader.join(timeout=5)
    if code not in (0, -signal.SIGINT, -signal.SIGTERM) and explain is not None:
        reason = explain("".join(last))
        if reason:
            print(f"{label}: {reason}", file=sys.stderr)
    return code


def superlink_command(certs: Path | None, listen: str, fleet_port: int, control_port: int, state: Path,
                      insecure: bool = False) -> int:
    """flower-superlink with TLS and SuperNode authentication; every `<site>.pub` in the certificate folder is
    registered once it listens. Its state (registered nodes, runs) is kept in `state/superlink.db`."""
    from fl_crew_reddit.federation.certs import (
        CA_CERT,
        SERVER_CERT,
        SERVER_KEY,
        CertsError,
        check_certs,
        registered_sites,
    )
    from fl_crew_reddit.federation.flower import (
        _descendants,
        _executable,
        identities,
        register_site_key,
        with_env,
        write_flwr_config,
    )

    if insecure and listen not in LOOPBACK:
        return _fail(f"superlink: --insecure is allowed on loopback only, not on --listen {listen}")
    state.mkdir(parents=True, exist_ok=True)
    home = state / "flwr-home"
    if insecure:
        security = ["--insecure"]
    else:
        if certs is None:
            return _fail("superlink: --certs FOLDER is required (make it with the `certs` command), or --insecure "
                         "on loopback")
        try:
            check_certs(certs, server=True)
        except CertsError as error:
            return _fail(f"superlink: {error}")
        security = ["--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
                    "--ssl-keyfile", str(certs / SERVER_KEY), "--enable-supernode-auth"]
    write_flwr_config(home, f"127.0.0.1:{control_port}", None if insecure else certs / CA_CERT)
    command = [_executable("flower-superlink"), *security, "--fleet-api-address", f"{listen}:{fleet_port}",
               "--host", listen, "--port", str(control_port), "--database", str(state / "superlink.db"),
               "--disable-runtime-dependency-installation"]
    process = subprocess.Popen(with_env(command, home))  # in this command's process group (see _run_foreground)
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: process.send_signal(signum))
    helpers: dict[int, int] = {}
    try:
        import socket

        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", control_port), timeout=1.0):
                    break
            except OSError:
                time.sleep(0.3)
        if process.poll() is not None:
            return _fail(f"superlink: flower-superlink exited with {process.returncode} (see its output above)")
        if not insecure:
            for site in registered_sites(certs):
                register_site_key(home, certs / f"{site}.pub", site)
                print(f"Registered site {site} ({certs / site}.pub)", flush=True)
        print(f"SuperLink: Fleet API on {listen}:{fleet_port} for the sites, Control API on {listen}:{control_port} "
              f"for `run` ({'insecure' if insecure else 'TLS + node authentication'}); Ctrl+C stops it", flush=True)
        return _wait_noting_helpers(process, helpers)
    except KeyboardInterrupt:  # the group's Ctrl+C reached flower-superlink as well
        return _wait_noting_helpers(process, helpers)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(process, {**helpers, **identities(_descendants([process.pid]))})


def site_command(name: str, data_dir: Path, superlink: str, certs: Path | None, insecure: bool = False,
                 threads: int = 0, port: int = 9094, lora_r: int = 0) -> int:
    """This machine's site: its compute worker (model and data loaded once) and a flower-supernode that connects to
    the SuperLink's Fleet API with TLS and the site's key. `lora_r` > 0: the LoRA rank this site can train (a site of
    lower capacity); the server sends it the global adapter at min(lora_r, LORA_R) and averages the products."""
    from fl_crew_reddit.federation.certs import CA_CERT, CertsError, check_certs, site_key_paths
    from fl_crew_reddit.federation.flower import _executable, explain_supernode_failure

    host = superlink.rpartition(":")[0].strip("[]")
    if not host or not superlink.rpartition(":")[2].isdigit():
        return _fail(f"site: --superlink {superlink!r} is not host:port of the SuperLink's Fleet API (port 9092)")
    if insecure and host not in LOOPBACK:
        return _fail(f"site: --insecure is allowed with a loopback SuperLink only, not {superlink}")
    if data_dir.exists() and not data_dir.is_dir():
        return _fail(f"site {name}: --data-dir {data_dir} is a file, not a folder")
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "train.jsonl").is_file():
        print(f"site {name}: {data_dir} has no prepared data yet (train.jsonl); it is prepared with this machine's "
              "settings when the server asks (or run `python -m fl_crew_reddit.main prepare-site --data-dir "
              f"{data_dir}` first)", flush=True)
    if insecure:
        security = ["--insecure"]
    else:
        if certs is None:
            return _fail("site: --certs FOLDER (with ca.crt and this site's <name>.key) is required, or --insecure "
                         "with a loopback SuperLink")
        try:
            check_certs(certs, site=name)
        except CertsError as error:
            return _fail(f"site {name}: {error}")
        security = ["--root-certificates", str(certs / CA_CERT),
                    "--auth-supernode-private-key", str(site_key_paths(certs, name)[0])]
    folder = Path(tempfile.mkdtemp(prefix="flcrew-site-"))
    socket_path = folder / "site.sock"
    worker = subprocess.Popen([sys.executable, "-m", "fl_crew_reddit.federation.site_worker",
                               "--threads", str(threads), f"--site={name}={data_dir.resolve()}={socket_path}"])
    node_config = f'site="{name}" data-dir="{data_dir.resolve()}" threads={threads} worker="{socket_path}"'
    if lora_r > 0:
        node_config += f" lora-r={int(lora_r)}"
    command = [_executable("flower-supernode"), *security, "--superlink", superlink, "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(port)]  # the node's own local API (its apps talk to it)
    try:
        return _run_foreground(command, folder / "flwr-home",
                               lambda text: explain_supernode_failure(text, superlink), label=f"site {name}")
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
        shutil.rmtree(folder, ignore_errors=True)
