"""Records that travel from a Reddit backend through the MCP server to the collector.

Field names follow the Pushshift / Arctic Shift dumps (`RS_*` submissions, `RC_*` comments) and Reddit's own API,
so a record from any backend reads the same downstream.

Posts and comments are strict: a field of the wrong type (an id that is a number, a score that is `true`, a
timestamp that is a string) is refused, never converted. A result (posts of a subreddit, a search, a thread, a
user's records) keeps its readable records and counts the others in its `skipped`, by reason
(`post_invalid_id`, `comment_missing_body`, `comment_not_an_object`...), instead of failing whole.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_STRICT = ConfigDict(strict=True)


class RedditPost(BaseModel):
    """A submission. `image_paths` holds local files (snapshot/dump: images, or videos whose keyframes preprocessing
    takes) once media is resolved."""

    model_config = _STRICT
    id: str
    subreddit: str
    title: str
    selftext: str = ""
    author: str | None = None
    created_utc: int = 0
    score: int = 0
    num_comments: int = 0
    url: str | None = None
    permalink: str | None = None
    is_video: bool = False
    image_paths: list[str] = Field(default_factory=list)
    image_urls: list[str] = Field(
        default_factory=list, description="remote images of a live post, in order: the image, each gallery item, or "
                                          "a video's preview; fetched with media_fetch.fetch_image")
    video_url: str | None = Field(None, description="a live Reddit-hosted video (v.redd.it fallback MP4)")


class RedditComment(BaseModel):
    """A comment. `link_id` is `t3_<post id>`; `parent_id` is `t3_<post id>` (top level) or `t1_<comment id>`."""

    model_config = _STRICT
    id: str
    link_id: str
    parent_id: str
    subreddit: str
    body: str
    author: str | None = None
    created_utc: int = 0
    score: int = 0
    distinguished: str | None = Field(None, description="'moderator' or 'admin' when posted with the mod badge")
    stickied: bool = Field(False, description="pinned to the top of the thread (only moderators can)")


def readable_records(values: Any, lists: dict[str, type[BaseModel]]) -> Any:
    """A result's raw `values` with each list in `lists` (field -> record model) cut to its readable records; the
    others are counted in `values["skipped"]` by reason: `<kind>_invalid_<field>`, `<kind>_missing_<field>` or
    `<kind>_not_an_object`, kind being post or comment."""
    if not isinstance(values, dict):
        return values
    skipped = Counter(values.get("skipped") or {})
    values = dict(values)
    for name, model in lists.items():
        items = values.get(name)
        if not isinstance(items, list):
            continue
        kind = "post" if model is RedditPost else "comment"
        kept = []
        for item in items:
            if isinstance(item, model):
                kept.append(item)
                continue
            if not isinstance(item, dict):
                skipped[f"{kind}_not_an_object"] += 1
                continue
            try:
                kept.append(model.model_validate(item))
            except ValidationError as error:
                first = error.errors()[0]
                field = str(first["loc"][0]) if first["loc"] else "record"
                skipped[f"{kind}_{'missing' if first['type'] == 'missing' else 'invalid'}_{field}"] += 1
        values[name] = kept
    values["skipped"] = dict(skipped)
    return values


_SKIPPED_RECORDS = "records of this result left out because they could not be read (a field missing or of the " \
                   "wrong type, not an object), by reason"


class SubredditPosts(BaseModel):
    subreddit: str
    posts: list[RedditPost]
    skipped: dict[str, int] = Field(default_factory=dict, description=_SKIPPED_RECORDS)

    @model_validator(mode="before")
    @classmethod
    def _readable(cls, values: Any) -> Any:
        return readable_records(values, {"posts": RedditPost})


class SearchResults(BaseModel):
    query: str
    subreddit: str | None = None
    posts: list[RedditPost]
    skipped: dict[str, int] = Field(default_factory=dict, description=_SKIPPED_RECORDS)

    @model_validator(mode="before")
    @classmethod
    def _readable(cls, values: Any) -> Any:
        return readable_records(values, {"posts": RedditPost})


class PostComments(BaseModel):
    post: RedditPost
    comments: list[RedditComment]
    total_comments: int | None = Field(
        None, description="comments the source has for this post before `limit` cut them (at least this many; "
                          "None when the source does not say): how many lie beyond a per-thread cap")
    skipped: dict[str, int] = Field(default_factory=dict, description=_SKIPPED_RECORDS)

    @model_validator(mode="before")
    @classmethod
    def _readable(cls, values: Any) -> Any:
        return readable_records(values, {"comments": RedditComment})


class UserData(BaseModel):
    username: str
    posts: list[RedditPost]
    comments: list[RedditComment]
    skipped: dict[str, int] = Field(default_factory=dict, description=_SKIPPED_RECORDS)

    @model_validator(mode="before")
    @classmethod
    def _readable(cls, values: Any) -> Any:
        return readable_records(values, {"posts": RedditPost, "comments": RedditComment})


class SubredditInfo(BaseModel):
    name: str
    num_posts: int | None = Field(None, description="None when the source does not say (e.g. a third-party server)")
    num_comments: int | None = Field(None, description="None when the source does not say")
    first_created_utc: int | None = None
    last_created_utc: int | None = None
    description: str = ""
    skipped: dict[str, int] = Field(default_factory=dict,
                                    description="records (lines, files, media references) of this subreddit's source "
                                                "left out while reading, by reason")
