"""Issue 15, the second way in, through the real loop: BASE_LLM_MODEL names a (tiny, random) Idefics3 folder and
SUPPORT_MULTIMODAL=true, on the embedded snapshot (which has image posts): the clients train LoRA on the language
model with the posts' images through the VLM's own processor, the updates are screened and aggregated like text
ones, every evaluation scores held-out rows with their images and records the image's contribution (real vs blank
white images), the saved global adapter loads with `PeftModel.from_pretrained`, a run stopped in round 2 resumes to
the same final adapter bit for bit, and the modes that cannot take a VLM yet are refused at start. IMAGE_PROCESSOR
names a (tiny, random) CLIP folder: the VLM's own processor wins (no LLaVA-style projector is built, the log says so
once) and the CLIP score is computed on replies the VLM generated with the posts' images.

One run (module fixture) and one test per promise, as in test_multimodal_e2e.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import torch
from conftest import RunStopped, stopped_in_round, tiny_run_config

pytestmark = pytest.mark.e2e
ROUNDS = 2


def vlm_run_config(tiny_vlm_dir: Path, root: Path, **overrides):
    """Three clients, 8 train examples each, one local epoch: the tiny Idefics3's 4 image tokens fit in 128."""
    settings = dict(support_multimodal=True, max_images_per_example=2, max_examples_per_client=8, local_epochs=1,
                    baselines=[], lora_target_modules=["q_proj", "v_proj"])
    return tiny_run_config(tiny_vlm_dir, root, **{**settings, **overrides})


@pytest.fixture(autouse=True, scope="module")
def _fresh_clip_cache():
    from fl_crew_reddit.preprocessing.image_features import forget_loaded_clip

    forget_loaded_clip()
    yield
    forget_loaded_clip()


@pytest.fixture(scope="module")
def run(tiny_vlm_dir, tiny_clip_dir, tmp_path_factory):
    """Two rounds with 3 clients on the snapshot, then the centralized baseline: (config, result, history.json)."""
    from fl_crew_reddit import FLCrewRedditManager

    config = vlm_run_config(tiny_vlm_dir, tmp_path_factory.mktemp("vlm-run"), image_processor=str(tiny_clip_dir),
                            baselines=["centralized"])
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=ROUNDS)
    history = json.loads(Path(result.history_path).read_text())
    return config, result, history


def test_clients_train_on_image_rows_and_count_what_is_left_out(run):
    _, _, history = run
    assert history["data"]["clients"] and len(history["rounds"]) == ROUNDS
    for record in history["rounds"]:
        assert record["skipped"] == {} and len(record["clients"]) == 3
        metrics = [c["metrics"] for c in record["clients"]]
        assert all("images_used" in m and "image_rows" in m for m in metrics)
        assert sum(m["images_used"] for m in metrics) > 0 and sum(m["image_rows"] for m in metrics) > 0
        assert all(m["image_rows"] <= c["num_examples"] for m, c in zip(metrics, record["clients"]))
        assert record["aggregation"]["accepted"] and not record["aggregation"]["rejected"]


def test_history_has_the_image_contribution_each_round_and_the_report_shows_it(run):
    _, result, history = run
    for metrics in [history["base"]] + [r["global"] for r in history["rounds"]]:
        assert metrics["image_examples"] > 0 and metrics["image_reply_tokens"] > 0, metrics.get("image_note")
        assert metrics["image_perplexity_real"] > 1 and metrics["image_perplexity_blank"] > 1
        assert metrics["image_perplexity_real"] != metrics["image_perplexity_blank"]  # the pixels matter
        assert isinstance(metrics["image_left_out"], dict)
        # BLEU's sample and the CLIP score's replies generated through the processor, with the posts' images
        assert metrics["samples"] and all(isinstance(s["generated"], str) for s in metrics["samples"])
        assert metrics["clip_score"] is not None and metrics["clip_examples"] > 0, metrics["clip_note"]
    reals = [history["base"]["image_perplexity_real"]] + [r["global"]["image_perplexity_real"]
                                                          for r in history["rounds"]]
    assert reals[-1] < reals[0]  # training lowers the image rows' reply perplexity
    assert history["rounds"][-1]["global"]["perplexity"] < history["base"]["perplexity"]
    from fl_crew_reddit.evaluation.report import markdown_report
    from fl_crew_reddit.evaluation.tensorboard_scalars import round_scalars

    assert {"image/perplexity_real", "image/perplexity_blank"} <= set(round_scalars(result.history.rounds[-1]))
    report = markdown_report(result.history)
    assert "Image contribution" in report and "| 2 | " in report.split("Image contribution")[1]


def test_the_vlm_processor_wins_over_the_projector_and_the_log_says_so_once(run):
    config, result, history = run
    from fl_crew_reddit.training.projector_files import PROJECTOR_CONFIG, PROJECTOR_WEIGHTS

    for folder in result.global_adapters:
        names = {p.name for p in Path(folder).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not {PROJECTOR_WEIGHTS, PROJECTOR_CONFIG} & names  # no LLaVA-style projector with a VLM base
    log = (Path(config.fl_crew_reddit_dir) / "logs").rglob("*.log")
    text = "".join(path.read_text() for path in log)
    assert text.count("its own processor reads the images; the LLaVA-style projector") == 1


def test_the_centralized_baseline_trains_and_scores_vlm_rows(run):
    _, _, history = run
    baseline = history["baselines"]["centralized"]
    assert baseline["steps"] > 0 and 1 < baseline["perplexity"] < history["base"]["perplexity"]


def test_the_global_adapter_loads_with_peft_on_the_vlm(run):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fl_crew_reddit.training.vlm import load_vlm

    config, result, _ = run
    folder = Path(result.global_adapters[-1])
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert saved and all(".text_model.layers." in key for key in saved)  # LoRA on the language model only
    base, _ = load_vlm(config, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, folder)
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved)
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], v) for k, v in saved.items())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())


def test_every_aggregation_rule_and_the_update_checks_take_the_vlm_updates(run):
    """The round-1 client updates (LoRA keys of the VLM's language model) through the server's screen and each
    rule: a new global adapter with the same keys, finite, moved; a NaN update rejected by name."""
    from safetensors.torch import load_file

    from fl_crew_reddit.config import AggregationMethod
    from fl_crew_reddit.server.strategy import ClientUpdate, FederatedStrategy, StrategySettings
    from fl_crew_reddit.training.adapter_files import load_client_update

    config, result, history = run
    start = result.global_adapters[0]
    global_state = load_file(str(Path(start) / "adapter_model.safetensors"))  # the state round 2 started from
    clients = history["rounds"][1]["clients"]
    updates = [ClientUpdate(c["name"], load_client_update(Path(c["adapter_path"])), c["num_examples"])
               for c in clients]
    assert set(updates[0].state) == set(global_state)
    for method in get_args(AggregationMethod):
        settings = StrategySettings.from_config(config.model_copy(update={"aggregation_method": method}))
        outcome = FederatedStrategy(settings).aggregate(global_state, updates, method=method, round_number=2)
        assert set(outcome.new_global) == set(global_state), method
        assert all(torch.isfinite(v).all() for v in outcome.new_global.values()), method
        assert any(not torch.equal(outcome.new_global[k], global_state[k]) for k in global_state), method
    broken = dict(updates[0].state)
    key = next(iter(broken))
    broken[key] = torch.full_like(broken[key], float("nan"))
    outcome = FederatedStrategy(StrategySettings.from_config(config)).aggregate(
        global_state, [ClientUpdate(updates[0].name, broken, 8), *updates[1:]], round_number=2)
    assert updates[0].name in outcome.rejected and "non-finite" in "; ".join(outcome.rejected[updates[0].name])


def test_a_run_stopped_in_round_2_resumes_to_the_same_global_adapter(run, tiny_vlm_dir, tmp_path):
    from safetensors.torch import load_file

    from fl_crew_reddit import FLCrewRedditManager

    _, result, _ = run
    config = vlm_run_config(tiny_vlm_dir, tmp_path / "stopped")
    with stopped_in_round(2), pytest.raises(RunStopped):
        FLCrewRedditManager(config).run_federated_learning(num_rounds=ROUNDS)
    resumed = FLCrewRedditManager(config).resume()
    expected = load_file(str(Path(result.global_adapters[-1]) / "adapter_model.safetensors"))
    got = load_file(str(Path(resumed.global_adapters[-1]) / "adapter_model.safetensors"))
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(federation="local-flower"), "FEDERATION=local-flower"),
    (dict(trainer_devices=["cpu", "cpu"]), "TRAINER_DEVICES=cpu,cpu"),
    (dict(use_quantization=True, training_objective="dpo"), "USE_QUANTIZATION=true.*TRAINING_OBJECTIVE=dpo"),
    (dict(self_improve=True), "SELF_IMPROVE=true"),
    (dict(attack="label_flip", attacker_fraction=0.34), "ATTACK=label_flip"),
    (dict(gradient_checkpointing=True), "GRADIENT_CHECKPOINTING=true"),
])
def test_modes_that_cannot_take_a_vlm_are_refused_at_start(tiny_vlm_dir, tmp_path, overrides, named):
    from fl_crew_reddit.config import ConfigError
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = vlm_run_config(tiny_vlm_dir, tmp_path, **overrides)
    paths = RunPaths(tmp_path, "refused").create()
    with pytest.raises(ConfigError, match=rf"BASE_LLM_MODEL=.*vision-language model \(idefics3\).*{named}"):
        FederatedWorkspace(config, paths)
