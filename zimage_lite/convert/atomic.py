"""Atomic outputs: write under a temporary name next to the target, rename when complete.

On any exception (KeyboardInterrupt included) the temporary file or folder is removed, so a failed or
interrupted conversion leaves nothing behind; an existing target is only replaced with `force`, and only
once the new output is complete. Every command writes through here (generate, convert, synthetic, bench),
so outputs get the mode the umask gives (0644 under 022), as any program's files do. A process the kernel
killed (SIGKILL, out of memory) cannot clean up: the next write to the same target removes its leftover.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from zimage_lite.errors import UsageError

_COMMITTED: list[Path] = []  # every output renamed into place by this process, oldest first


def committed() -> list[Path]:
    """The outputs this process has completed so far (the CLI names them when a later step fails or is
    interrupted, instead of claiming that nothing was kept)."""
    return list(_COMMITTED)


def refuse_existing(out: Path, force: bool, marks: tuple[str, ...] = ()) -> None:
    """Refuse an existing output without `force`; a device, FIFO or socket always (renaming over
    /dev/null as root would replace the device); with `marks`, a non-empty folder holding none of those
    names (what marks an earlier output of this command) always: --force replaces an output, never a
    folder of the user's other files."""
    if out.exists() and not (out.is_file() or out.is_dir()):
        raise UsageError(f"{out} is a device, FIFO or socket, not a file: write elsewhere")
    if (out.exists() or out.is_symlink()) and not force:
        raise UsageError(f"{out} already exists; pass --force to overwrite it")
    if marks and out.is_dir() and any(out.iterdir()) and not any((out / m).exists() for m in marks):
        raise UsageError(f"{out} holds files that are not an earlier output: give a new folder")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_leftovers(out: Path) -> None:
    """Temporary outputs for `out` of processes that are gone (killed before they could clean up), and
    of an earlier run with this very process id."""
    prefix = f".{out.name}.part-"
    for tmp in out.parent.iterdir() if out.parent.is_dir() else ():
        pid = tmp.name[len(prefix) :] if tmp.name.startswith(prefix) else ""
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            _remove(tmp)


@contextmanager
def atomic_path(out: Path, force: bool, folder: bool = False, marks: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path (file or created folder) that becomes `out` when the block succeeds
    (`marks`: see refuse_existing)."""
    refuse_existing(out, force, marks)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part-{os.getpid()}")
    _remove_leftovers(out)
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
    _COMMITTED.append(out)
