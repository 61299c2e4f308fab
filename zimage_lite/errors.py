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
