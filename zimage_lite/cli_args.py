"""Argument types for the command line: each value is checked where it is parsed.

Each function is an argparse `type=`: it takes the text, returns the value, or raises
`argparse.ArgumentTypeError` with a message that says what is wrong and what is allowed, which the
parser prints as one line (`zimage-lite generate: error: argument --seed: ...`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from zimage_lite.config import DiTConfig

# torch.Generator.manual_seed takes [-2**63, 2**64 - 1], but a negative seed only aliases a large positive
# one (-1 is 2**64 - 1): accepting 0..2**64 - 1 keeps one seed per image, as in the PNG metadata.
SEED_MAX = 2**64 - 1
PIXELS_PER_TOKEN = 16  # VAE factor 8, then patch 2 (DESIGN.md)
# The model's RoPE tables cover axes_lens positions per image axis (h, w): 512 tokens = 8192 pixels.
SIZE_MAX = min(DiTConfig().axes_lens[1:]) * PIXELS_PER_TOKEN
SIZE_MIN = PIXELS_PER_TOKEN
STEPS_MAX = 1000  # the scheduler's training timesteps: more steps repeat timesteps
BATCH_MAX = 64  # images per prompt; more is a loop in the caller's shell, not one process's memory
THREADS_MAX = 1024


def _int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high} (got {value})")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


seed = bounded_int(0, SEED_MAX)
steps = bounded_int(1, STEPS_MAX)
batch = bounded_int(1, BATCH_MAX)
batch_index = bounded_int(0, BATCH_MAX - 1)
threads = bounded_int(1, THREADS_MAX)
repeats = bounded_int(1, 1000)
warmup = bounded_int(0, 1000)


def _float_in(low: float, high: float, text: str) -> float:
    """A number in (low, high]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not low < value <= high:
        raise argparse.ArgumentTypeError(f"must be above {low:g} and at most {high:g} (got {text})")
    return value


def strength(text: str) -> float:
    """An image-to-image strength: the fraction of the schedule re-run, in (0, 1]."""
    return _float_in(0.0, 1.0, text)


def hires_scale(text: str) -> float:
    """A hires-fix upscale factor in (1, 4]: the larger pass's size is checked like --width."""
    return _float_in(1.0, 4.0, text)


def seed_list(text: str) -> str:
    """A comma list of seeds, each as `seed` accepts; returned as given (the bench splits it)."""
    for part in text.split(","):
        if part.strip():
            seed(part)
    return text


def image_size(text: str) -> int:
    """A width or height in pixels: a multiple of 16 from 16 to the model's RoPE limit (8192)."""
    value = _int(text)
    if not SIZE_MIN <= value <= SIZE_MAX or value % PIXELS_PER_TOKEN:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of {PIXELS_PER_TOKEN} from {SIZE_MIN} to {SIZE_MAX}, the most the model's "
            f"position table covers (got {value})"
        )
    return value


def _writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{folder}: {what} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{folder}: {what} is not writable")


def _path(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return Path(text).expanduser()


def _creatable(path: Path) -> None:
    """`path` can be made: what exists above it is a writable folder (missing folders get created)."""
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent} is a file, not a folder")
    _writable_folder(parent, "folder")


def output_file(text: str) -> str:
    """A file to write: not an existing folder, in an existing writable folder."""
    path = _path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name (inside it, say)")
    _writable_folder(path.parent, "output folder")
    return str(path)


def output_folder(text: str) -> str:
    """A folder to write into (created if missing): not an existing file."""
    path = _path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    if path.is_dir():
        _writable_folder(path, "output folder")
    else:
        _creatable(path)
    return str(path)


def convert_output(text: str) -> str:
    """convert -o: a file or a folder, which the converter names and checks against its input."""
    path = _path(text)
    _creatable(path)
    return str(path)


def vram(text: str) -> str:
    """A VRAM size (4GB, 6GiB, 512MB, 5.5G) or auto, as runtime.budget.parse_vram reads it; kept as text."""
    from zimage_lite.errors import UsageError
    from zimage_lite.runtime.budget import parse_vram

    try:
        parse_vram(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("invalid VRAM budget ")) from None
    return text


def card(text: str) -> str:
    """A card size to emulate: as `vram`, but a card has a size (not auto)."""
    if text.strip().lower() == "auto":
        raise argparse.ArgumentTypeError("a card has a size, e.g. 4GB, 6GB or 8GB (got 'auto')")
    return vram(text)


def torch_device(text: str) -> str:
    """A torch device this machine has: cpu, cuda or cuda:N."""
    import torch

    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("this torch has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    return str(device)


def non_negative(text: str) -> float:
    """A finite number >= 0 (guidance scale, cfg normalization factor, cfg truncation)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (got {text})")
    return value
