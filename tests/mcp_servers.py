"""Test helpers: start our MCP server over streamable HTTP on a free loopback port; find a stdio server's pid."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = ROOT / "fl_crew_reddit" / "reddit" / "snapshot"
FAKE_THIRD_PARTY = Path(__file__).resolve().parent / "fake_mcp_server_reddit.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def snapshot_env() -> dict[str, str]:
    """This environment with our server pinned to the embedded snapshot (whatever .env or the shell say)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("REDDIT_")}
    return {**env, "REDDIT_BACKEND": "snapshot", "PYTHONPATH": str(ROOT)}


@contextmanager
def http_server(log_path: Path, *server_args: str) -> Iterator[str]:
    """`serve-mcp --transport streamable-http` on a free port; yields its URL once it accepts connections."""
    port = free_port()
    command = [sys.executable, "-m", "fl_crew_reddit.main", "serve-mcp", "--transport", "streamable-http",
               "--port", str(port), *server_args]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                                   env=snapshot_env())
    try:
        deadline = time.monotonic() + 120  # readiness wait, not an assertion on speed
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the HTTP server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the HTTP server did not listen on {port}:\n{log_path.read_text()}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def server_pids(log_path: Path) -> list[int]:
    """Pids of our servers that logged their start line to `log_path`, oldest first."""
    text = log_path.read_text(encoding="utf-8", errors="replace")
    return [int(pid) for pid in re.findall(r"\[(\d+)\] INFO fl_crew_reddit\.reddit\.server: serving", text)]


def wait_until_dead(pid: int) -> None:
    """Until `pid` has exited (a zombie not yet reaped by its parent counts as exited)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"process {pid} did not exit")
