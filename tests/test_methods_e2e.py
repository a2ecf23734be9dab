"""Every AGGREGATION_METHOD drives a real round end to end (tiny model, one round) and yields a finite model."""
import math

import pytest

from fl_crew_reddit import FLCrewRedditManager
from fl_crew_reddit.aggregation import SUPPORTED_METHODS


@pytest.mark.e2e
@pytest.mark.parametrize("method", SUPPORTED_METHODS)
def test_each_aggregation_method_completes_a_round(tiny_config, method):
    config = tiny_config.model_copy(update={"aggregation_method": method, "eval_samples": 0, "local_epochs": 1,
                                            "max_examples_per_client": 8})
    result = FLCrewRedditManager(config).run_federated_learning(num_rounds=1)
    record = result.history["rounds"][0]
    assert record["aggregation"]["method"] == method
    assert record["aggregation"]["accepted"] == ["client-0", "client-1", "client-2"]
    assert math.isfinite(record["global"]["perplexity"])
    assert result.final_adapter is not None
