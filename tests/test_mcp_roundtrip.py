"""MCP round trip: RedditMCPClient starts the real server as a subprocess over stdio and calls every tool.

One server per data folder for the whole module (reddit-2015, read in place, and a tiny tmp folder).
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from fl_crew_reddit.config import load_config
from fl_crew_reddit.reddit.backends import DumpBackend
from fl_crew_reddit.reddit.client import RedditMCPClient, RedditMCPError, server_command
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
    with RedditMCPClient(server_command("dump", REDDIT_2015), timeout_s=30, stderr_log=log) as client:
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
    with RedditMCPClient.for_config(config, timeout_s=30) as client:
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


def test_for_config_logs_server_stderr_to_the_logs_folder(tiny_client):
    assert tiny_client.stderr_log.name == "reddit_mcp_server.log"
    tiny_client.collect_subreddit_info("cats")
    text = tiny_client.stderr_log.read_text()
    assert "invalid_json" in text and "invalid_utf8" in text and "media_outside_folder" in text


def test_a_closed_client_raises(tiny_dump, tmp_path):
    client = RedditMCPClient(server_command("dump", tiny_dump), timeout_s=30, stderr_log=tmp_path / "s.log")
    client.close()
    client.close()
    with pytest.raises(RedditMCPError, match="closed"):
        client.list_tools()


def test_a_server_that_cannot_start_is_reported(tmp_path):
    with pytest.raises(RedditMCPError, match="live-API issue"):
        RedditMCPClient(server_command("live"), timeout_s=30, stderr_log=tmp_path / "s.log")


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
