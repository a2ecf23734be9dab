"""Tool mapping: lets the collector read from third-party Reddit MCP servers whose tools and results differ from ours.

A `ToolMap` says, for each of our tools, which tool of the other server to call, how our arguments are named there
(and where its `limit` stops), and where posts and comments sit in its result and which of their fields mean what.
The client translates every call through it, so the collector sees our schemas whatever the server.

    REDDIT_MCP_TOOL_MAP=mcp-server-reddit          # a built-in preset
    REDDIT_MCP_TOOL_MAP=/path/to/my_server.yaml    # or a JSON / YAML file of the same shape as PRESETS' values

A mapping file (YAML shown; JSON alike):

    name: my-server
    tools:
      collect_subreddit_posts:
        tool_by_sort: {new: get_new, hot: get_hot}   # or `tool: NAME` for every sort
        arguments: {subreddit: sub, limit: count}    # our argument -> theirs; ours not listed are not sent
        fixed: {include_nsfw: false}                 # constant arguments
        max_limit: 100                               # their largest `limit`
        result:
          posts: {at: "result", fields: {id: id, title: title, created_utc: created, selftext: body}}

`at` is a dotted path into the result ("" = the whole result; a bare JSON array arrives as `result`). A field source
is a dotted path, or `{source: PATH, when: {FIELD: [values]}}` to read it only for some records. Comments may form
a tree: `replies: FIELD` flattens it in thread order and derives each `parent_id`. Timestamps may be epoch seconds
or ISO 8601 strings. Records a mapping cannot read (not an object, no id, an id that is not a string, a field of
the wrong type) are skipped and counted by reason; an id is never turned into a string.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl_crew_reddit.reddit.schemas import (
    PostComments,
    RedditComment,
    RedditPost,
    SearchResults,
    SubredditInfo,
    SubredditPosts,
    UserData,
)
from fl_crew_reddit.reddit.tool_names import RedditTool

log = logging.getLogger(__name__)

ResultPart = Literal["posts", "post", "comments", "info", "subreddits"]

# the parts of each of our results, and which are required in a route
RESULT_PARTS: dict[RedditTool, tuple[set[str], set[str]]] = {  # tool -> (required parts, optional parts)
    RedditTool.COLLECT_SUBREDDIT_POSTS: ({"posts"}, set()),
    RedditTool.SEARCH_REDDIT_POSTS: ({"posts"}, set()),
    RedditTool.COLLECT_POST_COMMENTS: ({"post", "comments"}, set()),
    RedditTool.COLLECT_USER_DATA: (set(), {"posts", "comments"}),
    RedditTool.COLLECT_SUBREDDIT_INFO: ({"info"}, set()),
    RedditTool.LIST_SUBREDDITS: ({"subreddits"}, set()),
}


class ToolMapError(ValueError):
    """A mapping cannot be loaded, or a server's result does not have the shape its mapping describes."""


class FieldSource(BaseModel):
    """Read our field from `source` in their record, only when each `when` field has one of the listed values."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field(min_length=1)
    when: dict[str, list[Any]] = Field(default_factory=dict)


class RecordSpec(BaseModel):
    """Where one part of a result sits (`at`) and how its records' fields map to ours (our field -> source)."""

    model_config = ConfigDict(extra="forbid")
    at: str = ""
    fields: dict[str, str | FieldSource] = Field(default_factory=dict)
    replies: str | None = Field(None, description="comments only: the field holding nested replies")


class ToolRoute(BaseModel):
    """How one of our tools is served by the other server."""

    model_config = ConfigDict(extra="forbid")
    tool: str | None = None
    tool_by_sort: dict[str, str] = Field(default_factory=dict)
    arguments: dict[str, str] = Field(default_factory=dict)
    fixed: dict[str, Any] = Field(default_factory=dict)
    max_limit: int | None = Field(None, ge=1)
    result: dict[ResultPart, RecordSpec]

    @model_validator(mode="after")
    def _names_a_tool(self):
        if not self.tool and not self.tool_by_sort:
            raise ValueError("a route needs `tool` or `tool_by_sort`")
        return self


class ToolMap(BaseModel):
    """Our tool name -> the route that serves it on a third-party server."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    description: str = ""
    tools: dict[RedditTool, ToolRoute]

    @model_validator(mode="after")
    def _routes_have_their_parts(self):
        for tool, route in self.tools.items():
            required, optional = RESULT_PARTS[tool]
            missing, unknown = required - set(route.result), set(route.result) - required - optional
            if missing or unknown or not route.result:
                raise ValueError(f"tools.{tool}.result must describe {sorted(required | optional)}"
                                 + (f"; missing {sorted(missing)}" if missing else "")
                                 + (f"; {sorted(unknown)} do not belong to this tool" if unknown else ""))
        return self


# ------------------------------------------------------------------------------------------------ presets
# Hawstein/mcp-server-reddit (`uvx mcp-server-reddit`, Reddit's public API through redditwarp). Its tools answer
# with one text block of JSON: a list of Post {id, title, author, score, subreddit, url (the permalink),
# created_at (ISO 8601), comment_count, post_type (link|text|gallery|unknown), content (text posts: the body;
# galleries: the gallery URL)}, PostDetail {post, comments}, Comment {id, author, body, score, replies: [Comment]},
# SubredditInfo {name, subscriber_count, description}. `limit`, `comment_limit` go up to 100, `comment_depth` to 10.
_MCP_SERVER_REDDIT_POST = {
    "id": "id", "title": "title", "author": "author", "score": "score", "subreddit": "subreddit",
    "permalink": "url", "created_utc": "created_at", "num_comments": "comment_count",
    "selftext": {"source": "content", "when": {"post_type": ["text"]}},
    "url": {"source": "content", "when": {"post_type": ["gallery"]}},
}
_MCP_SERVER_REDDIT_COMMENT = {"id": "id", "author": "author", "body": "body", "score": "score"}

PRESETS: dict[str, dict[str, Any]] = {
    "mcp-server-reddit": {
        "name": "mcp-server-reddit",
        "description": "Hawstein/mcp-server-reddit: hot/new/top posts, post content with its comment tree, "
                       "subreddit info (no search, user data or subreddit list)",
        "tools": {
            RedditTool.COLLECT_SUBREDDIT_POSTS: {
                "tool_by_sort": {"hot": "get_subreddit_hot_posts", "new": "get_subreddit_new_posts",
                                 "top": "get_subreddit_top_posts"},
                "arguments": {"subreddit": "subreddit_name", "limit": "limit"},
                "max_limit": 100,
                "result": {"posts": {"at": "result", "fields": _MCP_SERVER_REDDIT_POST}},
            },
            RedditTool.COLLECT_POST_COMMENTS: {
                "tool": "get_post_content",
                "arguments": {"post_id": "post_id", "limit": "comment_limit"},
                "fixed": {"comment_depth": 10},
                "max_limit": 100,
                "result": {"post": {"at": "post", "fields": _MCP_SERVER_REDDIT_POST},
                           "comments": {"at": "comments", "fields": _MCP_SERVER_REDDIT_COMMENT,
                                        "replies": "replies"}},
            },
            RedditTool.COLLECT_SUBREDDIT_INFO: {
                "tool": "get_subreddit_info",
                "arguments": {"subreddit": "subreddit_name"},
                "result": {"info": {"at": "", "fields": {"name": "name", "description": "description"}}},
            },
        },
    },
}


def load_tool_map(spec: str | Path) -> ToolMap:
    """A preset name (see PRESETS) or a .json / .yaml / .yml file; ToolMapError says what is wrong."""
    text = str(spec).strip()
    if text in PRESETS:
        return ToolMap.model_validate(PRESETS[text])
    path = Path(text).expanduser()
    if not path.is_file():
        raise ToolMapError(f"tool map {text!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        raw = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw)
        elif path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            raise ToolMapError(f"tool map file {path} must end in .json, .yaml or .yml")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        if isinstance(error, ToolMapError):
            raise
        raise ToolMapError(f"tool map file {path} cannot be read: {error}") from error
    except Exception as error:  # yaml.YAMLError has no common base with ValueError
        raise ToolMapError(f"tool map file {path} is not valid YAML: {error}") from error
    try:
        return ToolMap.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'top level'}: {e['msg']}"
                             for e in error.errors())
        raise ToolMapError(f"tool map file {path} is invalid: {problems}") from None


# ------------------------------------------------------------------------------------------------ calls
def translate_call(route: ToolRoute, tool: str, arguments: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Their tool name and arguments for our `tool(arguments)`; `limit` is capped at the route's `max_limit`."""
    name = route.tool
    if route.tool_by_sort:
        sort = arguments.get("sort") or "new"
        name = route.tool_by_sort.get(sort, route.tool)
        if name is None:
            raise ToolMapError(f"{tool}: sort={sort!r} is not offered by this server "
                               f"(it has {', '.join(sorted(route.tool_by_sort))})")
    theirs = dict(route.fixed)
    for ours, value in arguments.items():
        if value is None or ours not in route.arguments:
            continue
        if ours == "limit" and route.max_limit is not None and value > route.max_limit:
            log.info("%s: limit %d capped at %d, the most %s returns", tool, value, route.max_limit, name)
            value = route.max_limit
        theirs[route.arguments[ours]] = value
    return name, theirs


def map_result(route: ToolRoute, tool: str, arguments: dict[str, Any], data: Any,
               skipped: Counter | None = None) -> BaseModel | list[str]:
    """Our result model for `tool(arguments)` from the other server's result `data`.

    Records that cannot be read are left out and counted in `skipped` (reason -> count); a result whose parts are
    missing or of the wrong kind raises ToolMapError.
    """
    skipped = Counter() if skipped is None else skipped
    parts = route.result
    subreddit = _bare_name(arguments.get("subreddit"))
    limit = arguments.get("limit")

    def posts() -> list[RedditPost]:
        records = [_post(item, parts["posts"], subreddit, skipped) for item in _items(data, parts["posts"], tool)]
        return [post for post in records if post is not None][:limit]

    if tool in (RedditTool.COLLECT_SUBREDDIT_POSTS, RedditTool.SEARCH_REDDIT_POSTS):
        found = posts()
        if tool == RedditTool.SEARCH_REDDIT_POSTS:
            return SearchResults(query=arguments.get("query", ""), subreddit=subreddit, posts=found)
        return SubredditPosts(subreddit=subreddit or (found[0].subreddit if found else ""), posts=found)
    if tool == RedditTool.COLLECT_POST_COMMENTS:
        post = _post(_at(data, parts["post"].at, tool), parts["post"], subreddit, skipped)
        if post is None:
            raise ToolMapError(f"{tool}: the server's result has no readable post at {parts['post'].at!r}")
        comments = _comments(_items(data, parts["comments"], tool), parts["comments"], post, skipped)
        return PostComments(post=post, comments=comments[:limit], total_comments=len(comments))
    if tool == RedditTool.COLLECT_USER_DATA:
        found = posts() if "posts" in parts else []
        comments = (_comments(_items(data, parts["comments"], tool), parts["comments"], None, skipped)[:limit]
                    if "comments" in parts else [])
        return UserData(username=_bare_name(arguments.get("username"), "u/") or "", posts=found, comments=comments)
    if tool == RedditTool.COLLECT_SUBREDDIT_INFO:
        record = _at(data, parts["info"].at, tool)
        if not isinstance(record, dict):
            raise ToolMapError(f"{tool}: expected an object at {parts['info'].at!r}, got {type(record).__name__}")
        values = _read_fields(record, parts["info"].fields)
        values["name"] = _bare_name(values.get("name")) or subreddit
        try:
            return SubredditInfo.model_validate(values)
        except ValidationError as error:
            raise ToolMapError(f"{tool}: the subreddit info does not fit: {error}") from None
    if tool == RedditTool.LIST_SUBREDDITS:
        names = []
        for item in _items(data, parts["subreddits"], tool):
            name = _read_fields(item, parts["subreddits"].fields).get("name") if isinstance(item, dict) else item
            if isinstance(name, str) and name.strip():
                names.append(_bare_name(name))
            else:
                skipped["subreddit_without_name"] += 1
        return names
    raise ToolMapError(f"{tool} is not one of our tools")


# ------------------------------------------------------------------------------------------------ records
def _at(data: Any, path: str, tool: str) -> Any:
    """The value at dotted `path` ("" = `data`); list indices are numbers."""
    value = data
    for key in [part for part in path.split(".") if part]:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value):
            value = value[int(key)]
        else:
            shown = sorted(value)[:10] if isinstance(value, dict) else type(value).__name__
            raise ToolMapError(f"{tool}: the server's result has nothing at {path!r} (found {shown})")
    return value


def _items(data: Any, spec: RecordSpec, tool: str) -> list[Any]:
    value = _at(data, spec.at, tool)
    if not isinstance(value, list):
        raise ToolMapError(f"{tool}: expected a list at {spec.at!r}, got {type(value).__name__}")
    return value


def _source_value(record: dict, source: str | FieldSource) -> Any:
    if isinstance(source, FieldSource):
        if any(record.get(field) not in allowed for field, allowed in source.when.items()):
            return None
        source = source.source
    value: Any = record
    for key in source.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _read_fields(record: dict, fields: dict[str, str | FieldSource]) -> dict[str, Any]:
    values = {ours: _source_value(record, source) for ours, source in fields.items()}
    return {name: value for name, value in values.items() if value is not None}


def _epoch(value: Any) -> int | None:
    """Epoch seconds from a number, a numeric string or an ISO 8601 timestamp (naive means UTC)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(float(value))
        except ValueError:
            pass
        try:
            stamp = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return int(stamp.timestamp())
    return None


def _bare_name(value: Any, prefix: str = "r/") -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip().removeprefix("/").removeprefix(prefix)


def _bare_id(value: Any, prefix: str) -> str | None:
    """The id without its prefix; None unless it is a non-empty string (a number is refused, not converted)."""
    if type(value) is not str:
        return None
    return value.strip().removeprefix(prefix) or None


def _normalise(values: dict[str, Any], kind: str, skipped: Counter) -> dict[str, Any] | None:
    """Common clean-up of a mapped record; None (and a count) when it has no id."""
    if "created_utc" in values:
        stamp = _epoch(values["created_utc"])
        if stamp is None:
            skipped[f"{kind}_unreadable_created_utc"] += 1
            values.pop("created_utc")
        else:
            values["created_utc"] = stamp
    for name in ("score", "num_comments"):
        if name in values and not isinstance(values[name], int):
            try:
                values[name] = int(float(values[name]))
            except (TypeError, ValueError):
                skipped[f"{kind}_unreadable_{name}"] += 1
                values.pop(name)
    return values


def _post(item: Any, spec: RecordSpec, subreddit: str | None, skipped: Counter) -> RedditPost | None:
    if not isinstance(item, dict):
        skipped["post_not_an_object"] += 1
        return None
    values = _normalise(_read_fields(item, spec.fields), "post", skipped)
    if values.get("id") is not None and type(values["id"]) is not str:
        skipped["post_invalid_id"] += 1
        return None
    values["id"] = _bare_id(values.get("id"), "t3_")
    values["subreddit"] = _bare_name(values.get("subreddit")) or subreddit
    for required in ("id", "subreddit", "title"):
        if not values.get(required):
            skipped[f"post_missing_{required}"] += 1
            return None
    try:
        return RedditPost.model_validate(values)
    except ValidationError as error:
        skipped["post_invalid"] += 1
        log.warning("post %s left out: %s", values.get("id"), error.errors()[0]["msg"])
        return None


def _comments(items: list[Any], spec: RecordSpec, post: RedditPost | None, skipped: Counter) -> list[RedditComment]:
    """Comments in thread order (each parent before its replies); a tree under `spec.replies` is flattened."""
    top_parent = f"t3_{post.id}" if post is not None else None
    stack = [(item, top_parent) for item in reversed(items)]
    comments = []
    while stack:
        item, parent = stack.pop()
        if not isinstance(item, dict):
            skipped["comment_not_an_object"] += 1
            continue
        values = _normalise(_read_fields(item, spec.fields), "comment", skipped)
        comment_id = _bare_id(values.get("id"), "t1_")
        replies = item.get(spec.replies) if spec.replies else None
        if comment_id is None:
            skipped["comment_missing_id" if values.get("id") in (None, "") else "comment_invalid_id"] += 1
            _skip_replies(skipped, replies, spec.replies)
            continue
        values["id"] = comment_id
        values.setdefault("parent_id", parent)
        values.setdefault("link_id", top_parent)
        values.setdefault("subreddit", post.subreddit if post is not None else None)
        values["body"] = values.get("body") or ""
        try:
            comments.append(RedditComment.model_validate(values))
        except ValidationError as error:
            skipped["comment_invalid"] += 1
            log.warning("comment %s left out: %s", comment_id, error.errors()[0]["msg"])
            _skip_replies(skipped, replies, spec.replies)
            continue
        if isinstance(replies, list):
            stack.extend((reply, f"t1_{comment_id}") for reply in reversed(replies))
    return comments


def _skip_replies(skipped: Counter, replies: Any, field: str | None) -> None:
    """Replies under a skipped comment lose their parent: count them as skipped too."""
    count = _count_tree(replies, field)
    if count:
        skipped["comment_under_a_skipped_comment"] += count


def _count_tree(replies: Any, field: str | None) -> int:
    if not isinstance(replies, list):
        return 0
    return sum(1 + (_count_tree(r.get(field), field) if isinstance(r, dict) else 0) for r in replies)
