"""Our MCP server driven by the official MCP Inspector in CLI mode (a third-party client), over stdio and HTTP.

The inspector (npm `@modelcontextprotocol/inspector`) is installed once into the per-user cache
(`$FL_CREW_REDDIT_CACHE` or `$XDG_CACHE_HOME/fl_crew_reddit`, under `npm/`); the tests are skipped only when node or
npm are missing.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mcp_servers import ROOT, http_server, snapshot_env

from fl_crew_reddit.config import cache_root

INSPECTOR_PACKAGE = "@modelcontextprotocol/inspector@0.15.0"
TOOLS = {"list_subreddits", "collect_subreddit_posts", "search_reddit_posts", "collect_post_comments",
         "collect_user_data", "collect_subreddit_info"}


def _npm_prefix() -> Path:
    return cache_root() / "npm"


@pytest.fixture(scope="module")
def inspector() -> Path:
    """Path of the `mcp-inspector` executable, installed with npm into the cache when missing."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the MCP Inspector needs Node.js: {' and '.join(missing)} not found on PATH")
    prefix = _npm_prefix()
    binary = prefix / "node_modules" / ".bin" / "mcp-inspector"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(prefix.with_name("npm.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one install at a time: both tests' xdist workers may need it at once
        if not binary.exists():
            _install_inspector(prefix)
    return binary


def _install_inspector(prefix: Path) -> None:
    """npm install into a folder of its own, moved into place when complete: an install cut off halfway (a machine
    stopped mid-run) leaves no half-filled node_modules for the next one to trip over (npm: ENOTEMPTY)."""
    shutil.rmtree(prefix, ignore_errors=True)
    staging = prefix.with_name(f"npm.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    done = subprocess.run(["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                           "--loglevel", "error", INSPECTOR_PACKAGE],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and (staging / "node_modules" / ".bin" / "mcp-inspector").exists(), \
        f"npm install {INSPECTOR_PACKAGE} into {staging} failed:\n{done.stdout}\n{done.stderr}"
    staging.rename(prefix)


def _inspect(inspector: Path, target: list[str], method: str, *options: str) -> dict:
    """Run `mcp-inspector --cli TARGET --method METHOD OPTIONS`; its stdout is the JSON result."""
    done = subprocess.run([str(inspector), "--cli", *target, "--method", method, *options], cwd=ROOT,
                          env=snapshot_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"inspector failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def _check_the_server(inspector: Path, target: list[str]) -> None:
    listed = _inspect(inspector, target, "tools/list")["tools"]
    assert {tool["name"] for tool in listed} == TOOLS
    assert all(tool["annotations"]["readOnlyHint"] is True for tool in listed)
    assert all(tool["annotations"]["destructiveHint"] is False for tool in listed)
    limit = next(t for t in listed if t["name"] == "collect_subreddit_posts")["inputSchema"]["properties"]["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)

    called = _inspect(inspector, target, "tools/call", "--tool-name", "collect_subreddit_posts",
                      "--tool-arg", "subreddit=cooking", "--tool-arg", "limit=3")
    assert called.get("isError") is False
    posts = called["structuredContent"]["posts"]
    assert called["structuredContent"]["subreddit"] == "cooking" and len(posts) == 3
    assert all(post["subreddit"] == "cooking" and post["title"] for post in posts)
    assert json.loads(called["content"][0]["text"]) == called["structuredContent"]

    refused = _inspect(inspector, target, "tools/call", "--tool-name", "collect_subreddit_posts",
                       "--tool-arg", "subreddit=cooking", "--tool-arg", "limit=1000000000")
    assert refused["isError"] is True and "less than or equal to 1000" in refused["content"][0]["text"]


def test_the_inspector_lists_and_calls_tools_over_stdio(inspector):
    _check_the_server(inspector, [sys.executable, "-m", "fl_crew_reddit.main", "serve-mcp"])


def test_the_inspector_lists_and_calls_tools_over_http(inspector, tmp_path):
    with http_server(tmp_path / "server.log") as url:
        _check_the_server(inspector, [url, "--transport", "http"])
