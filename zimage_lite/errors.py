"""Errors a user can cause. The CLI prints their message as one line and exits with code 2."""


class ZImageError(Exception):
    """Base class: bad input, not a bug. The message must stand on its own as one line."""


class CheckpointError(ZImageError):
    """A checkpoint is missing, truncated, of the wrong model, or has missing/unexpected/misshapen tensors."""


class ConfigError(ZImageError):
    """A configuration value is invalid (from config.json, inferred shapes or the user)."""


class UsageError(ZImageError):
    """A request that cannot be served: bad size, unknown quant type, output exists, no CUDA, ..."""


class NonFiniteError(UsageError):
    """A tensor to quantize holds NaN or infinity (ggml asserts on these; its bytes would be meaningless)."""


class DeviceMemoryError(UsageError):
    """The device (or the card being emulated) has no room for what a phase needs."""


def not_found(path, what: str = "file or folder") -> CheckpointError:
    """The error for an input path that is not a usable `what`: missing, or something else that exists
    (a device such as /dev/null, a FIFO, a socket, or a file where a folder is wanted)."""
    import stat
    from pathlib import Path

    path = Path(path)
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return CheckpointError(f"{path}: no such {what}")
    article = "an" if what[0] in "aeiou" else "a"
    if stat.S_ISDIR(mode):
        return CheckpointError(f"{path} is a folder, not {article} {what}")
    if stat.S_ISREG(mode):
        return CheckpointError(f"{path} is a file, not {article} {what}")
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device"
    return CheckpointError(f"{path} is a {kind}, not {article} {what}")
