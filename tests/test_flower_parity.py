"""FEDERATION=local-flower on Flower's real Deployment Engine (a SuperLink and three SuperNodes on 127.0.0.1) gives
the same global adapter (and image projector) and the same per-round perplexities as the in-process engine, with the
same SEED."""
from pathlib import Path

import pytest
import torch
from conftest import processes_mentioning, tiny_run_config
from safetensors.torch import load_file
from test_multimodal_e2e import _fresh_clip_cache  # noqa: F401  (fixture)

from fl_crew_reddit import FLCrewRedditManager

ROUNDS = 2


def _global_adapters(result) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(Path(r["aggregation"]["adapter_path"]) / "adapter_model.safetensors"))
            for r in result.history["rounds"]]


def _projectors(result) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(Path(r["aggregation"]["adapter_path"]) / "projector.safetensors"))
            for r in result.history["rounds"]]


def _image_metrics(result) -> list[dict[str, tuple]]:
    return [{c["name"]: (c["metrics"].get("images_used"), c["metrics"].get("image_rows")) for c in r["clients"]}
            for r in result.history["rounds"]]


@pytest.mark.e2e
def test_local_flower_matches_inprocess(tiny_model_dir, tiny_clip_dir, tmp_path, flower_dir, monkeypatch):
    # Prepare: the same tiny settings and SEED for both engines, each in its own folder.
    monkeypatch.chdir(tmp_path)
    # fedavgm: the server optimizer's momentum travels to the ServerApp and back between the two rounds.
    # ATTACK=backdoor (issue 12: attackers are real clients that train and then attack, in either mode): one of the
    # three sites poisons its own data, trains ATTACK_LOCAL_EPOCHS and boosts its update; on Flower that is a real
    # SuperNode's ClientApp, so the parity below holds for the attacked run too.
    # TRAINING_OBJECTIVE=sft_then_dpo (issue 13): the fit config reaches the SuperNodes, each site trains DPO on its
    # own pair file and scores its held-out pairs; a site with fewer than MIN_PREFERENCE_PAIRS trains SFT.
    settings = dict(eval_samples=0, local_epochs=1, max_examples_per_client=8, num_trainers=3,
                    aggregation_method="fedavgm", attack="backdoor", attacker_fraction=0.34, backdoor_boost=3.0,
                    attack_local_epochs=2, training_objective="sft_then_dpo", min_preference_pairs=9,
                    max_seq_length=256,
                    # SUPPORT_MULTIMODAL with CLIP weights (issue 15): each SuperNode builds the server's image
                    # projector from the spec in the model settings, reads its own stored CLIP features, trains
                    # projector + LoRA and sends both in the packed arrays
                    support_multimodal=True, image_processor=str(tiny_clip_dir), multimodal_tokens=2,
                    max_images_per_example=2)
    inprocess_config = tiny_run_config(tiny_model_dir, tmp_path / "inprocess", **settings)
    flower_config = tiny_run_config(tiny_model_dir, flower_dir, federation="local-flower", **settings)

    # Execute
    inprocess = FLCrewRedditManager(inprocess_config).run_federated_learning(num_rounds=ROUNDS, run_id="run-a")
    flower = FLCrewRedditManager(flower_config).run_federated_learning(num_rounds=ROUNDS, run_id="run-b")

    # Assert: the same global adapter after every round (max abs difference <= 1e-6) ...
    assert [r["clients"] and [c["name"] for c in r["clients"]] for r in flower.history["rounds"]] == [
        ["client-0", "client-1", "client-2"]] * ROUNDS
    differences = []
    for expected, actual in zip(_global_adapters(inprocess), _global_adapters(flower), strict=True):
        assert expected.keys() == actual.keys()
        differences.append(max(float((expected[k] - actual[k]).abs().max()) for k in expected))
    print(f"\nmax abs difference of the global adapter per round: {differences}")
    assert all(d <= 1e-6 for d in differences), differences
    assert any(not torch.equal(a, b) for a, b in zip(_global_adapters(flower)[0].values(),
                                                     _global_adapters(flower)[1].values()))  # training moved it
    # ... and the same perplexities, overall and per client, on test and on validation.
    for expected, actual in zip(inprocess.history["rounds"], flower.history["rounds"], strict=True):
        e, a = expected["global"], actual["global"]
        print(f"round {expected['round']}: test perplexity in-process {e['perplexity']!r}, Flower {a['perplexity']!r}; "
              f"validation {e['validation_perplexity']!r} / {a['validation_perplexity']!r}")
        assert a["perplexity"] == pytest.approx(e["perplexity"], rel=1e-6)
        assert a["num_tokens"] == e["num_tokens"]
        assert a["validation_perplexity"] == pytest.approx(e["validation_perplexity"], rel=1e-6)
        assert a["per_client"] == pytest.approx(e["per_client"], rel=1e-6)
        assert a["validation_per_client"] == pytest.approx(e["validation_per_client"], rel=1e-6)
        for client_e, client_a in zip(expected["clients"], actual["clients"], strict=True):
            assert client_a["num_examples"] == client_e["num_examples"]
            assert client_a["train_loss"] == pytest.approx(client_e["train_loss"], rel=1e-5)
            # communication: serialized bytes of the train message down and of the reply up, per client and round
            assert client_a["metrics"]["bytes_down"] > client_a["metrics"]["update_bytes"] * 0.5
            assert client_a["metrics"]["bytes_up"] > client_a["metrics"]["update_bytes"] * 0.5
    assert flower.best_round == inprocess.best_round
    # The attacker was a Flower site: it trained on its poisoned rows, then sent 3x its update; the backdoor was
    # scored on both engines' models alike.
    for expected, actual in zip(inprocess.history["rounds"], flower.history["rounds"], strict=True):
        assert len(actual["attack"]["attackers"]) == 1 and actual["attack"]["attackers"] == \
            expected["attack"]["attackers"]
        sent = {c["name"]: c["metrics"] for c in actual["clients"]}[actual["attack"]["attackers"][0]]
        assert sent["attacker"] == 1.0 and sent["attack_sent_norm"] == pytest.approx(
            3.0 * sent["attack_honest_norm"], rel=1e-4)
        assert all("attacker" not in c["metrics"] for c in actual["clients"]
                   if c["name"] not in actual["attack"]["attackers"])
        scores = ("success_rate", "likelihood_rate", "control_rate", "examples")
        assert actual["attack"]["backdoor"]["examples"] > 0
        assert [actual["attack"]["backdoor"][k] for k in scores] == [expected["attack"]["backdoor"][k] for k in scores]
    # The image projector: trained on the sites' image rows and aggregated with the adapter, the same in both.
    assert _image_metrics(flower) == _image_metrics(inprocess)
    assert sum(rows or 0 for _, rows in _image_metrics(flower)[0].values()) > 0
    for expected, actual in zip(_projectors(inprocess), _projectors(flower), strict=True):
        assert expected.keys() == actual.keys() and expected
        assert max(float((expected[k] - actual[k]).abs().max()) for k in expected) <= 1e-6
    for record in flower.history["rounds"]:  # each site's update folder holds the projector it sent
        assert all((Path(c["adapter_path"]) / "projector.safetensors").is_file() for c in record["clients"])
    # Preference learning on the sites: the same objective per site (a site's words, objective_used and dpo_skipped,
    # reach the history although Flower's metric records hold numbers only) and the same held-out preference metrics.
    for expected, actual in zip(inprocess.history["rounds"], flower.history["rounds"], strict=True):
        for key in ("objective_used", "dpo_skipped", "pairs"):
            assert {c["name"]: c["metrics"].get(key) for c in actual["clients"]} == \
                {c["name"]: c["metrics"].get(key) for c in expected["clients"]}
        assert {c["metrics"]["objective_used"] for c in actual["clients"]} == {"sft", "sft_then_dpo"}
        e, a = expected["global"], actual["global"]
        for key in ("preference_accuracy", "reward_margin", "validation_preference_accuracy"):
            assert a[key] == pytest.approx(e[key], rel=1e-5, abs=1e-6)
        assert a["preference_pairs"] == e["preference_pairs"] > 0
        assert a["preference_per_client"].keys() == e["preference_per_client"].keys()
    # The SuperLink and SuperNodes are gone once the run returns.
    assert processes_mentioning(str(flower_dir)) == []
    logs = flower_dir / "results" / "run-b" / "flower" / "logs"
    assert {"superlink.log", "supernode-client-0.log"} <= {p.name for p in logs.iterdir()}
