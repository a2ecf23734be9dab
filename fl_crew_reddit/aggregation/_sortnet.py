"""Column-wise sorting of a few rows (clients) by a bitonic sorting network.

Why: the coordinate-wise rules (median, trimmed mean, Bulyan) need order
statistics of n ~ 10-100 values for each of millions of coordinates.
``torch.sort``/``torch.median`` along dim 0 handle each column as a separate
small problem and are slow for that shape; a sorting network instead applies the
same compare-exchange to whole rows with ``torch.minimum``/``torch.maximum``,
which are vectorised. The rows are padded to a power of two with -inf/+inf so
the real values keep their order in the middle (Batcher 1968, bitonic sort).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._tensors import next_pow2


def padding(n: int) -> tuple[int, int]:
    """(padded row count N, number of -inf rows placed before the real ones)."""
    size = next_pow2(n)
    return size, (size - n) // 2


def fill_rows(flats: Sequence[Tensor], start: int, stop: int, size: int, pad_low: int) -> Tensor:
    """(N, stop-start) float32 block: -inf rows, the clients' values, +inf rows."""
    block = torch.empty((size, stop - start), dtype=torch.float32)
    if pad_low:
        block[:pad_low].fill_(float("-inf"))
    for row, flat in enumerate(flats, start=pad_low):
        block[row].copy_(flat[start:stop])
    if pad_low + len(flats) < size:
        block[pad_low + len(flats):].fill_(float("inf"))
    return block


def _compare_step(src: Tensor, dst: Tensor, k: int, j: int) -> None:
    """One bitonic half-cleaner step of stage k, distance j, src -> dst."""
    size, cols = src.shape
    if k == size:  # last stage: the whole column is sorted ascending
        s = src.view(size // (2 * j), 2, j, cols)
        d = dst.view(size // (2 * j), 2, j, cols)
        torch.minimum(s[:, 0], s[:, 1], out=d[:, 0])
        torch.maximum(s[:, 0], s[:, 1], out=d[:, 1])
        return
    # blocks of size k alternate ascending (index 0) / descending (index 1)
    s = src.view(size // (2 * k), 2, k // (2 * j), 2, j, cols)
    d = dst.view(size // (2 * k), 2, k // (2 * j), 2, j, cols)
    torch.minimum(s[:, 0, :, 0], s[:, 0, :, 1], out=d[:, 0, :, 0])
    torch.maximum(s[:, 0, :, 0], s[:, 0, :, 1], out=d[:, 0, :, 1])
    torch.maximum(s[:, 1, :, 0], s[:, 1, :, 1], out=d[:, 1, :, 0])
    torch.minimum(s[:, 1, :, 0], s[:, 1, :, 1], out=d[:, 1, :, 1])


def bitonic_sort(block: Tensor, *, last_stage: int | None = None) -> Tensor:
    """Sort a (N, C) block along dim 0 (N a power of two); ``block`` is consumed.

    With ``last_stage=N // 2`` only the two halves are sorted (first ascending,
    second descending), which is all the median needs.
    """
    size = block.shape[0]
    last = size if last_stage is None else last_stage
    src, dst = block, torch.empty_like(block)
    k = 2
    while k <= last:
        j = k // 2
        while j >= 1:
            _compare_step(src, dst, k, j)
            src, dst = dst, src
            j //= 2
        k *= 2
    return src


def median_block(flats: Sequence[Tensor], start: int, stop: int) -> Tensor:
    """Coordinate-wise median (numpy convention for even n) of one column range."""
    n = len(flats)
    if n == 1:
        return flats[0][start:stop].to(torch.float32)
    size, pad_low = padding(n)
    half = size // 2
    halves = bitonic_sort(fill_rows(flats, start, stop, size, pad_low), last_stage=half)
    # First step of the final bitonic merge: the elementwise minima are the
    # `half` smallest values, the maxima the `half` largest. The padding puts the
    # real lower middle at padded rank half-1 and the upper middle at rank half.
    lower = torch.minimum(halves[:half], halves[half:]).amax(dim=0)
    if n % 2:
        return lower
    upper = torch.maximum(halves[:half], halves[half:]).amin(dim=0)
    return (lower + upper) * 0.5


def sorted_block(flats: Sequence[Tensor], start: int, stop: int) -> Tensor:
    """(n, C) float32 block of the clients' values sorted along dim 0."""
    n = len(flats)
    size, pad_low = padding(n)
    full = bitonic_sort(fill_rows(flats, start, stop, size, pad_low))
    return full[pad_low:pad_low + n]
