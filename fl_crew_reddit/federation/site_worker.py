"""A site's long-lived compute process, next to its SuperNode: it loads the base model and the site's data once and
serves the site's ClientApp (fl_crew_reddit/federation/flower.py) over a Unix socket on the same machine.

A SuperNode starts a fresh ClientApp process for every message; loading torch, transformers and PEFT and building
the model in each would dominate a round (~10 s of CPU per message here). With a worker the ClientApp process
imports only Flower and numpy and hands the received arrays to the worker, which runs the same `Site.fit` /
`Site.evaluate` the in-process engine runs.

Wire format, both ways: 8-byte length + JSON header, 8-byte length + safetensors bytes (never pickle). The socket
file is created owner-only (0600) inside the federation's work folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import struct
import sys
from pathlib import Path

log = logging.getLogger("fl_crew_reddit.site_worker")
_LENGTH = struct.Struct("!Q")
MAX_FRAME = 8 << 30


def send_frame(sock: socket.socket, header: dict, body: bytes = b"") -> None:
    encoded = json.dumps(header).encode("utf-8")
    sock.sendall(_LENGTH.pack(len(encoded)) + encoded + _LENGTH.pack(len(body)))
    if body:
        sock.sendall(body)


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> tuple[dict, bytes]:
    (size,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size))
    if size > MAX_FRAME:
        raise ValueError(f"header of {size} bytes refused")
    header = json.loads(_read_exact(sock, size).decode("utf-8"))
    (size,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size))
    if size > MAX_FRAME:
        raise ValueError(f"body of {size} bytes refused")
    return header, _read_exact(sock, size) if size else b""


def call_worker(path: str, header: dict, body: bytes, timeout_s: float | None = None) -> tuple[dict, bytes]:
    """One request to the site's worker; RuntimeError with the worker's reason when it failed."""
    import time

    deadline = time.monotonic() + 120  # the worker may still be starting (binding its socket)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        send_frame(sock, header, body)
        reply, data = recv_frame(sock)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "the site worker failed"))
    return reply, data


class SiteWorker:
    """Holds one site (model + data) and answers train / evaluate requests one at a time."""

    def __init__(self, name: str, data_dir: Path, threads: int = 0, cores_lock: Path | None = None):
        self.name = name
        self.data_dir = Path(data_dir)
        self.threads = threads
        self.cores_lock = Path(cores_lock) if cores_lock else None  # sites sharing one machine's cores take turns
        self._site = None
        self._settings_key = None

    def site(self, settings: dict):
        key = json.dumps(settings, sort_keys=True, default=str)
        if self._site is None or key != self._settings_key:
            import torch

            from fl_crew_reddit.config import FLCrewRedditConfig
            from fl_crew_reddit.site import Site
            from fl_crew_reddit.training.model_loading import load_base_model, pick_device
            from fl_crew_reddit.training.peft_setup import build_peft_model

            if self.threads:
                torch.set_num_threads(self.threads)
            config = FLCrewRedditConfig(_env_file=None, **settings)
            device = pick_device(config.device)
            base, tokenizer = load_base_model(config, device)
            torch.manual_seed(config.seed)  # the starting adapter; every request loads the received one over it
            model = build_peft_model(base, config)
            self._site = Site.from_folder(self.name, self.data_dir, model, tokenizer, device,
                                          max_seq_length=config.max_seq_length,
                                          mixed_precision=config.mixed_precision, show_progress=False,
                                          settings=settings)
            self._settings_key = key
        return self._site

    def handle(self, header: dict, body: bytes) -> tuple[dict, bytes]:
        if self.cores_lock is None:
            return self._handle(header, body)
        import fcntl

        with self.cores_lock.open("a") as lock:  # one site computes at a time, on all of the machine's cores
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                return self._handle(header, body)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _handle(self, header: dict, body: bytes) -> tuple[dict, bytes]:
        import time

        from safetensors.torch import load as load_tensors
        from safetensors.torch import save as save_tensors

        started = time.perf_counter()
        site = self.site(header["settings"])
        global_adapter = load_tensors(body)
        if header["op"] == "train":
            result = site.fit(global_adapter, header["config"])
            metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
            update = save_tensors({k: v.contiguous() for k, v in result.state.items()})
            log.info("site %s: trained on %d examples in %.1fs", self.name, result.num_examples,
                     time.perf_counter() - started)
            return {"ok": True, "num_examples": result.num_examples, "metrics": metrics}, update
        if header["op"] == "evaluate":
            sums = site.evaluate(global_adapter, tuple(header["splits"]))
            preferences = (site.evaluate_preferences(tuple(header["splits"]),
                                                     float(header["settings"].get("dpo_beta", 0.1)))
                           if header["settings"].get("preference_metrics", "on") != "off" else {})
            log.info("site %s: evaluated %s in %.1fs", self.name, ",".join(header["splits"]),
                     time.perf_counter() - started)
            return {"ok": True, "sums": {s: [v.nll_sum, v.num_tokens] for s, v in sums.items()},
                    "preferences": preferences}, b""
        raise ValueError(f"unknown operation {header['op']!r}")

    def serve(self, path: Path) -> None:
        path = Path(path)
        if path.exists():
            path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file: owner read/write only
        try:
            server.bind(str(path))
        finally:
            os.umask(old_umask)
        server.listen(4)
        log.info("site %s: serving %s", self.name, path)
        while True:
            connection, _ = server.accept()
            with connection:
                try:
                    header, body = recv_frame(connection)
                    reply, data = self.handle(header, body)
                except Exception as error:  # the request fails; the worker stays up for the next one
                    log.exception("site %s: request failed", self.name)
                    reply, data = {"ok": False, "error": f"{type(error).__name__}: {error}"}, b""
                try:
                    send_frame(connection, reply, data)
                except OSError:
                    log.warning("site %s: the ClientApp went away before the reply", self.name)


def main(argv: list[str] | None = None) -> int:
    """Serve one or more sites: `--site NAME=DATA_DIR=SOCKET` (repeatable). torch, transformers and PEFT are
    imported once, then each site is forked into a process of its own (its own model, data and socket)."""
    parser = argparse.ArgumentParser(description="Serve federated sites' training and evaluation.")
    parser.add_argument("--site", action="append", required=True, metavar="NAME=DATA_DIR=SOCKET")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--share-cores", type=Path, metavar="LOCK_FILE",
                        help="sites on one machine take turns (a lock on this file) and each uses --threads cores: "
                             "faster than all at once with fewer threads each when sites outnumber cores")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    import fl_crew_reddit._quiet  # noqa: F401
    import fl_crew_reddit.site  # noqa: F401  (torch, transformers, PEFT: once, before forking)
    import fl_crew_reddit.training.peft_setup  # noqa: F401

    sites = []
    for entry in args.site:
        name, _, rest = entry.partition("=")
        data_dir, _, path = rest.rpartition("=")
        if not (name and data_dir and path):
            parser.error(f"--site takes NAME=DATA_DIR=SOCKET, not {entry!r}")
        sites.append((name, data_dir, path))
    children = []
    for name, data_dir, path in sites:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the site's own process
            try:
                SiteWorker(name, Path(data_dir), args.threads, args.share_cores).serve(Path(path))
            finally:
                os._exit(1)
        children.append(pid)
    # The parent only watches: when one site's process ends, it ends the others and exits (the launcher sees it).
    try:
        os.wait()
    finally:
        for pid in children:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
