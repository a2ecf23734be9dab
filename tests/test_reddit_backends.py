"""DumpBackend on the real reddit-2015 sample (read in place) and on small folders seeded with bad records."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from fl_crew_reddit.config import load_config
from fl_crew_reddit.data_source import make_source_backend
from fl_crew_reddit.reddit.backends import (
    SNAPSHOT_DIR,
    DumpBackend,
    RedditBackend,
    SnapshotBackend,
    make_backend,
)
from fl_crew_reddit.reddit.schemas import PostComments, RedditPost, SubredditInfo, SubredditPosts
from fl_crew_reddit.reddit.settings import LiveCredentials, RedditSourceSettings

REDDIT_2015 = Path(os.environ.get("REDDIT_2015_DIR", "/work/shared/data/reddit-2015"))
needs_sample = pytest.mark.skipif(not (REDDIT_2015 / "books" / "submissions.jsonl").is_file(),
                                  reason=f"reddit-2015 sample not found at {REDDIT_2015}")


def _line_count(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def _write_lines(path: Path, lines: list[bytes | str | dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            handle.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")


def _post(post_id: str, title: str = "a title", created: int = 1000, **extra) -> dict:
    return {"id": post_id, "subreddit": "pics", "title": title, "selftext": "", "created_utc": created,
            "score": 1, "num_comments": 0, **extra}


def _comment(comment_id: str, post_id: str, parent: str | None = None, created: int = 2000, **extra) -> dict:
    return {"id": comment_id, "link_id": f"t3_{post_id}", "parent_id": parent or f"t3_{post_id}",
            "subreddit": "pics", "body": f"body of {comment_id}", "created_utc": created, "score": 1, **extra}


# ---------------------------------------------------------------------------------------------- reddit-2015
@pytest.fixture(scope="module")
def sample() -> DumpBackend:
    return DumpBackend(REDDIT_2015)


@needs_sample
def test_lists_the_sample_subreddits(sample):
    assert isinstance(sample, RedditBackend)
    assert set(sample.list_subreddits()) == {"books", "history", "programming", "gadgets", "Sports", "weather"}


@needs_sample
def test_subreddit_posts_sorted_and_limited(sample):
    new = sample.subreddit_posts("books", limit=10, sort="new")
    assert isinstance(new, SubredditPosts) and new.subreddit == "books"
    assert len(new.posts) == 10
    assert all(isinstance(p, RedditPost) and p.subreddit.lower() == "books" for p in new.posts)
    times = [p.created_utc for p in new.posts]
    assert times == sorted(times, reverse=True)
    top = sample.subreddit_posts("books", limit=5, sort="top")
    assert [p.score for p in top.posts] == sorted((p.score for p in top.posts), reverse=True)
    assert len(sample.subreddit_posts("weather", limit=1000, sort="hot").posts) == _line_count(
        REDDIT_2015 / "weather" / "submissions.jsonl")
    with pytest.raises(ValueError):
        sample.subreddit_posts("books", limit=1, sort="best")


@needs_sample
def test_post_comments_is_a_thread(sample):
    posts = sample.subreddit_posts("history", limit=300).posts
    post = next(p for p in posts if p.num_comments >= 3)
    thread = sample.post_comments(post.id, limit=1000)
    assert isinstance(thread, PostComments) and thread.post.id == post.id
    assert thread.comments, "a post with num_comments >= 3 has comments"
    seen = {f"t3_{post.id}"}
    for comment in thread.comments:
        assert comment.link_id == f"t3_{post.id}"
        assert comment.parent_id in seen, "every parent comes before its replies"
        seen.add(f"t1_{comment.id}")
    assert sample.post_comments(f"t3_{post.id}", limit=1).comments == thread.comments[:1]


@needs_sample
def test_search_finds_a_title_word(sample):
    post = sample.subreddit_posts("programming", limit=50).posts[7]
    word = max(post.title.split(), key=len).strip(".,!?:;()\"'")
    found = sample.search_posts(word, subreddit="programming", limit=1000)
    assert post.id in {p.id for p in found.posts}
    assert found.subreddit == "programming"
    everywhere = sample.search_posts(word, limit=1000)
    assert everywhere.subreddit is None and post.id in {p.id for p in everywhere.posts}


@needs_sample
def test_subreddit_info_counts_match_the_files(sample):
    for name in sample.list_subreddits():
        info = sample.subreddit_info(name)
        assert isinstance(info, SubredditInfo) and info.name == name
        for kind, counted in (("submissions", info.num_posts), ("comments", info.num_comments)):
            path = (REDDIT_2015 / name / f"{kind}.jsonl").resolve()
            skipped = sum(sum(r.counts.values()) for r in sample.reports if r.path == path)
            assert counted + skipped == _line_count(path), path
        assert info.first_created_utc <= info.last_created_utc
    # the sample has one real id collision in books/comments.jsonl: counted, not silently dropped
    assert sample.skipped == {"duplicate_id": 1}


@needs_sample
def test_subreddit_names_are_case_insensitive(sample):
    ids = {tuple(p.id for p in sample.subreddit_posts(name, limit=5).posts)
           for name in ("Sports", "sports", "SPORTS", "r/sports")}
    assert len(ids) == 1
    assert sample.subreddit_info("BOOKS").name == "books"


@needs_sample
def test_unknown_subreddit_and_post_raise_lookup_error(sample):
    with pytest.raises(LookupError, match="available: .*books"):
        sample.subreddit_posts("nosuchsub")
    with pytest.raises(LookupError):
        sample.subreddit_info("../books")
    with pytest.raises(LookupError, match="unknown post"):
        sample.post_comments("zzzzzzz")


@needs_sample
def test_user_data_on_an_anonymised_dump_is_empty(sample):
    data = sample.user_data("someone", limit=10)
    assert data.username == "someone" and data.posts == [] and data.comments == []


# ---------------------------------------------------------------------------------------------- tolerance
@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "dump"
    _write_lines(root / "pics" / "submissions.jsonl", [
        _post("p1", "first good post", created=100),
        '{"id": "p2", "title": "truncated',                       # line 2: corrupt JSON
        b'{"id": "p3", "title": "bad bytes \xff\xfe here"}',      # line 3: invalid UTF-8
        {"subreddit": "pics", "title": "no id"},                  # line 4: missing id
        _post("p1", "duplicate of the first", created=101),       # line 5: duplicate id
        "",                                                       # blank line: no record, not counted
        '["a", "list"]',                                          # line 7: not an object
        _post("p4", "wrong type", score="many"),                  # line 8: invalid field
        _post("p5", "second good post", created=200, author="Alice", selftext=None),
    ])
    _write_lines(root / "pics" / "comments.jsonl", [
        _comment("c1", "p1", author="alice"),
        "{not json",
        _comment("c2", "p1", parent="t1_c1", created=2100),
        {"id": "c3", "link_id": "t3_p1"},                        # missing body
        _comment("c1", "p5"),                                     # duplicate id
    ])
    (root / "empty").mkdir()
    (root / "empty" / "submissions.jsonl").write_bytes(b"")
    (root / "notasubreddit").mkdir()  # no jsonl inside: ignored
    return root


def test_bad_records_are_counted_by_reason_and_good_ones_kept(messy, caplog):
    backend = DumpBackend(messy)
    assert backend.list_subreddits() == ["empty", "pics"]
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.reddit.backends"):
        posts = backend.subreddit_posts("pics", limit=100).posts
    assert sorted(p.id for p in posts) == ["p1", "p5"]
    assert next(p for p in posts if p.id == "p1").title == "first good post", "the first of a duplicate wins"
    assert next(p for p in posts if p.id == "p5").selftext == ""
    assert backend.skipped == {"invalid_json": 2, "invalid_utf8": 1, "missing_fields": 2, "duplicate_id": 2,
                               "not_an_object": 1, "invalid_fields": 1}
    submissions = str(messy / "pics" / "submissions.jsonl")
    warnings = [r.getMessage() for r in caplog.records if submissions in r.getMessage()]
    assert len(warnings) == 1, "one warning per file"
    assert "invalid_json x1 (first at line 2)" in warnings[0]
    assert "duplicate_id x1 (first at line 5)" in warnings[0]

    thread = backend.post_comments("p1")
    assert [c.id for c in thread.comments] == ["c1", "c2"]
    assert backend.subreddit_info("pics").num_comments == 2
    user = backend.user_data("ALICE")
    assert [p.id for p in user.posts] == ["p5"] and [c.id for c in user.comments] == ["c1"]

    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.reddit.backends"):
        info = backend.subreddit_info("empty")
    assert (info.num_posts, info.num_comments, info.first_created_utc) == (0, 0, None)
    assert backend.skipped["empty_file"] == 1
    assert any("empty_file" in r.getMessage() for r in caplog.records)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DumpBackend(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- media
def test_media_paths_resolve_inside_the_subreddit_folder_only(tmp_path):
    root = tmp_path / "dump"
    images = root / "cats" / "images"
    images.mkdir(parents=True)
    (images / "cat.png").write_bytes(b"\x89PNG fake")
    (images / "dog.jpg").write_bytes(b"fake")
    (root / "secret.png").write_bytes(b"outside the subreddit")
    (tmp_path / "outside.png").write_bytes(b"outside the root")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    _write_lines(root / "cats" / "submissions.jsonl", [
        _post("m1", url="images/cat.png"),
        _post("m2", url=(images / "cat.png").as_uri()),
        _post("m3", url="images/../../secret.png"),
        _post("m4", url=(tmp_path / "outside.png").as_uri()),
        _post("m5", url="images/link.png"),
        _post("m6", url="https://i.redd.it/cat.png"),
        _post("m7", url="images/missing.png"),
        _post("m8", url="images/cat.png", image_paths=["images/dog.jpg", "../../outside.png"]),
    ])
    backend = DumpBackend(root)
    posts = {p.id: p for p in backend.subreddit_posts("cats", limit=100).posts}
    cat, dog = str((images / "cat.png").resolve()), str((images / "dog.jpg").resolve())
    assert posts["m1"].image_paths == [cat]
    assert posts["m2"].image_paths == [cat]
    for escaped in ("m3", "m4", "m5", "m6", "m7"):
        assert posts[escaped].image_paths == [], escaped
    assert posts["m8"].image_paths == [dog, cat]
    assert posts["m6"].url == "https://i.redd.it/cat.png"
    assert backend.skipped == {"media_outside_folder": 4, "media_missing": 1}


# ---------------------------------------------------------------------------------------------- selection
@needs_sample
def test_make_backend_follows_the_config(tmp_path):
    dump = make_source_backend(load_config(reddit_backend="dump", reddit_dump_dir=REDDIT_2015,
                                           fl_crew_reddit_dir=tmp_path))
    assert isinstance(dump, DumpBackend) and "books" in dump.list_subreddits()
    with pytest.raises(ValueError, match="REDDIT_BACKEND=live needs REDDIT_CLIENT_ID"):  # ConfigError; see
        make_source_backend(load_config(reddit_backend="live", fl_crew_reddit_dir=tmp_path))  # test_live_backend.py
    if SNAPSHOT_DIR.is_dir():
        snapshot = make_source_backend(load_config(reddit_backend="snapshot", fl_crew_reddit_dir=tmp_path))
        assert isinstance(snapshot, SnapshotBackend) and snapshot.root == SNAPSHOT_DIR


def test_make_backend_needs_only_its_settings(tmp_path):
    """reddit/ builds a backend from plain values: no config module, no environment."""
    settings = RedditSourceSettings(backend="dump", dump_dir=tmp_path, dump_subreddits=("pics",), dump_min_score=3,
                                    dump_cache_dir=tmp_path / "cache")
    dump = make_backend(settings)
    assert isinstance(dump, DumpBackend) and dump.subreddit_filter == {"pics"} and dump.min_score == 3
    assert dump.cache_dir == tmp_path / "cache"
    with pytest.raises(ValueError, match="REDDIT_BACKEND=dump needs REDDIT_DUMP_DIR"):
        make_backend(RedditSourceSettings(backend="dump"))
    with pytest.raises(ValueError, match="unknown REDDIT_BACKEND 'ftp'"):
        RedditSourceSettings(backend="ftp")
    secret = LiveCredentials("app-id-123", "s3cr3t-value")
    assert "s3cr3t" not in repr(RedditSourceSettings(backend="live", credentials=secret)) and secret
    assert not LiveCredentials("app-id-123", " ")


def test_snapshot_backend_reads_the_package_folder():
    if not SNAPSHOT_DIR.is_dir():
        pytest.skip("the embedded snapshot is not there yet")
    backend = SnapshotBackend()
    for name in backend.list_subreddits():
        info = backend.subreddit_info(name)
        assert info.num_posts + info.num_comments >= 0
        for post in backend.subreddit_posts(name, limit=1000).posts:
            assert all(Path(p).is_file() and Path(p).is_relative_to(SNAPSHOT_DIR) for p in post.image_paths)
