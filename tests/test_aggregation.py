"""Tests for fl_crew_reddit.aggregation: rules vs Flower's numpy reference,
exact LoRA aggregation, server optimizers. Tiny tensors; runs in about a second."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from flwr.server.strategy import aggregate as flower

from fl_crew_reddit.aggregation import (
    SUPPORTED_METHODS,
    FedAdagrad,
    FedAdam,
    FedAvgM,
    FedYogi,
    aggregate,
    ffa_lora_trainable,
    lora_pairs,
    lora_product_error,
    make_server_optimizer,
    svd_exact,
    weighted_average,
)
from fl_crew_reddit.aggregation._sortnet import median_block, sorted_block

SHAPES = {"layer.weight": (3, 5), "layer.bias": (7,), "head.weight": (2, 2, 3)}
PREFIX = "base_model.model.model.layers.0.self_attn"


def make_states(n, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    states = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(n)]
    counts = torch.randint(1, 100, (n,), generator=gen).tolist()
    return states, counts


def to_flower(states, counts):
    return [([s[k].numpy() for k in s], c) for s, c in zip(states, counts)]


def assert_close_to_flower(ours, theirs, atol=1e-6):
    assert list(ours) == list(SHAPES)
    for (key, value), ref in zip(ours.items(), theirs):
        assert value.shape == ref.shape, key
        np.testing.assert_allclose(value.numpy(), ref, rtol=0, atol=atol, err_msg=key)


# ----------------------------------------------------------------- Flower parity
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_fedavg_matches_flower(n):
    # Prepare
    states, counts = make_states(n, seed=n)
    # Execute
    ours = aggregate("fedavg", states, counts)
    # Assert
    assert_close_to_flower(ours, flower.aggregate(to_flower(states, counts)))


def test_weighted_average_uneven_counts_by_hand():
    a = {"w": torch.tensor([0.0, 4.0])}
    b = {"w": torch.tensor([8.0, 0.0])}
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([6.0, 1.0]))


def test_fedprox_is_fedavg_on_the_server():
    states, counts = make_states(4)
    prox, avg = aggregate("fedprox", states, counts), aggregate("fedavg", states, counts)
    for key in avg:
        assert torch.equal(prox[key], avg[key])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33])
def test_median_matches_flower(n):
    states, counts = make_states(n, seed=10 + n)
    ours = aggregate("median", states, counts)
    assert_close_to_flower(ours, flower.aggregate_median(to_flower(states, counts)))


def test_median_even_count_averages_the_two_middle_values():
    states = [{"w": torch.tensor([v])} for v in (1.0, 10.0, 2.0, 3.0)]
    assert aggregate("median", states, [1] * 4)["w"].item() == 2.5


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.49])
@pytest.mark.parametrize("n", [3, 8, 11])
def test_trimmed_mean_matches_flower(n, beta):
    states, counts = make_states(n, seed=20 + n)
    ours = aggregate("trimmed_mean", states, counts, beta=beta)
    assert_close_to_flower(ours, flower.aggregate_trimmed_avg(to_flower(states, counts), beta))


@pytest.mark.parametrize(("n", "f"), [(3, 0), (5, 1), (8, 2), (13, 3), (20, 5)])
def test_krum_and_multi_krum_match_flower(n, f):
    states, counts = make_states(n, seed=30 + n)
    results = to_flower(states, counts)
    ours = aggregate("krum", states, counts, num_byzantine=f)
    assert_close_to_flower(ours, flower.aggregate_krum(results, f, 0), atol=0)
    for m in sorted({1, 2, n - f, n}):
        ours = aggregate("multi_krum", states, counts, num_byzantine=f, num_selected=m)
        assert_close_to_flower(ours, flower.aggregate_krum(results, f, m))


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (12, 2), (15, 3)])
def test_bulyan_matches_flower(n, f):
    states, counts = make_states(n, seed=40 + n)
    ours = aggregate("bulyan", states, counts, num_byzantine=f)
    theirs = flower.aggregate_bulyan(to_flower(states, counts), f, flower.aggregate_krum, to_keep=0)
    assert_close_to_flower(ours, theirs)


def test_pairwise_distances_precise_despite_large_common_offset():
    # Prepare: clients differ by 1e-3 around an offset of 1e3 (float32 Gram would cancel)
    from fl_crew_reddit.aggregation import pairwise_sq_distances

    gen = torch.Generator().manual_seed(7)
    offset = 1e3 + torch.randn(500, generator=gen)
    states = [{"w": offset + 1e-3 * torch.randn(500, generator=gen)} for _ in range(5)]
    # Execute
    dist = pairwise_sq_distances(states)
    # Assert: equals direct float64 differences of the float32 inputs
    flat = torch.stack([s["w"] for s in states]).double()
    direct = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    torch.testing.assert_close(dist, direct, rtol=1e-6, atol=0)  # float32 per tile: ~1e-7 relative


def test_rules_match_flower_across_chunk_boundaries(monkeypatch):
    # Prepare: force several column chunks per key (1024 columns, last one partial)
    monkeypatch.setattr("fl_crew_reddit.aggregation._tensors.CHUNK_ELEMENTS", 1024)
    shapes = {"big.weight": (3, 1000), "small.bias": (5,)}
    states, counts = make_states(7, seed=99, shapes=shapes)
    results = to_flower(states, counts)
    cases = {
        ("median", ()): flower.aggregate_median(results),
        ("trimmed_mean", (("beta", 0.2),)): flower.aggregate_trimmed_avg(results, 0.2),
        ("multi_krum", (("num_byzantine", 1), ("num_selected", 3))): flower.aggregate_krum(results, 1, 3),
        ("bulyan", (("num_byzantine", 1),)): flower.aggregate_bulyan(list(results), 1, flower.aggregate_krum,
                                                                     to_keep=0),
    }
    for (method, opts), theirs in cases.items():
        # Execute
        ours = aggregate(method, states, counts, **dict(opts))
        # Assert
        for (key, value), ref in zip(ours.items(), theirs):
            np.testing.assert_allclose(value.numpy(), ref, rtol=0, atol=1e-6, err_msg=f"{method} {key}")


@pytest.mark.parametrize("n", list(range(1, 20)) + [31, 32, 33, 64])
def test_sorting_network_matches_torch_sort(n):
    gen = torch.Generator().manual_seed(n)
    values = torch.randint(-3, 4, (n, 50), generator=gen).float()  # many ties
    flats = list(values)
    torch.testing.assert_close(sorted_block(flats, 5, 45), torch.sort(values[:, 5:45], 0).values)
    np.testing.assert_array_equal(median_block(flats, 0, 50).numpy(), np.median(values.numpy(), 0))


# ----------------------------------------------------------------- robustness
def test_robust_rules_resist_sign_flipped_scaled_updates():
    # Prepare: 8 clients share a mean update; clients 6, 7 send it flipped x10
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(200, generator=gen)
    honest = [clean + 0.1 * torch.randn(200, generator=gen) for _ in range(6)]
    states = [{"w": u} for u in honest] + [{"w": -10.0 * clean}] * 2
    counts = [10] * 8
    # Execute
    errors = {
        method: float(torch.linalg.norm(aggregate(method, states, counts, **opts)["w"] - clean))
        for method, opts in {
            "fedavg": {},
            "krum": {"num_byzantine": 2},
            "multi_krum": {"num_byzantine": 2},
            "median": {},
            "trimmed_mean": {"beta": 0.25},
        }.items()
    }
    # Assert: robust rules stay within the honest noise, fedavg is dragged away
    scale = float(torch.linalg.norm(clean))
    assert errors["fedavg"] > 2.0 * scale
    for method in ("krum", "multi_krum", "median", "trimmed_mean"):
        assert errors[method] < 0.15 * scale, (method, errors[method])


# ----------------------------------------------------------------- contract
def test_inputs_unchanged_and_dtype_preserved():
    states, counts = make_states(7)
    states = [{k: v.to(torch.bfloat16) for k, v in s.items()} for s in states]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    for method, opts in [("fedavg", {}), ("median", {}), ("trimmed_mean", {}),
                         ("krum", {"num_byzantine": 1}), ("bulyan", {"num_byzantine": 1})]:
        out = aggregate(method, states, counts, **opts)
        assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in out.values())
        assert all(out[k].data_ptr() != s[k].data_ptr() for s in states for k in s)
    for s, b in zip(states, before):
        assert all(torch.equal(s[k], b[k]) for k in s)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s, c: aggregate("nope", s, c), "supported: weighted_average"),
        (lambda s, c: aggregate("fedavg", s, c[:-1]), "len(num_examples)"),
        (lambda s, c: aggregate("fedavg", s, [-1] + c[1:]), "non-negative"),
        (lambda s, c: aggregate("fedavg", s, [0] * len(c)), "positive"),
        (lambda s, c: aggregate("fedavg", [s[0], {"x": s[1]["layer.bias"]}] + s[2:], c),
         "different keys"),
        (lambda s, c: aggregate("median", [s[0], {**s[1], "layer.bias": torch.ones(8)}] + s[2:], c),
         "shape mismatch"),
        (lambda s, c: aggregate("fedavg", [], []), "non-empty"),
        (lambda s, c: aggregate("krum", s, c, num_byzantine=2), "n > 2f + 2"),
        (lambda s, c: aggregate("multi_krum", s, c, num_byzantine=1, num_selected=0), "num_selected"),
        (lambda s, c: aggregate("bulyan", s, c, num_byzantine=1), "n >= 4f + 3"),
        (lambda s, c: aggregate("trimmed_mean", s, c, beta=0.5), "beta"),
        (lambda s, c: aggregate("fedadam", s, c), "server_optimizer"),
    ],
)
def test_invalid_arguments_raise_value_error(call, message):
    states, counts = make_states(6)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(states, counts)


def test_unknown_method_lists_all_supported():
    with pytest.raises(ValueError) as err:
        aggregate("fedsgd", *make_states(2))
    assert all(name in str(err.value) for name in SUPPORTED_METHODS)


# ----------------------------------------------------------------- LoRA
def lora_state(a, b, extra=None):
    state = {f"{PREFIX}.q_proj.lora_A.weight": a, f"{PREFIX}.q_proj.lora_B.weight": b}
    state.update(extra or {})
    return state


def avg_product(states, counts):
    total = sum(counts)
    return sum(c * s[f"{PREFIX}.q_proj.lora_B.weight"].double() @ s[f"{PREFIX}.q_proj.lora_A.weight"].double()
               for s, c in zip(states, counts)) / total


def product(state):
    return state[f"{PREFIX}.q_proj.lora_B.weight"].double() @ state[f"{PREFIX}.q_proj.lora_A.weight"].double()


def test_svd_exact_is_exact_when_clients_share_a_subspace():
    # Prepare: B_k = U M_k, A_k = N_k V -> every product lives in span(U) x span(V)
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(12, 4, generator=gen), torch.randn(4, 9, generator=gen)
    states = [lora_state(torch.randn(4, 4, generator=gen) @ v, u @ torch.randn(4, 4, generator=gen))
              for _ in range(3)]
    counts = [5, 1, 3]
    # Execute
    exact, plain = svd_exact(states, counts), weighted_average(states, counts)
    # Assert
    torch.testing.assert_close(product(exact), avg_product(states, counts), rtol=1e-5, atol=1e-5)
    assert lora_product_error(states, counts, exact) < 1e-6
    assert lora_product_error(states, counts, plain) > 0.1  # factor averaging misses


def test_svd_exact_exact_for_rank_one_clients_when_rank_allows():
    # 4 clients with rank-1 updates, adapter rank 4 >= total rank 4
    gen = torch.Generator().manual_seed(2)
    states = []
    for _ in range(4):
        a, b = torch.zeros(4, 10), torch.zeros(8, 4)
        a[0], b[:, 0] = torch.randn(10, generator=gen), torch.randn(8, generator=gen)
        states.append(lora_state(a, b))
    counts = [1, 2, 3, 4]
    exact = svd_exact(states, counts)
    torch.testing.assert_close(product(exact), avg_product(states, counts), rtol=1e-5, atol=1e-5)


def test_svd_exact_is_best_rank_r_approximation_otherwise():
    gen = torch.Generator().manual_seed(3)
    states = [lora_state(torch.randn(3, 10, generator=gen), torch.randn(9, 3, generator=gen))
              for _ in range(4)]
    counts = [3, 1, 4, 1]
    target = avg_product(states, counts)
    singular = torch.linalg.svdvals(target)
    eckart_young = float(singular[3:].norm() / singular.norm())
    exact = svd_exact(states, counts)
    assert math.isclose(lora_product_error(states, counts, exact), eckart_young, rel_tol=1e-5)
    direct = float(torch.linalg.norm(target - product(exact)) / torch.linalg.norm(target))
    assert math.isclose(direct, eckart_young, rel_tol=1e-4)
    assert lora_product_error(states, counts, weighted_average(states, counts)) > eckart_young


def test_svd_exact_averages_other_keys_plainly_and_keeps_shapes_and_dtype():
    gen = torch.Generator().manual_seed(4)
    states = [lora_state(torch.randn(2, 6, generator=gen).half(), torch.randn(5, 2, generator=gen).half(),
                         {"lm_head.modules_to_save.default.weight": torch.randn(3, generator=gen).half()})
              for _ in range(3)]
    out = svd_exact(states, [1, 1, 2])
    assert list(out) == list(states[0])
    assert all(out[k].shape == states[0][k].shape and out[k].dtype == torch.float16 for k in out)
    key = "lm_head.modules_to_save.default.weight"
    torch.testing.assert_close(out[key], weighted_average(states, [1, 1, 2])[key])


def test_ffa_lora_shared_a_makes_plain_averaging_exact():
    gen = torch.Generator().manual_seed(5)
    shared_a = torch.randn(3, 7, generator=gen)
    states = [lora_state(shared_a, torch.randn(6, 3, generator=gen)) for _ in range(4)]
    assert lora_product_error(states, [1, 2, 3, 4], weighted_average(states, [1, 2, 3, 4])) < 1e-6
    assert not ffa_lora_trainable(f"{PREFIX}.q_proj.lora_A.weight")
    assert ffa_lora_trainable(f"{PREFIX}.q_proj.lora_B.weight")
    assert not ffa_lora_trainable("base_model.model.embed_tokens.lora_embedding_A.default")
    assert ffa_lora_trainable("base_model.model.lm_head.modules_to_save.default.weight")


def test_lora_pairs_and_orphans():
    keys = [f"{PREFIX}.q_proj.lora_A.weight", f"{PREFIX}.q_proj.lora_B.weight", "bias"]
    assert lora_pairs(keys) == {keys[0]: keys[1]}
    with pytest.raises(ValueError, match="no partner"):
        lora_pairs(keys[:1])
    with pytest.raises(ValueError, match="without an A partner"):
        lora_pairs(keys[1:])


# ----------------------------------------------------------------- server optimizers
def test_fedavgm_two_steps_by_hand():
    opt = FedAvgM(server_lr=0.5, momentum=0.9)
    glob = {"w": torch.tensor([1.0, 2.0])}
    avg = {"w": torch.tensor([3.0, 0.0])}  # delta = [2, -2]
    first = opt.step(glob, avg)
    torch.testing.assert_close(first["w"], torch.tensor([2.0, 1.0]))  # 1 + 0.5*2
    second = opt.step(first, {"w": torch.tensor([3.0, 1.0])})  # delta = [1, 0]
    # v = 0.9 * [2, -2] + [1, 0] = [2.8, -1.8]; x = [2, 1] + 0.5 v
    torch.testing.assert_close(second["w"], torch.tensor([3.4, 0.1]))
    assert torch.equal(glob["w"], torch.tensor([1.0, 2.0]))  # input untouched


def test_fedadam_one_step_by_hand():
    opt = FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    glob = {"w": torch.tensor([1.0, -1.0]), "b": torch.zeros(1, dtype=torch.float64)}
    avg = {"w": torch.tensor([1.5, -2.0]), "b": torch.full((1,), 0.2, dtype=torch.float64)}
    out = opt.step(glob, avg)
    for key in glob:
        delta = (avg[key] - glob[key]).double()
        m, v = 0.1 * delta, 0.01 * delta**2
        eta_t = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9)
        expected = glob[key].double() + eta_t * m / (v.sqrt() + 1e-3)
        torch.testing.assert_close(out[key].double(), expected, rtol=1e-6, atol=1e-6)
        assert out[key].dtype == glob[key].dtype


def test_fedyogi_and_fedadagrad_one_step_by_hand():
    glob, avg = {"w": torch.tensor([0.0, 1.0])}, {"w": torch.tensor([0.5, 0.0])}
    delta = torch.tensor([0.5, -1.0])
    yogi = FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3).step(glob, avg)
    v_yogi = 0.01 * delta**2  # v0 = 0: v - (1-b2) d^2 sign(0 - d^2)
    torch.testing.assert_close(yogi["w"], glob["w"] + 0.01 * (0.1 * delta) / (v_yogi.sqrt() + 1e-3))
    ada = FedAdagrad(eta=0.1, tau=1e-9).step(glob, avg)
    torch.testing.assert_close(ada["w"], glob["w"] + 0.1 * delta / (delta.abs() + 1e-9))


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizer_state_round_trip(name):
    # Prepare: two steps, then copy the state into a fresh optimizer
    gen = torch.Generator().manual_seed(6)
    x = {"w": torch.randn(4, generator=gen)}
    averages = [{"w": torch.randn(4, generator=gen)} for _ in range(3)]
    straight = make_server_optimizer(name)
    for avg in averages[:2]:
        x = straight.step(x, avg)
    resumed = make_server_optimizer(name)
    resumed.load_state_dict(straight.state_dict())
    # Execute / Assert: the third step is identical
    torch.testing.assert_close(straight.step(x, averages[2]), resumed.step(x, averages[2]))
    assert resumed.steps == straight.steps == 3


def test_server_optimizer_state_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="not 'fedavgm'"):
        FedAvgM().load_state_dict(make_server_optimizer("fedadam").state_dict())


def test_aggregate_with_server_optimizer_and_unknown_optimizer():
    states, counts = make_states(3)
    glob = {k: torch.zeros_like(v) for k, v in states[0].items()}
    out = aggregate("fedavgm", states, counts, global_state=glob,
                    server_optimizer=make_server_optimizer("fedavgm", server_lr=1.0, momentum=0.0))
    avg = weighted_average(states, counts)
    for key in avg:
        torch.testing.assert_close(out[key], avg[key])
    with pytest.raises(ValueError, match="supported"):
        make_server_optimizer("sgd")
    with pytest.raises(ValueError, match="FedAdam"):
        aggregate("fedadam", states, counts, global_state=glob, server_optimizer=FedAvgM())


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13, 16, 31, 33])
def test_compiled_kernels_equal_eager_sorting_network(n, monkeypatch):
    # Prepare: odd tile edges (1000 + 37 columns) and many ties, so tiling, padding and pruning are all exercised
    from fl_crew_reddit.aggregation import _kernels
    if not _kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    gen = torch.Generator().manual_seed(n)
    shapes = {"w": (1037,), "b": (3,)}
    states = [{k: torch.randint(-4, 5, s, generator=gen).float() + 0.1 * torch.randn(s, generator=gen)
               for k, s in shapes.items()} for _ in range(n)]
    counts = list(range(1, n + 1))
    cases = [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("fedavg", {})]
    if n >= 7:
        cases.append(("bulyan", {"num_byzantine": (n - 3) // 4}))
    for method, options in cases:
        # Execute
        compiled = aggregate(method, states, counts, **options)
        monkeypatch.setattr(_kernels, "AVAILABLE", False)
        eager = aggregate(method, states, counts, **options)
        monkeypatch.setattr(_kernels, "AVAILABLE", True)
        # Assert
        for key in shapes:
            torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-6, msg=f"{method} {key}")


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16, 32, 64])
def test_pruned_network_gives_the_requested_ranks(size):
    from fl_crew_reddit.aggregation._kernels import comparators_for, odd_even_merge_sort_pairs
    gen = torch.Generator().manual_seed(size)
    values = torch.randint(-3, 4, (size, 200), generator=gen).float()
    expected = torch.sort(values, dim=0).values
    for ranks in [tuple(range(size)), ((size - 1) // 2, size // 2), (0,), (size - 1,)]:
        pairs = comparators_for(size, ranks)
        work = values.clone()
        for low, high in pairs.tolist():
            a, b = work[low].clone(), work[high].clone()
            work[low], work[high] = torch.minimum(a, b), torch.maximum(a, b)
        for rank in ranks:
            torch.testing.assert_close(work[rank], expected[rank])
        assert len(pairs) <= len(odd_even_merge_sort_pairs(size))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_pairwise_distances_equal_direct_differences_for_every_block_shape(n):
    # Prepare: two keys, one shorter than a tile, one spanning several tiles with a partial last one
    from fl_crew_reddit.aggregation import pairwise_sq_distances

    gen = torch.Generator().manual_seed(n)
    states = [{"a": torch.randn(300, generator=gen), "b": torch.randn(3, 4100, generator=gen)} for _ in range(n)]
    # Execute
    dist = pairwise_sq_distances(states)
    # Assert
    flat = torch.stack([torch.cat([s["a"].reshape(-1), s["b"].reshape(-1)]) for s in states]).double()
    direct = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    torch.testing.assert_close(dist, direct, rtol=1e-6, atol=1e-9)
    assert torch.equal(dist, dist.T)
