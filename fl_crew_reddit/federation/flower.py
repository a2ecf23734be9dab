"""The federation on Flower's Deployment Engine (flwr 1.39, Message API): a real SuperLink and one SuperNode per site.

- `client_app` (ClientApp): `query` answers which site this SuperNode serves; `train` loads the site named by the
  SuperNode's `--node-config` (its data folder), fits the received global adapter with the received fit config and
  replies with the update arrays, num_examples and metrics; `evaluate` replies with NLL sums and token counts of the
  requested splits. Site code: fl_crew_reddit/site/.
- `server_app` (ServerApp): one `flwr run` per federation session. It serves the jobs the crew's process queues in
  the session folder (run config `job-dir`): a round runs the same `FederatedStrategy` the in-process engine uses
  (sample → train messages → decode and screen → aggregate → evaluate messages → write the outcome); the round's
  inputs (strategy settings and server-optimizer state, global adapter) and outputs sit in a job folder on the
  server's disk.
- `LocalFlowerFederation`: starts `flower-superlink` and the SuperNodes on 127.0.0.1 (`--insecure`: loopback only),
  starts the session with `flwr run <app> local --stream`, shows their logs when something fails, stops them.

Adapters travel as one flat numpy Array per dtype plus a layout (`pack_adapter`; `.npy` bytes read with
allow_pickle=False); every update is checked for keys, shapes, dtypes, finite values and norm before the aggregation
rule sees it. Nothing is unpickled.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fl_crew_reddit.federation.secagg import is_secure_fit, secaggplus_when_asked, secure_fit_reply
from fl_crew_reddit.runs import write_json_atomic  # light: it loads torch only to move tensors

if TYPE_CHECKING:
    import torch

    from fl_crew_reddit.server.strategy import AggregationOutcome, FederatedStrategy

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flower_app"  # the app `flwr run` ships (pyproject [tool.flwr.app])
JOB_FILE, RESULT_FILE = "job.json", "result.json"
GLOBAL_IN, GLOBAL_OUT = "global.safetensors", "new_global.safetensors"
OPTIMIZER_IN, OPTIMIZER_OUT = "server_optimizer.safetensors", "server_optimizer_after.safetensors"
NODES_FILE = "nodes.json"
SITE_RANKS_FILE = "site_ranks.json"
SESSION_FILE, HEARTBEAT_FILE = "session.json", "heartbeat"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SPLITS_EVALUATED = ("test", "validation")
MODEL_SETTINGS = ("base_llm_model", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_quantization",
                  "quantization_bits", "gradient_checkpointing", "max_seq_length", "mixed_precision", "device", "seed",
                  "dpo_beta")  # dpo_beta: the β of the held-out preference metrics a site reports


PREFERENCES = "preferences"  # the key of the sites' held-out preference metrics in an evaluation


class SiteFailed(RuntimeError):
    """A site's train message came back with an error, or with no usable reply."""


class FlowerRunFailed(RuntimeError):
    """The SuperLink, a SuperNode or the ServerApp failed; the message carries their logs' tails."""


def _plain(model: dict) -> dict:
    """Model settings as JSON values (tuples as lists)."""
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in model.items()}


def model_settings(config, projector=None) -> dict:
    """What a site needs to build the same model as the server (base model, LoRA, precision): sent with each message.
    Multimodal training (`projector`: the server's ImageProjector): what builds it on the site (`site.app`)."""
    # resolved here: a site's own TRAINING_OBJECTIVE is the default, so "auto" would resolve there to off
    from fl_crew_reddit.site.app import image_settings

    return {**{name: getattr(config, name) for name in MODEL_SETTINGS},
            "preference_metrics": "on" if config.scores_preferences else "off", **image_settings(config, projector)}


# --- arrays ------------------------------------------------------------------------------------------------------
# An adapter crosses the wire as one flat numpy Array per dtype ("float32": every float32 tensor, concatenated in key
# order) and a ConfigRecord naming each tensor's key, dtype and shape. Flower stores and moves every Array of a
# message as objects of its own (one per array, plus 5 MB chunks): an all-linear LoRA adapter of the 135M model is
# 420 tensors, 842 objects, each one RPC per hop; packed it is 5 objects (a --quick round of
# benchmarks/federation_overhead.py went from 134 s to 66 s on 2 cores; docs/results.md).
WIRE_DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int32", "int64")


def pack_adapter(state: dict) -> RecordDict:
    """{"arrays": one flat Array per dtype, "layout": keys, dtypes, shapes} of adapter tensors (torch or numpy)."""
    import numpy as np

    keys, dtypes, shapes, groups = [], [], [], {}
    for key, value in state.items():
        values = value.detach().to("cpu").contiguous().numpy() if hasattr(value, "detach") else np.asarray(value)
        if values.dtype.name not in WIRE_DTYPES:
            raise TypeError(f"{key!r}: dtype {values.dtype} cannot travel (one of {', '.join(WIRE_DTYPES)})")
        keys.append(key)
        dtypes.append(values.dtype.name)
        shapes.append(list(values.shape))
        groups.setdefault(values.dtype.name, []).append(values.reshape(-1))
    arrays = ArrayRecord({dtype: Array(np.concatenate(parts) if parts else np.zeros(0, dtype))
                          for dtype, parts in groups.items()})
    layout = ConfigRecord({"keys": keys, "dtypes": dtypes, "shapes": json.dumps(shapes)})
    return RecordDict({"arrays": arrays, "layout": layout})


def unpack_adapter(content: RecordDict) -> dict:
    """The numpy tensors of a packed adapter (`pack_adapter`). Numbers only: an Array serialized any other way than
    numpy `.npy` (read with allow_pickle=False) is refused, and so is a layout that does not account for every
    element exactly (ValueError / TypeError saying what is wrong)."""
    import numpy as np

    arrays, layout = content["arrays"], content["layout"]
    if not isinstance(arrays, ArrayRecord) or not isinstance(layout, ConfigRecord):
        raise TypeError("expected an ArrayRecord `arrays` and a ConfigRecord `layout`")
    keys, dtypes, shapes = list(layout["keys"]), list(layout["dtypes"]), json.loads(str(layout["shapes"]))
    if not (len(keys) == len(dtypes) == len(shapes)) or len(set(keys)) != len(keys):
        raise ValueError("the layout's keys, dtypes and shapes do not match one to one")
    flat = {}
    for dtype, array in arrays.items():
        values = array.numpy()  # TypeError for a serialization other than numpy's
        if values.dtype.name != dtype or dtype not in WIRE_DTYPES or values.ndim != 1:
            raise TypeError(f"array {dtype!r} holds {values.dtype} of shape {values.shape}, not a flat {dtype}")
        flat[dtype] = values
    offsets = dict.fromkeys(flat, 0)
    state = {}
    for key, dtype, shape in zip(keys, dtypes, shapes, strict=True):
        if dtype not in flat:
            raise ValueError(f"{key!r}: no {dtype} array came with the layout")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"{key!r}: shape {shape!r} is not a list of sizes")
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        start = offsets[dtype]
        if start + size > flat[dtype].size:
            raise ValueError(f"{key!r}: the {dtype} array ends before this tensor")
        state[key] = flat[dtype][start:start + size].reshape(shape)
        offsets[dtype] = start + size
    unused = {dtype: flat[dtype].size - offset for dtype, offset in offsets.items() if offset != flat[dtype].size}
    if unused:
        raise ValueError(f"the arrays hold elements no key accounts for: {unused}")
    return state


def _with(content: RecordDict, **records) -> RecordDict:
    for name, record in records.items():
        content[name] = record
    return content


def to_torch(state: dict) -> dict[str, torch.Tensor]:
    """Numpy tensors to (writable, owned) CPU torch tensors."""
    import numpy as np
    import torch

    return {key: torch.from_numpy(np.array(value, copy=True)) for key, value in state.items()}


def serialized_bytes(obj) -> int:
    """Bytes of an object as Flower serializes it for the wire: its own deflated bytes plus its children's."""
    total = len(obj.deflate())
    for child in (obj.children or {}).values():
        total += serialized_bytes(child)
    return total


# --- server-optimizer state on disk (tensors as safetensors, the rest as JSON) ----------------------------------------
def _save_strategy_state(state: dict | None, tensors_path: Path) -> dict | None:
    from safetensors.torch import save_file

    if state is None:
        return None
    tensors = {f"{buffer}::{key}": t.contiguous()
               for buffer, keys in state["buffers"].items() for key, t in keys.items()}
    if tensors:
        save_file(tensors, str(tensors_path))
    return {**{k: v for k, v in state.items() if k != "buffers"}, "buffer_names": list(state["buffers"])}


def _load_strategy_state(meta: dict | None, tensors_path: Path) -> dict | None:
    from safetensors.torch import load_file

    if meta is None:
        return None
    state = {k: v for k, v in meta.items() if k != "buffer_names"}
    state["buffers"] = {name: {} for name in meta.get("buffer_names", [])}
    if tensors_path.is_file():
        for flat_key, tensor in load_file(str(tensors_path), device="cpu").items():
            buffer, key = flat_key.split("::", 1)
            state["buffers"].setdefault(buffer, {})[key] = tensor
    return state


# --- the ClientApp ---------------------------------------------------------------------------------------------------
client_app = ClientApp()
_SITE_CACHE: dict[str, Any] = {}  # one site per process (a SuperNode starts a ClientApp process per message)


def _site_for(context: Context, settings: dict):
    key = json.dumps([dict(context.node_config), settings], sort_keys=True, default=str)
    if key in _SITE_CACHE:
        return _SITE_CACHE[key]
    import torch

    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.site import Site
    from fl_crew_reddit.training.model_loading import load_base_model, pick_device
    from fl_crew_reddit.training.peft_setup import build_peft_model

    threads = int(context.node_config.get("threads", 0) or 0)
    if threads:
        torch.set_num_threads(threads)
    config = FLCrewRedditConfig(_env_file=None, **settings)
    device = pick_device(config.device)
    base, tokenizer = load_base_model(config, device)
    torch.manual_seed(config.seed)  # the starting adapter; every message overwrites it with the received one
    model = build_peft_model(base, config)
    site = Site.from_folder(str(context.node_config["site"]), Path(str(context.node_config["data-dir"])), model,
                            tokenizer, device, max_seq_length=config.max_seq_length,
                            mixed_precision=config.mixed_precision, show_progress=False, settings=settings)
    _SITE_CACHE.clear()
    _SITE_CACHE[key] = site
    return site


def _settings(message: Message) -> dict:
    settings = dict(message.content["model"])
    settings["lora_target_modules"] = list(settings["lora_target_modules"])
    return settings


@client_app.query()
def _query(message: Message, context: Context) -> Message:
    """`ask: site`: which site this SuperNode serves (its --node-config `site`). `ask: prepare-data`: also the
    counts of its data (examples per split, training tokens, what was dropped and why), preparing the data first
    if its folder has none: the site's own `prepare-site` (its own settings and data source) with the server's
    non-secret choices (subreddits, posts per subreddit, search queries). Counts only: no text leaves the site."""
    name = str(context.node_config["site"])
    config = message.content["config"] if "config" in message.content else ConfigRecord({})
    declared = int(context.node_config.get("lora-r", 0) or 0)  # its own LoRA rank (`site --lora-r`), 0: LORA_R
    content = RecordDict({"site": ConfigRecord({"name": name, **({"lora_r": declared} if declared > 0 else {})})})
    if str(config.get("ask", "site")) == "prepare-data":
        summary = site_data_summary(Path(str(context.node_config["data-dir"])), dict(config))
        content["data"] = ConfigRecord({"summary": json.dumps(summary)})
    elif str(config.get("ask", "site")) == "examples":  # SECURE_AGGREGATION: the train count (SecAgg+'s max_weight)
        folder = Path(str(context.node_config["data-dir"]))
        # the largest weight the site may send: a DPO fit weighs by its train pairs (training/trainer.py)
        content["data"] = ConfigRecord({"train": max(_count_rows(folder / "train.jsonl"),
                                                     _count_rows(folder / "train_pairs.jsonl"))})
    return Message(content, reply_to=message)


def _count_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def site_data_summary(folder: Path, request: dict) -> dict:
    """What a site reports of its data folder, running `prepare-site` there first when it has no train split."""
    if not (folder / "train.jsonl").is_file():
        command = [sys.executable, "-m", "fl_crew_reddit.main", "prepare-site", "--data-dir", str(folder)]
        if request.get("subreddits"):
            command += ["--subreddits", ",".join(str(s) for s in request["subreddits"])]
        if int(request.get("posts_per_subreddit", 0) or 0):
            command += ["--posts", str(int(request["posts_per_subreddit"]))]
        for query in request.get("queries", []) or []:
            command += ["--query", str(query)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=float(request.get("timeout_s", 3600)))
        if done.returncode != 0:
            raise RuntimeError(f"prepare-site failed in {folder}: {(done.stderr or done.stdout).strip()[-1500:]}")
    prepared = folder / "prepared.json"
    summary = json.loads(prepared.read_text(encoding="utf-8")) if prepared.is_file() else {}
    summary["examples"] = {split: _count_rows(folder / f"{split}.jsonl") for split in SPLITS_EVALUATED + ("train",)}
    summary["pairs"] = {split: _count_rows(folder / f"{split}_pairs.jsonl") for split in SPLITS_EVALUATED + ("train",)}
    return summary


def _adapter_bytes(content: RecordDict) -> bytes:
    """A received packed adapter as safetensors bytes for the site's worker, through numpy only (no torch)."""
    import numpy as np
    from safetensors.numpy import save

    return save({key: np.ascontiguousarray(value) for key, value in unpack_adapter(content).items()})


def _fit(content: RecordDict, config: dict, settings: dict, context: Context) -> tuple[dict, int, dict]:
    """(the adapter the site sends, num_examples, numeric metrics) after training from the packed global adapter."""
    worker = str(context.node_config.get("worker", "") or "")
    if worker:  # the site's long-lived worker (federation/site_worker.py) holds the model: hand it the arrays
        from safetensors.numpy import load

        from fl_crew_reddit.federation.site_worker import call_worker

        reply, body = call_worker(worker, {"op": "train", "settings": settings, "config": config},
                                  _adapter_bytes(content))
        return load(body), reply["num_examples"], reply["metrics"]
    site = _site_for(context, settings)
    result = site.fit(to_torch(unpack_adapter(content)), config)
    metrics = {key: value for key, value in result.metrics.items() if isinstance(value, (int, float, str))}
    return result.state, result.num_examples, metrics


@client_app.train(mods=[secaggplus_when_asked])
def _train(message: Message, context: Context) -> Message:
    if is_secure_fit(message):  # SECURE_AGGREGATION: Flower's secaggplus_mod masks what this answers
        def fit(content: RecordDict, config: dict, model: dict) -> tuple[dict, int, dict]:
            settings = dict(model)
            settings["lora_target_modules"] = list(settings["lora_target_modules"])
            return _fit(content, config, settings, context)

        return secure_fit_reply(message, fit)
    state, num_examples, metrics = _fit(message.content, dict(message.content["config"]), _settings(message), context)
    content = pack_adapter(state)
    numbers = {key: value for key, value in metrics.items() if not isinstance(value, str)}
    content["metrics"] = MetricRecord({**numbers, "num-examples": int(num_examples)})
    words = {key: value for key, value in metrics.items() if isinstance(value, str)}
    if words:  # e.g. objective_used, and dpo_skipped's reason: a MetricRecord holds numbers only
        content["info"] = ConfigRecord(words)
    return Message(content, reply_to=message)


@client_app.evaluate()
def _evaluate(message: Message, context: Context) -> Message:
    splits = [str(split) for split in message.content["config"]["splits"]]
    worker = str(context.node_config.get("worker", "") or "")
    if worker:
        from fl_crew_reddit.federation.site_worker import call_worker

        reply, _ = call_worker(worker, {"op": "evaluate", "settings": _settings(message), "splits": splits},
                               _adapter_bytes(message.content))
        sums = {split: (float(t), int(n)) for split, (t, n) in reply["sums"].items()}
        preferences = reply.get("preferences", {})
    else:
        settings = _settings(message)
        site = _site_for(context, settings)
        sums = {split: (value.nll_sum, value.num_tokens)
                for split, value in site.evaluate(to_torch(unpack_adapter(message.content)), tuple(splits)).items()}
        preferences = (site.evaluate_preferences(tuple(splits), float(settings.get("dpo_beta", 0.1)))
                       if settings.get("preference_metrics", "on") != "off" else {})
    metrics = {}
    for split, (total, count) in sums.items():
        metrics[f"{split}.nll_sum"] = float(total)
        metrics[f"{split}.num_tokens"] = int(count)
    for split, values in preferences.items():  # the splits with preference pairs (none: no keys)
        metrics[f"{split}.pref_accuracy"] = float(values["preference_accuracy"])
        metrics[f"{split}.pref_margin"] = float(values["reward_margin"])
        metrics[f"{split}.pref_pairs"] = int(values["pairs"])
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


# --- the ServerApp ---------------------------------------------------------------------------------------------------
server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """One ServerApp run per federation session: it serves the jobs the crew's process queues in the session folder
    (run config `job-dir`) until that process says stop or stops beating (`serve_session`)."""
    serve_session(grid, Path(str(context.run_config["job-dir"])), run_id=int(context.run_id))


def run_job(grid: Grid, job_dir: Path) -> None:
    """Run the job in `job_dir` (a round, a data preparation or an evaluation); its result.json, or its
    server_error.json with the reason."""
    try:
        kind = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8")).get("kind", "round")
        result = {"round": run_server_round, "prepare": run_server_prepare,
                  "evaluate": run_server_evaluate}[kind](grid, job_dir)
    except Exception as error:  # the job fails, the session serves the next one
        log.exception("job %s failed", job_dir.name)
        write_json_atomic(job_dir / "server_error.json", {"error": f"{type(error).__name__}: {error}"})
        return
    write_json_atomic(job_dir / RESULT_FILE, result)


def serve_session(grid: Grid, session_dir: Path, *, run_id: int = 0, poll_s: float = 0.1) -> None:
    """Serve queued jobs in order: `queue/<n>.json` names a job folder, `queue/<n>.stop` ends the session. It also
    ends when the submitting process has not touched `heartbeat` for `heartbeat_timeout_s` (session.json): a
    crashed crew leaves no ServerApp behind for long, and one resumed later starts a session of its own.

    Starting the ServerApp (a process that imports torch & co.) and submitting with `flwr run` took seconds per
    round on 2 cores; a session pays them once."""
    settings = json.loads((session_dir / SESSION_FILE).read_text(encoding="utf-8"))
    timeout_s = float(settings.get("heartbeat_timeout_s", 300.0))
    write_json_atomic(session_dir / "run.json", {"run_id": run_id, "pid": os.getpid()})
    queue = session_dir / "queue"
    beat, last_change = None, time.monotonic()
    print(f"[fl_crew_reddit ServerApp] session {session_dir.name} (run {run_id}) is serving jobs", flush=True)
    while True:
        tickets = sorted(queue.glob("*.json")) + sorted(queue.glob("*.stop"))
        if tickets:
            ticket = tickets[0]
            if ticket.suffix == ".stop":
                print("[fl_crew_reddit ServerApp] session stopped by its submitter", flush=True)
                return
            job_dir = Path(json.loads(ticket.read_text(encoding="utf-8"))["job_dir"])
            print(f"[fl_crew_reddit ServerApp] job {job_dir.name}", flush=True)
            run_job(grid, job_dir)
            ticket.unlink()
            last_change = time.monotonic()
            continue
        try:
            now_beat = (session_dir / HEARTBEAT_FILE).read_text(encoding="utf-8")
        except OSError:
            now_beat = None
        if now_beat != beat:
            beat, last_change = now_beat, time.monotonic()
        elif time.monotonic() - last_change > timeout_s:
            print(f"[fl_crew_reddit ServerApp] no heartbeat from the submitter for {timeout_s:.0f}s: session ends",
                  flush=True)
            return
        time.sleep(poll_s)


def exchange(grid: Grid, messages: list[Message], timeout_s: float, poll_s: float = 0.2) -> list[Message]:
    """Send `messages` and collect their replies until all have come or `timeout_s` has passed. Grid's own
    send_and_receive asks for replies every 3 s; a round waits on two such exchanges, so this one asks every
    `poll_s` (a cheap call to the SuperLink on the same host or network)."""
    waiting = {message_id for message_id in grid.push_messages(messages) if message_id}
    deadline = time.monotonic() + timeout_s
    replies: list[Message] = []
    while waiting:
        pulled = list(grid.pull_messages(list(waiting)))
        replies.extend(pulled)
        waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies


def _site_nodes(grid: Grid, names: list[str], work_dir: Path, timeout_s: float) -> tuple[dict[str, int], dict]:
    """({site: node id} of the sites connected now, {site: why it is unavailable}). Waits up to `timeout_s` for every
    site's SuperNode, then goes on with those connected. A node's site is asked once with a query message and kept
    (a SuperNode with node authentication keeps its id across restarts; one without gets a new id and is asked
    again)."""
    deadline = time.monotonic() + timeout_s
    cache = work_dir / NODES_FILE
    known = ({name: int(node) for name, node in json.loads(cache.read_text()).items()} if cache.is_file() else {})
    found: dict[str, int] = {}
    while True:
        node_ids = set(grid.get_node_ids())
        found = {name: node for name, node in known.items() if node in node_ids}
        unknown = sorted(node_ids - set(found.values()))
        if unknown:
            queries = [Message(RecordDict({"config": ConfigRecord({"ask": "site"})}), dst_node_id=node,
                               message_type=MessageType.QUERY) for node in unknown]
            ranks = site_ranks(work_dir)
            for reply in exchange(grid, queries, max(5.0, deadline - time.monotonic())):
                if not reply.has_error():
                    site = reply.content["site"]
                    found[str(site["name"])] = reply.metadata.src_node_id
                    if "lora_r" in site:
                        ranks[str(site["name"])] = int(site["lora_r"])
                    else:
                        ranks.pop(str(site["name"]), None)
            known.update(found)
            write_json_atomic(cache, known)
            write_json_atomic(work_dir / SITE_RANKS_FILE, ranks)
        if set(names) <= set(found) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    missing = {name: f"its SuperNode is not connected to the SuperLink (waited {timeout_s:.0f}s)"
               for name in names if name not in found}
    return {name: found[name] for name in names if name in found}, missing


def site_ranks(work_dir: Path) -> dict[str, int]:
    """{site: the LoRA rank it declared (`site --lora-r`)} as its query replies said; sites that declared none are
    not in it."""
    path = work_dir / SITE_RANKS_FILE
    return {str(k): int(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()} if path.is_file() else {}


def run_server_prepare(grid: Grid, job_dir: Path) -> dict:
    """Which sites are connected and what data each holds: a prepare-data query to every SuperNode (a site without
    data prepares it now, with its own data source). Waits until `min_sites` have connected (or the timeout)."""
    job = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    timeout_s = float(job.get("timeout_s", 1800))
    deadline = time.monotonic() + float(job.get("connect_timeout_s", 180))
    while len(grid.get_node_ids()) < int(job.get("min_sites", 1)) and time.monotonic() < deadline:
        time.sleep(0.5)
    request = ConfigRecord({"ask": "prepare-data", **job.get("request", {})})
    queries = [Message(RecordDict({"config": request}), dst_node_id=node, message_type=MessageType.QUERY)
               for node in sorted(grid.get_node_ids())]
    sites, failed, nodes = {}, {}, {}
    for reply in exchange(grid, queries, timeout_s):
        if reply.has_error():
            failed[str(reply.metadata.src_node_id)] = (reply.error.reason or "").strip()[-1500:]
            continue
        name = str(reply.content["site"]["name"])
        summary = json.loads(str(reply.content["data"]["summary"]))
        if name in sites:
            failed[name] = f"two SuperNodes serve {name} (nodes {nodes[name]} and {reply.metadata.src_node_id})"
            continue
        sites[name], nodes[name] = summary, reply.metadata.src_node_id
    write_json_atomic(job_dir.parent / NODES_FILE, nodes)
    return {"sites": sites, "failed": failed}


def run_server_evaluate(grid: Grid, job_dir: Path) -> dict:
    """The held-out NLL sums and token counts of one adapter (the job's global.safetensors) on every site."""
    from safetensors.torch import load_file

    job = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    names, timeout_s = list(job["sites"]), float(job.get("timeout_s", 1800))
    nodes, unavailable = _site_nodes(grid, names, job_dir.parent, float(job.get("connect_timeout_s", 180)))
    adapter = load_file(str(job_dir / GLOBAL_IN), device="cpu")
    evaluation, failed = _evaluate_on_sites(grid, nodes, adapter, ConfigRecord(job["model"]), job.get("round", 0),
                                            timeout_s)
    return {"evaluation": evaluation, "evaluation_failed": {**unavailable, **failed}}


def _evaluate_on_sites(grid: Grid, nodes: dict[str, int], adapter: dict, model: ConfigRecord, group: int,
                       timeout_s: float) -> tuple[dict[str, dict[str, list]], dict[str, str]]:
    site_of = {node: name for name, node in nodes.items()}
    evaluate = ConfigRecord({"splits": list(SPLITS_EVALUATED)})
    messages = [Message(_with(pack_adapter(adapter), config=evaluate, model=model),
                        dst_node_id=node, message_type=MessageType.EVALUATE, group_id=str(group))
                for node in nodes.values()]
    evaluation: dict[str, dict[str, list]] = {split: {} for split in SPLITS_EVALUATED}
    failed = {}
    for reply in exchange(grid, messages, timeout_s):
        name = site_of.get(reply.metadata.src_node_id)
        if reply.has_error():
            failed[name] = (reply.error.reason or "").strip()[-1500:]
            continue
        metrics = reply.content["metrics"]
        for split in SPLITS_EVALUATED:
            evaluation[split][name] = [float(metrics[f"{split}.nll_sum"]), int(metrics[f"{split}.num_tokens"])]
            if f"{split}.pref_pairs" in metrics:  # the site has preference pairs in this split
                evaluation.setdefault(PREFERENCES, {}).setdefault(split, {})[name] = {
                    "preference_accuracy": float(metrics[f"{split}.pref_accuracy"]),
                    "reward_margin": float(metrics[f"{split}.pref_margin"]),
                    "pairs": int(metrics[f"{split}.pref_pairs"])}
    for name in nodes:
        if name not in evaluation["test"] and name not in failed:
            failed[name] = f"no evaluation reply from its SuperNode within {timeout_s:.0f}s"
    return evaluation, failed


def run_server_round(grid: Grid, job_dir: Path) -> dict:
    """One round on the SuperNodes with the strategy the job describes; returns the result record (and writes the
    new global adapter, the accepted updates and the server-optimizer state next to it)."""
    from safetensors.torch import load_file, save_file

    from fl_crew_reddit.aggregation import NotEnoughClientsError
    from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings

    started = time.perf_counter()

    def say(text: str) -> None:  # shows in `flwr run --stream`, so in the round's flwr-run.log
        print(f"[fl_crew_reddit ServerApp +{time.perf_counter() - started:.1f}s] {text}", flush=True)

    job = json.loads((job_dir / JOB_FILE).read_text(encoding="utf-8"))
    round_number, names = int(job["round"]), list(job["sites"])
    strategy = FederatedStrategy(StrategySettings.from_dict(job["strategy"]), noise_secret=job.get("noise_secret"))
    strategy.load_state_dict(_load_strategy_state(job.get("strategy_state"), job_dir / OPTIMIZER_IN))
    global_adapter = load_file(str(job_dir / GLOBAL_IN), device="cpu")
    timeout_s = float(job.get("timeout_s", 1800))
    nodes, unavailable = _site_nodes(grid, names, job_dir.parent,
                                     timeout_s=float(job.get("connect_timeout_s", min(timeout_s, 180.0))))
    site_of = {node: name for name, node in nodes.items()}
    say(f"round {round_number}: sites on nodes {nodes}" + (f"; unavailable: {unavailable}" if unavailable else ""))
    model = ConfigRecord(job["model"])
    ranks = strategy.declare_site_ranks(site_ranks(job_dir.parent))  # a site's own rank: ValueError if it cannot mix

    # 1. train: the global adapter and the fit config to each sampled site
    selected = strategy.sample_clients(round_number, names)
    config = ConfigRecord(strategy.fit_config(round_number, names))  # ATTACK: attackers among all sites
    failed: dict[str, str] = {name: unavailable[name] for name in selected if name in unavailable}
    if strategy.settings.secure_aggregation:  # SecAgg+: the server gets the sum only (federation/secagg.py)
        return _run_secure_round(grid, job_dir, strategy, global_adapter, nodes, unavailable, selected, config, model,
                                 failed, timeout_s, say)
    # each site gets the global adapter at its LoRA rank (CLIENT_LORA_RANKS: truncated by SVD for a lower rank)
    sent = {name: Message(_with(pack_adapter(strategy.adapter_for(name, global_adapter)), config=config, model=model),
                          dst_node_id=nodes[name], message_type=MessageType.TRAIN, group_id=str(round_number))
            for name in selected if name in nodes}
    bytes_down = {name: serialized_bytes(message) for name, message in sent.items()}
    replies = {site_of.get(reply.metadata.src_node_id): reply
               for reply in exchange(grid, list(sent.values()), timeout_s)}
    say(f"train replies from {sorted(n for n in replies if n)}")
    clients: dict[str, dict] = {}
    updates = []
    updates_dir = job_dir / "updates"
    updates_dir.mkdir(exist_ok=True)
    for name in sent:
        reply = replies.get(name)
        if reply is None:
            failed[name] = f"no reply from its SuperNode within {timeout_s:.0f}s"
            continue
        if reply.has_error():
            failed[name] = f"ClientApp error {reply.error.code}: {(reply.error.reason or '').strip()[-1500:]}"
            continue
        try:
            state = to_torch(unpack_adapter(reply.content))
            metrics = dict(reply.content["metrics"])
            num_examples = int(metrics.pop("num-examples"))
            if "info" in reply.content:  # the site's words (objective_used, dpo_skipped)
                metrics.update({key: str(value) for key, value in reply.content["info"].items()})
        except (KeyError, TypeError, ValueError) as error:
            failed[name] = f"the reply could not be read as an update: {type(error).__name__}: {error}"
            continue
        updates.append(ClientUpdate(name, state, num_examples))
        save_file({k: v.contiguous() for k, v in state.items()}, str(updates_dir / f"{name}.safetensors"))
        clients[name] = {"num_examples": num_examples, "metrics": metrics, "bytes_down": bytes_down[name],
                         "bytes_up": serialized_bytes(reply)}

    # 2. screen and aggregate (the same strategy object as in-process)
    result: dict = {"round": round_number, "selected": selected, "failed": failed, "clients": clients,
                    "lora_ranks": {name: rank for name, rank in ranks.items() if name in selected}}
    try:
        outcome = strategy.aggregate(global_adapter, updates, num_failed=len(failed), round_number=round_number)
    except NotEnoughClientsError as error:
        result["error"] = str(error)
        return result
    save_file({k: v.contiguous() for k, v in outcome.new_global.items()}, str(job_dir / GLOBAL_OUT))
    result["aggregation"] = {"method": outcome.method, "accepted": outcome.accepted, "rejected": outcome.rejected,
                             "update_norms": outcome.update_norms, "dp_clipped": outcome.dp_clipped,
                             "lora_ranks": outcome.lora_ranks, "discarded_energy": outcome.discarded_energy}
    result["strategy_state"] = _save_strategy_state(strategy.state_dict(), job_dir / OPTIMIZER_OUT)
    silent = [name for name in sent if name not in replies]
    return _evaluate_round(grid, result, outcome, nodes, unavailable, failed, silent, model, timeout_s, say)


def _evaluate_round(grid: Grid, result: dict, outcome: AggregationOutcome, nodes: dict[str, int],
                    unavailable: dict[str, str], failed: dict[str, str], silent: list[str], model: ConfigRecord,
                    timeout_s: float, say) -> dict:
    """3. evaluate the new global adapter on every site's held-out splits (NLL sums and token counts); a site that did
    not answer its train message in time (`silent`) is not waited for again."""
    asked = {name: node for name, node in nodes.items() if name not in silent}
    evaluation, evaluation_failed = _evaluate_on_sites(grid, asked, outcome.new_global, model, result["round"],
                                                       timeout_s)
    evaluation_failed.update({**unavailable, **{name: f"not asked: {failed[name]}" for name in silent}})
    say(f"aggregated ({outcome.method}: accepted {outcome.accepted}, rejected {sorted(outcome.rejected)}, "
        f"failed {sorted(failed)}); evaluated on {sorted(evaluation['test'])}")
    if not evaluation["test"]:
        raise RuntimeError(f"no site evaluated the new global adapter: {evaluation_failed}")
    result["evaluation"] = evaluation
    result["evaluation_failed"] = evaluation_failed
    return result


def _run_secure_round(grid: Grid, job_dir: Path, strategy: FederatedStrategy, global_adapter: dict,
                      nodes: dict[str, int], unavailable: dict[str, str], selected: list[str], config: ConfigRecord,
                      model: ConfigRecord, failed: dict[str, str], timeout_s: float, say) -> dict:
    """A SECURE_AGGREGATION round: the sampled sites train and SecAgg+ gives the server the weighted mean of their
    updates only (federation/secagg.py); the strategy turns that mean into the new global adapter. No individual
    update is received, written (no `updates` folder) or seen by the strategy. Too few clients to reconstruct the
    sum: the result's error (the run stops with its state saved), never a model made from part of it."""
    import torch
    from safetensors.torch import save_file

    from fl_crew_reddit.aggregation import NotEnoughClientsError
    from fl_crew_reddit.federation.secagg import SecAggFailed, run_secure_round

    round_number = int(config["round"])
    sampled = {name: nodes[name] for name in selected if name in nodes}
    expected = strategy.expected_update(global_adapter)
    keys = sorted(expected)
    result: dict = {"round": round_number, "selected": selected, "failed": failed, "clients": {}}
    try:
        secure = run_secure_round(grid, sampled, round_number, pack_adapter(global_adapter), dict(config),
                                  dict(model), keys, strategy.settings, timeout_s, exchange, serialized_bytes)
    except SecAggFailed as error:
        say(str(error))
        result["error"] = str(error)
        for name in selected:  # none of them is in a model: each one's outcome names the round's error
            failed.setdefault(name, f"its SecAgg+ round could not be completed: {error}")
        return result
    failed.update(secure.failed)
    result["clients"] = secure.clients
    say(f"SecAgg+ sum of {len(secure.in_sum)} clients: {secure.in_sum}")
    mean, offset = {}, 0
    for key in keys:
        size = expected[key].numel()
        mean[key] = torch.from_numpy(secure.mean[offset:offset + size].copy()).reshape(expected[key].shape)
        offset += size
    if offset != secure.mean.size:
        raise ValueError(f"the SecAgg+ sum has {secure.mean.size} elements, the adapter's update {offset}")
    try:
        outcome = strategy.aggregate_secure(global_adapter, mean, secure.in_sum, num_failed=len(failed),
                                            round_number=round_number)
    except NotEnoughClientsError as error:
        result["error"] = str(error)
        return result
    save_file({k: v.contiguous() for k, v in outcome.new_global.items()}, str(job_dir / GLOBAL_OUT))
    result["aggregation"] = {"method": outcome.method, "accepted": outcome.accepted, "rejected": outcome.rejected,
                             "update_norms": {}, "dp_clipped": [],
                             "secure_aggregation": {**secure.parameters.to_dict(),
                                                    "clients_in_sum": len(secure.in_sum)}}
    result["strategy_state"] = _save_strategy_state(strategy.state_dict(), job_dir / OPTIMIZER_OUT)
    silent = [name for name in sampled if name not in secure.in_sum and name in failed and "no reply" in failed[name]]
    return _evaluate_round(grid, result, outcome, nodes, unavailable, failed, silent, model, timeout_s, say)


# --- what the workspace gets back -------------------------------------------------------------------------------------
@dataclass
class SiteResult:
    state: dict | None  # None under SECURE_AGGREGATION: the server never has a client's update
    num_examples: int
    metrics: dict


@dataclass
class FlowerRoundOutcome:
    round: int
    selected: list[str]
    failed: dict[str, str]
    results: dict[str, SiteResult]
    aggregation: AggregationOutcome | None
    error: str | None
    evaluation: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    strategy_state: dict | None = None
    evaluation_failed: dict[str, str] = field(default_factory=dict)  # sites left out of this round's evaluation
    lora_ranks: dict[str, int] = field(default_factory=dict)  # sampled sites below LORA_R -> their rank

    def take_aggregation(self, method: str) -> AggregationOutcome:
        """The ServerApp's aggregation; NotEnoughClientsError when it had too few accepted updates."""
        from fl_crew_reddit.aggregation import NotEnoughClientsError

        if self.error is not None:
            raise NotEnoughClientsError(self.error)
        if method != self.aggregation.method:
            log.warning("Round %d: the ServerApp aggregated with %s; switching a Flower round to %s is not supported "
                        "yet", self.round, self.aggregation.method, method)
        return self.aggregation


def parse_evaluation(raw: dict) -> dict:
    """The sites' evaluation as a ServerApp result holds it: {split: {site: (NLL sum, tokens)}}, and under
    PREFERENCES {split: {site: preference_metrics}} where sites have preference pairs."""
    evaluation: dict = {split: {name: (float(t), int(n)) for name, (t, n) in sums.items()}
                        for split, sums in raw.items() if split != PREFERENCES}
    if raw.get(PREFERENCES):
        evaluation[PREFERENCES] = {split: dict(sites) for split, sites in raw[PREFERENCES].items()}
    return evaluation


def read_outcome(job_dir: Path) -> FlowerRoundOutcome:
    from safetensors.torch import load_file

    from fl_crew_reddit.server.strategy import AggregationOutcome

    result = json.loads((job_dir / RESULT_FILE).read_text(encoding="utf-8"))
    results = {}
    for name, entry in result["clients"].items():
        metrics = {**entry["metrics"], "bytes_down": entry["bytes_down"], "bytes_up": entry["bytes_up"]}
        update = job_dir / "updates" / f"{name}.safetensors"  # none under SecAgg+: the server has the sum only
        results[name] = SiteResult(load_file(str(update), device="cpu") if update.is_file() else None,
                                   entry["num_examples"], metrics)
    aggregation = None
    if "aggregation" in result:
        entry = result["aggregation"]
        aggregation = AggregationOutcome(method=entry["method"],
                                         new_global=load_file(str(job_dir / GLOBAL_OUT), device="cpu"),
                                         accepted=entry["accepted"], rejected=entry["rejected"],
                                         update_norms=entry["update_norms"], dp_clipped=entry.get("dp_clipped", []),
                                         lora_ranks=entry.get("lora_ranks", {}),
                                         discarded_energy=entry.get("discarded_energy"),
                                         secure_aggregation=entry.get("secure_aggregation"))
    evaluation = parse_evaluation(result.get("evaluation", {}))
    return FlowerRoundOutcome(
        round=result["round"], selected=result["selected"], failed=result["failed"], results=results,
        aggregation=aggregation, error=result.get("error"), evaluation=evaluation,
        evaluation_failed=result.get("evaluation_failed", {}), lora_ranks=result.get("lora_ranks", {}),
        strategy_state=_load_strategy_state(result.get("strategy_state"), job_dir / OPTIMIZER_OUT))


# --- the local deployment: SuperLink + SuperNodes on 127.0.0.1 --------------------------------------------------------
PORT_ATTEMPTS = 3  # starts of a Flower process that lost its port to another process before it could bind it


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise FlowerRunFailed(f"{name} is not installed next to {sys.executable}: pip install flwr==1.39.0")
    return found


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    except OSError:
        return "(no log)"


_RUNNING: set[LocalFlowerFederation] = set()


def stop_all() -> None:
    """Stop every federation this process started (Ctrl+C, interpreter exit)."""
    for federation in list(_RUNNING):
        federation.stop()


atexit.register(stop_all)


def _descendants(roots: list[int]) -> list[int]:
    """Every live process below `roots` (read from /proc; [] where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _identity(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc/PID/stat; None when it is gone. The start time tells a process
    from a later one that reused its id."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def identities(pids) -> dict[int, int]:
    """{id: start time} of the live processes among `pids`."""
    return {pid: identity[1] for pid in pids if (identity := _identity(pid)) is not None}


def kill_and_wait(pids, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL the processes `pids` (ids, or {id: start time} as `identities` noted them, so that an id reused since
    is left alone) and every process they start meanwhile, and wait until all have exited (gone or
    a zombie), so that none is still running when this returns. Returns the ids still running after `timeout_s`
    (logged; [] normally). A signal is only asynchronous delivery: without the wait a killed process can still be
    alive, and still hold its ports and files, for a moment under load."""
    tracked = dict(pids) if isinstance(pids, dict) else identities(pids)
    deadline = time.monotonic() + timeout_s
    while True:
        for child in _descendants(list(tracked)):
            if child not in tracked and (identity := _identity(child)) is not None:
                tracked[child] = identity[1]
        running = [pid for pid, started in tracked.items()
                   if (identity := _identity(pid)) is not None and identity[1] == started and identity[0] not in "ZX"]
        if not running:
            return []
        if time.monotonic() >= deadline:
            log.warning("Processes still running %.0fs after SIGKILL: %s", timeout_s, running)
            return running
        for pid in running:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def explain_supernode_failure(log_text: str, superlink: str) -> str | None:
    """One clear sentence for the ways a SuperNode fails to join, read from its log (None: not one of them)."""
    text = log_text[-20000:]
    if "handshake" in text.lower() or "CERTIFICATE_VERIFY_FAILED" in text or "BAD_SIGNATURE" in text:
        return (f"TLS handshake with the SuperLink at {superlink} failed: its certificate is not signed by this "
                "site's CA (ca.crt of --certs / FLOWER_CERTS) or does not name that host; use the certificate "
                "folder made for this federation")
    if "Failed to activate SuperNode" in text or "code: 2004" in text:
        return (f"the SuperLink at {superlink} refused this node: its public key is not registered (register the "
                "site's <site>.pub on the SuperLink side: `flwr supernode register <site>.pub`, or put it in the "
                "SuperLink's --certs folder before `superlink` starts), or a node with this key is still online "
                "(a restarted node is let in once the old one has missed two 30-second heartbeats)")
    if "failed to connect to all addresses" in text or "Connection refused" in text:
        return f"no SuperLink answers at {superlink} (is it running, and is that its Fleet API address?)"
    return None


def flwr_environment(home: Path) -> dict[str, str]:
    """Variables the Flower processes need on top of the inherited environment (only config.py reads it)."""
    return {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_HOME": str(home),
            "PYTHONUNBUFFERED": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # start app processes sooner
            # the SuperLink and SuperNodes start flower-superexec, flwr-serverapp, flwr-clientapp by name
            "PATH": os.pathsep.join([str(Path(_executable("flower-superlink")).parent), SYSTEM_PATH]),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # fl_crew_reddit, for the apps


def with_env(command: list[str], home: Path) -> list[str]:
    """`command` run through `env` with `flwr_environment` added to the inherited environment."""
    return [shutil.which("env") or "/usr/bin/env", *(f"{k}={v}" for k, v in flwr_environment(home).items()),
            *command]


def write_flwr_config(home: Path, control_address: str, root_certificates: Path | None) -> None:
    """FLWR_HOME/config.toml naming the SuperLink (`local`) that `flwr run` / `flwr supernode` talk to."""
    home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{Path(root_certificates).resolve()}"\n' if root_certificates
                else "insecure = true\n")
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "{control_address}"\n{security}', encoding="utf-8")


def register_site_key(home: Path, public_key: Path, name: str, timeout_s: float = 60.0) -> str:
    """`flwr supernode register` one site's public key with the SuperLink of FLWR_HOME; returns its node id."""
    done = subprocess.run(with_env([_executable("flwr"), "supernode", "register", str(public_key), "local",
                                    "--name", name, "--format", "json"], home),
                          capture_output=True, text=True, timeout=timeout_s)
    output = (done.stdout or "") + (done.stderr or "")
    if done.returncode != 0 or "error" in output.lower() and "success" not in output.lower():
        if "already" in output.lower():
            return ""
        raise FlowerRunFailed(f"registering {name}'s key {public_key} with the SuperLink failed:\n{output[-2000:]}")
    try:
        return str(json.loads(output[output.index("{"):]).get("node-id", ""))
    except ValueError:
        return ""


class FlowerFederation:
    """A Flower federation this process submits rounds to: a SuperLink's Control API at `control_address`,
    verified with `root_certificates` (the federation's ca.crt), or insecure on loopback only.

    `flwr run` starts the ServerApp inside the SuperLink's process tree, and it reads the round's job folder
    (`work_dir/round-N`) from disk: the submitting process and the SuperLink share that folder (the same machine,
    or the same volume mounted at the same path; deploy/compose.yaml)."""

    def __init__(self, sites: list[str] | dict[str, Path], work_dir: Path, *, control_address: str = "",
                 root_certificates: Path | None = None, round_timeout_s: float = 1800.0,
                 connect_timeout_s: float | None = None):
        self.sites = ({name: Path(folder).resolve() for name, folder in sites.items()} if isinstance(sites, dict)
                      else {name: None for name in sites})
        self.work_dir = Path(work_dir).resolve()
        self.control_address = control_address
        self.root_certificates = Path(root_certificates) if root_certificates else None
        self.round_timeout_s = round_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.home = self.work_dir / "flwr-home"
        self.essential = ("superlink",)  # processes whose death ends the run (a dead SuperNode loses one client)
        self.heartbeat_timeout_s = 300.0  # a session whose submitter went silent this long ends itself
        self._session: subprocess.Popen | None = None
        self._session_dir: Path | None = None
        self._beating = None
        self._beats = self._tickets = 0

    def connect(self) -> FlowerFederation:
        """Check the Control API answers (TLS with the given CA, else insecure on loopback)."""
        host, _, port = self.control_address.rpartition(":")
        if not host or not port.isdigit():
            raise FlowerRunFailed(f"SUPERLINK_ADDRESS={self.control_address!r} is not host:port of the SuperLink's "
                                  "Control API (default port 9093)")
        if self.root_certificates is None and host not in ("127.0.0.1", "localhost", "::1"):
            raise FlowerRunFailed(f"an insecure connection to {self.control_address} is refused: only loopback may "
                                  "go without TLS (set FLOWER_CERTS to the federation's certificate folder)")
        if self.root_certificates is not None and not self.root_certificates.is_file():
            raise FlowerRunFailed(f"the federation's CA certificate {self.root_certificates} does not exist")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=10.0):
                pass
        except OSError as error:
            raise FlowerRunFailed(f"no SuperLink Control API answers at {self.control_address}: {error}") from error
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_flwr_config(self.home, self.control_address, self.root_certificates)
        return self

    def start(self) -> FlowerFederation:
        return self.connect()

    def _with_env(self, command: list[str]) -> list[str]:
        return with_env(command, self.home)

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.work_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log_path
        with log_path.open("ab") as out:
            # a process group of its own, so stop() also ends the superexec and app processes it starts
            self.processes[name] = subprocess.Popen(self._with_env(command), stdout=out, stderr=subprocess.STDOUT,
                                                    cwd=self.work_dir, start_new_session=True)

    def _dead_essentials(self) -> dict[str, int]:
        return {name: p.returncode for name, p in self.processes.items()
                if name in self.essential and p.poll() is not None}

    def _job_dir(self, name: str) -> Path:
        """A new, empty folder for one job: `work_dir/name`, or `name.<token>` when an earlier attempt left one.

        A crew killed mid-round leaves its ServerApp session finishing that round; the ServerApp writes into the
        folder by path. Reusing the path let such a late write (its result.json) land in the resumed round's folder
        and be read as this round's result. So the stale session is stopped first, earlier attempts' folders are
        removed, and this job gets a path no earlier ServerApp was ever given."""
        dead = self._dead_essentials()
        if dead:
            raise FlowerRunFailed(f"the federation is not running (exited: {dead})\n" + self.log_tails())
        if not self._session_alive():
            self._stop_stale_session()
        earlier = [p for p in self.work_dir.glob(f"{name}*") if p.name == name or p.name.startswith(f"{name}.")]
        for folder in earlier:
            shutil.rmtree(folder, ignore_errors=True)
        job_dir = self.work_dir / (f"{name}.{uuid.uuid4().hex[:8]}" if earlier else name)
        job_dir.mkdir(parents=True)
        return job_dir

    def _timeouts(self) -> dict:
        return {"timeout_s": self.round_timeout_s,
                **({"connect_timeout_s": self.connect_timeout_s} if self.connect_timeout_s is not None else {})}

    # --- the ServerApp session: one `flwr run` serving every job of this federation -----------------------------
    def _session_alive(self) -> bool:
        return self._session is not None and self._session.poll() is None

    def _ensure_session(self) -> Path:
        """The folder of a running ServerApp session, starting one (`flwr run <app> local --stream`) if none runs.
        A session an earlier process of this work folder left (it crashed, or was killed) is stopped first."""
        if self._session_alive():
            return self._session_dir
        if self._session is not None:
            raise FlowerRunFailed(f"the ServerApp session ended (flwr run exited with {self._session.returncode}):\n"
                                  f"{_tail(self._session_dir / 'flwr-run.log')}\n{self.log_tails()}")
        self._stop_stale_session()
        sessions = self.work_dir / "sessions"
        number = 1 + max((int(p.name) for p in sessions.glob("[0-9]*") if p.name.isdigit()), default=0)
        self._session_dir = sessions / str(number)
        (self._session_dir / "queue").mkdir(parents=True)
        write_json_atomic(self._session_dir / SESSION_FILE, {"heartbeat_timeout_s": self.heartbeat_timeout_s})
        self._beat()
        write_json_atomic(self.work_dir / "session.json", {"dir": str(self._session_dir)})
        command = [_executable("flwr"), "run", str(APP_DIR), "local", "--stream",
                   "--run-config", f'job-dir="{self._session_dir}"']
        with (self._session_dir / "flwr-run.log").open("wb") as out:
            self._session = subprocess.Popen(self._with_env(command), cwd=self.work_dir, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        import threading

        self._beating = threading.Event()
        threading.Thread(target=self._keep_beating, args=(self._beating,), daemon=True,
                         name="flower-session-heartbeat").start()
        return self._session_dir

    def _beat(self) -> None:
        self._beats += 1
        (self._session_dir / HEARTBEAT_FILE).write_text(f"{os.getpid()}:{self._beats}", encoding="utf-8")

    def _keep_beating(self, stop) -> None:
        while not stop.wait(min(5.0, self.heartbeat_timeout_s / 4)):
            try:
                self._beat()
            except OSError:
                return

    def _stop_stale_session(self) -> None:
        """Stop the ServerApp run of a session an earlier process started here (`flwr stop <run id>`), so that it
        does not keep sending messages to the sites next to this one's."""
        marker = self.work_dir / "session.json"
        if not marker.is_file():
            return
        run_file = Path(json.loads(marker.read_text(encoding="utf-8"))["dir"]) / "run.json"
        if run_file.is_file():
            run_id = json.loads(run_file.read_text(encoding="utf-8"))["run_id"]
            done = subprocess.run(self._with_env([_executable("flwr"), "stop", str(run_id), "local"]),
                                  capture_output=True, text=True, timeout=60)
            log.info("Stopped the ServerApp run %s left by an earlier process (flwr stop: exit %d)", run_id,
                     done.returncode)
        marker.unlink()

    def _stop_session(self) -> None:
        """Ask the session's ServerApp to end (a stop ticket) and wait for `flwr run` to return; kill it after 20 s."""
        if self._session is None:
            return
        self._beating.set()
        if self._session.poll() is None:
            write_json_atomic(self._session_dir / "queue" / f"{2**31:010d}.stop", {})
            try:
                self._session.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._session.pid, signal.SIGKILL)
                self._session.wait()
        marker = self.work_dir / "session.json"
        if marker.is_file():
            marker.unlink()
        self._session = None

    def _submit(self, job_dir: Path, job: dict, label: str) -> dict:
        """Queue the job for the session's ServerApp and return its result; FlowerRunFailed with the logs of the
        SuperLink, the SuperNodes and the session's `flwr run` otherwise."""
        write_json_atomic(job_dir / JOB_FILE, job)
        session = self._ensure_session()
        self._tickets += 1
        ticket = session / "queue" / f"{self._tickets:010d}.json"
        write_json_atomic(ticket, {"job_dir": str(job_dir)})
        limit_s = 2 * self.round_timeout_s + (self.connect_timeout_s or 180.0) + 300
        started = time.perf_counter()
        problem = None
        result, error = job_dir / RESULT_FILE, job_dir / "server_error.json"
        while not (result.is_file() or error.is_file()):  # watch the deployment meanwhile: a dead SuperLink fails it
            dead = self._dead_essentials()
            if dead:
                problem = f"exited during the {label}: {dead}"
            elif not self._session_alive():
                problem = f"the ServerApp session ended (flwr run exited with {self._session.returncode})"
            elif time.perf_counter() - started > limit_s:
                problem = f"no result after {limit_s:.0f}s"
            if problem:
                ticket.unlink(missing_ok=True)
                break
            time.sleep(0.1)
        if not result.is_file():
            reason = json.loads(error.read_text())["error"] if error.is_file() else "no result"
            raise FlowerRunFailed(f"{label} on Flower failed ({problem or reason}).\n--- flwr run (ServerApp):\n"
                                  f"{_tail(session / 'flwr-run.log', 4000)}\n{self.log_tails()}")
        log.info("The %s ran on Flower in %.1fs", label, time.perf_counter() - started)
        return json.loads(result.read_text(encoding="utf-8"))

    def run_round(self, round_number: int, strategy: FederatedStrategy, global_adapter: dict,
                  model: dict) -> FlowerRoundOutcome:
        """One federated round on the SuperNodes (train, screen and aggregate, evaluate); its outcome."""
        from safetensors.torch import save_file

        job_dir = self._job_dir(f"round-{round_number}")
        save_file({k: v.contiguous() for k, v in global_adapter.items()}, str(job_dir / GLOBAL_IN))
        job = {"kind": "round", "round": round_number, "sites": list(self.sites),
               "strategy": strategy.settings.to_dict(), "noise_secret": strategy.noise_secret,
               "strategy_state": _save_strategy_state(strategy.state_dict(), job_dir / OPTIMIZER_IN),
               "model": _plain(model), **self._timeouts()}
        self._submit(job_dir, job, f"round {round_number}")
        return read_outcome(job_dir)

    def prepare(self, request: dict, min_sites: int = 1) -> dict[str, dict]:
        """{site: what it reports of its data} from every connected site (a site without data prepares it now);
        the sites found become this federation's sites. FlowerRunFailed when none answers."""
        job_dir = self._job_dir("prepare")
        result = self._submit(job_dir, {"kind": "prepare", "request": request, "min_sites": min_sites,
                                        **self._timeouts()}, "data preparation")
        for node, reason in result["failed"].items():
            log.warning("Data preparation failed at %s: %s", node, reason)
        if not result["sites"]:
            raise FlowerRunFailed(f"no site reported data (failures: {result['failed'] or 'none'}); are the sites "
                                  "connected to the SuperLink?\n" + self.log_tails())
        self.sites = {name: self.sites.get(name) for name in sorted(result["sites"])}
        return {name: result["sites"][name] for name in sorted(result["sites"])}

    def evaluate(self, adapter: dict, model: dict, label: str = "base") -> tuple[dict, dict[str, str]]:
        """(the sites' NLL sums and token counts per split, {site: why it did not evaluate}) for one adapter."""
        from safetensors.torch import save_file

        job_dir = self._job_dir(f"evaluate-{label}")
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(job_dir / GLOBAL_IN))
        result = self._submit(job_dir, {"kind": "evaluate", "sites": list(self.sites), "model": _plain(model),
                                        **self._timeouts()}, f"evaluation ({label})")
        return parse_evaluation(result["evaluation"]), result["evaluation_failed"]

    def log_tails(self, limit: int = 3000) -> str:
        return "\n".join(f"--- {name} ({path}):\n{_tail(path, limit)}" for name, path in self.logs.items())

    def stop(self) -> None:
        """Stop every process group this federation started (SIGTERM, then SIGKILL after 10 s), and any process
        they started that left its group (Flower's app processes may run in sessions of their own)."""
        try:
            self._stop_session()
        except OSError as error:
            log.warning("Could not stop the ServerApp session cleanly: %s", error)
        leaders = [p.pid for p in self.processes.values() if p.poll() is None]
        descendants = identities(leaders + _descendants(leaders))
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may hold children (superexec, app processes) after its leader is gone
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        kill_and_wait(descendants)
        self.processes = {}
        _RUNNING.discard(self)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalFlowerFederation(FlowerFederation):
    """A SuperLink and one SuperNode per site on 127.0.0.1, as child process groups. TLS with SuperNode
    authentication by default (a CA, the SuperLink's certificate and one key pair per site made in
    `work_dir/certs`; each site's public key registered before its node starts); `insecure=True` runs without TLS
    (loopback only)."""

    def __init__(self, sites: dict[str, Path], work_dir: Path, *, host: str = "127.0.0.1",
                 threads_per_site: int | None = None, round_timeout_s: float = 1800.0, site_workers: bool = True,
                 share_cores: bool | None = None,
                 insecure: bool = False, connect_timeout_s: float | None = None):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the local federation binds to the loopback interface only")
        super().__init__(sites, work_dir, round_timeout_s=round_timeout_s, connect_timeout_s=connect_timeout_s)
        self.host = host
        self.insecure = insecure
        # Sites on one machine: when they outnumber its cores, they take turns, each on all cores (the in-process
        # engine's schedule); three 1-thread sites at once on 2 cores trained ~1.3x slower than that.
        cores = os.cpu_count() or 1
        self.share_cores = (site_workers and len(self.sites) > cores) if share_cores is None else share_cores
        self.threads = threads_per_site or (cores if self.share_cores else max(1, cores // max(1, len(self.sites))))
        self.site_workers = site_workers  # a long-lived compute process per site (site_worker.py); else per message
        self.certs = self.work_dir / "certs"
        self.control_port = self.fleet_port = None
        self._socket_dir: Path | None = None
        self._sockets: dict[str, Path] = {}

    def start(self) -> LocalFlowerFederation:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _RUNNING.add(self)
        self.control_port, self.fleet_port = free_port(self.host), free_port(self.host)
        self.control_address = f"{self.host}:{self.control_port}"
        try:
            security = ["--insecure"]
            if not self.insecure:
                from fl_crew_reddit.federation.certs import CA_CERT, SERVER_CERT, SERVER_KEY, make_certs

                make_certs(self.certs, list(self.sites), [self.host], overwrite=True)
                self.root_certificates = self.certs / CA_CERT
                security = ["--ssl-ca-certfile", str(self.certs / CA_CERT), "--ssl-certfile",
                            str(self.certs / SERVER_CERT), "--ssl-keyfile", str(self.certs / SERVER_KEY),
                            "--enable-supernode-auth"]
            for attempt in range(1, PORT_ATTEMPTS + 1):
                write_flwr_config(self.home, self.control_address, self.root_certificates)
                offset = self._log_size("superlink")
                self._spawn("superlink", [_executable("flower-superlink"), *security,
                                          "--fleet-api-address", f"{self.host}:{self.fleet_port}", "--host",
                                          self.host, "--port", str(self.control_port),
                                          "--disable-runtime-dependency-installation"])
                try:
                    self._wait_for_port(self.control_port, "superlink")
                    break
                except FlowerRunFailed:
                    if attempt == PORT_ATTEMPTS or not self._lost_port_race("superlink", offset):
                        raise
                log.warning("SuperLink: a port it was given was taken in the meantime (attempt %d of %d); "
                            "starting it on new ports", attempt, PORT_ATTEMPTS)
                self.control_port, self.fleet_port = free_port(self.host), free_port(self.host)
                self.control_address = f"{self.host}:{self.control_port}"
            if self.site_workers:  # one process per site, forked from one that imported torch & co. once
                import tempfile

                self._socket_dir = Path(tempfile.mkdtemp(prefix="flcrew-"))  # short (sockets: <108 bytes), 0700
                self._sockets = {name: self._socket_dir / f"site-{index}.sock"
                                 for index, name in enumerate(self.sites)}
                self._spawn("sites", [sys.executable, "-m", "fl_crew_reddit.federation.site_worker",
                                      "--threads", str(self.threads)]
                            + (["--share-cores", str(self._socket_dir / "cores.lock")] if self.share_cores else [])
                            + [f"--site={name}={folder}={self._sockets[name]}" for name, folder in self.sites.items()])
            if not self.insecure:  # each `flwr supernode register` is a CLI process (~2 s): all at once
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=len(self.sites)) as pool:
                    list(pool.map(lambda name: register_site_key(self.home, self.certs / f"{name}.pub", name),
                                  self.sites))
            offsets = {name: self._log_size(f"supernode-{name}") for name in self.sites}
            for name in self.sites:
                self.start_node(name)
            self._await_nodes(offsets)
        except BaseException:
            self.stop()
            raise
        log.info("Flower federation: SuperLink on %s:%d (fleet %d, %s), %d SuperNodes; logs in %s", self.host,
                 self.control_port, self.fleet_port, "insecure" if self.insecure else "TLS + node authentication",
                 len(self.sites), self.work_dir / "logs")
        return self

    def node_command(self, name: str, folder: Path, *, key: Path | None = None, ca: Path | None = None) -> list[str]:
        """flower-supernode for site `name` (its data folder, its worker socket, its key and the CA)."""
        node_config = f'site="{name}" data-dir="{folder}" threads={self.threads}'
        if name in self._sockets:
            node_config += f' worker="{self._sockets[name]}"'
        security = ["--insecure"] if self.insecure else [
            "--root-certificates", str(ca or self.certs / "ca.crt"),
            "--auth-supernode-private-key", str(key or self.certs / f"{name}.key")]
        return [_executable("flower-supernode"), *security, "--superlink", f"{self.host}:{self.fleet_port}",
                "--node-config", node_config, "--host", self.host, "--port", str(free_port(self.host)),
                "--max-retries", "3", "--max-wait-time", "30"]

    def start_node(self, name: str, **options) -> subprocess.Popen:
        """Start (or restart) the SuperNode of site `name`; returns its process."""
        self._spawn(f"supernode-{name}", self.node_command(name, self.sites[name], **options))
        return self.processes[f"supernode-{name}"]

    def _log_size(self, name: str) -> int:
        path = self.logs.get(name) or self.work_dir / "logs" / f"{name}.log"
        return path.stat().st_size if path.is_file() else 0

    def _lost_port_race(self, name: str, offset: int) -> bool:
        """Whether process `name` exited because a port it was given was bound by someone else first: `free_port`
        hands out a port the system has just freed, and another federation or any client's outgoing connection
        can take it before the process binds it."""
        process = self.processes[name]
        if process.poll() is None:
            return False
        with self.logs[name].open("rb") as handle:
            handle.seek(offset)
            return b"address already in use" in handle.read().lower()

    def _await_nodes(self, offsets: dict[str, int], timeout_s: float = 60.0) -> None:
        """Wait until each SuperNode has joined (its log says "SuperNode ID") or has exited. One that exited because
        its port was taken meanwhile is started again on a new port (up to PORT_ATTEMPTS times); one that exited for
        another reason, or is still connecting at the deadline, is left to the round, which reports it per site."""
        pending, attempts = dict(offsets), dict.fromkeys(offsets, 1)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for name, offset in list(pending.items()):
                process = self.processes[f"supernode-{name}"]
                with self.logs[f"supernode-{name}"].open("rb") as handle:
                    handle.seek(offset)
                    joined = b"SuperNode ID" in handle.read()
                if joined:
                    del pending[name]
                elif process.poll() is not None:
                    if attempts[name] < PORT_ATTEMPTS and self._lost_port_race(f"supernode-{name}", offset):
                        attempts[name] += 1
                        log.warning("SuperNode of %s: its port was taken in the meantime; starting it again on a "
                                    "new port (attempt %d of %d)", name, attempts[name], PORT_ATTEMPTS)
                        pending[name] = self._log_size(f"supernode-{name}")
                        self.start_node(name)
                    else:
                        del pending[name]
            time.sleep(0.1)

    def kill_node(self, name: str) -> None:
        """SIGKILL a site's SuperNode and the processes it started (a node lost mid-round)."""
        process = self.processes[f"supernode-{name}"]
        helpers = identities(_descendants([process.pid]))  # superexec, apps: sessions of their own
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
        kill_and_wait(helpers)

    def restart_dead_nodes(self, timeout_s: float = 200.0) -> list[str]:
        """Start again every site whose SuperNode died and wait until each has joined (its log says "SuperNode
        ID"), so the next round reaches it. With node authentication the SuperLink refuses a second activation of
        the same key until the old session has missed two 30-second heartbeats: a refused start is tried again
        every 5 s, for up to `timeout_s`."""
        dead = [name for name in self.sites
                if (p := self.processes.get(f"supernode-{name}")) is not None and p.poll() is not None]
        deadline = time.monotonic() + timeout_s
        for name in dead:
            log.warning("SuperNode of %s had exited (%s); starting it again", name,
                        self.processes[f"supernode-{name}"].returncode)
            while True:
                log_path = self.logs[f"supernode-{name}"]
                offset = log_path.stat().st_size if log_path.is_file() else 0
                process = self.start_node(name)
                while process.poll() is None and time.monotonic() < deadline:
                    with log_path.open("rb") as handle:
                        handle.seek(offset)
                        if b"SuperNode ID" in handle.read():
                            break
                    time.sleep(0.2)
                if process.poll() is None or time.monotonic() >= deadline:
                    break
                time.sleep(5.0)
            if process.poll() is not None:
                log.warning("SuperNode of %s could not rejoin: %s", name, explain_supernode_failure(
                    _tail(self.logs[f"supernode-{name}"]), f"{self.host}:{self.fleet_port}") or "see its log")
        return dead

    def run_round(self, round_number: int, strategy: FederatedStrategy, global_adapter: dict,
                  model: dict) -> FlowerRoundOutcome:
        self.restart_dead_nodes()  # a node lost in an earlier round rejoins this one
        return super().run_round(round_number, strategy, global_adapter, model)

    def stop(self) -> None:
        super().stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _wait_for_port(self, port: int, name: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise FlowerRunFailed(f"{name} exited with {self.processes[name].returncode}:\n"
                                      f"{_tail(self.logs[name])}")
            try:
                with socket.create_connection((self.host, port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.2)
        raise FlowerRunFailed(f"{name} did not listen on {self.host}:{port} within {timeout_s:.0f}s:\n"
                              f"{_tail(self.logs[name])}")

