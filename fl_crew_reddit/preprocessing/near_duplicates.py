"""Near-duplicate texts: MinHash signatures of word shingles, bucketed by LSH banding, confirmed by exact Jaccard.

MinHash (Broder 1997) estimates the Jaccard similarity of two shingle sets from the share of equal signature
entries; banding (Leskovec, Rajaraman & Ullman, Mining of Massive Datasets, ch. 3) turns that into buckets, so
each text is compared only with the texts it shares a bucket with instead of with all of them. The bands are
chosen for high recall at the threshold, and every candidate pair is confirmed with the exact Jaccard similarity
of its shingle sets: banding only decides which pairs get compared, never what is dropped.

Pure: texts in, indices out; the same texts and settings always give the same answer.
"""
from __future__ import annotations

import re
import zlib
from collections import defaultdict

import numpy as np

SHINGLE_WORDS = 3  # word 3-grams: word order matters, a changed word changes only three shingles
NUM_PERMUTATIONS = 64  # signature length; 64 keeps the estimate within ~0.06 of the true Jaccard
MIN_CANDIDATE_RECALL = 0.99  # bands are chosen so a pair at the threshold becomes a candidate this often
_PRIME = 4_294_967_291  # largest prime below 2**32: (a * x + b) stays below 2**64 for 32-bit x, a, b
_WORD = re.compile(r"\w+")


def shingles(text: str, size: int = SHINGLE_WORDS) -> frozenset[int]:
    """32-bit hashes of the lower-cased word `size`-grams; a text shorter than `size` words is one shingle."""
    words = _WORD.findall(text.lower())
    if not words:
        return frozenset()
    grams = [" ".join(words[i:i + size]) for i in range(max(len(words) - size + 1, 1))]
    return frozenset(zlib.crc32(gram.encode("utf-8")) for gram in grams)


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def choose_bands(threshold: float, num_permutations: int = NUM_PERMUTATIONS) -> tuple[int, int]:
    """(bands, rows per band): the most rows (fewest false candidates) that still catch a pair of Jaccard
    `threshold` with probability MIN_CANDIDATE_RECALL, that is 1 - (1 - t**rows)**bands >= recall."""
    for rows in range(num_permutations, 0, -1):
        bands = num_permutations // rows
        if 1 - (1 - threshold ** rows) ** bands >= MIN_CANDIDATE_RECALL:
            return bands, rows
    return num_permutations, 1


class MinHasher:
    """Signatures from NUM_PERMUTATIONS universal hash functions h(x) = (a*x + b) mod p, drawn from `seed`."""

    def __init__(self, num_permutations: int = NUM_PERMUTATIONS, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, size=num_permutations, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, _PRIME, size=num_permutations, dtype=np.uint64)[:, None]

    def signature(self, shingle_set: frozenset[int]) -> np.ndarray:
        x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set))[None, :]
        return ((self.a * x + self.b) % np.uint64(_PRIME)).min(axis=1)


def near_duplicates(texts: list[str], threshold: float, *, num_permutations: int = NUM_PERMUTATIONS,
                    seed: int = 1) -> dict[int, int]:
    """{index of a text: index of the earlier kept text it nearly repeats (Jaccard of shingles >= threshold)}.

    Texts are taken in order; the first of a group is kept and the later ones map to it. Texts without words are
    never near-duplicates (exact duplicates are another rule's job)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    bands, rows = choose_bands(threshold, num_permutations)
    hasher = MinHasher(num_permutations, seed)
    buckets: dict[tuple[int, bytes], list[int]] = defaultdict(list)
    kept_shingles: dict[int, frozenset[int]] = {}
    duplicates: dict[int, int] = {}
    for index, text in enumerate(texts):
        shingle_set = shingles(text)
        if not shingle_set:
            continue
        signature = hasher.signature(shingle_set)
        keys = [(band, signature[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = sorted({other for key in keys for other in buckets.get(key, ())})
        match = next((other for other in candidates if jaccard(shingle_set, kept_shingles[other]) >= threshold), None)
        if match is not None:
            duplicates[index] = match
            continue
        kept_shingles[index] = shingle_set
        for key in keys:
            buckets[key].append(index)
    return duplicates
