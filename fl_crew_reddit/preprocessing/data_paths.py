"""Image paths in a run's data files (examples, image–text pairs, client shards): written relative to the run's
preprocessed folder (data/preprocessed/<run>, where the media store keeps `images/`) so a moved FL_CREW_REDDIT_DIR
still finds them, and resolved when read back against the folder the file lies in now.

A path that is absolute outside that folder, climbs out of it with `..`, or leads out of it through a link is
refused: the image is left out and counted under SKIP_IMAGE_PATH_OUTSIDE_RUN, and the file is never opened.
Absolute paths inside the current folder (runs made before this rule) keep working.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

SKIP_IMAGE_PATH_OUTSIDE_RUN = "image_path_outside_run"
PATH_FIELDS = ("image_paths",)  # the example / pair fields that name files


def portable_image_path(path: Path | str, anchor: Path) -> str:
    """`path` relative to `anchor` (posix); ValueError for a path outside it (the store writes only inside)."""
    try:
        return Path(path).resolve().relative_to(anchor.resolve()).as_posix()
    except ValueError:
        raise ValueError(f"image {path} is outside the run's preprocessed folder {anchor}: not written") from None


def portable_rows(rows: Iterable[dict], anchor: Path) -> list[dict]:
    """Copies of `rows` with each path field relative to `anchor`, for writing."""
    return [{**row, **{field: [portable_image_path(p, anchor) for p in row[field]]
                       for field in PATH_FIELDS if row.get(field)}} for row in rows]


def data_anchor(data_file: Path) -> Path:
    """The folder the image paths of `data_file` are relative to: the run's preprocessed folder
    (<data>/preprocessed/<run>) for a client shard at <data>/training/<run>/<client>/<split>.jsonl or a file in
    that folder (when it exists); otherwise (a site's own data folder, made by prepare-site) the file's own folder."""
    folder = Path(data_file).absolute().parent
    if len(folder.parents) >= 3 and folder.parents[1].name == "training":
        preprocessed = folder.parents[2] / "preprocessed" / folder.parent.name
        if preprocessed.is_dir():
            return preprocessed
    return folder


def resolve_image_path(value: str, anchor: Path) -> Path | None:
    """The file `value` names under `anchor` (resolved, links followed), or None when it lies outside it."""
    root = anchor.resolve()
    candidate = Path(value)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    return resolved if root in resolved.parents else None


def resolve_rows(rows: Iterable[dict], anchor: Path, left_out: Counter) -> list[dict]:
    """Copies of `rows` read from a file whose image paths are relative to `anchor`: each path made absolute, a
    path outside `anchor` left out and counted in `left_out` (never opened)."""
    out = []
    for row in rows:
        for field in PATH_FIELDS:
            if row.get(field):
                kept = [resolve_image_path(str(value), anchor) for value in row[field]]
                left_out[SKIP_IMAGE_PATH_OUTSIDE_RUN] += sum(1 for path in kept if path is None)
                row = {**row, field: [str(path) for path in kept if path is not None]}
        out.append(row)
    return out


def read_resolved(data_file: Path, rows: list[dict], left_out: Counter) -> list[dict]:
    """`rows` read from `data_file`, their image paths resolved against the file's current run folder."""
    return resolve_rows(rows, data_anchor(data_file), left_out)
