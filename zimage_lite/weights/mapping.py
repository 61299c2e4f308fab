"""Paging hints for tensors read through a file mapping (the converter's streaming reads)."""

from __future__ import annotations

import mmap


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
