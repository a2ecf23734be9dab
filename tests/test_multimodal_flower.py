"""Issue 15 away from the server's process: with SUPPORT_MULTIMODAL=true and CLIP weights, Flower sites under
SecAgg+ (FEDERATION=local-flower: SuperLink + SuperNodes here; without SecAgg+ in tests/test_flower_parity.py) and
trainer processes (TRAINER_DEVICES=cpu,cpu) build the server's image projector from its spec, receive its tensors
with the adapter, train it on their own stored CLIP features and send it back: one round gives the same global
adapter and projector as the in-process round.

One in-process round (module fixture) is the reference for both.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import torch_threads_of_trainer_processes
from safetensors.torch import load_file
from test_multimodal_e2e import _fresh_clip_cache, multimodal_config  # noqa: F401  (fixtures)

SETTINGS = dict(eval_samples=0, local_epochs=1, max_examples_per_client=8)  # four runs: small, as the parity tests
TOLERANCE = 1e-6  # test_flower_parity's: the same computation, in other processes


def _global_state(result) -> dict[str, torch.Tensor]:
    """The round's global adapter and projector tensors (projector keys as they travel: `mm_projector.`)."""
    folder = Path(result.history["rounds"][0]["aggregation"]["adapter_path"])
    from fl_crew_reddit.training.multimodal import PROJECTOR_PREFIX

    projector = {PROJECTOR_PREFIX + k: v for k, v in load_file(str(folder / "projector.safetensors")).items()}
    return {**load_file(str(folder / "adapter_model.safetensors")), **projector}


def _largest_difference(expected: dict, actual: dict) -> float:
    assert expected.keys() == actual.keys()
    return max(float((expected[k].float() - actual[k].float()).abs().max()) for k in expected)


def _image_metrics(result) -> dict[str, tuple]:
    return {c["name"]: (c["metrics"].get("images_used"), c["metrics"].get("image_rows"))
            for c in result.history["rounds"][0]["clients"]}


@pytest.fixture(scope="module")
def inprocess(tiny_model_dir, tiny_clip_dir, tmp_path_factory):  # noqa: F811
    from fl_crew_reddit import FLCrewRedditManager

    config = multimodal_config(tiny_model_dir, tmp_path_factory.mktemp("mm-inprocess"), tiny_clip_dir)
    with torch_threads_of_trainer_processes(2):  # the trainer-process test's two workers
        return FLCrewRedditManager(config.model_copy(update=SETTINGS)).run_federated_learning(num_rounds=1)


@pytest.mark.e2e
def test_inprocess_reference_trains_the_projector(inprocess, tiny_model_dir, tiny_clip_dir):  # noqa: F811
    """The reference round has image rows on the clients and moves the projector from its seeded init."""
    from fl_crew_reddit.training.model_loading import load_base_model
    from fl_crew_reddit.training.multimodal import PROJECTOR_PREFIX, projector_from_config

    assert sum(rows for _, rows in _image_metrics(inprocess).values()) > 0
    config = multimodal_config(tiny_model_dir, Path("unused"), tiny_clip_dir)
    base, _ = load_base_model(config, torch.device("cpu"))
    fresh = {PROJECTOR_PREFIX + k: v for k, v in projector_from_config(config, base, 16).state_dict().items()}
    trained = {k: v for k, v in _global_state(inprocess).items() if k.startswith(PROJECTOR_PREFIX)}
    assert _largest_difference(fresh, trained) > 1e-4


# FEDERATION=local-flower, no SecAgg: the multimodal round on Flower equals the in-process one to 1e-6 in
# tests/test_flower_parity.py (that run is multimodal).


@pytest.mark.e2e
def test_trainer_processes_train_the_projector_like_inprocess(inprocess, tiny_model_dir, tiny_clip_dir,  # noqa: F811
                                                              tmp_path):
    """TRAINER_DEVICES=cpu,cpu: each job builds the projector from the job's image settings, trains it on the
    client's image rows and returns it with the update; the round is the in-process round."""
    from fl_crew_reddit import FLCrewRedditManager

    config = multimodal_config(tiny_model_dir, tmp_path, tiny_clip_dir).model_copy(
        update={**SETTINGS, "trainer_devices": ["cpu", "cpu"], "min_fit_clients": 2})
    pooled = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    record = pooled.history["rounds"][0]
    assert "Round 1: client-0 trained on cpu" in Path(pooled.log_path).read_text()
    assert record["skipped"] == {} and record["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    assert _image_metrics(pooled) == _image_metrics(inprocess)
    error = _largest_difference(_global_state(inprocess), _global_state(pooled))
    print(f"\nmultimodal trainer-process round vs in-process: max abs difference {error:.3g}")
    assert error <= TOLERANCE
    for client in record["clients"]:
        saved = load_file(str(Path(client["adapter_path"]) / "projector.safetensors"))
        assert saved and json.loads((Path(client["adapter_path"]) / "projector_config.json").read_text())["tokens"] == 2


@pytest.mark.e2e
def test_secagg_sums_the_projector_with_the_adapter(inprocess, tiny_model_dir, tiny_clip_dir,  # noqa: F811
                                                    flower_dir, monkeypatch):
    """SECURE_AGGREGATION on Flower's real SecAgg+ (SuperLink + SuperNodes here): the projector's tensors are more
    floats in each site's masked vector; the round's global adapter and projector are the in-process FedAvg round's
    within SecAgg+'s quantization bound, and no individual update reached the server. (The one SecAgg+ federation
    of the suite: the text-only adapter is the same masked vector without the projector's part.)"""
    from conftest import processes_mentioning

    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.federation import secagg

    monkeypatch.chdir(flower_dir.parent)
    config = multimodal_config(tiny_model_dir, flower_dir, tiny_clip_dir).model_copy(
        update={**SETTINGS, "federation": "local-flower", "flower_insecure": True, "secure_aggregation": True})
    try:
        secure = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="secure")
    finally:
        leftover = processes_mentioning(str(flower_dir))
    assert leftover == []
    record = secure.history["rounds"][0]
    info = record["aggregation"]["secure_aggregation"]
    assert info["clients_in_sum"] == 3 and record["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    bound = secagg.error_bound(3, info["clipping_range"], info["quantization_range"],
                               [c["num_examples"] for c in record["clients"]], info["max_weight"])
    error = _largest_difference(_global_state(inprocess), _global_state(secure))
    print(f"\nmultimodal SecAgg+ round vs in-process: max abs difference {error:.3g} (bound {bound:.3g})")
    assert error <= bound + 1e-6
    # no individual update reached the server: no updates folder, no client adapter, nothing but counts
    job = flower_dir / "results" / "secure" / "flower" / "round-1"
    assert (job / "new_global.safetensors").is_file() and not (job / "updates").exists()
    result = json.loads((job / "result.json").read_text())
    assert all(set(entry) == {"num_examples", "metrics", "bytes_down", "bytes_up"}
               for entry in result["clients"].values())
    assert all(c["adapter_path"].startswith("(secure aggregation") for c in record["clients"])


# --- the pieces, on the tiny model (fast) ----------------------------------------------------------------------------
def test_a_site_builds_the_servers_projector_from_the_model_settings(tiny_model, tmp_path):
    """What travels in the settings rebuilds the same projector (same spec, same seeded weights) and the site's
    image rows read features of the named CLIP model; no projector: nothing is sent and the site is text only."""
    from types import SimpleNamespace

    from fl_crew_reddit.site.app import image_settings, site_image_parts
    from fl_crew_reddit.training.multimodal import build_projector

    model, _ = tiny_model
    server = build_projector(model, 16, kind="linear", tokens=3, seed=11)
    config = SimpleNamespace(image_processor=str(tmp_path), max_images_per_example=2)
    settings = image_settings(config, server)
    assert json.loads(json.dumps(settings)) == settings  # plain values: a ConfigRecord / job.json carries them
    projector, images = site_image_parts(settings, model)
    assert projector.spec == server.spec and images.tokens_per_image == 3 and images.max_images == 2
    assert all(torch.equal(v, projector.state_dict()[k]) for k, v in server.state_dict().items())
    assert image_settings(config, None) == {} and site_image_parts({}, model) == (None, None)
    wider = json.loads(settings["image_projector"])
    wider["hidden_size"] += 8
    with pytest.raises(ValueError, match="soft tokens; this site's model is"):
        site_image_parts({**settings, "image_projector": json.dumps(wider)}, model)


def test_a_site_evaluates_a_state_that_carries_the_projector(tiny_model, tmp_path):
    """A received adapter with `mm_projector.` keys: the LoRA part goes to the model, the projector part to the
    site's projector; the held-out sums are those of the adapter alone (held-out rows are text only)."""
    from fl_crew_reddit.site import Site, SiteData
    from fl_crew_reddit.training.multimodal import build_projector, with_projector
    from fl_crew_reddit.training.trainer import snapshot_adapter

    model, tokenizer = tiny_model
    rows = [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}, with salt"}]} for i in range(3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    projector = build_projector(model, 16, tokens=2, seed=1)
    site = Site("c0", SiteData(tmp_path, tokenizer, 128), model, tokenizer, torch.device("cpu"),
                mixed_precision="no", show_progress=False, projector=projector)
    adapter = {k: v + 0.01 if "lora_B" in k else v for k, v in snapshot_adapter(model).items()}
    sent = with_projector(adapter, build_projector(model, 16, tokens=2, seed=2))
    with_keys, alone = site.evaluate(sent)["test"], site.evaluate(adapter)["test"]
    assert with_keys == alone and with_keys.num_tokens > 0
    assert all(torch.equal(v, projector.state_dict()[k.split(".", 1)[1]])
               for k, v in sent.items() if k.startswith("mm_projector."))
