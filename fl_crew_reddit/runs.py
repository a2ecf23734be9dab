"""Run folders and files: where each stage writes, history.json written atomically, storage errors named by folder.
(A client's adapter and update files: training/adapter_files.py; the crash-safe state: run_state.py.)

    data/{collected,preprocessed,training}/<run>/   models/local/<run>/<client>/round-<k>/
    models/aggregated/<run>/round-<k>/              results/<run>/history.json    logs/<run>.log
    results/latest -> the newest run                results/<run>/state/  (run_state.py: crash-safe state)

Finding a run (by id, by folder, `latest`, or the newest with saved state) lives here too, next to the code that
writes those folders and pointers. torch, peft and safetensors load only in the functions that move tensors, so the
CLI and the report can find runs without them.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    pass

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def new_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_run_id(run_id: str) -> str:
    """A run id is a name (letters, digits, '.', '_', '-'; no '..'), never a path: it is joined to several folders."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id) or ".." in run_id:
        raise ValueError(f"run id {run_id!r} is not a name: use letters, digits, '.', '_' and '-' (no '/', no '..', "
                         "at most 128 characters)")
    return run_id


@dataclass(frozen=True)
class RunPaths:
    base: Path
    run_id: str

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def collected(self) -> Path:
        return self.data / "collected" / self.run_id

    def local_adapter(self, client: str, round_number: int) -> Path:
        return self.base / "models" / "local" / self.run_id / client / f"round-{round_number}"

    def global_adapter(self, round_number: int) -> Path:
        return self.base / "models" / "aggregated" / self.run_id / f"round-{round_number}"

    @property
    def results(self) -> Path:
        return self.base / "results" / self.run_id

    @property
    def history(self) -> Path:
        return self.results / "history.json"

    @property
    def log_file(self) -> Path:
        return self.base / "logs" / f"{self.run_id}.log"

    def create(self) -> RunPaths:
        for folder in (self.collected, self.results, self.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@contextmanager
def storage_errors(folder: Path) -> Iterator[None]:
    """safetensors reports a full or read-only disk as its own error: turn it back into the OSError it was (errno,
    folder), so the run stops with one message naming the folder."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(folder)) from error


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def point_latest(results_dir: Path, run_id: str) -> None:
    """results/latest → the newest run (a symlink; a small text file where links are not allowed)."""
    latest = results_dir / "latest"
    try:
        if latest.is_symlink() or latest.is_file():
            latest.unlink()
        latest.symlink_to(run_id, target_is_directory=True)
    except OSError:
        latest.write_text(run_id + "\n", encoding="utf-8")


def latest_run_dir(results_dir: Path) -> Path | None:
    """The folder `results/latest` points to (a symlink, or the text file `point_latest` writes where links are not
    allowed); None when there is none."""
    latest = Path(results_dir) / "latest"
    if latest.is_symlink():
        return latest.resolve() if latest.is_dir() else None  # name the run, not `latest`
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        return Path(results_dir) / name if name and (Path(results_dir) / name).is_dir() else None
    return None


def resolve_run_dir(run: str | None, results_dir: Path) -> Path:
    """A run's folder from RUN: a folder path, a run id under `results_dir`, or (None or `latest`) the run
    `results/latest` points to; FileNotFoundError says what was looked for when there is no such run."""
    if run and run != "latest":
        for candidate in (Path(run).expanduser(), Path(results_dir) / run):
            if candidate.is_dir():
                return candidate
        raise FileNotFoundError(f"{run!r} is neither a run folder nor a run id under {results_dir}")
    found = latest_run_dir(results_dir)
    if found is None:
        raise FileNotFoundError(f"no run under {results_dir} (results/latest is missing: has a run started?)")
    return found
