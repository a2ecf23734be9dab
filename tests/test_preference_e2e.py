"""Preference learning through the whole product, for real, on tiny settings: TRAINING_OBJECTIVE=sft_then_dpo from
the settings to the fit config, the sites' pair files, DPO training, held-out preference metrics per round (and of
the base model and the baselines), history, TensorBoard and the report, with SELF_IMPROVE=true beside it; settings
that cannot work are refused.

One run (module fixture) and one test per promise. client-2 is left one train pair after preprocessing (as a site
with little data would have), so it trains SFT each round and the history says why.
"""
import json
from pathlib import Path

import pytest
from conftest import tiny_run_config

CLIENTS = ["client-0", "client-1", "client-2"]
FEW_PAIRS_CLIENT = "client-2"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """Two rounds of sft_then_dpo and SELF_IMPROVE with 3 clients and both baselines; (config, result, history)."""
    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("preference-run"),
                             training_objective="sft_then_dpo", dpo_beta=0.2, dpo_sft_weight=0.5,
                             dpo_reference="after_sft", dpo_learning_rate=1e-3, dpo_epochs=1, min_preference_pairs=2,
                             dpo_loss_type="ipo", baselines=["local_only", "centralized"], local_epochs=1,
                             max_examples_per_client=8, eval_samples=0, max_seq_length=256, self_improve=True,
                             self_improve_max_new_tokens=12)
    original = FederatedWorkspace.preprocess

    def preprocess_leaving_one_pair(self):
        report = original(self)
        shard = next(s for s in report.clients if s.name == FEW_PAIRS_CLIENT)
        pairs = Path(shard.train_path).parent / "train_pairs.jsonl"
        pairs.write_text(pairs.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
        self._load_client_data()  # the counts as the site has them now
        return report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FederatedWorkspace, "preprocess", preprocess_leaving_one_pair)
        result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2)
    history = json.loads(Path(result.history_path).read_text())
    return config, result, history


def test_the_objective_is_a_setting_of_the_run(run):
    _, _, history = run
    assert history["settings"]["training_objective"] == "sft_then_dpo"
    assert history["settings"]["dpo_beta"] == 0.2 and history["settings"]["min_preference_pairs"] == 2
    assert history["settings"]["dpo_sft_weight"] == 0.5
    assert (history["settings"]["dpo_reference"], history["settings"]["dpo_learning_rate"],
            history["settings"]["dpo_epochs"]) == ("after_sft", 1e-3, 1)
    assert history["settings"]["dpo_loss_type"] == "ipo"


def test_pairs_per_client_are_counted_by_split_and_kind(run):
    _, _, history = run
    pairs = history["preference_pairs"]
    assert set(pairs) == set(CLIENTS)
    for client in CLIENTS:
        assert pairs[client]["test"].get("relevance", 0) > 0
    assert sum(pairs[FEW_PAIRS_CLIENT]["train"].values()) == 1
    assert all(sum(pairs[c]["train"].values()) >= 2 for c in CLIENTS if c != FEW_PAIRS_CLIENT)


def test_clients_train_dpo_and_one_with_too_few_pairs_trains_sft_and_says_why(run):
    _, _, history = run
    for record in history["rounds"]:
        by_name = {c["name"]: c["metrics"] for c in record["clients"]}
        assert set(by_name) == set(CLIENTS) and record["skipped"] == {}
        for client in CLIENTS:
            metrics = by_name[client]
            if client == FEW_PAIRS_CLIENT:
                assert metrics["objective_used"] == "sft" and "dpo_loss" not in metrics
                assert "1 preference pairs" in metrics["dpo_skipped"] and "min_pairs=2" in metrics["dpo_skipped"]
            else:
                assert metrics["objective_used"] == "sft_then_dpo" and "dpo_skipped" not in metrics
                assert metrics["dpo_loss"] > 0 and 0 <= metrics["train_preference_accuracy"] <= 1
                # DPO_SFT_WEIGHT reached the trainer through the fit config; its loss includes α · chosen NLL
                assert metrics["dpo_sft_weight"] == 0.5 and metrics["dpo_loss"] > 0.5 * metrics["dpo_chosen_nll"]
                # and DPO_REFERENCE / DPO_LEARNING_RATE / DPO_EPOCHS / DPO_LOSS_TYPE too
                assert (metrics["dpo_reference"], metrics["dpo_learning_rate"]) == ("after_sft", 1e-3)
                assert metrics["dpo_loss_type"] == "ipo"


def test_clients_improve_themselves_from_round_two_or_say_why_not(run):
    """SELF_IMPROVE=true beside sft_then_dpo: from round 2 each client generates replies and counts what it kept and
    rejected by reason, unless the collapse guard stopped it, which says what got worse (on the tiny random model
    the held-out preference accuracy often falls below the base model's 0.5: counts, not quality, are checked)."""
    _, _, history = run
    first, second = history["rounds"]
    assert not any(key.startswith("self_improve_") for c in first["clients"] for key in c["metrics"])
    for client in second["clients"]:
        metrics = client["metrics"]
        rejected = sum(v for k, v in metrics.items() if k.startswith("self_improve_rejected_"))
        assert metrics["self_improve_kept"] + rejected == metrics["self_improve_generated"]
        if metrics["self_improve_stopped"]:
            assert metrics["self_improve_generated"] == 0 and "fell from" in metrics["self_improve_stop_reason"]
        else:
            assert metrics["self_improve_generated"] > 0


def test_every_round_has_held_out_preference_metrics_overall_and_per_client(run):
    _, _, history = run
    base = history["base"]
    # the base model is its own reference: every implicit reward is 0, every pair a tie
    assert base["preference_accuracy"] == 0.5 and base["reward_margin"] == 0.0 and base["preference_pairs"] > 0
    for record in history["rounds"]:
        metrics = record["global"]
        assert metrics["preference_pairs"] == base["preference_pairs"]
        assert 0 <= metrics["preference_accuracy"] <= 1 and metrics["reward_margin"] != 0.0
        assert set(metrics["preference_per_client"]) == set(CLIENTS)
        per_client = metrics["preference_per_client"].values()
        assert sum(v["pairs"] for v in per_client) == metrics["preference_pairs"]
        weighted = sum(v["preference_accuracy"] * v["pairs"] for v in per_client) / metrics["preference_pairs"]
        assert metrics["preference_accuracy"] == pytest.approx(weighted)
        assert metrics["validation_preference_pairs"] > 0 and metrics["validation_preference_accuracy"] is not None
        assert metrics["perplexity"] > 0  # beside perplexity, not instead of it


def test_baselines_report_preference_metrics_on_the_same_pairs(run):
    _, _, history = run
    for name in ("local_only", "centralized"):
        entry = history["baselines"][name]
        assert 0 <= entry["preference_accuracy"] <= 1 and entry["reward_margin"] is not None
    local = history["baselines"]["local_only"]["per_client"]
    assert all(local[c]["preference_accuracy"] is not None for c in CLIENTS)


def test_tensorboard_has_the_preference_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, result, history = run
    events = EventAccumulator(str(Path(config.fl_crew_reddit_dir) / "logs" / "tensorboard" / result.run_id))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"preference/test_accuracy", "preference/test_reward_margin", "preference/validation_accuracy",
            "preference_test_accuracy_per_client/client-0", "dpo_loss/client-0", "train_preference_accuracy/client-1",
            "clients/dpo_skipped", "baseline/centralized/test_preference_accuracy"} <= tags
    assert f"dpo_loss/{FEW_PAIRS_CLIENT}" not in tags
    accuracy = [history["base"]["preference_accuracy"]] + [
        r["global"]["preference_accuracy"] for r in history["rounds"]]
    assert [(e.step, e.value) for e in events.Scalars("preference/test_accuracy")] == [
        (step, pytest.approx(value, rel=1e-5)) for step, value in enumerate(accuracy)]
    assert [e.value for e in events.Scalars("clients/dpo_skipped")] == [1.0, 1.0]


def test_the_report_has_a_preference_learning_section(run):
    from fl_crew_reddit.evaluation.report import build_report

    _, result, history = run
    markdown = build_report(Path(result.history_path).parent).md.read_text(encoding="utf-8")
    section = markdown.split("## Preference learning", 1)[1].split("\n## ", 1)[0]
    assert ("Local objective: sft_then_dpo, β = 0.2, SFT term on the chosen reply α = 0.5, DPO reference: the policy "
            "after the SFT steps, DPO learning rate 0.001, 1 DPO epoch a round, IPO loss (target margin 1/(2β) = 2.5 "
            "per reply token).") in section
    assert "relevance" in section and FEW_PAIRS_CLIENT in section
    assert "fewer than min_pairs=2" in section  # the skipped reason, per round
    assert "local_only" in section and "centralized" in section
    accuracy = history["rounds"][-1]["global"]["preference_accuracy"]
    assert f"{accuracy:.3f}" in section


def test_a_resumed_run_keeps_its_objective(run):
    from fl_crew_reddit.config import ConfigError
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.workspace import FederatedWorkspace

    config, result, _ = run
    changed = config.model_copy(update={"training_objective": "sft"})
    workspace = FederatedWorkspace(changed, RunPaths(Path(config.fl_crew_reddit_dir).resolve(), result.run_id))
    try:
        with pytest.raises(ConfigError, match="TRAINING_OBJECTIVE=sft .the run started with sft_then_dpo"):
            workspace.restore()
    finally:
        workspace.close()
    same = FederatedWorkspace(config, RunPaths(Path(config.fl_crew_reddit_dir).resolve(), result.run_id))
    try:
        assert same.restore().round == 2
    finally:
        same.close()


def test_a_dpo_run_stopped_in_round_two_resumes_to_the_same_adapter_bit_for_bit(tiny_config):
    """Crash-exact resume holds for DPO: the reference log-probs are recomputed from the saved global adapter, the
    pair rows from the sites' files, so the resumed round 2 is the uninterrupted one."""
    import torch
    from conftest import RunStopped, stopped_in_round
    from safetensors.torch import load_file

    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 8,
                                            "training_objective": "dpo", "min_preference_pairs": 2,
                                            "max_seq_length": 256})
    reference = FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-reference")
    with stopped_in_round(2), pytest.raises(RunStopped):
        FLCrewRedditManager(config).run_federated_learning(num_rounds=2, run_id="run-stopped")
    resumed = FLCrewRedditManager(config).resume("run-stopped")
    assert [c["metrics"]["objective_used"] for c in resumed.history["rounds"][1]["clients"]] == ["dpo"] * 3
    final = load_file(str(Path(resumed.final_adapter) / "adapter_model.safetensors"))
    expected = load_file(str(Path(reference.final_adapter) / "adapter_model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert resumed.history["rounds"][1]["global"]["preference_accuracy"] == \
        reference.history["rounds"][1]["global"]["preference_accuracy"]


def test_a_client_whose_dpo_loss_turns_non_finite_is_left_out_with_its_reason(tiny_config, monkeypatch):
    import torch

    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.training import trainer

    real_loss = trainer.rpo_loss
    current = {}

    def loss_of(*args):  # client-1's DPO loss is NaN; the others' are what DPO computes
        loss, chosen, rejected, chosen_nll = real_loss(*args)
        return (loss * torch.nan if current.get("client") == "client-1" else loss), chosen, rejected, chosen_nll

    real_fit = trainer.LocalTrainer.fit

    def fit(self, global_adapter, config):
        current["client"] = self.name
        return real_fit(self, global_adapter, config)

    monkeypatch.setattr(trainer, "rpo_loss", loss_of)
    monkeypatch.setattr(trainer.LocalTrainer, "fit", fit)
    config = tiny_config.model_copy(update={"eval_samples": 0, "local_epochs": 1, "max_examples_per_client": 8,
                                            "training_objective": "dpo", "min_preference_pairs": 2,
                                            "max_seq_length": 256})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="nan-dpo")
    record = result.history["rounds"][0]
    assert list(record["skipped"]) == ["client-1"]
    assert "client-1" in record["skipped"]["client-1"][0] and "non-finite" in record["skipped"]["client-1"][0]
    assert record["aggregation"]["accepted"] == ["client-0", "client-2"]
    assert record["global"]["preference_pairs"] > 0


def test_a_trainer_process_job_trains_dpo_on_the_pairs_beside_its_train_file(tiny_config, tmp_path):
    """The worker's job function (training/device_pool.py `_train`, what each trainer process runs), called here:
    with a DPO fit config it reads train_pairs.jsonl beside the job's train.jsonl."""
    import torch
    from safetensors.torch import save_file

    from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings
    from fl_crew_reddit.training.device_pool import TrainingJob, _train
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.peft_setup import build_peft_model
    from fl_crew_reddit.training.trainer import snapshot_adapter

    config = tiny_config.model_copy(update={"training_objective": "dpo", "min_preference_pairs": 3})
    base, tokenizer = load_base_model(config, torch.device("cpu"))
    torch.manual_seed(config.seed)
    model = build_peft_model(base, config)
    save_file({k: v.contiguous() for k, v in snapshot_adapter(model).items()}, str(tmp_path / "global.safetensors"))
    prompts = [[{"role": "user", "content": f"question {i} about soup"}] for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"messages": p + [{"role": "assistant", "content": "add salt"}]}) + "\n" for p in prompts))
    (tmp_path / "train_pairs.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "kind": "relevance", "prompt": p, "chosen": "add salt", "rejected": "prune roses"})
        + "\n" for i, p in enumerate(prompts)))
    fit = {**FederatedStrategy(StrategySettings.from_config(config)).fit_config(1), "local_epochs": 1}
    assert fit["objective"] == "dpo" and fit["min_pairs"] == 3

    def job(name: str):
        return _train(TrainingJob(client="client-0", round=1, train_path=str(tmp_path / "train.jsonl"),
                                   global_adapter_path=str(tmp_path / "global.safetensors"),
                                   output_dir=str(tmp_path / name), fit_config=fit), model, tokenizer,
                      torch.device("cpu"), config, {})

    outcome = job("with-pairs")
    assert outcome.metrics["objective_used"] == "dpo" and outcome.metrics["pairs"] == 4
    assert "dpo_skipped" not in outcome.metrics and outcome.metrics["dpo_loss"] > 0
    (tmp_path / "train_pairs.jsonl").unlink()  # a client without pairs: SFT, and why
    outcome = job("without-pairs")
    assert outcome.metrics["objective_used"] == "sft" and "0 preference pairs" in outcome.metrics["dpo_skipped"]


# --- settings ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "named"), [
    ({"training_objective": "dpo", "pref_pair_kinds": ""}, ("TRAINING_OBJECTIVE=dpo", "PREF_PAIR_KINDS")),
    ({"training_objective": "sft_then_dpo", "pref_pair_kinds": ""}, ("TRAINING_OBJECTIVE=sft_then_dpo",
                                                                     "PREF_PAIR_KINDS")),
    ({"training_objective": "dpo", "attack": "label_flip", "attacker_fraction": 0.34},
     ("TRAINING_OBJECTIVE=dpo", "ATTACK=label_flip")),
    ({"training_objective": "dpo", "attack": "backdoor", "attacker_fraction": 0.34},
     ("TRAINING_OBJECTIVE=dpo", "ATTACK=backdoor")),
    ({"training_objective": "dpo", "self_improve": True}, ("TRAINING_OBJECTIVE=dpo", "SELF_IMPROVE=true")),
    ({"training_objective": "kto"}, ("TRAINING_OBJECTIVE",)),
    ({"dpo_beta": 0}, ("DPO_BETA",)),
    ({"dpo_sft_weight": -0.5}, ("DPO_SFT_WEIGHT",)),
    ({"training_objective": "dpo", "dpo_reference": "before_sft"}, ("DPO_REFERENCE",)),
    ({"training_objective": "dpo", "dpo_learning_rate": -1e-3}, ("DPO_LEARNING_RATE",)),
    ({"training_objective": "dpo", "dpo_epochs": -1}, ("DPO_EPOCHS",)),
    ({"training_objective": "dpo", "dpo_loss_type": "hinge"}, ("DPO_LOSS_TYPE",)),
    ({"dpo_loss_type": "ipo"}, ("DPO_LOSS_TYPE=ipo", "TRAINING_OBJECTIVE=sft")),
    ({"dpo_reference": "after_sft", "dpo_epochs": 1}, ("DPO_REFERENCE=after_sft", "DPO_EPOCHS=1",
                                                       "TRAINING_OBJECTIVE=sft")),
    ({"dpo_learning_rate": 1e-4}, ("DPO_LEARNING_RATE=0.0001", "TRAINING_OBJECTIVE=sft")),
    ({"min_preference_pairs": 0}, ("MIN_PREFERENCE_PAIRS",)),
])
def test_settings_that_cannot_work_are_refused_naming_them(settings, named, tmp_path):
    from fl_crew_reddit.config import ConfigError, load_config

    with pytest.raises(ConfigError) as refused:
        load_config(_env_file=None, fl_crew_reddit_dir=tmp_path, **settings)
    assert all(name in str(refused.value) for name in named)


@pytest.mark.parametrize("settings", [
    {"aggregation_method": "krum", "num_trainers": 5},
    {"aggregation_method": "median"},
    {"federation": "local-flower", "secure_aggregation": True, "flower_insecure": True},
    {"dp_mode": "central", "dp_noise_multiplier": 0.5},
    {"dp_mode": "local", "dp_noise_multiplier": 0.5},
    {"update_compression": "sign"},
    {"attack": "ipm", "attacker_fraction": 0.34},
    {"ffa_lora": True},
    {"aggregation_method": "svd_exact", "client_lora_ranks": "4,8,8"},
])
def test_dpo_combines_with_what_only_sees_updates(settings, tmp_path):
    """DPO changes only the local objective: every rule, SecAgg+, DP, compression and update attacks carry it."""
    from fl_crew_reddit.config import load_config

    for objective in ("dpo", "sft_then_dpo"):
        assert load_config(_env_file=None, fl_crew_reddit_dir=tmp_path, training_objective=objective,
                           **settings).training_objective == objective


def test_the_fit_config_carries_the_objective_and_sft_adds_nothing():
    from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings

    keys = ("objective", "dpo_beta", "dpo_sft_weight", "dpo_reference", "dpo_learning_rate", "dpo_epochs",
            "dpo_loss_type", "min_pairs")
    dpo = FederatedStrategy(StrategySettings(training_objective="dpo", dpo_beta=0.3, dpo_sft_weight=0.25,
                                             dpo_reference="after_sft", dpo_learning_rate=1e-4, dpo_epochs=2,
                                             dpo_loss_type="ipo", min_preference_pairs=6))
    assert {k: dpo.fit_config(1)[k] for k in keys} == {
        "objective": "dpo", "dpo_beta": 0.3, "dpo_sft_weight": 0.25, "dpo_reference": "after_sft",
        "dpo_learning_rate": 1e-4, "dpo_epochs": 2, "dpo_loss_type": "ipo", "min_pairs": 6}
    assert not set(keys) & set(FederatedStrategy(StrategySettings()).fit_config(1))


def test_a_resume_keeps_dpo_sft_weight_and_a_dpo_run_from_before_it_was_plain_dpo(tmp_path):
    from fl_crew_reddit.config import ConfigError, load_config
    from fl_crew_reddit.workspace import check_same_objective

    config = load_config(_env_file=None, fl_crew_reddit_dir=tmp_path, training_objective="dpo", dpo_sft_weight=1.0)
    saved = {"training_objective": "dpo", "dpo_beta": 0.1, "min_preference_pairs": 4}
    check_same_objective({**saved, "dpo_sft_weight": 1.0}, config, "r")
    with pytest.raises(ConfigError, match=r"DPO_SFT_WEIGHT=1.0 \(the run started with 0.5\)"):
        check_same_objective({**saved, "dpo_sft_weight": 0.5}, config, "r")
    with pytest.raises(ConfigError, match=r"DPO_SFT_WEIGHT=1.0 \(the run started with 0.0\)"):
        check_same_objective(saved, config, "r")  # saved before the setting: its DPO had no SFT term
    check_same_objective(saved, config.model_copy(update={"dpo_sft_weight": 0.0}), "r")
    check_same_objective({}, config.model_copy(update={"training_objective": "sft"}), "r")  # an old SFT run
    # DPO_REFERENCE / DPO_LEARNING_RATE / DPO_EPOCHS: kept on resume; a run from before them had global / 0 / 0
    check_same_objective(saved, config.model_copy(update={"dpo_sft_weight": 0.0, "dpo_reference": "global"}), "r")
    changed = config.model_copy(update={"dpo_reference": "after_sft", "dpo_learning_rate": 1e-4, "dpo_epochs": 1})
    with pytest.raises(ConfigError, match=r"DPO_REFERENCE=after_sft \(the run started with global\), "
                                          r"DPO_LEARNING_RATE=0.0001 \(the run started with 0.0\), "
                                          r"DPO_EPOCHS=1 \(the run started with 0\)"):
        check_same_objective({**saved, "dpo_sft_weight": 1.0}, changed, "r")
    check_same_objective({**saved, "dpo_sft_weight": 1.0, "dpo_reference": "after_sft", "dpo_learning_rate": 1e-4,
                          "dpo_epochs": 1}, changed, "r")
    # DPO_LOSS_TYPE: a run from before it trained DPO's sigmoid loss
    ipo = config.model_copy(update={"dpo_loss_type": "ipo"})
    with pytest.raises(ConfigError, match=r"DPO_LOSS_TYPE=ipo \(the run started with sigmoid\)"):
        check_same_objective({**saved, "dpo_sft_weight": 1.0}, ipo, "r")
    check_same_objective({**saved, "dpo_sft_weight": 1.0, "dpo_loss_type": "ipo"}, ipo, "r")


def test_an_sft_history_without_pairs_has_no_preference_outputs():
    from fl_crew_reddit.evaluation.report import markdown_report
    from fl_crew_reddit.evaluation.tensorboard_scalars import metrics_scalars
    from fl_crew_reddit.history import EvalMetrics, RunHistory

    metrics = EvalMetrics(perplexity=10.0, bleu=1.0, rouge_l=0.1, num_tokens=100)
    history = RunHistory(run_id="r", settings={"training_objective": "sft"}, base=metrics)
    assert "Preference" not in markdown_report(history, png_name=None)
    assert not any(tag.startswith("preference") for tag in metrics_scalars(metrics))
    # the same history with a DPO objective says so, even before any pair was counted
    dpo = RunHistory(run_id="r", settings={"training_objective": "dpo", "dpo_beta": 0.1}, base=metrics)
    assert "No client has preference pairs." in markdown_report(dpo, png_name=None)


def test_site_data_reads_and_tokenizes_pair_files(tiny_model, tmp_path, monkeypatch):
    from fl_crew_reddit.site import SiteData
    from fl_crew_reddit.training import dpo

    _, tokenizer = tiny_model
    example = {"id": "e", "post_id": "p", "messages": [{"role": "user", "content": "How do I store basil?"},
                                                       {"role": "assistant", "content": "In water, like flowers."}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(example) + "\n")
    pair = {"id": "q", "post_id": "p", "subreddit": "cooking", "kind": "relevance",
            "prompt": [{"role": "user", "content": "How do I store basil?"}], "chosen": "In water, like flowers.",
            "rejected": "Use a bigger pot.", "chosen_id": "c1", "rejected_id": "c2", "chosen_score": None,
            "rejected_score": None}
    (tmp_path / "test_pairs.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "id": "q2"}) + "\n")
    (tmp_path / "validation_pairs.jsonl").write_text(json.dumps(pair) + "\n" + json.dumps({**pair, "id": "q2"}))
    data = SiteData(tmp_path, tokenizer, max_seq_length=64)
    assert data.pair_rows("train") == [] and data.pairs_left_out["train"] == 0  # no file: no pairs
    rows = data.pair_rows("test")
    assert [r["id"] for r in rows] == ["q", "q2"] and rows[0]["kind"] == "relevance"
    assert rows[0]["chosen"]["input_ids"] != rows[0]["rejected"]["input_ids"]
    assert rows[0]["chosen"]["input_ids"][:5] == rows[0]["rejected"]["input_ids"][:5]  # the same prompt
    assert data.pairs_left_out["test"] == 0
    # a pair whose rows cannot be built is left out by tokenize_pairs, and counted here
    building = dpo.tokenize_pairs
    monkeypatch.setattr(dpo, "tokenize_pairs", lambda tok, pairs, n: building(tok, pairs[:1], n))
    assert [r["id"] for r in data.pair_rows("validation")] == ["q"] and data.pairs_left_out["validation"] == 1


# FEDERATION=local-flower: the same DPO rounds on Flower's Deployment Engine are checked in
# tests/test_flower_parity.py (one federation for the parity, the attacker and DPO).
