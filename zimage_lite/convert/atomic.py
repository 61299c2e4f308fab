"""Atomic outputs: write under a temporary name next to the target, rename when complete.

On any exception (KeyboardInterrupt included) the temporary file or folder is removed, so a failed or
interrupted conversion leaves nothing behind; an existing target is only replaced with `force`, and only
once the new output is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zimage_lite.errors import UsageError


def refuse_existing(out: Path, force: bool) -> None:
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_path(out: Path, force: bool, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path (file or created folder) that becomes `out` when the block succeeds."""
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    _remove(tmp)  # a leftover of an earlier crash of this very process id
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous output back
                raise
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
