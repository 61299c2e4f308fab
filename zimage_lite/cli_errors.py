"""Any exception that ends a command -> one line for stderr and an exit code.

A user's mistake (ZImageError) and what the machine runs out of (disk, host memory, device memory, an
interrupt) each get a line that says what happened and what to do, exit code 2 (130 for Ctrl-C, 143 for
SIGTERM, which `sigterm_raises` turns into an exception so outputs in progress are removed as for Ctrl-C).
Anything else is a bug: one line that says so, exit code 1; `-v` prints the traceback as well.
"""

from __future__ import annotations

import errno
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

from zimage_lite.errors import ZImageError

EXIT_BUG = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process the signal ended

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# numpy's tofile (gguf-py writes tensors with it) reports a short write without an errno
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
_HOST_OOM = ("can't allocate memory", "DefaultCPUAllocator", "Cannot allocate memory")
# innermost function of the traceback -> the phase it belongs to (pipeline.py and its callees)
PHASES = {
    "load": "loading",
    "encode_ids": "text encoder",
    "encode_prompts": "text encoder",
    "euler_sample": "transformer",
    "denoise": "transformer",
    "decode": "VAE decode",
    "decode_to_uint8": "VAE decode",
    "decode_to_uint8_tiled": "VAE decode",
}


# every character str.splitlines() breaks at, and NUL (a terminal shows nothing) -> its escape
_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00"}


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: `except Exception` must not swallow it)."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated, so cleanup (atomic outputs) runs; outside the main
    thread, where signal handlers cannot be set, it does nothing."""

    def handler(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    """`text` with its line breaks escaped (a path or prompt may hold them)."""
    return text.translate(_LINE_BREAKS)


def phase_of(tb: TracebackType | None) -> str:
    """The phase a traceback went through last: the innermost frame whose function names a phase."""
    phase = "unknown"
    while tb is not None:
        phase = PHASES.get(tb.tb_frame.f_code.co_name, phase)
        tb = tb.tb_next
    return phase


def is_device_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom)


def is_host_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and not is_device_oom(exc) and any(s in str(exc) for s in _HOST_OOM)
    )


def _os_error(exc: OSError) -> str:
    where = exc.filename or "the output"
    if exc.errno in _DISK_FULL or _SHORT_WRITE.search(str(exc)):
        return f"disk full while writing {where}: free some space or write elsewhere (-o); {NOTHING_KEPT}"
    reason = exc.strerror or str(exc)
    return f"{where}: {reason}"


NOTHING_KEPT = "nothing was kept"


def describe(exc: BaseException, kept: list | tuple = ()) -> tuple[str, int]:
    """(one line without the program name, exit code) for an exception that ended a command. `kept`: the
    outputs the command had completed before it (a batch's first images, a conversion renamed into
    place just before Ctrl-C): the line names them instead of saying that nothing was kept."""
    message, code = _describe(exc)
    if kept and NOTHING_KEPT in message:
        names = ", ".join(map(str, kept))
        message = message.replace(NOTHING_KEPT, f"what was complete before is kept: {names}; nothing else")
    return message, code


def _describe(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted; {NOTHING_KEPT}", EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return f"terminated; {NOTHING_KEPT}", EXIT_TERMINATED
    if isinstance(exc, ZImageError):
        return str(exc), EXIT_USAGE
    if is_device_oom(exc):
        phase = phase_of(exc.__traceback__)
        return f"out of device memory in phase {phase}: try --vram auto, or a smaller --vram", EXIT_USAGE
    if is_host_oom(exc):
        phase = phase_of(exc.__traceback__)
        return (
            f"out of host memory in phase {phase}: try a smaller --width/--height/--batch or close other "
            "programs",
            EXIT_USAGE,
        )
    if isinstance(exc, OSError):
        return _os_error(exc), EXIT_USAGE
    first = (str(exc).strip().splitlines() or [""])[0]
    return (
        f"internal error ({type(exc).__name__}: {first}); run with -v for the traceback and report it",
        EXIT_BUG,
    )
