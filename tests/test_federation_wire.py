"""The pieces of the Flower path that need no deployment: arrays as ArrayRecords (no pickle), the site worker's
frames, and combining the sites' NLL sums exactly as the in-process evaluator does."""
import socket
import threading

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fl_crew_reddit.evaluation.metrics import perplexity
from fl_crew_reddit.federation.flower import from_array_record, serialized_bytes, to_array_record
from fl_crew_reddit.federation.site_worker import recv_frame, send_frame
from fl_crew_reddit.server.evaluation import combine_split


def test_adapter_arrays_round_trip_bit_exactly_through_an_array_record():
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4)}
    record = to_array_record(state)
    assert all(array.stype == "numpy.ndarray" for array in record.values())
    back = from_array_record(record)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == torch.float32 for k in state)
    assert serialized_bytes(record) >= sum(v.numel() * 4 for v in state.values())


def test_an_array_that_is_not_numpy_bytes_is_refused_not_unpickled():
    forged = Array(dtype="float32", shape=(2,), stype="torch.pickle", data=b"\x80\x04K\x01.")
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        from_array_record(ArrayRecord({"w": forged}))
    pickled = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b"\x93NUMPY")
    with pytest.raises(ValueError):  # np.load(allow_pickle=False) refuses object arrays / bad payloads
        from_array_record(ArrayRecord({"w": pickled}))


def test_site_worker_frames_carry_a_json_header_and_safetensors_bytes():
    from safetensors.numpy import load, save

    left, right = socket.socketpair()
    body = save({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    sender = threading.Thread(target=send_frame, args=(left, {"op": "train", "config": {"round": 1}}, body))
    sender.start()
    header, received = recv_frame(right)
    sender.join()
    left.close()
    right.close()
    assert header == {"op": "train", "config": {"round": 1}}
    assert np.array_equal(load(received)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_sites_sums_combine_by_token_counts():
    sums = {"client-0": (120.5, 40), "client-1": (0.0, 0), "client-2": (61.25, 20)}
    overall, per_client, count = combine_split(sums, per_client_from=2)
    assert count == 60 and overall == perplexity(120.5 + 0.0 + 61.25, 60)
    assert per_client == {"client-0": perplexity(120.5, 40), "client-2": perplexity(61.25, 20)}
    assert combine_split({"only": (3.0, 2)}, per_client_from=2)[1] == {}
    assert combine_split({"x": (0.0, 0)}) == (None, {}, 0)
