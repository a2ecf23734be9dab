"""Compiled column kernels (numba) for the coordinate-wise rules: median, trimmed mean, Bulyan's second stage.

Why: these rules need order statistics of n ~ 10-100 client values for each of millions of coordinates. Eager
torch can only run a sorting network one whole-block step at a time, so every compare-exchange streams the
block through memory again. Here one compiled loop takes a tile of columns that fits in the L2 cache, runs the
entire network on it (every compare-exchange is a min/max over a row of the tile, which the compiler
vectorises), and writes one output value per column: the inputs are read once.

The network is Batcher's odd-even merge sort on the client count padded to a power of two (-inf rows below the
real values, +inf rows above, so the real values keep their ranks in the middle), pruned backwards to the
comparators that can reach the ranks a rule reads: the median needs 1-2 ranks and so about half the network.
Pure functions, no I/O: inputs are never modified. When numba is missing, `AVAILABLE` is False and the rules
use their eager torch sorting network (`_sortnet`) instead, with the same results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._tensors import next_pow2

try:
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is pinned in requirements.txt
    numba = None

AVAILABLE = numba is not None
TILE_BYTES = 1 << 18  # one tile of every client's rows: 256 KiB, inside the L2 cache


def odd_even_merge_sort_pairs(size: int) -> list[tuple[int, int]]:
    """Comparators (i, j), i < j, min to i, of Batcher's odd-even merge sort of `size` (a power of two) values."""
    pairs = []
    block = 1
    while block < size:
        distance = block
        while distance >= 1:
            for first in range(distance % block, size - distance, 2 * distance):
                for offset in range(min(distance, size - first - distance)):
                    low, high = first + offset, first + offset + distance
                    if low // (2 * block) == high // (2 * block):
                        pairs.append((low, high))
            distance //= 2
        block *= 2
    return pairs


@functools.lru_cache(maxsize=64)
def comparators_for(size: int, ranks: tuple[int, ...]) -> np.ndarray:
    """The sorting network of `size` values, keeping only the comparators that can change `ranks`' outputs."""
    needed = set(ranks)
    kept = []
    for low, high in reversed(odd_even_merge_sort_pairs(size)):
        if low in needed or high in needed:
            kept.append((low, high))
            needed.update((low, high))
    return np.asarray(kept[::-1], dtype=np.int64).reshape(-1, 2)


if AVAILABLE:

    @intrinsic
    def _float32_pointer(typingctx, address):  # pragma: no cover - compiled
        """An int64 address as a float32*: the clients' tensors reach the kernels as an array of data pointers
        (a typed List of arrays costs ~8 µs per element to build, more than the kernels' work on small keys)."""
        pointer = types.CPointer(types.float32)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(pointer))

        return pointer(types.int64), codegen

    @njit(cache=True)
    def _row(addresses, index, columns):  # pragma: no cover - compiled
        return numba.carray(_float32_pointer(addresses[index]), columns)

    @njit(parallel=True, cache=True)
    def _sorted_tile_rule(rows, size, pad_low, pairs, lo, hi, keep_closest, out, tile):  # pragma: no cover
        """Per column: sort the padded values with `pairs`, then either the mean of padded ranks [lo, hi), or
        (keep_closest > 0) the mean of the keep_closest real values nearest the median (Bulyan)."""
        n = len(rows)
        columns = out.shape[0]
        for t in prange((columns + tile - 1) // tile):
            start = t * tile
            width = min(tile, columns - start)
            buf = np.empty((size, tile), dtype=np.float32)
            for r in range(pad_low):
                buf[r, :] = -np.inf
            for i in range(n):
                source = _row(rows, i, columns)
                target = buf[pad_low + i]
                for c in range(width):
                    target[c] = source[start + c]
                for c in range(width, tile):
                    target[c] = 0.0
            for r in range(pad_low + n, size):
                buf[r, :] = np.inf
            for q in range(pairs.shape[0]):
                row_a = buf[pairs[q, 0]]
                row_b = buf[pairs[q, 1]]
                for c in range(tile):
                    a = row_a[c]
                    b = row_b[c]
                    row_a[c] = min(a, b)
                    row_b[c] = max(a, b)
            if keep_closest == 0:
                scale = 1.0 / (hi - lo)
                for c in range(width):
                    total = 0.0
                    for r in range(lo, hi):
                        total += buf[r, c]
                    out[start + c] = total * scale
            else:
                first_real = pad_low
                last_real = pad_low + n - 1
                for c in range(width):
                    middle = (buf[pad_low + (n - 1) // 2, c] + buf[pad_low + n // 2, c]) * np.float32(0.5)
                    left = first_real
                    right = last_real
                    for _ in range(n - keep_closest):
                        if (middle - buf[left, c]) > (buf[right, c] - middle):
                            left += 1
                        else:
                            right -= 1
                    total = 0.0
                    for r in range(left, right + 1):
                        total += buf[r, c]
                    out[start + c] = total / keep_closest


    @njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
    def _add_pairwise_sq_distances(rows, columns, partial, tile):  # pragma: no cover
        """partial[g, i, j] += sum over the columns of group g's tiles of (rows[i] - rows[j])^2, for i < j.

        Differences, not a Gram matrix: no cancellation whatever the clients' common offset. Each tile's sum is
        float32 (vectorised; 'reassoc' lets LLVM keep several partial sums), the tiles are summed in float64.
        Clients go in blocks of four against blocks of four: 8 loads feed 16 pairs, instead of 2 loads per pair."""
        n = len(rows)
        tiles = (columns + tile - 1) // tile
        groups = partial.shape[0]
        per_group = (tiles + groups - 1) // groups
        blocks = (n + 3) // 4
        for g in prange(groups):
            for t in range(g * per_group, min(tiles, (g + 1) * per_group)):
                start = t * tile
                stop = min(columns, start + tile)
                width = stop - start
                for block_i in range(blocks):
                    for block_j in range(block_i, blocks):
                        i0 = block_i * 4
                        j0 = block_j * 4
                        if j0 + 3 < n:  # a full 4 x 4 block (i0 <= j0, so the i rows exist too)
                            a0 = _row(rows, i0, columns)[start:stop]
                            a1 = _row(rows, i0 + 1, columns)[start:stop]
                            a2 = _row(rows, i0 + 2, columns)[start:stop]
                            a3 = _row(rows, i0 + 3, columns)[start:stop]
                            b0 = _row(rows, j0, columns)[start:stop]
                            b1 = _row(rows, j0 + 1, columns)[start:stop]
                            b2 = _row(rows, j0 + 2, columns)[start:stop]
                            b3 = _row(rows, j0 + 3, columns)[start:stop]
                            s00 = s01 = s02 = s03 = np.float32(0.0)
                            s10 = s11 = s12 = s13 = np.float32(0.0)
                            s20 = s21 = s22 = s23 = np.float32(0.0)
                            s30 = s31 = s32 = s33 = np.float32(0.0)
                            for c in range(width):
                                x0, x1, x2, x3 = a0[c], a1[c], a2[c], a3[c]
                                y0, y1, y2, y3 = b0[c], b1[c], b2[c], b3[c]
                                s00 += (x0 - y0) * (x0 - y0)
                                s01 += (x0 - y1) * (x0 - y1)
                                s02 += (x0 - y2) * (x0 - y2)
                                s03 += (x0 - y3) * (x0 - y3)
                                s10 += (x1 - y0) * (x1 - y0)
                                s11 += (x1 - y1) * (x1 - y1)
                                s12 += (x1 - y2) * (x1 - y2)
                                s13 += (x1 - y3) * (x1 - y3)
                                s20 += (x2 - y0) * (x2 - y0)
                                s21 += (x2 - y1) * (x2 - y1)
                                s22 += (x2 - y2) * (x2 - y2)
                                s23 += (x2 - y3) * (x2 - y3)
                                s30 += (x3 - y0) * (x3 - y0)
                                s31 += (x3 - y1) * (x3 - y1)
                                s32 += (x3 - y2) * (x3 - y2)
                                s33 += (x3 - y3) * (x3 - y3)
                            sums = (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
                            for a in range(4):
                                for b in range(4):
                                    if i0 + a < j0 + b:  # diagonal blocks: only the pairs above the diagonal
                                        partial[g, i0 + a, j0 + b] += sums[a * 4 + b]
                        else:  # the last, partial block: pair by pair
                            for i in range(i0, min(n, i0 + 4)):
                                row_i = _row(rows, i, columns)[start:stop]
                                for j in range(max(j0, i + 1), min(n, j0 + 4)):
                                    row_j = _row(rows, j, columns)[start:stop]
                                    total = np.float32(0.0)
                                    for c in range(width):
                                        d = row_i[c] - row_j[c]
                                        total += d * d
                                    partial[g, i, j] += total


    @njit(parallel=True, cache=True, fastmath={"contract"})
    def _weighted_sum(rows, weights, out, tile):  # pragma: no cover
        """out = sum_k weights[k] * rows[k] in float32, client by client as the eager sum does, but per tile: each
        input is read once and the accumulator stays in cache (eager `acc.add_(x, alpha=w)` streams it n times)."""
        columns = out.shape[0]
        for t in prange((columns + tile - 1) // tile):
            start = t * tile
            stop = min(columns, start + tile)
            acc = np.zeros(stop - start, dtype=np.float32)
            for k in range(len(rows)):
                weight = np.float32(weights[k])
                source = _row(rows, k, columns)[start:stop]
                for c in range(stop - start):
                    acc[c] += weight * source[c]
            out[start:stop] = acc


def _row_addresses(flats: Sequence[Tensor]) -> tuple[np.ndarray, list[Tensor]]:
    """(int64 data pointers, the float32 contiguous CPU tensors they point into: keep them alive for the call)."""
    tensors = [flat.detach().to(device="cpu", dtype=torch.float32).contiguous() for flat in flats]
    return np.fromiter((t.data_ptr() for t in tensors), dtype=np.int64, count=len(tensors)), tensors


def _run(flats: Sequence[Tensor], ranks: tuple[int, ...], lo: int, hi: int, keep_closest: int) -> Tensor:
    n = len(flats)
    size = next_pow2(n)
    pad_low = (size - n) // 2
    pairs = comparators_for(size, tuple(pad_low + r for r in ranks))
    out = np.empty(flats[0].numel(), dtype=np.float32)
    tile = max(16, TILE_BYTES // (4 * size))
    addresses, alive = _row_addresses(flats)
    _sorted_tile_rule(addresses, size, pad_low, pairs, pad_low + lo, pad_low + hi, keep_closest, out, tile)
    del alive
    return torch.from_numpy(out)


def weighted_sum(flats: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """sum_k weights[k] * flats[k] in float32, one pass over the inputs."""
    out = np.empty(flats[0].numel(), dtype=np.float32)
    addresses, alive = _row_addresses(flats)
    _weighted_sum(addresses, np.asarray(weights, dtype=np.float64), out, 16384)
    del alive
    return torch.from_numpy(out)


def median(flats: Sequence[Tensor]) -> Tensor:
    """Coordinate-wise median; the mean of the two middle values for an even count (numpy's convention)."""
    n = len(flats)
    lo, hi = (n - 1) // 2, n // 2 + 1
    return _run(flats, tuple(range(lo, hi)), lo, hi, 0)


def trimmed_mean(flats: Sequence[Tensor], cut: int) -> Tensor:
    """Coordinate-wise mean of the values left after removing the `cut` smallest and `cut` largest."""
    n = len(flats)
    return _run(flats, tuple(range(cut, n - cut)), cut, n - cut, 0)


def closest_to_median_mean(flats: Sequence[Tensor], keep: int) -> Tensor:
    """Coordinate-wise mean of the `keep` values nearest the median (Bulyan's second stage)."""
    n = len(flats)
    return _run(flats, tuple(range(n)), 0, n, keep)


def pairwise_sq_distances(flat_keys: Sequence[Sequence[Tensor]]) -> Tensor:
    """(n, n) float64 squared distances between clients, over all keys (`flat_keys[k][i]`: key k of client i)."""
    n = len(flat_keys[0])
    partial = np.zeros((max(1, numba.get_num_threads()) * 2, n, n), dtype=np.float64)
    for flats in flat_keys:
        addresses, alive = _row_addresses(flats)
        _add_pairwise_sq_distances(addresses, flats[0].numel(), partial, 4096)
        del alive
    upper = torch.from_numpy(partial.sum(axis=0))
    return upper + upper.T
