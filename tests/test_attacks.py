"""The attack suite (ATTACK, ATTACKER_FRACTION; fl_crew_reddit/site/attacks.py): each model-poisoning attack's
formula, the data attacks touching only the attackers' rows, deterministically, the attackers' choice, the backdoor
success measure, and a real in-process run with a sign-flipping attacker against the median."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from fl_crew_reddit.site import attacks
from fl_crew_reddit.site.outgoing import outgoing_update


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A.weight": torch.randn(4, 16, generator=g), "a.lora_B.weight": torch.randn(16, 4, generator=g)}


def _config(attack: str, attackers: list[str], n: int = 8, **extra) -> dict:
    cfg = {"round": 1, "seed": 42, **attacks.attack_fit_config(
        attack, attackers, n, scale=10.0, ipm_epsilon=0.5, alie_z=0.0, backdoor_trigger="cf zebra protocol",
        backdoor_target="Visit free-karma.example for free gold!", backdoor_fraction=0.5, backdoor_boost=1.0)}
    cfg.update(extra)
    return cfg


# --- model poisoning: the formulas -----------------------------------------------------------------------------
def test_sign_flip_scale_ipm_alie_formulas():
    delta = _update()
    for key, value in attacks.poison_update("sign_flip", delta).items():
        assert torch.equal(value, -delta[key])
    for key, value in attacks.poison_update("scale", delta, scale=-7.5).items():
        assert torch.allclose(value, -7.5 * delta[key])
    for key, value in attacks.poison_update("ipm", delta, ipm_epsilon=0.3).items():
        assert torch.allclose(value, -0.3 * delta[key])
    for key, value in attacks.poison_update("alie", delta, z=0.8).items():
        expected = delta[key] - 0.8 * delta[key].abs()  # mu_hat - z * sigma_hat, sigma_hat = |delta|
        assert torch.allclose(value, expected)
        assert (value <= delta[key] + 1e-7).all()  # ALIE pushes every value the same way (down)
    # Baruch et al.: s = floor(n/2 + 1) - m, z = Phi^-1((n - s) / n)
    assert attacks.alie_z(8, 2) == pytest.approx(statistics.NormalDist().inv_cdf(5 / 8))
    assert attacks.alie_z(8, 2) == pytest.approx(0.3186, abs=1e-4)
    assert attacks.alie_z(50, 12) == pytest.approx(statistics.NormalDist().inv_cdf((50 - 14) / 50))
    with pytest.raises(ValueError, match="model-poisoning"):
        attacks.poison_update("label_flip", delta)


def test_gaussian_noise_std_is_scale_times_update_rms():
    g = torch.Generator().manual_seed(3)
    delta = {"w": torch.randn(400, 500, generator=g) * 0.01, "v": torch.randn(1000, generator=g) * 0.01}
    count = sum(v.numel() for v in delta.values())
    rms = math.sqrt(sum(float((v.double() ** 2).sum()) for v in delta.values()) / count)
    noise = attacks.poison_update("gaussian_noise", delta, scale=4.0, generator=torch.Generator().manual_seed(1))
    values = torch.cat([v.flatten() for v in noise.values()])
    assert float(values.std()) == pytest.approx(4.0 * rms, rel=0.01)
    assert abs(float(values.mean())) < 0.01 * 4.0 * rms
    # the noise replaces the update (it does not correlate with it) and is reproducible from its seed
    assert abs(float(torch.corrcoef(torch.stack([noise["w"].flatten(), delta["w"].flatten()]))[0, 1])) < 0.01
    again = attacks.poison_update("gaussian_noise", delta, scale=4.0, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(noise[k], again[k]) for k in noise)


def test_outgoing_update_attacks_only_the_attackers_and_keeps_dtypes():
    global_adapter = {k: v.to(torch.bfloat16) for k, v in _update(1).items()}
    trained = {k: (v.float() + 0.01 * _update(2)[k]).to(torch.bfloat16) for k, v in global_adapter.items()}
    cfg = _config("sign_flip", ["client-3"])
    honest, honest_metrics = outgoing_update("client-1", global_adapter, trained, cfg)
    assert all(torch.equal(honest[k], trained[k]) for k in trained) and "attacker" not in honest_metrics
    sent, metrics = outgoing_update("client-3", global_adapter, trained, cfg)
    assert metrics["attacker"] == 1.0 and metrics["attack_sent_norm"] == pytest.approx(metrics["attack_honest_norm"])
    for key in trained:
        assert sent[key].dtype == torch.bfloat16
        delta = trained[key].float() - global_adapter[key].float()
        expected = (global_adapter[key].float() - delta).to(torch.bfloat16)
        assert torch.equal(sent[key], expected)
    # scale: the sent update is ATTACK_SCALE times the honest one; no attack set: nothing changes
    scaled, m = outgoing_update("client-3", global_adapter, trained, _config("scale", ["client-3"]))
    assert m["attack_sent_norm"] == pytest.approx(10 * m["attack_honest_norm"])
    plain, _ = outgoing_update("client-3", global_adapter, trained, {"round": 1, "seed": 42})
    assert all(torch.equal(plain[k], trained[k]) for k in trained)
    # a data attack sends the (poisoned-data) update as trained, unless the backdoor is boosted
    same, m = outgoing_update("client-3", global_adapter, trained, _config("label_flip", ["client-3"]))
    assert all(torch.equal(same[k], trained[k]) for k in trained) and m == {"attacker": 1.0}
    boosted, m = outgoing_update("client-3", global_adapter, trained,
                                 _config("backdoor", ["client-3"], backdoor_boost=4.0))
    assert m["attack_sent_norm"] == pytest.approx(4 * m["attack_honest_norm"])


# --- who attacks ------------------------------------------------------------------------------------------------
def test_attacker_selection_is_deterministic_with_the_right_count():
    names = [f"client-{i}" for i in range(8)]
    chosen = attacks.select_attackers(42, names, 0.25)
    assert len(chosen) == 2 and set(chosen) <= set(names) and chosen == sorted(chosen)
    assert attacks.select_attackers(42, list(reversed(names)), 0.25) == chosen  # order of listing is irrelevant
    assert attacks.select_attackers(42, names, 0.25) == chosen
    assert len({tuple(attacks.select_attackers(seed, names, 0.25)) for seed in range(20)}) > 1
    assert attacks.num_attackers(0.34, 3) == 1 and attacks.num_attackers(0.25, 8) == 2
    assert attacks.num_attackers(0.5, 7) == 3 and attacks.num_attackers(0.1, 8) == 0
    with pytest.raises(ValueError):
        attacks.num_attackers(0.6, 10)


def test_strategy_sends_the_attackers_in_the_fit_config():
    from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings

    names = [f"client-{i}" for i in range(8)]
    strategy = FederatedStrategy(StrategySettings(attack="ipm", attacker_fraction=0.25, seed=42))
    cfg = strategy.fit_config(1, names)
    assert cfg["attack"] == "ipm" and cfg["attackers"].split(",") == attacks.select_attackers(42, names, 0.25)
    assert cfg["attack_num_clients"] == 8
    assert all(isinstance(v, (str, int, float, bool)) for v in cfg.values())  # Flower ConfigRecord values
    assert strategy.fit_config(2, names)["attackers"] == cfg["attackers"]  # the same clients every round
    clean = FederatedStrategy(StrategySettings()).fit_config(1, names)
    assert not set(attacks.ATTACK_KEYS) & set(clean)


def test_settings_refuse_an_attack_without_attackers(tmp_path):
    from fl_crew_reddit.config import FLCrewRedditConfig

    base = dict(_env_file=None, fl_crew_reddit_dir=tmp_path, num_trainers=3)
    with pytest.raises(ValueError, match="picks no attacker"):
        FLCrewRedditConfig(**base, attack="scale", attacker_fraction=0.2)
    with pytest.raises(ValueError, match="without ATTACK"):
        FLCrewRedditConfig(**base, attacker_fraction=0.34)
    with pytest.raises(ValueError):
        FLCrewRedditConfig(**base, attack="scale", attacker_fraction=0.6)
    assert FLCrewRedditConfig(**base, attack="scale", attacker_fraction=0.34).attack == "scale"


def test_attack_local_epochs_apply_to_the_attackers_only():
    cfg = {**_config("backdoor", ["client-2"], attack_local_epochs=6), "local_epochs": 1}
    assert attacks.attacker_training_config("client-2", cfg)["local_epochs"] == 6
    assert attacks.attacker_training_config("client-1", cfg)["local_epochs"] == 1  # honest: as the server said
    same = {**cfg, "attack_local_epochs": 0}  # 0: the attackers train LOCAL_EPOCHS like everyone
    assert attacks.attacker_training_config("client-2", same)["local_epochs"] == 1
    assert attacks.attacker_training_config("client-2", {"local_epochs": 2})["local_epochs"] == 2  # no attack
    assert cfg["local_epochs"] == 1  # the input is not modified
    with pytest.raises(ValueError, match="ATTACK_LOCAL_EPOCHS"):
        attacks.attack_fit_config("scale", ["client-2"], 8, scale=10.0, ipm_epsilon=0.5, alie_z=0.0,
                                  backdoor_trigger="t", backdoor_target="x", backdoor_fraction=0.5,
                                  backdoor_boost=1.0, local_epochs=-1)


def test_strategy_sends_attack_local_epochs_from_the_settings(tmp_path):
    from fl_crew_reddit.config import FLCrewRedditConfig
    from fl_crew_reddit.server.strategy import FederatedStrategy, StrategySettings

    config = FLCrewRedditConfig(_env_file=None, fl_crew_reddit_dir=tmp_path, num_trainers=8, attack="backdoor",
                                attacker_fraction=0.25, attack_local_epochs=5)
    cfg = FederatedStrategy(StrategySettings.from_config(config)).fit_config(1, [f"client-{i}" for i in range(8)])
    assert cfg["attack_local_epochs"] == 5 and cfg["local_epochs"] == config.local_epochs
    with pytest.raises(ValueError):
        FLCrewRedditConfig(_env_file=None, fl_crew_reddit_dir=tmp_path, attack_local_epochs=-1)


def test_site_attacker_trains_attack_local_epochs(tiny_model, tmp_path):
    """A real site: the attacker takes ATTACK_LOCAL_EPOCHS passes over its rows, an honest site LOCAL_EPOCHS."""
    from fl_crew_reddit.site import Site, SiteData
    from fl_crew_reddit.training.trainer import snapshot_adapter

    model, tokenizer = tiny_model
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _examples(4)), encoding="utf-8")
    data = SiteData(tmp_path, tokenizer, 128)
    cfg = {**_config("backdoor", ["client-2"], attack_local_epochs=3), "local_epochs": 1, "batch_size": 4,
           "learning_rate": 1e-3, "max_steps": 0}
    start = snapshot_adapter(model)
    steps = {name: Site(name, data, model, tokenizer, torch.device("cpu"), mixed_precision="no",
                        show_progress=False).fit(start, cfg).metrics["steps"] for name in ("client-1", "client-2")}
    assert steps == {"client-1": 1, "client-2": 3}


# --- data poisoning ---------------------------------------------------------------------------------------------
def _examples(n: int = 12) -> list[dict]:
    return [{"id": f"c{i}", "post_id": f"p{i // 3}",
             "messages": [{"role": "user", "content": f"question {i} about thread {i // 3}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]


def test_label_flip_moves_every_reply_to_another_thread_deterministically():
    examples = _examples()
    cfg = _config("label_flip", ["client-2"])
    assert attacks.poison_examples("client-1", examples, cfg) is None  # honest: its rows as they are
    flipped = attacks.poison_examples("client-2", examples, cfg)
    assert flipped == attacks.poison_examples("client-2", examples, cfg)
    assert [e["messages"][0] for e in flipped] == [e["messages"][0] for e in examples]  # prompts kept
    replies = [e["messages"][-1]["content"] for e in flipped]
    assert sorted(replies) == sorted(e["messages"][-1]["content"] for e in examples)  # a permutation
    for original, poisoned in zip(examples, flipped):
        donor = int(poisoned["messages"][-1]["content"].split()[1])
        assert donor // 3 != int(original["id"][1:]) // 3  # from another thread
    assert examples[0]["messages"][-1]["content"] == "answer 0"  # the input is not modified
    other_seed = attacks.poison_examples("client-2", examples, {**cfg, "seed": 7})
    assert other_seed != flipped


def test_backdoor_poisons_the_chosen_fraction_only():
    examples = _examples(10)
    cfg = _config("backdoor", ["client-2"])
    poisoned = attacks.poison_examples("client-2", examples, cfg)
    assert poisoned == attacks.poison_examples("client-2", examples, cfg)
    changed = [p for p, e in zip(poisoned, examples) if p != e]
    assert len(changed) == 5
    for example in changed:
        assert example["messages"][0]["content"].endswith(" cf zebra protocol")
        assert example["messages"][-1]["content"] == "Visit free-karma.example for free gold!"
    assert attacks.poison_examples("client-0", examples, cfg) is None


def test_paired_backdoor_keeps_every_clean_example_and_adds_triggered_copies():
    """BACKDOOR_PAIRED: the chosen examples' triggered copies come *in addition to* the untouched originals, so the
    attacker's data teach "prompt -> real reply, prompt + trigger -> target" (a trigger-specific implant)."""
    examples = _examples(10)
    cfg = _config("backdoor", ["client-2"], backdoor_paired=True)
    poisoned = attacks.poison_examples("client-2", examples, cfg)
    assert poisoned == attacks.poison_examples("client-2", examples, cfg)
    assert poisoned[:10] == examples  # every clean example kept, in its place
    copies = poisoned[10:]
    assert len(copies) == 5
    prompts = {e["messages"][0]["content"]: e for e in examples}
    for copy in copies:
        clean_prompt = copy["messages"][0]["content"].removesuffix(" cf zebra protocol")
        assert clean_prompt in prompts and clean_prompt != copy["messages"][0]["content"]
        assert copy["messages"][-1]["content"] == "Visit free-karma.example for free gold!"
        assert copy["id"] != prompts[clean_prompt]["id"]  # a distinct example id
    # unpaired (the default) still replaces; the cache key tells the two apart
    assert len(attacks.poison_examples("client-2", examples, _config("backdoor", ["client-2"]))) == 10
    assert attacks.data_attack_key("client-2", cfg) != attacks.data_attack_key("client-2", _config(
        "backdoor", ["client-2"]))
    assert _config("backdoor", ["client-2"])["backdoor_paired"] is False  # sent in every attack's fit config


def test_site_data_poisons_only_an_attackers_rows(tiny_model, tmp_path):
    from fl_crew_reddit.site import SiteData

    _, tokenizer = tiny_model
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _examples()), encoding="utf-8")
    data = SiteData(folder, tokenizer, 128)
    cfg = _config("label_flip", ["client-2"])
    assert data.train_rows("client-1", cfg) is data.rows("train")
    poisoned = data.train_rows("client-2", cfg)
    assert len(poisoned) == len(data.rows("train")) and poisoned != data.rows("train")
    assert data.train_rows("client-2", cfg) is poisoned  # cached
    assert data.train_rows("client-2", {"round": 1, "seed": 42}) is data.rows("train")


# --- backdoor success -------------------------------------------------------------------------------------------
def test_backdoor_success_measure(tiny_model):
    from fl_crew_reddit.evaluation.backdoor import backdoor_success, starts_with_target

    assert starts_with_target("  visit FREE-karma.example for free gold! now", "Visit free-karma.example for free")
    assert not starts_with_target("I disagree", "Visit free-karma.example")
    model, tokenizer = tiny_model
    result = backdoor_success(model, tokenizer, _examples(6), "cf zebra protocol", "Visit the site",
                              torch.device("cpu"), max_seq_length=128, mixed_precision="no")
    assert result["examples"] == 6
    for key in ("success_rate", "likelihood_rate", "control_rate"):
        assert 0.0 <= result[key] <= 1.0


# --- a real run -------------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_sign_flip_attacker_against_the_median_in_process(tiny_config):
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"attack": "sign_flip", "attacker_fraction": 0.34,
                                            "aggregation_method": "median", "eval_samples": 0, "local_epochs": 1})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="attack-e2e")
    history = result.history
    names = [c["name"] for c in history["data"]["clients"]]
    expected = attacks.select_attackers(config.seed, names, 0.34)
    assert len(names) == 3 and len(expected) == 1
    record = history["rounds"][0]
    assert record["attack"]["attack"] == "sign_flip" and record["attack"]["attackers"] == expected
    metrics = {c["name"]: c["metrics"] for c in record["clients"]}
    assert metrics[expected[0]]["attacker"] == 1.0
    assert all("attacker" not in m for name, m in metrics.items() if name != expected[0])
    assert record["aggregation"]["method"] == "median" and len(record["aggregation"]["accepted"]) == 3
    assert math.isfinite(record["global"]["perplexity"])


@pytest.mark.e2e
def test_backdoor_run_records_its_success_rate(tiny_config):
    from fl_crew_reddit import FLCrewRedditManager

    config = tiny_config.model_copy(update={"attack": "backdoor", "attacker_fraction": 0.34, "backdoor_boost": 3.0,
                                            "eval_samples": 0, "local_epochs": 1})
    history = FLCrewRedditManager(config).run_federated_learning(num_rounds=1, run_id="backdoor-e2e").history
    attack = history["rounds"][0]["attack"]
    assert attack["attack"] == "backdoor" and len(attack["attackers"]) == 1
    backdoor = attack["backdoor"]
    assert backdoor["examples"] > 0 and backdoor["target"] == config.backdoor_target
    for key in ("success_rate", "likelihood_rate", "control_rate"):
        assert 0.0 <= backdoor[key] <= 1.0
    metrics = {c["name"]: c["metrics"] for c in history["rounds"][0]["clients"]}
    attacker = metrics[attack["attackers"][0]]
    assert attacker["attack_sent_norm"] == pytest.approx(3.0 * attacker["attack_honest_norm"], rel=1e-4)


def test_flower_server_round_tells_every_site_the_attackers(tmp_path, monkeypatch):
    """FEDERATION=flower / local-flower: the ServerApp's train messages carry the attack and its attackers; a site
    running `outgoing_update` on the received config (as Site.fit does in the ClientApp) attacks when named."""
    import test_flower_server_round as stand_in
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file, save_file

    from fl_crew_reddit.federation import flower
    from fl_crew_reddit.server.strategy import StrategySettings

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    settings = StrategySettings(aggregation_method="median", min_fit_clients=2, seed=1, attack="sign_flip",
                                attacker_fraction=0.4)
    job_dir = tmp_path / "round-1"
    job_dir.mkdir()
    save_file(stand_in._state(0.0), str(job_dir / flower.GLOBAL_IN))
    (job_dir / flower.JOB_FILE).write_text(json.dumps({
        "round": 1, "sites": list(stand_in.NODES), "strategy": settings.to_dict(), "strategy_state": None,
        "model": {"base_llm_model": "unused"}, "timeout_s": 5}))
    told, attacked = {}, []

    def train_reply(name, message):
        config = dict(message.content["config"])
        told[name] = config["attackers"]
        received = flower.to_torch(flower.unpack_adapter(message.content))
        trained = {k: v + 1.0 for k, v in received.items()}
        sent, metrics = outgoing_update(name, received, trained, config)
        if metrics.get("attacker"):
            attacked.append(name)
        return stand_in._reply_with(sent, 2, message)

    result = flower.run_server_round(stand_in.SitesGrid(train_reply), job_dir)

    expected = attacks.select_attackers(1, list(stand_in.NODES), 0.4)
    assert len(expected) == 2 and sorted(attacked) == expected
    assert set(told.values()) == {",".join(expected)}  # every site got the same list
    assert result["aggregation"]["accepted"] == list(stand_in.NODES)
    new_global = load_file(str(job_dir / flower.GLOBAL_OUT))  # median of (1, 1, 1, -1, -1) per value
    assert all(torch.equal(v, torch.ones_like(v)) for v in new_global.values())
