"""A Flower site's error-feedback residual (UPDATE_COMPRESSION topk / sign), kept in its own data folder.

In-process and trainer-process clients have theirs kept by the workspace and saved with the run state. A Flower site
is its own machine: it keeps its residual next to its data, one file per round it trained in,

    <site folder>/error-feedback/round-<k>.safetensors    the residual left after round k's update was sent

written atomically (a temporary file, then a rename). Training round r starts from the newest residual of a round
before r, so a server that resumes from its state after round r−1 and asks for round r again gets the same update
from this site as the first time (the residual of the replayed round is simply rewritten). Only the residual used
and the one written are kept.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FOLDER = "error-feedback"
_NAME = re.compile(r"^round-(\d{1,7})\.safetensors$")


def _rounds(folder: Path) -> dict[int, Path]:
    root = folder / FOLDER
    if not root.is_dir():
        return {}
    return {int(m[1]): p for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_file()}


def load_site_feedback(folder: Path, round_number: int) -> dict[str, torch.Tensor]:
    """The residual to add to round `round_number`'s update: the newest one saved for an earlier round ({} when there
    is none, or it cannot be read: starting over from zero is always correct, only less accurate once)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    earlier = [k for k in _rounds(Path(folder)) if k < round_number]
    if not earlier:
        return {}
    path = _rounds(Path(folder))[max(earlier)]
    try:
        residual = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        log.warning("error-feedback residual %s cannot be read (%s): starting from zero", path, error)
        return {}
    if not all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in residual.values()):
        log.warning("error-feedback residual %s is not finite float32: starting from zero", path)
        return {}
    return residual


def save_site_feedback(folder: Path, round_number: int, residual: dict[str, torch.Tensor]) -> Path:
    """Write round `round_number`'s residual atomically; drop residuals older than the one this round started from."""
    from safetensors.torch import save_file

    root = Path(folder) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"round-{round_number}.safetensors"
    tmp = root / f".{target.name}.tmp"
    save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in residual.items()}, str(tmp))
    os.replace(tmp, target)
    rounds = _rounds(Path(folder))
    earlier = [k for k in rounds if k < round_number]
    keep = {round_number, max(earlier)} if earlier else {round_number}
    for k, path in rounds.items():
        if k not in keep and k < round_number:
            path.unlink(missing_ok=True)
    return target
