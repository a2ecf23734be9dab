"""Issue 15 away from the server's process: with SUPPORT_MULTIMODAL=true and CLIP weights, Flower sites
(FEDERATION=local-flower: SuperLink + SuperNodes here) and trainer processes (TRAINER_DEVICES=cpu,cpu) build the
server's image projector from its spec, receive its tensors with the adapter, train it on their own stored CLIP
features and send it back: one round gives the same global adapter and projector as the in-process round.

One in-process round (module fixture) is the reference for both.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multimodal_e2e import _fresh_clip_cache, multimodal_config, tiny_clip_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e
SETTINGS = dict(eval_samples=0, local_epochs=1)
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
    return FLCrewRedditManager(config.model_copy(update=SETTINGS)).run_federated_learning(num_rounds=1)


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


@pytest.fixture()
def flower_dir(tmp_path):
    """The Flower run's folder; the SuperLink and SuperNodes left running there are killed at the end."""
    from test_flower_parity import _processes_mentioning

    folder = tmp_path / "flower"
    folder.mkdir()
    yield folder
    for pid in _processes_mentioning(str(folder)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_local_flower_trains_the_projector_like_inprocess(inprocess, tiny_model_dir, tiny_clip_dir,  # noqa: F811
                                                          flower_dir, monkeypatch):
    """Each SuperNode builds the projector from the spec in the model settings, reads its own stored CLIP features,
    trains projector + LoRA and sends both in the packed arrays; the ServerApp aggregates them."""
    from fl_crew_reddit import FLCrewRedditManager

    monkeypatch.chdir(flower_dir.parent)
    config = multimodal_config(tiny_model_dir, flower_dir, tiny_clip_dir).model_copy(
        update={**SETTINGS, "federation": "local-flower"})
    flower = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    record = flower.history["rounds"][0]
    assert record["skipped"] == {} and record["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    assert _image_metrics(flower) == _image_metrics(inprocess)
    error = _largest_difference(_global_state(inprocess), _global_state(flower))
    print(f"\nmultimodal local-flower round vs in-process: max abs difference {error:.3g}")
    assert error <= TOLERANCE
    for client in record["clients"]:  # each site's update folder holds the projector it sent
        assert (Path(client["adapter_path"]) / "projector.safetensors").is_file()


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


def test_secagg_sums_the_projector_with_the_adapter(inprocess, tiny_model_dir, tiny_clip_dir,  # noqa: F811
                                                    flower_dir, monkeypatch):
    """SECURE_AGGREGATION: the projector's tensors are more floats in each site's masked vector; the round's global
    adapter and projector are the in-process FedAvg round's within SecAgg+'s quantization bound."""
    from fl_crew_reddit import FLCrewRedditManager
    from fl_crew_reddit.federation import secagg

    monkeypatch.chdir(flower_dir.parent)
    config = multimodal_config(tiny_model_dir, flower_dir, tiny_clip_dir).model_copy(
        update={**SETTINGS, "federation": "local-flower", "flower_insecure": True, "secure_aggregation": True})
    secure = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    record = secure.history["rounds"][0]
    info = record["aggregation"]["secure_aggregation"]
    assert info["clients_in_sum"] == 3 and record["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    bound = secagg.error_bound(3, info["clipping_range"], info["quantization_range"],
                               [c["num_examples"] for c in record["clients"]], info["max_weight"])
    error = _largest_difference(_global_state(inprocess), _global_state(secure))
    print(f"\nmultimodal SecAgg+ round vs in-process: max abs difference {error:.3g} (bound {bound:.3g})")
    assert error <= bound + 1e-6
