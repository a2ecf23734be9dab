"""Resume that trusts nothing it reads, and crash safety from the first second (issue 14, items 1 and 2).

Unit tests write states with `run_state.save_state` on small tensors and then damage them the ways a crash, a full
disk, a careless move or an attacker would; the end-to-end tests stop the real loop (tiny model) inside collection,
the base evaluation and round 1, resume it, and compare the final adapter with a run left alone."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fl_crew_reddit.aggregation import GlobalAdapterError
from fl_crew_reddit.run_state import (
    GLOBAL_WEIGHTS,
    SERVER_OPTIMIZER_WEIGHTS,
    STATE_FILE,
    NothingSaved,
    SavedState,
    find_run,
    load_state,
    save_state,
    state_dir,
)
from fl_crew_reddit.runs import RunPaths, point_latest
from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings

# the end-to-end runs here compare adapters and states, not model quality: one epoch on 8 examples, no generated samples
SMALL_RUN = {"eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 8}
REFERENCE = {"layer.lora_A.weight": torch.zeros(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}


def _adapter(scale: float = 0.1) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, scale) for k, v in REFERENCE.items()}


def _history(paths: RunPaths) -> dict:
    shard = paths.base / "data" / "training" / paths.run_id / "client_0"
    return {"run_id": paths.run_id,
            "collection": {"server": "mcp", "subreddits": [{"subreddit": "books", "num_posts": 1, "num_comments": 2,
                                                            "path": str(paths.collected / "books.json")}]},
            "data": {"clients": [{"name": "client_0", "train_path": str(shard / "train.jsonl"),
                                  "test_path": str(shard / "test.jsonl"), "validation_path": None}]},
            "rounds": [], "best_adapter": None}


def _save(paths: RunPaths, round_number: int, *, stage: str = "round", total: int = 3, adapter=None,
          optimizer: dict | None = None) -> Path:
    state = SavedState(stage=stage, round=round_number, total_rounds=total, history=_history(paths), settings={})
    return save_state(paths, state, adapter if adapter is not None else _adapter(0.1 * round_number), optimizer)


def _load(paths: RunPaths, **kwargs):
    return load_state(paths, REFERENCE, max_norm=kwargs.pop("max_norm", 100.0),
                      optimizer_name=kwargs.pop("optimizer_name", None))


@pytest.fixture()
def keep_sigint():
    """main() installs its own Ctrl+C handler and a console log handler on this test's (captured) stdout; put
    pytest's handler back and take main's console handler away afterwards (a later test would log to a closed
    stream)."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)
    root = logging.getLogger()
    for console in [h for h in root.handlers if getattr(h, "fl_crew_reddit_console", False)]:
        root.removeHandler(console)


@pytest.fixture()
def paths(tmp_path) -> RunPaths:
    return RunPaths(tmp_path, "run-a").create()


# --- item 2: resume trusts nothing it reads --------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../etc", "a/b", "..", "/abs", "", "run\x00x", "x" * 200])
def test_run_ids_are_names_never_paths(tmp_path, run_id):
    with pytest.raises(ValueError, match="is not a name"):
        RunPaths(tmp_path, run_id)
    if run_id:  # an empty RUN means "the newest unfinished run"
        with pytest.raises(ValueError, match="is not a name"):
            find_run(tmp_path, run_id)


def test_state_paths_are_relative_so_a_moved_folder_resumes(paths, tmp_path):
    _save(paths, 1)
    saved = json.loads((state_dir(paths) / "round-1" / STATE_FILE).read_text())
    assert saved["history"]["collection"]["subreddits"][0]["path"] == "data/collected/run-a/books.json"
    assert str(tmp_path) not in json.dumps(saved)
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tmp_path), str(moved))
    try:
        state, adapter, _ = _load(RunPaths(moved, "run-a"))
        assert state.history["data"]["clients"][0]["train_path"] == str(
            moved / "data" / "training" / "run-a" / "client_0" / "train.jsonl")
        assert torch.equal(adapter["layer.lora_A.weight"], _adapter(0.1)["layer.lora_A.weight"])
    finally:
        shutil.move(str(moved), str(tmp_path))


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../../etc/passwd", "data/collected/run-b/books.json",
                                      "data/collected/run-a/../../../outside.json", "models/../results/x"])
def test_a_path_outside_the_run_is_refused(paths, bad_path, caplog):
    folder = _save(paths, 1)
    raw = json.loads((folder / STATE_FILE).read_text())
    raw["history"]["collection"]["subreddits"][0]["path"] = bad_path
    (folder / STATE_FILE).write_text(json.dumps(raw))
    with pytest.raises(NothingSaved, match="outside run run-a's folders"):
        _load(paths)


@pytest.mark.parametrize("change", [{"round": 9}, {"round": -1}, {"unknown_field": 1}, {"stage": "bogus"},
                                    {"total_rounds": 0}, {"stage": "collected"}, {"history": "not a dict"}])
def test_a_state_against_the_schema_falls_back_to_the_previous_round(paths, change, caplog):
    _save(paths, 1)
    newest = _save(paths, 2)
    raw = json.loads((newest / STATE_FILE).read_text())
    raw.update(change)
    (newest / STATE_FILE).write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.run_state"):
        state, adapter, _ = _load(paths)
    assert state.round == 1
    assert torch.allclose(adapter["layer.lora_B.weight"], _adapter(0.1)["layer.lora_B.weight"])
    assert "round-2" in caplog.text and "unusable" in caplog.text


@pytest.mark.parametrize("damage", ["nan", "shape", "dtype", "norm", "extra key", "flipped byte", "truncated"])
def test_a_bad_saved_global_adapter_falls_back_with_a_warning_saying_so(paths, damage, caplog):
    _save(paths, 1)
    newest = _save(paths, 2)
    weights = newest / GLOBAL_WEIGHTS
    if damage in ("flipped byte", "truncated"):
        data = bytearray(weights.read_bytes())
        if damage == "flipped byte":
            data[-3] ^= 0xFF
        else:
            del data[len(data) // 2:]
        weights.write_bytes(bytes(data))
    else:
        adapter = _adapter(0.2)
        key = "layer.lora_B.weight"
        adapter[key] = {"nan": torch.full((4, 2), float("nan")), "shape": torch.zeros(2, 4),
                        "dtype": torch.zeros(4, 2, dtype=torch.float64), "norm": torch.full((4, 2), 1e6),
                        "extra key": adapter[key]}[damage]
        if damage == "extra key":
            adapter["smuggled.weight"] = torch.zeros(1)
        save_file(adapter, str(weights))
        raw = json.loads((newest / STATE_FILE).read_text())
        raw["files"] = {}  # an attacker rewrites the digests too: the tensor checks still catch it
        (newest / STATE_FILE).write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.run_state"):
        state, _, _ = _load(paths)
    assert state.round == 1
    expected = {"flipped byte": "corrupt", "truncated": "corrupt"}.get(damage, "saved global adapter is bad")
    assert expected in caplog.text


def test_a_bad_server_optimizer_buffer_is_refused(paths):
    buffers = {"m": {k: torch.zeros_like(v) for k, v in REFERENCE.items()},
               "v": {k: torch.ones_like(v) for k, v in REFERENCE.items()}}
    optimizer = {"name": "fedadam", "hparams": {}, "step": 1, "buffers": buffers}
    _save(paths, 1, optimizer=optimizer)
    state, _, loaded = _load(paths, optimizer_name="fedadam")
    assert torch.equal(loaded["buffers"]["v"]["layer.lora_A.weight"], torch.ones(2, 4))
    with pytest.raises(NothingSaved, match="the run uses 'fedyogi'"):
        _load(paths, optimizer_name="fedyogi")
    flat = load_file(str(state_dir(paths) / "round-1" / SERVER_OPTIMIZER_WEIGHTS))
    flat["v::layer.lora_A.weight"] = -torch.ones(2, 4)
    save_file(flat, str(state_dir(paths) / "round-1" / SERVER_OPTIMIZER_WEIGHTS))
    folder = state_dir(paths) / "round-1"
    raw = json.loads((folder / STATE_FILE).read_text())
    raw["files"] = {}
    (folder / STATE_FILE).write_text(json.dumps(raw))
    with pytest.raises(NothingSaved, match="negative second moments"):
        _load(paths, optimizer_name="fedadam")


@pytest.mark.parametrize("pointer", ["../../../../etc", "/tmp/x", "round-1/../../..", "garbage\x00", ""])
def test_the_pointer_stays_inside_the_state_folder(paths, pointer, caplog):
    _save(paths, 1)
    _save(paths, 2)
    (state_dir(paths) / "LATEST").write_text(pointer)
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.run_state"):
        state, _, _ = _load(paths)
    assert state.round == 2  # the newest state folder, found by scanning, not by following the pointer
    if pointer:
        assert "does not name a state folder" in caplog.text


def test_a_state_folder_that_is_a_link_is_not_followed(paths, tmp_path, caplog):
    """A state folder must lie in the run's own state folder: a symlink to one elsewhere is a pointer out of it."""
    _save(paths, 1)
    _save(paths, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = _save(paths, 3, adapter=_adapter(0.3))
    shutil.move(str(outside), str(elsewhere / outside.name))
    outside.symlink_to(elsewhere / outside.name, target_is_directory=True)
    (state_dir(paths) / "LATEST").write_text("round-3\n")
    with caplog.at_level(logging.WARNING, logger="fl_crew_reddit.run_state"):
        state, _, _ = _load(paths)
    assert state.round == 2
    assert "round-3" in caplog.text and "link" in caplog.text
    saved_again = _save(paths, 3)  # the run saves round 3 again: the link is replaced, its target left alone
    assert not saved_again.is_symlink() and (elsewhere / "round-3" / STATE_FILE).is_file()


def test_nothing_saved_is_one_clear_error(paths):
    with pytest.raises(NothingSaved, match="run 'run-a' has nothing saved to resume from"):
        find_run(paths.base, "run-a")
    with pytest.raises(NothingSaved, match="there is no run 'run-zzz'"):
        find_run(paths.base, "run-zzz")


def test_bare_resume_picks_the_newest_unfinished_run_and_says_why(tmp_path):
    newer_finished = RunPaths(tmp_path, "run-b-finished").create()
    older = RunPaths(tmp_path, "zz-older").create()  # sorts last by name, yet saved first
    newest = RunPaths(tmp_path, "aa-newest").create()
    _save(older, 1)
    time.sleep(0.01)
    _save(newest, 0, stage="preprocessed")
    time.sleep(0.01)
    _save(newer_finished, 3, stage="finished")
    point_latest(tmp_path / "results", "aa-newest")  # results/latest is a link to a run, not another run
    run_id, why = find_run(tmp_path, None)
    assert run_id == "aa-newest"
    assert "newest unfinished run" in why and "after preprocessing" in why and "1 other unfinished" in why
    with pytest.raises(NothingSaved, match="is finished"):
        find_run(tmp_path, "run-b-finished")
    assert find_run(tmp_path, "run-b-finished", rounds=5)[0] == "run-b-finished"  # more rounds: allowed


def test_bare_resume_on_the_command_line_names_the_run_it_picked_and_why(tiny_config, monkeypatch, capsys,
                                                                        keep_sigint):
    from fl_crew_reddit import FLCrewRedditManager, main

    base = tiny_config.fl_crew_reddit_dir
    monkeypatch.setenv("FL_CREW_REDDIT_DIR", str(base))
    monkeypatch.setenv("BASE_LLM_MODEL", tiny_config.base_llm_model)
    _save(RunPaths(base, "run-older").create(), 1)
    time.sleep(0.01)
    _save(RunPaths(base, "run-newer").create(), 0, stage="preprocessed")
    time.sleep(0.01)
    _save(RunPaths(base, "run-finished").create(), 3, stage="finished")
    resumed: list[str | None] = []

    def resume_stops_at_once(self, run_id=None, num_rounds=None, on_round=None):  # what main hands the manager
        resumed.append(run_id)
        raise NothingSaved("the test stops here")
    monkeypatch.setattr(FLCrewRedditManager, "resume", resume_stops_at_once)
    assert main.main(["run", "--resume"]) == 2
    out = capsys.readouterr().out
    assert resumed == ["run-newer"]
    picked = [line for line in out.splitlines() if line.startswith("Resuming run")]
    assert len(picked) == 1 and picked[0].startswith("Resuming run run-newer: the newest unfinished run (state saved")
    assert "after preprocessing" in picked[0] and "1 other unfinished run(s)" in picked[0]


def test_a_bad_global_adapter_is_named_not_blamed_on_the_clients():
    strategy = FederatedStrategy(StrategySettings(min_fit_clients=1))
    bad_global = {"w": torch.tensor([float("nan"), 0.0])}
    updates = [ClientUpdate(f"client_{i}", {"w": torch.zeros(2)}, 1) for i in range(3)]
    with pytest.raises(GlobalAdapterError, match="global adapter itself is bad.*clients are not at fault"):
        strategy.aggregate(bad_global, updates)


# --- item 1: crash-safe from the first second (real loop, tiny model) ------------------------------------------------
class Stop(Exception):
    """Stands for the process dying at that point: the state on disk is what a kill would leave."""


def _final(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.final_adapter) / "adapter_model.safetensors"))


SECRET = "pw-7f3c-never-shown"


def _files_with(root: Path, text: str) -> list[str]:
    """Every file under `root` (tensors, logs, JSON, reports) whose bytes contain `text`."""
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()]


@pytest.mark.e2e
def test_stops_in_each_stage_resume_to_the_same_model_moved_and_with_no_secret_written(tiny_config, monkeypatch,
                                                                                         tmp_path, caplog):
    """Item 1: stopped while collecting the second subreddit, while preprocessing, in the base evaluation and in
    round 1's aggregation, each run resumes from what it finished to the reference's final adapter bit for bit.
    Item 2: the round-1 stop is moved to another FL_CREW_REDDIT_DIR before it resumes. Item 7: AGENT_LLM_BASE_URL
    carries user:password; no file any run wrote (history, state, logs, tensors, report) holds the password."""
    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.evaluation.report import build_report
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = tiny_config.model_copy(update={"agent_llm_base_url": f"http://bob:{SECRET}@127.0.0.1:9/v1", **SMALL_RUN})
    reference = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-reference")
    import fl_crew_reddit.workspace as workspace_module

    real_collect = workspace_module.collect
    calls: list[str] = []

    def collect_then_stop(client, names, *args, **kwargs):
        calls.append(names[0])
        if len(calls) == 2 and stop_at == "collection":
            raise Stop("killed while collecting the second subreddit")
        return real_collect(client, names, *args, **kwargs)

    def stop_in(method_name: str):
        original = getattr(FederatedWorkspace, method_name)

        def stopping(self, *args, **kwargs):
            if stop_at == method_name:
                raise Stop(f"killed in {method_name}")
            return original(self, *args, **kwargs)
        return stopping

    monkeypatch.setattr(workspace_module, "collect", collect_then_stop)
    for method_name in ("preprocess", "evaluate_base", "aggregate"):
        monkeypatch.setattr(FederatedWorkspace, method_name, stop_in(method_name))
    expected_stage = {"collection": "collecting-1", "preprocess": "collected", "evaluate_base": "preprocessed",
                      "aggregate": "round-0"}
    moved = tmp_path / "moved-here"
    for stop_at, saved in expected_stage.items():
        run_id = f"run-stop-{stop_at}"
        calls.clear()
        before_move = config.model_copy(update={"fl_crew_reddit_dir": tmp_path / "first-place"}) \
            if stop_at == "aggregate" else config
        with pytest.raises(Stop):
            FLCrewRedditManager(before_move).run_federated_learning(num_rounds=2, run_id=run_id)
        state_root = before_move.fl_crew_reddit_dir / "results" / run_id / "state"
        assert (state_root / "LATEST").read_text().strip() == saved
        collected_before = len(calls)
        stop_at = None
        resumed_config = config
        if before_move is not config:  # a moved FL_CREW_REDDIT_DIR: state.json's paths are relative to it
            shutil.move(str(before_move.fl_crew_reddit_dir), str(moved))
            resumed_config = config.model_copy(update={"fl_crew_reddit_dir": moved})
            state_root = moved / "results" / run_id / "state"
        resumed = FLCrewRedditManager(resumed_config).resume(run_id)
        if saved == "collecting-1":  # the first subreddit is not collected again; the second is
            assert calls[collected_before] == calls[1] and calls[0] not in calls[collected_before:]
        else:
            assert len(calls) == collected_before  # nothing collected again
        assert [r.round for r in resumed.history.rounds] == [1, 2]
        assert resumed.history.base.perplexity == pytest.approx(reference.history.base.perplexity, rel=1e-6)
        for key, value in _final(reference).items():
            assert torch.equal(_final(resumed)[key], value), (saved, key)
        assert (state_root / "LATEST").read_text().strip() == "finished"
    assert str(moved) in resumed.history_path and str(tmp_path / "first-place") not in Path(
        resumed.history_path).read_text()

    build_report(Path(resumed.history_path).parent)
    masked = "http://***:***@127.0.0.1:9/v1"
    for written in (Path(resumed.history_path), state_root / "finished" / STATE_FILE,
                    Path(resumed.history_path).parent / "report.md"):
        assert masked in written.read_text(), written  # the setting is recorded, its password is not
    assert _files_with(tmp_path, SECRET) == []
    assert SECRET not in caplog.text


def _messages(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns); a traceback fails the test here."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.strip() and "\r" not in line and "it/s]" not in line
            and "step/s" not in line and not line.startswith(("Loading weights", "round "))]


def _storage_mount(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.e2e
def test_a_full_or_read_only_results_folder_stops_with_one_line_and_the_last_state_resumes(
        tiny_config, tmp_path, monkeypatch, capsys, keep_sigint):
    from fl_crew_reddit import FLCrewRedditManager, main

    results = tmp_path / "results"
    if not _storage_mount(results, "16m"):
        pytest.skip("needs a tmpfs mount (root with CAP_SYS_ADMIN) to make a real full / read-only folder")
    try:
        config = tiny_config.model_copy(update=SMALL_RUN)
        FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="run-disk")
        for name, value in config.model_dump(mode="json").items():
            if value is not None and not isinstance(value, (dict, list)) and "secret" not in name \
                    and "key" not in name and "client_id" not in name:
                monkeypatch.setenv(name.upper(), str(value))
        filler = results / "filler"
        with filler.open("wb") as handle:  # fill the disk to the last byte
            try:
                while True:
                    handle.write(b"\0" * (1 << 16))
                    handle.flush()
            except OSError:
                pass
        code = main.main(["run", "--resume", "run-disk", "--rounds", "2"])
        err = _messages(capsys.readouterr().err)
        assert code == 1
        assert len(err) == 1, err
        assert f"cannot write to {results / 'run-disk' / 'state'}: No space left on device" in err[0]
        assert (results / "run-disk" / "state" / "LATEST").read_text().strip() == "finished"

        filler.unlink()
        subprocess.run(["mount", "-o", "remount,ro", str(results)], check=True)
        code = main.main(["run", "--resume", "run-disk", "--rounds", "2"])
        err = _messages(capsys.readouterr().err)
        assert code == 1 and len(err) == 1, err
        assert f"cannot write to {results / 'run-disk'}" in err[0] and "Read-only file system" in err[0], err
        assert main.main(["run", "--rounds", "1"]) == 1  # a new run cannot make its folder: nothing to resume
        err = _messages(capsys.readouterr().err)
        assert len(err) == 1 and f"cannot write to {results}: Read-only file system" in err[0], err
        assert "nothing of run" in err[0] and "start it again" in err[0] and "--resume" not in err[0], err

        subprocess.run(["mount", "-o", "remount,rw", str(results)], check=True)
        assert main.main(["run", "--resume", "run-disk", "--rounds", "2"]) == 0
        history = json.loads((results / "run-disk" / "history.json").read_text())
        assert [r["round"] for r in history["rounds"]] == [1, 2]
    finally:
        subprocess.run(["umount", "-l", str(results)], capture_output=True)


def test_resume_of_a_run_with_nothing_saved_is_one_line(tiny_config, monkeypatch, capsys, keep_sigint):
    from fl_crew_reddit import main

    monkeypatch.setenv("FL_CREW_REDDIT_DIR", str(tiny_config.fl_crew_reddit_dir))
    monkeypatch.setenv("BASE_LLM_MODEL", tiny_config.base_llm_model)
    RunPaths(tiny_config.fl_crew_reddit_dir, "run-empty").create()
    assert main.main(["run", "--resume", "run-empty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["Cannot resume: run 'run-empty' has nothing saved to resume from (it stopped before its first "
                   "stage completed): start a new run"]
    assert main.main(["resume", "../../etc"]) == 2
    assert "is not a name" in capsys.readouterr().err
    assert main.main(["run", "--resume", "nosuchrun"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"Cannot resume: there is no run 'nosuchrun' under {tiny_config.fl_crew_reddit_dir / 'results'}"]
