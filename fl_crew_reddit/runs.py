"""Run folders and files: where each stage writes, adapters in PEFT's own format, history.json written atomically.

    data/{collected,preprocessed,training}/<run>/   models/local/<run>/<client>/round-<k>/
    models/aggregated/<run>/round-<k>/              results/<run>/history.json    logs/<run>.log
    results/latest -> the newest run                results/<run>/state/LATEST -> its newest complete round

Finding a run (by id, by folder, `latest`, or the newest with saved state) lives here too, next to the code that
writes those folders and pointers. torch, peft and safetensors load only in the functions that move tensors, so the
CLI and the report can find runs without them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def new_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class RunPaths:
    base: Path
    run_id: str

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


def save_adapter(peft_model, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write `state` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, state)
    folder.parent.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


UPDATE_WEIGHTS = "update.safetensors"


def save_client_update(peft_model, global_adapter: dict[str, torch.Tensor], sent: dict[str, torch.Tensor],
                       folder: Path) -> Path:
    """A client's round result: its adapter as a PEFT folder, plus, when it sends only part of the adapter
    (FFA-LoRA: the B factors), that part alone in `update.safetensors`: the file that travels to the server."""
    partial = set(sent) != set(global_adapter)
    save_adapter(peft_model, {**global_adapter, **sent} if partial else sent, folder)
    if partial:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sent.items()}, str(Path(folder) / UPDATE_WEIGHTS))
    return folder


def update_file(folder: Path) -> Path:
    """The file of a client's folder that the server reads: update.safetensors when present, else the adapter."""
    partial = Path(folder) / UPDATE_WEIGHTS
    return partial if partial.is_file() else Path(folder) / ADAPTER_WEIGHTS


def load_client_update(folder: Path) -> dict[str, torch.Tensor]:
    """What a client sent, through safetensors only: no pickle ever runs on a client's update."""
    from safetensors.torch import load_file

    path = update_file(folder)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a PEFT adapter folder written with safetensors")
    return load_file(str(path), device="cpu")


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


# --- crash-safe round state ---------------------------------------------------------------------------------------
STATE_FILE = "state.json"
GLOBAL_WEIGHTS = "global_adapter.safetensors"
SERVER_OPTIMIZER_WEIGHTS = "server_optimizer.safetensors"


def state_dir(paths: RunPaths) -> Path:
    return paths.results / "state"


def save_round_state(paths: RunPaths, round_number: int, state: dict, global_adapter: dict[str, torch.Tensor],
                     server_optimizer: dict | None) -> Path:
    """Write everything needed to continue after `round_number`, then flip the LATEST pointer atomically.

    A kill at any moment leaves either the previous complete state or the new complete state, never a mix.
    """
    from safetensors.torch import save_file

    root = state_dir(paths)
    target = root / f"round-{round_number}"
    staging = root / f".round-{round_number}.tmp"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in global_adapter.items()}, str(staging / GLOBAL_WEIGHTS))
    payload = dict(state)
    if server_optimizer is not None:
        tensors = {f"{buffer}::{key}": t.contiguous() for buffer, keys in server_optimizer["buffers"].items()
                   for key, t in keys.items()}
        if tensors:
            save_file(tensors, str(staging / SERVER_OPTIMIZER_WEIGHTS))
        payload["server_optimizer"] = {k: v for k, v in server_optimizer.items() if k != "buffers"}
        payload["server_optimizer"]["buffer_names"] = list(server_optimizer["buffers"])
    write_json_atomic(staging / STATE_FILE, payload)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(staging, target)
    pointer = root / "LATEST"
    tmp = root / "LATEST.tmp"
    tmp.write_text(target.name + "\n", encoding="utf-8")
    os.replace(tmp, pointer)
    for old in root.glob("round-*"):  # keep the newest two complete states
        if old.is_dir() and int(old.name.split("-")[1]) < round_number - 1:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return target


def load_round_state(paths: RunPaths) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """(state, global adapter, server optimizer state_dict or None) of the newest complete round."""
    from safetensors.torch import load_file

    pointer = state_dir(paths) / "LATEST"
    if not pointer.is_file():
        raise FileNotFoundError(f"{paths.results} has no saved round state to resume from (no completed round)")
    folder = state_dir(paths) / pointer.read_text(encoding="utf-8").strip()
    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    global_adapter = load_file(str(folder / GLOBAL_WEIGHTS), device="cpu")
    optimizer = state.pop("server_optimizer", None)
    if optimizer is not None:
        buffers = {name: {} for name in optimizer.pop("buffer_names", [])}
        if (folder / SERVER_OPTIMIZER_WEIGHTS).is_file():
            for flat_key, tensor in load_file(str(folder / SERVER_OPTIMIZER_WEIGHTS), device="cpu").items():
                buffer, key = flat_key.split("::", 1)
                buffers.setdefault(buffer, {})[key] = tensor
        optimizer["buffers"] = buffers
    return state, global_adapter, optimizer


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


def find_run(results_dir: Path, run: str | None) -> str:
    """A run id to resume: the given one, or the newest run with saved state."""
    if run:
        if not (Path(results_dir) / run).is_dir():
            raise FileNotFoundError(f"no run {run!r} under {results_dir}")
        return run
    candidates = sorted(p.parent.parent.name for p in Path(results_dir).glob("run-*/state/LATEST"))
    if not candidates:
        raise FileNotFoundError(f"no run with saved state under {results_dir}")
    return candidates[-1]


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
