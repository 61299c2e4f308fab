"""Tensors read through a file mapping: zero-copy views, and paging hints for streaming reads."""

from __future__ import annotations

import mmap
import warnings

import numpy as np
import torch


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A read-only mapped numpy array as a torch tensor over the same memory (no copy).

    torch warns that the memory is not writable; nothing here writes to it (consumers copy or cast)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def advise(mm: mmap.mmap | None, begin: int, end: int, advice: str) -> None:
    """madvise the pages holding bytes [begin, end) of a mapping. Best effort: a no-op where the advice
    or madvise itself is missing (Windows), since these are speed and RSS hints, never correctness.

    "MADV_WILLNEED": start reading them now, in the background; "MADV_DONTNEED": drop them from this
    process's resident set (they stay in the page cache)."""
    flag = getattr(mmap, advice, None)
    if mm is None or flag is None or end <= begin:
        return
    start = begin - begin % mmap.PAGESIZE
    try:
        mm.madvise(flag, start, min(end, len(mm)) - start)
    except (OSError, ValueError):
        pass
