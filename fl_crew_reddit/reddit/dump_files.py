"""Streaming readers for Reddit dump files: `.zst`, `.jsonl.gz` and `.jsonl`, in bounded memory.

Pushshift / Arctic Shift dumps are zstandard streams written with a long window (up to 2 GiB), tens of GB each,
one JSON record a line. Everything here reads them as a stream: a fixed-size chunk is decompressed, split into
lines (a line cut by a chunk boundary is carried over), and a line longer than `max_line_bytes` is dropped as it
streams past (counted as `line_too_long`), so memory stays flat whatever the file size.

A whole monthly file (`RS_YYYY-MM.zst` submissions, `RC_YYYY-MM.zst` comments) holds every subreddit. `MonthlyFile`
scans one such file once and keeps, in a cache folder keyed by the file's path, size and modification time:

    index.json                how many records each subreddit has, and what the scan skipped (reason, first line)
    <subreddit>.lines.zst     the raw lines of each subreddit asked for so far, as `<line number>\\t<json>`

so a later open (by this process or the next) reads only the small per-subreddit extract, never the monthly file.

A compressed file that is corrupt or cut short (a garbage .gz, a truncated .zst: a stream that ends inside a frame)
raises while it is read (`EOFError`, `zstandard.ZstdError`, `OSError`); `read_failure` names the skip reason
(`corrupt_file`, `unreadable_file`), and the readers of this package keep the lines before the break and count it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import orjson
import zstandard

logger = logging.getLogger(__name__)

ZSTD_MAX_WINDOW = 2**31  # the dumps are compressed with --long=31: the default decoder limit refuses them
CHUNK_BYTES = 1 << 20  # decompressed bytes read at a time
MAX_LINE_BYTES = 1 << 20  # a Reddit record is a few KB; a 1 MiB line is broken data, not a post
INDEX_VERSION = 1
EXTRACT_LEVEL = 3  # zstd level of the per-subreddit extracts: fast to write, ~5x smaller than the JSON
FRAME_BYTES = 256 << 10  # an extract's buffer before it is compressed and written out
EXTRACT_ALL_UP_TO = 64  # a monthly file with at most this many subreddits is extracted whole in its first pass

# Reasons a line is skipped (the keys of `DumpBackend.skipped`).
SKIP_INVALID_UTF8 = "invalid_utf8"
SKIP_INVALID_JSON = "invalid_json"
SKIP_NOT_AN_OBJECT = "not_an_object"
SKIP_MISSING_FIELDS = "missing_fields"
SKIP_LINE_TOO_LONG = "line_too_long"
SKIP_EMPTY_FILE = "empty_file"
SKIP_CORRUPT_FILE = "corrupt_file"  # a compressed stream that is broken or ends early: lines before the break kept
SKIP_UNREADABLE_FILE = "unreadable_file"  # the file cannot be opened or read at all (permissions, I/O error)
ZSTD_INPUT_BYTES = 16 << 10  # compressed bytes fed at a time: Reddit JSON gives ~100-200 KB of lines per piece

SUBMISSIONS, COMMENTS = "submissions", "comments"
# the names a per-subreddit file may have, in order of preference: <folder>/<name> or <root>/<subreddit>_<name>
FILE_NAMES = {kind: (f"{kind}.jsonl", f"{kind}.jsonl.zst", f"{kind}.zst", f"{kind}.jsonl.gz", f"{kind}.gz")
              for kind in (SUBMISSIONS, COMMENTS)}
MONTHLY_NAME = re.compile(r"^(?P<prefix>RS|RC)_(?P<month>\d{4}-\d{2})(?:\.(?:jsonl|ndjson|json))?"
                          r"(?P<compression>\.zst|\.gz)?$")
UNSUPPORTED_MONTHLY = re.compile(r"^(RS|RC)_\d{4}-\d{2}.*\.(bz2|xz|7z|zip)$")
_BOM = b"\xef\xbb\xbf"
_SUBREDDIT_KEY = b'"subreddit"'
_SUBREDDIT_VALUE = re.compile(rb'"subreddit"\s*:\s*"([^"\\]+)"')


# ---------------------------------------------------------------------------------------------- lines
class TruncatedStreamError(EOFError):
    """A zstandard stream ended inside a frame: the file was cut short (as gzip's EOFError says for .gz)."""


class ZstdStream:
    """The decompressed bytes of a .zst file, frame after frame (pzstd and appended files have several), read in
    bounded pieces. Unlike zstandard's stream_reader, which ends quietly where a truncated file stops, a stream
    that ends inside a frame raises TruncatedStreamError."""

    def __init__(self, path: Path, *, input_bytes: int = ZSTD_INPUT_BYTES):
        self.path = Path(path)
        self._raw = self.path.open("rb")
        self._context = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        self._frame = None  # the decompressor of the frame being read; None between frames
        self._input_bytes = input_bytes
        self._leftover = b""  # input after the end of the last frame: the start of the next one
        self._buffer = bytearray()
        self._ended = False
        self._truncated = False  # raised once the bytes decoded before the cut have been read

    def read(self, size: int = -1) -> bytes:
        while not self._ended and (size is None or size < 0 or len(self._buffer) < size):
            self._feed()
        if self._truncated and not self._buffer and size != 0:
            raise TruncatedStreamError(f"{self.path}: the zstandard stream ends inside a frame (a cut file)")
        if size is None or size < 0 or size >= len(self._buffer):
            data, self._buffer = bytes(self._buffer), bytearray()
        else:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
        return data

    def _feed(self) -> None:
        data, self._leftover = self._leftover or self._raw.read(self._input_bytes), b""
        if not data:
            self._ended = True
            self._truncated = self._frame is not None
            return
        if self._frame is None:
            self._frame = self._context.decompressobj()
        self._buffer += self._frame.decompress(data)
        if self._frame.eof:
            self._leftover, self._frame = self._frame.unused_data, None

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def __enter__(self) -> ZstdStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GzipStream:
    """The decompressed bytes of a .gz file. A read that runs into a broken or cut stream first returns the bytes
    decoded before the break; the next read raises (gzip's own read would drop them with the error)."""

    def __init__(self, path: Path):
        self._file = gzip.open(path, "rb")
        self._error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if size is None or size < 0:
            return self._file.read()
        parts: list[bytes] = []
        got = 0
        while got < size:
            try:
                part = self._file.read1(size - got)
            except (EOFError, OSError, zlib.error) as error:
                if not parts:
                    raise
                self._error = error
                break
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> GzipStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_decompressed(path: Path) -> IO[bytes]:
    """A binary stream of the file's decompressed bytes, chosen by suffix (.zst, .gz, anything else plain).
    Reading a broken or cut compressed file raises (see `read_failure`)."""
    path = Path(path)
    if path.name.endswith(".zst"):
        return ZstdStream(path)
    if path.name.endswith(".gz"):
        return GzipStream(path)
    return path.open("rb")


def read_failure(error: BaseException) -> str | None:
    """The skip reason of an error raised while reading a file (`corrupt_file` or `unreadable_file`), or None
    when the error is not about the file (a bug: let it propagate)."""
    if isinstance(error, (EOFError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile)):
        return SKIP_CORRUPT_FILE
    if isinstance(error, OSError):
        return SKIP_UNREADABLE_FILE
    return None


def iter_line_batches(stream: IO[bytes], *, chunk_bytes: int = CHUNK_BYTES,
                      max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, list[bytes | None]]]:
    """(number of the first line, lines without their newline) for each chunk of `stream`; `None` stands for a
    line over `max_line_bytes`.

    Holds at most one chunk plus one partial line (itself at most `max_line_bytes`): a line cut by the chunk
    boundary is carried into the next batch, an over-long line is discarded while it streams past.
    """
    next_line = 1
    pending = b""  # the start of a line cut by the chunk boundary
    discarding = False  # inside an over-long line: drop bytes until its newline
    while True:
        chunk = stream.read(chunk_bytes)
        if not chunk:
            break
        batch: list[bytes | None] = []
        start = 0
        if discarding:
            newline = chunk.find(b"\n")
            if newline < 0:
                continue
            batch.append(None)
            discarding, start = False, newline + 1
        if pending:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                if len(pending) + len(chunk) - start > max_line_bytes:
                    pending, discarding = b"", True
                else:
                    pending += chunk[start:]
                if batch:
                    yield next_line, batch
                    next_line += len(batch)
                continue
            batch.append(pending + chunk[start:newline])
            pending, start = b"", newline + 1
        lines = (chunk[start:] if start else chunk).split(b"\n")
        pending = lines.pop()
        batch.extend(lines)
        if len(pending) > max_line_bytes:
            pending, discarding = b"", True
        if any(len(line) > max_line_bytes for line in batch if line is not None):
            batch = [None if line is not None and len(line) > max_line_bytes else line for line in batch]
        if batch:
            yield next_line, batch
            next_line += len(batch)
    if discarding:
        yield next_line, [None]
    elif pending:
        yield next_line, [pending]


def iter_lines(stream: IO[bytes], *, chunk_bytes: int = CHUNK_BYTES,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) for each line of `stream`, as `iter_line_batches` cuts them."""
    for first, batch in iter_line_batches(stream, chunk_bytes=chunk_bytes, max_line_bytes=max_line_bytes):
        yield from enumerate(batch, first)


def read_line_batches(path: Path, *, chunk_bytes: int = CHUNK_BYTES,
                      max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, list[bytes | None]]]:
    """`iter_line_batches` over a (possibly compressed) file, with a UTF-8 byte-order mark on line 1 removed."""
    with open_decompressed(path) as stream:
        for first, batch in iter_line_batches(stream, chunk_bytes=chunk_bytes, max_line_bytes=max_line_bytes):
            if first == 1 and batch[0] is not None and batch[0].startswith(_BOM):
                batch[0] = batch[0][len(_BOM):]
            yield first, batch


def read_lines(path: Path, *, chunk_bytes: int = CHUNK_BYTES,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a (possibly compressed) file; see `iter_line_batches`."""
    for first, batch in read_line_batches(path, chunk_bytes=chunk_bytes, max_line_bytes=max_line_bytes):
        yield from enumerate(batch, first)


def until_failure(items: Iterable[tuple[int, list]] | Iterable[tuple[int, bytes | None]], path: Path,
                  failures: list[tuple[str, int]], *, batches: bool = False) -> Iterator:
    """`items` (numbered lines, or with `batches` numbered batches of lines) until reading `path` fails; the failure
    is logged and appended to `failures` as (reason, number of the first line not read), and the items stop there.
    An error that is not about the file propagates."""
    next_line = 1
    try:
        for item in items:
            yield item
            next_line = item[0] + (len(item[1]) if batches else 1)
    except Exception as error:  # noqa: BLE001 - read_failure decides; anything else is re-raised
        reason = read_failure(error)
        if reason is None:
            raise
        failures.append((reason, next_line))
        logger.warning("%s: %s at line %d (%s: %s); the %d line(s) before it are kept, the rest of the file is "
                       "skipped", path, reason, next_line, type(error).__name__, error, next_line - 1)


def is_blank(line: bytes) -> bool:
    return not line or line.isspace()


def parse_line(line: bytes) -> tuple[dict | None, str | None]:
    """(record, None) for a JSON object, else (None, skip reason). orjson validates UTF-8 and JSON in one pass;
    only a line it refuses is decoded again to tell invalid UTF-8 from invalid JSON."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return None, SKIP_INVALID_UTF8
        return None, SKIP_INVALID_JSON
    if type(record) is not dict:
        return None, SKIP_NOT_AN_OBJECT
    return record, None


# ---------------------------------------------------------------------------------------------- files in a dump
@dataclass(frozen=True)
class MonthlyName:
    kind: str  # submissions | comments
    month: str  # YYYY-MM


def monthly_name(path: Path) -> MonthlyName | None:
    """`RS_2015-03.zst` -> (submissions, 2015-03); `RC_2015-03.jsonl.gz` -> (comments, ...); else None."""
    match = MONTHLY_NAME.match(path.name)
    if not match:
        return None
    return MonthlyName(SUBMISSIONS if match["prefix"] == "RS" else COMMENTS, match["month"])


def find_monthly_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Monthly RS_/RC_ files in `root` and in its `submissions/` and `comments/` folders (the torrents' layout),
    sorted by month; plus files that look monthly but use a compression this reader does not stream."""
    found: list[tuple[str, str, Path]] = []
    unsupported: list[Path] = []
    for folder in (root, root / SUBMISSIONS, root / COMMENTS, root / "reddit" / SUBMISSIONS,
                   root / "reddit" / COMMENTS):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            name = monthly_name(path)
            if name is not None:
                found.append((name.month, name.kind, path))
            elif UNSUPPORTED_MONTHLY.match(path.name):
                unsupported.append(path)
    found.sort()
    return [path for _, _, path in found], unsupported


def subreddit_file(folder: Path, kind: str) -> Path | None:
    """`<folder>/submissions.jsonl` or a compressed variant (see FILE_NAMES); the first that exists."""
    present = [folder / name for name in FILE_NAMES[kind] if (folder / name).is_file()]
    if len(present) > 1:
        logger.warning("%s has %s; reading %s only", folder, ", ".join(p.name for p in present), present[0].name)
    return present[0] if present else None


def flat_subreddit_files(root: Path) -> dict[str, dict[str, Path]]:
    """Per-subreddit files directly in `root`, as the per-subreddit torrents ship them:
    `<subreddit>_submissions.zst`, `<subreddit>_comments.zst` (also .jsonl, .jsonl.gz). Name -> kind -> path."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        for kind, names in FILE_NAMES.items():
            suffix = next((f"_{name}" for name in names if path.name.endswith(f"_{name}")), None)
            if suffix and len(path.name) > len(suffix):
                found.setdefault(path.name[:-len(suffix)], {}).setdefault(kind, path)
    return found


# ---------------------------------------------------------------------------------------------- monthly index
@dataclass
class ScanReport:
    """What one pass over a file skipped: reason -> count and first line number."""

    counts: Counter = field(default_factory=Counter)
    first_line: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, line_no: int) -> None:
        self.counts[reason] += 1
        self.first_line.setdefault(reason, line_no)


def _file_name_of(key: str) -> str:
    safe = re.sub(r"[^a-z0-9_-]", "_", key)
    if safe != key or not safe:
        safe = f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    return f"{safe}.lines.zst"


class MonthlyFile:
    """One monthly dump file (all subreddits) with its on-disk index and per-subreddit extracts.

    `passes` counts full reads of the monthly file by this object: 0 when everything came from the cache.
    """

    def __init__(self, path: Path, cache_dir: Path, *, chunk_bytes: int = CHUNK_BYTES,
                 max_line_bytes: int = MAX_LINE_BYTES, extract_all_up_to: int = EXTRACT_ALL_UP_TO):
        self.path = Path(path).resolve()
        self.kind = monthly_name(self.path).kind
        stat = self.path.stat()
        key = hashlib.sha256(f"{self.path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        self.cache = Path(cache_dir) / f"{self.path.name}-{key}"
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
        self.chunk_bytes, self.max_line_bytes = chunk_bytes, max_line_bytes
        self.extract_all_up_to = extract_all_up_to
        self.passes = 0
        self._index: dict | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"MonthlyFile({str(self.path)!r})"

    @property
    def index_path(self) -> Path:
        return self.cache / "index.json"

    # --- index
    def index(self, wanted: Iterable[str] = ()) -> dict:
        """The index (built by one pass the first time, extracting `wanted` subreddits on the way)."""
        with self._lock:
            if self._index is None:
                self._index = self._read_index()
            if self._index is None:
                self._index = self._scan(set(wanted), full=True)
            return self._index

    def subreddits(self) -> dict[str, dict]:
        """lower-case name -> {"name": as spelled in the records, "records": lines}."""
        return self.index()["subreddits"]

    def skipped(self) -> ScanReport:
        """Lines the index pass could not assign to a subreddit (bad JSON, no `subreddit` field, too long...)."""
        report = ScanReport()
        for reason, (count, first) in self.index()["skipped"].items():
            report.counts[reason] = count
            report.first_line[reason] = first
        return report

    def _read_index(self) -> dict | None:
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            logger.warning("%s is unreadable (%s); rebuilding it", self.index_path, error)
            return None
        if (index.get("version") != INDEX_VERSION or index.get("source") != str(self.path)
                or index.get("size") != self.size or index.get("mtime_ns") != self.mtime_ns):
            return None
        logger.info("%s: reusing index %s (%d subreddits)", self.path.name, self.index_path,
                    len(index["subreddits"]))
        return index

    def _write_index(self, index: dict) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(index), encoding="utf-8")
        tmp.replace(self.index_path)
        self._drop_stale_caches()

    def _drop_stale_caches(self) -> None:
        """Caches of an earlier version of the same file (same path, other size or mtime) are removed."""
        for sibling in self.cache.parent.glob(f"{self.path.name}-*"):
            if sibling == self.cache or not (sibling / "index.json").is_file():
                continue
            try:
                if json.loads((sibling / "index.json").read_text(encoding="utf-8")).get("source") == str(self.path):
                    shutil.rmtree(sibling, ignore_errors=True)
                    logger.info("removed the stale index %s", sibling)
            except (OSError, ValueError):
                continue

    # --- extracts
    def lines_of(self, key: str) -> Iterator[tuple[int, bytes | None]]:
        """(line number in the monthly file, raw line) of one subreddit, from its extract (made if missing)."""
        self.ensure_extracted({key})
        with self._lock:
            name = self.index()["extracted"].get(key)
        if name is None:  # the subreddit has no record in this file
            return
        for _, line in read_lines(self.cache / name, chunk_bytes=self.chunk_bytes,
                                  max_line_bytes=self.max_line_bytes + 32):
            if line is None or is_blank(line):
                continue
            number, _, raw = line.partition(b"\t")
            yield int(number), raw

    def ensure_extracted(self, keys: set[str]) -> None:
        """Extract the lines of every subreddit in `keys` that this file has and the cache lacks: one pass for all."""
        with self._lock:
            index = self.index(keys)
            missing = {key for key in keys if key in index["subreddits"]
                       and not (key in index["extracted"] and (self.cache / index["extracted"][key]).is_file())}
            if missing:
                self._index = self._scan(missing, full=False)

    # --- the pass
    def _scan(self, wanted: set[str], *, full: bool) -> dict:
        """One pass over the monthly file. `full`: count every subreddit and every skip (the index), extracting
        every subreddit while there are at most `extract_all_up_to` of them (a small or pre-filtered file then
        never needs a second pass); otherwise only lines that can name a wanted subreddit are parsed (a byte
        search first), for new extracts."""
        index = self._index if not full else {
            "version": INDEX_VERSION, "source": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns,
            "kind": self.kind, "lines": 0, "bytes": 0, "subreddits": {}, "skipped": {}, "extracted": {}}
        wanted = {key for key in wanted if full or key in index["subreddits"]}
        needles = None if full else [f'"{name}"'.encode() for key in wanted
                                     for name in (index["subreddits"][key]["name"],
                                                  *index["subreddits"][key].get("other_names", ()))]
        self.cache.mkdir(parents=True, exist_ok=True)
        writers: dict[str, tuple[Path, _FrameWriter]] = {}
        compressor = zstandard.ZstdCompressor(level=EXTRACT_LEVEL)

        def writer_for(key: str) -> IO[bytes]:
            if key not in writers:
                final = self.cache / _file_name_of(key)
                tmp = final.with_suffix(f".tmp{os.getpid()}")
                writers[key] = (final, _FrameWriter(tmp, compressor))
            return writers[key][1]

        self.passes += 1
        logger.info("%s: scanning (%s)%s", self.path, "building the index" if full else "extracting",
                    f" for {', '.join(sorted(wanted))}" if wanted else "")
        failures: list[tuple[str, int]] = []
        batches = until_failure(read_line_batches(self.path, chunk_bytes=self.chunk_bytes,
                                                  max_line_bytes=self.max_line_bytes),
                                self.path, failures, batches=True)
        stats = scan_lines(batches, wanted, writer_for, needles=needles,
                           extract_all_up_to=self.extract_all_up_to if full else 0)
        extracted = dict(index["extracted"])
        for key, (final, handle) in writers.items():
            handle.close()
            tmp = final.with_suffix(f".tmp{os.getpid()}")
            if stats.extract_all_abandoned and key not in wanted:
                tmp.unlink()  # too many subreddits to keep them all: only the wanted ones stay
                continue
            tmp.replace(final)
            extracted[key] = final.name
        if full:
            index.update(lines=stats.lines, bytes=stats.bytes, subreddits=stats.subreddits,
                         skipped={reason: [count, stats.report.first_line[reason]]
                                  for reason, count in stats.report.counts.items()})
            for reason, line_no in failures:  # the lines before the break are indexed and served
                index["skipped"][reason] = [1, line_no]
            if stats.lines == 0 and not failures:
                index["skipped"][SKIP_EMPTY_FILE] = [1, 0]
        index = {**index, "extracted": extracted}
        self._write_index(index)
        if full:
            logger.info("%s: %d lines, %.1f MB, %d subreddits, %d extracted; skipped %s", self.path.name,
                        index["lines"], index["bytes"] / 1e6, len(index["subreddits"]), len(extracted),
                        dict(stats.report.counts) or "nothing")
        return index


class _FrameWriter:
    """An extract being written: lines gather in a small buffer and go out as independent zstd frames, so many
    extracts open at once share one compressor and hold at most `FRAME_BYTES` each."""

    def __init__(self, path: Path, compressor: zstandard.ZstdCompressor):
        self._file = path.open("wb")
        self._compressor = compressor
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= FRAME_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._file.write(self._compressor.compress(bytes(self._buffer)))
            self._buffer.clear()

    def close(self) -> None:
        self._flush()
        self._file.close()


@dataclass
class ScanStats:
    lines: int = 0
    bytes: int = 0
    subreddits: dict[str, dict] = field(default_factory=dict)
    report: ScanReport = field(default_factory=ScanReport)
    extract_all_abandoned: bool = False  # more than `extract_all_up_to` subreddits turned up


def scan_lines(batches: Iterable[tuple[int, list[bytes | None]]], wanted: set[str], writer_for,
               needles: list[bytes] | None = None, extract_all_up_to: int = 0) -> ScanStats:
    """The hot loop of a monthly scan: find each line's subreddit, count the line under it, and copy the lines
    of `wanted` subreddits to `writer_for(key)` as `<line number>\\t<line>` (of every subreddit, while there are
    at most `extract_all_up_to`). With `needles`, a line containing none of them is passed over (it cannot belong
    to a wanted subreddit).

    A line with a single `"subreddit": "<name>"` member (no nested record: a quote inside a JSON string is
    escaped, so the pattern only matches a real member) is routed by that byte pattern alone; its full
    validation happens when its subreddit is loaded, where a bad line is counted with its line number. Any
    other line is parsed with orjson here, and counted here if it is bad."""
    stats = ScanStats()
    extract_all = extract_all_up_to > 0
    counts = stats.subreddits
    by_spelling: dict[bytes, str] = {}  # the name's bytes as found in the lines -> its lower-case key
    skip = stats.report.skip
    find, match_value = bytes.find, _SUBREDDIT_VALUE.match
    total_bytes = 0
    line_no = 0
    for first, batch in batches:
        line_no = first - 1
        for line in batch:
            line_no += 1
            if line is None:
                skip(SKIP_LINE_TOO_LONG, line_no)
                continue
            total_bytes += len(line) + 1
            if needles is not None and not any(needle in line for needle in needles):
                continue
            key = None
            pos = find(line, _SUBREDDIT_KEY)
            if pos >= 0 and find(line, _SUBREDDIT_KEY, pos + len(_SUBREDDIT_KEY)) < 0:
                match = match_value(line, pos)
                if match is not None:
                    spelled = match.group(1)
                    key = by_spelling.get(spelled)
                    if key is None:
                        key = _register(spelled, counts, by_spelling)
            if key is None:
                key = _slow_subreddit(line, line_no, counts, by_spelling, skip)
                if key is None:
                    continue
            counts[key]["records"] += 1
            if key in wanted:
                writer_for(key).write(b"%d\t%b\n" % (line_no, line))
            elif extract_all:
                if len(counts) > extract_all_up_to:
                    extract_all, stats.extract_all_abandoned = False, True
                else:
                    writer_for(key).write(b"%d\t%b\n" % (line_no, line))
    stats.lines, stats.bytes = line_no, total_bytes
    return stats


def _register(spelled: bytes, counts: dict[str, dict], by_spelling: dict[bytes, str]) -> str | None:
    """The key of a subreddit name seen for the first time in this spelling (None if it is not UTF-8)."""
    try:
        name = spelled.decode("utf-8")
    except UnicodeDecodeError:
        return None
    key = name.lower()
    entry = counts.get(key)
    if entry is None:
        counts[key] = {"name": name, "records": 0}
    elif name != entry["name"] and name not in entry.setdefault("other_names", []):
        entry["other_names"].append(name)  # the byte search of a later extract looks for every spelling
    by_spelling[spelled] = key
    return key


def _slow_subreddit(line: bytes, line_no: int, counts: dict[str, dict], by_spelling: dict[bytes, str],
                    skip) -> str | None:
    """Parse a line the byte pattern could not route; count it as skipped (and return None) if it is bad."""
    if is_blank(line):
        return None
    record, reason = parse_line(line)
    if record is None:
        skip(reason, line_no)
        return None
    name = record.get("subreddit")
    if not name or type(name) is not str:
        skip(SKIP_MISSING_FIELDS, line_no)
        return None
    spelled = name.encode("utf-8")
    return by_spelling.get(spelled) or _register(spelled, counts, by_spelling)
