"""MCP round trip: RedditMCPClient drives the real server as a subprocess over stdio and over streamable HTTP.

One server per data folder for the whole module (reddit-2015, read in place, and a tiny tmp folder), one HTTP
server on the snapshot; plus restarts of a killed stdio server, timeouts, and a third-party server (a stand-in for
mcp-server-reddit, tests/fake_mcp_server_reddit.py) used by the collector through the tool map.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from mcp_servers import FAKE_THIRD_PARTY, SNAPSHOT, free_port, http_server, server_pids, snapshot_env, wait_until_dead

from fl_crew_reddit.config import load_config
from fl_crew_reddit.data_source import PROJECT_ROOT, open_mcp_client, server_command, server_environment
from fl_crew_reddit.main import serve_mcp_command
from fl_crew_reddit.reddit.backends import DumpBackend
from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError
from fl_crew_reddit.reddit.collector import collect
from fl_crew_reddit.reddit.schemas import PostComments, SearchResults, SubredditInfo, SubredditPosts, UserData
from fl_crew_reddit.reddit.server import MAX_LIMIT, build_server

REDDIT_2015 = Path(os.environ.get("REDDIT_2015_DIR", "/work/shared/data/reddit-2015"))
FIVE_TOOLS = {"collect_subreddit_posts", "search_reddit_posts", "collect_post_comments", "collect_user_data",
              "collect_subreddit_info"}


@pytest.fixture(scope="module")
def sample_client(tmp_path_factory):
    if not (REDDIT_2015 / "books" / "submissions.jsonl").is_file():
        pytest.skip(f"reddit-2015 sample not found at {REDDIT_2015}")
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with RedditMCPClient(server_command("dump", REDDIT_2015), snapshot_env(), timeout_s=30, stderr_log=log) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_dump(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "Cats"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "cat.png").write_bytes(b"\x89PNG fake")
    posts = [
        {"id": "k1", "subreddit": "Cats", "title": "My cat sleeps all day", "selftext": "Is that normal?",
         "created_utc": 100, "score": 5, "num_comments": 2, "author": "whiskers", "url": "images/cat.png"},
        {"id": "k2", "subreddit": "Cats", "title": "Escape attempt", "created_utc": 200, "score": 1,
         "num_comments": 0, "url": "../../../etc/passwd.png"},
    ]
    comments = [
        {"id": "r1", "link_id": "t3_k1", "parent_id": "t3_k1", "subreddit": "Cats", "body": "Yes, cats sleep.",
         "created_utc": 150, "score": 2, "author": "vet"},
        {"id": "r2", "link_id": "t3_k1", "parent_id": "t1_r1", "subreddit": "Cats", "body": "Thanks!",
         "created_utc": 160, "score": 1, "author": "whiskers"},
    ]
    (folder / "submissions.jsonl").write_text("\n".join(json.dumps(p) for p in posts) + "\n{broken\n")
    (folder / "comments.jsonl").write_bytes(("\n".join(json.dumps(c) for c in comments) + "\n").encode()
                                            + b"\xff\xfe\n")
    return root


@pytest.fixture(scope="module")
def tiny_client(tiny_dump, tmp_path_factory):
    home = tmp_path_factory.mktemp("run")
    config = load_config(reddit_backend="dump", reddit_dump_dir=tiny_dump, fl_crew_reddit_dir=home)
    with open_mcp_client(config, timeout_s=30) as client:
        yield client


# ---------------------------------------------------------------------------------------------- reddit-2015
def test_lists_the_tools(sample_client):
    tools = set(sample_client.list_tools())
    assert FIVE_TOOLS <= tools
    assert "list_subreddits" in tools
    assert "books" in sample_client.list_subreddits()


def test_every_tool_returns_typed_results(sample_client):
    posts = sample_client.collect_subreddit_posts("books", limit=5, sort="new")
    assert isinstance(posts, SubredditPosts) and len(posts.posts) == 5 and posts.subreddit == "books"

    search = sample_client.search_reddit_posts("Vonnegut", subreddit="books", limit=3)
    assert isinstance(search, SearchResults) and search.posts
    assert all("vonnegut" in (p.title + p.selftext).lower() for p in search.posts)

    post = next(p for p in sample_client.collect_subreddit_posts("books", limit=200).posts if p.num_comments)
    thread = sample_client.collect_post_comments(post.id, limit=50)
    assert isinstance(thread, PostComments) and thread.post.id == post.id and thread.comments
    assert all(c.link_id == f"t3_{post.id}" for c in thread.comments)

    user = sample_client.collect_user_data("somebody", limit=5)
    assert isinstance(user, UserData) and user.posts == [] and user.comments == []

    info = sample_client.collect_subreddit_info("SPORTS")
    assert isinstance(info, SubredditInfo) and info.name == "Sports" and info.num_posts > 1000


def test_a_tool_error_keeps_the_server_up(sample_client):
    with pytest.raises(RedditMCPError, match="available: .*books") as error:
        sample_client.collect_subreddit_posts("nosuchsub")
    assert error.value.tool == "collect_subreddit_posts"
    with pytest.raises(RedditMCPError, match="unknown post"):
        sample_client.collect_post_comments("zzzzzzz")
    assert sample_client.collect_subreddit_info("books").num_posts > 0


@pytest.mark.parametrize("tool, arguments", [
    ("collect_subreddit_posts", {"subreddit": "books", "limit": 10**9}),
    ("collect_subreddit_posts", {"subreddit": "books", "limit": 0}),
    ("collect_subreddit_posts", {"subreddit": "books", "sort": "best"}),
    ("search_reddit_posts", {"query": "", "limit": 5}),
    ("collect_post_comments", {"post_id": "../../etc/passwd"}),
    ("collect_user_data", {"username": "x", "limit": MAX_LIMIT + 1}),
    ("collect_subreddit_info", {"subreddit": "../books"}),
])
def test_invalid_arguments_are_rejected(sample_client, tool, arguments):
    with pytest.raises(RedditMCPError):
        sample_client.call_tool(tool, arguments)
    assert sample_client.list_subreddits()


# ---------------------------------------------------------------------------------------------- tiny folder
def test_tiny_folder_round_trip(tiny_client, tiny_dump):
    assert tiny_client.list_subreddits() == ["Cats"]
    posts = {p.id: p for p in tiny_client.collect_subreddit_posts("cats", limit=10).posts}
    assert set(posts) == {"k1", "k2"}
    assert posts["k1"].image_paths == [str((tiny_dump / "Cats" / "images" / "cat.png").resolve())]
    assert posts["k2"].image_paths == []
    thread = tiny_client.collect_post_comments("t3_k1")
    assert [c.id for c in thread.comments] == ["r1", "r2"]
    user = tiny_client.collect_user_data("whiskers")
    assert [p.id for p in user.posts] == ["k1"] and [c.id for c in user.comments] == ["r2"]
    info = tiny_client.collect_subreddit_info("r/cats")
    assert (info.num_posts, info.num_comments, info.first_created_utc, info.last_created_utc) == (2, 2, 100, 200)
    assert [p.id for p in tiny_client.search_reddit_posts("sleeps").posts] == ["k1"]


def test_open_mcp_client_logs_server_stderr_to_the_logs_folder(tiny_client):
    assert tiny_client.stderr_log.name == "reddit_mcp_server.log"
    tiny_client.collect_subreddit_info("cats")
    text = tiny_client.stderr_log.read_text()
    assert "invalid_json" in text and "invalid_utf8" in text and "media_outside_folder" in text


def test_a_closed_client_raises(tiny_dump, tmp_path):
    client = RedditMCPClient(server_command("dump", tiny_dump), snapshot_env(), timeout_s=30,
                             stderr_log=tmp_path / "s.log")
    client.close()
    client.close()
    with pytest.raises(RedditMCPError, match="closed"):
        client.list_tools()


def test_a_server_that_cannot_start_is_reported(tmp_path):
    expected = "(?s)could not start.*closed the connection before answering initialize.*is not a folder"
    with pytest.raises(RedditMCPError, match=expected):
        RedditMCPClient(server_command("dump", tmp_path / "missing"), snapshot_env(), timeout_s=30,
                        stderr_log=tmp_path / "s.log")


def test_a_server_that_never_answers_times_out(tmp_path):
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(RedditMCPError, match="no answer to initialize within 1 s"):
        RedditMCPClient(silent, connect_timeout_s=1, stderr_log=tmp_path / "s.log")


# ---------------------------------------------------------------------------------------------- crashed stdio server
def _snapshot_client(tmp_path: Path, **kwargs) -> RedditMCPClient:
    return RedditMCPClient(server_command("snapshot"), snapshot_env(), timeout_s=30,
                           stderr_log=tmp_path / "server.log", **kwargs)


def _kill_server(log: Path) -> int:
    pid = server_pids(log)[-1]
    os.kill(pid, signal.SIGKILL)
    wait_until_dead(pid)
    return pid


def test_a_killed_stdio_server_is_restarted_and_the_call_retried(tmp_path):
    with _snapshot_client(tmp_path, max_restarts=2) as client:
        first = client.collect_subreddit_posts("cooking", limit=3)
        killed = _kill_server(client.stderr_log)
        again = client.collect_subreddit_posts("cooking", limit=3)
        assert [p.id for p in again.posts] == [p.id for p in first.posts]
        assert client.restarts == 1
        pids = server_pids(client.stderr_log)
        assert len(pids) == 2 and pids[-1] != killed
        _kill_server(client.stderr_log)
        assert client.collect_subreddit_info("gardening").name == "gardening"
        assert client.restarts == 2


def test_restarts_are_bounded(tmp_path):
    with _snapshot_client(tmp_path, max_restarts=0) as client:
        client.list_tools()
        _kill_server(client.stderr_log)
        with pytest.raises(RedditMCPError, match="is gone .*restarted 0 time"):
            client.list_tools()


# ---------------------------------------------------------------------------------------------- streamable HTTP
@pytest.fixture(scope="module")
def http_url(tmp_path_factory):
    with http_server(tmp_path_factory.mktemp("http") / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def http_client(http_url):
    with RedditMCPClient(url=http_url, timeout_s=30) as client:
        yield client


def test_http_round_trip(http_client):
    assert set(http_client.list_tools()) == FIVE_TOOLS | {"list_subreddits"}
    assert http_client.list_subreddits() == ["cooking", "gardening", "learnpython"]
    posts = http_client.collect_subreddit_posts("r/Cooking", limit=4, sort="top")
    assert posts.subreddit == "cooking" and len(posts.posts) == 4
    assert [p.score for p in posts.posts] == sorted((p.score for p in posts.posts), reverse=True)
    thread = http_client.collect_post_comments(posts.posts[0].id, limit=500)
    assert thread.comments and all(c.link_id == f"t3_{posts.posts[0].id}" for c in thread.comments)
    assert http_client.collect_subreddit_info("learnpython").num_posts == 32


@pytest.mark.parametrize("tool, arguments, message", [
    ("collect_subreddit_posts", {"subreddit": "cooking", "limit": 10**9}, "less than or equal to 1000"),
    ("collect_subreddit_posts", {"subreddit": "cooking", "sort": "best"}, "sort"),
    ("collect_post_comments", {"post_id": "../../etc/passwd"}, "post_id"),
    ("collect_subreddit_info", {"subreddit": "nosuchsub"}, "available: .*cooking"),
    ("no_such_tool", {}, "no_such_tool"),
])
def test_invalid_http_calls_are_mcp_errors_and_the_server_stays_up(http_client, tool, arguments, message):
    with pytest.raises(RedditMCPError, match=message):
        http_client.call_tool(tool, arguments)
    assert http_client.collect_subreddit_info("cooking").num_posts == 32


def test_each_http_client_gets_its_own_session(http_url):
    with RedditMCPClient(url=http_url, timeout_s=30) as one, RedditMCPClient(url=http_url, timeout_s=30) as two:
        assert one.list_subreddits() == two.list_subreddits()


def test_an_unreachable_url_is_reported(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/mcp"
    with pytest.raises(RedditMCPError, match=f"could not connect to {url}"):
        RedditMCPClient(url=url, timeout_s=30, connect_timeout_s=10)


def test_the_collector_uses_reddit_mcp_url(http_url, tmp_path):
    config = load_config(reddit_mcp_url=http_url, fl_crew_reddit_dir=tmp_path)
    with open_mcp_client(config) as client:
        assert client.url == http_url and client.command == []
        report = collect(client, ["cooking"], 3, tmp_path / "collected")
    assert report.server == "fl-crew-reddit" and report.subreddits[0].num_posts == 3


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "example.org"])
def test_http_refuses_a_non_loopback_address_without_allow_remote(host, capsys):
    with pytest.raises(SystemExit) as exit_:
        serve_mcp_command(["--transport", "streamable-http", "--host", host])
    assert exit_.value.code == 2
    assert "not a loopback address" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- third-party server
def _third_party_config(tmp_path: Path, tool_map: str):
    command = f"{sys.executable} {FAKE_THIRD_PARTY} {SNAPSHOT / 'cooking'}"
    return load_config(reddit_mcp_command=command, reddit_mcp_tool_map=tool_map, subreddits="cooking",
                       fl_crew_reddit_dir=tmp_path)


def test_the_collector_reads_a_third_party_server_through_the_preset(tmp_path):
    config = _third_party_config(tmp_path, "mcp-server-reddit")
    with open_mcp_client(config) as client:
        assert "get_subreddit_hot_posts" in client.list_tools()
        assert client.server_info.serverInfo.name == "mcp-reddit"
        report = collect(client, ["cooking"], 5, tmp_path / "collected")
        with pytest.raises(RedditMCPError, match="no tool for this.*SUBREDDITS"):
            client.list_subreddits()
        with pytest.raises(RedditMCPError, match="404 Not Found"):
            client.collect_subreddit_posts("nosuchsub")
    mapped = json.loads(Path(report.subreddits[0].path).read_text())
    assert report.server == "mcp-reddit" and report.subreddits[0].skipped == {}

    with RedditMCPClient(server_command("snapshot"), snapshot_env(), timeout_s=30,
                         stderr_log=tmp_path / "ours.log") as ours:
        posts = ours.collect_subreddit_posts("cooking", limit=5, sort="new").posts
        comments = [c for p in posts for c in ours.collect_post_comments(p.id, limit=500).comments]
    fields = ("id", "subreddit", "title", "selftext", "author", "created_utc", "score", "num_comments")
    assert [{k: p[k] for k in fields} for p in mapped["posts"]] == [p.model_dump(include=set(fields)) for p in posts]
    assert mapped["info"]["name"] == "cooking" and mapped["info"]["num_posts"] is None
    thread = ("id", "link_id", "parent_id", "subreddit", "body", "author", "score")
    assert sorted(tuple(c[k] for k in thread) for c in mapped["comments"]) == \
        sorted(tuple(getattr(c, k) for k in thread) for c in comments)
    ids = [c["id"] for c in mapped["comments"]]
    assert all(ids.index(c["parent_id"][3:]) < ids.index(c["id"])  # each parent before its replies
               for c in mapped["comments"] if c["parent_id"].startswith("t1_"))


def test_a_mapping_file_routes_tools_and_caps_limits(tmp_path):
    mapping = tmp_path / "map.yaml"
    mapping.write_text(
        "name: hot-only\n"
        "tools:\n"
        "  collect_subreddit_posts:\n"
        "    tool: get_subreddit_top_posts\n"
        "    arguments: {subreddit: subreddit_name, limit: limit}\n"
        "    fixed: {time: all}\n"
        "    max_limit: 100\n"
        "    result:\n"
        "      posts: {at: result, fields: {id: id, title: title, score: score, created_utc: created_at}}\n")
    config = _third_party_config(tmp_path, str(mapping))
    with open_mcp_client(config) as client:
        posts = client.collect_subreddit_posts("cooking", limit=500, sort="new").posts
        with pytest.raises(RedditMCPError, match="hot-only.*no tool for this"):
            client.collect_post_comments(posts[0].id)
    assert len(posts) == 32 and all(p.subreddit == "cooking" and p.author is None for p in posts)
    assert [p.score for p in posts] == sorted((p.score for p in posts), reverse=True)


# ---------------------------------------------------------------------------------------------- schema
def test_tool_schemas_are_read_only_and_bounded(tiny_dump):
    server = build_server(DumpBackend(tiny_dump))
    tools = {tool.name: tool for tool in asyncio.run(server.list_tools())}
    assert FIVE_TOOLS <= set(tools)
    for name in FIVE_TOOLS:
        tool = tools[name]
        assert tool.annotations.readOnlyHint is True and tool.annotations.destructiveHint is False
        assert tool.description and tool.outputSchema is not None
        limit = tool.inputSchema["properties"].get("limit")
        if limit is not None:
            assert limit["minimum"] == 1 and limit["maximum"] == MAX_LIMIT


# ---------------------------------------------------------------------------------------------- how our server starts
def test_our_server_gets_its_secrets_by_environment_only(tmp_path, monkeypatch):
    monkeypatch.setenv("REDDIT_CLIENT_ID", "app-id-123")
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", "s3cr3t-value")
    config = load_config(reddit_backend="live", subreddits="learnpython", fl_crew_reddit_dir=tmp_path)
    command = server_command(config.reddit_backend)
    assert command[1:] == ["-m", "fl_crew_reddit.main", "serve-mcp", "--transport", "stdio", "--backend", "live"]
    env = server_environment(config, base={"PYTHONPATH": "/elsewhere"})
    assert (env["REDDIT_CLIENT_ID"], env["REDDIT_CLIENT_SECRET"]) == ("app-id-123", "s3cr3t-value")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(PROJECT_ROOT), "/elsewhere"]
    assert not any("s3cr3t" in word or "app-id" in word for word in command)


def test_the_server_serves_exactly_the_tools_of_the_enum(tiny_dump):
    from fl_crew_reddit.reddit.tool_map import RESULT_PARTS
    from fl_crew_reddit.reddit.tool_names import RedditTool

    served = {tool.name for tool in asyncio.run(build_server(DumpBackend(tiny_dump)).list_tools())}
    assert served == {tool.value for tool in RedditTool} == set(RESULT_PARTS)
    assert {name for name in dir(RedditMCPClient) if name in served} == served  # one typed client method each
