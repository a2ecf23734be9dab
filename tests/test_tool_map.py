"""Tool map: third-party tool calls and results translated to ours (pure functions, tiny inputs)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fl_crew_reddit.config import ConfigError, load_config
from fl_crew_reddit.reddit.schemas import PostComments, SubredditInfo, SubredditPosts
from fl_crew_reddit.reddit.tool_map import PRESETS, ToolMapError, load_tool_map, map_result, translate_call

PRESET = load_tool_map("mcp-server-reddit")


def _post(post_id: str, post_type: str = "text", **extra) -> dict:  # mcp-server-reddit's Post shape
    return {"id": post_id, "title": f"title {post_id}", "author": "a", "score": 3, "subreddit": "Cooking",
            "url": f"https://www.reddit.com/r/Cooking/comments/{post_id}/", "created_at": "2024-02-01T06:49:14+00:00",
            "comment_count": 2, "post_type": post_type, "content": "body text" if post_type == "text" else "x",
            **extra}


def _comment(comment_id, *replies, **extra) -> dict:
    return {"id": comment_id, "author": "b", "body": f"says {comment_id}", "score": 1, "replies": list(replies),
            **extra}


def test_posts_call_is_routed_by_sort_and_its_limit_capped():
    route = PRESET.tools["collect_subreddit_posts"]
    assert translate_call(route, "collect_subreddit_posts", {"subreddit": "cooking", "limit": 500, "sort": "top"}) \
        == ("get_subreddit_top_posts", {"subreddit_name": "cooking", "limit": 100})
    assert translate_call(route, "collect_subreddit_posts", {"subreddit": "cooking", "limit": 5, "sort": "new"})[0] \
        == "get_subreddit_new_posts"
    route = route.model_copy(update={"tool_by_sort": {"hot": "get_hot"}})
    with pytest.raises(ToolMapError, match="sort='new' is not offered.*hot"):
        translate_call(route, "collect_subreddit_posts", {"subreddit": "cooking", "sort": "new"})


def test_comments_call_sends_fixed_arguments():
    route = PRESET.tools["collect_post_comments"]
    assert translate_call(route, "collect_post_comments", {"post_id": "ab1", "limit": 30}) == \
        ("get_post_content", {"comment_depth": 10, "post_id": "ab1", "comment_limit": 30})


def test_posts_map_into_our_schema():
    gallery = _post("p3", "gallery", content="https://reddit.com/gallery/p3")
    data = {"result": [_post("p1"), _post("p2", "link"), gallery]}
    result = map_result(PRESET.tools["collect_subreddit_posts"], "collect_subreddit_posts",
                        {"subreddit": "cooking", "limit": 10}, data)
    assert isinstance(result, SubredditPosts) and result.subreddit == "cooking"
    first, link, gallery = result.posts
    assert (first.id, first.subreddit, first.created_utc, first.num_comments) == ("p1", "Cooking", 1706770154, 2)
    assert first.selftext == "body text" and first.permalink.endswith("/p1/") and first.url is None
    assert link.selftext == "" and link.url is None  # a link post's `content` is its permalink, not its text
    assert gallery.url == "https://reddit.com/gallery/p3"


def test_a_comment_tree_is_flattened_in_thread_order_with_parents():
    data = {"post": _post("p1"), "comments": [_comment("c1", _comment("c2", _comment("c3"))), _comment("c4")]}
    result = map_result(PRESET.tools["collect_post_comments"], "collect_post_comments",
                        {"post_id": "p1", "limit": 100}, data)
    assert isinstance(result, PostComments) and result.post.id == "p1"
    assert [(c.id, c.parent_id) for c in result.comments] == \
        [("c1", "t3_p1"), ("c2", "t1_c1"), ("c3", "t1_c2"), ("c4", "t3_p1")]
    assert all(c.link_id == "t3_p1" and c.subreddit == "Cooking" for c in result.comments)
    limited = map_result(PRESET.tools["collect_post_comments"], "collect_post_comments",
                         {"post_id": "p1", "limit": 2}, data)
    assert [c.id for c in limited.comments] == ["c1", "c2"]


def test_unreadable_records_are_skipped_and_counted():
    skipped = Counter()
    posts = {"result": [_post("p1"), "not an object", _post("p2", title=None), _post("p3", created_at="yesterday")]}
    result = map_result(PRESET.tools["collect_subreddit_posts"], "collect_subreddit_posts",
                        {"subreddit": "cooking", "limit": 10}, posts, skipped)
    assert [p.id for p in result.posts] == ["p1", "p3"] and result.posts[1].created_utc == 0
    comments = {"post": _post("p1"), "comments": [_comment(None, _comment("c2"), _comment("c3", _comment("c4"))),
                                                  _comment("c5")]}
    result = map_result(PRESET.tools["collect_post_comments"], "collect_post_comments",
                        {"post_id": "p1", "limit": 100}, comments, skipped)
    assert [c.id for c in result.comments] == ["c5"]
    assert skipped == {"post_not_an_object": 1, "post_missing_title": 1, "post_unreadable_created_utc": 1,
                       "comment_missing_id": 1, "comment_under_a_skipped_comment": 3}


def test_a_result_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ToolMapError, match="nothing at 'result'.*found \\['posts'\\]"):
        map_result(PRESET.tools["collect_subreddit_posts"], "collect_subreddit_posts", {"subreddit": "x"},
                   {"posts": []})
    with pytest.raises(ToolMapError, match="expected a list at 'comments', got str"):
        map_result(PRESET.tools["collect_post_comments"], "collect_post_comments", {"post_id": "p1"},
                   {"post": _post("p1"), "comments": "none"})


def test_subreddit_info_without_counts_says_none():
    info = map_result(PRESET.tools["collect_subreddit_info"], "collect_subreddit_info", {"subreddit": "cooking"},
                      {"name": "Cooking", "subscriber_count": 5, "description": "food"})
    assert info == SubredditInfo(name="Cooking", description="food")
    assert info.num_posts is None and info.num_comments is None


def test_mapping_files_load_and_bad_ones_are_named(tmp_path):
    good = tmp_path / "map.json"
    good.write_text(json.dumps(PRESETS["mcp-server-reddit"]))
    assert load_tool_map(good) == PRESET
    with pytest.raises(ToolMapError, match="neither a preset \\(mcp-server-reddit\\) nor a file"):
        load_tool_map("no-such-preset")
    unknown_tool = tmp_path / "unknown.yaml"
    unknown_tool.write_text("name: x\ntools:\n  collect_everything: {tool: t, result: {posts: {}}}\n")
    with pytest.raises(ToolMapError, match=f"{unknown_tool} is invalid: tools.collect_everything.*Input should be"):
        load_tool_map(unknown_tool)
    wrong_parts = tmp_path / "parts.yml"
    wrong_parts.write_text("name: x\ntools:\n  collect_subreddit_posts: {tool: t, result: {comments: {at: c}}}\n")
    with pytest.raises(ToolMapError, match="missing \\['posts'\\]; \\['comments'\\] do not belong"):
        load_tool_map(wrong_parts)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ToolMapError, match="not valid YAML"):
        load_tool_map(broken)


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="REDDIT_MCP_URL='ftp://host/mcp' is invalid: must be an http"):
        load_config(reddit_mcp_url="ftp://host/mcp")
    with pytest.raises(ConfigError, match="not both"):
        load_config(reddit_mcp_url="http://127.0.0.1:8765/mcp", reddit_mcp_command="uvx mcp-server-reddit")
    with pytest.raises(ConfigError, match="REDDIT_MCP_TOOL_MAP.*neither a preset"):
        load_config(reddit_mcp_tool_map="nope", reddit_mcp_command="x")
    with pytest.raises(ConfigError, match="set REDDIT_MCP_URL or REDDIT_MCP_COMMAND"):
        load_config(reddit_mcp_tool_map="mcp-server-reddit")
    with pytest.raises(ConfigError, match="REDDIT_MCP_COMMAND.*not a valid command line"):
        load_config(reddit_mcp_command='python "unclosed')
    with pytest.raises(ConfigError, match="cannot list its subreddits; name them in SUBREDDITS"):
        load_config(reddit_mcp_command="uvx mcp-server-reddit", reddit_mcp_tool_map="mcp-server-reddit",
                    subreddits="")
    config = load_config(reddit_mcp_command="uvx mcp-server-reddit", reddit_mcp_tool_map="mcp-server-reddit",
                         reddit_mcp_url="", subreddits="cooking")
    assert config.reddit_mcp_url is None and config.reddit_mcp_max_restarts == 2
