"""Split examples across federated clients (by subreddit, IID, Dirichlet over subreddits, or by author); hold out
test and validation threads.

Pure functions over lists of example dicts; the seed makes every split reproducible.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import NamedTuple

PARTITIONS = ("subreddit", "iid", "dirichlet", "author")
MIN_THREADS_PER_CLIENT = 2  # a client's test split and its training split each need at least one whole thread
DIRICHLET_REDRAWS = 100  # draws tried before the repair step gives threads to the clients left short


def partition_examples(examples: list[dict], num_clients: int, mode: str, seed: int, *,
                       dirichlet_alpha: float = 0.5) -> list[list[dict]]:
    """Return one list of examples per client.

    subreddit: whole subreddits, one topic per client when the counts match (non-IID by topic).
    iid: whole threads dealt at random, balanced by examples.
    dirichlet: per subreddit, client shares drawn from Dir(alpha) (label skew; small alpha = more skew).
    author: each author's replies all go to one client (non-IID by writer), balanced greedily.
    iid and dirichlet move whole threads, so no thread is in two clients' data.
    """
    rng = random.Random(seed)
    if mode == "iid":
        return _iid_by_thread(examples, num_clients, rng)
    if mode == "dirichlet":
        return _dirichlet_by_subreddit(examples, num_clients, dirichlet_alpha, rng)
    if mode == "author":
        return _by_author(examples, num_clients)
    if mode != "subreddit":
        raise ValueError(f"PARTITION={mode!r} is not supported: use {', '.join(PARTITIONS)}")
    by_subreddit: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        by_subreddit[example["subreddit"]].append(example)
    if len(by_subreddit) < num_clients:
        raise ValueError(
            f"PARTITION=subreddit needs at least NUM_TRAINERS={num_clients} subreddits with examples, "
            f"got {len(by_subreddit)} ({', '.join(sorted(by_subreddit)) or 'none'}): add SUBREDDITS or use "
            "PARTITION=iid")
    # Largest subreddits first, each to the client with the fewest examples so far: balanced, still one topic each
    # when the counts match.
    return _greedy_balance([by_subreddit[s] for s in sorted(by_subreddit, key=lambda s: (-len(by_subreddit[s]), s))],
                           num_clients)


def _greedy_balance(groups: list[list[dict]], num_clients: int) -> list[list[dict]]:
    """Each group, in the given order, to the client with the fewest examples so far (ties: lowest index)."""
    clients: list[list[dict]] = [[] for _ in range(num_clients)]
    for group in groups:
        smallest = min(range(num_clients), key=lambda i: (len(clients[i]), i))
        clients[smallest].extend(group)
    return clients


def _threads(examples: list[dict]) -> dict[str, list[dict]]:
    threads: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        threads[example["post_id"]].append(example)
    return threads


def _need_threads(threads: dict, num_clients: int, mode: str) -> None:
    needed = MIN_THREADS_PER_CLIENT * num_clients
    if len(threads) < needed:
        raise ValueError(f"PARTITION={mode} needs at least {needed} threads with examples for {num_clients} clients "
                         f"(a test and a training thread each), got {len(threads)}: collect more posts "
                         "(POSTS_PER_SUBREDDIT) or use fewer clients")


def _iid_by_thread(examples: list[dict], num_clients: int, rng: random.Random) -> list[list[dict]]:
    threads = _threads(examples)
    _need_threads(threads, num_clients, "iid")
    order = sorted(threads)
    rng.shuffle(order)
    return _greedy_balance([threads[post_id] for post_id in order], num_clients)


def dirichlet_proportions(alpha: float, num_clients: int, rng: random.Random) -> list[float]:
    """One draw from Dir(alpha, ..., alpha): normalised Gamma(alpha, 1) draws (random.gammavariate, seeded)."""
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(num_clients)]
    total = sum(draws)
    if total <= 0:  # every draw underflowed (alpha ~ 1e-3): all mass on one client, as the limit alpha -> 0 says
        draws = [0.0] * num_clients
        draws[rng.randrange(num_clients)] = total = 1.0
    return [d / total for d in draws]


def _dirichlet_by_subreddit(examples: list[dict], num_clients: int, alpha: float,
                            rng: random.Random) -> list[list[dict]]:
    """The label-skew split of Hsu et al. 2019 / Li et al. (NIID-Bench) 2022 with subreddits as labels and whole
    threads as the units: for each subreddit draw client shares p ~ Dir(alpha) and cut its shuffled threads at
    the cumulative shares.

    Every client non-empty, guaranteed: a draw that leaves a client with fewer than MIN_THREADS_PER_CLIENT threads
    is redrawn (as NIID-Bench does), at most DIRICHLET_REDRAWS times; if every draw fell short, the client with the
    most threads gives its last thread to a short client until none is short. This ends because there are at
    least MIN_THREADS_PER_CLIENT threads per client (checked first), and it is seeded, so reproducible.
    """
    if alpha <= 0:
        raise ValueError(f"DIRICHLET_ALPHA must be > 0, got {alpha}")
    threads = _threads(examples)
    _need_threads(threads, num_clients, "dirichlet")
    by_subreddit: dict[str, list[str]] = defaultdict(list)
    for post_id in sorted(threads):
        by_subreddit[threads[post_id][0]["subreddit"]].append(post_id)
    for post_ids in by_subreddit.values():
        rng.shuffle(post_ids)
    assignment: list[list[str]] = []
    for _ in range(DIRICHLET_REDRAWS):
        assignment = [[] for _ in range(num_clients)]
        for name in sorted(by_subreddit):
            post_ids = by_subreddit[name]
            shares = dirichlet_proportions(alpha, num_clients, rng)
            start, cumulative = 0, 0.0
            for client, share in enumerate(shares):
                cumulative += share
                end = len(post_ids) if client == num_clients - 1 else round(cumulative * len(post_ids))
                assignment[client].extend(post_ids[start:end])
                start = end
        if min(len(a) for a in assignment) >= MIN_THREADS_PER_CLIENT:
            break
    else:
        while min(len(a) for a in assignment) < MIN_THREADS_PER_CLIENT:
            short = min(range(num_clients), key=lambda i: (len(assignment[i]), i))
            donor = max(range(num_clients), key=lambda i: (len(assignment[i]), -i))
            assignment[short].append(assignment[donor].pop())
    return [[example for post_id in post_ids for example in threads[post_id]] for post_ids in assignment]


def _by_author(examples: list[dict], num_clients: int) -> list[list[dict]]:
    """Each author's replies to one client, biggest authors first to the client with the fewest examples.

    Replies without a known author ([deleted], anonymised dumps) are each their own group. A thread's replies by
    different authors land at different clients, as they would on real users' devices."""
    by_author: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        author = (example.get("author") or "").strip().lower()
        key = author if author and author != "[deleted]" else f"\0{example['id']}"
        by_author[key].append(example)
    if len(by_author) < num_clients:
        raise ValueError(f"PARTITION=author needs at least {num_clients} authors with examples, got "
                         f"{len(by_author)}: collect more posts or use fewer clients")
    return _greedy_balance([by_author[a] for a in sorted(by_author, key=lambda a: (-len(by_author[a]), a))],
                           num_clients)


class ThreadSplit(NamedTuple):
    train: list[dict]
    validation: list[dict]
    test: list[dict]


MIN_VALIDATION_EXAMPLES = 8  # fewer replies make the best-round choice a coin toss


def split_by_thread(examples: list[dict], test_fraction: float, max_train: int | None, seed: int,
                    validation_fraction: float = 0.0) -> ThreadSplit:
    """Hold out whole threads (post ids): test first, then validation, the rest trains. No thread is in two
    splits, so no held-out reply shares a thread with a training reply, and checkpoints chosen on validation are
    never chosen on test. The test split does not depend on `validation_fraction`; validation gets at least
    MIN_VALIDATION_EXAMPLES when the client has enough threads (0 with validation_fraction=0). `max_train` None:
    no cap, every example not held out trains."""
    rng = random.Random(seed)
    if max_train is None:
        max_train = len(examples)
    threads: dict[str, list[dict]] = defaultdict(list)
    for example in examples:
        threads[example["post_id"]].append(example)
    order = sorted(threads)
    rng.shuffle(order)
    max_test = max(12, math.ceil(max_train * test_fraction / (1 - test_fraction)))
    target_test = min(max_test, max(1, round(len(examples) * test_fraction)))
    max_validation = target_validation = 0
    if validation_fraction > 0:
        max_validation = max(MIN_VALIDATION_EXAMPLES,
                             math.ceil(max_train * validation_fraction / (1 - test_fraction - validation_fraction)))
        target_validation = min(max_validation, max(MIN_VALIDATION_EXAMPLES,
                                                    round(len(examples) * validation_fraction)))
    train: list[dict] = []
    validation: list[dict] = []
    test: list[dict] = []
    for post_id in order:
        if len(test) < target_test:
            test.extend(threads[post_id])
        elif len(validation) < target_validation:
            validation.extend(threads[post_id])
        else:
            train.extend(threads[post_id])
    rng.shuffle(train)
    return ThreadSplit(train[:max_train], validation[:max_validation], test[:max_test])
