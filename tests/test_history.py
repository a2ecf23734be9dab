"""The typed run history: the report and TensorBoard scalars of a fixed history.json are exactly what the code
before the typed history wrote (goldens in tests/fixtures/run_history*/, rendered by the dict-based report.py and
tensorboard_scalars.py of commit fb96f88, plus the communication line and scalars added since), older files load,
broken ones fail with one clear message, and agent
steps are recorded and reported."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from fl_crew_reddit.evaluation.report import ReportError, build_report, markdown_report
from fl_crew_reddit.evaluation.tensorboard_scalars import baseline_scalars, metrics_scalars, round_scalars
from fl_crew_reddit.history import AgentStep, HistoryFileError, RunHistory, load_run_history, parse_run_history

FIXTURES = Path(__file__).parent / "fixtures"
CURRENT = FIXTURES / "run_history"  # the shape today's code writes: rounds, skipped and rejected clients, baselines
OLD = FIXTURES / "run_history_old"  # as written before validation splits, CLIP, update norms and the best round


def _report(tmp_path: Path, fixture: Path) -> tuple[str, str]:
    """report.md and report.html of the fixture's history; the embedded PNG (matplotlib's bytes) left out."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(fixture / "history.json", run / "history.json")
    paths = build_report(run)
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,PNG",
                  paths.html.read_text(encoding="utf-8"))
    return paths.md.read_text(encoding="utf-8"), page


def test_report_of_the_fixed_history_is_unchanged(tmp_path):
    markdown, page = _report(tmp_path, CURRENT)
    assert markdown == (CURRENT / "report.md").read_text(encoding="utf-8")
    assert page == (CURRENT / "report.html").read_text(encoding="utf-8")


def test_tensorboard_points_of_the_fixed_history_are_unchanged():
    # The points the workspace writes: the base model at step 0, each round at its number, each baseline.
    history = load_run_history(CURRENT / "history.json")
    points = [[tag, 0, value] for tag, value in metrics_scalars(history.base).items()]
    for record in history.rounds:
        points += [[tag, record.round, value] for tag, value in round_scalars(record).items()]
    last_trained = [r for r in history.rounds if r.clients][-1].round
    for kind, entry in history.baselines.items():
        points += [[tag, step, value] for tag, value, step in baseline_scalars(kind, entry, last_round=last_trained)]
    assert points == json.loads((CURRENT / "tensorboard_points.json").read_text(encoding="utf-8"))


def test_history_round_trips_through_its_json_form():
    history = load_run_history(CURRENT / "history.json")
    assert RunHistory.model_validate(json.loads(json.dumps(history.as_json()))) == history
    assert history["best_round"] == history.best_round == 2 and history["rounds"][1]["global"]["perplexity"] == 29.8861
    assert history.rounds[1].left_out() == {
        "client-1": ["training failed: RuntimeError: CUDA out of memory (trainer process 1 on cuda:1)"],
        "client-2": ["update norm 812.4 exceeds MAX_UPDATE_NORM=50"]}


def test_an_older_history_loads_and_reports_as_before(tmp_path):
    raw = json.loads((OLD / "history.json").read_text(encoding="utf-8"))
    assert "num_examples" not in raw["data"]["clients"][0] and "best_round" not in raw
    history = load_run_history(OLD / "history.json")
    shard = history.data.clients[0]
    assert shard.num_examples == shard.num_train + shard.num_test == 70  # migrated: train + test before validation
    assert shard.validation_path is None and history.best_round is None and history.agent_steps == []
    assert history.baselines["local_only"].per_client["client-0"].union == 34.4
    assert history.baselines["centralized"].best_round is None
    markdown, _ = _report(tmp_path, OLD)
    assert markdown == (OLD / "report.md").read_text(encoding="utf-8")  # what the report said of it before


@pytest.mark.parametrize("breakage, message", [
    (lambda h: h["rounds"][1]["global"].update(perplexity="n/a"),
     r"is not a run history this version can read: rounds\.1\.global\.perplexity: Input should be a valid number"),
    (lambda h: h.pop("run_id"), r"run_id: Field required"),
    (lambda h: h["baselines"]["centralized"].pop("perplexity"), r"baselines\.centralized\.perplexity: Field required"),
])
def test_a_broken_history_fails_with_one_message_naming_the_file(tmp_path, breakage, message):
    history = json.loads((CURRENT / "history.json").read_text(encoding="utf-8"))
    breakage(history)
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history), encoding="utf-8")
    with pytest.raises(HistoryFileError, match=message) as caught:
        load_run_history(path)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)
    with pytest.raises(ReportError, match=message):  # the report command says the same
        build_report(tmp_path)


def test_a_history_that_is_not_an_object_or_not_json_says_so(tmp_path):
    path = tmp_path / "history.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(HistoryFileError, match="does not hold a run history"):
        load_run_history(path)
    path.write_text('{"run_id": ', encoding="utf-8")
    with pytest.raises(HistoryFileError, match=f"{re.escape(str(path))} cannot be read as JSON"):
        load_run_history(path)
    with pytest.raises(HistoryFileError, match="the saved state"):
        parse_run_history({"rounds": "none"}, "the saved state")


def test_agent_steps_table_shows_llm_and_fallback_steps_only():
    history = load_run_history(CURRENT / "history.json")
    assert "## Agent steps" not in markdown_report(history)  # direct steps only: nothing to say
    history.agent_steps += [
        AgentStep(round=1, role="Federated Aggregator", tool="aggregate_adapters", outcome="llm",
                  arguments={"round": 1, "method": "krum"}),
        AgentStep(round=2, role="Model Trainer 2", tool="train_local_adapter", outcome="fallback",
                  reason="the agent asked for client-9; this step trains client-1")]
    text = markdown_report(history)
    assert "## Agent steps" in text and "| Role | Tool | Round | Outcome | Reason |" in text
    assert "| Federated Aggregator | aggregate_adapters | 1 | llm | — |" in text
    assert "| Model Trainer 2 | train_local_adapter | 2 | fallback | the agent asked for client-9; this step " \
           "trains client-1 |" in text
    assert "| Data Preprocessor |" not in text  # direct steps stay out of the table


def test_workspace_records_agent_steps_into_the_saved_history(tmp_path):
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = FLCrewRedditConfig(fl_crew_reddit_dir=tmp_path, device="cpu", tensorboard=False)
    workspace = FederatedWorkspace(config, RunPaths(tmp_path, "run-steps").create())
    try:
        step = AgentStep(round=0, role="Reddit Data Collector", tool="collect_reddit_data", outcome="fallback",
                         reason="the subreddit is not on AGENT_COLLECT_ALLOWLIST", arguments={"subreddits": ["x"]})
        workspace.record_agent_step(step)
        saved = load_run_history(workspace.save_history())
    finally:
        workspace.close()
    assert saved.agent_steps == [step] and saved.run_id == "run-steps" and saved.rounds == []
    assert json.loads(json.dumps(workspace.history()))["agent_steps"][0]["reason"] == step.reason


def test_run_result_reads_the_typed_history():
    from fl_crew_reddit.crew.manager import FLRunResult

    history = load_run_history(CURRENT / "history.json")
    result = FLRunResult(run_id=history.run_id, history=copy.deepcopy(history), history_path="h", log_path="l",
                         seconds=1.0)
    assert result.perplexities() == [31.2049, 29.8861, 29.5012]
    assert result.final_adapter == result.global_adapters[-1] == f"/srv/fl/models/aggregated/{history.run_id}/round-3"
    assert result.best_round == 2 and result.best_adapter == result.global_adapters[1]
    assert set(result.skipped_clients) == {2} and result.history["base"]["perplexity"] == 38.41726
