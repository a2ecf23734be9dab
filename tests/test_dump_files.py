"""Real dump files: .zst / .gz / .jsonl in the per-subreddit and the monthly RS_/RC_ layouts read exactly like the
plain reddit-2015 folder; streaming in bounded memory; filters; the monthly index is reused, not rebuilt."""
from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tracemalloc
import types
from pathlib import Path

import pytest
import zstandard

from fl_crew_reddit.config import load_config
from fl_crew_reddit.data_source import make_source_backend
from fl_crew_reddit.reddit.backends import DumpBackend
from fl_crew_reddit.reddit.dump_files import (
    MonthlyFile,
    iter_lines,
    open_decompressed,
    read_lines,
    scan_lines,
)

REDDIT_2015 = Path(os.environ.get("REDDIT_2015_DIR", "/work/shared/data/reddit-2015"))
needs_sample = pytest.mark.skipif(not (REDDIT_2015 / "books" / "submissions.jsonl").is_file(),
                                  reason=f"reddit-2015 sample not found at {REDDIT_2015}")
SUBSET = ("books", "weather")  # books has the sample's one duplicate id; two subreddits keep the tests fast
THREADS_PER_SUBREDDIT = 120
LONG_WINDOW = zstandard.ZstdCompressionParameters.from_level(3, window_log=31, enable_ldm=True)  # as the dumps


def _zst(data: bytes, long_window: bool = False) -> bytes:
    out = io.BytesIO()
    compressor = (zstandard.ZstdCompressor(compression_params=LONG_WINDOW) if long_window
                  else zstandard.ZstdCompressor(level=3))
    with compressor.stream_writer(out, closefd=False) as writer:  # a stream: no content size, like the dumps
        writer.write(data)
    return out.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".zst"):
        data = _zst(data, long_window=path.name.startswith(("RS_", "RC_")))
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _lines(records: list) -> bytes:
    return b"".join((json.dumps(r).encode() if isinstance(r, dict) else r) + b"\n" for r in records)


def _monthly_from(folder: Path, out: Path) -> Path:
    """RS_/RC_ monthly files (every subreddit mixed, in time order) from a per-subreddit folder."""
    for kind, prefix in (("submissions", "RS"), ("comments", "RC")):
        months: dict[str, list[tuple[int, bytes]]] = {}
        for path in sorted(folder.glob(f"*/{kind}.jsonl")):
            for line in path.read_bytes().splitlines():
                if line.strip():
                    created = json.loads(line)["created_utc"]
                    month = __import__("time").strftime("%Y-%m", __import__("time").gmtime(created))
                    months.setdefault(month, []).append((created, line))
        for month, rows in months.items():
            rows.sort(key=lambda row: row[0])  # stable: same-second records keep their file order
            _write(out / f"{prefix}_{month}.zst", b"".join(line + b"\n" for _, line in rows))
    return out


def _everything(backend: DumpBackend) -> dict:
    """What the tools answer for every subreddit: info, all posts, the threads of the newest posts."""
    result = {}
    for name in backend.list_subreddits():
        posts = backend.subreddit_posts(name, limit=100_000, sort="new")
        result[name] = {
            "info": backend.subreddit_info(name),
            "posts": posts,
            "top": backend.subreddit_posts(name, limit=50, sort="top"),
            "threads": [backend.post_comments(p.id, limit=100_000) for p in posts.posts[:THREADS_PER_SUBREDDIT]],
        }
    return result


# ---------------------------------------------------------------------------------------------- lines
@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_lines_cut_by_a_chunk_boundary_are_joined(chunk):
    data = b'{"a": 1}\n\n{"bb": "two"}\r\n{"c": "' + b"x" * 40 + b'"}\nlast line without newline'
    got = list(iter_lines(io.BytesIO(data), chunk_bytes=chunk, max_line_bytes=1000))
    assert got == list(enumerate(data.split(b"\n"), start=1))


@pytest.mark.parametrize("chunk", [2, 5, 16, 4096])
def test_an_over_long_line_is_dropped_while_the_next_lines_survive(chunk):
    data = b"short\n" + b"L" * 100 + b"\nafter\n" + b"M" * 30 + b"\nok\n" + b"N" * 50
    got = list(iter_lines(io.BytesIO(data), chunk_bytes=chunk, max_line_bytes=20))
    assert got == [(1, b"short"), (2, None), (3, b"after"), (4, None), (5, b"ok"), (6, None)]


class _EndlessLine(io.RawIOBase):
    """`size` bytes of one line without a newline, produced on demand (nothing is held)."""

    def __init__(self, size: int):
        self.left = size
        self.largest_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = min(n, self.left)
        self.left -= n
        self.largest_read = max(self.largest_read, n)
        return b"x" * n


def test_streaming_holds_one_chunk_not_the_file():
    stream = _EndlessLine(64 << 20)  # a 64 MiB line
    lines = iter_lines(stream, chunk_bytes=64 << 10, max_line_bytes=1 << 20)
    assert isinstance(lines, types.GeneratorType)
    tracemalloc.start()
    try:
        got = list(lines)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [(1, None)] and stream.left == 0
    assert stream.largest_read == 64 << 10
    assert peak < 4 << 20, f"peak {peak} bytes while streaming 64 MiB"


def test_zst_with_the_dumps_long_window_is_read(tmp_path):
    data = _lines([{"id": str(i), "subreddit": "a"} for i in range(1000)])
    path = _write(tmp_path / "RS_2015-01.zst", data)
    with pytest.raises(zstandard.ZstdError):  # what a default decoder says about these files
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read()
    with open_decompressed(path) as stream:
        assert stream.read() == data
    # several frames one after the other (pzstd, appended files) read as one stream
    two = tmp_path / "two.zst"
    two.write_bytes(_zst(b"1\n2\n") + _zst(b"3\n"))
    assert [line for _, line in read_lines(two)] == [b"1", b"2", b"3"]


def test_scan_routes_by_the_subreddit_member_and_parses_the_rest(tmp_path):
    crosspost = {"id": "x1", "subreddit": "b", "crosspost_parent_list": [{"id": "p0", "subreddit": "a"}]}
    lines = [
        b'{"id": "1", "subreddit": "A", "title": "\\"subreddit\\": \\"zzz\\""}',  # the pattern inside a string
        json.dumps(crosspost).encode(),                                          # nested member: parsed
        b'{"id": "2","subreddit":"a"}',
        b'{"id": "3", "title": "no subreddit"}',
        b"{not json",
        b"[1, 2]",
        b"",
        b'{"id": "4", "subreddit": "b\xff"}',
    ]
    stats = scan_lines([(1, lines)], set(), None)
    assert {key: entry["records"] for key, entry in stats.subreddits.items()} == {"a": 2, "b": 1}
    assert stats.subreddits["a"]["name"] == "A" and stats.subreddits["a"]["other_names"] == ["a"]
    assert dict(stats.report.counts) == {"missing_fields": 1, "invalid_json": 1, "not_an_object": 1,
                                         "invalid_utf8": 1}
    assert stats.report.first_line == {"missing_fields": 4, "invalid_json": 5, "not_an_object": 6,
                                       "invalid_utf8": 8}


# ---------------------------------------------------------------------------------------------- same as plain
@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """Part of the sample as plain .jsonl, per-subreddit .zst and .gz, flat <sub>_submissions.zst, monthly RS_/RC_."""
    if not (REDDIT_2015 / "books" / "submissions.jsonl").is_file():
        pytest.skip(f"reddit-2015 sample not found at {REDDIT_2015}")
    base = tmp_path_factory.mktemp("layouts")
    for name in SUBSET:
        for kind in ("submissions", "comments"):
            data = (REDDIT_2015 / name / f"{kind}.jsonl").read_bytes()
            _write(base / "plain" / name / f"{kind}.jsonl", data)
            _write(base / "zst" / name / f"{kind}.jsonl.zst", data)
            _write(base / "gz" / name / f"{kind}.jsonl.gz", data)
            _write(base / "flat" / f"{name}_{kind}.zst", data)
    _monthly_from(base / "plain", base / "monthly")
    return {name: base / name for name in ("plain", "zst", "gz", "flat", "monthly")}


@pytest.fixture(scope="module")
def plain(layouts) -> DumpBackend:
    return DumpBackend(layouts["plain"])


@needs_sample
@pytest.mark.parametrize("layout", ["zst", "gz", "flat", "monthly"])
def test_every_layout_answers_exactly_like_the_plain_folder(layout, layouts, plain, tmp_path):
    backend = DumpBackend(layouts[layout], cache_dir=tmp_path / "cache")
    assert backend.list_subreddits() == plain.list_subreddits()
    expected, got = _everything(plain), _everything(backend)
    assert plain.list_subreddits() == ["books", "weather"]
    for name in plain.list_subreddits():
        for answer in ("info", "posts", "top", "threads"):
            assert got[name][answer] == expected[name][answer], (name, answer)
    assert backend.skipped == plain.skipped == {"duplicate_id": 1}
    for query, subreddit in (("vonnegut", None), ("the book", "books"), ("storm", None), ("rain snow", None)):
        assert backend.search_posts(query, subreddit=subreddit, limit=200) == \
            plain.search_posts(query, subreddit=subreddit, limit=200), query


@needs_sample
def test_monthly_files_need_a_cache_folder_named_by_the_caller(layouts):
    backend = DumpBackend(layouts["monthly"])  # reddit/ picks no cache folder of its own (no environment read)
    with pytest.raises(ValueError, match="monthly dump files .*give the DumpBackend a cache_dir"):
        backend.list_subreddits()


@needs_sample
def test_a_run_on_monthly_zst_files_gives_the_same_examples(layouts, plain, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from fl_crew_reddit.preprocessing.pipeline import build_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def examples(backend: DumpBackend) -> list[dict]:
        return build_examples(backend.threads(SUBSET, 40), tokenizer, 128)[0]

    monthly = make_source_backend(load_config(reddit_backend="dump", reddit_dump_dir=layouts["monthly"],
                                              fl_crew_reddit_dir=tmp_path))
    plain_examples = examples(plain)
    assert len(plain_examples) > 50
    assert examples(monthly) == plain_examples
    assert (tmp_path / "data" / "cache" / "dump-index").is_dir(), "the config puts the index under data/cache"


# ---------------------------------------------------------------------------------------------- the index
@needs_sample
def test_the_monthly_index_is_reused_by_the_next_open(layouts, tmp_path):
    cache = tmp_path / "cache"
    first = DumpBackend(layouts["monthly"], cache_dir=cache)
    answers = _everything(first)
    months = len(list(layouts["monthly"].iterdir()))
    assert first.scan_passes == months == 6, "one pass per monthly file (3 months x RS/RC), all extracted"
    indexes = sorted(cache.glob("*/index.json"))
    assert len(indexes) == months
    stamps = [p.stat().st_mtime_ns for p in indexes]

    second = DumpBackend(layouts["monthly"], cache_dir=cache)
    assert _everything(second) == answers
    assert second.scan_passes == 0, "the second open reads the index and the extracts, not the monthly files"
    assert [p.stat().st_mtime_ns for p in indexes] == stamps

    changed = tmp_path / "changed"
    changed.mkdir()
    for path in layouts["monthly"].iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    again = DumpBackend(changed, cache_dir=cache)
    again.list_subreddits()
    assert again.scan_passes == 6, "another file (path, size, mtime) is indexed anew"


def test_only_asked_subreddits_are_extracted_from_a_big_monthly_file(tmp_path):
    posts = [{"id": f"p{i}", "subreddit": f"sub{i % 100}", "title": f"post {i}", "created_utc": 1000 + i}
             for i in range(1000)]
    _write(tmp_path / "dump" / "RS_2020-01.zst", _lines(posts))
    monthly = MonthlyFile(tmp_path / "dump" / "RS_2020-01.zst", tmp_path / "cache", extract_all_up_to=64)
    index = monthly.index({"sub7"})
    assert len(index["subreddits"]) == 100 and index["subreddits"]["sub7"]["records"] == 10
    assert set(index["extracted"]) == {"sub7"}, "over 64 subreddits: only the wanted one is kept"
    assert len(list(monthly.cache.glob("*.lines.zst"))) == 1
    assert [n for n, _ in monthly.lines_of("sub42")] == list(range(43, 1001, 100))  # one more pass, then cached
    assert monthly.passes == 2
    assert [n for n, _ in monthly.lines_of("sub42")] == list(range(43, 1001, 100)) and monthly.passes == 2


# ---------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("layout", ["plain", "monthly"])
def test_time_score_and_subreddit_filters(layout, layouts, tmp_path):
    root = layouts[layout]
    after, before = 1425168000, 1426377600  # 2015-03-01 .. 2015-03-15
    backend = DumpBackend(root, subreddits=["books", "r/Sports"], after=after, before=before,
                          cache_dir=tmp_path / "cache")
    assert backend.list_subreddits() == ["books"], "Sports is not in this dump: left out (with a warning)"
    with pytest.raises(LookupError, match="filter allows books, sports"):
        backend.subreddit_posts("weather")
    expected_posts = sum(1 for line in (REDDIT_2015 / "books" / "submissions.jsonl").read_bytes().splitlines()
                         if after <= json.loads(line)["created_utc"] < before)
    posts = backend.subreddit_posts("books", limit=100_000).posts
    assert len(posts) == expected_posts > 0
    assert all(after <= p.created_utc < before for p in posts)
    info = backend.subreddit_info("books")
    assert after <= info.first_created_utc <= info.last_created_utc < before
    assert backend.filtered["created_before_after"] > 0 and backend.filtered["created_at_or_after_before"] > 0
    found = backend.search_posts("the", limit=1000).posts  # across the filtered subreddits only
    assert found and {p.subreddit for p in found} == {"books"}
    if layout == "monthly":
        assert backend.scan_passes == 6, "one pass per file extracted the filtered subreddit; search needs none"
        assert {p.name for p in (tmp_path / "cache").glob("*/*.lines.zst")} == {"books.lines.zst"}

    scored = DumpBackend(root, subreddits=["weather"], min_score=2, cache_dir=tmp_path / "cache")
    assert scored.subreddit_info("weather").num_posts == 0, "every score in the sample is 1"
    assert scored.filtered["score_below_min_score"] > 0


def test_filters_from_the_settings(tmp_path):
    _write(tmp_path / "dump" / "RS_2015-03.zst", _lines([
        {"id": "a", "subreddit": "pics", "title": "early", "created_utc": 1425168000 - 1, "score": 5},
        {"id": "b", "subreddit": "pics", "title": "in range", "created_utc": 1425168000, "score": 5},
        {"id": "c", "subreddit": "pics", "title": "low score", "created_utc": 1425168001, "score": 1},
        {"id": "d", "subreddit": "pics", "title": "late", "created_utc": 1427846400, "score": 5},
        {"id": "e", "subreddit": "other", "title": "other sub", "created_utc": 1425168000, "score": 5},
    ]))
    config = load_config(reddit_backend="dump", reddit_dump_dir=tmp_path / "dump", fl_crew_reddit_dir=tmp_path,
                         reddit_dump_subreddits="r/pics", reddit_dump_after="2015-03-01",
                         reddit_dump_before="2015-04-01T00:00:00Z", reddit_dump_min_score="2")
    backend = make_source_backend(config)
    assert (backend.after, backend.before, backend.min_score) == (1425168000, 1427846400, 2)
    assert backend.list_subreddits() == ["pics"]
    assert [p.id for p in backend.subreddit_posts("pics").posts] == ["b"]
    assert dict(backend.filtered) == {"created_before_after": 1, "score_below_min_score": 1,
                                      "created_at_or_after_before": 1}


# ---------------------------------------------------------------------------------------------- bad lines, users
def test_bad_lines_of_a_monthly_file_are_counted_with_their_line_numbers(tmp_path, caplog):
    good = {"id": "p1", "subreddit": "pics", "title": "good", "created_utc": 10}
    _write(tmp_path / "dump" / "RS_2015-03.zst", _lines([
        good,                                                              # 1
        b'{"id": "p2", "subreddit": "pics", "title": "trunc',              # 2 corrupt, routed to pics
        b"{garbage",                                                       # 3 corrupt, no subreddit member
        {"id": "p3", "title": "no subreddit"},                             # 4
        b'{"id": "p4", "subreddit": "pics", "title": "bad \xff bytes"}',   # 5 invalid UTF-8, routed to pics
        b'{"id": "p5", "subreddit": "pics", "title": "' + b"x" * 300 + b'"}',  # 6 too long
        {"id": "p1", "subreddit": "pics", "title": "duplicate"},           # 7
        {"id": "p6", "subreddit": "pics"},                                 # 8 no title
    ]))
    _write(tmp_path / "dump" / "RC_2015-03.zst", b"")
    backend = DumpBackend(tmp_path / "dump", cache_dir=tmp_path / "cache", max_line_bytes=200)
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.reddit.backends"):
        assert [p.id for p in backend.subreddit_posts("pics").posts] == ["p1"]
    assert backend.skipped == {"invalid_json": 2, "missing_fields": 2, "invalid_utf8": 1, "line_too_long": 1,
                               "duplicate_id": 1, "empty_file": 1}
    # lines that name no subreddit are counted by the index pass, the others when their subreddit loads
    firsts = {(report.path.name, reason, line) for report in backend.reports
              for reason, line in report.first_line.items()}
    assert firsts == {("RS_2015-03.zst", "invalid_json", 3), ("RS_2015-03.zst", "missing_fields", 4),
                      ("RS_2015-03.zst", "line_too_long", 6), ("RC_2015-03.zst", "empty_file", 0),
                      ("RS_2015-03.zst", "invalid_json", 2), ("RS_2015-03.zst", "invalid_utf8", 5),
                      ("RS_2015-03.zst", "duplicate_id", 7), ("RS_2015-03.zst", "missing_fields", 8)}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "invalid_json x1 (first at line 2)" in messages and "invalid_json x1 (first at line 3)" in messages
    assert backend.subreddit_info("pics").skipped == {"invalid_json": 1, "invalid_utf8": 1, "duplicate_id": 1,
                                                     "missing_fields": 1}


def test_user_data_from_monthly_files_matches_the_folder(tmp_path):
    def post(pid, sub, author, created):
        return {"id": pid, "subreddit": sub, "title": f"t {pid}", "author": author, "created_utc": created}

    def comment(cid, pid, sub, author, created):
        return {"id": cid, "link_id": f"t3_{pid}", "parent_id": f"t3_{pid}", "subreddit": sub, "body": "b",
                "author": author, "created_utc": created}

    folder = tmp_path / "folder"
    _write(folder / "pics" / "submissions.jsonl", _lines([post("a", "pics", "Alice", 100),
                                                          post("b", "pics", "bob", 200)]))
    _write(folder / "pics" / "comments.jsonl", _lines([comment("c1", "b", "pics", "alice", 300)]))
    _write(folder / "cats" / "submissions.jsonl", _lines([post("d", "cats", "ALICE", 3_000_000)]))
    _write(folder / "cats" / "comments.jsonl", _lines([comment("c2", "d", "cats", "alice", 3_000_100),
                                                       comment("c3", "d", "cats", "bob", 3_000_200)]))
    _monthly_from(folder, tmp_path / "monthly")
    plain = DumpBackend(folder)
    monthly = DumpBackend(tmp_path / "monthly", cache_dir=tmp_path / "cache")
    for user in ("alice", "u/Bob", "nobody"):
        assert monthly.user_data(user, limit=10) == plain.user_data(user, limit=10), user
    assert [p.id for p in monthly.user_data("alice").posts] == ["d", "a"]
    assert monthly.post_comments("t3_d").post.subreddit == "cats"
    assert monthly.search_posts("t") == plain.search_posts("t")
