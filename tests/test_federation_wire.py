"""The pieces of the Flower path that need no deployment: adapters as one flat numpy Array per dtype and a layout
(no pickle), the site worker's frames, and combining the sites' NLL sums exactly as the in-process evaluator does."""
import socket
import threading

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fl_crew_reddit.evaluation.metrics import perplexity
from fl_crew_reddit.federation.flower import pack_adapter, serialized_bytes, to_torch, unpack_adapter
from fl_crew_reddit.federation.site_worker import recv_frame, send_frame
from fl_crew_reddit.server.evaluation import combine_split


def test_adapter_arrays_round_trip_bit_exactly_as_one_flat_array_per_dtype():
    state = {"a.lora_A.weight": torch.randn(4, 8), "a.lora_B.weight": torch.randn(8, 4),
             "b.scale": torch.tensor(2.5, dtype=torch.float64), "c.empty": torch.zeros(0, 3)}
    content = pack_adapter(state)
    assert sorted(content["arrays"]) == ["float32", "float64"]  # 2 Flower objects, not one per tensor
    assert all(array.stype == "numpy.ndarray" for array in content["arrays"].values())
    back = to_torch(unpack_adapter(content))
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    assert back["a.lora_A.weight"].shape == (4, 8) and back["b.scale"].shape == ()
    assert serialized_bytes(content) >= sum(v.numel() * v.element_size() for v in state.values())


def test_packing_cuts_flower_objects_from_two_per_tensor_to_a_handful():
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    state = {f"layer{i}.lora_{ab}.weight": torch.randn(8, 16) for i in range(30) for ab in "AB"}
    per_tensor = RecordDict({"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})})
    assert len(get_all_nested_objects(per_tensor)) > 2 * len(state)
    assert len(get_all_nested_objects(pack_adapter(state))) <= 6


def test_an_array_that_is_not_numpy_bytes_is_refused_not_unpickled():
    content = pack_adapter({"w": torch.ones(2)})
    content["arrays"] = ArrayRecord({"float32": Array(dtype="float32", shape=(2,), stype="torch.pickle",
                                                      data=b"\x80\x04K\x01.")})
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        unpack_adapter(content)
    content["arrays"] = ArrayRecord({"float32": Array(dtype="object", shape=(1,), stype="numpy.ndarray",
                                                      data=b"\x93NUMPY")})
    with pytest.raises(ValueError):  # np.load(allow_pickle=False) refuses object arrays / bad payloads
        unpack_adapter(content)


@pytest.mark.parametrize("layout, error", [
    ({"keys": ["w", "v"], "dtypes": ["float32", "float32"], "shapes": "[[2], [2]]"}, "ends before"),
    ({"keys": ["w"], "dtypes": ["float32"], "shapes": "[[1]]"}, "no key accounts for"),
    ({"keys": ["w"], "dtypes": ["float64"], "shapes": "[[2]]"}, "no float64 array"),
    ({"keys": ["w", "w"], "dtypes": ["float32", "float32"], "shapes": "[[1], [1]]"}, "one to one"),
    ({"keys": ["w"], "dtypes": ["float32"], "shapes": "[[-2]]"}, "not a list of sizes"),
])
def test_a_layout_that_does_not_account_for_every_element_is_refused(layout, error):
    content = pack_adapter({"w": torch.ones(2)})
    content["layout"] = ConfigRecord(layout)
    with pytest.raises(ValueError, match=error):
        unpack_adapter(content)


def test_a_tensor_of_a_dtype_that_cannot_travel_is_refused_when_packed():
    with pytest.raises(TypeError, match="cannot travel"):
        pack_adapter({"w": np.array(["a"], dtype=object)})


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
