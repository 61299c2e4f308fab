"""Which matmul path is fastest, measured once per device and remembered.

An H200 showed that guessing is wrong: the fused kernel the old dispatcher picked for M <= 64 was
slower than dequant + cuBLAS at every M measured (issue #12). So a path other than the default
("dequant") is only used where it was timed faster on this device for this problem:
(quant type, weight shape, M bucket). The first call of a problem with more than one candidate times
each candidate on the call's own inputs, keeps the fastest (the default on a tie or an error) and
stores the answer in memory and in a JSON file keyed by the device and the torch/triton versions
(`cache_file()`), so later processes start from it.

The timer is injected: the default times CUDA work with events, tests pass a fake clock.
Measuring happens only on the device types in `measured_on` (CUDA by default); elsewhere, and with
ZIMAGE_LITE_KERNEL_TUNING=0, the default path is used unless the cache already says otherwise.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_PATH = "dequant"
Timer = Callable[[Callable[[], object], torch.device], float]


@dataclass(frozen=True)
class Problem:
    """One matmul shape class: y (M, n) = x (M, k) @ W^T, W of `qtype`, M rounded up to `m_bucket`."""

    qtype: str
    n: int
    k: int
    m_bucket: int

    def key(self) -> str:
        return f"{self.qtype} {self.n}x{self.k} m<={self.m_bucket}"


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the kernels' tiling (and so their speed) changes at these."""
    return 1 << max(0, m - 1).bit_length()


def event_timer(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn() on `device` (CUDA events on a GPU, perf_counter elsewhere).

    The warm-up runs include Triton's first-call compilation, which must not count. On a GPU the L2
    cache is flushed before each timed run: in a real forward a layer's weight comes from DRAM, and a
    small weight left in L2 by the previous repeat would flatter whichever path reads it most."""
    for _ in range(warmup):
        fn()
    flush = _l2_flush_buffer(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _l2_flush_buffer(device: torch.device) -> torch.Tensor | None:
    """Twice the L2 size in bytes (zeroing it evicts the cache), or None off CUDA."""
    if device.type != "cuda":
        return None
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    return torch.empty(2 * l2_bytes, dtype=torch.uint8, device=device)


@functools.cache
def device_label(device: torch.device) -> str:
    """What a measurement is valid for: the GPU model and the torch/triton versions (asked on every
    small-M matmul, hence cached)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    return f"{name} | torch {torch.__version__} | triton {triton_version}"


def cache_file() -> Path:
    """$ZIMAGE_LITE_CACHE_DIR, else $XDG_CACHE_HOME/zimage-lite, else ~/.cache/zimage-lite."""
    root = os.environ.get("ZIMAGE_LITE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "zimage-lite")
    return Path(root) / "kernel-choices.json"


def tuning_enabled() -> bool:
    return os.environ.get("ZIMAGE_LITE_KERNEL_TUNING", "1") != "0"


def _fastest(seconds: dict[str, float]) -> str:
    """The fastest path; the default wins ties (a new path must be measurably faster to be used)."""
    fastest = min(seconds.values())
    return DEFAULT_PATH if seconds.get(DEFAULT_PATH) == fastest else min(seconds, key=seconds.get)


def _default(candidates: dict[str, Callable[[], object]]) -> str:
    return DEFAULT_PATH if DEFAULT_PATH in candidates else next(iter(candidates))


class PathChooser:
    """Remembers, per device label and Problem, which path was measured fastest (module docstring)."""

    def __init__(
        self,
        timer: Timer = event_timer,
        path: Path | None = None,
        measured_on: tuple[str, ...] = ("cuda",),
        label: Callable[[torch.device], str] = device_label,
    ) -> None:
        self.timer = timer
        self.path = path
        self.measured_on = measured_on
        self.label = label
        self._choices: dict[str, dict[str, str]] | None = None

    def known(self, device: torch.device, problem: Problem) -> str | None:
        """The remembered choice for `problem` on `device`, or None."""
        return self._load().get(self.label(device), {}).get(problem.key())

    def choose(
        self, device: torch.device, problem: Problem, candidates: dict[str, Callable[[], object]]
    ) -> str:
        """The path to use: remembered, else measured now (where allowed), else DEFAULT_PATH."""
        if len(candidates) == 1:
            return next(iter(candidates))
        remembered = self.known(device, problem)
        if remembered in candidates:
            return remembered
        if device.type not in self.measured_on or not tuning_enabled():
            return _default(candidates)
        seconds = self._measure(device, problem, candidates)
        if not seconds:
            return _default(candidates)
        best = _fastest(seconds)
        times = ", ".join(f"{n} {s * 1e6:.1f} us" for n, s in seconds.items())
        log.info("kernel choice for %s on %s: %s (%s)", problem.key(), self.label(device), best, times)
        # A failure may be passing (out of memory): then the answer holds for this process only.
        self._remember(device, problem, best, persist=len(seconds) == len(candidates))
        return best

    def _measure(
        self, device: torch.device, problem: Problem, candidates: dict[str, Callable[[], object]]
    ) -> dict[str, float]:
        """Seconds of each candidate that ran; a candidate that fails is simply not chosen."""
        seconds = {}
        for name, fn in candidates.items():
            try:
                seconds[name] = self.timer(fn, device)
            except Exception as exc:
                log.warning("kernel path %s failed on %s (%s): %s", name, problem.key(), device, exc)
        return seconds

    def _load(self) -> dict[str, dict[str, str]]:
        if self._choices is None:
            self._choices = self._read_file()
        return self._choices

    def _read_file(self) -> dict[str, dict[str, str]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable kernel choice cache %s: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _remember(self, device: torch.device, problem: Problem, best: str, persist: bool) -> None:
        label = self.label(device)
        self._load().setdefault(label, {})[problem.key()] = best
        if self.path is None or not persist:
            return
        try:  # merge with what other processes wrote meanwhile, then replace atomically
            merged = self._read_file()
            merged.setdefault(label, {}).update(self._choices[label])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write the kernel choice cache %s: %s", self.path, exc)


_chooser: PathChooser | None = None


def chooser() -> PathChooser:
    """The process-wide chooser (created at first use, reading `cache_file()`)."""
    global _chooser
    if _chooser is None:
        _chooser = PathChooser(path=cache_file())
    return _chooser


def set_chooser(new: PathChooser | None) -> PathChooser | None:
    """Replace the process-wide chooser (tests, benchmarks); None resets it. Returns the old one."""
    global _chooser
    old, _chooser = _chooser, new
    return old
