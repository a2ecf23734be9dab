"""Speed and agreement of fl_crew_reddit.aggregation against Flower's numpy rules.

Builds client adapters shaped like Mistral-7B's r=16 LoRA on q_proj and v_proj
(32 layers x {q: A 16x4096, B 4096x16; v: A 16x4096, B 1024x16} = 6.8M values),
runs each rule with ours and with flwr.server.strategy.aggregate on the same
inputs in this process, and prints seconds, speed-up and max abs difference.
Then times svd_exact against plain factor averaging and measures the relative
product error ||avg(BA) - B'A'|| / ||avg(BA)|| of both on three kinds of input.

The last line printed is one JSON object with every figure.

    .venv/bin/python benchmarks/aggregate_speed.py            # full (64 clients)
    .venv/bin/python benchmarks/aggregate_speed.py --quick    # 16 clients, 8 layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.server.strategy import aggregate as flower  # noqa: E402

from fl_crew_reddit.aggregation import (  # noqa: E402
    _kernels,  # noqa: E402
    aggregate,
    lora_product_error,
    svd_exact,
    weighted_average,
)
from fl_crew_reddit.aggregation.rules import bulyan_select  # noqa: E402

if _kernels.AVAILABLE:
    import numba

RANK = 16
HIDDEN = 4096
KV_OUT = 1024


def adapter_shapes(layers: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(layers):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        for proj, out in (("q_proj", HIDDEN), ("v_proj", KV_OUT)):
            shapes[f"{prefix}.{proj}.lora_A.weight"] = (RANK, HIDDEN)
            shapes[f"{prefix}.{proj}.lora_B.weight"] = (out, RANK)
    return shapes


def robust_clients(shapes, n, num_bad, gen):
    """Honest clients = shared model + client-specific noise (scale 0.5x..1.5x);
    the last ``num_bad`` send the honest update sign-flipped and scaled 10x."""
    base = {k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}
    scales = torch.linspace(0.5, 1.5, n)[torch.randperm(n, generator=gen)]
    states = []
    for i in range(n):
        state = {}
        for k, s in shapes.items():
            step = 1e-3 * float(scales[i]) * torch.randn(s, generator=gen)
            state[k] = base[k] + (-10.0 * step if i >= n - num_bad else step)
        states.append(state)
    counts = torch.randint(50, 500, (n,), generator=gen).tolist()
    return states, counts


def to_flower(states, counts, keys):
    return [([s[k].numpy() for k in keys], c) for s, c in zip(states, counts)]


def max_abs_diff(ours, theirs, keys):
    return max(float(np.max(np.abs(ours[k].double().numpy() - theirs[i].astype(np.float64))))
               for i, k in enumerate(keys))


def bulyan_ties(states, keys, num_byzantine, ours, theirs):
    """Where ours and Flower's Bulyan differ by > 1e-6: is it an exact float32 tie?

    Stage 2 keeps the theta - 2f values nearest to the median. When the last
    kept and the first dropped value are at exactly the same float32 distance,
    either is valid: we keep the lower one, numpy's argpartition keeps whichever
    its internal order reaches first. Returns (differing coords, of which ties,
    max abs diff over the remaining coords).
    """
    chosen = bulyan_select(states, num_byzantine)
    keep = len(chosen) - 2 * num_byzantine
    differing = ties = 0
    untied_max = 0.0
    for i, key in enumerate(keys):
        diff = np.abs(ours[key].double().numpy() - theirs[i].astype(np.float64)).reshape(-1)
        where = np.flatnonzero(diff > 1e-6)
        if where.size == 0:
            continue
        vals = np.stack([states[c][key].reshape(-1).numpy()[where] for c in chosen])
        med = np.median(vals, axis=0)
        dist = np.sort(np.abs(med - vals), axis=0)
        tied = dist[keep - 1] == dist[keep]
        differing += where.size
        ties += int(tied.sum())
        if (~tied).any():
            untied_max = max(untied_max, float(diff[where[~tied]].max()))
    return differing, ties, untied_max


def timed(fn, repeat=1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_rules(args, shapes, gen):
    keys = list(shapes)
    n, f = args.clients, args.num_byzantine
    states, counts = robust_clients(shapes, n, f, gen)
    res = to_flower(states, counts, keys)
    nb = min(args.bulyan_clients, n)
    fb = (nb - 3) // 4
    cases = {
        "fedavg": (n, lambda: aggregate("fedavg", states, counts),
                   lambda: flower.aggregate(res)),
        "krum": (n, lambda: aggregate("krum", states, counts, num_byzantine=f),
                 lambda: flower.aggregate_krum(res, f, 0)),
        "multi_krum": (n, lambda: aggregate("multi_krum", states, counts, num_byzantine=f,
                                            num_selected=n - f),
                       lambda: flower.aggregate_krum(res, f, n - f)),
        "median": (n, lambda: aggregate("median", states, counts),
                   lambda: flower.aggregate_median(res)),
        "trimmed_mean": (n, lambda: aggregate("trimmed_mean", states, counts, beta=0.2),
                         lambda: flower.aggregate_trimmed_avg(res, 0.2)),
        "bulyan": (nb, lambda: aggregate("bulyan", states[:nb], counts[:nb], num_byzantine=fb),
                   lambda: flower.aggregate_bulyan(list(res[:nb]), fb, flower.aggregate_krum,
                                                   to_keep=0)),
    }
    out = {}
    print(f"{'rule':<13}{'clients':>8}{'ours s':>10}{'flower s':>10}{'ratio':>9}{'max|diff|':>12}")
    for name, (clients, ours_fn, flower_fn) in cases.items():
        ours_fn()  # warm-up: compiles the numba kernels on a fresh checkout (then cached in __pycache__)
        ours_s, ours = timed(ours_fn, args.repeat)
        flower_s, theirs = timed(flower_fn, args.repeat)
        diff = max_abs_diff(ours, theirs, keys)
        out[name] = {"clients": clients, "ours_s": round(ours_s, 4), "flower_s": round(flower_s, 4),
                     "ratio": round(flower_s / ours_s, 2), "max_abs_diff": diff}
        if name in ("krum", "multi_krum"):
            out[name]["num_byzantine"] = f
        if name == "bulyan":
            differing, ties, untied = bulyan_ties(states[:nb], keys, fb, ours, theirs)
            out[name].update(num_byzantine=fb, coords_differing=differing,
                             of_which_float32_ties=ties, max_abs_diff_untied=untied)
        print(f"{name:<13}{clients:>8}{ours_s:>10.3f}{flower_s:>10.3f}{flower_s / ours_s:>9.1f}"
              f"{diff:>12.2e}")
        if name == "bulyan" and out[name]["coords_differing"]:
            print(f"  bulyan: {differing:,} of {sum(a * b for a, b in shapes.values()):,} "
                  f"coords differ, {ties} of them exact float32 distance ties; max |diff| elsewhere "
                  f"{untied:.2e}")
        del ours, theirs
    return out


def lora_clients(shapes, n, kind, gen):
    """Three input kinds for the product-error comparison.

    random: independent factors; shared: B_k = U M_k, A_k = N_k V^T (one rank-r
    subspace, so avg(BA) has rank <= r); drift: A_k = A_0 + 10% noise (same init).
    """
    keys = list(shapes)
    a_keys = [k for k in keys if "lora_A" in k]
    common = {}
    for a_key in a_keys:
        b_key = a_key.replace("lora_A", "lora_B")
        common[a_key] = torch.randn(shapes[a_key], generator=gen) / HIDDEN**0.5
        common[b_key] = torch.randn(shapes[b_key], generator=gen)
    states = []
    for _ in range(n):
        state = {}
        for a_key in a_keys:
            b_key = a_key.replace("lora_A", "lora_B")
            if kind == "random":
                state[a_key] = torch.randn(shapes[a_key], generator=gen) / HIDDEN**0.5
                state[b_key] = 0.01 * torch.randn(shapes[b_key], generator=gen)
            elif kind == "shared":
                mix_a = torch.randn(RANK, RANK, generator=gen)
                mix_b = torch.randn(RANK, RANK, generator=gen)
                state[a_key] = mix_a @ common[a_key]
                state[b_key] = 0.01 * common[b_key] @ mix_b
            else:
                noise = torch.randn(shapes[a_key], generator=gen) / HIDDEN**0.5
                state[a_key] = common[a_key] + 0.1 * noise
                state[b_key] = 0.01 * torch.randn(shapes[b_key], generator=gen)
        states.append(state)
    counts = torch.randint(50, 500, (n,), generator=gen).tolist()
    return states, counts


def bench_svd(args, shapes, gen):
    out = {"clients": args.svd_clients}
    print(f"\nsvd_exact vs plain factor averaging ({args.svd_clients} clients)")
    for kind in ("random", "shared", "drift"):
        states, counts = lora_clients(shapes, args.svd_clients, kind, gen)
        plain_s, plain = timed(lambda: weighted_average(states, counts), args.repeat)
        svd_s, exact = timed(lambda: svd_exact(states, counts), args.repeat)
        err_plain = lora_product_error(states, counts, plain)
        err_svd = lora_product_error(states, counts, exact)
        out[kind] = {"plain_s": round(plain_s, 4), "svd_exact_s": round(svd_s, 4),
                     "plain_rel_err": err_plain, "svd_exact_rel_err": err_svd}
        print(f"{kind:<8} plain {plain_s:.3f}s err {err_plain:.3e} | "
              f"svd_exact {svd_s:.3f}s err {err_svd:.3e}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 clients, 8 of 32 layers")
    parser.add_argument("--clients", type=int, default=None, help="default 64 (16 with --quick)")
    parser.add_argument("--layers", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--num-byzantine", type=int, default=None,
                        help="f for krum/multi_krum and number of attackers (default n // 8)")
    parser.add_argument("--bulyan-clients", type=int, default=16,
                        help="Flower's Bulyan reruns Krum theta times; n=64 would take ~10 min")
    parser.add_argument("--svd-clients", type=int, default=None, help="default 8 (4 with --quick)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=None,
                        help="best of N runs, for ours and Flower alike (default 3 with --quick, else 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.clients = args.clients or (16 if args.quick else 64)
    args.layers = args.layers or (8 if args.quick else 32)
    args.svd_clients = args.svd_clients or (4 if args.quick else 8)
    if args.num_byzantine is None:
        args.num_byzantine = args.clients // 8
    args.repeat = args.repeat or (3 if args.quick else 1)
    torch.set_num_threads(args.threads)
    if _kernels.AVAILABLE:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    gen = torch.Generator().manual_seed(args.seed)

    load_before = list(os.getloadavg())
    shapes = adapter_shapes(args.layers)
    values = sum(a * b for a, b in shapes.values())
    scope = "QUICK: reduced clients/layers" if args.quick else "full"
    print(f"[{scope}] {args.clients} clients x {args.layers} layers = {values:,} values per "
          f"client; threads={args.threads}; bulyan on first {min(args.bulyan_clients, args.clients)}"
          f" clients; {args.num_byzantine} attackers (sign-flipped x10)")
    rules = bench_rules(args, shapes, gen)
    svd = bench_svd(args, shapes, gen)
    summary = {
        "mode": "quick" if args.quick else "full",
        "clients": args.clients, "layers": args.layers, "values_per_client": values,
        "threads": args.threads, "repeat": args.repeat, "torch": torch.__version__, "numpy": np.__version__,
        "numba": numba.__version__ if _kernels.AVAILABLE else None,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
        "rules": rules, "svd_exact": svd,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
