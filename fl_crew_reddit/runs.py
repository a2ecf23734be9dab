"""Run folders and files: where each stage writes, adapters in PEFT's own format, history.json written atomically.

    data/{collected,preprocessed,training}/<run>/   models/local/<run>/<client>/round-<k>/
    models/aggregated/<run>/round-<k>/              results/<run>/history.json    logs/<run>.log
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

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

    def create(self) -> "RunPaths":
        for folder in (self.collected, self.results, self.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        return self


def save_adapter(peft_model, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write `state` as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    set_peft_model_state_dict(peft_model, state)
    folder.parent.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(folder, safe_serialization=True)
    return folder


def load_adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    """Adapter weights from a PEFT folder, through safetensors only: no pickle ever runs on a client's update."""
    path = Path(folder) / ADAPTER_WEIGHTS
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
