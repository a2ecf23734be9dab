"""The HTTP MCP server defends itself: Host / Origin checks on every loopback spelling it binds to, `--allow-remote`
only with an explicit allowed-host list and a bearer token, a request-size limit, a session limit and an idle
timeout after which a session flood leaves no sessions and no extra memory behind.

Every server here is the real `serve-mcp --transport streamable-http` as a subprocess on a free port; requests are
raw HTTP (httpx) where a header must be forged, and RedditMCPClient where a real client matters.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from mcp_servers import ROOT, free_port, snapshot_env, stop_process

from fl_crew_reddit.config import load_config
from fl_crew_reddit.data_source import open_mcp_client
from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError

TOKEN = "tok-3f9a61c2-never-in-any-log"
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "hardening-test", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
SLOW_SERVER = '''
import sys, time
from fl_crew_reddit.reddit.backends import SnapshotBackend
from fl_crew_reddit.reddit.server import HttpGuard, log_to_stderr, serve

class SlowBackend(SnapshotBackend):
    def subreddit_info(self, subreddit):
        time.sleep(2.0)
        return super().subreddit_info(subreddit)

port = int(sys.argv[1])
log_to_stderr("INFO")
serve(SlowBackend(), transport="streamable-http", port=port,
      guard=HttpGuard.for_bind("127.0.0.1", port, session_idle_timeout_s=1.0))
'''


@dataclass
class Server:
    process: subprocess.Popen
    url_host: str  # as in a URL: 127.0.0.1, [::1], localhost
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://{self.url_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def post(self, body=INITIALIZE, *, token: str | None = None, **headers: str) -> httpx.Response:
        extra = {"Authorization": f"Bearer {token}"} if token else {}
        extra.update({key.replace("_", "-"): value for key, value in headers.items()})
        return httpx.post(self.url, json=body, headers={**MCP_HEADERS, **extra}, timeout=10)

    def sessions(self, token: str | None = None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        reply = httpx.get(f"{self.base}/health", headers=headers, timeout=10)
        assert reply.status_code == 200, reply.text
        return reply.json()["sessions"]


@contextmanager
def serve(tmp_path: Path, *args: str, host: str = "127.0.0.1", token: str | None = None,
          script: str | None = None) -> Iterator[Server]:
    """`serve-mcp --transport streamable-http --host HOST` on a free port (REDDIT_MCP_TOKEN=token when given), or
    `python -c script PORT`.

    tests/mcp_servers.http_server always probes and names 127.0.0.1 and strips every REDDIT_ variable, so these
    tests, which bind to other loopback spellings and pass a token by environment, start the server here."""
    port = free_port()
    env = snapshot_env()
    if token is not None:
        env["REDDIT_MCP_TOKEN"] = token
    log = tmp_path / f"server-{port}.log"
    command = [sys.executable, "-m", "fl_crew_reddit.main", "serve-mcp", "--transport", "streamable-http",
               "--host", host, "--port", str(port), *args]
    if script is not None:
        command = [sys.executable, "-c", script, str(port)]
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=ROOT, env=env)
    url_host = f"[{host}]" if ":" in host else host
    probe = "127.0.0.1" if host in ("localhost", "0.0.0.0") else host
    try:
        deadline = time.monotonic() + 60  # readiness wait, not an assertion on speed
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                httpx.get(f"http://{'[::1]' if probe == '::1' else probe}:{port}/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not listen on {port}:\n{log.read_text()}") from None
                time.sleep(0.1)
        yield Server(process, url_host, port, log)
    finally:
        stop_process(process)


def _until_no_sessions(server: Server, token: str | None = None, within_s: float = 10) -> float:
    """Seconds until the server reports no open session (polled; the idle timeout is what closes them)."""
    start = time.monotonic()
    while server.sessions(token) > 0:
        assert time.monotonic() - start < within_s, "sessions were not closed"
        time.sleep(0.1)
    return time.monotonic() - start


def _refusal(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    env = snapshot_env()
    if token is not None:
        env["REDDIT_MCP_TOKEN"] = token
    command = [sys.executable, "-m", "fl_crew_reddit.main", "serve-mcp", "--transport", "streamable-http",
               "--port", str(free_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=20,
                          stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------------- Host / Origin
@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_every_loopback_spelling_checks_host_and_origin_with_the_port(host, tmp_path):
    with serve(tmp_path, host=host) as server:
        here = f"{server.url_host}:{server.port}"
        assert server.post(Host=here).status_code == 200
        assert server.post(Host=here, Origin=f"http://{here}").status_code == 200
        assert server.post(Host=f"LOCALHOST:{server.port}").status_code == 200  # host names are case-insensitive
        # a page that a DNS-rebinding attacker controls names its own host
        assert server.post(Host=f"evil.example:{server.port}").status_code == 421
        assert server.post(Host="evil.example").status_code == 421
        assert server.post(Host=here, Origin=f"http://evil.example:{server.port}").status_code == 403
        # another local web app (another port) is another origin, and so is another port in Host
        for spelling in ("localhost", "127.0.0.1", "[::1]"):
            assert server.post(Host=here, Origin=f"http://{spelling}:{server.port + 1}").status_code == 403
            assert server.post(Host=f"{spelling}:{server.port + 1}").status_code == 421
            assert server.post(Host=f"{spelling}:{server.port}").status_code == 200
        assert server.post(Host=here, Origin="null").status_code == 403
        assert server.sessions() > 0  # only the accepted ones opened sessions
        refused = httpx.get(f"{server.base}/health", headers={"Host": "evil.example"}, timeout=10)
        assert refused.status_code == 421


# ---------------------------------------------------------------------------------------------- --allow-remote
@pytest.mark.parametrize("args, token, message", [
    (["--host", "0.0.0.0", "--allow-remote"], TOKEN, "--allowed-host"),
    (["--host", "0.0.0.0", "--allow-remote", "--allowed-host", "mcp.example.org"], None, "REDDIT_MCP_TOKEN"),
    (["--host", "0.0.0.0", "--allow-remote", "--allowed-host", "bad host!"], TOKEN, "--allowed-host 'bad host!'"),
])
def test_allow_remote_needs_an_allowed_host_list_and_a_token(args, token, message):
    result = _refusal(*args, token=token)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert TOKEN not in result.stderr


def test_remote_mode_serves_only_the_allowed_hosts_and_only_with_the_token(tmp_path):
    with serve(tmp_path, "--allow-remote", "--allowed-host", "mcp.example.org,MCP2.example.org:443",
               host="0.0.0.0", token=TOKEN) as server:
        server.url_host = "127.0.0.1"
        port = server.port
        assert server.post(Host=f"mcp.example.org:{port}", token=TOKEN).status_code == 200
        assert server.post(Host="mcp2.example.org:443", Origin="https://mcp2.example.org", token=TOKEN
                           ).status_code == 200
        assert server.post(Host=f"127.0.0.1:{port}", token=TOKEN).status_code == 200
        assert server.post(Host=f"other.example.org:{port}", token=TOKEN).status_code == 421
        assert server.post(Host="mcp2.example.org:444", token=TOKEN).status_code == 421
        assert server.post(Host=f"mcp.example.org:{port}").status_code == 401
        text = server.log.read_text()
    assert "bearer token" in text and TOKEN not in text


# ---------------------------------------------------------------------------------------------- bearer token
def test_a_token_is_required_checked_and_sent_by_the_client(tmp_path, monkeypatch):
    with serve(tmp_path, "--log-level", "DEBUG", token=TOKEN) as server:
        missing = server.post()
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        assert server.post(token="wrong").status_code == 401
        assert server.post(token=TOKEN[:-1]).status_code == 401
        assert server.post(Authorization=f"Basic {TOKEN}").status_code == 401
        assert server.post(token=TOKEN).status_code == 200
        assert httpx.get(f"{server.base}/health", timeout=10).status_code == 401
        assert server.sessions(token=TOKEN) == 1

        with RedditMCPClient(url=server.url, token=TOKEN, timeout_s=30) as client:
            assert client.list_subreddits() == ["cooking", "gardening", "learnpython"]
        for wrong in (None, "x" * 32):
            with pytest.raises(RedditMCPError, match="401 Unauthorized.*REDDIT_MCP_TOKEN"):
                RedditMCPClient(url=server.url, token=wrong, timeout_s=30, connect_timeout_s=10)

        monkeypatch.setenv("REDDIT_MCP_TOKEN", TOKEN)
        config = load_config(reddit_mcp_url=server.url, fl_crew_reddit_dir=tmp_path)
        assert config.public_settings()["reddit_mcp_token"] == "set" and TOKEN not in repr(config)
        with open_mcp_client(config) as client:  # the collector's own way in: REDDIT_MCP_URL + REDDIT_MCP_TOKEN
            assert client.collect_subreddit_info("cooking").num_posts == 32
        text = server.log.read_text()
    assert TOKEN not in text and "bearer token required" in text


# ---------------------------------------------------------------------------------------------- limits
def test_request_size_session_limit_and_idle_timeout(tmp_path):
    limits = ("--max-request-bytes", "65536", "--max-sessions", "3", "--session-idle-timeout", "1")
    with serve(tmp_path, *limits) as server:
        big = {**INITIALIZE, "params": {**INITIALIZE["params"], "padding": "x" * 70_000}}
        assert server.post(big).status_code == 413

        def chunks():
            for _ in range(20):
                yield b"x" * 8192
        streamed = httpx.post(server.url, content=chunks(), headers=MCP_HEADERS, timeout=10)  # no Content-Length
        assert streamed.status_code == 413

        # only an initialize request opens a session: stray GETs and POSTs without a session id do not
        for _ in range(5):
            assert httpx.get(server.url, headers=MCP_HEADERS, timeout=10).status_code == 400
            assert server.post({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).status_code == 400
        assert server.sessions() == 0

        assert [server.post().status_code for _ in range(3)] == [200, 200, 200]
        full = server.post()
        assert full.status_code == 503 and "too many MCP sessions" in full.text and full.headers["retry-after"]
        assert server.sessions() == 3
        assert _until_no_sessions(server) > 0.3  # idle for 1 s since their initialize
        assert server.post().status_code == 200  # room again

        # a used session stays open; an idle one is closed and the client opens a new one
        with RedditMCPClient(url=server.url, timeout_s=30, max_restarts=1) as client:
            for _ in range(4):  # 1.6 s of calls 0.4 s apart
                assert client.list_subreddits()
                time.sleep(0.4)
            assert client.restarts == 0 and server.sessions() == 1
            _until_no_sessions(server)
            assert client.collect_subreddit_info("gardening").name == "gardening"
            assert client.restarts == 1
        assert server.sessions() == 0  # the client's DELETE on close ends its session


def test_a_call_longer_than_the_idle_timeout_keeps_its_session(tmp_path):
    with serve(tmp_path, script=SLOW_SERVER) as server:  # idle timeout 1 s, subreddit_info takes 2 s
        with RedditMCPClient(url=server.url, timeout_s=10, max_restarts=0) as client:
            assert client.collect_subreddit_info("cooking").num_posts == 32
            assert client.restarts == 0


def test_memory_returns_to_its_base_after_session_floods(tmp_path):
    with serve(tmp_path, "--max-sessions", "40", "--session-idle-timeout", "1") as server:
        process = psutil.Process(server.process.pid)

        def flood() -> int:
            with httpx.Client(headers=MCP_HEADERS, timeout=10) as http:
                codes = [http.post(server.url, json=INITIALIZE).status_code for _ in range(45)]
            assert codes.count(200) == 40 and codes.count(503) == 5
            assert server.sessions() == 40
            _until_no_sessions(server)
            return process.memory_info().rss

        flood()  # warms up what the first sessions allocate once
        base = flood()
        after = [flood() for _ in range(2)]
    print(f"server RSS after each flood of 45 initialize requests: base {base / 2**20:.1f} MiB, then "
          f"{', '.join(f'{a / 2**20:.1f}' for a in after)} MiB")
    assert max(after) - base < 8 * 2**20, f"RSS grew from {base >> 20} MiB to {[a >> 20 for a in after]} MiB"
