"""Trainer processes, one per device, so the clients of a round train in parallel on a machine with several GPUs.

TRAINER_DEVICES=auto gives one process per visible CUDA device when there are two or more; otherwise (`[]`) the
workspace trains the clients one after another in its own process, as before. An explicit list (`cuda:0,cuda:1`,
or `cpu,cpu` for tests) starts one process per entry.

Each worker process loads the base model and its LoRA wrapper once, then serves jobs: (client, round, the global
adapter as a safetensors file, the fit config, the client's train JSONL written by preprocessing) → the client's
adapter folder and metrics. Only paths and safetensors files cross the process boundary; the client's rows are read
by the worker from its own shard on this machine. Training is the same `LocalTrainer.fit` the in-process path runs,
seeded by (SEED, client, round), so which worker trains a client does not change its result on one device type.

A job whose worker raises, dies, or runs past CLIENT_TIMEOUT fails with `TrainerJobFailed` (the round leaves that
client out); a worker that died or was stopped takes no more jobs that round and is started again for the next.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path

import torch

from fl_crew_reddit.training.model_loading import BaseModelUnavailable

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a large base model onto a GPU can take minutes
TIMEOUT_GRACE_S = 30.0  # a job may overrun CLIENT_TIMEOUT by one step before its worker is stopped


class TrainerDevicesUnavailable(BaseModelUnavailable):
    """TRAINER_DEVICES names a device this machine does not have: the model cannot be placed there."""


class TrainerJobFailed(RuntimeError):
    """One client's training in a worker process failed: the worker raised, died or ran past CLIENT_TIMEOUT."""


class WorkerDiedWhileStarting(TrainerJobFailed):
    """A worker process ended (killed or crashed) before it reported that its model was loaded."""


def trainer_devices(setting: list[str], device: str = "auto") -> list[str]:
    """The devices of the trainer processes for TRAINER_DEVICES, or [] for in-process training one after another.

    `auto`: every visible CUDA device when there are two or more (unless DEVICE=cpu), else []."""
    if setting != ["auto"]:
        wanted = [int(name.split(":")[1]) if ":" in name else 0 for name in setting if name.startswith("cuda")]
        visible = torch.cuda.device_count() if wanted else 0
        missing = sorted({f"cuda:{index}" for index in wanted if index >= visible})
        if missing:
            raise TrainerDevicesUnavailable(
                f"TRAINER_DEVICES={','.join(setting)} names {', '.join(missing)} but torch sees {visible} CUDA "
                "device(s); use TRAINER_DEVICES=auto or list devices that exist")
        return list(setting)
    if device == "cpu" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    return [f"cuda:{index}" for index in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class TrainingJob:
    """What the server sends a worker for one client in one round: paths and the fit config, no data."""

    client: str
    round: int
    train_path: str  # the client's train JSONL (preprocessing's shard on this machine)
    global_adapter_path: str  # the round's starting global adapter, safetensors
    output_dir: str  # where the client's adapter folder goes
    fit_config: dict
    error_feedback: bytes = b""  # UPDATE_COMPRESSION=topk: the client's residual (safetensors bytes; b"": none yet)
    image_settings: dict = field(default_factory=dict)  # multimodal: `site.app.image_settings` ({}: text only)


@dataclass(frozen=True)
class TrainingOutcome:
    client: str
    round: int
    adapter_path: str
    num_examples: int
    metrics: dict
    device: str
    error_feedback: bytes = b""  # UPDATE_COMPRESSION=topk: the client's new residual, for the workspace to keep


# --- the worker process -------------------------------------------------------------------------------------------
def _worker_main(config, device_name: str, connection, num_threads: int) -> None:
    """Load the model once on `device_name`, then train one job at a time until told to stop (or the parent goes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the parent's: it saves state and stops the workers
    try:
        torch.set_num_threads(num_threads)
        device = torch.device(device_name)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # kernels and allocations of this process go to its own GPU
        from fl_crew_reddit.training.model_loading import load_base_model
        from fl_crew_reddit.training.peft_setup import build_peft_model

        base, tokenizer = load_base_model(config, device)
        torch.manual_seed(config.seed)  # the same starting adapter as the workspace's (overwritten by each job)
        model = build_peft_model(base, config)
    except Exception as error:  # reported to the parent, which fails the jobs this worker would have taken
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", os.getpid()))
    cache: dict = {}  # a client's tokenized shard, read once; the projector
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        try:
            reply = ("done", _train(job, model, tokenizer, device, config, cache))
        except Exception as error:  # the job fails, the worker stays up for the next one
            reply = ("failed", f"{type(error).__name__}: {error}")
        try:
            connection.send(reply)
        except OSError:  # the parent is gone
            return


def _train(job: TrainingJob, model, tokenizer, device, config, cache: dict) -> TrainingOutcome:
    """What the workspace's in-process `train_client` does, on this worker's model: the client as a `Site` (its
    train shard, its pairs beside it, a data attacker's poisoned rows, the image projector and image rows when the
    job carries `image_settings`) fits, then the update is saved. `cache` keeps each shard's rows and the projector
    between jobs."""
    from safetensors.torch import load as load_tensors
    from safetensors.torch import load_file
    from safetensors.torch import save as save_tensors

    from fl_crew_reddit.site.app import Site, site_image_parts
    from fl_crew_reddit.site.data import SiteData
    from fl_crew_reddit.training.adapter_files import save_client_update, update_file

    image_key = f"projector|{job.image_settings.get('image_projector', '')}"
    if image_key not in cache:  # one projector per worker, as the workspace holds one; each job loads its tensors
        cache[image_key] = site_image_parts(job.image_settings, model)
    projector, images = cache[image_key]
    data_key = f"{job.train_path}|{image_key}"
    if data_key not in cache:
        cache[data_key] = SiteData(None, tokenizer, config.max_seq_length, files={"train": job.train_path},
                                   images=images)
    site = Site(job.client, cache[data_key], model, tokenizer, device, mixed_precision=config.mixed_precision,
                show_progress=False, projector=projector)
    global_adapter = load_file(job.global_adapter_path, device="cpu")
    # top-k error feedback: the residual the workspace keeps for this client comes and goes as safetensors bytes
    feedback = load_tensors(job.error_feedback) if job.error_feedback else {}
    result = site.fit(global_adapter, job.fit_config, error_feedback=feedback)
    folder = save_client_update(model, global_adapter, result.state, Path(job.output_dir), projector=projector)
    result.metrics["update_bytes"] = update_file(folder).stat().st_size
    return TrainingOutcome(client=job.client, round=job.round, adapter_path=str(folder),
                           num_examples=result.num_examples, metrics=result.metrics, device=str(device),
                           error_feedback=save_tensors(feedback) if feedback else b"")


# --- the parent's side --------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    index: int
    device: str
    process: multiprocessing.Process | None = None
    connection: object | None = None
    job: TrainingJob | None = None  # the job it is training now

    @property
    def name(self) -> str:
        return f"trainer process {self.index + 1} on {self.device}"

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


@dataclass
class _Round:
    """One round's jobs, shared by the serving threads: each takes the next job until none is left."""

    jobs: deque
    futures: dict[tuple[str, int], Future]
    serving: int
    last_error: str = "no trainer process could start"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_job(self) -> TrainingJob | None:
        with self.lock:
            return self.jobs.popleft() if self.jobs else None

    def worker_left(self) -> None:
        """A serving thread is done; the last one fails whatever no worker could take."""
        with self.lock:
            self.serving -= 1
            last = self.serving == 0
        if last:
            self.cancel(f"no trainer process was left to train it ({self.last_error})")

    def cancel(self, reason: str) -> None:
        """Fail every job no worker has taken yet."""
        with self.lock:
            orphans, self.jobs = list(self.jobs), deque()
        for job in orphans:
            self.futures[(job.client, job.round)].set_exception(TrainerJobFailed(reason))


class TrainerPool:
    """Long-lived trainer processes, one per device, fed one round of jobs at a time."""

    def __init__(self, config, devices: list[str]):
        # The workers need the model settings only: no secrets cross the process boundary.
        self.config = config.model_copy(update={name: None for name in
                                                ("openai_api_key", "reddit_client_id", "reddit_client_secret")})
        self.devices = list(devices)
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be forked; spawn is the same everywhere
        self._workers = [_Worker(index, device) for index, device in enumerate(self.devices)]
        self._threads = max(1, (os.cpu_count() or 1) // len(self.devices))
        self._futures: dict[tuple[str, int], Future] = {}
        self._serving: list[threading.Thread] = []
        self._round: _Round | None = None

    # 1. Hand out a round.
    def submit_round(self, jobs: list[TrainingJob]) -> None:
        """Start `jobs` on the workers (a dead worker is started again first); results come from `result`."""
        self._wait_for_round()
        futures = {(job.client, job.round): Future() for job in jobs}
        self._futures.update(futures)
        shared = self._round = _Round(deque(jobs), futures, serving=len(self._workers))
        self._serving = [threading.Thread(target=self._serve, args=(worker, shared), daemon=True,
                                          name=f"serve-{worker.device}-{worker.index}") for worker in self._workers]
        for thread in self._serving:
            thread.start()

    def has_job(self, client: str, round_number: int) -> bool:
        return (client, round_number) in self._futures

    def running(self) -> dict[int, str]:
        """pid -> client, for the workers training now (what `ps` would show, by client)."""
        busy = [(worker.process, worker.job) for worker in self._workers]  # read once: serving threads change them
        return {process.pid: job.client for process, job in busy if process is not None and job is not None}

    def worker_pids(self) -> list[int | None]:
        """Each device's worker pid (None: not running), in TRAINER_DEVICES order."""
        return [worker.process.pid if worker.alive() else None for worker in self._workers]

    def wait_idle(self) -> None:
        """Until the round's serving threads are done (each worker has started, or failed to, and is idle)."""
        self._wait_for_round()

    # 2. Collect a client's result (the caller decides the order: client names, for determinism).
    def result(self, client: str, round_number: int) -> TrainingOutcome:
        """The client's outcome once its worker is done; raises TrainerJobFailed with the reason it failed."""
        return self._futures.pop((client, round_number)).result()

    def close(self) -> None:
        """Stop the workers: idle ones exit when told, busy ones (a run stopped mid-round) are killed."""
        if self._round is not None:
            self._round.cancel("the run stopped before this client was trained")
        busy = any(thread.is_alive() for thread in self._serving)
        for worker in self._workers:
            if not busy and worker.alive():
                try:
                    worker.connection.send(None)
                except OSError:
                    pass
        for worker in self._workers:
            process = worker.process
            if process is not None:
                process.join(0 if busy else 10.0)
                if process.is_alive():
                    process.kill()
        self._wait_for_round()  # a serving thread sees its worker gone, fails its job and ends
        for worker in self._workers:
            self._stop(worker)

    # --- serving --------------------------------------------------------------------------------------------------
    def _wait_for_round(self) -> None:
        for thread in self._serving:
            thread.join()
        self._serving = []

    def _serve(self, worker: _Worker, shared: _Round) -> None:
        try:
            if not worker.alive():
                try:
                    self._start(worker)
                except Exception as error:  # TrainerJobFailed, or the process could not even be spawned
                    shared.last_error = str(error) if isinstance(error, TrainerJobFailed) else (
                        f"{worker.name} could not start: {type(error).__name__}: {error}")
                    log.error("%s", shared.last_error)
                    self._stop(worker)
                    return
            while (job := shared.next_job()) is not None:
                future = shared.futures[(job.client, job.round)]
                try:
                    future.set_result(self._run(worker, job))
                except TrainerJobFailed as error:
                    future.set_exception(error)
                    if not worker.alive():  # died or stopped: it takes no more jobs this round
                        shared.last_error = str(error)
                        return
                except Exception as error:  # a bug on this side must not leave the round waiting forever
                    future.set_exception(TrainerJobFailed(f"{type(error).__name__}: {error} ({worker.name})"))
                    self._stop(worker)
                    return
        finally:
            shared.worker_left()

    def _start(self, worker: _Worker) -> None:
        """Start the worker process and wait until it has loaded the model. A process that dies while starting
        (seen rarely on a loaded 2-core machine: SIGKILL from outside while it imports and loads) is started once
        more before its jobs fail; a process that reports a load error is not retried (it would fail the same way)."""
        for attempt in (1, 2):
            try:
                return self._start_once(worker)
            except WorkerDiedWhileStarting as error:
                if attempt == 2:
                    raise
                log.warning("%s; starting it once more", error)

    def _start_once(self, worker: _Worker) -> None:
        self._stop(worker)
        started = time.perf_counter()
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_worker_main, name=f"fl-trainer-{worker.index + 1}", daemon=True,
                                        args=(self.config, worker.device, child_end, self._threads))
        process.start()
        child_end.close()
        worker.process, worker.connection = process, parent_end
        kind, payload = self._reply(worker, START_TIMEOUT_S, "starting")
        if kind != "ready":
            self._stop(worker)
            raise TrainerJobFailed(f"{worker.name} could not load the model: {payload}")
        log.info("Started %s (pid %d) in %.1fs", worker.name, payload, time.perf_counter() - started)

    def _run(self, worker: _Worker, job: TrainingJob) -> TrainingOutcome:
        timeout_s = float(job.fit_config.get("timeout_s") or 0)
        worker.job = job
        try:
            worker.connection.send(job)
            limit = 2 * timeout_s + TIMEOUT_GRACE_S if timeout_s else None
            kind, payload = self._reply(worker, limit, f"training {job.client}", timeout_s=timeout_s)
        except OSError as error:
            self._stop(worker)
            raise TrainerJobFailed(f"{worker.name} could not take the job ({type(error).__name__})") from None
        finally:
            worker.job = None
        if kind != "done":
            raise TrainerJobFailed(f"{payload} ({worker.name})")
        log.info("Round %d: %s trained on %s in %.1fs", job.round, job.client, worker.device,
                 payload.metrics.get("seconds", 0.0))
        return payload

    def _reply(self, worker: _Worker, limit_s: float | None, doing: str, timeout_s: float = 0.0) -> tuple:
        """The worker's next message; a worker that dies or overruns `limit_s` is stopped and the reason raised."""
        ready = wait([worker.connection, worker.process.sentinel], timeout=limit_s)
        if worker.connection in ready:
            try:
                return worker.connection.recv()
            except (EOFError, OSError):
                pass  # it died while answering
        if not ready:
            self._stop(worker)
            raise TrainerJobFailed(f"TimeoutError: {worker.name} ran past CLIENT_TIMEOUT={timeout_s:g}s while "
                                   f"{doing} and was stopped" if timeout_s else
                                   f"{worker.name} did not answer within {limit_s:g}s while {doing}; stopped")
        worker.process.join(5)
        code = worker.process.exitcode
        self._stop(worker)
        died = WorkerDiedWhileStarting if doing == "starting" else TrainerJobFailed
        raise died(f"{worker.name} died while {doing} (exit code {code})")

    @staticmethod
    def _stop(worker: _Worker) -> None:
        if worker.process is not None:
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(10)
        if worker.connection is not None:
            worker.connection.close()
        worker.process, worker.connection = None, None
