"""Collection never aborts on one bad item and never drops silently (issue 14, item 3).

One dump folder holds every kind of bad item at once: a subreddit folder and a post id the server's argument rules
refuse, a truncated .gz and a truncated .zst, a post whose `num_comments` says 0 while it has replies, a thread longer
than the per-thread cap, and ids of the wrong type. The real MCP server serves it over stdio; one collection reads
it all, and every left-out item is counted with its reason in the collection report.
"""
from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from mcp_servers import snapshot_env

from fl_crew_reddit.data_source import server_command
from fl_crew_reddit.reddit.backends import DumpBackend
from fl_crew_reddit.reddit.client import RedditMCPClient
from fl_crew_reddit.reddit.collector import collect, load_collected
from fl_crew_reddit.reddit.dump_files import MonthlyFile, open_decompressed, read_lines
from fl_crew_reddit.reddit.schemas import PostComments, RedditComment, RedditPost, SubredditPosts
from fl_crew_reddit.reddit.tool_map import load_tool_map, map_result
from fl_crew_reddit.reddit.tool_names import RedditTool

SKIP_CORRUPT_FILE = "corrupt_file"  # the reason a broken compressed file is counted under


def _post(pid, sub, num_comments=0, **extra) -> dict:
    return {"id": pid, "subreddit": sub, "title": f"Post {pid} title", "selftext": "", "created_utc": 1000,
            "score": 1, "num_comments": num_comments, **extra}


def _comment(cid, post, parent=None, sub="Good", **extra) -> dict:
    return {"id": cid, "link_id": f"t3_{post}", "parent_id": parent or f"t3_{post}", "subreddit": sub,
            "body": f"reply {cid} with some words", "created_utc": 1001, "score": 1, **extra}


def _lines(records) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def _truncated_zst(data: bytes) -> bytes:
    whole = zstandard.ZstdCompressor(level=3).compress(data)
    return whole[: len(whole) * 2 // 3]


def _words(seed: int, n: int = 30) -> str:
    """Text that compresses like prose (several zstd blocks per file), so a cut file still has whole lines."""
    return " ".join(f"w{(seed * 7919 + i * 104729) % 100003}" for i in range(n))


@pytest.fixture(scope="module")
def messy_dump(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    good = root / "Good"
    good.mkdir()
    posts = [
        _post("g1", "Good", num_comments=0),             # claims no comments, has two
        _post("g2", "Good", num_comments=2),             # has five: two beyond a cap of 3
        _post("bad-id", "Good", num_comments=1),         # the server's PostId rule refuses the hyphen
        _post(12345, "Good", num_comments=0),            # an id of the wrong type
    ]
    comments = [
        _comment("a1", "g1"), _comment("a2", "g1", parent="t1_a1"),
        *[_comment(f"b{i}", "g2") for i in range(5)],
        _comment("c1", "bad-id"),
        _comment(777, "g1"),                             # an id of the wrong type
        _comment("d1", "g1", parent=42),                 # a parent id of the wrong type
    ]
    (good / "submissions.jsonl").write_bytes(_lines(posts))
    (good / "comments.jsonl").write_bytes(_lines(comments))

    refused = root / "bad.name"                          # SubredditName allows letters, digits, _ and - only
    refused.mkdir()
    (refused / "submissions.jsonl").write_bytes(_lines([_post("r1", "bad.name")]))

    zipped = root / "Zipped"
    zipped.mkdir()
    zposts = [_post(f"z{i}", "Zipped", selftext=_words(i)) for i in range(2000)]
    gz = gzip.compress(_lines(zposts))
    (zipped / "submissions.jsonl.gz").write_bytes(gz[: len(gz) * 2 // 3])
    zcomments = [_comment(f"y{i}", "z1", sub="Zipped", body=_words(i)) for i in range(2000)]
    (zipped / "comments.jsonl.zst").write_bytes(_truncated_zst(_lines(zcomments)))
    return root


@pytest.fixture(scope="module")
def client(messy_dump, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with RedditMCPClient(server_command("dump", messy_dump), snapshot_env(), timeout_s=30, stderr_log=log) as client:
        yield client


@pytest.fixture(scope="module")
def report(client, tmp_path_factory):
    return collect(client, [], 10, tmp_path_factory.mktemp("collected"), comments_per_post=3)


def _entry(report, name):
    return next(item for item in report.subreddits if item.subreddit.lower() == name.lower())


def test_a_refused_subreddit_folder_is_counted_and_the_rest_collected(report):
    names = {item.subreddit for item in report.subreddits}
    assert {"Good", "Zipped", "bad.name"} <= names
    refused = _entry(report, "bad.name")
    assert refused.num_posts == 0 and refused.skipped == {"subreddit_refused": 1}
    assert _entry(report, "Good").num_posts > 0
    bundles = load_collected(report)  # the refused one has an (empty) file too: the preprocessor reads them all
    assert [b["posts"] for b in bundles if b["subreddit"] == "bad.name"] == [[]]


def test_a_refused_post_id_is_counted_and_its_siblings_kept(report):
    good = _entry(report, "Good")
    assert good.skipped.get("post_refused") == 1
    data = json.loads(Path(good.path).read_text())
    assert {p["id"] for p in data["posts"]} == {"g1", "g2"}


def test_comments_are_fetched_whatever_num_comments_claims(report):
    data = json.loads(Path(_entry(report, "Good").path).read_text())
    assert {c["id"] for c in data["comments"] if c["link_id"] == "t3_g1"} == {"a1", "a2"}


def test_comments_beyond_the_per_thread_cap_are_counted(report):
    good = _entry(report, "Good")
    data = json.loads(Path(good.path).read_text())
    assert sum(c["link_id"] == "t3_g2" for c in data["comments"]) == 3
    assert good.skipped.get("comments_over_cap") == 2


def test_wrong_type_ids_are_refused_and_counted_not_stringified(report):
    good = _entry(report, "Good")
    text = Path(good.path).read_text()
    assert '"12345"' not in text and '"777"' not in text and "t1_42" not in text
    assert good.skipped.get("invalid_fields") == 3  # post 12345, comment 777, comment d1 (parent 42)


def test_corrupt_compressed_files_are_counted_and_their_good_lines_kept(report):
    zipped = _entry(report, "Zipped")
    assert zipped.skipped.get(SKIP_CORRUPT_FILE) == 2  # the .gz and the .zst
    assert 0 < zipped.num_posts < 2000 and 0 < zipped.num_comments < 2000


def test_a_cap_above_the_servers_limit_is_not_refused(client, tmp_path):
    report = collect(client, ["Good"], 10, tmp_path, comments_per_post=5000)
    good = _entry(report, "Good")
    assert good.num_comments == 7 and "comments_over_cap" not in good.skipped


def test_collected_file_names_stay_inside_the_output_folder(client, tmp_path):
    class Named:  # a third-party server may call a subreddit anything
        def __init__(self, inner, name):
            self.inner, self.name = inner, name

        def __getattr__(self, attribute):
            return getattr(self.inner, attribute)

        def collect_subreddit_info(self, subreddit):
            info = self.inner.collect_subreddit_info(subreddit)
            return info.model_copy(update={"name": self.name})

    report = collect(Named(client, "../../escape"), ["Good"], 2, tmp_path / "out")
    assert Path(report.subreddits[0].path).resolve().parent == (tmp_path / "out").resolve()


# ---------------------------------------------------------------------------------------------- the pieces
def test_a_truncated_zst_is_an_error_not_a_silent_end(tmp_path):
    data = _lines([{"id": str(i), "x": "y" * 50} for i in range(5000)])
    path = tmp_path / "cut.zst"
    path.write_bytes(_truncated_zst(data))
    with pytest.raises(EOFError), open_decompressed(path) as stream:
        while stream.read(1 << 16):
            pass
    whole = tmp_path / "two.zst"
    whole.write_bytes(zstandard.ZstdCompressor().compress(b"1\n2\n") + zstandard.ZstdCompressor().compress(b"3\n"))
    assert [line for _, line in read_lines(whole)] == [b"1", b"2", b"3"]


def test_a_corrupt_monthly_file_is_counted_in_its_index(tmp_path):
    data = _lines([_post(f"m{i}", "books", selftext=_words(i)) for i in range(2000)])
    (tmp_path / "dump").mkdir()
    path = tmp_path / "dump" / "RS_2015-01.zst"
    path.write_bytes(_truncated_zst(data))
    monthly = MonthlyFile(path, tmp_path / "cache")
    assert monthly.skipped().counts[SKIP_CORRUPT_FILE] == 1
    assert 0 < monthly.subreddits()["books"]["records"] < 2000
    backend = DumpBackend(tmp_path / "dump", cache_dir=tmp_path / "cache2")
    assert 0 < len(backend.subreddit_posts("books", limit=5000).posts) < 2000
    assert backend.skipped[SKIP_CORRUPT_FILE] == 1


def test_a_garbage_gz_file_is_counted_and_the_comments_still_read(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "submissions.jsonl.gz").write_bytes(b"this is not gzip at all\n")
    (folder / "comments.jsonl").write_bytes(_lines([_comment("k1", "p1", sub="books")]))
    backend = DumpBackend(tmp_path)
    info = backend.subreddit_info("books")
    assert info.num_posts == 0 and info.num_comments == 1
    assert info.skipped == {SKIP_CORRUPT_FILE: 1}


@pytest.mark.parametrize("field, value", [("created_utc", "100"), ("created_utc", 100.0), ("score", True),
                                          ("stickied", "yes"), ("body", b"bytes")])
def test_the_record_models_refuse_wrong_types(field, value):
    record = _comment("x1", "p1")
    record["stickied"] = False
    with pytest.raises(ValueError):
        RedditComment.model_validate({**record, field: value})


def test_a_result_keeps_its_good_records_and_counts_the_bad(tmp_path):
    post = _post("p1", "books")
    thread = PostComments.model_validate({"post": post, "comments": [
        _comment("c1", "p1"), _comment(2, "p1"), _comment("c3", "p1", body=None), "not a record"]})
    assert [c.id for c in thread.comments] == ["c1"]
    assert thread.skipped == {"comment_invalid_id": 1, "comment_invalid_body": 1, "comment_not_an_object": 1}
    listing = SubredditPosts.model_validate({"subreddit": "books", "posts": [post, {**post, "id": 7}]})
    assert [p.id for p in listing.posts] == ["p1"] and listing.skipped == {"post_invalid_id": 1}
    assert isinstance(listing.posts[0], RedditPost)


def test_a_mapped_server_with_numeric_ids_is_refused_and_counted():
    route = load_tool_map("mcp-server-reddit").tools[RedditTool.COLLECT_POST_COMMENTS]
    post = {"id": "p1", "title": "A title", "subreddit": "books", "created_at": 5, "comment_count": 1}
    skipped: Counter = Counter()
    result = map_result(route, RedditTool.COLLECT_POST_COMMENTS, {"post_id": "p1", "limit": 2}, {
        "post": post, "comments": [{"id": 11, "body": "numeric id", "replies": [{"id": "r2", "body": "x"}]},
                                   {"id": "c2", "body": "fine"}, {"id": "c3", "body": "fine too"},
                                   {"id": "c4", "body": "over the limit"}]}, skipped)
    assert [c.id for c in result.comments] == ["c2", "c3"]
    assert skipped == {"comment_invalid_id": 1, "comment_under_a_skipped_comment": 1}
    assert result.total_comments == 3  # readable comments before the limit of 2
