"""Split examples across federated clients (non-IID by subreddit, or IID) and hold out test threads per client.

Pure functions over lists of example dicts; the seed makes every split reproducible.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict


def partition_examples(examples: list[dict], num_clients: int, mode: str, seed: int) -> list[list[dict]]:
    """Return one list of examples per client."""
    rng = random.Random(seed)
    if mode == "iid":
        shuffled = examples[:]
        rng.shuffle(shuffled)
        return [shuffled[i::num_clients] for i in range(num_clients)]
    if mode != "subreddit":
        raise ValueError(f"PARTITION={mode!r} is not supported: use subreddit or iid")
    by_subreddit: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        by_subreddit[example["subreddit"]].append(example)
    if len(by_subreddit) < num_clients:
        raise ValueError(
            f"PARTITION=subreddit needs at least NUM_TRAINERS={num_clients} subreddits with examples, "
            f"got {len(by_subreddit)} ({', '.join(sorted(by_subreddit)) or 'none'}): add SUBREDDITS or use PARTITION=iid")
    # Largest subreddits first, each to the client with the fewest examples so far: balanced, still one topic each
    # when the counts match.
    clients: list[list[dict]] = [[] for _ in range(num_clients)]
    for name in sorted(by_subreddit, key=lambda s: (-len(by_subreddit[s]), s)):
        smallest = min(range(num_clients), key=lambda i: (len(clients[i]), i))
        clients[smallest].extend(by_subreddit[name])
    return clients


def split_by_thread(examples: list[dict], test_fraction: float, max_train: int, seed: int) -> tuple[list, list]:
    """Hold out whole threads (post ids), so no test reply shares a thread with a training reply."""
    rng = random.Random(seed)
    threads: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        threads[example["post_id"]].append(example)
    order = sorted(threads)
    rng.shuffle(order)
    max_test = max(12, math.ceil(max_train * test_fraction / (1 - test_fraction)))
    target_test = min(max_test, max(1, round(len(examples) * test_fraction)))
    train: list[dict] = []
    test: list[dict] = []
    for post_id in order:
        (test if len(test) < target_test else train).extend(threads[post_id])
    rng.shuffle(train)
    return train[:max_train], test[:max_test]
