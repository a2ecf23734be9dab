"""The live Reddit backend (PRAW) and the image fetch, tested at the HTTP edge with recorded API responses.

`responses` intercepts `requests`, which prawcore uses: every test runs the real PRAW + prawcore code path
(token request, bearer header, listing pagination, comment forest, "load more comments") against JSON files in
tests/fixtures/reddit_api/ shaped like oauth.reddit.com's answers. Waits are recorded, never slept.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
import responses

from fl_crew_reddit.config import ConfigError, load_config
from fl_crew_reddit.data_source import make_source_backend
from fl_crew_reddit.reddit.live_backend import (
    LiveRedditBackend,
    RedditAuthError,
    RedditUnavailableError,
    backoff_seconds,
    post_from_api,
)
from fl_crew_reddit.reddit.media_fetch import MediaFetchError, fetch_image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reddit_api"
TOKEN_URL = "https://www.reddit.com/api/v1/access_token"
API = "https://oauth.reddit.com"
SECRET = "s3cr3t-Value-That-Must-Not-Leak"
RATELIMIT = {"x-ratelimit-remaining": "995.0", "x-ratelimit-used": "5", "x-ratelimit-reset": "412"}


def fixture(name: str):
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def add(rsps, method, path: str, name: str | None = None, status: int = 200, headers: dict | None = None, **kw):
    body = kw.pop("body", None)
    if body is None and name is not None:
        body = (FIXTURES / name).read_text(encoding="utf-8")
    url = re.compile(re.escape(API + path.rstrip("/")) + r"/?(\?.*)?$")  # PRAW asks some paths with a trailing /
    rsps.add(method, url, body=body, status=status,
             content_type="application/json; charset=UTF-8", headers={**RATELIMIT, **(headers or {})}, **kw)


@pytest.fixture
def api():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.POST, TOKEN_URL, json=fixture("access_token.json"), status=200)
        yield rsps


@pytest.fixture
def waits():
    return []


@pytest.fixture
def backend(waits):
    return LiveRedditBackend("app-id-123", SECRET, subreddits=["r/learnpython", "Python"], max_retries=2,
                             user_agent="python:fl_crew_reddit-tests:0.1 (by /u/tester)", sleep=waits.append,
                             rng=random.Random(0))


def calls_to(rsps, path: str) -> list:
    return [call for call in rsps.calls if urlparse(call.request.url).path.rstrip("/") == path.rstrip("/")]


def query(call) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlparse(call.request.url).query).items()}


# ---------------------------------------------------------------------------------------------- mapping of each tool
def test_subreddit_posts_maps_text_image_gallery_video_and_deleted_posts(api, backend):
    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new.json")
    result = backend.subreddit_posts("r/LearnPython", limit=5, sort="new")

    assert result.subreddit == "learnpython"
    posts = {post.id: post for post in result.posts}
    assert [post.id for post in result.posts] == ["1b9x2kq", "1b9w7ph", "1b9v4ad", "1b9u1zz", "1b9t0aa"]
    text = posts["1b9x2kq"]
    assert (text.subreddit, text.author, text.created_utc, text.score, text.num_comments) == \
        ("learnpython", "quiet_heron", 1709251200, 42, 6)
    assert text.selftext.startswith("I want to read a CSV") and text.image_urls == [] and text.video_url is None
    assert text.permalink == "/r/learnpython/comments/1b9x2kq/how_do_i_read_a_csv_file_without_pandas/"
    assert posts["1b9w7ph"].image_urls == ["https://i.redd.it/q8v3m2n5xplc1.png"]
    # gallery: items in gallery order; the failed item and the video item are skipped and counted
    assert posts["1b9v4ad"].image_urls == [
        "https://preview.redd.it/a1b2c3d4e5f6g.png?width=1024&format=png&auto=webp&s=22bb",
        "https://i.redd.it/h7i8j9k0l1m2n.gif"]
    assert backend.skipped == {"gallery_item_unavailable": 1, "gallery_item_not_an_image": 1}
    video = posts["1b9u1zz"]
    assert video.is_video and video.video_url == "https://v.redd.it/7h3kq0vnyplc1/DASH_720.mp4?source=fallback"
    assert video.image_urls == ["https://external-preview.redd.it/Zm9vYmFy.png?format=pjpg&auto=webp&s=9c0ffee"]
    deleted = posts["1b9t0aa"]
    assert deleted.author is None and deleted.selftext == "[deleted]"

    # the HTTP edge: one app-only token (client_credentials, basic auth), then a bearer call with our user agent
    token_call = calls_to(api, "/api/v1/access_token")[0]
    assert "grant_type=client_credentials" in token_call.request.body
    assert token_call.request.headers["Authorization"].startswith("Basic ")
    listing = calls_to(api, "/r/learnpython/new")[0]
    assert listing.request.headers["Authorization"].startswith("bearer eyJ")
    assert listing.request.headers["User-Agent"].startswith("python:fl_crew_reddit-tests:0.1 (by /u/tester)")
    assert query(listing)["limit"] == "5" and query(listing)["raw_json"] == "1"


def test_hot_and_top_sorts_ask_the_matching_listing(api, backend):
    add(api, responses.GET, "/r/learnpython/hot", "r_learnpython_hot.json")
    add(api, responses.GET, "/r/learnpython/top", "r_learnpython_hot.json")
    assert [p.id for p in backend.subreddit_posts("learnpython", limit=2, sort="hot").posts] == ["1b9u1zz", "1b9w7ph"]
    assert len(backend.subreddit_posts("learnpython", limit=2, sort="top").posts) == 2
    assert query(calls_to(api, "/r/learnpython/top")[0])["t"] == "all"
    with pytest.raises(ValueError, match="sort must be one of"):
        backend.subreddit_posts("learnpython", sort="rising")


def test_search_posts_in_one_subreddit_and_in_the_configured_ones(api, backend):
    add(api, responses.GET, "/r/learnpython/search", "r_learnpython_search.json")
    add(api, responses.GET, "/r/learnpython+python/search", "r_learnpython_search.json")
    found = backend.search_posts("csv pandas", subreddit="learnpython", limit=10)
    assert found.subreddit == "learnpython" and [p.id for p in found.posts] == ["1b9x2kq"]
    params = query(calls_to(api, "/r/learnpython/search")[0])
    assert params["q"] == "csv pandas" and params["restrict_sr"] in ("on", "True") and params["sort"] == "relevance"
    everywhere = backend.search_posts("csv", limit=10)
    assert everywhere.subreddit is None and len(everywhere.posts) == 1
    assert len(calls_to(api, "/r/learnpython+python/search")) == 1
    with pytest.raises(ValueError, match="at least one word"):
        backend.search_posts("  ?! ")


def test_post_comments_in_thread_order_with_more_comments_and_a_deleted_comment(api, backend):
    add(api, responses.GET, "/comments/1b9x2kq", "comments_1b9x2kq.json")
    add(api, responses.POST, "/api/morechildren", "morechildren.json")
    thread = backend.post_comments("t3_1b9x2kq", limit=100)

    assert thread.post.id == "1b9x2kq" and thread.post.num_comments == 6
    assert [c.id for c in thread.comments] == ["kt8m0aa", "kt8m1zz", "kt8m2xb", "kt8m3yc", "kt8m4zd", "kt8m5ae"]
    by_id = {c.id: c for c in thread.comments}
    assert by_id["kt8m0aa"].distinguished == "moderator" and by_id["kt8m0aa"].stickied
    assert by_id["kt8m2xb"].author is None and by_id["kt8m2xb"].body == "[deleted]"
    assert by_id["kt8m2xb"].parent_id == "t1_kt8m1zz" and by_id["kt8m2xb"].link_id == "t3_1b9x2kq"
    assert by_id["kt8m5ae"].body == "[removed]" and by_id["kt8m5ae"].parent_id == "t1_kt8m4zd"
    assert by_id["kt8m1zz"].created_utc == 1709251500 and by_id["kt8m1zz"].subreddit == "learnpython"
    more = calls_to(api, "/api/morechildren")[0]
    assert "children=kt8m4zd%2Ckt8m5ae" in more.request.body and "link_id=t3_1b9x2kq" in more.request.body
    params = query(calls_to(api, "/comments/1b9x2kq")[0])
    assert params["sort"] == "confidence" and params["limit"] == "100"
    assert "comments_behind_more_links" not in backend.skipped


def test_post_comments_within_the_limit_skips_more_links_and_counts_them(api, backend):
    add(api, responses.GET, "/comments/1b9x2kq", "comments_1b9x2kq.json")
    thread = backend.post_comments("1b9x2kq", limit=3)
    assert [c.id for c in thread.comments] == ["kt8m0aa", "kt8m1zz", "kt8m2xb"]
    assert calls_to(api, "/api/morechildren") == []
    assert backend.skipped["comments_behind_more_links"] == 2


def test_user_data_and_a_suspended_user(api, backend):
    add(api, responses.GET, "/user/quiet_heron/about", "user_quiet_heron_about.json")
    add(api, responses.GET, "/user/quiet_heron/submitted", "user_quiet_heron_submitted.json")
    add(api, responses.GET, "/user/quiet_heron/comments", "user_quiet_heron_comments.json")
    data = backend.user_data("u/quiet_heron", limit=10)
    assert data.username == "u/quiet_heron"
    assert [p.id for p in data.posts] == ["1b9x2kq"] and [c.id for c in data.comments] == ["kt8m3yc"]
    assert data.comments[0].author == "quiet_heron" and data.comments[0].link_id == "t3_1b9x2kq"
    assert query(calls_to(api, "/user/quiet_heron/submitted")[0])["sort"] == "new"

    add(api, responses.GET, "/user/spam_bot_9000/about", "user_suspended_about.json")
    with pytest.raises(LookupError, match="u/spam_bot_9000 is suspended"):
        backend.user_data("spam_bot_9000")


def test_subreddit_info_from_about_and_the_newest_page(api, backend):
    add(api, responses.GET, "/r/learnpython/about", "r_learnpython_about.json")
    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new.json")  # page 1 says: after=t3_1b9t0aa
    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new_last_page.json")
    info = backend.subreddit_info("LEARNPYTHON")
    assert info.name == "learnpython"
    assert info.description.startswith("Subreddit for posting questions")
    assert (info.num_posts, info.num_comments) == (6, 6 + 3 + 0 + 12 + 2 + 4)
    assert (info.first_created_utc, info.last_created_utc) == (1709233200, 1709251200)
    assert info.skipped == {"gallery_item_unavailable": 1, "gallery_item_not_an_image": 1, "duplicate_id": 1}
    pages = calls_to(api, "/r/learnpython/new")
    assert len(pages) == 2 and query(pages[1])["after"] == "t3_1b9t0aa"
    assert backend.list_subreddits() == ["learnpython", "python"]


def test_a_crosspost_takes_its_media_from_the_parent():
    data = fixture("r_learnpython_new.json")["data"]["children"]
    gallery = data[2]["data"]
    crosspost = {"id": "1c0aaaa", "title": "x-post", "subreddit": "Python", "author": "relay", "created_utc": 1.0,
                 "url": "/r/learnpython/comments/1b9v4ad/", "crosspost_parent_list": [gallery]}
    post, skipped = post_from_api(crosspost)
    assert len(post.image_urls) == 2 and skipped["gallery_item_unavailable"] == 1


# ---------------------------------------------------------------------------------------------- retries
def test_a_429_is_retried_with_backoff_then_succeeds(api, backend, waits, caplog):
    add(api, responses.GET, "/r/learnpython/new", "error_429.json", status=429)
    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new.json")
    caplog.set_level("WARNING", logger="fl_crew_reddit.reddit.live_backend")
    posts = backend.subreddit_posts("learnpython", limit=5).posts
    assert len(posts) == 5
    assert len(calls_to(api, "/r/learnpython/new")) == 2          # one refusal, one success
    assert backend.retries == {"HTTP 429": 1}
    assert len(waits) == 1 and 0.5 <= waits[0] <= 1.0             # base 1 s with equal jitter
    assert "HTTP 429 on r/learnpython; retry 1/2" in caplog.text


def test_retry_after_is_honoured(api, backend, waits):
    add(api, responses.GET, "/r/learnpython/new", "error_429.json", status=429, headers={"retry-after": "7"})
    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new.json")
    backend.subreddit_posts("learnpython", limit=5)
    assert waits == [7.0]


def test_transient_errors_are_retried_a_bounded_number_of_times(api, backend, waits):
    add(api, responses.GET, "/r/learnpython/new", status=503, body="<html>503 Service Unavailable</html>")
    with pytest.raises(RedditUnavailableError, match=r"failed after 3 attempts \(last: HTTP 503\)"):
        backend.subreddit_posts("learnpython", limit=5)
    # max_retries=2 -> exactly 3 requests: prawcore's own inner retries are off, so attempts do not multiply
    assert len(calls_to(api, "/r/learnpython/new")) == 3
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1.0 and 1.0 <= waits[1] <= 2.0


def test_a_connection_error_then_success(api, backend, waits):
    add(api, responses.GET, "/r/learnpython/new", body=requests.ConnectionError("connection reset by peer"))
    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new.json")
    assert len(backend.subreddit_posts("learnpython", limit=5).posts) == 5
    assert backend.retries == {"ConnectionError": 1} and len(waits) == 1


def test_backoff_grows_exponentially_and_is_capped():
    rng = random.Random(1)
    for retry in range(8):
        wait = backoff_seconds(retry, rng, cap=10.0)
        ceiling = min(10.0, 2 ** retry)
        assert ceiling / 2 <= wait <= ceiling
    assert backoff_seconds(0, rng, retry_after=500, cap=60) == 60


@pytest.mark.parametrize("status, name, message", [
    (404, "error_404_banned.json", "r/gone_sub is banned (404)"),
    (403, "error_403_private.json", "r/gone_sub is private (403)"),
    (404, "error_404.json", "r/gone_sub does not exist (404)"),
])
def test_banned_private_and_missing_subreddits_are_clear_errors_not_retried(api, backend, waits, status, name,
                                                                            message):
    add(api, responses.GET, "/r/gone_sub/new", name, status=status)
    with pytest.raises(LookupError) as error:
        backend.subreddit_posts("gone_sub", limit=5)
    assert str(error.value) == message
    assert len(calls_to(api, "/r/gone_sub/new")) == 1 and waits == []


def test_a_missing_post_is_a_lookup_error(api, backend):
    add(api, responses.GET, "/comments/zzzzzzz", "error_404.json", status=404)
    with pytest.raises(LookupError, match="post zzzzzzz does not exist"):
        backend.post_comments("zzzzzzz")


# ---------------------------------------------------------------------------------------------- credentials
def test_wrong_credentials_give_one_clear_message_without_the_secret(backend, waits, caplog):
    caplog.set_level("DEBUG")  # prawcore, urllib3 and our own logs, at their most talkative
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, TOKEN_URL, body=(FIXTURES / "error_401.json").read_text(), status=401,
                 content_type="application/json")
        with pytest.raises(RedditAuthError) as error:
            backend.subreddit_posts("learnpython", limit=5)
        assert len(rsps.calls) == 1 and waits == []                # no retry, no listing call
    message = str(error.value)
    assert "REDDIT_CLIENT_ID / REDDIT_CLIENT_SECRET" in message and "HTTP 401" in message
    assert SECRET not in message and "app-id-123" not in message
    assert isinstance(error.value, ValueError)  # a settings error, reported like ConfigError
    basic = base64.b64encode(f"app-id-123:{SECRET}".encode()).decode()
    assert SECRET not in caplog.text and basic not in caplog.text


def test_an_oauth_error_answer_is_a_credentials_error(backend):
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, TOKEN_URL, json={"error": "unsupported_grant_type"}, status=200)
        with pytest.raises(RedditAuthError, match="OAuth error 'unsupported_grant_type'"):
            backend.verify_credentials()


def test_make_backend_builds_the_live_backend_and_checks_the_token(tmp_path, monkeypatch):
    monkeypatch.setenv("REDDIT_CLIENT_ID", "app-id-123")
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", SECRET)
    config = load_config(reddit_backend="live", subreddits="learnpython", fl_crew_reddit_dir=tmp_path)
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, TOKEN_URL, json=fixture("access_token.json"))
        live = make_source_backend(config)
        assert len(rsps.calls) == 1
    assert isinstance(live, LiveRedditBackend) and live.list_subreddits() == ["learnpython"]
    assert SECRET not in repr(live) and "app-id-123" not in repr(live)
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, TOKEN_URL, body='{"message": "Unauthorized", "error": 401}', status=401)
        with pytest.raises(RedditAuthError, match="Reddit rejected REDDIT_CLIENT_ID"):
            make_source_backend(config)


def test_missing_credentials_or_subreddits_stop_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("REDDIT_CLIENT_ID", raising=False)
    monkeypatch.delenv("REDDIT_CLIENT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="REDDIT_BACKEND=live needs REDDIT_CLIENT_ID and REDDIT_CLIENT_SECRET"):
        load_config(reddit_backend="live", subreddits="learnpython", fl_crew_reddit_dir=tmp_path)
    monkeypatch.setenv("REDDIT_CLIENT_ID", "app-id-123")
    monkeypatch.setenv("REDDIT_CLIENT_SECRET", SECRET)
    with pytest.raises(ConfigError) as error:
        load_config(reddit_backend="live", fl_crew_reddit_dir=tmp_path)
    assert "needs SUBREDDITS" in str(error.value) and SECRET not in str(error.value)
    with pytest.raises(RedditAuthError, match="needs REDDIT_CLIENT_ID"):
        LiveRedditBackend("", " ", subreddits=["learnpython"])


def test_the_mcp_server_serves_the_live_backend(api, backend):
    from fl_crew_reddit.reddit.server import build_server

    add(api, responses.GET, "/r/learnpython/new", "r_learnpython_new.json")
    server = build_server(backend, open_world=True)
    _, structured = asyncio.run(server.call_tool("collect_subreddit_posts", {"subreddit": "learnpython", "limit": 2}))
    assert [post["id"] for post in structured["posts"]][:2] == ["1b9x2kq", "1b9w7ph"]
    assert structured["posts"][1]["image_urls"] == ["https://i.redd.it/q8v3m2n5xplc1.png"]


# ---------------------------------------------------------------------------------------------- image fetch
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200
IMG = "https://i.redd.it/q8v3m2n5xplc1.png"


def test_fetch_image_returns_the_bytes():
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, IMG, body=PNG, content_type="image/png")
        assert fetch_image(IMG, max_bytes=10_000, timeout_s=5) == PNG
        assert rsps.calls[0].request.headers["Accept"] == "image/*"


@pytest.mark.parametrize("kwargs, reason", [
    (dict(body=b"<html>not here</html>", content_type="text/html; charset=utf-8"), "not_an_image"),
    (dict(body=b"", content_type="image/png"), "not_an_image"),
    (dict(body=PNG, content_type="image/png", status=404), "http_error"),
    (dict(body=PNG, content_type="image/png", status=503), "http_error"),
    (dict(body=requests.ConnectTimeout("connect timed out")), "timeout"),
    (dict(body=requests.ReadTimeout("read timed out")), "timeout"),
    (dict(body=requests.ConnectionError("refused")), "http_error"),
])
def test_fetch_image_skips_with_a_reason(kwargs, reason):
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, IMG, **kwargs)
        with pytest.raises(MediaFetchError) as error:
            fetch_image(IMG, max_bytes=10_000, timeout_s=5)
    assert error.value.reason == reason and IMG in error.value.message


def test_fetch_image_caps_the_size_announced_or_streamed():
    big = b"\xff\xd8\xff" + b"\x00" * 300_000
    with responses.RequestsMock() as rsps:
        rsps.add(responses.GET, IMG, body=big, content_type="image/jpeg", auto_calculate_content_length=True)
        with pytest.raises(MediaFetchError) as announced:
            fetch_image(IMG, max_bytes=100_000, timeout_s=5)
    assert announced.value.reason == "too_large" and "300003 bytes announced" in announced.value.message
    with responses.RequestsMock() as rsps:  # no Content-Length: the stream is cut at the cap
        rsps.add(responses.GET, IMG, body=big, content_type="image/jpeg")
        with pytest.raises(MediaFetchError) as streamed:
            fetch_image(IMG, max_bytes=100_000, timeout_s=5)
    assert streamed.value.reason == "too_large" and "more than 100000 bytes" in streamed.value.message


def test_fetch_image_refuses_non_http_urls():
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "/r/pics/a.png"):
        with pytest.raises(MediaFetchError) as error:
            fetch_image(url, max_bytes=10_000, timeout_s=5)
        assert error.value.reason == "http_error"
