"""One AGGREGATION_METHOD of each kind drives a real round end to end (tiny model, one round) and yields a finite
model: client-side (fedprox sends mu), robust (krum, trimmed_mean), exact LoRA (svd_exact) and a server optimizer
(fedadam). Every method's arithmetic on adapter updates is checked without a model in tests/test_strategy.py, and
weighted_average runs in tests/test_e2e.py."""
import math

import pytest

from fl_crew_reddit import FLCrewRedditManager

ONE_OF_EACH_KIND = ("fedprox", "krum", "trimmed_mean", "svd_exact", "fedadam")


@pytest.mark.e2e
@pytest.mark.parametrize("method", ONE_OF_EACH_KIND)
def test_each_aggregation_method_completes_a_round(tiny_config, method):
    config = tiny_config.model_copy(update={"aggregation_method": method, "eval_samples": 0, "local_epochs": 1,
                                            "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    record = result.history["rounds"][0]
    assert record["aggregation"]["method"] == method
    assert record["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    assert math.isfinite(record["global"]["perplexity"])
    assert result.final_adapter is not None


@pytest.mark.e2e
def test_ffa_lora_keeps_a_shared_sends_half_and_averages_exactly(tiny_config):
    # Prepare
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    config = tiny_config.model_copy(update={"ffa_lora": True, "aggregation_method": "fedavg", "eval_samples": 0,
                                            "local_epochs": 1, "max_examples_per_client": 8})
    # Execute
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=2)
    # Assert
    rounds = result.history["rounds"]
    globals_ = [load_file(str(Path(r["aggregation"]["adapter_path"]) / "adapter_model.safetensors")) for r in rounds]
    a_keys = [k for k in globals_[0] if "lora_A" in k]
    b_keys = [k for k in globals_[0] if "lora_B" in k]
    assert a_keys and b_keys
    assert all(torch.equal(globals_[0][k], globals_[1][k]) for k in a_keys)  # A never moves
    assert any(not torch.equal(globals_[0][k], globals_[1][k]) for k in b_keys)
    clients = rounds[1]["clients"]
    sent = [load_file(str(Path(c["adapter_path"]) / "update.safetensors")) for c in clients]
    assert all(sorted(s) == sorted(b_keys) for s in sent)
    full_bytes = (Path(clients[0]["adapter_path"]) / "adapter_model.safetensors").stat().st_size
    assert all(c["metrics"]["update_bytes"] < 0.6 * full_bytes for c in clients)
    weights = torch.tensor([c["num_examples"] for c in clients], dtype=torch.float32)
    weights = weights / weights.sum()
    for key in b_keys:  # the new global B is the example-weighted mean of the clients' B: exact, since A is shared
        expected = sum(w * s[key].float() for w, s in zip(weights, sent))
        torch.testing.assert_close(globals_[1][key].float(), expected, rtol=1e-5, atol=1e-7)
