"""zimage-lite: Z-Image-Turbo on 4-8 GB GPUs. Importing this package does nothing but define names."""

from zimage_lite.errors import CheckpointError, ConfigError, UsageError, ZImageError

__all__ = ["Pipeline", "ZImageError", "CheckpointError", "ConfigError", "UsageError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import zimage_lite` stays cheap (no torch import until a pipeline is wanted).
    if name == "Pipeline":
        from zimage_lite.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
