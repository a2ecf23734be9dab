"""Scan throughput and memory of the dump reader (fl_crew_reddit.reddit.dump_files) on a monthly-style .zst file.

Builds an `RC_`-style monthly file from the real reddit-2015 sample (every submission and comment of the six
subreddits, in time order, replicated with fresh ids until it reaches the size asked for), then, on one core:

- ours: the first open of a monthly file, `MonthlyFile.index()`: stream-decompress, split lines, parse each with
  orjson, count it under its subreddit and copy one subreddit's lines (books) into its extract;
- baseline: the plain loop people write, `json.loads` on each line of
  `io.TextIOWrapper(ZstdDecompressor(max_window_size=2**31).stream_reader(file))`, over the same file;
- reuse: a second open with the same cache folder (index and extract reused, no pass over the file);
- memory: peak RSS (VmHWM) of a fresh process scanning the file, and of one scanning a file 10x larger.

MB/s are megabytes (10^6) of decompressed JSON per second. The last line printed is one JSON object.

    .venv/bin/python benchmarks/dump_scan.py --quick   # ~40 MB file, 10x = ~400 MB for the memory check
    .venv/bin/python benchmarks/dump_scan.py           # ~150 MB file, 10x = ~1.5 GB for the memory check
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fl_crew_reddit.reddit.dump_files import ZSTD_MAX_WINDOW, MonthlyFile  # noqa: E402

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reddit-2015"
SAMPLE = Path(os.environ.get("REDDIT_2015_DIR", SHARED_SAMPLE))

# A fresh process that loads dump_files alone (not the package, which imports torch) and scans the file: its
# peak RSS is the reader's, not the rest of the project's.
MEMORY_PROBE = """
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("dump_files", sys.argv[2])
dump_files = importlib.util.module_from_spec(spec)
sys.modules["dump_files"] = dump_files
spec.loader.exec_module(dump_files)
def high_water_kb():  # VmHWM: peak RSS of this process image (ru_maxrss would include the forking parent's)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = high_water_kb()
stats = dump_files.scan_lines(dump_files.read_line_batches(Path(sys.argv[1])), set(), None)
after = high_water_kb()
print(before, after, stats.lines, stats.bytes)
"""
DUMP_FILES = Path(__file__).resolve().parents[1] / "fl_crew_reddit" / "reddit" / "dump_files.py"


def say(message: str) -> None:
    print(f"[dump_scan] {message}", file=sys.stderr, flush=True)


def sample_lines() -> list[bytes]:
    """Every record of the sample, submissions and comments of all subreddits, oldest first (as in a month)."""
    rows = []
    for path in sorted(SAMPLE.glob("*/*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                rows.append((json.loads(line).get("created_utc", 0), line))
    rows.sort(key=lambda row: row[0])
    return [line for _, line in rows]


def build_monthly(path: Path, lines: list[bytes], target_bytes: int) -> tuple[int, int]:
    """Write copies of `lines` (ids made unique per copy) as one zstd stream until `target_bytes` of JSON."""
    written = copy = 0
    with path.open("wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        while written < target_bytes:
            marker = b'"id": "r%x' % copy
            block = b"\n".join(line.replace(b'"id": "', marker, 1) for line in lines) + b"\n"
            out.write(block)
            written += len(block)
            copy += 1
    return written, path.stat().st_size


def json_loads_loop(path: Path) -> int:
    """The baseline: json.loads per line of a text stream over the zstd reader."""
    count = 0
    with path.open("rb") as raw:
        reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(raw)
        for line in io.TextIOWrapper(reader, encoding="utf-8"):
            if line.strip():
                json.loads(line)
                count += 1
    return count


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def peak_rss(path: Path, cpu: int) -> dict:
    command = ["taskset", "-c", str(cpu), sys.executable, "-c", MEMORY_PROBE, str(path), str(DUMP_FILES)]
    if shutil.which("taskset") is None:
        command = command[3:]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    before_kb, after_kb, lines, size = map(int, out)
    return {"decompressed_mb": round(size / 1e6, 1), "lines": lines, "rss_before_scan_mb": round(before_kb / 1024, 1),
            "peak_rss_mb": round(after_kb / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~40 MB file (400 MB for the memory check)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each reader; the best is kept")
    parser.add_argument("--keep", type=Path, default=None, help="build the files in this folder and keep them")
    args = parser.parse_args()
    if not (SAMPLE / "books" / "submissions.jsonl").is_file():
        sys.exit(f"reddit-2015 sample not found at {SAMPLE} (set REDDIT_2015_DIR)")
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})  # one core, as the figures claim
    target = (40 if args.quick else 150) * 10**6
    work = args.keep or Path(tempfile.mkdtemp(prefix="dump_scan-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        lines = sample_lines()
        small, large = work / "RC_2015-03.zst", work / "big" / "RC_2015-03.zst"
        large.parent.mkdir(exist_ok=True)
        seconds, (json_bytes, zst_bytes) = timed(lambda: build_monthly(small, lines, target))
        say(f"built {small}: {json_bytes / 1e6:.1f} MB JSON, {zst_bytes / 1e6:.1f} MB zst in {seconds:.1f}s")

        ours, baseline, reuse, passes_after_reuse = [], [], [], None
        for attempt in range(args.repeats):
            cache = work / f"cache-{attempt}"
            seconds, index = timed(lambda: MonthlyFile(small, cache, extract_all_up_to=0).index({"books"}))
            ours.append(seconds)
            assert index["lines"] > 0 and "books" in index["extracted"], "the scan must index and extract"
            baseline.append(timed(lambda: json_loads_loop(small))[0])
            reopened = MonthlyFile(small, cache, extract_all_up_to=0)
            seconds, extract_lines = timed(lambda: sum(1 for _ in reopened.lines_of("books")))
            reuse.append(seconds)
            passes_after_reuse = reopened.passes
            say(f"run {attempt + 1}: ours {ours[-1]:.2f}s, json.loads {baseline[-1]:.2f}s, "
                f"reopen + read books ({extract_lines} lines) {reuse[-1]:.3f}s with {reopened.passes} passes")
        ours_mb_s = json_bytes / 1e6 / min(ours)
        baseline_mb_s = json_bytes / 1e6 / min(baseline)

        seconds, (large_json, large_zst) = timed(lambda: build_monthly(large, lines, 10 * json_bytes))
        say(f"built {large}: {large_json / 1e6:.1f} MB JSON, {large_zst / 1e6:.1f} MB zst in {seconds:.1f}s")
        memory_small, memory_large = peak_rss(small, cpu), peak_rss(large, cpu)
        say(f"peak RSS {memory_small['peak_rss_mb']} MB ({memory_small['decompressed_mb']} MB file) vs "
            f"{memory_large['peak_rss_mb']} MB ({memory_large['decompressed_mb']} MB file)")
        result = {
            "benchmark": "dump_scan", "mode": "quick" if args.quick else "full",
            "file_mb_json": round(json_bytes / 1e6, 1), "file_mb_zst": round(zst_bytes / 1e6, 1),
            "ours_mb_s": round(ours_mb_s, 1), "json_loads_mb_s": round(baseline_mb_s, 1),
            "ratio": round(ours_mb_s / baseline_mb_s, 2),
            "ours_s": round(min(ours), 3), "json_loads_s": round(min(baseline), 3),
            "reopen_read_extract_s": round(min(reuse), 4), "reopen_passes": passes_after_reuse,
            "memory": {"quick_file": memory_small, "file_10x": memory_large,
                       "peak_rss_growth_mb": round(memory_large["peak_rss_mb"] - memory_small["peak_rss_mb"], 1)},
            "one_core": True, "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        }
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
