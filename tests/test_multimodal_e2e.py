"""Issue 15 through the real loop: SUPPORT_MULTIMODAL=true with a (tiny, random) local CLIP folder as
IMAGE_PROCESSOR, on the embedded snapshot (which has image posts): preprocessing stores CLIP features, the clients
train the image projector with the LoRA adapter, the projector's tensors travel and are aggregated with it, every
saved adapter folder holds the projector beside the PEFT files, each round records the image's contribution (real
vs blank image), and a run stopped in round 2 resumes to the same final state bit for bit.

One run (module fixture) and one test per promise, as in test_e2e.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import RunStopped, stopped_in_round, tiny_run_config

pytestmark = pytest.mark.e2e
ROUNDS = 2


@pytest.fixture(autouse=True, scope="module")
def _fresh_clip_cache():
    from fl_crew_reddit.preprocessing.image_features import forget_loaded_clip

    forget_loaded_clip()
    yield
    forget_loaded_clip()


def multimodal_config(tiny_model_dir: Path, root: Path, clip_dir: Path):
    return tiny_run_config(tiny_model_dir, root, support_multimodal=True, image_processor=str(clip_dir),
                           multimodal_tokens=2, max_images_per_example=2, baselines=[])


@pytest.fixture(scope="module")
def run(tiny_model_dir, tiny_clip_dir, tmp_path_factory):
    """Two multimodal rounds with 3 clients on the snapshot: (config, result, history.json)."""
    from fl_crew_reddit import FLCrewRedditManager

    config = multimodal_config(tiny_model_dir, tmp_path_factory.mktemp("mm-run"), tiny_clip_dir)
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=ROUNDS)
    history = json.loads(Path(result.history_path).read_text())
    return config, result, history


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """The largest change of any projector weight (averaging equal tensors alone moves them by ~1e-7)."""
    return max(float((after[k].float() - before[k].float()).abs().max()) for k in before)


def _projector_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "projector.safetensors"))


def test_clients_train_on_image_rows_and_count_what_is_left_out(run):
    _, _, history = run
    for record in history["rounds"]:
        assert record["skipped"] == {} and len(record["clients"]) == 3
        metrics = [c["metrics"] for c in record["clients"]]
        assert all("images_used" in m and "image_rows" in m for m in metrics)
        assert sum(m["images_used"] for m in metrics) > 0 and sum(m["image_rows"] for m in metrics) > 0


def test_projector_is_in_every_saved_adapter_folder_and_changes_between_rounds(run):
    _, result, _ = run
    from fl_crew_reddit.training.projector_files import PROJECTOR_CONFIG, PROJECTOR_WEIGHTS

    assert len(result.global_adapters) == ROUNDS
    for folder in result.global_adapters:
        assert {PROJECTOR_WEIGHTS, PROJECTOR_CONFIG, "adapter_config.json", "adapter_model.safetensors"} <= {
            p.name for p in Path(folder).iterdir()}
    first, second = (_projector_tensors(f) for f in result.global_adapters)
    assert set(first) == set(second) and {"expand.weight", "out.weight"} <= set(first)
    assert _moved(first, second) > 1e-4, "the projector did not train"


def test_projector_starts_from_the_seeded_init_and_the_global_differs_from_it(run, tiny_model_dir):
    config, result, _ = run
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.multimodal import projector_from_config

    base, _ = load_base_model(config, torch.device("cpu"))
    fresh = projector_from_config(config, base, 16).state_dict()
    trained = _projector_tensors(result.global_adapters[0])
    assert _moved(fresh, trained) > 1e-4


def test_the_one_call_loader_restores_the_round_adapter_with_its_projector(run):
    config, result, _ = run
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.projector_files import load_multimodal_adapter

    base, _ = load_base_model(config, torch.device("cpu"))
    folder = result.global_adapters[-1]
    model, projector = load_multimodal_adapter(base, Path(folder))
    assert projector is not None and projector.spec.tokens == 2 and projector.spec.feature_size == 16
    saved = _projector_tensors(folder)
    assert all(torch.equal(saved[k], v) for k, v in projector.state_dict().items())
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())


def test_history_has_the_image_contribution_each_round_and_the_report_shows_it(run):
    config, result, history = run
    for metrics in [history["base"]] + [r["global"] for r in history["rounds"]]:
        assert metrics["image_examples"] > 0 and metrics["image_reply_tokens"] > 0, metrics.get("image_note")
        assert metrics["image_perplexity_real"] > 1 and metrics["image_perplexity_blank"] > 1
        assert isinstance(metrics["image_left_out"], dict)
    reals = [history["base"]["image_perplexity_real"]] + [r["global"]["image_perplexity_real"]
                                                          for r in history["rounds"]]
    assert reals[-1] < reals[0]  # training lowers the image rows' reply perplexity
    from fl_crew_reddit.evaluation.report import markdown_report
    from fl_crew_reddit.evaluation.tensorboard_scalars import round_scalars

    assert {"image/perplexity_real", "image/perplexity_blank"} <= set(round_scalars(result.history.rounds[-1]))

    report = markdown_report(result.history)
    assert "Image contribution" in report and "| 2 | " in report.split("Image contribution")[1]


def _test_rows_with_images(config, tokenizer, shard) -> list[dict]:
    """A client's test rows as a site builds them for a multimodal run: image posts with their stored features."""
    from fl_crew_reddit.preprocessing.image_features import resolve_clip_source
    from fl_crew_reddit.site.data import ImageRowSettings, SiteData
    from fl_crew_reddit.training.multimodal import stored_features

    images = ImageRowSettings(stored_features(resolve_clip_source(config.image_processor)), config.multimodal_tokens,
                              config.max_images_per_example)
    return SiteData(None, tokenizer, config.max_seq_length, files={"test": shard.test_path},
                    images=images).rows("test")


def test_held_out_perplexity_reads_the_images_of_image_posts(run):
    """The recorded test perplexity is the one of the test rows with their images (soft tokens through the round's
    projector), not of text-only rows; an image row's perplexity changes when its image changes."""
    config, result, history = run
    from fl_crew_reddit.evaluation.evaluator import held_out_nll
    from fl_crew_reddit.evaluation.metrics import perplexity
    from fl_crew_reddit.training.batching import tokenize_all
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.multimodal import with_images_replaced
    from fl_crew_reddit.training.projector_files import load_multimodal_adapter

    base, tokenizer = load_base_model(config, torch.device("cpu"))
    model, projector = load_multimodal_adapter(base, Path(result.global_adapters[-1]))
    pad, cpu, exact = tokenizer.pad_token_id, torch.device("cpu"), {"mixed_precision": config.mixed_precision}
    with_images, text_only, image_rows = [], [], []
    for shard in result.history.data.clients:
        rows = _test_rows_with_images(config, tokenizer, shard)
        image_rows.extend(row for row in rows if row["image_slots"])
        with_images.append(held_out_nll(model, rows, pad, cpu, projector=projector, **exact))
        examples = [json.loads(line) for line in Path(shard.test_path).read_text().splitlines() if line.strip()]
        text_only.append(held_out_nll(model, tokenize_all(tokenizer, examples, config.max_seq_length), pad, cpu,
                                      **exact))
    recorded = history["rounds"][-1]["global"]
    assert recorded["test_image_rows"] == len(image_rows) > 0
    assert recorded["image_examples"] == len(image_rows)
    assert sum(n for _, n in with_images) == recorded["num_tokens"]
    assert perplexity(sum(t for t, _ in with_images), recorded["num_tokens"]) == pytest.approx(
        recorded["perplexity"], rel=1e-6)
    text_ppl = perplexity(sum(t for t, _ in text_only), sum(n for _, n in text_only))
    assert abs(text_ppl - recorded["perplexity"]) > 1e-6 * recorded["perplexity"]  # the images count
    real = held_out_nll(model, image_rows[:1], pad, cpu, projector=projector, **exact)
    first = image_rows[0]["image_embeds"][0]
    others = [row["image_embeds"][0] for row in image_rows if not torch.allclose(row["image_embeds"][0], first)]
    other = others[0] if others else -first  # another post's image (the negated embedding if all are the same)
    changed = held_out_nll(model, with_images_replaced(image_rows[:1], other), pad, cpu, projector=projector,
                           **exact)
    assert changed[1] == real[1] and changed[0] != real[0]
    for metrics in [history["base"]] + [r["global"] for r in history["rounds"]]:
        assert metrics["test_image_rows"] > 0 and isinstance(metrics["validation_image_rows"], int)
        assert isinstance(metrics["validation_image_left_out"], dict)


def test_history_report_and_tensorboard_carry_the_clip_score_of_replies_generated_with_the_image(run):
    config, result, history = run
    from fl_crew_reddit.evaluation.report import markdown_report
    from fl_crew_reddit.evaluation.tensorboard_scalars import metrics_scalars

    for metrics in [history["base"]] + [r["global"] for r in history["rounds"]]:
        assert metrics["clip_note"] is None and metrics["clip_image_conditioned"] is True
        assert 0 < metrics["clip_examples"] <= config.clip_score_examples
        for key in ("clip_score", "clip_score_blank", "clip_score_reply", "clip_score_post"):
            assert 0.0 <= metrics[key] <= 100.0, key
        assert isinstance(metrics["clip_left_out"], dict)
    # the real replies and the post text do not change between evaluations; the same examples are scored
    assert len({(m["clip_score_reply"], m["clip_score_post"], m["clip_examples"])
                for m in [history["base"]] + [r["global"] for r in history["rounds"]]}) == 1
    assert {"image/clip_score", "image/clip_score_blank", "image/clip_score_reply"} <= set(
        metrics_scalars(result.history.rounds[-1].global_))
    report = markdown_report(result.history)
    assert "Generated (blank image)" in report and "how much the image steers" in report


def test_a_run_stopped_in_round_2_resumes_to_the_same_global_state(run, tiny_model_dir, tiny_clip_dir,
                                                                     tmp_path):
    from safetensors.torch import load_file

    from fl_crew_reddit import FLCrewRedditManager

    _, result, _ = run
    config = multimodal_config(tiny_model_dir, tmp_path / "stopped", tiny_clip_dir)
    with stopped_in_round(2), pytest.raises(RunStopped):
        FLCrewRedditManager(config).run_federated_learning(num_rounds=ROUNDS)
    # issue 14 item 2: the run folder moves before the resume; its shards name their images relative to the run,
    # so the resumed round finds them at the new place (a copy at the old place would be read otherwise: removed)
    shutil.move(tmp_path / "stopped", tmp_path / "moved")
    config = multimodal_config(tiny_model_dir, tmp_path / "moved", tiny_clip_dir)
    resumed = FLCrewRedditManager(config).resume()
    # round 2's evaluation (after the resume) reads the held-out images at the new place, as the unmoved run did
    moved_eval, unmoved_eval = resumed.history.rounds[-1].global_, result.history.rounds[-1].global_
    assert moved_eval.image_examples == unmoved_eval.image_examples > 0
    assert (moved_eval.image_left_out, moved_eval.clip_left_out) == (unmoved_eval.image_left_out,
                                                                     unmoved_eval.clip_left_out)
    for name in ("adapter_model.safetensors", "projector.safetensors"):
        expected = load_file(str(Path(result.global_adapters[-1]) / name))
        got = load_file(str(Path(resumed.global_adapters[-1]) / name))
        assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected), name


# --- the pieces the loop wires, on the tiny model (fast) -----------------------------------------------------------
def _image_site(tmp_path, tiny_model):
    """A site folder whose train split has an image post with one good, one missing and one non-finite feature,
    a post whose only image has no features, and a text post; its SiteData reads the features from a dict."""
    from fl_crew_reddit.site import Site, SiteData
    from fl_crew_reddit.site.data import ImageRowSettings
    from fl_crew_reddit.training.multimodal import build_projector

    model, tokenizer = tiny_model
    generator = torch.Generator().manual_seed(3)
    # SiteData resolves the file's image paths against the site folder (issue 14 item 2) before asking for features
    features = {(tmp_path / "good.png").resolve(): torch.randn(16, generator=generator) * 5,
                (tmp_path / "nan.png").resolve(): torch.full((16,), float("nan"))}

    def example(eid: str, images: list[str]) -> dict:
        return {"id": eid, "image_paths": images,
                "messages": [{"role": "user", "content": f"r/pics: look at {eid}"},
                             {"role": "assistant", "content": f"a fine picture of {eid} indeed"}]}

    examples = [example("a", ["good.png", "gone.png", "nan.png"]), example("b", ["gone.png"]), example("c", [])]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    data = SiteData(tmp_path, tokenizer, 128, images=ImageRowSettings(lambda p: features.get(Path(p)), 2, 4))
    projector = build_projector(model, 16, tokens=2, seed=5)
    return Site("c0", data, model, tokenizer, torch.device("cpu"), mixed_precision="no", show_progress=False,
                projector=projector), projector


def test_missing_and_damaged_image_features_fall_back_to_text_with_counts(tmp_path, tiny_model):
    from fl_crew_reddit.training.multimodal import SKIP_FEATURES_MISSING, SKIP_FEATURES_NOT_FINITE

    site, _ = _image_site(tmp_path, tiny_model)
    rows = site.data.rows("train")
    assert [len(r["image_slots"]) for r in rows] == [2, 0, 0]  # one image kept, two text rows
    assert site.data.images_left_out["train"] == {SKIP_FEATURES_MISSING: 2, SKIP_FEATURES_NOT_FINITE: 1}
    assert site.data.rows("validation") == [] and site.data.image_rows("test") == []


def test_a_site_fit_trains_projector_and_lora_and_sends_both(tmp_path, tiny_model):
    from fl_crew_reddit.training.multimodal import PROJECTOR_PREFIX, projector_state, split_projector, with_projector
    from fl_crew_reddit.training.trainer import snapshot_adapter

    site, projector = _image_site(tmp_path, tiny_model)
    start = with_projector(snapshot_adapter(site.model), projector)
    config = {"local_epochs": 3, "batch_size": 2, "learning_rate": 5e-3, "seed": 0, "round": 1, "proximal_mu": 0.0}
    result = site.fit(start, config)
    assert set(result.state) == set(start)
    adapter, sent = split_projector(result.state)
    received = {k[len(PROJECTOR_PREFIX):]: v for k, v in start.items() if k.startswith(PROJECTOR_PREFIX)}
    assert _moved(received, sent) > 1e-4  # the projector trained
    assert all(torch.equal(v, split_projector(projector_state(projector))[1][k]) for k, v in sent.items())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    assert result.metrics["images_used"] == 1 and result.metrics["image_rows"] == 1
    assert result.metrics["images_left_out_image_features_missing"] == 2


def test_settings_without_clip_weights_stay_text_only(tiny_model_dir, tmp_path, monkeypatch):
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.workspace import FederatedWorkspace

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_run_config(tiny_model_dir, tmp_path, support_multimodal=True,
                             image_processor="clip-vit-base-patch32")
    workspace = FederatedWorkspace(config, RunPaths(tmp_path, "run-text").create())
    assert workspace.model is not None and workspace._projector is None
    assert not any(k.startswith("mm_projector.") for k in workspace.global_adapter)


def test_an_image_processor_folder_that_is_not_clip_is_refused(tiny_model_dir, tmp_path):
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.training.multimodal import NotAClipModel
    from fl_crew_reddit.workspace import FederatedWorkspace

    config = tiny_run_config(tiny_model_dir, tmp_path, support_multimodal=True, image_processor=str(tiny_model_dir))
    workspace = FederatedWorkspace(config, RunPaths(tmp_path, "run-not-clip").create())
    with pytest.raises(NotAClipModel, match="llama"):
        _ = workspace.model


@pytest.mark.parametrize("settings", [{"ffa_lora": True}, {"aggregation_method": "svd_exact"},
                                      {"update_compression": "int8"}, {"aggregation_method": "fedadam"},
                                      {"aggregation_method": "median"}], ids=lambda s: "-".join(map(str, s.values())))
def test_the_projector_travels_through_each_kind_of_round(tiny_model_dir, tiny_clip_dir, tmp_path, settings):
    """One real round per way an update can travel (FFA-LoRA's B-only update, svd_exact, a compressed update, a
    server optimizer, a robust rule): every client is accepted and the global projector moves from its init."""
    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.multimodal import projector_from_config

    config = multimodal_config(tiny_model_dir, tmp_path, tiny_clip_dir).model_copy(update=settings)
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    [record] = result.history.rounds
    assert record.skipped == {} and record.aggregation.accepted == ["client-0", "client-1", "client-2"]
    base, _ = load_base_model(config, torch.device("cpu"))
    fresh = projector_from_config(config, base, 16).state_dict()
    assert _moved(fresh, _projector_tensors(result.global_adapters[0])) > 1e-4
    assert record.global_.image_examples > 0
