"""Records that travel from a Reddit backend through the MCP server to the collector.

Field names follow the Pushshift / Arctic Shift dumps (`RS_*` submissions, `RC_*` comments) and Reddit's own API,
so a record from any backend reads the same downstream.
"""
from __future__ import annotations

from pydantic import BaseModel, Field


class RedditPost(BaseModel):
    """A submission. `image_paths` holds local files (snapshot/dump: images, or videos whose keyframes preprocessing
    takes) once media is resolved."""

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


class SubredditPosts(BaseModel):
    subreddit: str
    posts: list[RedditPost]


class SearchResults(BaseModel):
    query: str
    subreddit: str | None = None
    posts: list[RedditPost]


class PostComments(BaseModel):
    post: RedditPost
    comments: list[RedditComment]


class UserData(BaseModel):
    username: str
    posts: list[RedditPost]
    comments: list[RedditComment]


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
