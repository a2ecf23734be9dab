"""Crash-safe run state: what a stopped run needs to continue, written atomically after each stage, read back trusting
nothing.

    results/<run>/state/collecting-<n>/  after n subreddits were collected (a run killed while collecting)
    results/<run>/state/collected/       after collection       results/<run>/state/preprocessed/   after preprocessing
    results/<run>/state/round-0/         after the base model's evaluation
    results/<run>/state/round-<k>/       after round k          results/<run>/state/LATEST -> the newest of these

Each folder holds state.json (stage, round, history, settings, the sha256 of each tensor file), the global adapter
and the server optimizer's buffers (safetensors). Paths in state.json are relative to FL_CREW_REDDIT_DIR, so a moved
folder resumes. Reading checks everything: the pointer names a state folder of this run, state.json matches its
schema, every path stays inside this run's own folders, the tensor files match their digests, the global adapter has
the model's keys, shapes and dtypes, finite values and a plausible norm, and the optimizer's buffers fit it. A state
that fails falls back to the one before it, with a warning saying why; the newest two are kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fl_crew_reddit.runs import RunPaths, check_run_id, storage_errors, write_json_atomic

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
GLOBAL_WEIGHTS = "global_adapter.safetensors"
SERVER_OPTIMIZER_WEIGHTS = "server_optimizer.safetensors"
ERROR_FEEDBACK_WEIGHTS = "error_feedback.safetensors"  # UPDATE_COMPRESSION topk / sign: clients' residuals
POINTER = "LATEST"
FORMAT = 2
Stage = Literal["collecting", "collected", "preprocessed", "round", "finished"]
_FOLDER = re.compile(r"^(?:collecting-(?P<collecting>\d{1,6})|collected|preprocessed|round-(?P<round>\d{1,6})"
                     r"|finished)$")
# Keys of history entries that hold a file or folder of the run (relative in state.json, absolute in memory).
PATH_KEYS = frozenset({"path", "train_path", "test_path", "validation_path", "examples_path", "adapter_path",
                       "best_adapter"})


class StateError(RuntimeError):
    """A saved state that cannot be used; the message names the file and what is wrong."""


class NothingSaved(FileNotFoundError):
    """A run with no usable saved state."""


class SavedState(BaseModel):
    """The schema of state.json: unknown fields, a round out of range or a stage that does not fit it are refused."""

    model_config = ConfigDict(extra="forbid")

    format: int = Field(FORMAT, ge=1, le=FORMAT)
    stage: Stage = "round"
    round: int = Field(ge=0, le=1_000_000)
    total_rounds: int = Field(ge=1, le=1_000_000)
    subreddits_done: int = Field(0, ge=0, description="collecting: how many subreddits are collected")
    history: dict[str, Any]
    settings: dict[str, Any]
    files: dict[str, str] = Field(default_factory=dict, description="tensor file -> sha256")
    server_optimizer: dict[str, Any] | None = None
    noise_secret: int | None = Field(None, ge=0, description="the run's DP noise seed (never in the settings)")
    saved_at: float = 0.0

    @model_validator(mode="after")
    def _consistent(self) -> SavedState:
        if self.round > self.total_rounds:
            raise ValueError(f"round {self.round} is beyond total_rounds {self.total_rounds}")
        if self.stage in ("collecting", "collected", "preprocessed") and self.round != 0:
            raise ValueError(f"stage {self.stage!r} comes before round 1, not after round {self.round}")
        if self.stage == "finished" and self.round != self.total_rounds:
            raise ValueError(f"a finished run ran all {self.total_rounds} rounds, not {self.round}")
        known = {GLOBAL_WEIGHTS, SERVER_OPTIMIZER_WEIGHTS, ERROR_FEEDBACK_WEIGHTS}
        if set(self.files) - known:
            raise ValueError(f"unknown files {sorted(set(self.files) - known)}")
        return self

    @property
    def folder_name(self) -> str:
        return folder_name(self.stage, self.round, self.subreddits_done)

    @property
    def finished(self) -> bool:
        return self.stage == "finished"

    def describe(self) -> str:
        return {"collecting": f"while collecting ({self.subreddits_done} subreddits done)",
                "collected": "after collection", "preprocessed": "after preprocessing",
                "finished": f"finished ({self.total_rounds} rounds)"}.get(
            self.stage, f"after round {self.round} of {self.total_rounds}" if self.round
            else "after the base model's evaluation")


def folder_name(stage: str, round_number: int, subreddits_done: int = 0) -> str:
    if stage == "collecting":
        return f"collecting-{subreddits_done}"
    if stage in ("collected", "preprocessed", "finished"):
        return stage
    return f"round-{round_number}"


def _order(name: str) -> tuple[int, int]:
    """Progress order of state folders: collecting-n < collected < preprocessed < round-0 < round-k < finished."""
    match = _FOLDER.match(name)
    if match is None:
        return (-1, -1)
    if match["collecting"] is not None:
        return (0, int(match["collecting"]))
    if match["round"] is not None:
        return (3, int(match["round"]))
    return {"collected": (1, 0), "preprocessed": (2, 0), "finished": (4, 0)}[name]


def state_dir(paths: RunPaths) -> Path:
    return paths.results / "state"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- paths: relative on disk, absolute in memory, never outside the run -----------------------------------------------
def _map_paths(value: Any, convert) -> Any:
    if isinstance(value, dict):
        return {k: convert(v) if k in PATH_KEYS and isinstance(v, str) else _map_paths(v, convert)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_map_paths(v, convert) for v in value]
    return value


def _is_placeholder(value: str) -> bool:
    """Not a path: empty, or a note such as '(kept on the sites)' (FEDERATION=flower keeps data on the sites)."""
    return value == "" or (value.startswith("(") and value.endswith(")"))


def run_roots(paths: RunPaths) -> list[Path]:
    """The folders a run's files live in; a path in its state outside all of them is refused."""
    base = paths.base
    return [base / "data" / kind / paths.run_id for kind in ("collected", "preprocessed", "training")] + \
        [base / "models" / kind / paths.run_id for kind in ("local", "aggregated")] + [paths.results]


def portable_paths(history: dict, paths: RunPaths) -> dict:
    """`history` with each path of the run written relative to FL_CREW_REDDIT_DIR (posix), so a moved folder
    resumes."""
    base = paths.base.resolve()

    def relative(value: str) -> str:
        if _is_placeholder(value):
            return value
        try:
            return Path(value).resolve().relative_to(base).as_posix()
        except ValueError:
            return value  # outside the run: kept as it is, and refused when read back
    return _map_paths(history, relative)


def local_paths(history: dict, paths: RunPaths, where: str) -> dict:
    """`history` with its run paths made absolute under this FL_CREW_REDDIT_DIR; StateError for a path outside this
    run's folders (an absolute path elsewhere, `..`, another run's files)."""
    base = paths.base.resolve()
    roots = [root.resolve() for root in run_roots(paths)]

    def absolute(value: str) -> str:
        if _is_placeholder(value):
            return value
        candidate = Path(value)
        resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise StateError(f"{where}: path {value!r} is outside run {paths.run_id}'s folders under {base} "
                             "(data/{collected,preprocessed,training}/RUN, models/{local,aggregated}/RUN, "
                             "results/RUN): refused")
        return str(resolved)
    return _map_paths(history, absolute)


# --- write ---------------------------------------------------------------------------------------------------------
def save_state(paths: RunPaths, state: SavedState, global_adapter: Mapping[str, torch.Tensor] | None,
               server_optimizer: dict | None, *,
               error_feedback: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write `state` (history paths made relative) with its tensors to a staging folder, move it into place and flip
    the LATEST pointer: a kill at any moment leaves the previous complete state or the new one, never a mix.
    Keeps the newest two states. `error_feedback` ({client: {key: residual}}, UPDATE_COMPRESSION topk / sign) goes into
    error_feedback.safetensors as `client::key`, listed in `files` with its sha256 like the other tensor files."""
    root = state_dir(paths)
    target = root / state.folder_name
    staging = root / f".{target.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        with storage_errors(staging):
            if error_feedback:
                from safetensors.torch import save_file

                save_file({f"{client}::{key}": t.contiguous() for client, residual in error_feedback.items()
                           for key, t in residual.items()}, str(staging / ERROR_FEEDBACK_WEIGHTS))
            _save_tensors(paths, state, staging, global_adapter, server_optimizer)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk: give back what the half-written state took
        raise
    if target.is_symlink():  # never written through: its target lies outside the run
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    tmp = root / f"{POINTER}.tmp"
    tmp.write_text(target.name + "\n", encoding="utf-8")
    os.replace(tmp, root / POINTER)
    for old in sorted(_state_folders(root), key=lambda p: _order(p.name))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _save_tensors(paths: RunPaths, state: SavedState, staging: Path,
                  global_adapter: Mapping[str, torch.Tensor] | None, server_optimizer: dict | None) -> None:
    from safetensors.torch import save_file

    if global_adapter is not None:  # None before the model is loaded: a stage before round 1 starts from its init
        save_file({k: v.contiguous() for k, v in global_adapter.items()}, str(staging / GLOBAL_WEIGHTS))
    payload = state.model_copy(update={"history": portable_paths(state.history, paths), "saved_at": time.time()})
    if server_optimizer is not None:
        tensors = {f"{buffer}::{key}": t.contiguous() for buffer, keys in server_optimizer["buffers"].items()
                   for key, t in keys.items()}
        if tensors:
            save_file(tensors, str(staging / SERVER_OPTIMIZER_WEIGHTS))
        meta = {k: v for k, v in server_optimizer.items() if k != "buffers"}
        payload.server_optimizer = {**meta, "buffer_names": list(server_optimizer["buffers"])}
    payload.files = {f.name: _sha256(f) for f in staging.glob("*.safetensors")}
    write_json_atomic(staging / STATE_FILE, payload.model_dump(mode="json"))


def _state_folders(root: Path) -> list[Path]:
    """The state folders in `root`; a link is a pointer out of the run's state folder: skipped with a warning."""
    if not root.is_dir():
        return []
    folders = []
    for path in root.iterdir():
        if not _FOLDER.match(path.name):
            continue
        if path.is_symlink():
            log.warning("%s is a link to %s, not a state folder of this run: ignored", path, os.readlink(path))
        elif path.is_dir():
            folders.append(path)
    return folders


# --- read ----------------------------------------------------------------------------------------------------------
def read_state(folder: Path) -> SavedState:
    """state.json of one state folder, against the schema; StateError says which file and what is wrong."""
    file = folder / STATE_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateError(f"{file} cannot be read: {error}") from None
    if not isinstance(raw, dict):
        raise StateError(f"{file} is a JSON {type(raw).__name__}, not an object")
    try:
        state = SavedState.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'state'}: {e['msg']}" for e in error.errors()[:5])
        raise StateError(f"{file} does not match the state schema: {problems}") from None
    if state.folder_name != folder.name:
        raise StateError(f"{file} says {state.folder_name}, but lies in {folder.name}")
    return state


def _pointed_folder(paths: RunPaths) -> Path | None:
    """The folder LATEST names, if it names a state folder of this run; None (with a warning) otherwise."""
    pointer = state_dir(paths) / POINTER
    if not pointer.is_file() or pointer.is_symlink():
        return None
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not _FOLDER.match(name):
        log.warning("%s does not name a state folder of run %s (%r): ignored; using the newest state folder",
                    pointer, paths.run_id, name[:80])
        return None
    return state_dir(paths) / name


def candidate_folders(paths: RunPaths) -> list[Path]:
    """State folders to try, newest first: the one LATEST names, then the others in progress order."""
    folders = sorted(_state_folders(state_dir(paths)), key=lambda p: _order(p.name), reverse=True)
    pointed = _pointed_folder(paths)
    if pointed is not None and pointed in folders:
        folders.remove(pointed)
        folders.insert(0, pointed)
    return folders


def newest_state(paths: RunPaths) -> SavedState | None:
    """The newest state whose state.json is valid (tensors not checked): for choosing and describing a run."""
    for folder in candidate_folders(paths):
        try:
            return read_state(folder)
        except StateError:
            continue
    return None


def load_state(paths: RunPaths, reference: Mapping[str, torch.Tensor], *, max_norm: float | None,
               optimizer_name: str | None) -> tuple[SavedState, dict[str, torch.Tensor], dict | None]:
    """(state with absolute paths, global adapter, server optimizer state_dict or None) of the newest usable state.

    `reference` is the freshly built model's adapter: the saved one must have its keys, shapes and dtypes, finite
    values, and lie within `max_norm` per completed round of it. A state that fails any check is skipped with a
    warning naming what failed; NothingSaved when none is usable."""
    folders = candidate_folders(paths)
    if not folders:
        raise NothingSaved(f"run {paths.run_id} has nothing saved to resume from (it stopped before its first "
                           "stage completed): start a new run")
    problems = []
    for folder in folders:
        try:
            loaded = _load_folder(folder, paths, reference, max_norm=max_norm, optimizer_name=optimizer_name)
        except StateError as error:
            problems.append(str(error))
            log.warning("Saved state %s is unusable, trying the one before it: %s", folder, error)
            continue
        if problems:
            log.warning("Resuming run %s from %s (%s) instead of a newer state: %s", paths.run_id, folder.name,
                        loaded[0].describe(), " | ".join(problems))
        return loaded
    raise NothingSaved(f"run {paths.run_id} has no usable saved state: {' | '.join(problems)}")


def _load_folder(folder: Path, paths: RunPaths, reference: Mapping[str, torch.Tensor], *, max_norm: float | None,
                 optimizer_name: str | None) -> tuple[SavedState, dict[str, torch.Tensor], dict | None]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state = read_state(folder)
    before_training = state.stage in ("collecting", "collected", "preprocessed")
    for name in ({*state.files} if before_training else {GLOBAL_WEIGHTS, *state.files}):
        file = folder / name
        if not file.is_file():
            raise StateError(f"{file} is missing")
        if name in state.files and _sha256(file) != state.files[name]:
            raise StateError(f"{file} does not match the sha256 in {folder / STATE_FILE}: the file is corrupt")
    if before_training and GLOBAL_WEIGHTS not in state.files:  # saved before the model was loaded
        return (state.model_copy(update={"history": local_paths(state.history, paths, str(folder / STATE_FILE))}),
                {k: v.clone() for k, v in reference.items()}, None)
    try:
        global_adapter = load_file(str(folder / GLOBAL_WEIGHTS), device="cpu")
        buffers_file = folder / SERVER_OPTIMIZER_WEIGHTS
        flat_buffers = load_file(str(buffers_file), device="cpu") if buffers_file.is_file() else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise StateError(f"{folder}: a tensor file cannot be read: {error}") from None
    reasons = check_global_adapter(reference, global_adapter, rounds=state.round, max_norm=max_norm)
    if reasons:
        raise StateError(f"{folder / GLOBAL_WEIGHTS}: the saved global adapter is bad: {'; '.join(reasons[:3])}")
    optimizer = _checked_optimizer(state, flat_buffers, reference, optimizer_name, folder)
    _checked_error_feedback(folder, state, reference)
    history = local_paths(state.history, paths, str(folder / STATE_FILE))
    return state.model_copy(update={"history": history, "server_optimizer": None}), global_adapter, optimizer


def check_global_adapter(reference: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], *, rounds: int,
                         max_norm: float | None) -> list[str]:
    """The checks a client update gets (keys, shapes, dtypes, finite values, norm), for a global adapter `rounds`
    rounds from `reference`: every round moves it by at most `max_norm` (MAX_UPDATE_NORM) under averaging rules,
    so it lies within rounds × max_norm of the starting adapter."""
    from fl_crew_reddit.aggregation.checks import check_update

    bound = max_norm * max(rounds, 1) if max_norm is not None else None
    return check_update(reference, adapter, max_norm=bound)


def _checked_optimizer(state: SavedState, flat: dict, reference: Mapping[str, torch.Tensor],
                       optimizer_name: str | None, folder: Path) -> dict | None:
    """The server optimizer's state_dict, after checking its name against AGGREGATION_METHOD and each buffer against
    the adapter (keys, shapes, float32, finite; second moments non-negative)."""
    import torch

    from fl_crew_reddit.aggregation.checks import check_update

    meta = state.server_optimizer
    if meta is None:
        if flat:
            raise StateError(f"{folder}: server optimizer buffers without their state in {STATE_FILE}")
        return None
    if optimizer_name is not None and meta.get("name") != optimizer_name:
        raise StateError(f"{folder}: the saved server optimizer is {meta.get('name')!r}, the run uses "
                         f"{optimizer_name!r}")
    names = meta.get("buffer_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StateError(f"{folder}: server_optimizer.buffer_names is not a list of names")
    buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for flat_key, tensor in flat.items():
        buffer, _, key = flat_key.partition("::")
        if buffer not in buffers:
            raise StateError(f"{folder}: server optimizer buffer {buffer!r} is not one of {names}")
        buffers[buffer][key] = tensor
    for buffer, tensors in buffers.items():
        if not tensors:
            continue
        expected = {k: reference[k].to(torch.float32) for k in tensors if k in reference}
        reasons = check_update(expected, tensors, max_norm=None)
        if buffer == "v" and not reasons and any(bool((t < 0).any()) for t in tensors.values()):
            reasons.append("negative second moments")
        if reasons:
            raise StateError(f"{folder / SERVER_OPTIMIZER_WEIGHTS}: buffer {buffer!r} is bad: {'; '.join(reasons[:3])}")
    return {**{k: v for k, v in meta.items() if k != "buffer_names"}, "buffers": buffers}


def _checked_error_feedback(folder: Path, state: SavedState,
                            reference: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{client: residual} from error_feedback.safetensors (the digest is checked with the other files): every
    `client::key` must name an adapter key, with its shape, float32 and finite values; StateError otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / ERROR_FEEDBACK_WEIGHTS
    if ERROR_FEEDBACK_WEIGHTS not in state.files:
        if file.exists():
            raise StateError(f"{file} is not listed in {folder / STATE_FILE}: refused")
        return {}
    try:
        flat = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise StateError(f"{file} cannot be read: {error}") from None
    residuals: dict[str, dict[str, torch.Tensor]] = {}
    for flat_key, tensor in flat.items():
        client, _, key = flat_key.rpartition("::")
        ref = reference.get(key)
        if not client or ref is None:
            raise StateError(f"{file}: {flat_key!r} is not CLIENT::KEY of an adapter key")
        if tuple(tensor.shape) != tuple(ref.shape) or tensor.dtype != torch.float32 or \
                not bool(torch.isfinite(tensor).all()):
            raise StateError(f"{file}: {flat_key!r} is not a finite float32 tensor of shape {tuple(ref.shape)}")
        residuals.setdefault(client, {})[key] = tensor
    return residuals


def load_error_feedback(paths: RunPaths, state: SavedState,
                        reference: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The clients' top-k residuals saved with `state` (as `load_state` returned it, so already checked); {} when
    it has none."""
    return _checked_error_feedback(state_dir(paths) / state.folder_name, state, reference)


# --- which run to resume ----------------------------------------------------------------------------------------------
def find_run(base: Path, run: str | None, rounds: int | None = None) -> tuple[str, str]:
    """(run id to resume, why that one). Given a run: that run, if it has something saved (and, when it is finished,
    `rounds` asks for more). Else the newest unfinished run: the one whose newest state was saved last; finished runs
    are never picked. NothingSaved says why there is nothing to resume."""
    results = Path(base) / "results"
    if run:
        check_run_id(run)
        paths = RunPaths(Path(base), run)
        if not paths.results.is_dir():
            raise NothingSaved(f"there is no run {run!r} under {results}")
        state = newest_state(paths)
        if state is None:
            raise NothingSaved(f"run {run!r} has nothing saved to resume from (it stopped before its first stage "
                               "completed): start a new run")
        if state.finished and (rounds is None or rounds <= state.total_rounds):
            raise NothingSaved(f"run {run!r} is finished ({state.total_rounds} rounds); resume it with more rounds: "
                               f"--resume {run} --rounds N")
        return run, f"as asked; its newest state is {state.describe()}"
    unfinished = []
    for folder in sorted(results.glob("*/state")) if results.is_dir() else []:
        run_id = folder.parent.name
        if folder.parent.is_symlink() or not folder.parent.is_dir():  # results/latest points to a run listed anyway
            continue
        try:
            state = newest_state(RunPaths(Path(base), run_id))
        except ValueError:
            continue  # not a run id
        if state is not None and not state.finished:
            unfinished.append((state.saved_at, run_id, state))
    if not unfinished:
        raise NothingSaved(f"no unfinished run with saved state under {results}")
    saved_at, run_id, state = max(unfinished)
    others = f"; {len(unfinished) - 1} other unfinished run(s): pass --resume RUN to pick one" \
        if len(unfinished) > 1 else ""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved_at))
    return run_id, f"the newest unfinished run (state saved {when}, {state.describe()}){others}"
